"""EAP's gradients taken a chunk of examples at a time (the memory budget) give the scores of the whole
batch at once, for every method and ablation, with padding and with a metric that couples the
examples; a runner's row selection traces as the rows of the whole runner; progress is reported."""

from __future__ import annotations

import pytest
import torch

from circuitlab.eap import METHODS, eap, edge_attribution
from circuitlab.graph import EdgeRunner
from conftest import make_tokens
from minigpt2 import GPT2Config

CFG = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=31, n_ctx=12, vocab_size=61)
B, T = 5, 6
C, W = torch.tensor([3, 14, 15, 42, 55]), torch.tensor([35, 19, 9, 32, 38])


def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
    rows = torch.arange(B)
    return (logits[..., rows, C] - logits[..., rows, W]).mean(-1)


def coupled(logits: torch.Tensor) -> torch.Tensor:
    """Not a mean of per-example terms: each example's weight depends on the others' logits."""
    d = logits[..., torch.arange(B), C] - logits[..., torch.arange(B), W]  # [V, B]
    return (torch.softmax(d, -1) * d).sum(-1)


MODEL_ARGS = dict(cfg=CFG, seed=4, std=0.3, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


def runner(model, ablation, padded=False):
    tokens, corrupted = make_tokens(B, T, 61, seed=1), make_tokens(B, T, 61, seed=2)
    mask = None
    if padded:  # right-padded rows of different lengths
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 4:], mask[3, 5:] = 0, 0
    return EdgeRunner(model, tokens, ablation, corrupted=corrupted if ablation == "resample" else None,
                      attention_mask=mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_chunked_gradients_give_the_whole_batch_scores(model, method, ablation):
    run = runner(model, ablation, padded=ablation == "mean")
    whole = edge_attribution(run, logit_diff, method, steps=2)
    for rows in (1, 2, 4):
        torch.testing.assert_close(edge_attribution(run, logit_diff, method, steps=2, max_rows=rows), whole)


def test_a_metric_that_couples_the_examples_is_chunked_exactly(model):
    run = runner(model, "resample")
    for method in ("eap-ig", "eap-ig-activations"):
        whole = edge_attribution(run, coupled, method, steps=2)
        torch.testing.assert_close(edge_attribution(run, coupled, method, steps=2, max_rows=2), whole)


def test_the_memory_budget_chooses_the_chunks(model, monkeypatch):
    run = runner(model, "resample")
    whole = edge_attribution(run, logit_diff, "eap-ig", steps=2)
    monkeypatch.setenv("MINIGPT2_MEMORY_BUDGET", "1")  # one example a chunk
    assert run.grad_rows() == 1
    torch.testing.assert_close(edge_attribution(run, logit_diff, "eap-ig", steps=2), whole)
    monkeypatch.setenv("MINIGPT2_MEMORY_BUDGET", "1GiB")
    assert run.grad_rows() >= B


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_a_selection_of_rows_traces_as_those_rows(model, ablation):
    run = runner(model, ablation, padded=True)
    mask = run.graph.ones(model.dtype)
    mask[5:, 2:7] = 0.5  # some edges half ablated
    whole = run.trace(mask)
    sub = run.select(slice(1, 4))
    part = sub.trace(mask)
    torch.testing.assert_close(part.logits, whole.logits[1:4])
    torch.testing.assert_close(part.effect, whole.effect[:, 1:4])
    torch.testing.assert_close(sub.clean.logits, run.clean.logits[1:4])


def test_eap_reports_its_passes(model, capsys):
    run = runner(model, "resample")
    circuit = eap(run, logit_diff, "eap-ig", steps=3, top_k=5, max_rows=2, progress=True)
    assert circuit.n_edges == 5
    err = capsys.readouterr().err  # not a terminal: log lines; 3 steps x 3 chunks of examples
    assert "eap-ig gradients: started (9 passes)" in err and "eap-ig gradients: 9/9 passes" in err
    eap(run, logit_diff, "eap-ig", steps=3, top_k=5)
    assert capsys.readouterr().err == ""
