"""Hugging Face GPT-2 checkpoints in and out: the one boundary foreign weights cross.

Two layouts are met in the wild and both load:
  * the hub's openai-community/gpt2 file: keys without prefix (``h.0.attn.c_attn.weight``),
    with ``attn.bias`` / ``attn.masked_bias`` causal-mask buffers, which are skipped;
  * what transformers' ``save_pretrained`` writes: keys under ``transformer.``, with
    ``lm_head.weight`` present or left out as tied to ``wte.weight``.

The Conv1D rule: GPT-2 stores the weights of c_attn, c_proj and c_fc as [in, out];
minigpt2 uses nn.Linear, [out, in], so these (and only these) are transposed.

Only safetensors are read: a pickle (.bin, .pt) can run code when loaded.

Nothing is trusted before it is checked, and nothing is built before the checks pass:
every file must be a regular file; each safetensors header is parsed and validated here
(dtypes, shapes against byte ranges, offsets that tile the data exactly) before
safetensors reads a byte of data; every tensor must be a floating-point weight of the key
table below, present once; the config (config.json, or the shapes plus an explicit
``n_head``) must match every tensor's shape. Whatever is wrong raises
:class:`CheckpointError`, whose message names the file, the problem and the fix.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import CONFIG_FIX, ConfigError, GPT2Config, check_int, read_json
from .fileio import WriteError, atomic_write, checksum_problems, json_text, load_json, parse_json

if TYPE_CHECKING:  # the model imports this module (PretrainedMixin): no import back at run time
    from .model import GPT2


class CheckpointError(ValueError):
    """A checkpoint minigpt2 refuses to read or write; the message names the file, what is wrong, and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint, or a shard of one, where one was expected."""


# ------------------------------------------------------------------------------ the key table

class Entry(NamedTuple):
    ours: str  # minigpt2's name (under blocks.{i}. for a per-layer entry)
    shape: Callable[[GPT2Config], tuple[int, ...]]  # the shape in the Hugging Face file
    conv1d: bool = False  # stored [in, out] by GPT-2's Conv1D; minigpt2's nn.Linear holds [out, in]


def _d(c: GPT2Config) -> tuple[int, ...]:
    return (c.d_model,)


# The Hugging Face GPT-2 layout, all of it: renaming a module of minigpt2 means editing its name here.
# Per-layer keys are under h.{i}. in the file (transformer.h.{i}. as transformers writes them) and
# under blocks.{i}. in minigpt2.
LAYER_KEYS: dict[str, Entry] = {
    "ln_1.weight": Entry("ln1.weight", _d),
    "ln_1.bias": Entry("ln1.bias", _d),
    "attn.c_attn.weight": Entry("attn.c_attn.weight", lambda c: (c.d_model, 3 * c.d_model), conv1d=True),
    "attn.c_attn.bias": Entry("attn.c_attn.bias", lambda c: (3 * c.d_model,)),
    "attn.c_proj.weight": Entry("attn.c_proj.weight", lambda c: (c.d_model, c.d_model), conv1d=True),
    "attn.c_proj.bias": Entry("attn.c_proj.bias", _d),
    "ln_2.weight": Entry("ln2.weight", _d),
    "ln_2.bias": Entry("ln2.bias", _d),
    "mlp.c_fc.weight": Entry("mlp.c_fc.weight", lambda c: (c.d_model, c.d_mlp), conv1d=True),
    "mlp.c_fc.bias": Entry("mlp.c_fc.bias", lambda c: (c.d_mlp,)),
    "mlp.c_proj.weight": Entry("mlp.c_proj.weight", lambda c: (c.d_mlp, c.d_model), conv1d=True),
    "mlp.c_proj.bias": Entry("mlp.c_proj.bias", _d),
}
MODEL_KEYS: dict[str, Entry] = {  # outside the layers: under transformer. in the file
    "wte.weight": Entry("wte.weight", lambda c: (c.vocab_size, c.d_model)),
    "wpe.weight": Entry("wpe.weight", lambda c: (c.n_ctx, c.d_model)),
    "ln_f.weight": Entry("ln_final.weight", _d),
    "ln_f.bias": Entry("ln_final.bias", _d),
}
SKIPPED_LAYER_KEYS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old releases, not weights
LM_HEAD = "lm_head.weight"  # tied to wte.weight: read only to check that it is
HF_PREFIX = "transformer."
HF_LAYER = re.compile(r"h\.(0|[1-9][0-9]*)\.(.+)")
OURS_LAYER = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(.+)")
_OURS_TO_HF_LAYER = {e.ours: k for k, e in LAYER_KEYS.items()}
_OURS_TO_HF_MODEL = {e.ours: k for k, e in MODEL_KEYS.items()}


class Key(NamedTuple):
    kind: str  # "weight", "lm_head", "skip" or "unknown"
    hf: str  # canonical Hugging Face name (transformer.-prefixed), or the key as given if unknown
    ours: str | None = None
    entry: Entry | None = None
    layer: int | None = None


def classify(key: str) -> Key:
    """What a key of a Hugging Face GPT-2 file is, by the table above."""
    bare = key.removeprefix(HF_PREFIX)
    if bare == LM_HEAD:
        return Key("lm_head", LM_HEAD)
    m = HF_LAYER.fullmatch(bare)
    if m and m[2] in SKIPPED_LAYER_KEYS:
        return Key("skip", HF_PREFIX + bare)
    if m and m[2] in LAYER_KEYS:
        entry = LAYER_KEYS[m[2]]
        return Key("weight", HF_PREFIX + bare, f"blocks.{m[1]}.{entry.ours}", entry, int(m[1]))
    if not m and bare in MODEL_KEYS:
        return Key("weight", HF_PREFIX + bare, MODEL_KEYS[bare].ours, MODEL_KEYS[bare])
    return Key("unknown", key)


def hf_to_ours(key: str) -> str | None:
    """A Hugging Face GPT-2 key -> minigpt2's, or None for a skipped buffer (and the tied lm_head)."""
    k = classify(key)
    if k.kind == "unknown":
        raise CheckpointError(f"{key} is not a tensor of GPT-2 (see LAYER_KEYS and MODEL_KEYS in minigpt2/weights.py)")
    return k.ours


def ours_to_hf(key: str) -> str:
    """A minigpt2 key -> the Hugging Face key transformers writes."""
    m = OURS_LAYER.fullmatch(key)
    if m and m[2] in _OURS_TO_HF_LAYER:
        return f"{HF_PREFIX}h.{m[1]}.{_OURS_TO_HF_LAYER[m[2]]}"
    if not m and key in _OURS_TO_HF_MODEL:
        return HF_PREFIX + _OURS_TO_HF_MODEL[key]
    raise CheckpointError(f"minigpt2's tensor {key} has no Hugging Face name: the key table in "
                          "minigpt2/weights.py (LAYER_KEYS, MODEL_KEYS) is out of date with minigpt2/model.py")


def hf_shapes(cfg: GPT2Config, n_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds: canonical Hugging Face key -> shape in the file
    (of the first ``n_layers`` layers only, if given: a config may claim absurdly many)."""
    shapes = {HF_PREFIX + k: e.shape(cfg) for k, e in MODEL_KEYS.items()}
    for i in range(cfg.n_layer if n_layers is None else min(n_layers, cfg.n_layer)):
        shapes |= {f"{HF_PREFIX}h.{i}.{k}": e.shape(cfg) for k, e in LAYER_KEYS.items()}
    return shapes


# ------------------------------------------------------------------------------ messages

PICKLE_HINT = (
    "minigpt2 reads safetensors only: unpickling a checkpoint can run arbitrary code. "
    "Convert it once, where you trust the file: "
    "python -c \"import torch; from safetensors.torch import save_file; "
    "sd = torch.load('pytorch_model.bin', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\""
)
RESTORE_HINT = "Restore it (git checkout weights/ for the bundled models) or download it again."
N_HEAD_HINT = ("add the config.json that came with the weights beside them, "
               "or pass the number of heads: load_pretrained(path, n_head=...)")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _corrupt(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{file} is not a readable safetensors file ({problem}): it is truncated or corrupt. "
                           f"{RESTORE_HINT}")


@contextmanager
def _as_checkpoint_error(fix: str = ""):
    """config.py raises ConfigError; load_pretrained's callers catch one class, CheckpointError."""
    try:
        yield
    except ConfigError as e:
        raise CheckpointError(f"{e}{'. ' + fix if fix else ''}") from e


# ------------------------------------------------------------------------------ files

def _file_kind(path: Path) -> str | None:
    """"file", "dir", or None when nothing is there. A broken symlink, a FIFO (which would block
    a reader forever), a socket or a device is refused, named."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path} is a symlink that does not resolve ({e.strerror}: dangling or looping); "
                              "point it at the real file or remove it") from None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    raise CheckpointError(f"{path} is not a regular file (a FIFO, socket or device); replace it with the file itself")


def _optional_file(path: Path) -> Path | None:
    kind = _file_kind(path)
    if kind == "dir":
        raise CheckpointError(f"{path} is a directory, not a file; remove it or replace it with the file")
    return path if kind == "file" else None


def _read_json(path: Path, fix: str):
    return read_json(path, fix=fix, error=CheckpointError)


INDEX = "model.safetensors.index.json"


def _shard_name_ok(name) -> bool:
    """A shard named by the index must lie inside the checkpoint directory (a name, not a path out)."""
    return (isinstance(name, str) and name != "" and "\x00" not in name and not os.path.isabs(name)
            and ".." not in Path(name).parts and Path(name).name not in ("", "."))


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor key -> shard file name, each checked."""
    fix = "restore it (it lists the shard that holds each tensor), or download it again"
    d = _read_json(index, fix)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map (an object from each tensor's name to its shard file); {fix}")
    for key, shard in weight_map.items():
        if not _shard_name_ok(shard):
            raise CheckpointError(f"{index} puts {key} in {shard!r}, which is not a file inside {index.parent}: "
                                  f"the index may only name shards beside it; {fix}")
    return weight_map


@dataclass
class Layout:
    files: list[Path]  # the safetensors files, one or the shards
    config: Path | None  # config.json, if there is one
    index: Path | None = None
    weight_map: dict[str, str] | None = None


def locate(path: str | os.PathLike) -> Layout:
    """The safetensors file(s) of a checkpoint, its config.json if any, and its index if sharded."""
    path = Path(path)
    kind = _file_kind(path)
    if kind is None:
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: expected a directory with model.safetensors and config.json, "
            "or a .safetensors file"
        )
    if kind == "file":
        return Layout([path], _optional_file(path.with_name("config.json")))
    config = _optional_file(path / "config.json")
    index, single = _optional_file(path / INDEX), _optional_file(path / "model.safetensors")
    if index and single:
        raise CheckpointError(f"{path} holds both model.safetensors and {INDEX}: which one is the model is "
                              "ambiguous; remove the stale one")
    if index:
        weight_map = read_index(index)
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if _optional_file(f) is None]
        if missing:
            raise CheckpointNotFoundError(f"{index} names shards that are missing: {missing}. {RESTORE_HINT}")
        return Layout(files, config, index, weight_map)
    if single:
        return Layout([single], config)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path} holds only {pickles}. {PICKLE_HINT}")
    raise CheckpointNotFoundError(
        f"{path} has no model.safetensors (nor {INDEX}). For GPT-2 itself, place "
        "openai-community/gpt2's model.safetensors and config.json there; for the bundled models, "
        "restore them with git checkout weights/"
    )


# ------------------------------------------------------------------------------ safetensors headers

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_bytes(file: Path) -> tuple[bytes, int]:
    """The JSON header of a safetensors file and the length of its data section."""
    if file.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{file} looks like a PyTorch pickle. {PICKLE_HINT}")
    if _file_kind(file) != "file":
        raise CheckpointError(f"{file} is not a file. {RESTORE_HINT}")
    try:
        size = os.stat(file).st_size
        with open(file, "rb") as f:
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
            # The format decides: a header length that fits the file, and a JSON object after it.
            if n is not None and 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{":
                f.seek(8)
                return f.read(n), size - 8 - n
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None
    what = _foreign_kind(file, head)
    if what is not None:
        raise CheckpointError(f"{file} is {what}")
    if n is None:
        raise _corrupt(file, f"{size} bytes, fewer than the 8 of a safetensors header length")
    if n > MAX_HEADER_BYTES:
        raise _corrupt(file, f"its header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
    if n > size - 8:
        raise _corrupt(file, f"its header length {n} exceeds the file's {size} bytes")
    raise _corrupt(file, f"its header (length {n}) does not start with a JSON object")


LFS_POINTER = b"version https://git-lfs"


def _foreign_kind(file: Path, head: bytes) -> str | None:
    """What a file that is not safetensors is, when it is something recognisable, with the fix."""
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return f"a pickle (torch.save), not safetensors. {PICKLE_HINT}"
    try:
        with open(file, "rb") as f:
            start = f.read(200)
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
    except OSError:
        return None
    if start.startswith(LFS_POINTER):
        return ("a Git LFS pointer (a small text file standing for the weights), not the weights themselves: "
                "fetch them with `git lfs pull` in the repository that holds it (git lfs install first), "
                "or download the file again")
    if start[:1] in (b"(", b"}", b"]") and last == b".":  # pickle protocols 0 and 1 end with STOP, "."
        return f"a pickle (protocol 0 or 1), not safetensors. {PICKLE_HINT}"
    if start.lstrip()[:1] in (b"{", b"["):
        return ("a JSON file (a config.json or an index?), not safetensors weights: pass the directory that "
                "holds model.safetensors and config.json, or the .safetensors file itself")
    return None


def _tensor_info(file: Path, key: str, d) -> TensorInfo:
    if not isinstance(d, dict) or not {"dtype", "shape", "data_offsets"} <= set(d):
        raise _corrupt(file, f"header entry {key!r} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _corrupt(file, f"tensor {key!r} has dtype {dtype!r}, which is not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _corrupt(file, f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _corrupt(file, f"tensor {key!r} has data_offsets {offsets!r}, not a byte range [begin, end]")
    nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(file, f"tensor {key!r} of dtype {dtype} and shape {tuple(shape)} takes {nbytes} bytes, "
                             f"but its data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(file: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The byte ranges must tile the data section exactly: no overlap, no gap, nothing past the end."""
    for key, t in tensors.items():
        if t.end > data_len:
            raise _corrupt(file, f"tensor {key!r} ends at byte {t.end} of a data section of {data_len} bytes")
    cursor, previous = 0, None
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < cursor:
            raise _corrupt(file, f"tensors {previous!r} and {key!r} overlap (bytes {t.begin}..{cursor})")
        if t.begin > cursor:
            raise _corrupt(file, f"bytes {cursor}..{t.begin} of the data belong to no tensor")
        cursor, previous = t.end, key
    if cursor != data_len:
        raise _corrupt(file, f"bytes {cursor}..{data_len} of the data belong to no tensor")


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, validated as safetensors would, without reading their data."""
    raw, data_len = _header_bytes(file)
    try:
        header = parse_json(raw.rstrip(b" \t\r\n"), "its header", allow_nan=False, error=ConfigError)
    except ConfigError as e:
        raise _corrupt(file, str(e)) from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, "its __metadata__ is not an object of strings")
    tensors = {key: _tensor_info(file, key, d) for key, d in header.items()}
    _check_tiling(file, tensors, data_len)
    return tensors


def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (any dtype, any names: an optimizer's state, say), after
    the checks load_pretrained makes of a file: a regular file, recognised by its format (not by its
    first byte), its header validated. Whatever is wrong raises CheckpointError naming the file."""
    file = Path(file)
    read_header(file)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _corrupt(file, f"safetensors could not read it: {e}") from e


# ------------------------------------------------------------------------------ a checkpoint, scanned

class TensorRef(NamedTuple):
    file: Path
    key: str  # as in the file
    info: TensorInfo
    name: Key


@dataclass
class Scan:
    """What a checkpoint holds, from its headers alone: no tensor data read, no module built."""
    source: Path
    layout: Layout
    weights: dict[str, TensorRef]  # canonical Hugging Face key -> where it is
    lm_head: TensorRef | None
    unknown: list[str]  # keys that are no tensor of GPT-2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.info.shape for k, r in self.weights.items()}

    def add(self, ref: TensorRef) -> None:
        kind = ref.name.kind
        if kind == "unknown":
            self.unknown.append(ref.key)  # reported with the config check, beside what is missing
        elif kind != "skip":
            seen = self.lm_head if kind == "lm_head" else self.weights.get(ref.name.hf)
            if seen is not None:
                _refuse_duplicate(seen, ref)
            _refuse_non_float(ref)
            if kind == "lm_head":
                self.lm_head = ref
            else:
                self.weights[ref.name.hf] = ref


def _refuse_duplicate(seen: TensorRef, ref: TensorRef) -> None:
    where = "under both key layouts" if seen.key != ref.key else "twice"
    raise CheckpointError(f"{ref.name.hf} is in the checkpoint {where}: {seen.key} in {seen.file} and {ref.key} "
                          f"in {ref.file}; which one is the weight is ambiguous: keep one and re-save the checkpoint")


def _refuse_non_float(ref: TensorRef) -> None:
    if ref.info.dtype not in FLOAT_DTYPES.values():
        raise CheckpointError(f"{ref.file}: tensor {ref.key} is {ref.info.dtype}, not floating point: minigpt2 loads "
                              f"weights stored as {', '.join(FLOAT_DTYPES.values())} and casts no integers or "
                              "booleans; re-save the checkpoint with floating-point weights")


def _check_index(layout: Layout, headers: dict[Path, dict[str, TensorInfo]]) -> None:
    """Each tensor where the index says it is, and nothing in a shard that the index does not name."""
    where = {key: layout.index.parent / name for key, name in layout.weight_map.items()}
    for file, tensors in headers.items():
        for key in tensors:
            if where.get(key) != file:
                said = f"puts it in {where[key]}" if key in where else "does not list it"
                raise CheckpointError(f"{file} holds {key}, but {layout.index} {said}; "
                                      "the index and the shards disagree: restore them together")
    for key, file in where.items():
        if key not in headers[file]:
            raise CheckpointError(f"{layout.index} puts {key} in {file}, which does not hold it; "
                                  "the index and the shards disagree: restore them together")


def verify_checksums(layout: Layout) -> None:
    """Where complete.json (what train.py and finetune.publish write beside the weights) records
    sha256 checksums, the weights and config must match them: a file corrupted in place, at its
    own size, is refused, named. (Hashing costs about 1.7 ms per MB here: 0.04 s for a bundled model,
    0.9 s for GPT-2 small's 548 MB; see BENCHMARKS.md.)"""
    folder = layout.files[0].parent
    names = [f.name for f in layout.files] + ([layout.config.name] if layout.config else [])
    try:
        bad = checksum_problems(folder, names)
    except ValueError as e:
        raise CheckpointError(f"{e}. Fix: restore the directory, or remove its complete.json") from None
    if bad:
        raise CheckpointError(f"{folder}: {'; '.join(bad)} (corrupted or replaced since it was written). "
                              f"{RESTORE_HINT}")


def scan(path: str | os.PathLike) -> Scan:
    """Locate a checkpoint and validate every header; each tensor must be one of GPT-2's, present once, float."""
    layout = locate(path)
    verify_checksums(layout)
    headers = {file: read_header(file) for file in layout.files}
    s = Scan(Path(path), layout, weights={}, lm_head=None, unknown=[])
    for file, tensors in headers.items():
        for key, info in tensors.items():
            s.add(TensorRef(file, key, info, classify(key)))
    if layout.index:
        _check_index(layout, headers)
    return s


# ------------------------------------------------------------------------------ the config

def _file_layers(shapes: dict[str, tuple[int, ...]]) -> list[int]:
    return sorted({k.layer for k in map(classify, shapes) if k.layer is not None})


GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # d_model -> n_head of gpt2, -medium, -large, -xl


def infer_config(s: Scan, n_head: int | None) -> GPT2Config:
    """A config from what the tensor shapes determine (n_layer, d_model, d_mlp, n_ctx, vocab_size),
    plus ``n_head``, which no shape shows: it must be given."""
    shapes, source = s.shapes(), s.source
    need = [HF_PREFIX + "wte.weight", HF_PREFIX + "wpe.weight", HF_PREFIX + "h.0.mlp.c_fc.weight"]
    wte = shapes.get(need[0])
    if n_head is None:
        d_model = wte[1] if wte is not None and len(wte) == 2 else None
        hint = (f" (if these are OpenAI's GPT-2 weights, of d_model {d_model}: n_head={GPT2_HEADS[d_model]})"
                if d_model in GPT2_HEADS else "")
        raise CheckpointError(f"{source} has no config.json, and the number of heads cannot be read from "
                              f"tensor shapes: {N_HEAD_HINT}{hint}")
    for key in need:
        if key not in shapes:
            other = f"; the file's keys include {s.unknown[:3]}, which are not GPT-2's" if s.unknown else ""
            raise CheckpointError(f"{source} has no config.json and no tensor {key} to infer the config "
                                  f"from{other}: add its config.json, or pass load_pretrained(path, config=GPT2Config(...))")
        if len(shapes[key]) != 2:
            raise CheckpointError(f"{source}: {key} has shape {shapes[key]}, not the 2-D shape of GPT-2's; "
                                  f"is it a GPT-2 checkpoint? {RESTORE_HINT}")
    (vocab, d_model), (n_ctx, _), (_, d_mlp) = (shapes[k] for k in need)
    try:
        return GPT2Config(n_layer=1 + _file_layers(shapes)[-1], n_head=n_head, d_model=d_model, d_mlp=d_mlp,
                          n_ctx=n_ctx, vocab_size=vocab)
    except ConfigError as e:
        raise CheckpointError(f"{source} has no config.json, and its tensor shapes make no valid config ({e}); "
                              "add its config.json") from e


def resolve_config(s: Scan, config: GPT2Config | None = None, n_head: int | None = None) -> GPT2Config:
    """``config`` if given, else config.json, else the shapes plus ``n_head``; n_head, if given, must agree."""
    if n_head is not None:
        with _as_checkpoint_error():
            n_head = check_int(n_head, "n_head", "load_pretrained(n_head=...)")
    if config is not None:
        if not isinstance(config, GPT2Config):
            raise CheckpointError(f"load_pretrained(config=...) takes a GPT2Config, got {type(config).__name__}")
        cfg, source = config, "config="
    elif s.layout.config is not None:
        with _as_checkpoint_error(f"Fix {s.layout.config} to describe the weights beside it, or restore it"):
            cfg = GPT2Config.from_hf_dict(_read_json(s.layout.config, CONFIG_FIX), source=str(s.layout.config))
        source = str(s.layout.config)
    else:
        return infer_config(s, n_head)
    if n_head is not None and n_head != cfg.n_head:
        raise CheckpointError(f"load_pretrained(n_head={n_head}) contradicts {source}, which says n_head={cfg.n_head}: "
                              "drop n_head=, or pass config= with the config you mean")
    return cfg


def check_config(cfg: GPT2Config, s: Scan, config_source: str) -> None:
    """Every tensor the config needs, with its shape, and nothing else: from the headers, before any
    module is built (so that a config of 10^5 layers costs nothing)."""
    shapes = s.shapes()
    layers = _file_layers(shapes)
    listed = min(cfg.n_layer, (layers[-1] if layers else -1) + 2)  # one absent layer is listed, the rest counted
    want = hf_shapes(cfg, n_layers=listed)
    missing = [k for k in want if k not in shapes]
    n_missing = len(missing) + (cfg.n_layer - listed) * len(LAYER_KEYS)
    beyond = [k for k, layer in ((k, classify(k).layer) for k in shapes) if layer is not None and layer >= cfg.n_layer]
    unexpected = beyond + s.unknown
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing[:8]}" + (f" ... ({n_missing} in all)" if n_missing > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    wrong = [f"{k} has shape {shapes[k]} in the file, the config needs {want[k]}"
             for k in want if k in shapes and shapes[k] != want[k]]
    problems += wrong[:8] + ([f"... ({len(wrong)} mis-shaped in all)"] if len(wrong) > 8 else [])
    if s.lm_head is not None and shapes.get(HF_PREFIX + "wte.weight") != s.lm_head.info.shape:
        problems.append(f"{s.lm_head.key} has shape {s.lm_head.info.shape}, wte.weight "
                        f"{shapes.get(HF_PREFIX + 'wte.weight')}: minigpt2 ties its unembedding to the token embedding")
    if problems:
        files = s.layout.files[0] if len(s.layout.files) == 1 else f"{s.source} (shards {[f.name for f in s.layout.files]})"
        raise CheckpointError(
            f"{files} does not match the model config ({cfg}, from {config_source}):\n  " + "\n  ".join(problems)
            + "\nFix the config to match the weights, or restore the weights if they are incomplete.")


# ------------------------------------------------------------------------------ tensors

def _read_tensors(s: Scan) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The weights under minigpt2's names and layout (Conv1D transposed), in the file's dtype."""
    refs = list(s.weights.values()) + ([s.lm_head] if s.lm_head else [])
    out, lm_head = {}, None
    for file in s.layout.files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for ref in (r for r in refs if r.file == file):
                    t = f.get_tensor(ref.key)
                    if ref.name.kind == "lm_head":
                        lm_head = t
                    else:
                        out[ref.name.ours] = t.T.contiguous() if ref.name.entry.conv1d else t
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise _corrupt(file, f"safetensors could not read it: {e}") from e
    return out, lm_head


def _check_tied(s: Scan, sd: dict[str, torch.Tensor], lm_head: torch.Tensor | None) -> None:
    wte = sd.get("wte.weight")
    if lm_head is not None and wte is not None and not (lm_head.shape == wte.shape and torch.equal(lm_head, wte)):
        raise CheckpointError(
            f"{s.lm_head.file}: lm_head.weight differs from wte.weight; minigpt2's GPT-2 ties its unembedding to "
            "the token embedding, so an untied head cannot be loaded"
        )


def _check_finite(s: Scan, sd: dict[str, torch.Tensor]) -> None:
    """Weights holding NaN or inf are refused, named (by their name in the file): such a model
    computes NaN everywhere, and a load that succeeds would hide where it came from."""
    bad = [_hf_name(k) for k in non_finite(sd)]
    _refuse_non_finite(bad, str(s.layout.files[0] if len(s.layout.files) == 1 else s.source),
                       "Fix: restore the file, or an earlier checkpoint of the run (the training diverged)")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path | None]:
    """All tensors of a checkpoint, under minigpt2's names and layout, plus its config path."""
    s = scan(path)
    sd, lm_head = _read_tensors(s)
    _check_tied(s, sd, lm_head)
    _check_finite(s, sd)
    return sd, s.layout.config


def _hf_name(key: str) -> str:
    try:
        return ours_to_hf(key)
    except CheckpointError:
        return key


def load_state_dict_strict(model: GPT2, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``sd`` into ``model``; every missing, unexpected, mis-shaped or non-float tensor is named."""
    own = torch.nn.Module.state_dict(model)  # minigpt2's own layout, also for a HookedTransformer
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    problems = []
    if missing:
        problems.append(f"missing tensors: {[_hf_name(k) for k in missing[:8]]}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {[_hf_name(k) for k in unexpected[:8]]}")
    for k in sorted(set(own) & set(sd)):
        want, got = own[k].shape, sd[k].shape
        if got != want:
            entry = classify(_hf_name(k)).entry
            flip = entry is not None and entry.conv1d  # shapes as the file holds them
            hf_got, hf_want = (tuple(got[::-1]), tuple(want[::-1])) if flip else (tuple(got), tuple(want))
            problems.append(f"{_hf_name(k)} has shape {hf_got} in the file, the config needs {hf_want}")
        elif sd[k].dtype not in FLOAT_DTYPES:
            problems.append(f"{_hf_name(k)} is {sd[k].dtype}, not floating point")
    if problems:
        raise CheckpointError(f"{source} does not match the model config ({model.cfg}):\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def _check_dtype(dtype, what: str) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES):
        raise CheckpointError(f"{what}(dtype={dtype}): weights need a floating-point dtype, one of "
                              f"{', '.join(map(str, FLOAT_DTYPES))}")


def _check_path_and_device(path, device, what: str) -> None:
    """Before anything is read: ``path`` must be a path, ``device`` one that torch knows and this machine has."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: path must be a str or os.PathLike (a checkpoint directory or .safetensors file), "
                        f"got {path!r} ({type(path).__name__})")
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what}(device={device!r}): not a device torch knows; use 'cpu', 'cuda', 'cuda:1', "
                         "'mps' or a torch.device") from None
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # torch raises AssertionError or RuntimeError, by backend
        raise ValueError(f"{what}(device={device!r}): this machine cannot use it ({str(e).splitlines()[0]}); "
                         "use device='cpu' or one it has") from None


class PretrainedMixin:
    """The model's load_pretrained (a classmethod: it builds the class it is called on, GPT2 or a subclass such as
    HookedTransformer) and save_pretrained. The model inherits them from here, so this module, which reads and
    writes checkpoints, never imports the model; ``minigpt2.load_pretrained`` is ``GPT2.load_pretrained``."""

    @classmethod
    def load_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device=None,
                        n_head: int | None = None, *, config: GPT2Config | None = None) -> GPT2:
        """Load a GPT-2 from a Hugging Face directory (one file or shards) or a single .safetensors file.

        The config is ``config`` if given, else config.json beside the weights. Without either,
        n_layer, d_model, d_mlp, n_ctx and vocab_size are read from the tensor shapes, and
        ``n_head``, which no shape shows, must be passed: ``load_pretrained(path, n_head=12)``.
        ``n_head`` given together with a config must agree with it. ``dtype`` (float32, float16,
        bfloat16 or float64) defaults to float32, whatever the file stores.

        Every file is checked, and the config against every tensor's shape, before any module is
        built; whatever is wrong raises :class:`CheckpointError` (:class:`CheckpointNotFoundError`,
        also a FileNotFoundError, when there is no checkpoint), naming the file and the fix.
        """
        _check_dtype(dtype, "load_pretrained")
        _check_path_and_device(path, device, "load_pretrained")
        s = scan(path)
        cfg = resolve_config(s, config, n_head)
        check_config(cfg, s, "config=" if config is not None else str(s.layout.config or "the tensor shapes"))
        sd, lm_head = _read_tensors(s)
        _check_tied(s, sd, lm_head)
        _check_finite(s, sd)
        with torch.device("meta"):  # no random init of weights that the checkpoint overwrites
            model = cls(cfg)
        model = model.to(dtype=dtype or torch.float32).to_empty(device="cpu")
        load_state_dict_strict(model, sd, source=str(path))
        model.answer_space = _answer_space(s.layout.files[0].parent)
        return model.to(device=device).eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write model.safetensors + config.json that transformers' GPT2LMHeadModel loads; see
        :func:`minigpt2.weights.save_pretrained`."""
        save_pretrained(self, path, dtype)


def _answer_space(folder: Path) -> str | None:
    """The TPP answer format the model was finetuned (or its card evaluated) in, from metadata.json
    beside the weights (train.py and finetune.publish write it): "prompt" or "answer"; None when
    unrecorded. tpp's evaluation helpers read it as ``model.answer_space`` (minigpt2 knows no task)."""
    try:
        meta = load_json(folder / "metadata.json", "metadata")
    except (OSError, ValueError):  # none, or damaged: the weights load all the same
        return None
    if not isinstance(meta, dict):
        return None
    card = meta.get("eval_data") if isinstance(meta.get("eval_data"), dict) else {}
    space = meta.get("answer_space") or card.get("answer_space")
    return space if isinstance(space, str) else None


# ------------------------------------------------------------------------------ writing

# The writers below use minigpt2.fileio's atomic_write (a temporary file, fsynced, renamed), shared by the
# whole codebase; atomic_write stays importable from here.


def save_safetensors(tensors: dict[str, torch.Tensor], file: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its write errors (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, file, metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"(?:os error |Os \{ code: )(\d+)", str(e))  # io::Error's Display, or its Debug
        code = int(m[1]) if m else errno.EIO
        raise OSError(code, os.strerror(code) if m else str(e), file) from None


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _refuse_non_finite(names: list[str], where: str, fix: str) -> None:
    if names:
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise CheckpointError(f"{where}: tensors holding NaN or inf values: {shown}. {fix}")


def hf_tensors(model: GPT2, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' keys and layout (Conv1D [in, out]), on the CPU, in ``dtype``."""
    _check_dtype(dtype, "save_pretrained")
    if (why := model.hf_layout_error()) is not None:
        raise CheckpointError(f"save_pretrained: {why}")
    tensors = {}
    for k, v in torch.nn.Module.state_dict(model).items():  # minigpt2's own layout, also for a HookedTransformer
        if v.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"save_pretrained: {k} is {v.dtype}, not floating point; convert the model "
                                  "with model.float() first")
        v = v.detach().to("cpu", dtype=dtype or v.dtype)
        key = classify(ours_to_hf(k))
        tensors[key.hf] = (v.T if key.entry.conv1d else v).contiguous()
    return tensors


def save_pretrained(model: GPT2, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write model.safetensors + config.json that transformers' GPT2LMHeadModel loads as they are.

    Keys are written as transformers writes them (``transformer.`` prefix, Conv1D
    layout, lm_head left out as tied). ``dtype`` must be a floating-point one (float32,
    float16, bfloat16, float64); everything is checked before anything is written: a weight
    holding NaN or inf (named), a ``path`` that is a file, or a directory holding a sharded
    checkpoint (the two models would be ambiguous) raise CheckpointError. Each file is written
    to a temporary name and renamed, so a crash or a full disk never leaves a half-written file
    (a full disk raises minigpt2.fileio.WriteError, an OSError naming the file).
    """
    tensors = hf_tensors(model, dtype)
    _refuse_non_finite(non_finite(tensors), f"save_pretrained({str(path)!r})",
                       "Fix: find where training diverged (a lower learning rate), or restore an earlier checkpoint; "
                       "weights that are not finite are never saved")
    path = _save_target(Path(path))
    atomic_write(path / "model.safetensors", lambda tmp: save_safetensors(tensors, tmp, metadata={"format": "pt"}))
    config = json_text(model.cfg.to_hf_dict(), sort_keys=False)  # transformers' key order; ASCII
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(config))


def _save_target(path: Path) -> Path:
    """The directory save_pretrained writes into, made if missing; a file, or a sharded checkpoint there, refused."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save_pretrained: {path} is a file, not a directory: a checkpoint is a directory "
                              "of model.safetensors and config.json. Fix: pass a directory path")
    if (path / INDEX).exists():
        raise CheckpointError(f"save_pretrained: {path} holds a sharded checkpoint ({INDEX} and its shards); a "
                              "model.safetensors beside it would make two models in one directory, which no loader "
                              f"accepts. Fix: save into a new directory, or remove {INDEX} and its shards first")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None
    return path
