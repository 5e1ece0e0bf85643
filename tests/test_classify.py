"""Head classification recovers heads built to attend to position 0, to themselves, to the
previous token (hand-set Q/K weights) and to induction targets (a hook on hook_pattern)."""

from __future__ import annotations

import pytest
import torch

from circuitlab.classify import (
    attending_heads,
    attention_patterns,
    class_scores,
    classify_heads,
    target_attention,
)
from minigpt2 import GPT2Config

from conftest import planted_attention_model

T_MAX = 10
CFG = GPT2Config(n_layer=2, n_head=4, d_model=40, d_mlp=37, n_ctx=T_MAX, vocab_size=99)


def repeated_tokens(B: int = 23, T: int = 9, period: int = 4, seed: int = 0) -> torch.Tensor:
    """Random tokens repeating with ``period``: every query after the first period has an
    earlier occurrence of its token (induction targets)."""
    first = torch.randint(0, CFG.vocab_size, (B, period), generator=torch.Generator().manual_seed(seed))
    return first.repeat(1, -(-T // period))[:, :T]


def plant_induction(tokens: torch.Tensor, layer: int = 1, head: int = 0):
    """A hook that makes (layer, head) attend to the token after the latest earlier occurrence
    of the query's token, where there is one."""
    def hook(pattern, hp):  # [B, H, T, T]
        pattern = pattern.clone()
        B, _, T, _ = pattern.shape
        for b in range(B):
            for q in range(T):
                js = [j for j in range(q - 1) if tokens[b, j] == tokens[b, q]]
                if js:
                    pattern[b, head, q] = 0
                    pattern[b, head, q, js[-1] + 1] = 1
        return pattern
    return (f"blocks.{layer}.attn.hook_pattern", hook)


def test_classify_recovers_planted_heads():
    model = planted_attention_model(CFG)
    tokens = repeated_tokens()
    with model.hooks([plant_induction(tokens)]):
        hc = classify_heads(model, tokens)
    assert hc.heads["first"] == [(0, 0)]
    assert hc.heads["self"] == [(0, 1)]
    assert hc.heads["previous"] == [(0, 2)]
    assert hc.heads["induction"] == [(1, 0)]
    assert hc.mean["first"][0, 0] > 0.95 and hc.mean["self"][0, 1] > 0.95 and hc.mean["previous"][0, 2] > 0.95
    assert hc.classes_of(0, 3) == []  # the untouched head is near-uniform: no class
    assert hc.counts([(0, 0), (1, 0)]) == {"first": 1, "self": 0, "previous": 0, "induction": 1}


def test_thresholds_decide_assignment():
    model = planted_attention_model(CFG)
    tokens = repeated_tokens()
    default = classify_heads(model, tokens)
    uniformish = float(default.mean["first"][0, 3])
    assert 0.15 < uniformish < 0.35  # near-uniform attention over 2..9 keys gives position 0 about 0.23
    assert (0, 3) not in default.heads["first"]
    loose = classify_heads(model, tokens, score_threshold=uniformish / 2, min_fraction=0.5)
    assert (0, 3) in loose.heads["first"]
    share = float(loose.fraction["first"][0, 3])  # of examples above the loose threshold
    assert (0, 3) in classify_heads(model, tokens, score_threshold=uniformish / 2, min_fraction=share).heads["first"]
    if share < 1:
        assert (0, 3) not in classify_heads(model, tokens, score_threshold=uniformish / 2, min_fraction=share + 1e-3).heads["first"]


def test_padding_is_never_a_query():
    """Scores of a right-padded row equal those of the same row alone, unpadded."""
    model = planted_attention_model(CFG)
    tokens = repeated_tokens(B=6, T=9)
    lengths = torch.tensor([9, 5, 7, 4, 9, 6])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    padded = torch.where(mask.bool(), tokens, torch.full_like(tokens, 3))
    scores = class_scores(attention_patterns(model, padded, mask), padded, mask)
    for b, n in enumerate(lengths.tolist()):
        alone = class_scores(attention_patterns(model, tokens[b:b + 1, :n]), tokens[b:b + 1, :n])
        for name in scores:
            torch.testing.assert_close(scores[name][b], alone[name][0], equal_nan=True, atol=1e-5, rtol=1e-5)


def test_induction_undefined_without_repeats():
    model = planted_attention_model(CFG)
    tokens = torch.arange(9)[None].repeat(3, 1)  # no token repeats
    hc = classify_heads(model, tokens)
    assert hc.heads["induction"] == []
    assert class_scores(attention_patterns(model, tokens), tokens)["induction"].isnan().all()


def test_target_attention_from_the_final_position():
    model = planted_attention_model(CFG)
    tokens = repeated_tokens(B=5)
    patterns = attention_patterns(model, tokens)
    keys = torch.zeros(tokens.shape, dtype=torch.bool)
    keys[:, 0] = True
    att = target_attention(patterns, torch.full((5,), 8), keys).mean(dim=0)  # [L, H]
    assert att[0, 0] > 0.95 and att[0, 1] < 0.05
    assert attending_heads(att, 0.5) == [(0, 0)]


def test_bad_thresholds_are_refused():
    model = planted_attention_model(CFG)
    with pytest.raises(ValueError, match="score_threshold"):
        classify_heads(model, repeated_tokens(), score_threshold=1.5)
    with pytest.raises(ValueError, match="min_fraction"):
        classify_heads(model, repeated_tokens(), min_fraction=0)
    with pytest.raises(ValueError, match="non-empty"):
        classify_heads(model, torch.zeros(0, 4, dtype=torch.long))


@pytest.mark.parametrize("c_threshold", [-1.0, 1.5, float("nan")])
def test_a_c_threshold_outside_attention_weights_is_refused(c_threshold):
    from circuitlab.classify import check_class_args

    with pytest.raises(ValueError, match=r"c_threshold=\S+ must be a (finite )?number in \[0, 1\] \(an attention weight"):
        check_class_args(0.4, 0.8, c_threshold)
    check_class_args(0.4, 0.8, 0.0)


def test_induction_score_is_transformerlens_diagonal_and_finds_a_planted_head():
    """TransformerLens's tutorial score: the attention diagonal at offset 1 - seq_len of [BOS, s, s],
    averaged; a plain loop over (example, query) gives the same, and a planted induction head scores
    1 on every query of the second repeat."""
    from circuitlab.classify import induction_scores
    model, n = planted_attention_model(CFG), 4
    tokens = torch.tensor([[98, 1, 2, 3, 4, 1, 2, 3, 4], [98, 5, 6, 7, 8, 5, 6, 7, 8]])
    with model.hooks([plant_induction(tokens)]):
        scores = induction_scores(model, tokens, seq_len=n)
        p = attention_patterns(model, tokens)  # [B, L, H, T, T]
    B, L, H, T, _ = p.shape
    loop = torch.zeros(L, H)
    for l in range(L):
        for h in range(H):
            vals = [p[b, l, h, q, q - (n - 1)] for b in range(B) for q in range(n - 1, T)]
            loop[l, h] = sum(vals) / len(vals)
    torch.testing.assert_close(scores, loop)
    # the planted head: 1 on the 4 second-repeat queries, its own attention on the 2 first-repeat ones
    edge = (p[:, 1, 0, n - 1, 0] + p[:, 1, 0, n, 1]).mean()
    assert scores[1, 0] == pytest.approx((4 + edge.item()) / 6, abs=1e-6) and scores[1, 0] > 0.65
    assert scores[0, 0] < 0.2 and scores[0, 2] < 0.2  # first-token and previous-token heads are not induction


def test_repeated_random_tokens():
    from circuitlab.classify import induction_scores, repeated_random_tokens
    t = repeated_random_tokens(5, 7, vocab_size=99, seed=3)
    assert t.shape == (5, 15) and (t[:, 0] == 50256).all() and torch.equal(t[:, 1:8], t[:, 8:])
    assert t[:, 1:].max() < 99 and torch.equal(t, repeated_random_tokens(5, 7, vocab_size=99, seed=3))
    assert not torch.equal(t, repeated_random_tokens(5, 7, vocab_size=99, seed=4))
    pool = torch.tensor([3, 17, 42])
    t = repeated_random_tokens(4, 6, pool=pool, bos=None)
    assert t.shape == (4, 12) and set(t.unique().tolist()) <= {3, 17, 42}
    with pytest.raises(ValueError, match="seq_len=1 must be a whole number >= 2"):
        repeated_random_tokens(3, 1)
    with pytest.raises(ValueError, match="pool holds no token"):
        repeated_random_tokens(3, 4, pool=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="cannot hold two repeats of seq_len=5"):
        induction_scores(planted_attention_model(CFG), torch.zeros(2, 9, dtype=torch.long), seq_len=5)


def test_prepend_bos_puts_endoftext_first_as_transformerlens_does():
    """TransformerLens's to_tokens(prompt) = [<|endoftext|>] + the prompt's tokens; a padded batch keeps its padding."""
    from circuitlab.classify import prepend_bos

    tokens, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    t, m = prepend_bos(tokens, mask)
    assert torch.equal(t, torch.tensor([[50256, 5, 6, 7], [50256, 8, 9, 0]]))
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])) and m.dtype == mask.dtype
    t, m = prepend_bos(tokens, None, bos=3)
    assert m is None and torch.equal(t[:, 0], torch.tensor([3, 3])) and torch.equal(t[:, 1:], tokens)
    # a head that attends to position 0 is a first-token head whatever holds that position
    model = planted_attention_model(CFG)
    plain = classify_heads(model, repeated_tokens())
    first, first_mask = prepend_bos(repeated_tokens(), None, bos=11)
    assert (0, 0) in plain.heads["first"] and (0, 0) in classify_heads(model, first, first_mask).heads["first"]
