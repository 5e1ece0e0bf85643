"""ACDC: it finds a planted circuit, its batched speculative schedule decides exactly as a plain
loop written here, thresholds behave, bad input is named; and the CLI glue runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from circuitlab.acdc import acdc, kl_metric
from circuitlab.graph import EdgeRunner, Graph
from conftest import make_model, make_tokens
from minigpt2 import GPT2, GPT2Config

PLANTED = [("input", "a0.h1<v>"), ("a0.h1", "a1.h2<v>"), ("a1.h2", "logits")]


def planted_model() -> GPT2:
    """2 layers x 3 heads, d_model 24, where the logits depend on one path: input -> a0.h1 (value)
    -> a1.h2 (value) -> logits.

    Only a0.h1 and a1.h2 write (the other heads' W_O and the MLPs' c_proj are zero), every
    head attends uniformly (W_Q = W_K = 0), and the residual stream has three blocks of 8
    dimensions: tokens write [0, 8) and [16, 24), a0.h1 reads [0, 8) and writes [8, 16),
    a1.h2 reads [8, 16) and writes [16, 24) strongly. Token embeddings and head outputs sum
    to zero over dimensions and token embeddings share one norm, so that resampling a token
    moves no layer norm's mean and, off the path, barely its scale.
    """
    cfg = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=16, vocab_size=99)
    m = GPT2(cfg).double()
    gen = torch.Generator().manual_seed(0)

    def zero_sum(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen, dtype=torch.double)
        return w - w.mean(1, keepdim=True)

    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if name.split(".")[-2].startswith("ln") and name.endswith("weight") else 0.0)
        wte = torch.zeros(99, 24, dtype=torch.double)
        wte[:, list(range(8)) + list(range(16, 24))] = zero_sum(99, 16)
        m.wte.weight.copy_(3 * wte / wte.norm(dim=1, keepdim=True))
        for blk in m.blocks:
            blk.mlp.c_fc.weight.copy_(torch.randn(37, 24, generator=gen, dtype=torch.double))
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        v = 2 * 24  # c_attn rows: W_Q, W_K, W_V, each head-major (8 rows a head)
        a0.c_attn.weight[v + 8:v + 16, 0:8] = torch.randn(8, 8, generator=gen, dtype=torch.double)
        a0.c_proj.weight[8:16, 8:16] = 2 * zero_sum(8, 8).T  # W_O of head 1 -> dims [8, 16)
        a1.c_attn.weight[v + 16:v + 24, 8:16] = torch.randn(8, 8, generator=gen, dtype=torch.double)
        a1.c_proj.weight[16:24, 16:24] = 4 * zero_sum(8, 8).T  # W_O of head 2 -> dims [16, 24)
    return m.eval()


def test_acdc_recovers_a_planted_circuit():
    model = planted_model()
    tokens, corrupted = make_tokens(8, 6, 99, seed=1), make_tokens(8, 6, 99, seed=2)
    run = EdgeRunner(model, tokens, "resample", corrupted=corrupted)
    metric = kl_metric(run.clean.logits)
    res = acdc(run, metric, threshold=0.5)
    assert sorted(res.circuit.edge_list()) == sorted(PLANTED)
    assert res.circuit.nodes() == ["input", "a0.h1", "a1.h2", "logits"]
    assert res.metric_final < 0.1  # the path alone is (nearly) the whole model
    everything = metric(run.trace(torch.zeros_like(run.clean.mask)).logits[None]).item()
    assert everything > 1.0  # while ablating it all is not
    assert all(res.circuit.scores[run.graph.receiver_index(r), run.graph.sender_index(u)] > 0.5 for u, r in PLANTED)


def reference_acdc(run: EdgeRunner, metric, threshold: float, mode: str, higher_is_better: bool) -> torch.Tensor:
    """ACDC as a plain loop: one forward per edge, receivers from the logits back, latest sender first."""
    L, H = run.model.cfg.n_layer, run.model.cfg.n_head
    g = run.graph
    mask = g.ones(run.model.dtype)

    def value(m):
        return metric(run.trace(m).logits[None]).item()

    cur = value(mask)
    order = [("logits", None)]
    for l in reversed(range(L)):
        order.append((f"m{l}", f"m{l}"))
        order += [(f"a{l}.h{h}<{kind}>", f"a{l}.h{h}") for kind in "vkq" for h in reversed(range(H))]
    for receiver, owner in order:
        r = g.receiver_index(receiver)
        if owner is not None and mask[:, g.sender_index(owner)].sum() == 0:
            mask[r] = 0  # nothing reads this component any more
            continue
        for u in reversed(range(g.n_senders)):
            if mask[r, u] == 0:
                continue
            trial = mask.clone()
            trial[r, u] = 0
            new = value(trial)
            worse = cur - new if higher_is_better else new - cur
            if worse < (threshold if mode == "absolute" else threshold * abs(cur)):
                mask, cur = trial, new
    return mask.bool()


@pytest.fixture(scope="module")
def tiny():
    model = make_model(seed=3, std=0.3).double()  # 3 layers x 4 heads, d_model 32, vocab 99
    return EdgeRunner(model, make_tokens(6, 7, 99, seed=4), "resample", corrupted=make_tokens(6, 7, 99, seed=5))


@pytest.mark.parametrize("threshold, mode, metric_name", [
    (0.02, "absolute", "kl"),  # many edges kept
    (0.2, "absolute", "kl"),  # few kept
    (0.1, "relative", "logit_diff"),  # the paper's variant, a metric to maximise
])
def test_batched_acdc_equals_a_plain_loop(tiny, threshold, mode, metric_name):
    c, b = torch.arange(6) * 7 % 99, torch.arange(6) * 11 % 99
    if metric_name == "kl":
        metric, higher = kl_metric(tiny.clean.logits), False
    else:
        metric, higher = (lambda l: (l[..., torch.arange(6), c] - l[..., torch.arange(6), b]).mean(-1)), True
    expected = reference_acdc(tiny, metric, threshold, mode, higher)
    fast = acdc(tiny, metric, threshold, threshold_mode=mode, higher_is_better=higher)
    naive = acdc(tiny, metric, threshold, threshold_mode=mode, higher_is_better=higher, batched=False)
    assert torch.equal(fast.circuit.edges, expected) and torch.equal(naive.circuit.edges, expected)
    assert 0 < fast.circuit.n_edges < tiny.graph.n_edges
    assert fast.metric_final == pytest.approx(naive.metric_final, abs=1e-9)
    assert fast.n_passes < naive.n_passes  # many edges per forward pass
    final = metric(tiny.trace(fast.circuit.mask(torch.double)).logits[None]).item()
    assert final == pytest.approx(fast.metric_final, abs=1e-9)  # the reported metric is the circuit's


def test_acdc_on_some_receivers_keeps_the_others(tiny):
    metric = kl_metric(tiny.clean.logits)
    res = acdc(tiny, metric, 0.05, receivers=["logits", "m2"])
    g = tiny.graph
    decided = torch.zeros(g.n_receivers, dtype=torch.bool)
    decided[[g.receiver_index("logits"), g.receiver_index("m2")]] = True
    assert torch.equal(res.circuit.edges[~decided], g.valid[~decided])
    assert res.circuit.edges[decided].sum() < g.valid[decided].sum()


def test_bad_thresholds_and_metrics_are_named(tiny):
    metric = kl_metric(tiny.clean.logits)
    with pytest.raises(ValueError, match="negative"):
        acdc(tiny, metric, -0.1)
    with pytest.raises(ValueError, match=r"out of range.*\[0, 1\]"):
        acdc(tiny, metric, 1.5, threshold_mode="relative")
    with pytest.raises(ValueError, match="unknown threshold mode 'percent'"):
        acdc(tiny, metric, 0.1, threshold_mode="percent")
    with pytest.raises(ValueError, match="finite"):
        acdc(tiny, metric, float("nan"))
    with pytest.raises(ValueError, match=r"one value per variant \[V\], got \(1, 6\)"):
        acdc(tiny, lambda logits: logits[..., 0], 0.1)  # per example, not averaged
    with pytest.raises(KeyError, match="no receiver named 'm7'"):
        acdc(tiny, metric, 0.1, receivers=["m7"])


@pytest.mark.slow
def test_cli_acdc_and_eap_run_on_tpp_prompts(tmp_path):
    pytest.importorskip("tpp")
    from circuitlab.edge_cli import add_subcommands, corrupted_partners, make_metric

    cfg = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=64, vocab_size=50257)
    make_model(cfg, seed=0, std=0.3).save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    common = ["--model", str(tmp_path / "model"), "--examples", "4", "--threads", "1"]
    args = parser.parse_args(["acdc", *common, "--threshold", "0.05", "--out", str(tmp_path / "acdc")])
    assert args.edge_command(args) == 0
    summary = json.loads((tmp_path / "acdc" / "summary.json").read_text())
    circuit = json.loads((tmp_path / "acdc" / "circuit.json").read_text())
    assert summary["node_counts"]["edges"] == len(circuit["edges"]) and (tmp_path / "acdc" / "circuit.png").exists()
    args = parser.parse_args(["eap", *common, "--ablation", "zero", "--metric", "logit_diff", "--top-k", "20",
                              "--out", str(tmp_path / "eap")])
    assert args.edge_command(args) == 0
    assert len(json.loads((tmp_path / "eap" / "circuit.json").read_text())["edges"]) == 20
    with pytest.raises(SystemExit):
        parser.parse_args(["acdc", *common, "--metric", "bleu"])
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        make_metric("bleu", None, None)
    args = parser.parse_args(["acdc", *common, "--threshold", "2", "--threshold-mode", "relative"])
    assert args.edge_command(args) == 2  # an error message, no traceback

    import tpp
    from tpp.encoding import encode_many

    examples = tpp.make_eval_set(6, seed=1)
    kept, partners = corrupted_partners(examples, seed=1)
    assert kept and all(p.template == e.template and p.c != e.c for e, p in zip(kept, partners))
    lengths = [[len(t) for t in encode_many([e.prompt for e in examples])] for examples in (kept, partners)]
    assert lengths[0] == lengths[1]
