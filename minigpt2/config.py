"""GPT2Config: the seven numbers that fix a GPT-2, and Hugging Face config.json I/O."""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from dataclasses import asdict, dataclass


class ConfigError(ValueError):
    """An invalid GPT-2 config; the message names where it came from, the field, and the fix."""


INT_FIELDS = ("n_layer", "n_head", "d_model", "d_mlp", "n_ctx", "vocab_size")


def check_int(value, name: str, source: str) -> int:
    """``value`` as a positive int; a bool, a float (2.0 included) or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ConfigError(f"{source}: {name} must be positive, got {value}")
    return int(value)


def check_eps(value, name: str, source: str) -> float:
    """``value`` as a layer-norm epsilon: a finite number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{source}: {name} must be a number, got {value!r} ({type(value).__name__})")
    try:
        eps = float(value)
    except OverflowError:
        eps = math.inf
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ConfigError(f"{source}: {name} must be a finite number in (0, 1), got {value!r} "
                          "(GPT-2 uses 1e-05)")
    return eps


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    n_ctx: int = 1024
    vocab_size: int = 50257
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in INT_FIELDS:
            object.__setattr__(self, name, check_int(getattr(self, name), name, "GPT2Config"))
        object.__setattr__(self, "layer_norm_eps", check_eps(self.layer_norm_eps, "layer_norm_eps", "GPT2Config"))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "every head needs d_model / n_head dimensions"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_heads_total(self) -> int:
        return self.n_layer * self.n_head

    # TransformerLens's names for the same numbers (HookedTransformerConfig), read-only.
    n_layers = property(lambda self: self.n_layer)
    n_heads = property(lambda self: self.n_head)
    d_vocab = property(lambda self: self.vocab_size)
    d_vocab_out = property(lambda self: self.vocab_size)
    eps = property(lambda self: self.layer_norm_eps)
    act_fn = "gelu_new"
    normalization_type = "LN"
    positional_embedding_type = "standard"
    attention_dir = "causal"
    original_architecture = "GPT2LMHeadModel"
    tokenizer_name = "gpt2"
    default_prepend_bos = True
    device = "cpu"  # a model's own copy says where the model is (GPT2 sets it when moved)

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    # Hugging Face config.json, the GPT2Config of transformers
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.d_model,
            "n_inner": self.d_mlp,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        } | ({"bos_token_id": 50256, "eos_token_id": 50256} if self.vocab_size > 50256 else {})

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "GPT2Config":
        """A config from a transformers GPT2Config dict; every field is type- and range-checked
        under its config.json name, so that the message points at the line to fix."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} holds a JSON {json_type(d)}, not an object: a GPT-2 config.json "
                              "is an object like {\"n_layer\": 12, \"n_head\": 12, ...}")
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"{source} lacks {missing}: is it a GPT-2 config.json?")
        _check_supported(d, source)
        n_embd = check_int(d["n_embd"], "n_embd", source)
        n_inner = d.get("n_inner")  # null (transformers' default) means 4 * n_embd
        n_positions = d["n_positions"] if "n_positions" in d else d.get("n_ctx", 1024)
        values = dict(
            n_layer=check_int(d["n_layer"], "n_layer", source),
            n_head=check_int(d["n_head"], "n_head", source),
            d_model=n_embd,
            d_mlp=4 * n_embd if n_inner is None else check_int(n_inner, "n_inner", source),
            n_ctx=check_int(n_positions, "n_positions" if "n_positions" in d else "n_ctx", source),
            vocab_size=check_int(d["vocab_size"], "vocab_size", source),
            layer_norm_eps=check_eps(d.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", source),
        )
        if n_embd % values["n_head"]:
            raise ConfigError(f"{source}: n_embd={n_embd} is not divisible by n_head={values['n_head']}: "
                              "every head needs n_embd / n_head dimensions")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPT2Config":
        return cls.from_hf_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


UNSUPPORTED = {  # config.json options minigpt2 does not implement: key -> the values it does
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "scale_attn_weights": (True,),
}


def _check_supported(d: dict, source: str) -> None:
    for key, allowed in UNSUPPORTED.items():
        if key in d and not any(type(d[key]) is type(a) and d[key] == a for a in allowed):  # 0 is not False
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (minigpt2 implements {allowed[0]!r})")


MAX_JSON_BYTES = 64 << 20  # a GPT-2 config.json is under 1 KB, a sharded index under 1 MB


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) < len(pairs):  # json.loads would keep the last silently
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r} appears more than once")
    return d


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, source: str, fix: str = "", allow_nan: bool = True, error=None):
    """Strict JSON of a file's bytes: UTF-8, no duplicate keys (and, unless ``allow_nan``, no NaN or
    Infinity); any failure raises ``error`` (ConfigError) naming ``source`` and saying ``fix``."""
    hooks = {} if allow_nan else {"parse_constant": _no_constants}
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, **hooks)
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (byte {e.start})"
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as e:  # JSONDecodeError included
        problem = str(e)
    raise (error or ConfigError)(f"{source} is not valid JSON ({problem})" + (f"; {fix}" if fix else ""))


def read_regular_file(path: str | os.PathLike, max_bytes: int, error=None) -> bytes:
    """The bytes of ``path``, which must be a regular file (a FIFO would block, a device never end)."""
    error = error or ConfigError
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}" + (
            " (a symlink that does not resolve: dangling or looping); fix the link or remove it"
            if os.path.islink(path) else "")) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file; replace it with the file itself")
    if st.st_size > max_bytes:
        raise error(f"{path} is {st.st_size} bytes, more than the {max_bytes} a JSON file here may be; "
                    "is it the right file?")
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None


CONFIG_FIX = "restore it, or delete it to infer the config from the weights (then pass n_head=)"


def read_json(path: str | os.PathLike, fix: str = CONFIG_FIX, error=None):
    """A JSON file, read only if it is a regular file of sane size, parsed strictly (see parse_json)."""
    error = error or ConfigError
    return parse_json(read_regular_file(path, MAX_JSON_BYTES, error), str(path), fix, error=error)


PRESETS = {
    "gpt2": GPT2Config(12, 12, 768, 3072),
    "gpt2-medium": GPT2Config(24, 16, 1024, 4096),
    "gpt2-large": GPT2Config(36, 20, 1280, 5120),
    "gpt2-xl": GPT2Config(48, 25, 1600, 6400),
}
