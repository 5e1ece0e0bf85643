"""Metrics against hand-computed values, and [V, B, vocab] stacks against per-variant loops."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpp import Example, encode_eval, metrics

LN2 = math.log(2)


def test_hand_computed_values():
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]
    logits = torch.tensor([[0.0, 0.0, LN2], [3.0, 1.0, 2.0]])
    target = torch.tensor([2, 2])
    assert metrics.cross_entropy(logits, target).tolist() == pytest.approx([LN2, -math.log(math.exp(2) /
                                                                      (math.exp(3) + math.e + math.exp(2)))])
    assert metrics.accuracy(logits, target).tolist() == [1.0, 0.0]
    assert metrics.logit_diff(logits, target, torch.tensor([0, 0])).tolist() == pytest.approx([LN2, -1.0])


def test_kl_hand_value_zero_on_itself_and_finite_where_p_is_zero():
    p = torch.tensor([[0.0, math.log(3)]])  # softmax -> [1/4, 3/4]
    q = torch.zeros(1, 2)  # uniform
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert metrics.kl_div(p, q).item() == pytest.approx(expected)
    assert metrics.kl_div(p, p).item() == pytest.approx(0.0, abs=1e-7)
    inf = torch.tensor([[0.0, -math.inf]])
    assert metrics.kl_div(inf, torch.tensor([[0.0, 5.0]])).item() == pytest.approx(-math.log(1 / (1 + math.exp(5))))
    assert metrics.kl_div(inf, inf).item() == 0.0


def test_mean_sem_hand_value():
    mean, sem = metrics.mean_sem(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean.item() == 2.5 and sem.item() == pytest.approx(math.sqrt(5 / 3) / 2)
    mean, sem = metrics.mean_sem(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and sem.tolist() == pytest.approx([1.0, 0.0])
    assert math.isnan(metrics.mean_sem(torch.tensor([5.0]))[1].item())
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_sem(torch.zeros(3, 0))


@settings(max_examples=20, deadline=None)
@given(V=st.integers(1, 4), B=st.integers(1, 6), vocab=st.integers(2, 11), seed=st.integers(0, 2**31))
def test_variant_stacks_equal_per_variant_computation(V, B, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    stack = torch.randn(V, B, vocab, generator=g) * 3
    clean = torch.randn(B, vocab, generator=g)
    c, b = torch.randint(vocab, (B,), generator=g), torch.randint(vocab, (B,), generator=g)
    per_variant = {
        "ce": (metrics.cross_entropy(stack, c), [metrics.cross_entropy(x, c) for x in stack]),
        "acc": (metrics.accuracy(stack, c), [metrics.accuracy(x, c) for x in stack]),
        "ld": (metrics.logit_diff(stack, c, b), [metrics.logit_diff(x, c, b) for x in stack]),
        "kl": (metrics.kl_div(clean, stack), [metrics.kl_div(clean, x) for x in stack]),
    }
    for name, (batched, looped) in per_variant.items():
        assert batched.shape == (V, B), name
        torch.testing.assert_close(batched, torch.stack(looped), msg=name)
    means, sems = metrics.mean_sem(per_variant["ce"][0])
    assert means.shape == sems.shape == (V,)
    torch.testing.assert_close(means, torch.stack([metrics.mean_sem(x)[0] for x in per_variant["ce"][1]]))


def _batch():
    examples = [Example("all-are", "fish", "cat", "dog", "if all fish are cat and cat are dog then all fish are "),
                Example("all-are", "owl", "dog", "cat", "if all owl are dog and dog are cat then all owl are ")]
    return encode_eval(examples)


def test_summarize_and_final_position():
    batch = _batch()
    B, T, vocab = len(batch), batch.tokens.shape[1], 50257
    full = torch.zeros(3, B, T, vocab)
    for i in range(B):  # put the answer at each row's answer position only
        full[:, i, batch.answer_pos[i], batch.c_token[i]] = torch.tensor([10.0, 0.0, -10.0])
    final = metrics.final_position(full, batch)
    assert final.shape == (3, B, vocab)
    summary = metrics.summarize(final, batch)
    assert summary["accuracy"][0].tolist() == [1.0, 0.0, 0.0]
    assert summary["logit_diff"][0].tolist() == [10.0, 0.0, -10.0]
    assert summary["loss"][0][1].item() == pytest.approx(math.log(vocab))
    plain = metrics.summarize(final[0], batch)
    assert plain["accuracy"][0].ndim == 0 and f"{plain['accuracy'][0]:.2f}" == "1.00"


def test_summarize_refuses_full_sequence_logits():
    batch = _batch()
    with pytest.raises(ValueError, match="final_position"):
        metrics.summarize(torch.zeros(len(batch), batch.tokens.shape[1], 7), batch)


def test_low_precision_logits_are_scored_in_float32():
    logits = torch.tensor([[0.0, 0.0, LN2]], dtype=torch.bfloat16)
    assert metrics.cross_entropy(logits, torch.tensor([2])).dtype == torch.float32
    assert metrics.cross_entropy(logits, torch.tensor([2])).item() == pytest.approx(LN2, abs=1e-2)
