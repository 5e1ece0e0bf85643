"""Hook points: every advertised hook fires once with its documented shape; hooks are temporary."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import BATCH, SEQ, TINY, make_tokens
from minigpt2 import KVCache

ATOL = 1e-5

# The TransformerLens names minigpt2 advertises, with their documented shapes.
# (B, Tq, Tk: batch, this call's positions, all key positions.)
PER_LAYER = {
    "hook_resid_pre": "B Tq D",
    "ln_1.hook_normalized": "B Tq D",
    "attn.hook_q": "B Tq H d",
    "attn.hook_k": "B Tq H d",
    "attn.hook_v": "B Tq H d",
    "attn.hook_attn_scores": "B H Tq Tk",
    "attn.hook_pattern": "B H Tq Tk",
    "attn.hook_z": "B Tq H d",
    "attn.hook_result": "B Tq H D",
    "hook_attn_out": "B Tq D",
    "hook_resid_mid": "B Tq D",
    "ln_2.hook_normalized": "B Tq D",
    "mlp.hook_pre": "B Tq M",
    "mlp.hook_post": "B Tq M",
    "hook_mlp_out": "B Tq D",
    "hook_resid_post": "B Tq D",
}
DOCUMENTED = {"hook_embed": "B Tq D", "hook_pos_embed": "B Tq D", "ln_final.hook_normalized": "B Tq D"} | {
    f"blocks.{l}.{name}": shape for l in range(TINY.n_layer) for name, shape in PER_LAYER.items()
}


def documented_shape(name: str, B: int, Tq: int, Tk: int) -> tuple[int, ...]:
    sizes = {"B": B, "Tq": Tq, "Tk": Tk, "H": TINY.n_head, "d": TINY.d_head, "D": TINY.d_model, "M": TINY.d_mlp}
    return tuple(sizes[s] for s in DOCUMENTED[name].split())


def record(calls):
    def hook(x, hp):
        calls.append((hp.name, tuple(x.shape)))
    return hook


def test_the_advertised_hooks_are_exactly_the_hook_points(model):
    assert set(model.hook_dict) == set(DOCUMENTED)
    assert all(hp.name == name for name, hp in model.hook_dict.items())


def test_every_hook_fires_once_with_its_documented_shape(model, tokens):
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, record(calls))])
    assert Counter(name for name, _ in calls) == Counter(list(DOCUMENTED))
    for name, shape in calls:
        assert shape == documented_shape(name, BATCH, SEQ, SEQ), name


def test_hook_shapes_when_continuing_from_a_kv_cache(model, tokens):
    cache = KVCache(TINY.n_layer)
    model(tokens, cache=cache)
    calls = []
    model.run_with_hooks(tokens[:, :3], cache=cache, fwd_hooks=[(lambda n: True, record(calls))])
    assert Counter(name for name, _ in calls) == Counter(list(DOCUMENTED))
    for name, shape in calls:
        assert shape == documented_shape(name, BATCH, 3, SEQ + 3), name


def test_identity_hooks_change_nothing(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
        returning_x = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hp: x)])
        returning_none = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hp: None)])
    torch.testing.assert_close(returning_x, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(returning_none, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_a_zeroing_hook_moves_the_logits(model, tokens, name):
    with torch.no_grad():
        plain = model(tokens)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hp: torch.zeros_like(x))])
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
    return not any(hp.fns for hp in model.hook_dict.values())


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


def test_positions_give_the_full_logits_gathered(model, tokens):
    positions = torch.randint(-SEQ, SEQ, (BATCH,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, positions=positions)
    assert picked.shape == (BATCH, TINY.vocab_size)
    torch.testing.assert_close(picked, full[torch.arange(BATCH), positions % SEQ], atol=ATOL, rtol=0)


def test_run_with_cache_detaches_unless_asked(model, tokens):
    logits, cache = model.run_with_cache(tokens, names=lambda n: n.startswith("blocks.2"))
    assert set(cache) == {n for n in DOCUMENTED if n.startswith("blocks.2")}
    assert not cache["blocks.2.hook_resid_post"].requires_grad
    logits, cache = model.run_with_cache(tokens, names=["blocks.2.hook_resid_post"], detach=False)
    cache["blocks.2.hook_resid_post"].sum().backward()  # the graph is kept
    assert model.blocks[2].mlp.c_fc.weight.grad is not None


def test_reset_hooks_clears_hooks_left_by_hand(model, tokens):
    model.hook_point("hook_embed").fns.append(lambda x, hp: torch.zeros_like(x))
    model.reset_hooks()
    assert no_hooks_left(model)

