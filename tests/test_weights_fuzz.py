"""load_pretrained over generated corruptions of a small saved checkpoint.

Whatever is done to the files (truncations, header byte flips, header JSON edits of dtypes,
shapes and offsets, missing, extra and duplicated tensors, shards and their index, config.json
edits and wrong types), the outcome is one of two:
  * minigpt2's own CheckpointError, whose message names the checkpoint's file;
  * a model with the original's weights (same state dict), and the config the files state.
Never an exception from inside safetensors, json or torch, never a hang.

The corruptions are those a loader can see. Left out on purpose, since the result is a
valid checkpoint of another model: flipping bits of the tensor data, swapping the byte ranges
or the names of two same-shaped tensors, or casting F32 data to F16.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from safetensors.torch import load, save

from conftest import make_model
from minigpt2 import GPT2Config, load_pretrained, save_pretrained
from minigpt2.weights import CheckpointError

CFG = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=11, vocab_size=99)
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INDEX = "model.safetensors.index.json"


def _original():
    model = make_model(CFG, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return model, (Path(tmp) / "model.safetensors").read_bytes(), json.loads((Path(tmp) / "config.json").read_text())


MODEL, WEIGHTS, CONFIG = _original()
HEADER_LEN = int.from_bytes(WEIGHTS[:8], "little")
HEADER = json.loads(WEIGHTS[8:8 + HEADER_LEN])
DATA = WEIGHTS[8 + HEADER_LEN:]
KEYS = sorted(k for k in HEADER if k != "__metadata__")
TENSORS = load(WEIGHTS)


def note(what: str) -> None:
    """Tally outcomes for --hypothesis-show-statistics (outside @given, nothing to tally)."""
    with contextlib.suppress(InvalidArgument):
        event(what)


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def hung(signum, frame):
        raise Hung(f"load_pretrained ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(files: dict[str, bytes]) -> str:
    """Write the files into a fresh checkpoint directory and load it: refused, named, or the original."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "checkpoint"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        with time_limit(10):
            try:
                loaded = load_pretrained(d)
            except CheckpointError as e:
                message = str(e)
                assert str(d) in message, f"the message does not name the file: {message}"
                assert len(message) < 5000, message[:500]
                note(f"refused: {' '.join(message.replace(str(d), '').split()[:5])[:50]}")
                return "refused"
    want = MODEL.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # what the shapes determine is the original's; n_head and the epsilon are what config.json says
    assert GPT2Config(**{**loaded.cfg.to_dict(), "n_head": CFG.n_head, "layer_norm_eps": CFG.layer_norm_eps}) == CFG
    note("loaded")
    return "loaded"


def config_bytes(config=CONFIG) -> bytes:
    return json.dumps(config).encode()


def files_with(weights: bytes | None = None, config: bytes | None = None) -> dict[str, bytes]:
    return {"model.safetensors": WEIGHTS if weights is None else weights,
            "config.json": config_bytes() if config is None else config}


def raw(header: dict, data: bytes = DATA, pad: int = 0, length: int | None = None) -> bytes:
    h = json.dumps(header).encode() + b" " * pad
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


def test_the_original_loads():
    assert outcome(files_with()) == "loaded"


# ------------------------------------------------------------------ bytes

@settings(FUZZ, max_examples=25)
@given(st.integers(0, len(WEIGHTS) - 1))
def test_truncated_anywhere(n):
    assert outcome(files_with(WEIGHTS[:n])) == "refused"


@settings(FUZZ, max_examples=45)
@given(st.lists(st.tuples(st.integers(0, 8 + HEADER_LEN - 1), st.integers(1, 255)), min_size=1, max_size=3))
def test_header_bytes_flipped(flips):
    data = bytearray(WEIGHTS)
    for at, xor in flips:
        data[at] ^= xor
    outcome(files_with(bytes(data)))


# ------------------------------------------------------------------ header JSON edits

key = st.sampled_from(KEYS)
dtype = st.sampled_from(["F16", "BF16", "F64", "I32", "U32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64",
                         "F33", "f32", "", 5, None, ["F32"]])
any_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=4),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                        max_leaves=5)


def shape_edit(shape, how: str, k: int):
    if not (isinstance(shape, list) and all(type(s) is int for s in shape)):
        return shape  # an earlier edit made it something else already
    n = len(shape)
    return {
        "reverse": shape[::-1],
        "append 1": shape + [1],
        "prepend 1": [1] + shape,
        "drop": shape[:-1],
        "scale": ([shape[0] * 2, shape[1] // 2] if n == 2 and shape[1] % 2 == 0 else shape + [2]),
        "bump": [s + k for s in shape],
        "negative": [-s for s in shape] or [-1],
        "float": [float(s) for s in shape] or [1.0],
        "not a list": str(shape),
    }[how]


def on_entry(k: str, edit):
    """Apply ``edit`` to header entry ``k``, if it is still there (an earlier edit may have removed it)."""
    return lambda h: edit(h[k]) if isinstance(h.get(k), dict) else None


@st.composite
def header_edit(draw):
    """One edit of the header, as (description, function header -> None); never an offsets edit."""
    kind = draw(st.sampled_from(["dtype", "shape", "rename", "delete", "duplicate", "metadata", "entry"]))
    k = draw(key)
    if kind == "dtype":
        value = draw(dtype)
        return kind, on_entry(k, lambda e: e.update(dtype=value))
    if kind == "shape":
        how, bump = draw(st.sampled_from(["reverse", "append 1", "prepend 1", "drop", "scale", "bump", "negative",
                                          "float", "not a list"])), draw(st.integers(1, 3))
        return kind, on_entry(k, lambda e: e.update(shape=shape_edit(e.get("shape"), how, bump)))
    if kind == "rename":  # to the hub's layout (the same tensor), to a name that is no GPT-2 tensor, or onto another
        to = draw(st.sampled_from(["hub", "blocks.0.x", "transformer.h.2.ln_1.weight", "h.0.attn.rotary", "", "other"]))
        other = draw(key)

        def rename(h):
            if k in h:
                new = {"hub": k.removeprefix("transformer."), "other": other}.get(to, to)
                h[new] = h.pop(k)
        return kind, rename
    if kind == "delete":
        return kind, lambda h: h.pop(k, None)
    if kind == "duplicate":  # the same bytes under a second name: overlapping ranges
        name = draw(st.sampled_from([k.removeprefix("transformer."), "lm_head.weight", "transformer.h.0.attn.bias"]))
        return kind, lambda h: h.update({name: dict(h[k])}) if isinstance(h.get(k), dict) else None
    if kind == "metadata":
        value = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), any_json))
        return kind, lambda h: h.update(__metadata__=value)
    value = draw(any_json)  # an entry replaced by any JSON at all
    return kind, lambda h: h.update({k: value})


@st.composite
def offsets_edit(draw):
    """One edit of one tensor's byte range: shifted, copied from another (overlap), reversed, out of range, malformed."""
    k, other = draw(key), draw(key)
    how = draw(st.sampled_from(["shift", "copy", "reverse", "grow", "past the end", "three", "float", "not a list"]))
    d = draw(st.integers(1, 80)) * draw(st.sampled_from([1, -1]))

    def edit(h):
        offsets = h[k].get("data_offsets") if isinstance(h.get(k), dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return  # an earlier edit made the entry something else already
        b, e = offsets
        if how == "copy" and isinstance(h.get(other), dict) and "data_offsets" in h[other]:  # else left as it is
            h[k]["data_offsets"] = list(h[other]["data_offsets"])
        else:
            h[k]["data_offsets"] = {"shift": [b + d, e + d], "reverse": [e, b], "grow": [b, e + abs(d)],
                                    "past the end": [len(DATA) + abs(d), len(DATA) + abs(d) + e - b],
                                    "three": [b, e, e], "float": [float(b), float(e)],
                                    "copy": [b, e], "not a list": f"{b}-{e}"}[how]
    return "offsets " + how, edit


@settings(FUZZ, max_examples=60)
@given(st.lists(header_edit(), max_size=3), st.one_of(st.none(), offsets_edit()),
       st.sampled_from(["fit", "stale length", "padded"]), st.integers(0, 300))
def test_header_json_edited(edits, offsets, length, pad):
    header = json.loads(json.dumps(HEADER))
    for _, edit in edits:
        edit(header)
    before = json.dumps(header)
    if offsets:
        offsets[1](header)
    text = json.dumps(header).encode()
    data = raw(header, pad=pad if length == "padded" else 0, length=HEADER_LEN if length == "stale length" else None)
    result = outcome(files_with(data))
    if json.dumps(header) != before or (length == "stale length" and len(text) != HEADER_LEN):
        assert result == "refused"  # a byte range moved, or the header length is wrong: never loads


# ------------------------------------------------------------------ tensors missing, extra, duplicated, cast; shards

@st.composite
def tensor_edit(draw):
    kind = draw(st.sampled_from(["drop", "extra", "hub duplicate", "lm_head", "mask buffer", "cast", "reshape",
                                 "values_nan", "values_inf"]))
    k = draw(key)
    if kind.startswith("values_"):  # a weight holding NaN or +-inf: refused, named, never loaded
        value = draw(st.sampled_from([math.nan] if kind == "values_nan" else [math.inf, -math.inf]))
        at = draw(st.integers(0, TENSORS[k].numel() - 1))
        return lambda sd: sd[k].view(-1).__setitem__(at, value) if k in sd else None
    if kind == "drop":
        return lambda sd: sd.pop(k, None)
    if kind == "extra":
        name = draw(st.sampled_from(["transformer.h.2.ln_1.weight", "transformer.h.0.attn.rotary.weight", "blocks.0.x",
                                     "transformer.wte.weight.T", "h.01.ln_1.weight"]))
        return lambda sd: sd.update({name: torch.zeros(3)})
    if kind == "hub duplicate":  # the same tensor also (or, if k is dropped, only) under the hub's name
        return lambda sd: sd.update({k.removeprefix("transformer."): TENSORS[k].clone()})
    if kind == "lm_head":  # tied (loads) or not (refused)
        tied = draw(st.booleans())
        wte = TENSORS["transformer.wte.weight"]
        return lambda sd: sd.update({"lm_head.weight": wte.clone() if tied else wte.flip(0)})
    if kind == "mask buffer":  # the hub file's causal-mask buffers are skipped, whatever their dtype
        dt = draw(st.sampled_from([torch.float32, torch.bool, torch.uint8]))
        return lambda sd: sd.update({"h.1.attn.bias": torch.ones(1, 1, 11, 11).tril().to(dt)})
    if kind == "cast":  # F64 holds F32 exactly (loads); integers and booleans are refused
        dt = draw(st.sampled_from([torch.float64, torch.int32, torch.int64, torch.int8, torch.bool]))
        return lambda sd: sd.update({k: TENSORS[k].to(dt)}) if k in sd else None  # from the original: int->F64 loses
    shape = draw(st.sampled_from([(-1,), (1, -1), (-1, 1)]))
    return lambda sd: sd.update({k: sd[k].reshape(shape)}) if k in sd else None


@settings(FUZZ, max_examples=30)
@given(st.lists(tensor_edit(), min_size=1, max_size=3))
def test_tensors_edited(edits):
    sd = {k: v.clone() for k, v in TENSORS.items()}
    for edit in edits:
        edit(sd)
    result = outcome(files_with(save(sd, metadata={"format": "pt"})))
    if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in sd.values()):
        assert result == "refused"


@settings(FUZZ, max_examples=15)
@given(st.integers(1, len(KEYS) - 1), st.sampled_from(["as is", "duplicate", "index omits", "index misplaces",
                                                        "outside", "no weight_map", "not json", "single too"]))
def test_sharded(split, how):
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    parts = {first: KEYS[:split], second: KEYS[split:]}
    shards = {name: {k: TENSORS[k] for k in keys} for name, keys in parts.items()}
    weight_map = {k: name for name, keys in parts.items() for k in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    if how == "duplicate":
        shards[second][KEYS[0]] = TENSORS[KEYS[0]] * 2
    elif how == "index omits":
        del weight_map[KEYS[0]]
    elif how == "index misplaces":
        weight_map[KEYS[0]] = second
    elif how == "outside":
        weight_map[KEYS[0]] = "../" + first
    elif how == "no weight_map":
        del index["weight_map"]
    files = {name: save(sd) for name, sd in shards.items()}
    files[INDEX] = b"{ not json" if how == "not json" else json.dumps(index).encode()
    files["config.json"] = config_bytes()
    if how == "single too":
        files["model.safetensors"] = WEIGHTS
    assert outcome(files) == ("loaded" if how == "as is" else "refused")


# ------------------------------------------------------------------ config.json

FIELDS = ["n_layer", "n_head", "n_embd", "n_inner", "n_positions", "n_ctx", "vocab_size", "layer_norm_epsilon",
          "activation_function", "scale_attn_weights", "tie_word_embeddings", "model_type", "unknown_field"]
near = st.sampled_from([0, -1, 1, 2, 3, 4, 8, 11, 16, 24, 32, 99, 98, 100, 10**5, 10**12, 2**63, 10**400,
                        2.0, 16.0, 1e-5, 1e-6, 0.5, 1.0, 1e300, math.nan, math.inf, -math.inf,
                        True, False, None, "16", "gelu_new", "relu", [16], {}])
value = st.one_of(near, any_json)


@st.composite
def config_edit(draw):
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "whole"]))
    field = draw(st.sampled_from(FIELDS))
    if kind == "set":
        v = draw(value)
        return lambda c: c.update({field: v}) if isinstance(c, dict) else c
    if kind == "delete":
        return lambda c: c.pop(field, None) if isinstance(c, dict) else c
    whole = draw(any_json)
    return lambda c: ("replace", whole)


@settings(FUZZ, max_examples=40)
@given(st.lists(config_edit(), min_size=1, max_size=3), st.sampled_from(["json"] * 5 + ["not utf-8", "absent", "garbage"]))
def test_config_edited(edits, form):
    config = json.loads(json.dumps(CONFIG))
    for edit in edits:
        result = edit(config)
        if isinstance(result, tuple):
            config = result[1]
    files = files_with()
    if form == "absent":
        del files["config.json"]  # n_head cannot be inferred: refused
    elif form == "not utf-8":
        files["config.json"] = b"\xff\xfe" + config_bytes(config)
    elif form == "garbage":
        files["config.json"] = config_bytes(config)[: len(config_bytes(config)) // 2]
    else:
        files["config.json"] = config_bytes(config)
    result = outcome(files)
    if result == "loaded":
        n_head = config.get("n_head") if isinstance(config, dict) else None
        assert form == "json" and n_head in (1, 2, 4, 8, 16) and type(n_head) is int


@pytest.mark.parametrize("n_head", [1, 2, 4, 8, 16])
def test_a_valid_n_head_in_config_json_is_believed(n_head):
    """No tensor shape shows n_head: the config says it, and is taken at its word."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(WEIGHTS)
        (Path(tmp) / "config.json").write_bytes(config_bytes({**CONFIG, "n_head": n_head}))
        assert load_pretrained(tmp).cfg.n_head == n_head
