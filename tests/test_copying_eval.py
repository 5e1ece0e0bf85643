"""circuitlab.copying.copying_evaluator: the copying probe logged at every evaluation of a pretraining run
(loss on repeated random tokens, induction and previous-token scores), checked against plain
loops and planted heads."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from circuitlab.classify import induction_scores, repeated_random_tokens
from circuitlab.copying import copying_evaluator
from minigpt2 import GPT2, GPT2Config
from minigpt2.heads import Head

SEQ = 6
POOL = torch.tensor([11, 22, 33, 44, 55, 66, 77, 88, 99, 111])


def small_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=30, n_ctx=1 + 2 * SEQ)).eval()


def planted(layer: int, head: int, target):
    """A hook making (layer, head) attend, from each query q, to the key ``target(b, q)`` (or as before: None)."""
    def hook(pattern, hp):  # [B, H, T, T]
        pattern = pattern.clone()
        B, _, T, _ = pattern.shape
        for b in range(B):
            for q in range(T):
                k = target(b, q)
                if k is not None:
                    pattern[b, head, q] = 0
                    pattern[b, head, q, k] = 1
        return pattern
    return (f"blocks.{layer}.attn.hook_pattern", hook)


def test_scores_and_losses_equal_plain_loops_and_find_planted_heads():
    model = small_model()
    evaluate = copying_evaluator(POOL, seq_len=SEQ, n_examples=4, seed=3)
    tokens = repeated_random_tokens(4, SEQ, seed=3, pool=POOL)
    hooks = [planted(1, 2, lambda b, q: q - SEQ + 1 if q >= SEQ + 1 else None),  # induction: 1 after the last copy
             planted(0, 1, lambda b, q: q - 1 if q >= 1 else None)]  # previous token
    with torch.no_grad(), model.hooks(hooks):
        out = evaluate(model)["copying"]
        logits = model(tokens)
        induction = induction_scores(model, tokens, seq_len=SEQ)
        _, cache = model.run_with_cache(tokens, names=["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])
    # losses: a plain loop over predicted positions
    first, second = [], []
    for b in range(4):
        for t in range(1, 1 + 2 * SEQ):  # token t, predicted at position t - 1
            ce = F.cross_entropy(logits[b, t - 1][None], tokens[b, t][None]).item()
            (first if t <= SEQ else second if t >= SEQ + 2 else []).append(ce)
    assert out["loss_first"] == pytest.approx(sum(first) / len(first), rel=1e-5)
    assert out["loss_second"] == pytest.approx(sum(second) / len(second), rel=1e-5)
    # induction: TransformerLens's score; the planted head is the best, 1 on the second copy
    assert out["induction_max"] == pytest.approx(induction.max().item(), abs=1e-6)
    assert out["induction_top"][0] == "L1H2" and out["induction_max"] > 0.7  # 1 on 6 of its 8 queries
    # previous-token: mean attention to t - 1 over every query after the first
    previous = torch.zeros(2, 3)
    for layer in range(2):
        p = cache[f"blocks.{layer}.attn.hook_pattern"]  # [B, H, T, T]
        for h in range(3):
            previous[layer, h] = sum(p[b, h, q, q - 1] for b in range(4) for q in range(1, 1 + 2 * SEQ)) / (4 * 2 * SEQ)
    assert out["previous_max"] == pytest.approx(previous.max().item(), abs=1e-6)
    assert out["previous_top"][0] == "L0H1" and out["previous_max"] == pytest.approx(1.0)
    for name in out["induction_top"] + out["previous_top"]:  # logged by the display label, "L3H1"
        assert re.fullmatch(r"L\d+H\d+", name) and Head.parse(name).label == name
    assert out["previous_heads"] == int((previous > 0.4).sum()) >= 1
    assert out["induction_heads"] == int((induction > 0.4).sum()) >= 1
    assert out["pool_size"] == len(POOL) and out["seq_len"] == SEQ


def test_a_model_without_those_heads_scores_low():
    out = copying_evaluator(POOL, seq_len=SEQ, n_examples=4)(small_model())["copying"]
    # GPT-2's small random init attends near-uniformly: the induction score is about 1/q
    assert out["induction_max"] < 0.4 and out["induction_heads"] == 0 and out["previous_heads"] == 0


def test_sequences_longer_than_the_context_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"n_ctx=13; pass seq_len <= 6"):
        copying_evaluator(POOL, seq_len=SEQ + 1)(small_model())
