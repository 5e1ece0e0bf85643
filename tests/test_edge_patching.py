"""Exact edge patching: the batched scores equal a plain loop of one full edge-graph forward per edge
(every ablation, padding, answer positions, chunking), the sign is EAP's, subsets and the Circuit
helper behave, and bad input is named."""

from __future__ import annotations

import pytest
import torch

from circuitlab.eap import edge_attribution
from circuitlab.edge_patching import (edge_patching, edge_patching_scores, edge_patching_values,
                                      plain_edge_patching_scores)
from circuitlab.graph import EdgeRunner
from conftest import make_model, make_tokens
from minigpt2 import GPT2Config
from minigpt2.engine import Metric

CFG = GPT2Config(n_layer=3, n_head=2, d_model=16, d_mlp=23, n_ctx=12, vocab_size=41)
B, T = 4, 6


MODEL_ARGS = dict(cfg=CFG, seed=2, std=0.4, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


def runner_for(model, ablation, padded=False, positions=None):
    tokens, corrupted = make_tokens(B, T, CFG.vocab_size, seed=1), make_tokens(B, T, CFG.vocab_size, seed=2)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 4:] = 0
        mask[3, 3:] = 0
    return EdgeRunner(model, tokens, ablation, corrupted=corrupted, attention_mask=mask, positions=positions)


def logit_diff(logits):  # [V, B, vocab] -> [V]
    return (logits[..., 3] - logits[..., 5]).mean(-1)


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("padded", [False, True])
def test_batched_scores_equal_one_trace_per_edge(model, ablation, padded):
    run = runner_for(model, ablation, padded)
    want = plain_edge_patching_scores(run, logit_diff)
    got = edge_patching_scores(run, logit_diff)
    g = run.graph
    assert got.shape == (g.n_receivers, g.n_senders) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[~g.valid] == 0).all() and got[g.valid].abs().min() > 0  # every edge matters a little here
    # small chunks (a chunk of one variant, chunks that split a head's edges) give the same
    torch.testing.assert_close(edge_patching_scores(run, logit_diff, max_rows=B), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(edge_patching_scores(run, logit_diff, max_rows=3 * B), want, rtol=0, atol=1e-12)


def test_other_answer_positions_and_a_metric_object(model):
    positions = torch.tensor([2, 5, 3, 4])
    run = runner_for(model, "resample", positions=positions)
    metric = Metric("lp", lambda logits, t: torch.log_softmax(logits, -1)[..., torch.arange(B), t],
                    True, {"t": torch.tensor([1, 2, 3, 4])})
    want = plain_edge_patching_scores(run, metric)
    torch.testing.assert_close(edge_patching_scores(run, metric), want, rtol=0, atol=1e-12)
    values = edge_patching_values(run, metric)
    clean = metric.mean(run.clean.logits[None]).item()
    torch.testing.assert_close(values[run.graph.valid] - clean, want[run.graph.valid], rtol=0, atol=1e-12)


def test_the_sign_is_eaps_and_subsets_score_only_their_edges(model):
    run = runner_for(model, "resample")
    g = run.graph
    exact = edge_patching_scores(run, logit_diff)
    eap = edge_attribution(run, logit_diff, "eap").cpu().double()
    # both estimate M(ablated) - M(clean): strongly correlated, in the same direction
    a, b = exact[g.valid], eap[g.valid]
    corr = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm())
    assert corr > 0.5
    some = torch.zeros_like(g.valid)
    some[g.receiver_index("logits"), 3] = some[g.receiver_index("a1.h0<k>"), 0] = some[g.receiver_index("m0"), 2] = True
    sub = edge_patching_scores(run, logit_diff, edges=some)
    torch.testing.assert_close(sub[some], exact[some], rtol=0, atol=1e-12)
    assert torch.isnan(sub[g.valid & ~some]).all() and (sub[~g.valid] == 0).all()


def test_edge_patching_circuit_and_bad_input(model):
    run = runner_for(model, "zero")
    c = edge_patching(run, logit_diff, top_k=5)
    assert c.n_edges == 5 and c.info["method"] == "edge-patching" and c.info["higher_is_better"]
    torch.testing.assert_close(c.scores, edge_patching_scores(run, logit_diff))
    with pytest.raises(ValueError, match="exactly one"):
        edge_patching(run, logit_diff)
    with pytest.raises(ValueError, match=r"\[R=.*S=.*\] bool mask"):
        edge_patching_scores(run, logit_diff, edges=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"one value per variant"):
        edge_patching_scores(run, lambda logits: logits[..., 0])
    with model.hooks([("blocks.0.hook_resid_pre", lambda t, hp: t)]):
        with pytest.raises(RuntimeError, match="hooks"):
            edge_patching_scores(run, logit_diff)


def test_float32_agrees_with_the_loop_to_rounding():
    model = make_model(CFG, seed=3, std=0.4)
    run = runner_for(model, "resample")
    want = plain_edge_patching_scores(run, logit_diff)
    got = edge_patching_scores(run, logit_diff)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
