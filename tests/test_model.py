"""The model: first the oracle (transformers' GPT2LMHeadModel on the same weights), then
attention invariants as hypothesis properties, then the input checks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BATCH, SEQ, TINY, make_hf_model, make_tokens
from minigpt2 import GPT2, GPT2Config, load_pretrained

PROPERTY = settings(max_examples=25, deadline=None)
ATOL = 1e-5  # two fp32 paths through a tiny model


# The shared fixtures (model, tokens, new_model, hf_model) live on the test device (conftest's
# MINIGPT2_TEST_DEVICE, default cpu).
pytestmark = pytest.mark.on_device


def greedy_transformers(hf, tokens, n):
    out = hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape == (tokens.shape[0], tokens.shape[1] + n)
    return out


# The oracle ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gpt2_small(tmp_path_factory, device):
    """GPT-2 small's shape (12 x 12 heads, 768, the full 50257 vocabulary; n_positions 64 to
    stay cheap) with random weights, written by GPT2LMHeadModel.save_pretrained."""
    cfg = GPT2Config(n_ctx=64)
    hf = make_hf_model(cfg, seed=1, std=0.05)
    path = tmp_path_factory.mktemp("gpt2-small")
    hf.save_pretrained(path)
    return hf.to(device), path


@pytest.mark.slow
def test_gpt2_small_size_matches_transformers(gpt2_small, device):
    hf, path = gpt2_small
    model = load_pretrained(path, device=device)
    assert model.cfg == GPT2Config(n_ctx=64)
    tokens = make_tokens(3, 9, vocab=50257, seed=1, device=device)
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert want.std() > 0.5  # logits far from zero, so the tolerance below means something
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(model.generate(tokens[:1], 5, stop_token=None, do_sample=False), greedy_transformers(hf, tokens[:1], 5))


def test_tiny_matches_transformers(tmp_path, hf_model, tokens, device):
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, device=device)
    assert model.cfg == TINY
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = model(tokens)
    assert want.std() > 0.5
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(model.generate(tokens, 9, stop_token=None, do_sample=False), greedy_transformers(hf_model, tokens, 9))


def test_right_padding_matches_transformers(tmp_path, hf_model, tokens, device):
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, device=device)
    lengths = torch.randint(1, SEQ + 1, (BATCH,), generator=torch.Generator().manual_seed(3))
    attention_mask = (torch.arange(SEQ) < lengths[:, None]).long().to(device)
    with torch.no_grad():
        want = hf_model(tokens, attention_mask=attention_mask).logits
        got = model(tokens, attention_mask=attention_mask)
    real = attention_mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4


# Attention invariants --------------------------------------------------------------------

def patterns(model, tokens, **kwargs):
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("hook_pattern"), **kwargs)
    return [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layer)]


def right_padding_mask(lengths: list[int], T: int, device=None) -> torch.Tensor:
    return (torch.arange(T) < torch.tensor(lengths)[:, None]).long().to(device or "cpu")


shapes = st.tuples(st.integers(1, 5), st.integers(1, TINY.n_ctx))  # (B, T)


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**16), padded=st.booleans(), data=st.data())
def test_pattern_rows_are_distributions_over_the_past(new_model, device, shape, seed, padded, data):
    B, T = shape
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed, device=device)
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)) if padded else [T] * B
    mask = right_padding_mask(lengths, T, device)
    for pattern in patterns(model, tokens, attention_mask=mask if padded else None):
        assert pattern.shape == (B, TINY.n_head, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(B, TINY.n_head, T, device=device), atol=ATOL, rtol=0)
        assert (pattern.triu(diagonal=1) == 0).all()
        for b, n in enumerate(lengths):
            assert (pattern[b, :, :n, n:] == 0).all()  # real queries never see padding


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_the_future_does_not_move_the_past(new_model, device, shape, seed, data):
    B, T = shape
    t = data.draw(st.integers(0, T - 1), label="t")
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed, device=device)
    changed = tokens.clone()
    changed[:, t + 1:] = make_tokens(B, T - t - 1, seed=seed + 1, device=device)
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], atol=ATOL, rtol=0)
    if t + 1 < T and not torch.equal(changed, tokens):
        assert not torch.allclose(after[:, t + 1:], before[:, t + 1:], atol=ATOL)


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**16), padded=st.booleans())
def test_fused_and_explicit_attention_agree(new_model, device, shape, seed, padded):
    """No pattern hook takes scaled_dot_product_attention; hooking the pattern takes the einsum path."""
    B, T = shape
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed, device=device)
    mask = right_padding_mask([max(1, T - b) for b in range(B)], T, device) if padded else None
    seen = []
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        explicit = model.run_with_hooks(tokens, attention_mask=mask,
                                        fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, h: seen.append(h.name))])
    assert len(seen) == TINY.n_layer
    torch.testing.assert_close(explicit, fused, atol=ATOL, rtol=0)


@PROPERTY
@given(seed=st.integers(0, 2**16), perms=st.lists(st.permutations(range(TINY.n_head)), min_size=TINY.n_layer,
                                                  max_size=TINY.n_layer))
def test_permuting_heads_with_their_weights_leaves_logits_unchanged(new_model, device, seed, perms):
    model, tokens = new_model(seed=seed), make_tokens(seed=seed, device=device)
    permuted = copy.deepcopy(model)
    H, d, D = TINY.n_head, TINY.d_head, TINY.d_model
    for block, perm in zip(permuted.blocks, perms):
        # c_attn rows are [W_Q; W_K; W_V], each head-major: [3, H, d_head] of rows
        rows = (torch.arange(3 * D, device=device).view(3, H, d)[:, perm]).reshape(-1)
        cols = torch.arange(D, device=device).view(H, d)[perm].reshape(-1)  # c_proj columns: W_O, head-major
        with torch.no_grad():
            block.attn.c_attn.weight.copy_(block.attn.c_attn.weight[rows])
            block.attn.c_attn.bias.copy_(block.attn.c_attn.bias[rows])
            block.attn.c_proj.weight.copy_(block.attn.c_proj.weight[:, cols])
    z = "blocks.0.attn.hook_z"
    with torch.no_grad():
        want, cache = model.run_with_cache(tokens, names=[z])
        got, cache_p = permuted.run_with_cache(tokens, names=[z])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache_p[z], cache[z][:, :, perms[0]], atol=ATOL, rtol=0)  # heads did move


@PROPERTY
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, SEQ), min_size=1, max_size=5),
       pad=st.integers(1, TINY.n_ctx - SEQ))
def test_right_padding_with_a_mask_leaves_real_positions_unchanged(new_model, device, seed, lengths, pad):
    model = new_model(seed=seed)
    B, T = len(lengths), SEQ + pad
    tokens = make_tokens(B, T, seed=seed, device=device)  # everything past each length is padding: arbitrary ids
    mask = right_padding_mask(lengths, T, device)
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        for b, n in enumerate(lengths):
            alone = model(tokens[b:b + 1, :n])[0]
            torch.testing.assert_close(padded[b, :n], alone, atol=ATOL, rtol=0)
    assert not padded.isnan().any()


@PROPERTY
@given(seed=st.integers(0, 2**16), shape=shapes, explicit=st.booleans(), data=st.data())
def test_masked_tokens_do_not_reach_real_positions(new_model, device, seed, shape, explicit, data):
    """Any 0/1 attention mask (left, right or inner padding): what the masked positions hold
    cannot move the logits of the real ones, on the fused path and on the explicit one."""
    B, T = shape
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed, device=device)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0, 1]), min_size=T, max_size=T),
                                           min_size=B, max_size=B), label="mask"), device=device)
    other = torch.where(mask.bool(), tokens, make_tokens(B, T, seed=seed + 1, device=device))
    hooks = [(lambda n: n.endswith("hook_pattern"), lambda x, hp: None)] if explicit else []
    with torch.no_grad():
        before = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        after = model.run_with_hooks(other, attention_mask=mask, fwd_hooks=hooks)
    real = mask.bool()
    torch.testing.assert_close(after[real], before[real], atol=ATOL, rtol=0)
    assert before.isfinite().all()


def test_left_padded_rows_stay_finite(model, device):
    """A padded query with no real key before it attends nothing (TransformerLens's rule): its pattern row
    is all zeros and its z is 0, on the fused path too; no empty softmax, no NaN."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    with torch.no_grad():
        fused = model(make_tokens(2, 5), attention_mask=mask)
        explicit, cache = model.run_with_cache(make_tokens(2, 5), attention_mask=mask)
    assert fused.isfinite().all() and explicit.isfinite().all()
    torch.testing.assert_close(explicit, fused, atol=ATOL, rtol=0)
    assert cache["blocks.0.attn.hook_pattern"][0, :, :2].eq(0).all()
    assert cache["blocks.0.attn.hook_z"][0, :2].eq(0).all()
    with torch.no_grad():
        _, fused_cache = model.run_with_cache(make_tokens(2, 5), attention_mask=mask, names=["blocks.0.attn.hook_z"])
    assert fused_cache["blocks.0.attn.hook_z"][0, :2].eq(0).all()


def test_layer_shapes_follow_the_config(device):
    cfg = GPT2Config(n_layer=2, n_head=3, d_model=21, d_mlp=11, n_ctx=9, vocab_size=17)
    model = GPT2(cfg).to(device)
    assert len(model.blocks) == 2
    assert model.blocks[0].attn.W_O.shape == (3, 7, 21)
    assert model.blocks[1].mlp.c_fc.weight.shape == (11, 21)
    assert model(make_tokens(2, 9, vocab=17)).shape == (2, 9, 17)


def test_init_weights_is_seeded_and_gpt2_scaled():
    a, b = GPT2(TINY), GPT2(TINY)
    a.init_weights(seed=5)
    b.init_weights(seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.blocks[0].ln1.weight.eq(1).all() and a.blocks[0].attn.c_attn.bias.eq(0).all()
    ratio = (a.blocks[0].attn.c_attn.weight.std() / a.blocks[0].attn.c_proj.weight.std()).item()
    assert ratio == pytest.approx((2 * TINY.n_layer) ** 0.5, rel=0.2)  # residual projections scaled down


# Input checks: each error names the culprit ------------------------------------------------

def test_token_id_outside_vocabulary(model, device):
    tokens = make_tokens(3, 5, device=device)
    tokens[2, 4] = TINY.vocab_size
    with pytest.raises(ValueError, match=r"token id 99 at \(2, 4\) is outside the vocabulary \[0, 99\)"):
        model(tokens)
    tokens[2, 4] = -1
    with pytest.raises(ValueError, match=r"token id -1 .* outside the vocabulary"):
        model(tokens)


def test_sequence_longer_than_context(model):
    with pytest.raises(ValueError, match=f"length {TINY.n_ctx + 1}: n_ctx is only {TINY.n_ctx}"):
        model(make_tokens(2, TINY.n_ctx + 1))
    model(make_tokens(2, TINY.n_ctx))  # exactly n_ctx is fine


def test_token_tensor_shape_and_dtype(model, device):
    tokens = make_tokens(2, 5, device=device)
    with torch.no_grad():
        expected = model(tokens)
        # As TransformerLens: one sequence [T] is a batch of one; lists and numpy arrays are ids too.
        torch.testing.assert_close(model(tokens[0]), expected[:1], atol=ATOL, rtol=0)
        torch.testing.assert_close(model(tokens.tolist()), expected, atol=0, rtol=0)
        torch.testing.assert_close(model(tokens.cpu().numpy()), expected, atol=0, rtol=0)
        torch.testing.assert_close(model(tokens.int()), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\].*tokens\[None\]"):
        model(tokens[:, :, None])
    with pytest.raises(TypeError, match="integer ids.*float32"):
        model(tokens.float())
    with pytest.raises(TypeError, match="integer ids"):
        model([[1.5, 2.0]])
    with pytest.raises(ValueError, match=r"at least one sequence of at least one token"):
        model(tokens[:0])
    with pytest.raises(ValueError, match=r"at least one sequence of at least one token"):
        model(tokens[:, :0])
    with pytest.raises(TypeError, match=r"positions must be integer indices.*long\(\)"):
        model(tokens, positions=torch.tensor([1.0, 2.0], device=device))


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (1, 5), (2, 5, 1)])
def test_attention_mask_of_the_wrong_shape(model, device, shape):
    with pytest.raises(ValueError, match=rf"attention_mask has shape {re.escape(str(shape))}, expected \(2, 5\), the shape of tokens"):
        model(make_tokens(2, 5), attention_mask=torch.ones(shape, device=device))


def test_positions_out_of_range(model, device):
    with pytest.raises(ValueError, match=r"positions out of range for sequences of length 5"):
        model(make_tokens(2, 5), positions=torch.tensor([0, 5], device=device))
    with pytest.raises(ValueError, match=r"one index per row, shape \[2\], got \(3,\)"):
        model(make_tokens(2, 5), positions=torch.tensor([0, 1, 2], device=device))


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_head=4"):
        GPT2Config(n_head=4, d_model=30)
    with pytest.raises(ValueError, match="n_layer must be positive"):
        GPT2Config(n_layer=0)
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPT2Config.preset("gpt3")
    assert GPT2Config.preset("gpt2-xl").d_head == 64


def test_a_kv_cache_continues_only_its_own_batch(model):
    from minigpt2 import KVCache
    cache = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        model(make_tokens(2, 3), cache=cache)
        with pytest.raises(ValueError, match=r"holds 2 sequences, the tokens 3.*new KVCache"):
            model(make_tokens(3, 1), cache=cache)
        with pytest.raises(ValueError, match=rf"has 1 layers, the model {model.cfg.n_layer}.*KVCache\(model.cfg.n_layer\)"):
            model(make_tokens(2, 1), cache=KVCache(1))


def test_left_padding_shifts_positions_as_transformerlens(model, device):
    """A left-padded row gives the logits of its prompt alone (positions count from its first real token)."""
    tokens = make_tokens(2, 6, device=device)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=device)
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        alone = model(tokens[:1, 3:])
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=ATOL, rtol=0)
