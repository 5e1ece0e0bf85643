"""GPT2Config: the seven numbers that fix a GPT-2, TransformerLens's switches, and Hugging Face config.json I/O.

The seven numbers are fixed once the config is made (``dataclasses.replace`` makes another).
TransformerLens's ``use_*`` switches (``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``,
``use_hook_mlp_in``, ``use_hook_tokens``) may be set at any time, as in TransformerLens
(``model.cfg.use_attn_result = True`` or ``model.set_use_attn_result(True)``): they decide which hook
points a filter, a cache and ``model.hook_dict`` see (minigpt2.hooks), never what the forward computes.
They are not part of equality, the hash or ``to_dict()``: two configs of the same shape are equal.
``HookedTransformerConfig`` makes a GPT2Config from TransformerLens's field names.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field, fields

import torch

from clikit import Range

from . import fileio


class ConfigError(ValueError):
    """An invalid GPT-2 config; the message names where it came from, the field, and the fix."""


POSITIVE, EPS = Range(1, whole=True), Range(0, 1, lo_open=True, hi_open=True)  # clikit's one range rule
INT_FIELDS = ("n_layer", "n_head", "d_model", "d_mlp", "n_ctx", "vocab_size")


def check_int(value, name: str, source: str) -> int:
    """``value`` as a positive int; a bool, a float (2.0 included) or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    if POSITIVE.problem(value) is not None:
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
    if EPS.problem(eps) is not None:
        raise ConfigError(f"{source}: {name} must be a finite number in (0, 1), got {value!r} "
                          "(GPT-2 uses 1e-05)")
    return eps


# TransformerLens's hook switches (HookedTransformerConfig's names and defaults): settable at any time.
SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens")
ARCH_FIELDS = INT_FIELDS + ("layer_norm_eps",)


def _switch():
    return field(default=False, compare=False, kw_only=True)


@dataclass(unsafe_hash=True)  # hashed and compared on the seven numbers only
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    n_ctx: int = 1024
    vocab_size: int = 50257
    layer_norm_eps: float = 1e-5
    use_attn_result: bool = _switch()  # attn.hook_result [B, T, H, d_model] fires
    use_split_qkv_input: bool = _switch()  # hook_q_input / _k_ / _v_ [B, T, H, d_model] fire; ln1 per head
    use_attn_in: bool = _switch()  # hook_attn_in [B, T, H, d_model] fires; ln1 per head
    use_hook_mlp_in: bool = _switch()  # hook_mlp_in [B, T, d_model] fires
    use_hook_tokens: bool = _switch()  # hook_tokens [B, T] exists (in hook_dict) and fires
    model_name: str = field(default="custom", compare=False, kw_only=True, repr=False)  # TransformerLens's name
    dtype: torch.dtype = field(default=torch.float32, compare=False, kw_only=True, repr=False)  # follows the model
    default_prepend_bos: bool = field(default=True, compare=False, kw_only=True, repr=False)  # to_tokens' default

    def __post_init__(self):
        for name in INT_FIELDS:
            object.__setattr__(self, name, check_int(getattr(self, name), name, "GPT2Config"))
        object.__setattr__(self, "layer_norm_eps", check_eps(self.layer_norm_eps, "layer_norm_eps", "GPT2Config"))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "every head needs d_model / n_head dimensions"
            )
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value) -> None:
        if name in SWITCHES:
            if not isinstance(value, bool):
                raise ConfigError(f"cfg.{name} must be True or False, got {value!r} ({type(value).__name__})")
        elif name in ARCH_FIELDS and getattr(self, "_built", False):
            raise ConfigError(f"cfg.{name} is fixed once the config is made (the weights have its shape): "
                              f"make another with dataclasses.replace(cfg, {name}=...)")
        elif name == "dtype" and not isinstance(value, torch.dtype):
            raise ConfigError(f"cfg.dtype must be a torch.dtype, got {value!r}")
        elif name == "default_prepend_bos" and not isinstance(value, bool):
            raise ConfigError(f"default_prepend_bos must be either True or False, got {value!r}")
        object.__setattr__(self, name, value)

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
    n_params = property(lambda self: self.n_layer * (4 * self.d_model ** 2 + 2 * self.d_model * self.d_mlp),
                        doc="TransformerLens's count: W_Q, W_K, W_V, W_O, W_in, W_out (no embeddings, biases, LN)")
    attn_scale = property(lambda self: math.sqrt(self.d_head))
    # HookedTransformerConfig's other fields, at the values that make a GPT-2 (libraries read them)
    act_fn = "gelu_new"
    normalization_type = "LN"
    positional_embedding_type = "standard"
    attention_dir = "causal"
    original_architecture = "GPT2LMHeadModel"
    tokenizer_name = "gpt2"
    tokenizer_prepends_bos = True  # as TransformerLens's GPT-2 tokenizer (add_bos_token=True), model.tokenizer's encode
    attn_only = False
    parallel_attn_mlp = False
    final_rms = False
    gated_mlp = False
    n_key_value_heads = None
    use_attn_scale = True
    use_local_attn = False
    use_normalization_before_and_after = False
    scale_attn_by_inverse_layer_idx = False
    ungroup_grouped_query_attention = False
    post_embedding_ln = False
    tie_word_embeddings = True
    rotary_dim = None
    window_size = None
    attn_types = None
    num_experts = None
    experts_per_token = None
    n_devices = 1
    seed = None
    init_mode = "gpt2"
    device = "cpu"  # a model's own copy says where the model is (GPT2 sets it when moved)

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name])  # a copy: its switches are the caller's

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
        """The seven numbers (what a checkpoint or a report records)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in ARCH_FIELDS}


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


CONFIG_FIX = "restore it, or delete it to infer the config from the weights (then pass n_head=)"


def read_json(path: str | os.PathLike, fix: str = CONFIG_FIX, error=None):
    """A JSON file as minigpt2.fileio reads every one (a regular file of sane size, strict JSON of bounded
    depth); what is wrong raises ``error`` (ConfigError) naming the file and saying ``fix``."""
    return fileio.load_json(path, "", fix, error=error or ConfigError)


PRESETS = {
    "gpt2": GPT2Config(12, 12, 768, 3072, model_name="gpt2"),
    "gpt2-medium": GPT2Config(24, 16, 1024, 4096, model_name="gpt2-medium"),
    "gpt2-large": GPT2Config(36, 20, 1280, 5120, model_name="gpt2-large"),
    "gpt2-xl": GPT2Config(48, 25, 1600, 6400, model_name="gpt2-xl"),
}


# HookedTransformerConfig fields a GPT-2 must have at these values (anything else is another architecture).
GPT2_ONLY = {"act_fn": ("gelu_new", "gelu_pytorch_tanh"), "normalization_type": ("LN",),
             "positional_embedding_type": ("standard",), "attention_dir": ("causal",), "attn_only": (False,),
             "parallel_attn_mlp": (False,), "final_rms": (False,), "gated_mlp": (False,), "n_key_value_heads": (None,),
             "use_attn_scale": (True,), "use_local_attn": (False,), "scale_attn_by_inverse_layer_idx": (False,),
             "use_normalization_before_and_after": (False,), "post_embedding_ln": (False,), "rotary_dim": (None,),
             "original_architecture": (None, "GPT2LMHeadModel"), "n_devices": (1,), "num_experts": (None,)}
# Fields that only steer TransformerLens's own initialisation or bookkeeping: accepted, without effect here.
IGNORED = ("init_weights", "seed", "initializer_range", "init_mode", "tokenizer_name", "from_checkpoint",
           "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "n_params", "device",
           "tokenizer_prepends_bos", "tie_word_embeddings")


class HookedTransformerConfig:
    """TransformerLens's HookedTransformerConfig for a GPT-2: its field names in, a :class:`GPT2Config` out.

    ``HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_ctx=16, d_vocab=99, d_mlp=37,
    act_fn="gelu_new", use_attn_result=True)`` is ``GPT2Config(2, 4, 32, 37, 16, 99,
    use_attn_result=True)``. A field that would make another architecture (``act_fn="relu"``,
    ``normalization_type="RMS"``, ``attn_only=True``, ...) is refused, naming it; fields that only
    steer TransformerLens's initialisation (``init_weights``, ``seed``, ...) are accepted and ignored.
    """

    def __new__(cls, n_layers: int, d_model: int, n_ctx: int, d_head: int, n_heads: int = -1,
                d_mlp: int | None = None, d_vocab: int = -1, d_vocab_out: int = -1, eps: float = 1e-5,
                default_prepend_bos: bool = True, model_name: str = "custom", dtype: torch.dtype = torch.float32,
                **kwargs) -> GPT2Config:
        switches = {k: kwargs.pop(k) for k in SWITCHES if k in kwargs}
        for key, value in kwargs.items():
            if key in GPT2_ONLY:
                if not any(type(value) is type(a) and value == a for a in GPT2_ONLY[key] if a is not None) \
                        and not (value is None and None in GPT2_ONLY[key]):
                    raise ConfigError(f"HookedTransformerConfig: {key}={value!r} is not GPT-2 "
                                      f"(minigpt2 implements {key}={GPT2_ONLY[key][-1]!r})")
            elif key not in IGNORED:
                raise ConfigError(f"HookedTransformerConfig: no field {key!r} for a GPT-2 (minigpt2 takes "
                                  f"the architecture fields, {', '.join(SWITCHES)}, and ignores {', '.join(IGNORED)})")
        if n_heads == -1:
            n_heads = d_model // d_head if d_head > 0 else -1
        if n_heads * d_head != d_model:
            raise ConfigError(f"HookedTransformerConfig: n_heads * d_head = {n_heads} * {d_head} is not d_model "
                              f"= {d_model}; GPT-2's heads split d_model")
        d_vocab = 50257 if d_vocab == -1 else d_vocab  # TransformerLens takes it from GPT-2's tokenizer
        if d_vocab_out not in (-1, d_vocab):
            raise ConfigError(f"HookedTransformerConfig: d_vocab_out={d_vocab_out} differs from d_vocab={d_vocab}; "
                              "GPT-2 unembeds into its own vocabulary (tied weights)")
        return GPT2Config(n_layer=n_layers, n_head=n_heads, d_model=d_model,
                          d_mlp=4 * d_model if d_mlp is None else d_mlp, n_ctx=n_ctx, vocab_size=d_vocab,
                          layer_norm_eps=eps, model_name=model_name, dtype=dtype,
                          default_prepend_bos=default_prepend_bos, **switches)

    @classmethod
    def from_dict(cls, config_dict: dict) -> GPT2Config:
        return cls(**config_dict)
