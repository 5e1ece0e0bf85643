"""The one intervention engine (minigpt2.engine): variants departing from any base equal the plain
hook loop; bf16 arithmetic stays close to fp32 and keeps the residual stream in fp32; the searches'
decisions in bf16 are the fp32 decisions, also when a check sits on the threshold; the memory
budget and the join schedule behave."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from circuitlab.acdc import acdc, kl_metric
from circuitlab.graph import EdgeRunner
from circuitlab.search import search
from circuitlab.sweep import Metric, Prompts
from conftest import make_model, make_tokens
from minigpt2.engine import (HeadMaskRunner, Precision, join_schedule, memory_budget, parse_bytes,
                             weighted_mean)
from minigpt2.hardware import parse_dtype
from minigpt2.masking import run_with_head_masks, run_with_head_masks_loop, single_head_masks

L, H = 3, 4


MODEL_ARGS = dict(seed=3, std=0.2)  # the `model` fixture (conftest.module_model)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base_bits=st.integers(0, 2**12 - 1), seed=st.integers(0, 50),
       mode=st.sampled_from(["zero", "mean", "resample"]), V=st.integers(1, 6))
def test_variants_of_any_base_equal_the_hook_loop(model, base_bits, seed, mode, V):
    """The search's use: the base is the current circuit, variants depart from it anywhere."""
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(5, 6, seed=seed)
    ref = make_tokens(5, 6, seed=seed + 1) if mode == "resample" else None
    base = torch.tensor([(base_bits >> i) & 1 for i in range(L * H)], dtype=torch.float32).view(L, H)
    masks = base.repeat(V, 1, 1)
    for v in range(V):  # each variant flips a few heads of the base, from some layer up
        flips = torch.rand(L, H, generator=gen) < 0.25
        masks[v][flips] = 1 - masks[v][flips]
    runner = HeadMaskRunner(model, tokens, mode, reference=ref)
    runner.rebase(base)
    with torch.no_grad():
        got = runner.run(masks, max_rows=int(torch.randint(5, 40, (1,), generator=gen)))
        want = run_with_head_masks_loop(model, tokens, masks, ablation=mode, reference=ref)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    runner.rebase(torch.ones(L, H))  # and back: the cache is dropped above the first change
    torch.testing.assert_close(runner.run(masks), want, atol=2e-5, rtol=1e-5)


def test_bf16_sweep_is_close_to_fp32_and_keeps_a_fp32_residual(model):
    tokens = make_tokens(13, 7, seed=1)
    masks = single_head_masks(L, H)
    fp32 = run_with_head_masks(model, tokens, masks)
    bf16 = run_with_head_masks(model, tokens, masks, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32  # logits handed back in the model's dtype
    assert not torch.equal(bf16, fp32)  # the arithmetic really was bf16
    scale = fp32.abs().max()
    assert (bf16 - fp32).abs().max() < 0.03 * scale
    effects32, effects16 = ((x[1:] - x[0]).pow(2).sum(-1).mean(-1) for x in (fp32, bf16))
    assert spearman(effects32, effects16) > 0.95
    # the residual stream itself stays fp32 (only matmul outputs are bf16), so the error is far
    # below what a model loaded in bf16 gives
    all_bf16 = run_with_head_masks(make_model(seed=3, std=0.2).to(torch.bfloat16), tokens, masks).float()
    assert (bf16 - fp32).abs().mean() < (all_bf16 - fp32).abs().mean()


def test_parse_dtype_names_the_choices():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="torch.float32.*torch.bfloat16"):
        parse_dtype(torch.float16)
    with pytest.raises(ValueError, match="is not supported"):
        run_with_head_masks(make_model(), make_tokens(2, 3), single_head_masks(L, H), dtype="int8")


def tpp_like(model, B=40, T=8, seed=0):
    tokens = make_tokens(B, T, seed=seed)
    prompts = Prompts(tokens, ablation="mean")
    with torch.no_grad():
        clean = model(tokens, positions=prompts.positions)
    target = clean.argmax(-1)
    other = clean.argsort(-1)[:, -2]

    def logit_diff(l, t, o):
        return l.gather(-1, t.expand(l.shape[:-1])[..., None])[..., 0] - l.gather(-1, o.expand(l.shape[:-1])[..., None])[..., 0]
    return prompts, Metric("logit_diff", logit_diff, True, {"t": target, "o": other})


@pytest.mark.parametrize("order", ["layer-up", "layer-down"])
def test_bf16_search_gives_the_fp32_circuit_even_on_the_threshold(model, order):
    prompts, metric = tpp_like(model)
    fp32 = search(model, prompts, metric, 0.05, order)
    assert 0 < len(fp32.ablated) < L * H
    # put the threshold on a check's own drop (just above it, so fp32 keeps that ablation):
    # bf16's rounding alone would decide it either way
    c = sorted(fp32.checks, key=lambda c: abs(c.drop - 0.05))[0]
    threshold = c.drop + 1e-7
    fp32 = search(model, prompts, metric, threshold, order)
    bf16 = search(model, prompts, metric, threshold, order, dtype=torch.bfloat16)
    assert bf16.ablated == fp32.ablated
    assert [ch.kept for ch in bf16.checks] == [ch.kept for ch in fp32.checks]
    assert bf16.dtype == "bf16" and bf16.precision["rechecked"] >= 1 and bf16.precision["error"] > 0
    assert any(ch.exact_recheck for ch in bf16.checks)
    assert fp32.precision == {"exact": True, "error": 0.0, "rechecked": 0}


def test_bf16_search_with_rigorous_prompts_gives_the_fp32_circuit(model):
    prompts, metric = tpp_like(model, B=20, seed=0)
    rig, rmetric = tpp_like(model, B=40, seed=1)
    kw = dict(rigorous_prompts=rig, rigorous_metric=rmetric)
    fp32 = search(model, prompts, metric, 0.1, **kw)
    bf16 = search(model, prompts, metric, 0.1, dtype="bf16", **kw)
    assert bf16.ablated == fp32.ablated


def test_bf16_acdc_gives_the_fp32_circuit_even_on_the_threshold(model):
    tokens, corrupted = make_tokens(8, 6, seed=4), make_tokens(8, 6, seed=5)
    run32 = EdgeRunner(model, tokens, "resample", corrupted=corrupted)
    metric = kl_metric(run32.clean.logits)
    first = acdc(run32, metric, 0.02)
    evaluated = [e for e in first.log if not e["skipped"]]
    # a threshold just above one decision's own worsening: the bf16 value alone could flip it
    pick = sorted(evaluated, key=lambda e: abs(e["worsening"] - 0.02))[0]
    threshold = pick["worsening"] + 1e-7
    want = acdc(run32, metric, threshold)
    run16 = EdgeRunner(model, tokens, "resample", corrupted=corrupted, dtype=torch.bfloat16)
    got = acdc(run16, kl_metric(run32.clean.logits), threshold)
    assert torch.equal(got.circuit.edges, want.circuit.edges)
    assert got.circuit.info["dtype"] == "bf16" and got.circuit.info["precision"]["rechecked"] >= 1
    assert run16.exact_values([run16.clean.mask], metric) == pytest.approx([0.0], abs=1e-6)


def test_bf16_accuracy_search_of_a_model_right_on_no_example_gives_the_fp32_circuit(model):
    """Accuracy 0 everywhere the calibration looks measures no bf16 error at all, yet bf16 can flip an
    argmax later (the bundled base's search did, on the avx512_bf16 machine): the error of a right-or-wrong
    metric is at least one example, so every check near the threshold in those units goes to fp32."""
    prompts, _ = tpp_like(model, B=25)
    with torch.no_grad():
        least = model(prompts.tokens, positions=prompts.positions).argmin(-1)  # never the argmax
    accuracy = Metric("accuracy", lambda l, t: (l.argmax(-1) == t).double(), True, {"t": least}, step=1.0)
    fp32 = search(model, prompts, accuracy, 0.03)
    bf16 = search(model, prompts, accuracy, 0.03, dtype=torch.bfloat16)
    assert bf16.ablated == fp32.ablated
    assert bf16.precision["error"] >= 4 / 25  # SAFETY x one example of 25
    assert all(ch.exact_recheck for ch in bf16.checks if abs(ch.value - ch.baseline) <= 2 / 25)
    assert bf16.precision["rechecked"] >= 1


def test_bf16_acdc_allows_an_accuracy_metric_one_example_of_error(model):
    """ACDC's calibration of a right-or-wrong metric, as the search's: at least one example of B."""
    tokens, corrupted = make_tokens(8, 6, seed=4), make_tokens(8, 6, seed=5)
    run16 = EdgeRunner(model, tokens, "resample", corrupted=corrupted, dtype=torch.bfloat16)
    with torch.no_grad():
        least = model(tokens)[:, -1].argmin(-1)  # right on no example
    accuracy = Metric("accuracy", lambda l, t: (l.argmax(-1) == t).double(), True, {"t": least}, step=1.0)
    got = acdc(run16, accuracy, 0.05, higher_is_better=True, receivers=["logits"])
    assert got.circuit.info["precision"]["error"] >= 4 / 8
    want = acdc(EdgeRunner(model, tokens, "resample", corrupted=corrupted), accuracy, 0.05, higher_is_better=True,
                receivers=["logits"])
    assert torch.equal(got.circuit.edges, want.circuit.edges)


def test_precision_rule():
    p = Precision.measure([1.0, 2.01], [1.0, 2.0])
    assert p.error == pytest.approx(4 * 0.01 + 2 / 4096)
    assert Precision.measure([0.0, 0.0], [0.0, 0.0], step=0.05).error == pytest.approx(4 * 0.05)
    assert Precision.measure([1.0, 2.1], [1.0, 2.0], step=0.05).error == pytest.approx(4 * 0.1 + 2 / 4096)
    assert p.near(0.05) and not p.near(0.2)
    assert not Precision().near(0.0)  # fp32: never re-checked
    with pytest.raises(ValueError, match="same variants"):
        Precision.measure([1.0], [])


def test_memory_budget_and_schedule(monkeypatch):
    assert memory_budget("cpu") == 2**30
    monkeypatch.setenv("MINIGPT2_MEMORY_BUDGET", "512MiB")
    assert memory_budget("cpu") == 2**29
    assert parse_bytes("1GiB") == 2**30 and parse_bytes("4096") == 4096
    for bad in ("lots", "-1", "0"):
        with pytest.raises(ValueError, match="MINIGPT2_MEMORY_BUDGET"):
            parse_bytes(bad)
    # chunks hold variants in the order they depart from the base
    assert join_schedule([3, 0, 2, 0, 1], 2) == [[1, 3], [4, 2], [0]]


def test_a_small_budget_gives_the_same_values(model, monkeypatch):
    tokens = make_tokens(6, 5)
    masks = single_head_masks(L, H)
    want = run_with_head_masks(model, tokens, masks)
    monkeypatch.setenv("MINIGPT2_MEMORY_BUDGET", "1")  # one example's rows per chunk
    torch.testing.assert_close(run_with_head_masks(model, tokens, masks), want)


def test_weighted_mean_counts_real_tokens_only():
    x = torch.arange(12.0).view(1, 2, 3, 2)  # [N, B, T, d]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = weighted_mean(x, mask)
    assert got.shape == (1, 3, 2)
    torch.testing.assert_close(got[0, 0], (x[0, 0, 0] + x[0, 1, 0]) / 2)
    torch.testing.assert_close(got[0, 1], x[0, 0, 1])
    torch.testing.assert_close(got[0, 2], torch.zeros(2))  # no real token: 0
    torch.testing.assert_close(weighted_mean(x, mask, over_positions=True)[0], x[0][mask.bool()].mean(0))
