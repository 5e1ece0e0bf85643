"""Generation with a KV cache against recomputing the whole forward at every step, and against TransformerLens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BATCH, SEQ, TINY, make_model, make_tokens
from minigpt2 import KVCache

PROPERTY = settings(max_examples=20, deadline=None)
ATOL = 1e-5


# The shared fixtures (model, tokens, new_model, hf_model) live on the test device (conftest's
# MINIGPT2_TEST_DEVICE, default cpu).
pytestmark = pytest.mark.on_device


def greedy_without_cache(model, tokens, n):
    out = tokens
    for _ in range(n):
        with torch.no_grad():
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@PROPERTY
@given(seed=st.integers(0, 2**16), B=st.integers(1, 4), T=st.integers(1, 12), n=st.integers(1, 11))
def test_kv_cache_greedy_equals_recomputing_the_forward(new_model, seed, B, T, n, device):
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed, device=device)
    assert torch.equal(model.generate(tokens, n, stop_token=None, do_sample=False), greedy_without_cache(model, tokens, n))


@PROPERTY
@given(seed=st.integers(0, 2**16), B=st.integers(1, 4),
       chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4),  # at most 20 tokens: n_ctx is 23
       padded=st.booleans(), data=st.data())
def test_forward_in_chunks_through_a_cache_equals_one_forward(new_model, device, seed, B, chunks, padded, data):
    model = new_model(seed=seed)
    tokens = make_tokens(B, sum(chunks), seed=seed, device=device)
    mask = None
    if padded:
        mask = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0, 1]), min_size=tokens.shape[1],
                                                        max_size=tokens.shape[1]), min_size=B, max_size=B)),
                            device=device)
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
def test_rows_stop_at_the_stop_token(new_model, seed, step, device):
    """Take as stop token the token row 0 emits at ``step``: every row stops after its first
    stop token and is padded with it; generation ends when all rows have stopped."""
    model, tokens, n = new_model(seed=seed), make_tokens(5, SEQ, seed=seed, device=device), 8
    free = model.generate(tokens, n, stop_token=None, do_sample=False)
    stop = free[0, SEQ + step].item()
    want = free.clone()
    for row in want:
        hits = (row[SEQ:] == stop).nonzero()
        if len(hits):
            row[SEQ + hits[0].item():] = stop
    all_stop = max(((r[SEQ:] == stop).nonzero()[0].item() + 1 if (r[SEQ:] == stop).any() else n) for r in free)
    got = model.generate(tokens, n, stop_token=stop, do_sample=False)
    assert torch.equal(got, want[:, :SEQ + all_stop])


def test_sampling_with_a_seed_is_reproducible(model, tokens):
    a = model.generate(tokens, 10, temperature=1.5, seed=3, stop_token=None)
    b = model.generate(tokens, 10, temperature=1.5, seed=3, stop_token=None)
    c = model.generate(tokens, 10, temperature=1.5, seed=4, stop_token=None)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, model.generate(tokens, 10, stop_token=None, do_sample=False))  # it did sample


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_equals_greedy(model, tokens, temperature):
    sampled = model.generate(tokens, 10, temperature=temperature, top_k=1, seed=0, stop_token=None)
    assert torch.equal(sampled, model.generate(tokens, 10, stop_token=None, do_sample=False))


def test_top_k_samples_only_the_k_most_likely(model, tokens):
    """One step from many identical prompts: the samples cover the top 3 tokens and nothing else."""
    prompt = tokens[:1].repeat(200, 1)
    with torch.no_grad():
        top3 = set(model(tokens[:1])[0, -1].topk(3).indices.tolist())
    sampled = model.generate(prompt, 1, temperature=5.0, top_k=3, seed=0, stop_token=None)[:, -1]
    assert set(sampled.tolist()) == top3


def test_generation_stops_at_the_context_length(model, device):
    tokens = make_tokens(2, TINY.n_ctx - 3, device=device)
    with pytest.warns(UserWarning, match=f"max_new_tokens=10, but the context of {TINY.n_ctx} positions leaves "
                                         f"room for 3 after the {TINY.n_ctx - 3}-token prompt: generating 3"):
        out = model.generate(tokens, 10, stop_token=None, do_sample=False)
    assert out.shape == (2, TINY.n_ctx)
    assert torch.equal(out, greedy_without_cache(model, tokens, 3))


def test_one_dimensional_prompt(model, tokens):
    assert torch.equal(model.generate(tokens[0], 4, stop_token=None, do_sample=False),
                       model.generate(tokens[:1], 4, stop_token=None, do_sample=False))


def test_bad_sampling_arguments(model, tokens):
    with pytest.raises(ValueError, match="temperature=-1 must be a number >= 0"):
        model.generate(tokens, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k=0 must be a whole number >= 1"):
        model.generate(tokens, 3, temperature=1.0, top_k=0)


def test_a_cache_cannot_run_past_the_context(model, device):
    cache = KVCache(TINY.n_layer)
    model(make_tokens(BATCH, TINY.n_ctx - 1, device=device), cache=cache)
    with pytest.raises(ValueError, match=f"length {TINY.n_ctx + 1}: n_ctx is only {TINY.n_ctx}"):
        model(make_tokens(BATCH, 2, device=device), cache=cache)


def test_selecting_rows_of_a_cache_continues_those_rows(model, device):
    tokens, rows = make_tokens(5, SEQ + 2, device=device), torch.tensor([3, 1], device=device)
    mask = torch.ones_like(tokens)
    mask[1, 2] = 0
    cache = KVCache(TINY.n_layer)
    with torch.no_grad():
        model(tokens[:, :SEQ], attention_mask=mask[:, :SEQ], cache=cache)
        cache.select(rows)
        got = model(tokens[rows, SEQ:], attention_mask=mask[rows, SEQ:], cache=cache)
        want = model(tokens[rows], attention_mask=mask[rows])[:, SEQ:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ TransformerLens's generate
# The oracle: TransformerLens 3.x's HookedTransformer.generate on the same weights (see test_lens_api.py).
# The tiny model checks token-id generation; the bundled base model (GPT-2's vocabulary) text.

@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    from test_lens_api import hf_tokenizer

    return hf_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tl_tiny(tl_twin, hf_tok, device):
    from test_lens_api import twin

    model = make_model(device=device)
    # GPT-2's tokenizer, though the vocabulary is tiny: TransformerLens's cached generation needs one
    return model, twin(tl_twin, model, tokenizer=hf_tok)


@pytest.fixture(scope="module")
def tl_base(tl_twin, bundled_base, hf_tok):
    from test_lens_api import BASE, twin

    return bundled_base, twin(tl_twin, bundled_base, BASE, hf_tok)


def tl_generate(tl, input, n, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl.generate(input, max_new_tokens=n, verbose=False, **kwargs)


PROMPTS = ["if all cats are dogs and all dogs are birds then all cats are", "The capital of France",
           "1, 2, 3, 4,"]


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_greedy_equals_transformer_lens_on_tokens(tl_tiny, use_past_kv_cache, device):
    model, tl = tl_tiny
    tokens = make_tokens(4, SEQ, seed=1, device=device)
    want = tl_generate(tl, tokens, 12, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    got = model.generate(tokens, 12, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    assert torch.equal(got, want)


def test_greedy_on_text_equals_transformer_lens(tl_base):
    model, tl = tl_base
    assert model.generate(PROMPTS[0], 6, prepend_bos=False, do_sample=False) == tl_generate(tl, PROMPTS[0], 6, do_sample=False,
                                                                            prepend_bos=False)
    want = tl_generate(tl, PROMPTS, 6, do_sample=False, return_type="tokens")  # left-padded by TransformerLens
    assert torch.equal(model.generate(PROMPTS, 6, return_type="tokens", do_sample=False), want)
    assert model.generate(PROMPTS, 6, do_sample=False) == [tl.tokenizer.decode(row, skip_special_tokens=True) for row in want]


def test_left_padded_token_batch_equals_transformer_lens(tl_base):
    """Token ids with padding_side="left": leading <|endoftext|> tokens are padding, as TransformerLens takes them."""
    model, tl = tl_base
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    want = tl_generate(tl, tokens, 6, do_sample=False, padding_side="left")
    assert torch.equal(model.generate(tokens, 6, padding_side="left", do_sample=False), want)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(top_p=0.8),
                                    dict(temperature=1.0, freq_penalty=2.0), dict(top_k=3, top_p=0.5)])
def test_sampling_equals_transformer_lens_under_one_seed(tl_tiny, kwargs, device):
    """seed=s draws what TransformerLens draws after torch.manual_seed(s); seed=None uses the global generator."""
    model, tl = tl_tiny
    tokens = make_tokens(3, SEQ, seed=2, device=device)
    torch.manual_seed(11)
    want = tl_generate(tl, tokens, 10, do_sample=True, stop_at_eos=False, **kwargs)
    assert torch.equal(model.generate(tokens, 10, do_sample=True, stop_at_eos=False, seed=11, **kwargs), want)
    torch.manual_seed(11)
    assert torch.equal(model.generate(tokens, 10, do_sample=True, stop_at_eos=False, **kwargs), want)


def test_default_generation_samples_as_transformer_lens(tl_tiny, tl_base, device):
    """No do_sample, no temperature: both sample at temperature 1, the same tokens after the same manual_seed."""
    model, tl = tl_tiny
    tokens = make_tokens(3, SEQ, seed=6, device=device)
    torch.manual_seed(5)
    want = tl_generate(tl, tokens, 10, stop_at_eos=False)
    torch.manual_seed(5)
    got = model.generate(tokens, 10, stop_at_eos=False)
    assert torch.equal(got, want) and not torch.equal(got, model.generate(tokens, 10, stop_at_eos=False,
                                                                          do_sample=False))
    model, tl = tl_base
    for prompt in (PROMPTS[1], PROMPTS):
        torch.manual_seed(2)
        want = tl_generate(tl, prompt, 8)
        torch.manual_seed(2)
        assert model.generate(prompt, 8) == want


def test_stopping_at_eos_equals_transformer_lens(tl_tiny, tl_base, device):
    model, tl = tl_tiny
    tokens = make_tokens(5, SEQ, seed=3, device=device)
    eos = model.generate(tokens, 8, stop_at_eos=False, do_sample=False)[0, SEQ + 2].item()
    assert torch.equal(model.generate(tokens, 8, eos_token_id=eos, do_sample=False), tl_generate(tl, tokens, 8, do_sample=False,
                                                                               eos_token_id=eos))
    # several stop ids: stopped rows are padded with <|endoftext|> (needs GPT-2's vocabulary)
    model, tl = tl_base
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    T = tokens.shape[1]
    free = model.generate(tokens, 8, stop_at_eos=False, padding_side="left", do_sample=False)
    eos = [free[0, T + 2].item(), free[1, T + 3].item()]
    got = model.generate(tokens, 8, eos_token_id=eos, padding_side="left", do_sample=False)
    assert torch.equal(got, tl_generate(tl, tokens, 8, do_sample=False, eos_token_id=eos, padding_side="left"))
    assert got[0, T + 3:].eq(50256).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 8), min_size=2, max_size=4),
       n=st.integers(1, 8), use_past_kv_cache=st.booleans())
def test_each_row_of_a_left_padded_batch_continues_its_own_prompt(new_model, device, seed, lengths, n,
                                                                 use_past_kv_cache):
    """Greedy generation of a left-padded batch (attention_mask) gives each row what its prompt gives alone."""
    model = new_model(seed=seed)
    T = max(lengths)
    tokens = make_tokens(len(lengths), T, seed=seed, device=device)
    mask = torch.zeros_like(tokens)
    for i, length in enumerate(lengths):
        mask[i, T - length:] = 1
    tokens = tokens.masked_fill(~mask.bool(), 0)
    batch = model.generate(tokens, n, attention_mask=mask, stop_token=None, use_past_kv_cache=use_past_kv_cache,
                           do_sample=False)
    for i, length in enumerate(lengths):
        alone = model.generate(tokens[i:i + 1, T - length:], n, stop_token=None, do_sample=False)
        assert torch.equal(batch[i, T:], alone[0, length:])


def test_a_batch_of_texts_continues_each_text_as_alone(tl_base):
    """A list of texts is left-padded (whatever padding_side says, as in TransformerLens): each row is its prompt's."""
    model, _ = tl_base
    ids = model.generate(PROMPTS, 6, padding_side="right", return_type="tokens", stop_at_eos=False, do_sample=False)
    T = ids.shape[1] - 6
    for row, p in zip(ids, PROMPTS):
        alone = model.generate(p, 6, return_type="tokens", stop_at_eos=False, do_sample=False)[0]
        assert torch.equal(row[T - (len(alone) - 6):], alone)
        assert torch.equal(row[:T - (len(alone) - 6)], torch.full_like(row[:T - (len(alone) - 6)], 50256))


def test_return_types(tl_base):
    model, _ = tl_base
    prompt = "The Eiffel Tower is in"  # whose 4 greedy tokens hold no <|endoftext|>, so none stops early
    greedy = dict(do_sample=False)
    assert 50256 not in model.generate(prompt, 4, return_type="tokens", stop_at_eos=False, **greedy)[0, -4:].tolist()
    text = model.generate(prompt, 4, **greedy)
    assert isinstance(text, str) and text.startswith(prompt) and "<|endoftext|>" not in text
    ids = model.generate(prompt, 4, return_type="tokens", **greedy)
    assert ids.shape == (1, model.to_tokens(prompt).shape[1] + 4)
    assert model.generate(ids[:, :-4], 4, return_type="str", **greedy) == text
    assert torch.equal(model.generate(ids[:, :-4], 4, **greedy), ids)  # tokens in, tokens out
    assert model.generate([prompt], 4, **greedy) == text  # one text in a list: a string, as in TransformerLens


def test_sampling_switches(model, tokens):
    greedy = model.generate(tokens, 6, stop_token=None, do_sample=False)
    assert torch.equal(model.generate(tokens, 6, do_sample=False, temperature=2.0, stop_token=None), greedy)
    assert torch.equal(model.generate(tokens, 6, do_sample=True, temperature=0.0, seed=1, stop_token=None), greedy)
    assert not torch.equal(model.generate(tokens, 6, temperature=1.0, seed=1, stop_token=None), greedy)
    sampled = model.generate(tokens, 6, seed=1, stop_token=None)  # TransformerLens's default: sampling at temperature 1
    assert torch.equal(sampled, model.generate(tokens, 6, do_sample=True, temperature=1.0, seed=1, stop_token=None))
    assert not torch.equal(sampled, greedy)


def test_max_new_tokens_zero_returns_the_prompt(model, tokens):
    assert torch.equal(model.generate(tokens, 0), tokens)


def test_verbose_shows_a_progress_bar(model, tokens, capsys):
    model.generate(tokens, 3, stop_token=None, verbose=True)
    assert "generate" in capsys.readouterr().err
    model.generate(tokens, 3, stop_token=None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature=nan must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature=-0.5 must be a number >= 0"),
    (dict(top_k=0), "top_k=0 must be a whole number >= 1"),
    (dict(top_p=0.0), r"top_p=0.0 must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p=nan must be a finite number in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1 must be a whole number >= 0"),
    (dict(return_type="embeds"), "return_type must be 'input', 'str' or 'tokens'"),
    (dict(input=[]), "the prompt is empty"),
    (dict(input=torch.zeros(1, 0, dtype=torch.long)), r"the prompt is empty: token ids of shape \(1, 0\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0]])), "attention_mask row 0 ends with padding"),
    (dict(stop_token=3, eos_token_id=4), "not both"),
])
def test_bad_generation_input_is_named(model, tokens, kwargs, match):
    kwargs = {"input": tokens[:1], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(kwargs.pop("input"), kwargs.pop("max_new_tokens"), **kwargs)


def test_an_empty_text_prompt_is_named(tl_base):
    model, _ = tl_base
    with pytest.raises(ValueError, match="the prompt is an empty string and prepend_bos=False"):
        model.generate("", 3, prepend_bos=False)
    with pytest.raises(ValueError, match="prompt 1 is an empty string"):
        model.generate(["a", ""], 3, prepend_bos=False)
    assert isinstance(model.generate("", 3), str)  # "" with the BOS: TransformerLens's default input
