"""Hook points: every advertised hook fires once with its documented shape; hooks are temporary."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import BATCH, SEQ, TINY, make_tokens
from minigpt2 import GPT2, KVCache
from minigpt2.config import SWITCHES
from minigpt2.hooks import PER_HEAD_INPUT_HOOKS, switch_of

ATOL = 1e-5

# The layer norms' module names, read off the model (ln_1 / ln_2 now, TransformerLens's ln1 / ln2 after
# the rename), so that the rename needs no edit here.
LN1, LN2 = ("ln1", "ln2") if "blocks.0.ln1.hook_scale" in GPT2(TINY).hook_dict else ("ln_1", "ln_2")

# The TransformerLens names minigpt2 advertises, with their documented shapes.
# (B, Tq, Tk: batch, this call's positions, all key positions.)
PER_LAYER = {
    "hook_resid_pre": "B Tq D",
    "hook_attn_in": "B Tq H D",
    "hook_q_input": "B Tq H D",
    "hook_k_input": "B Tq H D",
    "hook_v_input": "B Tq H D",
    f"{LN1}.hook_scale": "B Tq 1",
    f"{LN1}.hook_normalized": "B Tq D",
    "attn.hook_q": "B Tq H d",
    "attn.hook_k": "B Tq H d",
    "attn.hook_v": "B Tq H d",
    "attn.hook_attn_scores": "B H Tq Tk",
    "attn.hook_pattern": "B H Tq Tk",
    "attn.hook_z": "B Tq H d",
    "attn.hook_result": "B Tq H D",
    "hook_attn_out": "B Tq D",
    "hook_resid_mid": "B Tq D",
    "hook_mlp_in": "B Tq D",
    f"{LN2}.hook_scale": "B Tq 1",
    f"{LN2}.hook_normalized": "B Tq D",
    "mlp.hook_pre": "B Tq M",
    "mlp.hook_post": "B Tq M",
    "hook_mlp_out": "B Tq D",
    "hook_resid_post": "B Tq D",
}
# With a per-head input hooked, ln1 runs once per q / k / v input on [B, T, H, d_model], as in
# TransformerLens with use_split_qkv_input: its hooks fire three times, with a head axis.
PER_HEAD_LN1 = {f"{LN1}.hook_scale": "B Tq H 1", f"{LN1}.hook_normalized": "B Tq H D"}
DOCUMENTED = {"hook_tokens": "B Tq", "hook_embed": "B Tq D", "hook_pos_embed": "B Tq D",
              "ln_final.hook_scale": "B Tq 1", "ln_final.hook_normalized": "B Tq D",
              "unembed.hook_in": "B Tq D", "unembed.hook_out": "B Tq V"} | {
    f"blocks.{l}.{name}": shape for l in range(TINY.n_layer) for name, shape in PER_LAYER.items()
}
PER_HEAD = {n for n in DOCUMENTED if n.endswith(PER_HEAD_INPUT_HOOKS)}
# What a default model (TransformerLens's switches off) caches and filters see: no hook_tokens, hook_result,
# hook_mlp_in or per-head inputs.
DEFAULT_LIVE = {n for n in DOCUMENTED if switch_of(n) is None}
NOT_PER_HEAD_SWITCHES = ("use_attn_result", "use_hook_mlp_in", "use_hook_tokens")


def switch_on(model, *names: str):
    """Turn TransformerLens's switches on (all of them by default): their hook points become live."""
    for name in names or SWITCHES:
        setattr(model.cfg, name, True)
    return model

# The shared fixtures (model, tokens, new_model, hf_model) live on the test device (conftest's
# MINIGPT2_TEST_DEVICE, default cpu).
pytestmark = pytest.mark.on_device


def documented_shape(name: str, B: int, Tq: int, Tk: int, per_head: bool = False) -> tuple[int, ...]:
    sizes = {"B": B, "Tq": Tq, "Tk": Tk, "H": TINY.n_head, "d": TINY.d_head, "D": TINY.d_model, "M": TINY.d_mlp, "V": TINY.vocab_size, "1": 1}
    shape = DOCUMENTED[name]
    if per_head and name.startswith("blocks."):
        shape = PER_HEAD_LN1.get(name.split(".", 2)[2], shape)
    return tuple(sizes[s] for s in shape.split())


def expected_calls(names, per_head: bool) -> Counter:
    """How often each hook fires in one forward: ln1's three times when the per-head inputs are on."""
    ln1 = tuple(f"{LN1}.{h}" for h in ("hook_scale", "hook_normalized"))
    return Counter({n: 3 if per_head and n.endswith(ln1) and n.startswith("blocks.") else 1 for n in names})


def record(calls):
    def hook(x, hp):
        calls.append((hp.name, tuple(x.shape)))
    return hook


def test_the_advertised_hooks_are_exactly_the_hook_points(model):
    """hook_dict lists what TransformerLens's does: every point, hook_tokens only with use_hook_tokens."""
    assert set(model.hook_dict) == set(DOCUMENTED) - {"hook_tokens"}
    switch_on(model)
    assert set(model.hook_dict) == set(DOCUMENTED)
    assert all(hp.name == name for name, hp in model.hook_dict.items())


def test_every_hook_fires_once_with_its_documented_shape(model, tokens):
    """Everything but the per-head inputs hooked: each hook fires once, ln1 without a head axis."""
    switch_on(model, *NOT_PER_HEAD_SWITCHES)
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n not in PER_HEAD, record(calls))])
    assert Counter(name for name, _ in calls) == expected_calls(set(DOCUMENTED) - PER_HEAD, per_head=False)
    for name, shape in calls:
        assert shape == documented_shape(name, BATCH, SEQ, SEQ), name


def test_with_the_per_head_inputs_hooked_ln1_runs_per_head_and_per_input(model, tokens):
    switch_on(model)
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, record(calls))])
    assert Counter(name for name, _ in calls) == expected_calls(DOCUMENTED, per_head=True)
    for name, shape in calls:
        assert shape == documented_shape(name, BATCH, SEQ, SEQ, per_head=True), name


def test_one_per_head_input_hooked_switches_only_its_own_layer(model, tokens):
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_k_input", lambda x, hp: None),
                                            (lambda n: f".{LN1}." in n, record(calls))])
    per_layer = Counter(name.split(".")[1] for name, _ in calls)
    assert per_layer == {"0": 2, "1": 6, "2": 2}
    assert {shape for name, shape in calls if name.startswith("blocks.1.")} == {
        (BATCH, SEQ, TINY.n_head, 1), (BATCH, SEQ, TINY.n_head, TINY.d_model)}


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-input", "per-head-inputs"])
def test_hook_shapes_when_continuing_from_a_kv_cache(model, tokens, per_head):
    switch_on(model, *(SWITCHES if per_head else NOT_PER_HEAD_SWITCHES))
    cache = KVCache(TINY.n_layer)
    model(tokens, cache=cache)
    calls = []
    names = set(DOCUMENTED) if per_head else set(DOCUMENTED) - PER_HEAD
    model.run_with_hooks(tokens[:, :3], cache=cache, fwd_hooks=[(lambda n: n in names, record(calls))])
    assert Counter(name for name, _ in calls) == expected_calls(names, per_head)
    for name, shape in calls:
        assert shape == documented_shape(name, BATCH, 3, SEQ + 3, per_head), name


def test_identity_hooks_change_nothing(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
        returning_x = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hp: x)])
        returning_none = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hp: None)])
    torch.testing.assert_close(returning_x, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(returning_none, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_a_zeroing_hook_moves_the_logits(model, tokens, name):
    """Every hook point is on the path to the logits. (A layer norm's scale is a divisor: it is set to 1.)"""
    edit = torch.ones_like if name.endswith("hook_scale") else torch.zeros_like
    with torch.no_grad():
        plain = model(tokens)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hp: edit(x))])
    assert zeroed.isfinite().all()
    assert (zeroed - plain).abs().max() > 1e-3


def test_hooks_on_one_point_apply_in_order(model, tokens):
    _, cache = model.run_with_cache(tokens, names=["hook_embed"])
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[
        ("hook_embed", lambda x, hp: x + 1),
        ("hook_embed", lambda x, hp: x * 2),
        ("hook_embed", lambda x, hp: seen.append(x)),
    ])
    torch.testing.assert_close(seen[0], (cache["hook_embed"] + 1) * 2)


def no_hooks_left(model) -> bool:
    return not any(hp.fwd_hooks or hp.bwd_hooks or hp.active for hp in model.hook_dict.values())


def test_hooks_are_removed_after_run_with_hooks(model, tokens):
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hp: None)])
    assert no_hooks_left(model)


def test_hooks_are_removed_when_the_forward_raises(model, tokens):
    def boom(x, hp):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hp: None), ("blocks.2.hook_resid_mid", boom)])
    assert no_hooks_left(model)
    bad = tokens.clone()
    bad[0, 0] = TINY.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.run_with_cache(bad)
    assert no_hooks_left(model)


def test_hooks_are_removed_when_a_later_name_is_unknown(model, tokens):
    with pytest.raises(KeyError):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hp: None), ("blocks.0.hook_nope", lambda x, hp: None)])
    assert no_hooks_left(model)


def test_unknown_hook_name_suggests_the_nearest(model, tokens):
    with pytest.raises(KeyError, match=r"no hook point named 'blocks.1.attn.hook_patern'; did you mean .*blocks\.1\.attn\.hook_pattern"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_patern", lambda x, hp: None)])
    with pytest.raises(KeyError, match="'blocks.0.attn.hook_attn_score'.*did you mean .*blocks.0.attn.hook_attn_scores"):
        model.run_with_cache(tokens, names=["blocks.0.attn.hook_attn_score"])
    with pytest.raises(KeyError, match="no hook point named 'zzz'; see model.hook_dict"):
        model.hook_point("zzz")


def test_a_hook_returning_the_wrong_shape_is_named(model, tokens):
    with pytest.raises(ValueError, match=r"hook on blocks.1.mlp.hook_post returned shape \(13, 7\), expected \(13, 7, 37\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", lambda x, hp: x.sum(-1))])


def test_head_results_sum_to_the_attention_output(model, tokens):
    names = lambda n: n.endswith(("hook_result", "hook_attn_out"))  # noqa: E731
    model.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names=names)
    for l, block in enumerate(model.blocks):
        result = cache[f"blocks.{l}.attn.hook_result"]  # [B, T, H, d_model]
        torch.testing.assert_close(result.sum(dim=2) + block.attn.c_proj.bias, cache[f"blocks.{l}.hook_attn_out"],
                                   atol=ATOL, rtol=0)


def test_head_result_is_z_times_its_own_rows_of_W_O(model, tokens):
    """c_proj is nn.Linear [out, in]: head h owns input columns h*d_head:(h+1)*d_head."""
    _, cache = model.run_with_cache(tokens, names=["blocks.1.attn.hook_z", "blocks.1.attn.hook_result"])
    d, h = TINY.d_head, 2
    W = model.blocks[1].attn.c_proj.weight[:, h * d:(h + 1) * d]  # [d_model, d_head]
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"][:, :, h], cache["blocks.1.attn.hook_z"][:, :, h] @ W.T,
                               atol=ATOL, rtol=0)


def test_hook_result_is_computed_only_when_hooked(model, tokens, monkeypatch):
    """hook_result costs a [B, T, H, d_model] einsum: only a hook on it may trigger it."""
    def W_O(self):
        raise AssertionError("per-head results computed with nothing hooked on hook_result")

    monkeypatch.setattr(type(model.blocks[0].attn), "W_O", property(W_O))
    model.run_with_cache(tokens, names=lambda n: not n.endswith("hook_result"))
    with pytest.raises(AssertionError, match="per-head results"):
        model.run_with_cache(tokens, names=["blocks.0.attn.hook_result"])


def test_positions_give_the_full_logits_gathered(model, tokens, device):
    positions = torch.randint(-SEQ, SEQ, (BATCH,), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, positions=positions)
    assert picked.shape == (BATCH, TINY.vocab_size)
    torch.testing.assert_close(picked, full[torch.arange(BATCH, device=device), positions % SEQ], atol=ATOL, rtol=0)


def test_run_with_cache_detaches_unless_asked(model, tokens):
    logits, cache = model.run_with_cache(tokens, names=lambda n: n.startswith("blocks.2"))
    assert set(cache) == {n for n in DEFAULT_LIVE if n.startswith("blocks.2")}
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.2"))
    assert set(cache) == {n for n in DEFAULT_LIVE if n.startswith("blocks.2")}
    assert not cache["blocks.2.hook_resid_post"].requires_grad
    logits, cache = model.run_with_cache(tokens, names=["blocks.2.hook_resid_post"], detach=False)
    cache["blocks.2.hook_resid_post"].sum().backward()  # the graph is kept
    assert model.blocks[2].mlp.c_fc.weight.grad is not None


def test_reset_hooks_clears_hooks_left_by_hand(model, tokens):
    model.hook_point("hook_embed").add_hook(lambda x, hp: torch.zeros_like(x))
    model.add_hook("blocks.0.hook_resid_mid", lambda g, hp: None, dir="bwd")
    model.reset_hooks()
    assert no_hooks_left(model)



# ---------------------------------------------------------------------- TransformerLens's hook API
def test_add_hook_prepend_and_permanent_hooks(model, tokens):
    order = []
    model.add_hook("hook_embed", lambda x, hp: order.append("second"))
    model.add_hook("hook_embed", lambda x, hp: order.append("first"), prepend=True)
    model.add_hook("hook_embed", lambda x, hp: order.append("permanent"), is_permanent=True)
    model(tokens)
    assert order == ["first", "second", "permanent"]
    model.reset_hooks()
    assert [h.is_permanent for h in model.hook_point("hook_embed").fwd_hooks] == [True]
    model.reset_hooks(including_permanent=True)
    assert no_hooks_left(model)


def test_hook_point_remove_hooks_by_direction(model):
    hp = model.hook_point("blocks.1.hook_resid_mid")
    hp.add_hook(lambda x, h: None)
    hp.add_hook(lambda g, h: None, dir="bwd")
    hp.add_hook(lambda g, h: None, dir="bwd", is_permanent=True)
    hp.remove_hooks()  # dir="fwd" by default, as TransformerLens
    assert not hp.fwd_hooks and len(hp.bwd_hooks) == 2
    hp.remove_hooks("both")
    assert len(hp.bwd_hooks) == 1 and hp.active  # the permanent one stays
    hp.remove_hooks("both", including_permanent=True)
    assert not hp.active
    with pytest.raises(ValueError, match="dir"):
        hp.add_hook(lambda x, h: None, dir="sideways")


def test_hook_names_and_layers(model):
    assert model.hook_point("blocks.2.attn.hook_pattern").layer() == 2
    assert model.hook_point(f"blocks.0.{LN1}.hook_scale").layer() == 0
    with pytest.raises(ValueError, match="not inside a layer"):
        model.hook_point("hook_embed").layer()
    seen = []
    model.run_with_hooks(make_tokens(2, 3), fwd_hooks=[(lambda n: n.endswith("hook_z"),
                                                          lambda z, hook: seen.append((hook.name, hook.layer())))])
    assert seen == [(f"blocks.{l}.attn.hook_z", l) for l in range(TINY.n_layer)]


def test_hooks_context_manager_keeps_hooks_with_reset_hooks_end_false(model, tokens):
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hp: None)]):
        assert model.hook_point("hook_embed").active
        with model.hooks(fwd_hooks=[("hook_pos_embed", lambda x, hp: None)]):
            assert model.hook_point("hook_pos_embed").active
        assert not model.hook_point("hook_pos_embed").active  # the inner block removes only its own
        assert model.hook_point("hook_embed").active
    assert no_hooks_left(model)
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hp: None)], reset_hooks_end=False):
        pass
    assert model.hook_point("hook_embed").active
    model.reset_hooks()
    assert no_hooks_left(model)


def test_a_backward_hook_alone_makes_its_activation(model, tokens):
    hp = model.hook_point("blocks.0.attn.hook_pattern")
    hp.add_hook(lambda g, hook: None, dir="bwd")
    assert hp.active  # the model computes the pattern, so that its gradient exists
    model.reset_hooks()
    assert not hp.active


def test_backward_hooks_see_the_gradient_of_their_activation(model, tokens):
    """A backward hook gets d(loss)/d(activation): the same as autograd's through a forward hook."""
    name = "blocks.1.attn.hook_pattern"
    kept, grads = {}, []

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, keep)],
                                bwd_hooks=[(name, lambda g, hook: grads.append(g.clone()))])
    assert no_hooks_left(model)
    loss.backward()  # hooks attached to this forward's graph fire although they are off the model
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], kept["x"].grad)


def test_a_backward_hook_can_replace_the_gradient(model, tokens):
    def loss_and_grad(bwd_hooks):
        model.zero_grad()
        loss = model.run_with_hooks(tokens, return_type="loss", bwd_hooks=bwd_hooks, reset_hooks_end=False)
        loss.backward()
        model.reset_hooks()
        return model.wte.weight.grad.clone(), model.blocks[2].mlp.c_fc.weight.grad.clone()

    wte, fc = loss_and_grad([])
    wte0, fc0 = loss_and_grad([("blocks.1.hook_resid_post", lambda g, hook: torch.zeros_like(g))])
    torch.testing.assert_close(fc0, fc)  # downstream of the hook: untouched
    assert not torch.allclose(wte0, wte)  # upstream: only what bypasses the residual stream at layer 1 is left
    wte2, _ = loss_and_grad([("blocks.1.hook_resid_post", lambda g, hook: 2 * g)])
    assert not torch.allclose(wte2, wte)


def test_run_with_cache_names_filter_forms(model, tokens):
    one = "blocks.1.attn.hook_z"
    assert list(model.run_with_cache(tokens, names_filter=one)[1].keys()) == [one]
    assert set(model.run_with_cache(tokens, names_filter=[one, "hook_embed"])[1]) == {one, "hook_embed"}
    assert set(model.run_with_cache(tokens, names=[one])[1]) == {one}
    assert set(model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))[1]) == {
        f"blocks.{l}.attn.hook_z" for l in range(TINY.n_layer)}
    with pytest.raises(TypeError, match="not both"):
        model.run_with_cache(tokens, names=[one], names_filter=[one])
    with pytest.raises(KeyError, match="did you mean"):
        model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_zz")


def test_run_with_cache_by_default_caches_the_live_hooks(model, tokens):
    """A default TransformerLens model's cache: no hook_tokens, hook_result, hook_mlp_in or per-head inputs
    (a filter sees the same), ln1 shared; with every switch on, all of them, ln1 per head."""
    for names_filter in (None, lambda n: True):
        _, cache = model.run_with_cache(tokens, names_filter=names_filter)
        assert set(cache) == DEFAULT_LIVE
        assert cache[f"blocks.0.{LN1}.hook_scale"].shape == (BATCH, SEQ, 1)
    switch_on(model)
    for names_filter in (None, lambda n: True):
        _, cache = model.run_with_cache(tokens, names_filter=names_filter)
        assert set(cache) == set(DOCUMENTED)
        assert cache[f"blocks.0.{LN1}.hook_scale"].shape == (BATCH, SEQ, TINY.n_head, 1)


def test_run_with_cache_options(model, tokens):
    from minigpt2.cache import ActivationCache

    logits, cache = model.run_with_cache(tokens[:1], names_filter=["blocks.0.attn.hook_z", "hook_embed"],
                                         remove_batch_dim=True)
    assert isinstance(cache, ActivationCache) and not cache.has_batch_dim
    assert cache["blocks.0.attn.hook_z"].shape == (SEQ, TINY.n_head, TINY.d_head)
    _, plain = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z", "hook_embed"],
                                    return_cache_object=False)
    assert type(plain) is dict
    _, sliced = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z", "hook_embed"], pos_slice=-1)
    torch.testing.assert_close(sliced["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"][:, -1:])
    torch.testing.assert_close(sliced["hook_embed"], plain["hook_embed"][:, -1:])
    resid, cache = model.run_with_cache(tokens, stop_at_layer=1)  # the residual stream entering block 1
    torch.testing.assert_close(resid, cache["blocks.0.hook_resid_post"])
    assert not any(n.startswith(("blocks.1.", "blocks.2.", "ln_final")) for n in cache)
    assert no_hooks_left(model)


def test_run_with_cache_incl_bwd_caches_gradients(model, tokens):
    names = ["blocks.2.hook_resid_post", "blocks.0.attn.hook_pattern"]
    loss, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, return_type="loss")
    assert set(cache) == set(names) | {n + "_grad" for n in names}
    x = cache["blocks.2.hook_resid_post"].clone().requires_grad_(True)
    manual = model.loss_fn(model.to_logits(x), tokens)  # the rest of the forward, from resid_post of the last layer
    manual.backward()
    torch.testing.assert_close(cache["blocks.2.hook_resid_post_grad"], x.grad)
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(tokens, names_filter=names, incl_bwd=True)
    assert no_hooks_left(model)


# ---------------------------------------------------------------------- hooks given or behaving wrongly: named errors
def _float64(x, hp):
    return x.double()


BAD_HOOKS = [  # (run_with_hooks keywords, the message); every case raises HookError, naming the culprit and the fix
    (dict(fwd_hooks={"blocks.0.attn.hook_z": lambda x, hp: None}), r"fwd_hooks is a dict.*list\(fwd_hooks.items\(\)\)"),
    (dict(bwd_hooks={"blocks.0.attn.hook_z": lambda g, hp: None}), r"bwd_hooks is a dict"),
    (dict(fwd_hooks=[("blocks.0.attn.hook_z",)]), r"fwd_hooks\[0\] is tuple of length 1.*without its function"),
    (dict(fwd_hooks=["blocks.0.attn.hook_z"]), r"fwd_hooks\[0\] is 'blocks.0.attn.hook_z'.*without its function"),
    (dict(fwd_hooks=("blocks.0.attn.hook_z", lambda x, hp: None)), r"fwd_hooks is one \(name, fn\) pair.*\[fwd_hooks\]"),
    (dict(fwd_hooks=[("blocks.0.attn.hook_z", None)]), r"fwd_hooks\[0\]: the hook for blocks.0.attn.hook_z is a "
                                                      r"NoneType, not a function"),
    (dict(fwd_hooks=[(3, lambda x, hp: None)]), r"fwd_hooks\[0\]: the target 3 is neither a hook name nor a filter"),
    (dict(fwd_hooks=[("blocks.0.attn.hook_z", _float64)]), r"hook on blocks.0.attn.hook_z returned dtype float64, "
                                                           r"the activation is float32: return out.to"),
    (dict(fwd_hooks=[("blocks.1.mlp.hook_post", lambda x, hp: x[..., :3])]),
     r"hook on blocks.1.mlp.hook_post returned shape \(13, 7, 3\), expected \(13, 7, 37\)"),
    (dict(fwd_hooks=[("hook_embed", lambda x, hp: x.tolist())]), r"hook on hook_embed returned list"),
    (dict(fwd_hooks=[("hook_tokens", lambda x, hp: x.float())]), r"hook on hook_tokens returned dtype float32, "
                                                                 r"the activation is int64"),
]


@pytest.mark.parametrize("kwargs,message", BAD_HOOKS, ids=[m[:30] for _, m in BAD_HOOKS])
def test_a_bad_hook_is_a_named_error(model, tokens, kwargs, message):
    from minigpt2 import HookError

    with pytest.raises(HookError, match=message):
        model.run_with_hooks(tokens, **kwargs)
    assert no_hooks_left(model)
    with pytest.raises(HookError, match=message):  # the same through the context manager and run_with_cache
        with model.hooks(**kwargs):
            model.run_with_cache(tokens, names_filter="hook_embed")
    assert no_hooks_left(model)


def test_a_backward_hook_returning_a_bad_gradient_is_named(model, tokens):
    from minigpt2 import HookError

    loss = model.run_with_hooks(tokens, return_type="loss", reset_hooks_end=False,
                                bwd_hooks=[("blocks.1.hook_resid_mid", lambda g, hp: g.double())])
    with pytest.raises(HookError, match="hook on blocks.1.hook_resid_mid returned a gradient of dtype float64"):
        loss.backward()
    model.reset_hooks()
