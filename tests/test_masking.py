"""Batched head masking against its references: the one-at-a-time hook loop, zeroed W_O
columns, and replacement values computed here from the cache."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BATCH, SEQ, TINY, make_tokens
from minigpt2.masking import last_positions, run_with_head_masks, run_with_head_masks_loop, single_head_masks

PROPERTY = settings(max_examples=25, deadline=None)
ATOL = 2e-5
L, H, d = TINY.n_layer, TINY.n_head, TINY.d_head
MASK_VALUES = [1.0, 0.0, 0.4]  # keep, ablate, interpolate


@st.composite
def mask_batches(draw, max_variants=5):
    """[V, L, H] masks whose first ablated layer varies (L: ablates nothing), so that prefix
    sharing, chunking and the reordering of variants are all exercised."""
    V = draw(st.integers(1, max_variants))
    masks = torch.ones(V, L, H)
    for v in range(V):
        first = draw(st.integers(0, L))
        values = draw(st.lists(st.sampled_from(MASK_VALUES), min_size=(L - first) * H, max_size=(L - first) * H))
        masks[v, first:] = torch.tensor(values).view(L - first, H)
    return masks


def right_padding(B: int, T: int, seed: int) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(T) < lengths[:, None]).long()


MODES = [("zero", "position"), ("mean", "position"), ("mean", "all"), ("resample", "position")]


@PROPERTY
@given(masks=mask_batches(), mode=st.sampled_from(MODES), B=st.integers(1, 4), T=st.integers(1, 9),
       seed=st.integers(0, 2**16), padded=st.booleans(), own_positions=st.booleans(), data=st.data())
def test_batched_equals_the_hook_loop(new_model, masks, mode, B, T, seed, padded, own_positions, data):
    mode, mean_over = mode
    model, tokens = new_model(seed=seed), make_tokens(B, T, seed=seed)
    kwargs = dict(ablation=mode, mean_over=mean_over)
    if padded:
        kwargs["attention_mask"] = right_padding(B, T, seed)
    if own_positions:
        kwargs["positions"] = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(seed))
    if mode == "resample":
        kwargs["reference"] = make_tokens(B, T, seed=seed + 1)
    elif mode == "mean" and data.draw(st.booleans(), label="own reference"):
        Br, Tr = data.draw(st.integers(1, 4), label="Br"), T if mean_over == "position" else data.draw(st.integers(1, 9))
        kwargs["reference"] = make_tokens(Br, Tr, seed=seed + 2)
        kwargs["reference_mask"] = right_padding(Br, Tr, seed + 2)
    max_rows = data.draw(st.one_of(st.none(), st.integers(1, masks.shape[0] * B)), label="max_rows")
    with torch.no_grad():
        want = run_with_head_masks_loop(model, tokens, masks, **kwargs)
        got = run_with_head_masks(model, tokens, masks, max_rows=max_rows, **kwargs)
    assert got.shape == (masks.shape[0], B, TINY.vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_one_layer_model_where_the_final_layer_is_also_the_first(new_model, mode):
    """The final layer is computed at the answer positions only, and a variant's first ablated
    layer from the clean z: with one layer both shortcuts meet in the same block."""
    mode, mean_over = mode
    cfg = dataclasses.replace(TINY, n_layer=1)
    model, tokens = new_model(cfg, seed=3), make_tokens(5, 6, seed=3)
    masks = torch.tensor([[[1.0, 0.0, 0.4, 1.0]], [[1.0] * 4], [[0.0] * 4]])
    kwargs = dict(ablation=mode, mean_over=mean_over, attention_mask=right_padding(5, 6, seed=3),
                  reference=make_tokens(5, 6, seed=4) if mode == "resample" else None)
    with torch.no_grad():
        torch.testing.assert_close(run_with_head_masks(model, tokens, masks, max_rows=10, **kwargs),
                                   run_with_head_masks_loop(model, tokens, masks, **kwargs), atol=ATOL, rtol=0)


@PROPERTY
@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**16), padded=st.booleans())
def test_the_all_ones_mask_is_the_identity(new_model, mode, seed, padded):
    model, tokens = new_model(seed=seed), make_tokens(seed=seed)
    mask = right_padding(BATCH, SEQ, seed) if padded else None
    reference = make_tokens(seed=seed + 1) if mode[0] == "resample" else None
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask, positions=last_positions(tokens, mask))
        got = model.run_with_head_masks(tokens, torch.ones(3, L, H), ablation=mode[0], mean_over=mode[1],
                                        reference=reference, attention_mask=mask)
    for variant in got:
        torch.testing.assert_close(variant, clean, atol=ATOL, rtol=0)


@PROPERTY
@given(heads=st.sets(st.tuples(st.integers(0, L - 1), st.integers(0, H - 1)), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_zero_ablation_equals_zeroing_the_heads_rows_of_W_O(new_model, heads, seed):
    """c_proj is nn.Linear [out, in]: head h's rows of W_O are c_proj.weight[:, h*d_head:(h+1)*d_head]."""
    model, tokens = new_model(seed=seed), make_tokens(seed=seed)
    pruned, mask = copy.deepcopy(model), torch.ones(1, L, H)
    for l, h in heads:
        mask[0, l, h] = 0
        with torch.no_grad():
            pruned.blocks[l].attn.c_proj.weight[:, h * d:(h + 1) * d] = 0
    with torch.no_grad():
        want = pruned(tokens, positions=torch.full((BATCH,), SEQ - 1))
        got = model.run_with_head_masks(tokens, mask)[0]
        clean = model(tokens, positions=torch.full((BATCH,), SEQ - 1))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - clean).abs().max() > 1e-4  # the ablation did something


def assert_masked_head_equals_replaced_z(model, tokens, l, h, value, **mask_kwargs):
    """Masking head (l, h) out gives the logits of writing ``value`` into its z through a hook."""
    def replace(z, hp):
        z = z.clone()
        z[:, :, h] = value
        return z

    masks = torch.ones(1, L, H)
    masks[0, l, h] = 0
    with torch.no_grad():
        want = model.run_with_hooks(tokens, positions=torch.full((BATCH,), SEQ - 1),
                                    fwd_hooks=[(f"blocks.{l}.attn.hook_z", replace)])
        got = model.run_with_head_masks(tokens, masks, **mask_kwargs)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mean_over", ["position", "all"])
def test_mean_ablation_uses_the_masked_reference_mean(model, tokens, mean_over):
    """Independent of replacement_values: the mean of hook_z over real reference tokens, taken here."""
    l, h = 1, 2
    reference, reference_mask = make_tokens(5, SEQ, seed=9), right_padding(5, SEQ, seed=9)
    _, cache = model.run_with_cache(reference, names=[f"blocks.{l}.attn.hook_z"], attention_mask=reference_mask)
    z, w = cache[f"blocks.{l}.attn.hook_z"][:, :, h], reference_mask[..., None].float()  # [Br, T, d_head], [Br, T, 1]
    dims = (0,) if mean_over == "position" else (0, 1)
    mean = (z * w).sum(dims) / w.sum(dims).clamp(min=1)

    assert_masked_head_equals_replaced_z(model, tokens, l, h, mean, ablation="mean", mean_over=mean_over,
                                         reference=reference, reference_mask=reference_mask)


def test_patching_takes_each_heads_z_from_its_own_reference_row(model, tokens):
    l, h = 2, 1
    reference = make_tokens(seed=11)
    _, cache = model.run_with_cache(reference, names=[f"blocks.{l}.attn.hook_z"])

    assert_masked_head_equals_replaced_z(model, tokens, l, h, cache[f"blocks.{l}.attn.hook_z"][:, :, h],
                                         ablation="resample", reference=reference)


def test_patch_reference_keeps_its_own_padding(model, tokens):
    """reference_mask pads the corrupted prompts; without one they share the clean prompts' padding."""
    l, h = 0, 3
    mask, reference = right_padding(BATCH, SEQ, seed=1), make_tokens(seed=11)
    masks = torch.ones(1, L, H)
    masks[0, l, h] = 0
    for reference_mask in (right_padding(BATCH, SEQ, seed=2), None):
        _, cache = model.run_with_cache(reference, names=[f"blocks.{l}.attn.hook_z"],
                                        attention_mask=mask if reference_mask is None else reference_mask)

        def patch(z, hp):
            z = z.clone()
            z[:, :, h] = cache[f"blocks.{l}.attn.hook_z"][:, :, h]
            return z

        with torch.no_grad():
            want = model.run_with_hooks(tokens, attention_mask=mask, positions=last_positions(tokens, mask),
                                        fwd_hooks=[(f"blocks.{l}.attn.hook_z", patch)])
            got = model.run_with_head_masks(tokens, masks, ablation="resample", reference=reference, attention_mask=mask,
                                            reference_mask=reference_mask)[0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@settings(max_examples=12, deadline=None)
@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**16), max_rows=st.sampled_from([None, 5]))
def test_gradients_wrt_fractional_masks_match_the_loop(new_model, mode, seed, max_rows):
    model, tokens = new_model(seed=seed), make_tokens(5, SEQ, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(4, L, H, generator=gen)
    target = torch.randint(0, TINY.vocab_size, (5,), generator=gen)
    reference = make_tokens(5, SEQ, seed=seed + 1) if mode[0] == "resample" else None

    def metric(logits):  # [V, B, vocab] -> [V, B]: log-probability of the target
        return logits.log_softmax(-1)[:, torch.arange(5), target]

    grads = []
    for run, extra in ((run_with_head_masks_loop, {}), (run_with_head_masks, {"max_rows": max_rows})):
        masks = start.clone().requires_grad_()
        out = run(model, tokens, masks, ablation=mode[0], mean_over=mode[1], reference=reference, metric=metric, **extra)
        out.sum().backward()
        grads.append(masks.grad)
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=1e-4)


def test_metric_is_applied_to_the_logits(model, tokens):
    masks = single_head_masks(L, H)
    logits = model.run_with_head_masks(tokens, masks)
    values = model.run_with_head_masks(tokens, masks, metric=lambda x: x.amax(-1), max_rows=2 * BATCH)
    torch.testing.assert_close(values, logits.amax(-1))


def test_single_head_masks_ablate_each_head_alone_layer_major():
    masks = single_head_masks(L, H)
    assert masks.shape == (1 + L * H, L, H)
    assert masks[0].eq(1).all()
    for i, (l, h) in enumerate(((l, h) for l in range(L) for h in range(H)), start=1):
        assert masks[i, l, h] == 0 and masks[i].sum() == L * H - 1
    assert single_head_masks(L, H, include_clean=False).shape == (L * H, L, H)


def test_last_positions_of_right_padded_rows():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_positions(torch.zeros(3, 5, dtype=torch.long), mask).tolist() == [2, 4, 0]
    assert last_positions(torch.zeros(3, 5, dtype=torch.long), None).tolist() == [4, 4, 4]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.int64])
def test_masks_of_any_dtype_are_accepted(model, tokens, dtype):
    masks = single_head_masks(L, H)
    torch.testing.assert_close(model.run_with_head_masks(tokens, masks.to(dtype)), model.run_with_head_masks(tokens, masks))


# Bad input --------------------------------------------------------------------------------------

def test_masks_of_the_wrong_shape(model, tokens):
    with pytest.raises(ValueError, match=r"masks has shape \(3, 4\); for a single variant use masks\[None\] \(shape \[1, 3, 4\]\)"):
        model.run_with_head_masks(tokens, torch.ones(L, H))
    with pytest.raises(ValueError, match=r"masks must be \[V, n_layer=3, n_head=4\], got \(2, 4, 3\)"):
        model.run_with_head_masks(tokens, torch.ones(2, H, L))
    with pytest.raises(ValueError, match=r"got \(2, 3, 4, 1\)"):
        run_with_head_masks_loop(model, tokens, torch.ones(2, L, H, 1))


def test_active_hooks_are_refused_with_the_way_out(model, tokens):
    """Parts of blocks run outside their hook points, so a hook would silently not fire."""
    with model.hooks([("blocks.1.hook_resid_post", lambda x, hook: x + 1)]):
        with pytest.raises(RuntimeError, match=r"hooks would not fire; active hooks: blocks\.1\.hook_resid_post\. "
                                                r"Remove them .*or use run_with_head_masks_loop"):
            model.run_with_head_masks(tokens, torch.ones(1, L, H))
    model.run_with_head_masks(tokens, torch.ones(1, L, H))  # fine once the block is left


def test_attention_mask_of_the_wrong_shape(model, tokens):
    for run in (run_with_head_masks, run_with_head_masks_loop):
        with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 7\), expected \(13, 7\)"):
            run(model, tokens, torch.ones(1, L, H), attention_mask=torch.ones(1, SEQ))


def test_unknown_ablation_mode(model, tokens):
    for run in (run_with_head_masks, run_with_head_masks_loop):
        with pytest.raises(ValueError, match=r"unknown ablation 'shuffle'; choose one of \('zero', 'mean', 'resample'\)"):
            run(model, tokens, torch.ones(1, L, H), ablation="shuffle")


def test_patch_and_mode_are_deprecated_old_names(model, tokens):
    """One name per concept: ablation="resample"; "patch" and mode= still work, with a DeprecationWarning
    and the same numbers (the model's method and the plain loop alike)."""
    corrupted = tokens.flip(0)
    masks = single_head_masks(L, H)[:5]
    a = run_with_head_masks(model, tokens, masks, ablation="resample", reference=corrupted)
    with pytest.warns(DeprecationWarning, match=r"ablation 'patch' is deprecated: pass ablation='resample'"):
        b = run_with_head_masks(model, tokens, masks, ablation="patch", reference=corrupted)
    assert torch.equal(a, b)
    with pytest.warns(DeprecationWarning, match=r"run_with_head_masks\(mode=...\) is deprecated"):
        c = model.run_with_head_masks(tokens, masks, mode="resample", reference=corrupted)
    assert torch.equal(a, c)
    with pytest.warns(DeprecationWarning) as caught:
        d = run_with_head_masks_loop(model, tokens, masks, mode="patch", reference=corrupted)
    assert {"mode=", "'patch'"} <= {w for r in caught for w in ("mode=", "'patch'") if w in str(r.message)}
    torch.testing.assert_close(d, a, atol=ATOL, rtol=0)
    assert not torch.allclose(a[1:], run_with_head_masks(model, tokens, masks, ablation="zero")[1:])
    with pytest.raises(TypeError, match=r"got ablation='mean' and mode='zero'; pass ablation= only"):
        run_with_head_masks(model, tokens, masks, ablation="mean", mode="zero")
    import minigpt2.masking as masking
    with pytest.warns(DeprecationWarning, match="use ABLATIONS"):
        assert masking.MODES == ("zero", "mean", "resample")


def test_patch_reference_of_the_wrong_shape(model, tokens):
    for mode in ("resample", "patch"):  # "patch": the deprecated name of resample, refused alike (with its warning)
        deprecated = pytest.warns(DeprecationWarning, match="ablation 'patch' is deprecated") if mode == "patch" \
            else contextlib.nullcontext()
        with deprecated, pytest.raises(ValueError, match=r"resample reference has shape \(13, 6\), but tokens have \(13, 7\)"):
            model.run_with_head_masks(tokens, torch.ones(1, L, H), ablation=mode, reference=tokens[:, :6])
        with deprecated, pytest.raises(ValueError, match="resample ablation needs reference=corrupted tokens"):
            model.run_with_head_masks(tokens, torch.ones(1, L, H), ablation=mode)


def test_mean_reference_of_the_wrong_length(model, tokens):
    with pytest.raises(ValueError, match="per-position mean needs reference sequences of length 7, got 5.*mean_over='all'"):
        model.run_with_head_masks(tokens, torch.ones(1, L, H), ablation="mean", reference=tokens[:, :5])
    model.run_with_head_masks(tokens, torch.ones(1, L, H), ablation="mean", reference=tokens[:, :5], mean_over="all")
    with pytest.raises(ValueError, match="mean_over must be 'position' or 'all', got 'batch'"):
        model.run_with_head_masks(tokens, torch.ones(1, L, H), ablation="mean", mean_over="batch")


def test_bad_batches_and_masks_are_named(model):
    from minigpt2.masking import run_with_head_masks, single_head_masks
    masks = single_head_masks(model.cfg.n_layer, model.cfg.n_head)[:3]
    tokens = make_tokens(2, 5)
    with pytest.raises(ValueError, match=r"batch \[B, T\].*tokens\[None\]"):
        run_with_head_masks(model, tokens[0], masks)
    with pytest.raises(ValueError, match="at least one sequence"):
        run_with_head_masks(model, tokens[:0], masks)
    with pytest.raises(ValueError, match="no variant.*single_head_masks"):
        run_with_head_masks(model, tokens, masks[:0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        run_with_head_masks(model, tokens, torch.full_like(masks, float("nan")))
    # lists of ids are accepted, as by the model itself
    torch.testing.assert_close(run_with_head_masks(model, tokens.tolist(), masks), run_with_head_masks(model, tokens, masks))


def test_left_padding_batched_equals_the_loop(model):
    """Left-padded rows shift positions (TransformerLens's rule) in the batched call as in the hooked forward."""
    from minigpt2.masking import run_with_head_masks, run_with_head_masks_loop, single_head_masks
    tokens = make_tokens(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    masks = single_head_masks(model.cfg.n_layer, model.cfg.n_head)
    with torch.no_grad():
        batched = run_with_head_masks(model, tokens, masks, attention_mask=mask)
        loop = run_with_head_masks_loop(model, tokens, masks, attention_mask=mask)
        alone = model(tokens[0, 2:][None])[0, -1]
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[0, 0], alone, atol=1e-5, rtol=0)
