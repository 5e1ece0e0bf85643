"""GPT2Config: the seven numbers that fix a GPT-2, and Hugging Face config.json I/O."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path


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
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"GPT2Config.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "every head needs d_model / n_head dimensions"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_heads_total(self) -> int:
        return self.n_layer * self.n_head

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
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"{source} lacks {missing}: is it a GPT-2 config.json?")
        unsupported = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
            "scale_attn_weights": (True,),
        }
        for key, allowed in unsupported.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (minigpt2 implements {allowed[0]!r})")
        n_embd = d["n_embd"]
        return cls(
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            d_model=n_embd,
            d_mlp=d.get("n_inner") or 4 * n_embd,
            n_ctx=d.get("n_positions", d.get("n_ctx", 1024)),
            vocab_size=d["vocab_size"],
            layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it or delete it to infer the config from the weights") from e
        return cls.from_hf_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "gpt2": GPT2Config(12, 12, 768, 3072),
    "gpt2-medium": GPT2Config(24, 16, 1024, 4096),
    "gpt2-large": GPT2Config(36, 20, 1280, 5120),
    "gpt2-xl": GPT2Config(48, 25, 1600, 6400),
}
