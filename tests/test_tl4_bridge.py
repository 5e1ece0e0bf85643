"""minigpt2.model_bridge against TransformerLens 4.3's TransformerBridge, on the same tiny GPT-2.

TransformerLens 4 cannot share the test environment with TransformerLens 3.9, so its outputs are a
frozen record (tests/data/tl4_record.*, made by tests/tools/make_tl4_record.py in an environment of its
own) of the tiny model in tests/data/tl4_tiny_gpt2: hook names per mode, the default cache for a prompt,
logits, a head ablation, an activation patch, generation under a seed, and the weights after processing.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt2.model_bridge import TransformerBridge

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tl4_tiny_gpt2"
SETTINGS = {  # enable_compatibility_mode's keywords (None: not called), the switches turned on
    "raw": (None, ()),
    "compat": ({}, ()),
    "compat_no_processing": ({"no_processing": True}, ()),
    "compat_no_fold": ({"fold_ln": False, "center_unembed": False}, ()),
    "raw_switches": (None, ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")),
    "compat_attn_in": ({}, ("use_attn_in",)),
}
N_LOGITS = 32
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def record():
    return load_file(str(DATA / "tl4_record.safetensors")), json.loads((DATA / "tl4_record.json").read_text())


def boot(setting=(None, ())) -> TransformerBridge:
    compat, switches = setting
    bridge = TransformerBridge.boot_transformers(str(MODEL))
    if compat is not None:
        bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    for switch in switches:
        getattr(bridge, f"set_{switch}")(True)
    return bridge


@pytest.fixture(scope="module", params=list(SETTINGS))
def setting(request):
    return request.param, boot(SETTINGS[request.param])


def recorded_cache(tensors, names, key, name):
    """The recorded activation of ``name``: tensors recorded once per value, the JSON naming the others."""
    target = names[key]["cache_same"].get(name, name)
    return tensors[f"{key}/cache/{target}"]


def check_logits(tensors, key, logits):
    torch.testing.assert_close(logits[..., :N_LOGITS], tensors[f"{key}/logits_head"], **TOL)
    torch.testing.assert_close(logits.logsumexp(dim=-1), tensors[f"{key}/logits_lse"], **TOL)
    assert torch.equal(logits.argmax(dim=-1), tensors[f"{key}/logits_argmax"])


def test_hook_names_and_default_cache_are_tl4s(record, setting):
    tensors, names = record
    key, bridge = setting
    assert set(bridge.hook_dict) == set(names[key]["hook_dict"])
    _, cache = bridge.run_with_cache(bridge.to_tokens(names["prompt"]))
    assert set(cache.keys()) == set(names[key]["cache_keys"])


def test_cached_activations_equal_tl4s(record, setting):
    tensors, names = record
    key, bridge = setting
    logits, cache = bridge.run_with_cache(bridge.to_tokens(names["prompt"]))
    check_logits(tensors, f"{key}/forward", logits)
    for name in names[key]["cache_keys"]:
        want = recorded_cache(tensors, names, key, name)
        got = cache[name]
        got = got[..., :N_LOGITS] if got.shape[-1] == bridge.cfg.d_vocab else got
        torch.testing.assert_close(got.to(want.dtype), want, **TOL, msg=lambda m: f"{key} {name}: {m}")


def test_loss_patching_and_ablation_equal_tl4s(record, setting):
    tensors, names = record
    key, bridge = setting
    tokens = bridge.to_tokens(names["prompt"])
    torch.testing.assert_close(bridge(tokens, return_type="loss").reshape(1), tensors[f"{key}/loss"], **TOL)

    def zero_head(z, hook):
        z[:, :, 1, :] = 0.0
        return z

    ablated = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    check_logits(tensors, f"{key}/zero_head", ablated)
    _, cache = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    clean = cache["blocks.0.hook_resid_post"]

    def patch(resid, hook):
        resid[:, -1] = clean[:, -1]
        return resid

    other = bridge.to_tokens(names["prompt"].replace("John gave", "Mary gave"))
    patched = bridge.run_with_hooks(other, fwd_hooks=[("blocks.0.hook_resid_post", patch)])
    check_logits(tensors, f"{key}/patched", patched)


def test_generate_equals_tl4s_under_a_seed(record, setting):
    tensors, names = record
    key, bridge = setting
    tokens = bridge.to_tokens(names["prompt"])
    for use_past_kv_cache in (True, False):  # the record is TL 4's without its KV cache (see make_tl4_record.py)
        torch.manual_seed(0)
        sampled = bridge.generate(tokens, max_new_tokens=8, verbose=False, stop_at_eos=False,
                                  use_past_kv_cache=use_past_kv_cache)
        assert torch.equal(sampled, tensors[f"{key}/generate_sampled"])
    greedy = bridge.generate(tokens, max_new_tokens=8, verbose=False, do_sample=False, stop_at_eos=False)
    assert torch.equal(greedy, tensors[f"{key}/generate_greedy"])
    torch.manual_seed(1)
    assert bridge.generate(names["prompt"], max_new_tokens=5, verbose=False) == names[key]["generate_text"]


def test_weights_after_processing_equal_tl4s(record, setting):
    tensors, names = record
    key, bridge = setting
    for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_pos"):
        torch.testing.assert_close(getattr(bridge, w).detach(), tensors[f"{key}/weights/{w}"], **TOL,
                                   msg=lambda m: f"{key} {w}: {m}")
    torch.testing.assert_close(bridge.W_U[:, :N_LOGITS].detach(), tensors[f"{key}/weights/W_U_head"], **TOL)
    torch.testing.assert_close(bridge.W_E[:N_LOGITS].detach(), tensors[f"{key}/weights/W_E_head"], **TOL)
    torch.testing.assert_close(bridge.b_U[:N_LOGITS].detach(), tensors[f"{key}/weights/b_U_head"], **TOL)


def test_per_head_inputs_and_the_analysis_api_equal_tl4s(record, setting):
    tensors, names = record
    key, bridge = setting
    tokens = bridge.to_tokens(names["prompt"])
    if f"{key}/zero_input/logits_head" in tensors:  # head 1's query input (or whole input) of layer 1 zeroed

        def zero_input(x, hook):
            x[:, :, 1, :] = 0.0
            return x

        per_head = "blocks.1.hook_q_input" if bridge.cfg.use_split_qkv_input else "blocks.1.hook_attn_in"
        check_logits(tensors, f"{key}/zero_input", bridge.run_with_hooks(tokens, fwd_hooks=[(per_head, zero_input)]))
    _, cache = bridge.run_with_cache(tokens)
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == names[key]["accumulated_labels"]
    torch.testing.assert_close(resid, tensors[f"{key}/accumulated_resid"], **TOL)
    torch.testing.assert_close(cache.decompose_resid(apply_ln=True), tensors[f"{key}/decompose_resid"], **TOL)
    torch.testing.assert_close(bridge(tokens, stop_at_layer=1), tensors[f"{key}/stop_at_layer"], **TOL)
    torch.testing.assert_close(bridge(tokens, return_type="loss", loss_per_token=True),
                               tensors[f"{key}/loss_per_token"], **TOL)
    for field, value in names[key]["cfg"].items():
        if field != "tokenizer_prepends_bos":  # TL 4 sets its tokenizer to add BOS; minigpt2's adds none (README)
            assert getattr(bridge.cfg, field) == value, field
    torch.testing.assert_close(bridge.blocks[0].ln1.w.detach(), tensors[f"{key}/weights/blocks.0.ln1.w"], **TOL)
    torch.testing.assert_close(bridge.blocks[1].attn.W_Q.detach(), tensors[f"{key}/weights/blocks.1.attn.W_Q"], **TOL)


def test_switched_off_hooks_are_refused_by_name_and_skipped_by_filters():
    """TransformerLens 4's rule: a hook its use_* switch keeps off cannot be added by name, and a filter skips it."""
    bridge = boot()
    with pytest.raises(ValueError, match="use_attn_result is False. Call set_use_attn_result"):
        bridge.run_with_hooks("a cat", fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: x)])
    with pytest.warns(UserWarning, match="gated-off"):
        _, cache = bridge.run_with_cache("a cat", names_filter=lambda name: name.endswith("hook_result"))
    assert len(cache.keys()) == 0
    bridge.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        bridge.set_use_attn_in(True)


def test_tokenization_equals_tl4s(record):
    _, names = record
    bridge = boot()
    assert bridge.to_tokens(names["prompt"]).tolist() == names["to_tokens"]
    assert bridge.to_str_tokens(names["prompt"]) == names["to_str_tokens"]
    batch = ["The cat sat", "When Mary and John went to the store"]
    assert bridge.to_tokens(batch).tolist() == names["batch_to_tokens"]
    assert bridge.to_string(bridge.to_tokens(batch)) == names["batch_to_string"]


# A TransformerLens 4 notebook's GPT-2 cells (boot, cache, hooks, a head ablation, patching, generate),
# written against transformer_lens and run here with the imports renamed, word for word.
NOTEBOOK = '''
import torch
from transformer_lens.model_bridge import TransformerBridge

bridge = TransformerBridge.boot_transformers(MODEL_DIR, device="cpu")
bridge.enable_compatibility_mode()
tokens = bridge.to_tokens(PROMPT)
logits, cache = bridge.run_with_cache(tokens)
pattern = cache["blocks.0.attn.hook_pattern"]
resid = cache["blocks.1.hook_resid_post"]
assert pattern.shape == (1, bridge.cfg.n_heads, tokens.shape[1], tokens.shape[1])

def ablate_head(z, hook):
    z[:, :, 1, :] = 0.0
    return z

ablated = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", ablate_head)])
_, clean = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
other = bridge.to_tokens(PROMPT.replace("John gave", "Mary gave"))

def patch_resid(resid, hook):
    resid[:, -1] = clean["blocks.0.hook_resid_post"][:, -1]
    return resid

patched = bridge.run_with_hooks(other, fwd_hooks=[("blocks.0.hook_resid_post", patch_resid)])
with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate_head)]):
    ablated_again = bridge(tokens)
torch.manual_seed(1)
text = bridge.generate(PROMPT, max_new_tokens=5, verbose=False, use_past_kv_cache=False)
'''


def test_a_tl4_notebook_runs_with_its_imports_renamed(record):
    tensors, names = record
    scope = {"MODEL_DIR": str(MODEL), "PROMPT": names["prompt"]}
    exec(NOTEBOOK.replace("transformer_lens", "minigpt2"), scope)
    check_logits(tensors, "compat/forward", scope["logits"])
    check_logits(tensors, "compat/zero_head", scope["ablated"])
    check_logits(tensors, "compat/zero_head", scope["ablated_again"])
    check_logits(tensors, "compat/patched", scope["patched"])
    assert scope["text"] == names["compat"]["generate_text"]


def test_tl4s_exploratory_analysis_demo_runs_with_its_imports_renamed(record):
    """TransformerLens 4's own demo (logit difference, logit lens, per-layer and per-head attribution,
    residual-stream patching), its cells renamed transformer_lens -> minigpt2, gives TL 4's numbers."""
    import sys

    tensors, _ = record
    sys.path.insert(0, str(Path(__file__).parent / "tools"))
    try:
        from tl4_exploratory_cells import CELLS, OUTPUTS
    finally:
        sys.path.pop(0)
    scope = {"MODEL_DIR": str(MODEL)}
    exec(CELLS.replace("transformer_lens", "minigpt2"), scope)
    for key in OUTPUTS:
        torch.testing.assert_close(torch.as_tensor(scope[key]).reshape(-1), tensors[f"demo/{key}"], atol=1e-4,
                                   rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_hooks_are_linked_only_while_hooked():
    """Nothing of minigpt2's is hooked outside a hooked call, so its fast paths (fused attention) stay."""
    bridge = boot()
    bridge.run_with_cache("a cat sat")
    bridge.run_with_hooks("a cat sat", fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x)])
    assert not any(hp.active for hp in bridge.original_model.hook_dict.values())
    seen = []
    bridge.add_hook("blocks.1.attn.hook_pattern", lambda x, hook: seen.append(hook.name))
    bridge("a cat sat")
    bridge.reset_hooks()
    bridge("a cat sat")
    assert seen == ["blocks.1.attn.hook_pattern"]
    assert not any(hp.active for hp in bridge.original_model.hook_dict.values())


def test_the_query_projections_own_input():
    """blocks.l.attn.q.hook_in feeds the query projection alone: zeroing it leaves q = b_Q and k, v as they were."""
    bridge = boot()
    tokens = bridge.to_tokens("When Mary and John went")
    _, clean = bridge.run_with_cache(tokens)
    with bridge.hooks(fwd_hooks=[("blocks.1.attn.q.hook_in", lambda x, hook: torch.zeros_like(x))]):
        _, cache = bridge.run_with_cache(tokens)
    b_Q = bridge.blocks[1].attn.b_Q  # [H, d_head]
    torch.testing.assert_close(cache["blocks.1.attn.hook_q"], b_Q.expand_as(cache["blocks.1.attn.hook_q"]))
    torch.testing.assert_close(cache["blocks.1.attn.hook_k"], clean["blocks.1.attn.hook_k"])
    torch.testing.assert_close(cache["blocks.1.attn.hook_v"], clean["blocks.1.attn.hook_v"])
    assert not torch.allclose(cache["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"])


def test_gpt2_boots_from_weights_or_says_where_to_put_it():
    with pytest.raises(ValueError, match=r"boot_transformers\(hf_model=.*\) is not supported"):
        TransformerBridge.boot_transformers(str(MODEL), hf_model=object())
    if (Path(__file__).parents[1] / "weights" / "gpt2" / "config.json").exists():
        pytest.skip("weights/gpt2 is present")
    with pytest.raises(FileNotFoundError, match="weights/gpt2"):
        TransformerBridge.boot_transformers("gpt2")


def test_gradients_and_dtype_follow_minigpt2s_model():
    """Backward hooks see the gradient minigpt2's own hooks see; .to() moves the bridge and its cfg with the model."""
    bridge = boot()
    tokens = bridge.to_tokens("When Mary and John went")
    _, cache = bridge.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre", incl_bwd=True, return_type="loss")
    model = bridge.original_model
    _, own = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre", incl_bwd=True, return_type="loss")
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre_grad"], own["blocks.1.hook_resid_pre_grad"])
    bridge.to(torch.float64)
    assert bridge.cfg.dtype == torch.float64 and bridge(tokens).dtype == torch.float64
