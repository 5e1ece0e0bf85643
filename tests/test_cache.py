"""ActivationCache against TransformerLens's: the same shorthand, shapes, labels and values.

Both caches come from the bundled weights/base (12 x 12, d_model 144) on the same tokens: ours from
``model.run_with_cache()``, TransformerLens's from a default HookedTransformer with the same weights (no
weight processing). Every analysis a notebook runs on the cache (logit lens, direct logit attribution,
head and neuron decompositions) must give TransformerLens's numbers, to float32 rounding.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from minigpt2.cache import ActivationCache
from minigpt2.utils import Slice

pytest.importorskip("transformer_lens")

ATOL = RTOL = 1e-5
L = 12
D = json.loads((Path(__file__).resolve().parents[1] / "weights" / "base" / "config.json").read_text())["n_embd"]
NOT_IN_MINIGPT2: set[str] = set()  # see test_tl_oracle.py


# bundled_base, its TransformerLens twin and the tokens live on the test device (conftest's ``device``:
# MINIGPT2_TEST_DEVICE, default cpu).
@pytest.fixture(scope="module")
def tokens(device):
    return torch.randint(0, 50000, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)


@pytest.fixture(scope="module")
def caches(bundled_base, tl_twin, tokens):
    tl = tl_twin(bundled_base)
    with torch.no_grad():
        _, ours = bundled_base.run_with_cache(tokens)
        _, theirs = tl.run_with_cache(tokens)
    return ours, theirs


@pytest.fixture(scope="module")
def one_row(bundled_base, tl_twin, tokens):
    """Caches of a one-row batch with the batch axis removed (run_with_cache(remove_batch_dim=True))."""
    tl = tl_twin(bundled_base)
    with torch.no_grad():
        _, ours = bundled_base.run_with_cache(tokens[:1], remove_batch_dim=True)
        _, theirs = tl.run_with_cache(tokens[:1], remove_batch_dim=True)
    return ours, theirs


def same(a, b):
    """Equal outputs: tensors to float32 rounding at their scale, labels exactly, (tensor, labels) pairs both."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
        return
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.detach(), b.detach(), atol=ATOL * scale, rtol=RTOL)
        return
    assert a == b


def test_ours_is_an_activation_cache_with_every_key_of_theirs(caches):
    ours, theirs = caches
    assert isinstance(ours, ActivationCache) and ours.has_batch_dim
    for name in set(theirs.keys()) - NOT_IN_MINIGPT2:
        same(ours[name], theirs[name])  # ln1 / ln2 names are found under the model's own module names
    assert len(ours) == len(list(ours.keys())) == len(list(ours)) == len(theirs)
    assert list(ours.keys()) == list(theirs.keys())  # the same hooks, in the same order (a default model's)
    assert "blocks.0.attn.hook_pattern" in ours and "pattern" not in ours
    assert dict(ours.items()).keys() == ours.keys() and len(list(ours.values())) == len(ours)
    assert repr(ours).startswith("ActivationCache with keys ['hook_embed', 'hook_pos_embed'")
    assert sum(t.numel() * t.element_size() for t in ours.values()) == sum(
        t.numel() * t.element_size() for t in theirs.values())  # a default cache costs what TransformerLens's does


@pytest.mark.parametrize("key", [
    ("pattern", 0), ("resid_post", -1), ("z", 3, "attn"), ("scale", 2, "ln1"), ("normalized", 2, "ln2"),
    ("q", -2), ("attn_scores", 5), ("pre", 4), ("post", 4, "mlp"), ("mlp_out", 11), ("attn_out", 0),
    ("resid_pre", 0), ("resid_mid", 7), ("k", 6, "a"), "embed", "pos_embed", "scale", "normalized", "k6",
    "scale4ln1", "pre5", "blocks.1.hook_resid_pre", "hook_embed", ("resid_post", 11),
], ids=str)
def test_shorthand_keys(caches, key):
    ours, theirs = caches
    same(ours[key], theirs[key])


def test_an_uncached_name_says_how_to_cache_it(bundled_base, tokens):
    _, cache = bundled_base.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 0]


@pytest.mark.parametrize("layer,incl_mid,apply_ln,pos_slice,mlp_input", [
    (None, False, False, None, False), (None, True, False, None, False), (None, False, True, None, False),
    (-1, True, True, -1, False), (L, False, True, (2, 5), False), (5, False, False, None, False),
    (5, True, True, None, False), (5, False, True, -1, True), (0, False, True, None, False), (3, True, False, [1, 4], True),
])
def test_accumulated_resid(caches, layer, incl_mid, apply_ln, pos_slice, mlp_input):
    ours, theirs = caches
    kw = dict(layer=layer, incl_mid=incl_mid, apply_ln=apply_ln, pos_slice=pos_slice, mlp_input=mlp_input,
              return_labels=True)
    same(ours.accumulated_resid(**kw), theirs.accumulated_resid(**kw))


@pytest.mark.parametrize("layer,mlp_input,mode,apply_ln,pos_slice,incl_embeds", [
    (None, False, "all", False, None, True), (None, False, "attn", True, -1, True), (None, False, "mlp", False, None, False),
    (3, True, "all", True, None, True), (3, False, "attn", False, (1, 3), True), (0, False, "all", True, None, True),
    (6, True, "mlp", True, [0, 6], False),
])
def test_decompose_resid(caches, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds):
    ours, theirs = caches
    kw = dict(layer=layer, mlp_input=mlp_input, mode=mode, apply_ln=apply_ln, pos_slice=pos_slice,
              incl_embeds=incl_embeds, return_labels=True)
    same(ours.decompose_resid(**kw), theirs.decompose_resid(**kw))


@pytest.mark.parametrize("layer,incl_remainder,pos_slice,apply_ln",
                         list(itertools.product([-1, 4, 0], [False, True], [None, -1], [False, True])))
def test_stack_head_results(caches, layer, incl_remainder, pos_slice, apply_ln):
    ours, theirs = caches
    kw = dict(layer=layer, incl_remainder=incl_remainder, pos_slice=pos_slice, apply_ln=apply_ln, return_labels=True)
    same(ours.stack_head_results(**kw), theirs.stack_head_results(**kw))


def test_head_results_are_computed_from_z_when_not_cached(bundled_base, caches, tokens):
    """TransformerLens's default model caches no hook_result; compute_head_results makes it from z and W_O."""
    ours, theirs = caches
    _, only_z = bundled_base.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    only_z.compute_head_results()
    for l in range(L):
        same(only_z[("result", l)], ours[("result", l)])
    same(only_z.stack_head_results(incl_remainder=False), theirs.stack_head_results())


@pytest.mark.parametrize("name,layer,sublayer", [("pattern", -1, None), ("resid_post", 5, None),
                                                 ("scale", -1, "ln2"), ("z", 3, "attn")])
def test_stack_activation(caches, name, layer, sublayer):
    ours, theirs = caches
    same(ours.stack_activation(name, layer, sublayer), theirs.stack_activation(name, layer, sublayer))


@pytest.mark.parametrize("layer,pos_slice,neuron_slice,apply_ln,incl_remainder,project", [
    (2, None, None, False, False, None), (3, -1, [1, 5, 9], True, True, None), (1, None, (0, 10), False, True, "vector"),
    (4, -1, None, True, False, "matrix"), (2, None, None, True, True, "matrix"),
])
def test_stack_neuron_results(caches, device, layer, pos_slice, neuron_slice, apply_ln, incl_remainder, project):
    ours, theirs = caches
    p = {None: None, "vector": torch.linspace(-1, 1, D), "matrix": torch.randn(D, 3, generator=torch.Generator().manual_seed(1))}[project]
    p = None if p is None else p.to(device)
    kw = dict(layer=layer, pos_slice=pos_slice, neuron_slice=neuron_slice, apply_ln=apply_ln,
              incl_remainder=incl_remainder, project_output_onto=p, return_labels=True)
    same(ours.stack_neuron_results(**kw), theirs.stack_neuron_results(**kw))


@pytest.mark.parametrize("layer,mlp_input,expand_neurons,apply_ln,pos_slice,project", [
    (None, False, True, False, None, None), (None, False, False, True, -1, None), (3, True, True, True, None, None),
    (3, False, False, False, (1, 4), None), (0, False, True, True, None, None), (None, False, True, True, -1, "vector"),
    (5, True, False, False, None, "matrix"), (5, False, True, True, None, "matrix"),
])
def test_get_full_resid_decomposition(caches, device, layer, mlp_input, expand_neurons, apply_ln, pos_slice, project):
    ours, theirs = caches
    p = {None: None, "vector": torch.linspace(-1, 1, D), "matrix": torch.randn(D, 2, generator=torch.Generator().manual_seed(2))}[project]
    p = None if p is None else p.to(device)
    kw = dict(layer=layer, mlp_input=mlp_input, expand_neurons=expand_neurons, apply_ln=apply_ln, pos_slice=pos_slice,
              project_output_onto=p, return_labels=True)
    same(ours.get_full_resid_decomposition(**kw), theirs.get_full_resid_decomposition(**kw))


def test_the_full_decomposition_sums_to_the_residual_stream(caches):
    """What a user relies on: the components add up to the stream they decompose."""
    ours, _ = caches
    stack = ours.get_full_resid_decomposition(expand_neurons=False)
    torch.testing.assert_close(stack.sum(0), ours["resid_post", -1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layer,mlp_input,pos_slice,batch_slice", [(None, False, None, None), (4, True, -1, None),
                                                                   (4, False, None, 1), (0, False, (0, 3), [0])])
def test_apply_ln_to_stack(caches, layer, mlp_input, pos_slice, batch_slice):
    ours, theirs = caches
    stack = ours.decompose_resid(layer if layer is not None else None, mlp_input=mlp_input, pos_slice=pos_slice)
    kw = dict(layer=layer, mlp_input=mlp_input, pos_slice=pos_slice, batch_slice=batch_slice)
    same(ours.apply_ln_to_stack(stack, **kw), theirs.apply_ln_to_stack(stack, **kw))


def test_logit_attrs(bundled_base, caches, tokens):
    ours, theirs = caches
    stack = ours.decompose_resid(pos_slice=-1)  # [n, B, d_model]
    correct, wrong = tokens[:, -1], tokens[:, 0]
    same(ours.logit_attrs(stack, correct, pos_slice=-1), theirs.logit_attrs(stack, correct, pos_slice=-1))
    same(ours.logit_attrs(stack, correct, wrong, pos_slice=-1), theirs.logit_attrs(stack, correct, wrong, pos_slice=-1))
    same(ours.logit_attrs(stack, 464, pos_slice=-1), theirs.logit_attrs(stack, 464, pos_slice=-1))
    full = ours.decompose_resid()  # [n, B, T, d_model] against each position's own next token
    same(ours.logit_attrs(full, tokens), theirs.logit_attrs(full, tokens))
    # a token string is read with the model's tokenizer (the TransformerLens twin has none)
    token = bundled_base.to_tokens(" the", prepend_bos=False)[0, 0].item()
    same(ours.logit_attrs(stack, " the", pos_slice=-1), theirs.logit_attrs(stack, token, pos_slice=-1))
    with pytest.raises(ValueError, match="same shape"):
        ours.logit_attrs(stack, correct, 464, pos_slice=-1)
    # the final stream's attribution is its ln_final-normalized vector dotted with the token's unembedding
    final = ours.logit_attrs(ours.accumulated_resid(pos_slice=-1)[-1:], correct, pos_slice=-1)[0]
    want = (ours["normalized"][:, -1] * bundled_base.wte.weight[correct]).sum(-1)
    torch.testing.assert_close(final, want, atol=ATOL, rtol=RTOL)


def test_remove_batch_dim_gives_the_same_analyses(one_row):
    ours, theirs = one_row
    assert not ours.has_batch_dim and ours["resid_pre", 0].shape == (7, D)
    same(ours.accumulated_resid(apply_ln=True, return_labels=True), theirs.accumulated_resid(apply_ln=True, return_labels=True))
    same(ours.decompose_resid(apply_ln=True, layer=4), theirs.decompose_resid(apply_ln=True, layer=4))
    same(ours.stack_head_results(apply_ln=True, pos_slice=-1), theirs.stack_head_results(apply_ln=True, pos_slice=-1))
    same(ours.get_full_resid_decomposition(expand_neurons=False, apply_ln=True),
         theirs.get_full_resid_decomposition(expand_neurons=False, apply_ln=True))


def test_remove_batch_dim_and_batch_slices(bundled_base, caches, tokens):
    ours, _ = caches
    with pytest.raises(ValueError, match="batch size 2"):
        ActivationCache(dict(ours.cache_dict), bundled_base).remove_batch_dim()
    _, cache = bundled_base.run_with_cache(tokens[1:])
    assert cache.remove_batch_dim() is cache and not cache.has_batch_dim
    torch.testing.assert_close(cache["resid_post", 3], ours["resid_post", 3][1])
    row = ours.apply_slice_to_batch_dim(1)
    assert not row.has_batch_dim and row["pattern", 2].shape == ours["pattern", 2].shape[1:]
    rows = ours.apply_slice_to_batch_dim([1])
    assert rows.has_batch_dim and rows["pattern", 2].shape[0] == 1


def test_to_moves_the_activations(bundled_base, tokens):
    _, cache = bundled_base.run_with_cache(tokens, names_filter=["hook_embed"])
    assert cache.to("cpu") is cache and cache["embed"].device.type == "cpu"


def test_toggle_autodiff_sets_the_global_grad_mode(caches):
    ours, _ = caches
    try:
        ours.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        ours.toggle_autodiff(True)
    assert torch.is_grad_enabled()


def test_slices_are_transformer_lens_slices():
    x = torch.arange(24).view(2, 3, 4)
    assert Slice(-1).apply(x, dim=-2).shape == (2, 4)
    assert Slice.unwrap(-1).apply(x, dim=-2).shape == (2, 1, 4)
    assert Slice((1, 3)).apply(x, dim=-1).tolist() == x[..., 1:3].tolist()
    assert Slice([0, 2]).apply(x, dim=1).tolist() == x[:, [0, 2]].tolist()
    assert Slice().apply(x) is not None and Slice().mode == "identity"
    assert Slice((1, 3)).indices(4).tolist() == [1, 2]
    with pytest.raises(ValueError):
        Slice("last")
