"""TransformerLens's use_* switches: in every one of their 32 settings, minigpt2 lists, filters and caches
the hook points TransformerLens 3.9 does, with its shapes and values; the gradients of a point that fires
several times are summed (checked by finite differences).

The switches: use_attn_result (attn.hook_result), use_split_qkv_input (hook_q_input / _k_ / _v_),
use_attn_in (hook_attn_in), use_hook_mlp_in (hook_mlp_in), use_hook_tokens (hook_tokens). They decide
which points exist for a filter, a cache and hook_dict, never what is computed.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from conftest import TINY, make_model, make_tokens
from minigpt2 import GPT2Config, HookedTransformer, HookedTransformerConfig
from minigpt2.config import SWITCHES, ConfigError
from minigpt2.hooks import HookPoint

pytest.importorskip("transformer_lens")

SETTINGS = [dict(zip(SWITCHES, bits)) for bits in itertools.product((False, True), repeat=len(SWITCHES))]


def label(flags: dict) -> str:
    return "+".join(k.removeprefix("use_") for k, v in flags.items() if v) or "default"


@pytest.fixture(scope="module")
def tiny():
    return make_model(TINY, seed=1)


@pytest.mark.parametrize("flags", SETTINGS, ids=label)
def test_every_setting_lists_filters_and_caches_what_transformer_lens_does(tl_twin, flags):
    """hook_dict and mod_dict's hook points equal TransformerLens's as sets; the default cache and a filter that
    takes every name give TransformerLens's keys in its order, with its shapes and values (ln1 per head exactly
    when use_split_qkv_input or use_attn_in is on)."""
    model = make_model(TINY, seed=1)
    for k, v in flags.items():
        setattr(model.cfg, k, v)
    tl = tl_twin(model, **flags)
    assert set(model.hook_dict) == set(tl.hook_dict)
    assert {n for n, m in model.mod_dict.items() if isinstance(m, HookPoint)} == set(tl.hook_dict)
    tokens = make_tokens(3, 6, seed=2)
    with torch.no_grad():
        tl_logits, tl_cache = tl.run_with_cache(tokens)
        for names_filter in (None, lambda n: True):
            logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
            assert list(cache.keys()) == list(tl_cache.keys())
            for name in tl_cache.keys():
                torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=1e-5)
    per_head = flags["use_split_qkv_input"] or flags["use_attn_in"]
    assert cache["blocks.0.ln1.hook_scale"].shape == ((3, 6, TINY.n_head, 1) if per_head else (3, 6, 1))


def test_the_switches_never_change_what_is_computed(tiny):
    """With every switch on and nothing hooked, attention's fused path runs and the logits are the plain ones."""
    tokens = make_tokens(3, 6, seed=3)
    with torch.no_grad():
        plain = tiny(tokens)
        for name in SWITCHES:
            setattr(tiny.cfg, name, True)
        try:
            switched = tiny(tokens)
            assert not any(hp.active for hp in tiny.hook_dict.values())
        finally:
            for name in SWITCHES:
                setattr(tiny.cfg, name, False)
    torch.testing.assert_close(switched, plain, atol=0, rtol=0)


def test_set_use_methods_and_the_config(tiny):
    """model.set_use_* (TransformerLens's methods) set cfg fields; the fields take only booleans; the seven numbers
    are fixed; configs compare on the seven numbers alone; HookedTransformerConfig takes TransformerLens's names."""
    for method, field in (("set_use_attn_result", "use_attn_result"), ("set_use_split_qkv_input", "use_split_qkv_input"),
                          ("set_use_hook_mlp_in", "use_hook_mlp_in"), ("set_use_attn_in", "use_attn_in")):
        getattr(tiny, method)(True)
        assert getattr(tiny.cfg, field) is True
        getattr(tiny, method)(False)
        assert getattr(tiny.cfg, field) is False
    with pytest.raises(ConfigError, match="use_attn_result must be True or False"):
        tiny.set_use_attn_result(1)
    with pytest.raises(ConfigError, match="n_layer is fixed"):
        tiny.cfg.n_layer = 5
    assert dataclasses.replace(TINY, use_attn_result=True) == TINY
    assert hash(dataclasses.replace(TINY, use_attn_result=True)) == hash(TINY)
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_ctx=23, d_vocab=99, d_mlp=37, act_fn="gelu_new",
                                  normalization_type="LN", use_attn_result=True, default_prepend_bos=False,
                                  dtype=torch.float64, init_weights=False, seed=0)
    assert isinstance(cfg, GPT2Config) and cfg == TINY and cfg.use_attn_result and not cfg.default_prepend_bos
    model = HookedTransformer(cfg)
    assert model.dtype == model.cfg.dtype == torch.float64 and model.cfg.use_attn_result
    assert model.cfg.d_vocab_out == model.cfg.d_vocab == 99 and model.cfg.n_key_value_heads is None
    for bad, match in ((dict(act_fn="relu"), "act_fn='relu' is not GPT-2"),
                       (dict(normalization_type="RMS"), "normalization_type='RMS' is not GPT-2"),
                       (dict(attn_only=True), "attn_only=True is not GPT-2"),
                       (dict(n_heads=3), "n_heads \\* d_head"),
                       (dict(rotary_base=5), "no field 'rotary_base'")):
        with pytest.raises(ConfigError, match=match):
            HookedTransformerConfig(**dict(n_layers=1, d_model=32, d_head=8, n_ctx=8, d_vocab=99) | bad)


def test_a_point_named_exactly_fires_whatever_the_switches(tiny):
    """A deliberate difference: TransformerLens's hooks() never fires a point its switches leave out; here a hook
    on it by name fires (what it computes is what the switch would show)."""
    tokens = make_tokens(2, 5, seed=4)
    _, cache = tiny.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_result", "hook_tokens",
                                                         "blocks.0.hook_mlp_in"])
    assert set(cache.keys()) == {"blocks.1.attn.hook_result", "hook_tokens", "blocks.0.hook_mlp_in"}
    tiny.set_use_attn_result(True)
    try:
        _, switched = tiny.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.attn.hook_result")
    finally:
        tiny.set_use_attn_result(False)
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], switched["blocks.1.attn.hook_result"])
    _, none = tiny.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.attn.hook_result")
    assert len(none) == 0


@pytest.mark.parametrize("split", [False, True], ids=["shared-ln1", "split-qkv-input"])
@pytest.mark.parametrize("name", ["blocks.1.ln1.hook_scale", "blocks.1.ln1.hook_normalized"])
def test_a_cached_gradient_is_what_finite_differences_measure(name, split):
    """The cached "<name>_grad" of ln1's hooks (ln1 runs three times with split inputs) is d loss / d a change made
    at every call: central differences of a hook that adds eps * direction agree with <grad, direction>. (In float64;
    TransformerLens caches one of the three calls' share, tests/test_tl_oracle.py.)"""
    model = make_model(TINY, seed=5).double()
    model.cfg.use_split_qkv_input = split
    tokens = make_tokens(2, 6, seed=6)

    def metric(logits):  # float64 throughout (the model's loss_fn works in float32)
        return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None].roll(1, 0)).mean()

    cache, fwd, bwd = model.get_caching_hooks(lambda n: n == name, incl_bwd=True)
    with model.hooks(fwd, bwd):
        metric(model(tokens)[:, :-1]).backward()
    grad = cache[name + "_grad"]
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eps = 1e-6

    def shifted(sign: float) -> float:
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hp: x + sign * eps * direction)])
        return metric(logits[:, :-1]).item()

    finite = (shifted(1) - shifted(-1)) / (2 * eps)
    assert finite == pytest.approx((grad * direction).sum().item(), rel=1e-6, abs=1e-9)
    assert (grad.shape[2] == TINY.n_head) == split  # [B, T, H, ...] with split inputs, else [B, T, ...]


TL_FIELDS = ["n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "eps", "act_fn",
             "normalization_type", "positional_embedding_type", "attention_dir", "original_architecture", "attn_only",
             "parallel_attn_mlp", "final_rms", "gated_mlp", "n_key_value_heads", "use_attn_scale", "attn_scale",
             "n_params", "use_local_attn", "use_normalization_before_and_after", "scale_attn_by_inverse_layer_idx",
             "post_embedding_ln", "rotary_dim", "dtype", "device", *SWITCHES]


def test_the_config_fields_libraries_read_are_transformer_lens_values(tiny, tl_twin):
    tl = tl_twin(tiny)
    for field in TL_FIELDS:
        assert getattr(tiny.cfg, field) == getattr(tl.cfg, field), field
    tl.cfg.default_prepend_bos = True  # conftest's twins turn it off; GPT-2's is on, as minigpt2's
    assert tiny.cfg.default_prepend_bos is tl.cfg.default_prepend_bos
    assert tiny.double().cfg.dtype == torch.float64 and tiny.float().cfg.dtype == torch.float32  # follows the model


def test_add_caching_hooks_caches_what_transformer_lens_does(tiny, tl_twin):
    """The hooks stay until reset_hooks() (TransformerLens's add_caching_hooks / cache_some): the same keys in the
    same order and values, gradients included, for a default model and with use_attn_result on."""
    tokens = make_tokens(2, 5, seed=8)
    for flags in ({}, {"use_attn_result": True}):
        model = make_model(TINY, seed=1)
        for k, v in flags.items():
            setattr(model.cfg, k, v)
        tl = tl_twin(model, **flags)
        caches = []
        for m in (tl, model):
            cache = m.add_caching_hooks(names_filter=lambda n: "attn" in n, incl_bwd=True)
            m(tokens, return_type="loss").backward()
            m.reset_hooks()
            m.zero_grad(set_to_none=True)
            caches.append(cache)
        theirs, ours = caches
        assert list(ours) == list(theirs) and len(ours) > 0
        assert not model.list_hooks()
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)
        some: dict = {}
        model.cache_some(some, ["blocks.0.attn.hook_z"])  # TransformerLens's deprecated helper, still there
        model(tokens)
        model.reset_hooks()
        assert list(some) == ["blocks.0.attn.hook_z"]
