"""Checkpoints in and out: every layout met in the wild loads to transformers' logits, and
every bad file is refused with a message that names the culprit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, edit_json, edit_safetensors, hf_config, hub_layout, make_hf_model, make_model, make_tokens
from minigpt2 import GPT2Config, load_pretrained
from minigpt2.weights import hf_to_ours, ours_to_hf, save_pretrained

TOL = 1e-4


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def assert_same_logits(model, hf, tokens):
    got, want = logits_of(model, tokens), logits_of(hf, tokens)
    assert want.std() > 0.5
    assert (got - want).abs().max() <= TOL


# Layouts that load --------------------------------------------------------------------------

def test_hub_layout_with_mask_buffers_loads(tmp_path, hf_model, tokens):
    hf_model.config.to_json_file(tmp_path / "config.json")
    sd = hub_layout(hf_model.state_dict(), TINY.n_ctx)
    assert "h.0.attn.bias" in sd and "h.2.attn.masked_bias" in sd and "wte.weight" in sd
    save_file(sd, tmp_path / "model.safetensors")
    model = load_pretrained(tmp_path)
    assert model.cfg == TINY
    assert_same_logits(model, hf_model, tokens)


def test_sharded_checkpoint_loads(tmp_path, hf_model, tokens):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_logits(load_pretrained(tmp_path), hf_model, tokens)


def test_a_shard_named_by_the_index_is_missing(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that are missing: .*{shard.name}"):
        load_pretrained(tmp_path)


def test_what_we_save_loads_in_transformers(tmp_path, tokens):
    import transformers

    model = make_model(seed=7)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.n_inner == TINY.d_mlp and hf.config.n_positions == TINY.n_ctx
    assert_same_logits(model, hf, tokens)


def test_save_and_load_round_trip_exactly(checkpoint, model):
    loaded = load_pretrained(checkpoint)
    assert loaded.cfg == model.cfg
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_saved_keys_use_the_transformers_layout(checkpoint, model):
    tensors = load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to wte, as transformers leaves it out
    assert set(tensors) == {ours_to_hf(k) for k in model.state_dict()}
    # Conv1D stores [in, out]: c_fc maps d_model -> d_mlp
    assert tensors["transformer.h.1.mlp.c_fc.weight"].shape == (TINY.d_model, TINY.d_mlp)
    assert torch.equal(tensors["transformer.h.1.mlp.c_fc.weight"], model.blocks[1].mlp.c_fc.weight.T)


def test_key_table_round_trips():
    for key in ("h.3.attn.c_attn.weight", "transformer.h.10.mlp.c_proj.bias", "ln_f.weight", "wpe.weight"):
        assert ours_to_hf(hf_to_ours(key)) == "transformer." + key.removeprefix("transformer.")
    assert hf_to_ours("h.0.attn.bias") is None and hf_to_ours("transformer.h.0.attn.masked_bias") is None
    assert hf_to_ours("h.0.attn.c_attn.bias") == "blocks.0.attn.c_attn.bias"  # not a mask buffer


def test_config_inferred_from_shapes_without_config_json(tmp_path):
    """n_head is invisible in shapes: GPT-2 uses d_head = 64, so d_model 128 means 2 heads."""
    cfg = GPT2Config(n_layer=2, n_head=2, d_model=128, d_mlp=37, n_ctx=23, vocab_size=99)
    hf = make_hf_model(cfg, seed=2, std=0.1)
    save_file(hub_layout(hf.state_dict(), cfg.n_ctx), tmp_path / "weights.safetensors")
    model = load_pretrained(tmp_path / "weights.safetensors")
    assert model.cfg == cfg
    assert_same_logits(model, hf, make_tokens())


def test_n_head_passed_when_not_inferable(tmp_path, hf_model, tokens):
    save_file(hub_layout(hf_model.state_dict(), TINY.n_ctx), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="cannot infer n_head for d_model=32; pass n_head= or add a config.json"):
        load_pretrained(tmp_path)
    model = load_pretrained(tmp_path, n_head=TINY.n_head)
    assert model.cfg == TINY
    assert_same_logits(model, hf_model, tokens)


def test_half_precision_file_loads_as_float32_by_default(tmp_path, model, tokens):
    save_pretrained(model, tmp_path, dtype=torch.float16)
    assert load_file(tmp_path / "model.safetensors")["transformer.wte.weight"].dtype == torch.float16
    loaded = load_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    assert load_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert (logits_of(loaded, tokens) - logits_of(model, tokens)).abs().max() < 0.05  # fp16 rounding only


# Bad input, each refused with the culprit named -------------------------------------------------

def test_missing_tensor(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors", lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensors: \['transformer.h.1.mlp.c_fc.bias'\]"):
        load_pretrained(checkpoint)


def test_unexpected_tensor(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors",
                     lambda sd: sd.update({"transformer.h.0.attn.rotary.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['transformer.h.0.attn.rotary.weight'\]"):
        load_pretrained(checkpoint)


def test_mis_shaped_tensor_names_the_key_and_both_shapes(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors",
                     lambda sd: sd.update({"transformer.h.2.attn.c_attn.weight": torch.zeros(32, 95)}))
    with pytest.raises(ValueError, match=r"transformer.h.2.attn.c_attn.weight has shape \(32, 95\) in the file, "
                                         r"the config needs \(32, 96\)"):
        load_pretrained(checkpoint)


def test_config_json_that_disagrees_with_the_weights(checkpoint):
    edit_json(checkpoint / "config.json", n_layer=4, n_inner=41)
    with pytest.raises(ValueError) as err:
        load_pretrained(checkpoint)
    message = str(err.value)
    assert "does not match the model config" in message
    assert "transformer.h.3.attn.c_attn.weight" in message  # layer 3 exists only in the config
    assert "transformer.h.0.mlp.c_fc.weight has shape (32, 37) in the file, the config needs (32, 41)" in message


def test_untied_lm_head_is_refused(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors", lambda sd: sd.update({"lm_head.weight": torch.zeros(99, 32)}))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_pretrained(checkpoint)


def test_tied_lm_head_in_the_file_is_accepted(checkpoint, model, tokens):
    edit_safetensors(checkpoint / "model.safetensors",
                     lambda sd: sd.update({"lm_head.weight": sd["transformer.wte.weight"].clone()}))
    torch.testing.assert_close(logits_of(load_pretrained(checkpoint), tokens), logits_of(model, tokens))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_is_refused_with_a_conversion_hint(tmp_path, model, name):
    torch.save(model.state_dict(), tmp_path / name)
    for path in (tmp_path, tmp_path / name):
        with pytest.raises(ValueError, match=rf"{name}.*safetensors only.*Convert it once.*save_file"):
            load_pretrained(path)


def test_pickle_named_safetensors_is_refused(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is a pickle \(torch.save\), not safetensors.*Convert"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 20, "half", "all but one"])
def test_truncated_safetensors_file(checkpoint, keep):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    n = {"half": len(data) // 2, "all but one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"model.safetensors is not a (readable )?safetensors file .*truncated or corrupt"):
        load_pretrained(checkpoint)


def test_corrupt_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[9:19] = b"\x00garbage!\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}.*truncated or corrupt"):
        load_pretrained(checkpoint)


def test_invalid_config_json(checkpoint):
    (checkpoint / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON.*delete it to infer the config"):
        load_pretrained(checkpoint)


def test_unsupported_config_option(checkpoint):
    edit_json(checkpoint / "config.json", activation_function="relu")
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        load_pretrained(checkpoint)


def test_no_checkpoint_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_pretrained(tmp_path / "absent")


def test_config_json_round_trips_through_transformers():
    import transformers

    d = transformers.GPT2Config(**{k: v for k, v in TINY.to_hf_dict().items() if k != "architectures"}).to_dict()
    assert GPT2Config.from_hf_dict(d) == TINY
    assert GPT2Config.from_hf_dict(hf_config(TINY).to_dict()) == TINY
    assert GPT2Config.from_hf_dict({"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 5}).d_mlp == 32  # 4 * n_embd
    with pytest.raises(ValueError, match=r"lacks \['n_embd'\]"):
        GPT2Config.from_hf_dict({"n_layer": 1, "n_head": 2, "vocab_size": 5})
