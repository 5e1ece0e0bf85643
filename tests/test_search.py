"""The circuit search: the fast search makes the decisions of the paper's plain loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from circuitlab.search import performance_drop, search, search_order, search_reference
from circuitlab.sweep import Metric, Prompts
from minigpt2 import GPT2, GPT2Config

from conftest import planted_writer_model

CFG = GPT2Config(n_layer=3, n_head=4, d_model=32, d_mlp=37, n_ctx=23, vocab_size=99)
TARGET = 7


def random_model(seed: int = 0, std: float = 0.3) -> GPT2:
    """float64, so that the fast and the plain search see the same values to ~1e-15."""
    torch.manual_seed(seed)
    model = GPT2(CFG).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def batch(B: int = 40, T: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size - 1, (B, T), generator=gen)
    tokens = tokens + (tokens >= TARGET).long()
    lengths = torch.randint(4, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return tokens, mask, torch.randint(0, CFG.vocab_size, (B,), generator=gen)


def pick(logits, t):
    return logits.gather(-1, t.expand(logits.shape[:-1])[..., None])[..., 0]


def metric(name: str, target: torch.Tensor, other: torch.Tensor, clean: torch.Tensor | None = None) -> Metric:
    if name == "accuracy":
        return Metric(name, lambda l, t: (l.argmax(-1) == t).double(), True, {"t": target})
    if name == "logit_diff":
        return Metric(name, lambda l, t, o: pick(l, t) - pick(l, o), True, {"t": target, "o": other})
    if name == "loss":
        return Metric(name, lambda l, t: -pick(l.log_softmax(-1), t), False, {"t": target})
    return Metric(name, lambda l, c: (c.softmax(-1) * (c.log_softmax(-1) - l.log_softmax(-1))).sum(-1), False,
                  {"c": clean})


def same_search(model, prompts, m, threshold, order, drop, speculate, rigorous=None):
    kw = dict(rigorous_prompts=rigorous[0], rigorous_metric=rigorous[1]) if rigorous else {}
    fast = search(model, prompts, m, threshold, order, drop, speculate=speculate, **kw)
    ref = search_reference(model, prompts, m, threshold, order, drop, **kw)
    assert fast.ablated == ref.ablated
    assert [(c.layer, c.head, c.kept) for c in fast.checks] == [(c.layer, c.head, c.kept) for c in ref.checks]
    for a, b in zip(fast.checks, ref.checks):
        assert math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(a.baseline, b.baseline, rel_tol=1e-9, abs_tol=1e-9)
    return fast, ref


@pytest.mark.parametrize("name,order,ablation,drop,threshold,speculate", [
    ("logit_diff", "layer-up", "zero", "relative", 0.1, 1),
    ("logit_diff", "layer-down", "mean", "absolute", 0.2, 3),
    ("loss", "layer-up", "resample", "relative", 0.1, 4),
    ("loss", "layer-down", "zero", "absolute", 0.05, 2),
    ("kl", "layer-up", "mean", "absolute", 0.05, 5),
    ("accuracy", "layer-down", "resample", "relative", 0.2, 3),
])
def test_fast_search_equals_the_plain_loop(name, order, ablation, drop, threshold, speculate):
    model = random_model(1)
    tokens, mask, other = batch()
    clean = model(tokens, attention_mask=mask, positions=Prompts(tokens, mask).positions).detach()
    target = clean.argmax(-1)  # what the intact model predicts, so that ablations can hurt
    prompts = Prompts(tokens, mask, ablation=ablation, seed=2)
    fast, ref = same_search(model, prompts, metric(name, target, other, clean), threshold, order, drop, speculate)
    assert 0 < len(fast.ablated) < CFG.n_layer * CFG.n_head  # a real mix of decisions, not a trivial run
    assert fast.variants_evaluated < ref.variants_evaluated * 2


def test_rigorous_mode_equals_the_plain_loop_and_removes_less():
    model = random_model(2)
    tokens, mask, target = batch(B=12, seed=1)
    big_tokens, big_mask, big_target = batch(B=60, seed=2)
    m, big = metric("logit_diff", target, target.roll(1)), metric("logit_diff", big_target, big_target.roll(1))
    prompts, rig = Prompts(tokens, mask), Prompts(big_tokens, big_mask)
    plain, _ = same_search(model, prompts, m, 0.1, "layer-up", "absolute", 3)
    strict, _ = same_search(model, prompts, m, 0.1, "layer-up", "absolute", 3, rigorous=(rig, big))
    assert strict.rigorous_examples == 60
    assert any(c.rigorous_value is not None for c in strict.checks)
    rejected_by_recheck = [c for c in strict.checks if c.drop < 0.1 and not c.kept]
    assert all(c.rigorous_drop >= 0.1 for c in rejected_by_recheck)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), threshold=st.floats(0.0, 0.3), speculate=st.integers(1, 6),
       order=st.sampled_from(["layer-up", "layer-down"]))
def test_fast_search_equals_the_plain_loop_property(seed, threshold, speculate, order):
    model = random_model(seed % 7)
    tokens, mask, target = batch(B=10, seed=seed)
    same_search(model, Prompts(tokens, mask), metric("loss", target, target), threshold, order, "relative", speculate)


def test_search_keeps_only_the_planted_head():
    model = planted_writer_model(CFG, 2, 1, TARGET)
    tokens, mask, _ = batch()
    target = torch.full((len(tokens),), TARGET)
    for speculate in (1, 4):
        r = search(model, Prompts(tokens, mask), metric("accuracy", target, target), 0.03, speculate=speculate)
        assert r.kept_heads == [(2, 1)]
        assert r.clean_value == 1.0 and r.final_value == 1.0
    c = r.to_json("planted", CFG.to_dict())
    assert c["kept_heads"] == [[2, 1]] and len(c["ablated_heads"]) == CFG.n_layer * CFG.n_head - 1
    assert {"model", "config", "metric", "threshold", "ablated_heads", "kept_heads"} <= set(c)


def test_drop_definition():
    assert performance_drop(0.8, 0.78, True, "absolute") == pytest.approx(0.02)
    assert performance_drop(0.8, 0.78, True, "relative") == pytest.approx(0.025)
    assert performance_drop(-2.0, -2.5, True, "relative") == pytest.approx(0.25)  # |baseline| for negatives
    assert performance_drop(1.0, 1.5, False, "relative") == pytest.approx(0.5)  # lower is better: a rise is a drop
    assert performance_drop(0.0, 0.0, True, "relative") == 0.0
    assert search_order(2, 2, "layer-down") == [[(1, 1), (1, 0)], [(0, 1), (0, 0)]]


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=1.5), "out of range for a relative drop"),
    (dict(threshold=-0.1), ">= 0"),
    (dict(threshold=float("nan")), "finite"),
    (dict(order="sideways"), "unknown search order"),
    (dict(drop="percent"), "unknown drop"),
    (dict(speculate=0), "speculate"),
])
def test_search_rejects_bad_arguments(kw, match):
    tokens, mask, target = batch(B=3)
    with pytest.raises(ValueError, match=match):
        search(random_model(), Prompts(tokens, mask), metric("loss", target, target), **kw)
