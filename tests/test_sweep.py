"""Single-head sweep: finds a planted head, equals the one-variant-at-a-time loop."""

from __future__ import annotations

import pytest
import torch

from circuitlab.sweep import Metric, Prompts, evaluate_masks, resample_partners, sweep
from minigpt2 import GPT2, GPT2Config
from minigpt2.masking import run_with_head_masks_loop, single_head_masks

from conftest import planted_writer_model

CFG = GPT2Config(n_layer=2, n_head=4, d_model=32, d_mlp=37, n_ctx=23, vocab_size=99)
TARGET = 7  # the token the planted head writes


def prompts_without_target(B: int = 21, T: int = 9, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, CFG.vocab_size - 1, (B, T), generator=torch.Generator().manual_seed(seed))
    return tokens + (tokens >= TARGET).long()  # never TARGET itself


def accuracy_of(target: torch.Tensor) -> Metric:
    return Metric("accuracy", lambda logits, t: (logits.argmax(-1) == t).double(), True, {"t": target})


def logprob_of(target: torch.Tensor) -> Metric:
    def fn(logits, t):
        return logits.log_softmax(-1).gather(-1, t.expand(logits.shape[:-1])[..., None])[..., 0]
    return Metric("logprob", fn, True, {"t": target})


def test_sweep_finds_the_planted_head():
    model = planted_writer_model(CFG, 1, 2, TARGET)
    tokens = prompts_without_target()
    target = torch.full((len(tokens),), TARGET)
    r = sweep(model, Prompts(tokens), [accuracy_of(target), logprob_of(target)])
    assert r.clean["accuracy"] == 1.0
    assert r.top("accuracy", 1)[0][:2] == (1, 2)
    assert r.top("logprob", 1)[0][:2] == (1, 2)
    effect = r.effect("accuracy")
    assert effect[1, 2] < -0.9  # without it the model no longer predicts TARGET
    others = torch.ones_like(effect, dtype=torch.bool)
    others[1, 2] = False
    assert effect[others].abs().max() == 0  # no other head matters to accuracy


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
@pytest.mark.parametrize("call_rows", [512, 32])
def test_sweep_equals_the_loop_reference(ablation, call_rows, monkeypatch):
    """Length-sorted, trimmed blocks and batched variants give what one hooked forward per variant gives:
    70 prompts in two blocks, and in 17 of about 4 rows (what a call of many variants gets)."""
    monkeypatch.setattr("circuitlab.sweep.CALL_ROWS", call_rows)
    torch.manual_seed(1)
    model = GPT2(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    B, T = 70, 11
    tokens = torch.randint(0, CFG.vocab_size, (B, T))
    lengths = torch.randint(3, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, 98))
    target = torch.randint(0, CFG.vocab_size, (B,))
    prompts = Prompts(tokens, mask, ablation=ablation, seed=3)
    metric = logprob_of(target)
    masks = single_head_masks(CFG.n_layer, CFG.n_head)
    masks[3, 0, :2] = 0.0  # and one variant with two heads ablated
    fast = evaluate_masks(model, prompts, masks, [metric])[..., 0]  # [V, B]
    kw = prompts.masking_kwargs()
    slow = run_with_head_masks_loop(model, tokens, masks, metric=metric, **kw)
    torch.testing.assert_close(fast, slow.double(), atol=1e-4, rtol=1e-4)


def test_resample_partners_pair_equal_lengths_and_never_self():
    lengths = torch.tensor([5, 5, 5, 7, 7, 9, 5, 7])
    partner = resample_partners(lengths, seed=0)
    assert (partner != torch.arange(len(lengths))).all()
    same_group = lengths[partner] == lengths
    assert same_group[lengths != 9].all()  # the lone length-9 row pairs with anyone
    assert torch.equal(partner, resample_partners(lengths, seed=0))


def test_prompts_reject_bad_input():
    with pytest.raises(ValueError, match="unknown ablation"):
        Prompts(torch.zeros(2, 3, dtype=torch.long), ablation="noise")
    with pytest.raises(ValueError, match="eval set empty"):
        Prompts(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs at least one metric"):
        sweep(planted_writer_model(CFG, 1, 2, TARGET), Prompts(torch.zeros(2, 3, dtype=torch.long)), [])
