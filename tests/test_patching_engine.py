"""minigpt2.patching on the engine core (issue #27): the corrupted keys and values before a patch's first
position come through a KV-cache layer (minigpt2.engine.prefix_kv), chunks follow the engine's memory rule
(MINIGPT2_MEMORY_BUDGET), the unembedding is the engine's (an untied W_U included), and the last block at
logit positions that are not a suffix still gives one plain hooked forward's values."""

from __future__ import annotations

import itertools

import pytest
import torch

from minigpt2 import patching as mp
from minigpt2.engine import Core, prefix_kv

ATOL = 1e-5


@pytest.fixture
def pair(device):
    from conftest import make_model

    model = make_model(device=device)  # TINY: 3 layers of 4 heads, vocab 99
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2:] = torch.randint(0, model.cfg.vocab_size, (2, 4), generator=gen)
    targets = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=gen)
    return model, clean.to(device), corrupted.to(device), targets.to(device)


def reads(targets, positions):
    def metric(logits):  # [B, T, V] -> scalar: the log-probability of the targets at ``positions``
        return logits[:, positions].log_softmax(-1).gather(-1, targets[:, positions, None]).mean()
    return metric


def one_forward_per_patch(model, corrupted, cache, metric, act_name):
    """TransformerLens's algorithm on our model: a hooked forward per (layer, pos)."""
    out = torch.zeros(model.cfg.n_layer, corrupted.shape[1], device=corrupted.device)
    for layer, pos in itertools.product(range(model.cfg.n_layer), range(corrupted.shape[1])):
        name = mp.get_act_name(act_name, layer=layer)

        def hook(act, hook, index=[layer, pos], name=name):
            return mp.layer_pos_patch_setter(act.clone(), index, cache[name])
        out[layer, pos] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).item()
    return out


def test_prefix_kv_continues_a_block_as_the_full_run(pair):
    """A block on positions s.. after prefix_kv of the full run's keys and values before s equals the full
    run there; n variants' rows repeat the prefix."""
    model, clean, corrupted, targets = pair
    core, s, n = Core(model), 2, 3
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    _, cache = model.run_with_cache(corrupted, names=names)
    x = cache["blocks.1.hook_resid_pre"][:, s:].repeat(n, 1, 1)
    kv = prefix_kv(cache["blocks.1.attn.hook_k"][:, :s], cache["blocks.1.attn.hook_v"][:, :s], n)
    out = core.block(1, x, n, kv=kv)
    torch.testing.assert_close(out, cache["blocks.1.hook_resid_post"][:, s:].repeat(n, 1, 1), atol=ATOL, rtol=1e-5)


def test_memory_budget_applies_and_changes_nothing(pair, monkeypatch):
    """MINIGPT2_MEMORY_BUDGET sizes patching's chunks as every engine's (one byte: one patch a chunk)."""
    model, clean, corrupted, targets = pair
    _, cache = model.run_with_cache(clean)
    metric = reads(targets, [5])
    ref = mp.get_act_patch_resid_mid(model, corrupted, cache, metric)
    chunks = []
    real = mp._PatchRun.final_residual
    monkeypatch.setattr(mp._PatchRun, "final_residual",
                        lambda self, chunk: chunks.append(len(chunk)) or real(self, chunk))
    monkeypatch.setenv("MINIGPT2_MEMORY_BUDGET", "1")
    small = mp.get_act_patch_resid_mid(model, corrupted, cache, metric)
    assert chunks and set(chunks) == {1}
    torch.testing.assert_close(small, ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ref, one_forward_per_patch(model, corrupted, cache, metric, "resid_mid"), atol=ATOL,
                               rtol=1e-5)


def test_refuses_max_rows_below_one(pair):
    model, clean, corrupted, targets = pair
    _, cache = model.run_with_cache(clean)
    with pytest.raises(ValueError, match="max_rows must be a whole number"):
        mp.get_act_patch_resid_pre(model, corrupted, cache, reads(targets, [5]), max_rows=0)


@pytest.mark.parametrize("positions", [[1, 3], [2, 4], [0, 3, 5]])
def test_last_block_at_logit_positions_that_are_not_a_suffix(pair, positions):
    """The last block at logit positions amid others (keys in the KV-cache layer out of position order)."""
    model, clean, corrupted, targets = pair
    _, cache = model.run_with_cache(clean)
    metric = reads(targets, positions)
    ours = mp.get_act_patch_resid_pre(model, corrupted, cache, metric, logit_positions=positions)
    torch.testing.assert_close(ours, one_forward_per_patch(model, corrupted, cache, metric, "resid_pre"), atol=ATOL,
                               rtol=1e-5)


def test_untied_unembedding(pair):
    """A model whose W_U and b_U no longer equal W_E^T and 0: the engine's unembedding is the model's."""
    model, clean, corrupted, targets = pair
    model.unembed.untie()
    with torch.no_grad():
        model.unembed.W_U.mul_(1.5).add_(0.01)
        model.unembed.b_U.copy_(torch.randn(model.cfg.vocab_size, generator=torch.Generator().manual_seed(4)))
    _, cache = model.run_with_cache(clean)
    metric = reads(targets, [4, 5])
    ours = mp.get_act_patch_attn_out(model, corrupted, cache, metric)
    torch.testing.assert_close(ours, one_forward_per_patch(model, corrupted, cache, metric, "attn_out"), atol=ATOL,
                               rtol=1e-5)
