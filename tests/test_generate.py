"""Generation with a KV cache against recomputing the whole forward at every step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BATCH, SEQ, TINY, make_tokens
from minigpt2 import KVCache

PROPERTY = settings(max_examples=20, deadline=None)
ATOL = 1e-5


def greedy_without_cache(model, tokens, n):
    out = tokens
    for _ in range(n):
        with torch.no_grad():
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@PROPERTY
@given(seed=st.integers(0, 2**16), B=st.integers(1, 4), T=st.integers(1, 12), n=st.integers(1, 11))
def test_kv_cache_greedy_equals_recomputing_the_forward(new_model, seed, B, T, n):
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed)
    assert torch.equal(model.generate(tokens, n, stop_token=None), greedy_without_cache(model, tokens, n))


@PROPERTY
@given(seed=st.integers(0, 2**16), B=st.integers(1, 4),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=4), padded=st.booleans(), data=st.data())
def test_forward_in_chunks_through_a_cache_equals_one_forward(new_model, seed, B, chunks, padded, data):
    model = new_model(seed=seed)
    tokens = make_tokens(B, sum(chunks), seed=seed)
    mask = None
    if padded:
        mask = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0, 1]), min_size=tokens.shape[1],
                                                        max_size=tokens.shape[1]), min_size=B, max_size=B)))
        mask[:, -1] = 1
        unmasked_start = data.draw(st.booleans(), label="first chunk without a mask")
        if unmasked_start:
            mask[:, :chunks[0]] = 1
    cache, pieces, start = KVCache(TINY.n_layer), [], 0
    with torch.no_grad():
        whole = model(tokens, attention_mask=mask)
        for i, n in enumerate(chunks):
            piece = None if mask is None or (i == 0 and unmasked_start) else mask[:, start:start + n]
            pieces.append(model(tokens[:, start:start + n], attention_mask=piece, cache=cache))
            start += n
    assert cache.length == tokens.shape[1]
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], whole[real], atol=ATOL, rtol=0)


@PROPERTY
@given(seed=st.integers(0, 2**16), step=st.integers(0, 7))
def test_rows_stop_at_the_stop_token(new_model, seed, step):
    """Take as stop token the token row 0 emits at ``step``: every row stops after its first
    stop token and is padded with it; generation ends when all rows have stopped."""
    model, tokens, n = new_model(seed=seed), make_tokens(5, SEQ, seed=seed), 8
    free = model.generate(tokens, n, stop_token=None)
    stop = free[0, SEQ + step].item()
    want = free.clone()
    for row in want:
        hits = (row[SEQ:] == stop).nonzero()
        if len(hits):
            row[SEQ + hits[0].item():] = stop
    all_stop = max(((r[SEQ:] == stop).nonzero()[0].item() + 1 if (r[SEQ:] == stop).any() else n) for r in free)
    got = model.generate(tokens, n, stop_token=stop)
    assert torch.equal(got, want[:, :SEQ + all_stop])


def test_sampling_with_a_seed_is_reproducible(model, tokens):
    a = model.generate(tokens, 10, temperature=1.5, seed=3, stop_token=None)
    b = model.generate(tokens, 10, temperature=1.5, seed=3, stop_token=None)
    c = model.generate(tokens, 10, temperature=1.5, seed=4, stop_token=None)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, model.generate(tokens, 10, stop_token=None))  # it did sample


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_equals_greedy(model, tokens, temperature):
    sampled = model.generate(tokens, 10, temperature=temperature, top_k=1, seed=0, stop_token=None)
    assert torch.equal(sampled, model.generate(tokens, 10, stop_token=None))


def test_top_k_samples_only_the_k_most_likely(model, tokens):
    """One step from many identical prompts: the samples cover the top 3 tokens and nothing else."""
    prompt = tokens[:1].repeat(200, 1)
    with torch.no_grad():
        top3 = set(model(tokens[:1])[0, -1].topk(3).indices.tolist())
    sampled = model.generate(prompt, 1, temperature=5.0, top_k=3, seed=0, stop_token=None)[:, -1]
    assert set(sampled.tolist()) == top3


def test_generation_stops_at_the_context_length(model):
    tokens = make_tokens(2, TINY.n_ctx - 3)
    out = model.generate(tokens, 10, stop_token=None)
    assert out.shape == (2, TINY.n_ctx)
    assert torch.equal(out, greedy_without_cache(model, tokens, 3))


def test_one_dimensional_prompt(model, tokens):
    assert torch.equal(model.generate(tokens[0], 4, stop_token=None), model.generate(tokens[:1], 4, stop_token=None))


def test_bad_sampling_arguments(model, tokens):
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        model.generate(tokens, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        model.generate(tokens, 3, temperature=1.0, top_k=0)


def test_a_cache_cannot_run_past_the_context(model):
    cache = KVCache(TINY.n_layer)
    model(make_tokens(BATCH, TINY.n_ctx - 1), cache=cache)
    with pytest.raises(ValueError, match=f"length {TINY.n_ctx + 1}: n_ctx is only {TINY.n_ctx}"):
        model(make_tokens(BATCH, 2), cache=cache)


def test_selecting_rows_of_a_cache_continues_those_rows(model):
    tokens, rows = make_tokens(5, SEQ + 2), torch.tensor([3, 1])
    mask = torch.ones_like(tokens)
    mask[1, 2] = 0
    cache = KVCache(TINY.n_layer)
    with torch.no_grad():
        model(tokens[:, :SEQ], attention_mask=mask[:, :SEQ], cache=cache)
        cache.select(rows)
        got = model(tokens[rows, SEQ:], attention_mask=mask[rows, SEQ:], cache=cache)
        want = model(tokens[rows], attention_mask=mask[rows])[:, SEQ:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
