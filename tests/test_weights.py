"""Checkpoints in and out: every layout met in the wild loads to transformers' logits, and
every bad file is refused with a message that names the culprit."""

from __future__ import annotations

import json
import shutil
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, edit_json, edit_safetensors, hf_config, hub_layout, make_hf_model, make_model, make_tokens
from minigpt2 import GPT2, GPT2Config, load_pretrained, weights
from minigpt2.config import ConfigError
from minigpt2.weights import (CheckpointError, classify, hf_shapes, hf_to_ours, ours_to_hf, read_header, read_safetensors,
                              read_state_dict, save_pretrained)

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


def test_without_config_json_n_head_must_be_passed(tmp_path):
    """n_head is invisible in shapes: a d_model-128 model of 4 heads must not load with 128 / 64 = 2."""
    cfg = GPT2Config(n_layer=2, n_head=4, d_model=128, d_mlp=37, n_ctx=23, vocab_size=99)
    hf = make_hf_model(cfg, seed=2, std=0.1)
    save_file(hub_layout(hf.state_dict(), cfg.n_ctx), tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"weights.safetensors has no config.json, and the number of heads cannot "
                                              r"be read from tensor shapes: add the config.json .* n_head=\.\.\.\)$"):
        load_pretrained(tmp_path / "weights.safetensors")
    model = load_pretrained(tmp_path / "weights.safetensors", n_head=4)
    assert model.cfg == cfg  # everything else is read from the shapes
    assert_same_logits(model, hf, make_tokens())
    assert load_pretrained(tmp_path / "weights.safetensors", config=cfg).cfg == cfg


def test_n_head_passed_when_not_inferable(tmp_path, hf_model, tokens):
    save_file(hub_layout(hf_model.state_dict(), TINY.n_ctx), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json, .*pass the number of heads: load_pretrained"):
        load_pretrained(tmp_path)
    model = load_pretrained(tmp_path, n_head=TINY.n_head)
    assert model.cfg == TINY
    assert_same_logits(model, hf_model, tokens)


def test_gpt2_sized_weights_without_config_get_a_hint(tmp_path):
    cfg = GPT2Config(n_layer=1, n_head=12, d_model=768, d_mlp=8, n_ctx=4, vocab_size=5)
    save_pretrained(make_model(cfg), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"OpenAI's GPT-2 weights, of d_model 768: n_head=12"):
        load_pretrained(tmp_path)
    assert load_pretrained(tmp_path, n_head=12).cfg == cfg


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


# Trust: every file is checked before it is believed ---------------------------------------------
# Each table below is one class of checkpoint that used to load wrong, hang or crash with a raw
# traceback; each case must be refused with a CheckpointError that names the file and the fix.

def raw_safetensors(path):
    """(header dict, data bytes) of a safetensors file, read by hand."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header, data, pad: int = 0, text: bytes | None = None):
    """A safetensors file by hand: the header JSON (or ``text``), padded with ``pad`` spaces, then ``data``."""
    h = (json.dumps(header).encode() if text is None else text) + b" " * pad
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def edit_header(path, edit):
    header, data = raw_safetensors(path)
    edit(header)
    write_raw(path, header, data)


def refused(path, *fragments, **kwargs) -> str:
    """load_pretrained(path) must raise CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, **kwargs)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_same_weights(loaded, model):
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_key_table_matches_the_model():
    """hf_shapes (the one table of the Hugging Face layout) names exactly minigpt2's tensors, in their
    shapes: a module renamed in model.py without the table fails here."""
    cfg = GPT2Config(n_layer=2, n_head=2, d_model=6, d_mlp=10, n_ctx=5, vocab_size=7)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in GPT2(cfg).state_dict().items()}
    table = {}
    for key, shape in hf_shapes(cfg).items():
        k = classify(key)
        table[k.ours] = shape[::-1] if k.entry.conv1d else shape
    assert table == ours
    assert {ours_to_hf(k) for k in ours} == set(hf_shapes(cfg))


# 1. a safetensors file is recognised by its format, whatever its first bytes

def test_every_low_byte_of_the_header_length_loads(checkpoint, model):
    """The header length is the file's first 8 bytes (little-endian): 0x80 first (looks like pickle) or
    "PK" (looks like zip) are ordinary lengths. Padding the header (spaces, as safetensors allows)
    walks the low byte through all 256 values; each is recognised as safetensors and its header read
    (read_header decides the format for load_pretrained); the tensors are read on every 16th value and
    on those that look like pickle or zip, the whole load on every 64th and on those)."""
    path = checkpoint / "model.safetensors"
    header, data = raw_safetensors(path)
    base = len(json.dumps(header).encode())
    for low in range(256):
        write_raw(path, header, data, pad=(low - base) % 256)
        assert path.read_bytes()[0] == low
        assert set(read_header(path)) >= {k for k in header if k != "__metadata__"}
        if low % 16 == 0 or low in b"\x80PK":
            sd, _ = read_state_dict(checkpoint)
            assert sd.keys() == model.state_dict().keys()
            assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        if low % 64 == 0 or low in b"\x80PK":
            assert_same_weights(load_pretrained(checkpoint), model)
    write_raw(path, header, data, pad=int.from_bytes(b"PK", "little") - base)  # the length's bytes read "PK"
    assert path.read_bytes()[:2] == b"PK"
    assert_same_weights(load_pretrained(checkpoint), model)


def test_read_safetensors_recognises_any_file_by_its_format(tmp_path, model):
    """The same check for files of any tensors (an optimizer's state, say), for other readers to reuse."""
    path = tmp_path / "optimizer.safetensors"
    save_file({"step": torch.tensor([3], dtype=torch.int64), "exp_avg": torch.ones(5)}, path)
    header, data = raw_safetensors(path)
    base = len(json.dumps(header).encode())
    write_raw(path, header, data, pad=(0x80 - base) % 256)
    assert path.read_bytes()[0] == 0x80
    assert read_safetensors(path)["step"].tolist() == [3]
    torch.save({"step": 3}, path)
    with pytest.raises(CheckpointError, match="optimizer.safetensors is a pickle"):
        read_safetensors(path)


def test_old_style_pickle_is_refused_with_the_hint(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "model.safetensors", _use_new_zipfile_serialization=False)
    assert (tmp_path / "model.safetensors").read_bytes()[:1] == b"\x80"
    refused(tmp_path, "model.safetensors is a pickle (torch.save), not safetensors", "Convert it once")


# 2. save_pretrained writes only dtypes that hold the weights

@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn, "float16"])
def test_save_refuses_a_dtype_that_cannot_hold_the_weights(tmp_path, model, dtype):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="weights need a floating-point dtype, one of torch.float32"):
        save_pretrained(model, out, dtype=dtype)
    assert not out.exists()  # refused before anything is written
    with pytest.raises(CheckpointError, match="floating-point dtype"):
        load_pretrained(tmp_path, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_save_in_each_float_dtype_loads(tmp_path, model, dtype):
    save_pretrained(model, tmp_path, dtype=dtype)
    loaded = load_pretrained(tmp_path, dtype=dtype)
    assert loaded.dtype == dtype
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(dtype)), k


# 3. silent wrong models

def test_n_head_given_with_a_config_must_agree(checkpoint, model):
    refused(checkpoint, "load_pretrained(n_head=2) contradicts", "config.json, which says n_head=4", n_head=2)
    assert load_pretrained(checkpoint, n_head=4).cfg == TINY
    other = GPT2Config(**{**TINY.to_dict(), "n_head": 2})
    assert load_pretrained(checkpoint, config=other).cfg == other  # config= replaces config.json, explicitly
    refused(checkpoint, "load_pretrained(config=...) takes a GPT2Config, got dict", config=TINY.to_hf_dict())


@pytest.mark.parametrize("link", ["dangling", "looping"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_broken_symlink_is_refused_not_ignored(checkpoint, name, link):
    (checkpoint / name).unlink()
    target = checkpoint / "absent" if link == "dangling" else checkpoint / name
    (checkpoint / name).symlink_to(target)
    refused(checkpoint, f"{checkpoint / name} is a symlink that does not resolve", "remove it")


def test_a_symlink_to_a_real_file_loads(checkpoint, model, tmp_path):
    """The Hugging Face cache links snapshot files to blobs elsewhere: links that resolve are fine."""
    for name in ("config.json", "model.safetensors"):
        blob = tmp_path / f"blob-{name}"
        (checkpoint / name).rename(blob)
        (checkpoint / name).symlink_to(blob)
    assert_same_weights(load_pretrained(checkpoint), model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_are_refused(checkpoint, dtype):
    key = "transformer.h.1.ln_2.weight"
    edit_safetensors(checkpoint / "model.safetensors", lambda sd: sd.update({key: sd[key].to(dtype)}))
    st_name = {torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}[dtype]
    refused(checkpoint, f"model.safetensors: tensor {key} is {st_name}, not floating point")


def test_the_same_tensor_under_both_key_layouts_is_refused(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors",
                     lambda sd: sd.update({"h.0.ln_1.weight": sd["transformer.h.0.ln_1.weight"] + 1}))
    refused(checkpoint, "under both key layouts", "transformer.h.0.ln_1.weight in", "h.0.ln_1.weight in",
            "model.safetensors")


def test_lm_head_under_both_key_layouts_is_refused(checkpoint):
    edit_safetensors(checkpoint / "model.safetensors", lambda sd: sd.update(
        {"lm_head.weight": sd["transformer.wte.weight"].clone(),
         "transformer.lm_head.weight": sd["transformer.wte.weight"].clone()}))
    refused(checkpoint, "lm_head.weight is in the checkpoint under both key layouts")


def shard(checkpoint, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """Split checkpoint/model.safetensors into two shards and an index, as transformers does."""
    sd = load_file(checkpoint / "model.safetensors")
    keys = sorted(sd)
    parts = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: sd[k] for k in part}, checkpoint / name)
    (checkpoint / "model.safetensors").unlink()
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, part in parts.items() for k in part}}))
    return index, [checkpoint / n for n in names]


def test_hand_sharded_checkpoint_loads(checkpoint, model):
    shard(checkpoint)
    assert_same_weights(load_pretrained(checkpoint), model)


def test_the_same_key_in_two_shards_is_refused(checkpoint):
    _, (first, second) = shard(checkpoint)
    key = sorted(load_file(first))[0]
    edit_safetensors(second, lambda sd: sd.update({key: load_file(first)[key] * 2}))
    refused(checkpoint, f"{key} is in the checkpoint twice", str(first), str(second))


def test_an_index_that_disagrees_with_its_shards_is_refused(checkpoint):
    index, (first, second) = shard(checkpoint)
    d = json.loads(index.read_text())
    key = sorted(load_file(first))[0]
    d["weight_map"][key] = second.name
    index.write_text(json.dumps(d))
    refused(checkpoint, f"{first} holds {key}, but {index} puts it in {second}")
    del d["weight_map"][key]
    index.write_text(json.dumps(d))
    refused(checkpoint, f"{first} holds {key}, but {index} does not list it")


def test_both_a_single_file_and_an_index_is_ambiguous(checkpoint, model, tmp_path):
    index, _ = shard(checkpoint)
    save_pretrained(model, tmp_path / "single")  # save_pretrained itself refuses to make the mixture (below)
    shutil.copy(tmp_path / "single" / "model.safetensors", checkpoint / "model.safetensors")
    refused(checkpoint, "holds both model.safetensors and model.safetensors.index.json", "remove the stale one")


def test_save_pretrained_refuses_a_sharded_directory_and_a_file(checkpoint, model, tmp_path):
    """Saving over a sharded checkpoint would make the mixture above; onto a file, a named error (not
    pathlib's FileExistsError). Nothing is written either way."""
    shard(checkpoint)
    before = sorted(p.name for p in checkpoint.iterdir())
    with pytest.raises(CheckpointError, match=r"holds a sharded checkpoint.*Fix: save into a new directory"):
        save_pretrained(model, checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match=r"a_file is a file, not a directory.*Fix: pass a directory"):
        save_pretrained(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "{outside}", "sub/../../outside.safetensors",
                                        "", ".", 3, None])
def test_an_index_pointing_outside_the_checkpoint_is_refused(checkpoint, tmp_path, shard_name):
    index, _ = shard(checkpoint)
    outside = tmp_path / "outside.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(99, 32)}, outside)  # it exists: refused for where it is
    shard_name = str(outside) if shard_name == "{outside}" else shard_name
    d = json.loads(index.read_text())
    d["weight_map"]["transformer.wte.weight"] = shard_name
    index.write_text(json.dumps(d))
    refused(checkpoint, f"{index} puts transformer.wte.weight in {shard_name!r}, which is not a file inside")


EPS_BAD = [float("nan"), float("inf"), -float("inf"), 1e300, 0, 0.0, -1e-5, 1, 1.5, True, "1e-5", None, [1e-5]]


@pytest.mark.parametrize("value", EPS_BAD, ids=repr)
def test_layer_norm_epsilon_out_of_range_is_refused(checkpoint, value):
    edit_json(checkpoint / "config.json", layer_norm_epsilon=value)
    refused(checkpoint, "config.json: layer_norm_epsilon must be")


CONFIG_FIELDS_BAD = [  # (field, value, what the message says)
    ("n_head", 2.0, "n_head must be an integer, got 2.0 (float)"),
    ("n_head", True, "n_head must be an integer, got True (bool)"),
    ("n_head", "4", "n_head must be an integer, got '4' (str)"),
    ("n_head", None, "n_head must be an integer, got None"),
    ("n_head", [4], "n_head must be an integer"),
    ("n_head", 0, "n_head must be positive, got 0"),
    ("n_head", -4, "n_head must be positive, got -4"),
    ("n_head", 5, "n_embd=32 is not divisible by n_head=5"),
    ("n_layer", 3.0, "n_layer must be an integer, got 3.0 (float)"),
    ("n_layer", 1e300, "n_layer must be an integer"),
    ("n_embd", 32.0, "n_embd must be an integer"),
    ("n_inner", 0, "n_inner must be positive"),
    ("n_inner", 37.5, "n_inner must be an integer"),
    ("n_positions", False, "n_positions must be an integer, got False (bool)"),
    ("vocab_size", "99", "vocab_size must be an integer"),
    ("scale_attn_weights", 1, "scale_attn_weights=1 is not supported"),
]


@pytest.mark.parametrize("field, value, says", CONFIG_FIELDS_BAD, ids=lambda x: repr(x)[:20])
def test_config_fields_must_be_sensible_integers(checkpoint, field, value, says):
    edit_json(checkpoint / "config.json", **{field: value})
    refused(checkpoint, f"config.json: {says}")


def test_config_fields_are_checked_in_GPT2Config_too():
    with pytest.raises(ConfigError, match=r"n_head must be an integer, got 2.0 \(float\)"):
        GPT2Config(n_head=2.0)
    with pytest.raises(ConfigError, match="layer_norm_eps must be a finite number in"):
        GPT2Config(layer_norm_eps=float("nan"))
    assert GPT2Config(layer_norm_eps=1e-6).layer_norm_eps == 1e-6


ABSURD = [dict(n_layer=10**5), dict(vocab_size=10**12), dict(n_positions=10**12), dict(n_inner=10**12),
          dict(n_embd=2**40, n_head=1), dict(n_layer=10**30)]


@pytest.mark.parametrize("changes", ABSURD, ids=str)
def test_an_absurd_config_is_refused_before_anything_is_built(checkpoint, monkeypatch, changes):
    def never(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked against the file")

    monkeypatch.setattr(GPT2, "__init__", never)  # load_pretrained builds the class it is called on
    edit_json(checkpoint / "config.json", **changes)
    start = time.perf_counter()
    message = refused(checkpoint, "does not match the model config", "config.json")
    assert time.perf_counter() - start < 1.0
    assert len(message) < 4000


def load_within(seconds: float, path, unblock=()):
    """load_pretrained(path) in a thread; fails the test, instead of hanging it, if it blocks."""
    outcome = {}

    def target():
        try:
            outcome["model"] = load_pretrained(path)
        except BaseException as e:  # noqa: B902 -- handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in unblock:  # a reader blocked on a FIFO's open: let it go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"load_pretrained({path}) blocked")
    return outcome


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
def test_a_fifo_is_refused_not_read(checkpoint, name):
    if name.endswith("index.json"):
        shard(checkpoint)
    (checkpoint / name).unlink(missing_ok=True)
    os.mkfifo(checkpoint / name)
    outcome = load_within(5, checkpoint, unblock=[checkpoint / name])
    assert isinstance(outcome.get("error"), CheckpointError), outcome
    assert f"{checkpoint / name} is not a regular file" in str(outcome["error"])


def test_a_fifo_given_as_the_checkpoint_is_refused(tmp_path):
    os.mkfifo(tmp_path / "w.safetensors")
    outcome = load_within(5, tmp_path / "w.safetensors", unblock=[tmp_path / "w.safetensors"])
    assert "is not a regular file" in str(outcome.get("error")), outcome


def test_a_directory_where_config_json_belongs_is_refused(checkpoint):
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").mkdir()
    refused(checkpoint, "config.json is a directory, not a file")


# 4. named errors instead of tracebacks

CONFIG_FILES_BAD = [  # (config.json bytes, what the message says)
    (b"\xff\xfe{\x00}\x00", "config.json is not UTF-8 text (invalid start byte at byte 0)"),
    (b"{ not json", "config.json is not valid JSON (Expecting property name"),
    (b"3", "config.json holds a JSON number, not an object"),
    (b"[]", "config.json holds a JSON array, not an object"),
    (b'"gpt2"', "config.json holds a JSON string, not an object"),
    (b"null", "config.json holds a JSON null, not an object"),
    (b"{}", "config.json lacks ['n_layer', 'n_head', 'n_embd', 'vocab_size']"),
    (b'{"n_layer": 3, "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 99}', "'n_layer' appears more than once"),
    (b"[" * 100_000, "config.json is not valid JSON here (nested more than 100 levels deep)"),
]


@pytest.mark.parametrize("data, says", CONFIG_FILES_BAD, ids=lambda x: repr(x)[:20])
def test_a_bad_config_json_is_named(checkpoint, data, says):
    (checkpoint / "config.json").write_bytes(data)
    message = refused(checkpoint, says)
    assert str(checkpoint / "config.json") in message


INDEX_FILES_BAD = [
    (b"{ bad", "model.safetensors.index.json is not valid JSON"),
    (b"\xff", "model.safetensors.index.json is not UTF-8"),
    (b"[]", "has no weight_map"),
    (b'{"metadata": {}}', "has no weight_map"),
    (b'{"weight_map": []}', "has no weight_map"),
    (b'{"weight_map": {}}', "has no weight_map"),
]


@pytest.mark.parametrize("data, says", INDEX_FILES_BAD, ids=lambda x: repr(x)[:20])
def test_a_bad_index_is_named(checkpoint, data, says):
    index, _ = shard(checkpoint)
    index.write_bytes(data)
    refused(checkpoint, str(index), says)


def without_config(checkpoint, edit=None):
    (checkpoint / "config.json").unlink()
    if edit:
        edit_safetensors(checkpoint / "model.safetensors", edit)
    return checkpoint


NO_CONFIG_BAD = [  # (edit of the tensors, what the message says); n_head=4 is passed
    (lambda sd: sd.update({"transformer.wte.weight": sd["transformer.wte.weight"].flatten()}),
     "transformer.wte.weight has shape (3168,), not the 2-D shape of GPT-2's"),
    (lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(2, 3, 4)}),
     "transformer.h.0.mlp.c_fc.weight has shape (2, 3, 4), not the 2-D"),
    (lambda sd: sd.update({"blocks.x": torch.zeros(3)}), "unexpected tensors: ['blocks.x']"),
    (lambda sd: sd.pop("transformer.wpe.weight"), "no tensor transformer.wpe.weight to infer the config from"),
    (lambda sd: [sd.update({k.replace("transformer.h.", "blocks."): sd.pop(k)}) for k in list(sd)],
     "no tensor transformer.h.0.mlp.c_fc.weight to infer the config from; the file's keys include ['blocks."),
    (lambda sd: sd.update({"transformer.wte.weight": torch.zeros(99, 0)}),
     "its tensor shapes make no valid config (GPT2Config: d_model must be positive, got 0)"),
    (lambda sd: sd.pop("transformer.h.1.attn.c_attn.weight"), "missing tensors: ['transformer.h.1.attn.c_attn.weight']"),
]


@pytest.mark.parametrize("edit, says", NO_CONFIG_BAD)
def test_without_config_json_bad_shapes_are_named(checkpoint, edit, says):
    message = refused(without_config(checkpoint, edit), says, n_head=4)
    assert str(checkpoint) in message


def test_without_config_json_n_head_must_suit_d_model(checkpoint):
    refused(without_config(checkpoint), "d_model=32 is not divisible by n_head=5", str(checkpoint), n_head=5)
    refused(checkpoint, "load_pretrained(n_head=...): n_head must be an integer, got 4.0", n_head=4.0)


def test_loading_without_config_json_with_n_head_gives_the_same_model(checkpoint, model):
    assert_same_weights(load_pretrained(without_config(checkpoint), n_head=4), model)


KEY = "transformer.h.1.attn.c_attn.weight"  # [32, 96] F32: 12288 bytes
HEADER_EDITS_BAD = {  # what the header edit does -> (edit, what the message says)
    "unknown dtype": (lambda h: h[KEY].update(dtype="F33"), f"tensor '{KEY}' has dtype 'F33', which is not a safetensors"),
    "dtype not a string": (lambda h: h[KEY].update(dtype=5), "has dtype 5"),
    "dtype of another size": (lambda h: h[KEY].update(dtype="F16"), "of dtype F16 and shape (32, 96) takes 6144 bytes"),
    "integer dtype": (lambda h: h[KEY].update(dtype="I32"), f"tensor {KEY} is I32, not floating point"),
    "shape and bytes disagree": (lambda h: h[KEY].update(shape=[32, 95]), "takes 12160 bytes, but its data_offsets"),
    "transposed shape": (lambda h: h[KEY].update(shape=[96, 32]),
                         f"{KEY} has shape (96, 32) in the file, the config needs (32, 96)"),
    "shape a string": (lambda h: h[KEY].update(shape="32x96"), "not a list of non-negative integers"),
    "negative shape": (lambda h: h[KEY].update(shape=[-32, -96]), "not a list of non-negative integers"),
    "float shape": (lambda h: h[KEY].update(shape=[32.0, 96]), "not a list of non-negative integers"),
    "bool shape": (lambda h: h[KEY].update(shape=[True, 12288]), "not a list of non-negative integers"),
    "reversed offsets": (lambda h: h[KEY].update(data_offsets=h[KEY]["data_offsets"][::-1]), "not a byte range"),
    "three offsets": (lambda h: h[KEY].update(data_offsets=[0, 1, 2]), "not a byte range"),
    "offsets out of range": (lambda h: h[KEY].update(data_offsets=[10**9, 10**9 + 12288]), "ends at byte 1000012288"),
    "overlapping offsets": (lambda h: [h[k].update(data_offsets=h["transformer.h.0.ln_1.weight"]["data_offsets"])
                                       for k in ["transformer.h.1.ln_1.weight"]], "overlap"),
    "a hole in the data": (lambda h: h.pop("transformer.h.0.ln_1.bias"), "belong to no tensor"),
    "entry not an object": (lambda h: h.update({KEY: 3}), f"header entry '{KEY}' is not an object"),
    "entry without offsets": (lambda h: h[KEY].pop("data_offsets"), "is not an object with dtype, shape and data_offsets"),
    "metadata not strings": (lambda h: h.update(__metadata__={"format": 1}), "its __metadata__ is not an object of strings"),
    "NaN in the header": (lambda h: h[KEY].update(shape=[float("nan")]), "its header is not valid JSON (NaN is not JSON)"),
}


@pytest.mark.parametrize("case", sorted(HEADER_EDITS_BAD))
def test_a_bad_header_edit_is_named(checkpoint, case):
    edit, says = HEADER_EDITS_BAD[case]
    path = checkpoint / "model.safetensors"
    header, _ = raw_safetensors(path)
    assert header["transformer.h.0.ln_1.weight"]["data_offsets"][0] < header["transformer.h.1.ln_1.weight"]["data_offsets"][0]
    edit_header(path, edit)
    refused(checkpoint, str(path), says)


RAW_FILES_BAD = {  # (header length, header text, trailing data) -> what the message says
    "duplicate keys": (None, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                             b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
                       "'a' appears more than once"),
    "length past the end": (10**6, b"{}", b"", "its header length 1000000 exceeds the file's"),
    "length past the limit": (2**64 - 1, b"{}", b"", "exceeds safetensors' limit of 100000000 bytes"),
    "length cuts the JSON": (5, b'{"__metadata__": {}}', b"", "its header is not valid JSON"),
    "header not an object": (None, b" []", b"", "does not start with a JSON object"),
    "header not UTF-8": (None, b'{"\xff": 1}', b"", "its header is not UTF-8"),
    "nested too deeply": (None, b"{" + b'"a":[' * 50_000, b"", "its header is not valid JSON"),
    "data after the tensors": (None, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 8,
                               "bytes 4..8 of the data belong to no tensor"),
    "fewer than 8 bytes": ("short", b"", b"", "fewer than the 8 of a safetensors header length"),
}


@pytest.mark.parametrize("case", sorted(RAW_FILES_BAD))
def test_a_malformed_file_is_named(checkpoint, case):
    n, text, data, says = RAW_FILES_BAD[case]
    path = checkpoint / "model.safetensors"
    if n == "short":
        path.write_bytes(b"\x05\x00\x00")
    else:
        path.write_bytes((len(text) if n is None else n).to_bytes(8, "little") + text + data)
    refused(checkpoint, str(path), "truncated or corrupt", says)


def test_a_header_padded_with_spaces_or_newlines_loads(checkpoint, model):
    path = checkpoint / "model.safetensors"
    header, data = raw_safetensors(path)
    write_raw(path, header, data, text=json.dumps(header, indent=1).encode() + b"\n \t")
    assert_same_weights(load_pretrained(checkpoint), model)


# 5. what save_pretrained writes: ordinary permissions, never a partial file

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_an_ordinary_files_permissions(tmp_path, model, umask, mode):
    old = os.umask(umask)
    try:
        save_pretrained(model, tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary file left


@pytest.mark.parametrize("fails", ["save_file", "config"])
def test_a_failed_save_leaves_the_old_checkpoint_whole(checkpoint, monkeypatch, fails):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}

    def crash_halfway(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    if fails == "save_file":
        monkeypatch.setattr(weights, "save_file", crash_halfway)
    else:
        monkeypatch.setattr(Path, "write_text", lambda self, text: crash_halfway(None, self))
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(seed=5), checkpoint)
    after = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    if fails == "config":  # the new weights were committed whole; config.json is the old one, whole
        assert after["config.json"] == before["config.json"]
        assert set(after) == set(before)
    else:
        assert after == before
