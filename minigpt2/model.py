"""GPT-2, from scratch, with a hook point wherever an activation is made.

Dimensions used in shape comments:
    B  batch (rows; in batched head masking, variants x examples)
    T  sequence length (Tq queries, Tk keys; Tk > Tq with a KV cache)
    H  heads per layer, d_head = d_model / H
    d_model, d_mlp  residual and MLP widths
    V  vocabulary size (50257 for GPT-2)

Hook names follow TransformerLens (blocks.3.attn.hook_pattern, ...). With no hook
on hook_attn_scores or hook_pattern, attention takes torch's fused
scaled_dot_product_attention; hook_result is computed only when hooked.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPT2Config
from .hooks import HookedModule, HookPoint

# z [B, T, H, d_head] -> z: how run_with_head_masks and edge interventions edit head outputs.
ZEdit = Callable[[torch.Tensor], torch.Tensor]


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_normalized = HookPoint()  # [B, T, d_model], after scale and shift

    def forward(self, x):
        return self.hook_normalized(F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: W_Q, W_K, W_V, head-major
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)  # columns: W_O, head-major
        self.hook_q = HookPoint()  # [B, Tq, H, d_head]
        self.hook_k = HookPoint()  # [B, Tq, H, d_head]: this call's positions, before the KV cache joins them
        self.hook_v = HookPoint()  # [B, Tq, H, d_head]
        self.hook_attn_scores = HookPoint()  # [B, H, Tq, Tk], masked entries at dtype min
        self.hook_pattern = HookPoint()  # [B, H, Tq, Tk]
        self.hook_z = HookPoint()  # [B, Tq, H, d_head]
        self.hook_result = HookPoint()  # [B, Tq, H, d_model], each head's write to the residual

    @property
    def W_O(self) -> torch.Tensor:
        # c_proj.weight is [d_model_out, H * d_head] -> [H, d_head, d_model]
        return self.c_proj.weight.T.reshape(self.n_head, self.d_head, -1)

    def forward(self, x, mask: torch.Tensor | None, z_edit: ZEdit | None = None, kv=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=-1)
        q = self.hook_q(q.view(B, T, self.n_head, self.d_head))
        k = self.hook_k(k.view(B, T, self.n_head, self.d_head))
        v = self.hook_v(v.view(B, T, self.n_head, self.d_head))
        if kv is not None:
            k, v = kv.extend(k, v)  # [B, Tk, H, d_head]
        if self.hook_attn_scores.active or self.hook_pattern.active:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
            if mask is None:
                mask = causal_mask(T, k.shape[1], x.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, torch.finfo(scores.dtype).min))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T, d_head]
                attn_mask=mask, is_causal=mask is None,
            ).transpose(1, 2)
        z = self.hook_z(z)  # [B, Tq, H, d_head]
        if z_edit is not None:
            z = z_edit(z)
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bqhd,hdm->bqhm", z, self.W_O))
            return result.sum(dim=2) + self.c_proj.bias
        return self.c_proj(z.reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre = HookPoint()  # [B, T, d_mlp]
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    def forward(self, x):
        pre = self.hook_pre(self.c_fc(x))
        return self.c_proj(self.hook_post(F.gelu(pre, approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [B, T, d_model]
        self.hook_attn_out = HookPoint()  # [B, T, d_model]
        self.hook_resid_mid = HookPoint()  # [B, T, d_model]
        self.hook_mlp_out = HookPoint()  # [B, T, d_model]
        self.hook_resid_post = HookPoint()  # [B, T, d_model]

    def forward(self, x, mask=None, z_edit: ZEdit | None = None, kv=None):
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln_1(x), mask, z_edit, kv)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln_2(x))))


def causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """[Tq, Tk] bool, True where query i (the last Tq of Tk positions) may attend key j."""
    offset = Tk - Tq
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=offset)


class GPT2(HookedModule):
    """GPT-2 with TransformerLens-style hooks.

    ``model(tokens)`` gives logits [B, T, V]; ``model(tokens, positions=p)`` with p
    a LongTensor [B] gives logits [B, V] at one position per row, skipping the
    unembedding everywhere else.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_embed = HookPoint()  # [B, T, d_model]
        self.hook_pos_embed = HookPoint()  # [B, T, d_model]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.init_weights()
        self.setup_hooks()

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln_" in name:
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # The forward in three parts, so that batched interventions can run part of it.
    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.check_tokens(tokens, start)
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(self.wpe(pos).expand(tokens.shape[0], -1, -1))

    def unembed(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, d_model] -> logits [B, T, V], or [B, V] at ``positions`` [B]."""
        if positions is not None:
            positions = self.check_positions(positions, x.shape[0], x.shape[1])
            x = x[torch.arange(x.shape[0], device=x.device), positions][:, None]  # [B, 1, d_model]
            return (self.ln_final(x) @ self.wte.weight.T)[:, 0]
        return self.ln_final(x) @ self.wte.weight.T

    def attention_mask(self, attention_mask: torch.Tensor | None, Tq: int, Tk: int) -> torch.Tensor | None:
        """[B, Tk] real-token mask -> [B, 1, Tq, Tk] bool, or None (plain causal)."""
        if attention_mask is None:
            return None if Tq == Tk else causal_mask(Tq, Tk, self.device)
        if attention_mask.shape[-1] != Tk or attention_mask.ndim != 2:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected [B, {Tk}]")
        mask = causal_mask(Tq, Tk, attention_mask.device) & attention_mask.bool()[:, None, None, :]
        # A query whose every key is padding (left padding) sees itself instead, so no row is empty
        # (no NaN); any other padded query attends the real tokens before it, as in transformers.
        diagonal = causal_mask(Tq, Tk, mask.device) & ~causal_mask(Tq, Tk, mask.device).tril(Tk - Tq - 1)
        return mask | (diagonal & ~mask.any(dim=-1, keepdim=True))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: "KVCache | None" = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] ([B, V] with positions [B]).

        ``attention_mask`` [B, T] (1 = real token) masks padded keys; right padding
        needs none. ``cache`` (a KVCache) makes this call continue its sequences.
        """
        return self.unembed(self.residual(tokens, attention_mask, cache), positions)

    def residual(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: "KVCache | None" = None) -> torch.Tensor:
        """tokens [B, T] -> the final residual stream [B, T, d_model], before ln_final and the unembedding."""
        start = cache.length if cache is not None else 0
        x = self.embed(tokens, start)  # [B, T, d_model]
        self.check_attention_mask(attention_mask, tokens)
        if cache is not None and attention_mask is not None:
            attention_mask = cache.extend_mask(attention_mask)
        mask = self.attention_mask(attention_mask, tokens.shape[1], start + tokens.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, mask, kv=cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.length += tokens.shape[1]
        return x

    # Input checks that name the culprit.
    def check_tokens(self, tokens: torch.Tensor, start: int = 0) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}; for one sequence use tokens[None]")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if start + tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"cannot forward a sequence of length {start + tokens.shape[1]}: n_ctx is only {self.cfg.n_ctx}"
            )
        if tokens.numel() and (tokens.max() >= self.cfg.vocab_size or tokens.min() < 0):
            bad = ((tokens >= self.cfg.vocab_size) | (tokens < 0)).nonzero()[0].tolist()
            raise ValueError(
                f"token id {tokens[tuple(bad)].item()} at {tuple(bad)} is outside the vocabulary [0, {self.cfg.vocab_size})"
            )

    @staticmethod
    def check_attention_mask(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> None:
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(tokens.shape)}, "
                             "the shape of tokens (1 = real token, 0 = padding)")

    @staticmethod
    def check_positions(positions: torch.Tensor, B: int, T: int) -> torch.Tensor:
        positions = torch.as_tensor(positions)
        if positions.shape != (B,):
            raise ValueError(f"positions must be one index per row, shape [{B}], got {tuple(positions.shape)}")
        if positions.numel() and (positions.max() >= T or positions.min() < -T):
            raise ValueError(f"positions out of range for sequences of length {T}: {positions.tolist()}")
        return positions % T

    # Thin wrappers over the other modules of the package.
    def run_with_head_masks(self, tokens, masks, positions=None, mode="zero", reference=None, **kwargs):
        """Evaluate ``masks`` [V, n_layer, n_head] ablation variants in one batched call.

        See :func:`minigpt2.masking.run_with_head_masks` for the full description.
        """
        from .masking import run_with_head_masks

        return run_with_head_masks(self, tokens, masks, positions=positions, mode=mode, reference=reference, **kwargs)

    def generate(self, tokens, max_new_tokens: int, **kwargs):
        from .generate import generate

        return generate(self, tokens, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "GPT2":
        from .weights import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        from .weights import save_pretrained

        save_pretrained(self, path)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for generation."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.mask: torch.Tensor | None = None  # [B, Tk] real-token mask, when one was given
        self.length = 0

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def extend_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.mask = torch.ones(attention_mask.shape[0], self.length, dtype=attention_mask.dtype,
                                   device=attention_mask.device)
        self.mask = torch.cat([self.mask, attention_mask], dim=1)
        return self.mask

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (sequences that are still generating)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        if self.mask is not None:
            self.mask = self.mask[rows]


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        c, i = self.cache, self.i
        c.k[i] = k if c.k[i] is None else torch.cat([c.k[i], k], dim=1)
        c.v[i] = v if c.v[i] is None else torch.cat([c.v[i], v], dim=1)
        return c.k[i], c.v[i]
