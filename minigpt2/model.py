"""GPT-2, from scratch, with a hook point wherever an activation is made.

Dimensions used in shape comments:
    B  batch (rows; in batched head masking, variants x examples)
    T  sequence length (Tq queries, Tk keys; Tk > Tq with a KV cache)
    H  heads per layer, d_head = d_model / H
    d_model, d_mlp  residual and MLP widths
    V  vocabulary size (50257 for GPT-2)

Hook names, shapes and meanings are TransformerLens's (blocks.3.attn.hook_pattern,
blocks.0.ln1.hook_normalized, ...). What is expensive is computed only when hooked: with
no hook on hook_attn_scores or hook_pattern, attention takes torch's fused
scaled_dot_product_attention; hook_result, the layer norms' scale, and the per-head
inputs (hook_attn_in, hook_q_input, ...) exist only when someone hooks them. Padding
follows TransformerLens too: with an attention_mask, positions count from each row's
first real token and a query with no real key attends nothing (z = 0).
The TransformerLens model API (to_tokens, W_Q, loss_fn, ...) lives in lens.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPT2Config
from .hooks import HookedModule, HookPoint
from .lens import LensMixin

# z [B, T, H, d_head] -> z: how run_with_head_masks and edge interventions edit head outputs.
ZEdit = Callable[[torch.Tensor], torch.Tensor]


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [..., 1]: sqrt(var + eps)
        self.hook_normalized = HookPoint()  # [..., d_model]: (x - mean) / scale, before weight and bias

    def forward(self, x):
        if not (self.hook_scale.active or self.hook_normalized.active):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x - x.mean(dim=-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: W_Q, W_K, W_V, head-major
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)  # columns: W_O, head-major
        self.hook_q = HookPoint()  # [B, Tq, H, d_head]
        self.hook_k = HookPoint()  # [B, Tq, H, d_head]: this call's positions, before the KV cache joins them
        self.hook_v = HookPoint()  # [B, Tq, H, d_head]
        self.hook_attn_scores = HookPoint()  # [B, H, Tq, Tk], -inf where masked
        self.hook_pattern = HookPoint()  # [B, H, Tq, Tk]; a row with no finite score is all zeros
        self.hook_z = HookPoint()  # [B, Tq, H, d_head]
        self.hook_result = HookPoint()  # [B, Tq, H, d_model], each head's write to the residual, without b_O

    # Weights in TransformerLens's layout (views of c_attn / c_proj, so edits write through).
    def _qkv(self, i: int):
        D = self.c_attn.in_features
        W = self.c_attn.weight[i * D:(i + 1) * D]  # [H * d_head, d_model]
        return W.T.reshape(D, self.n_head, self.d_head).transpose(0, 1), \
            self.c_attn.bias[i * D:(i + 1) * D].view(self.n_head, self.d_head)

    W_Q = property(lambda self: self._qkv(0)[0])  # [H, d_model, d_head]
    W_K = property(lambda self: self._qkv(1)[0])
    W_V = property(lambda self: self._qkv(2)[0])
    b_Q = property(lambda self: self._qkv(0)[1])  # [H, d_head]
    b_K = property(lambda self: self._qkv(1)[1])
    b_V = property(lambda self: self._qkv(2)[1])
    b_O = property(lambda self: self.c_proj.bias)  # [d_model]

    @property
    def W_O(self) -> torch.Tensor:
        # c_proj.weight is [d_model_out, H * d_head] -> [H, d_head, d_model]
        return self.c_proj.weight.T.reshape(self.n_head, self.d_head, -1)

    def project(self, x):
        """q, k, v [B, T, H, d_head] from x [B, T, d_model], or from per-head inputs (xq, xk, xv) [B, T, H, d_model]."""
        if isinstance(x, torch.Tensor):
            B, T, D = x.shape
            return [t.view(B, T, self.n_head, self.d_head) for t in self.c_attn(x).split(D, dim=-1)]
        return [torch.einsum("bthm,hmd->bthd", xi, self._qkv(i)[0]) + self._qkv(i)[1] for i, xi in enumerate(x)]

    def forward(self, x, mask: torch.Tensor | None, z_edit: ZEdit | None = None, kv=None,
                at: torch.Tensor | None = None):
        if at is not None:
            return self.forward_at(x, mask, at, z_edit)
        q, k, v = self.project(x)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        B, T = q.shape[:2]
        if kv is not None:
            k, v = kv.extend(k, v)  # [B, Tk, H, d_head]
        if mask is None and k.shape[1] != T:
            mask = causal_mask(T, k.shape[1], q.device)
        z = self.attend(q, k, v, mask)
        z = self.hook_z(z)  # [B, Tq, H, d_head]
        if z_edit is not None:
            z = z_edit(z)
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bqhd,hdm->bqhm", z, self.W_O))
            return result.sum(dim=2) + self.c_proj.bias
        return self.c_proj(z.reshape(B, T, -1))

    def forward_at(self, x: torch.Tensor, mask: torch.Tensor | None, at: torch.Tensor,
                   z_edit: ZEdit | None = None) -> torch.Tensor:
        """The attention output [B, d_model] at one query position per row, ``at`` [B], from
        x [B, T, d_model]: keys and values at every position, the query, z and W_O at ``at`` only."""
        B, T, D = x.shape
        rows = torch.arange(B, device=x.device)
        w, b = self.c_attn.weight, self.c_attn.bias
        q = F.linear(x[rows, at], w[:D], b[:D]).view(B, 1, self.n_head, self.d_head)
        k, v = F.linear(x, w[D:], b[D:]).view(B, T, 2, self.n_head, self.d_head).unbind(2)
        if mask is None:
            keys = torch.arange(T, device=x.device)[None, :] <= at[:, None]  # [B, T]
        else:
            keys = mask.expand(B, -1, -1, -1)[rows, 0, at]  # [B, T]
        z = self.attend(self.hook_q(q), self.hook_k(k), self.hook_v(v), keys[:, None, None, :])
        z = self.hook_z(z)  # [B, 1, H, d_head]
        if z_edit is not None:
            z = z_edit(z)
        return self.c_proj(z.reshape(B, D))

    def head_outputs(self, q_in, k_in, v_in, heads: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """Heads ``heads``, each on its own query, key and value input: q_in, k_in, v_in
        [N, T, Hs, d_model] (after ln1) -> [N, T, Hs, d_model], each head's z_h @ W_O[h] (no b_O).
        ``mask``: [N | 1, 1, T, T] bool or None (causal). The edge graph's attention."""
        H, dh = self.n_head, self.d_head
        W = self.c_attn.weight.view(3, H, dh, -1)[:, heads]  # [3, Hs, d_head, d_model]
        b = self.c_attn.bias.view(3, H, dh)[:, heads]  # [3, Hs, d_head]
        q, k, v = (torch.einsum("nthd,hed->nthe", x, W[i]) + b[i] for i, x in enumerate((q_in, k_in, v_in)))
        z = self.attend(q, k, v, mask)  # [N, T, Hs, d_head]; the padding rule included
        return torch.einsum("nthe,hed->nthd", z, self.W_O[heads])

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """z [B, Tq, H, d_head] from q [B, Tq, H, d_head], k, v [B, Tk, H, d_head]; mask [B or 1, 1, Tq, Tk]
        (True = may attend) or None (causal). A query that may attend no key gets z = 0, as in TransformerLens."""
        if self.hook_attn_scores.active or self.hook_pattern.active:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
            if mask is None:
                mask = causal_mask(q.shape[1], k.shape[1], q.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = scores.softmax(dim=-1)
            pattern = self.hook_pattern(torch.where(pattern.isnan(), torch.zeros_like(pattern), pattern))
            return torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        empty = None if mask is None else ~mask.any(dim=-1, keepdim=True)  # [B, 1, Tq, 1]
        if empty is not None:
            mask = mask | empty  # any finite row: its z is zeroed below
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T, d_head]
            attn_mask=mask, is_causal=mask is None,
        )
        if empty is not None:
            z = z.masked_fill(empty, 0.0)
        return z.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre = HookPoint()  # [B, T, d_mlp]
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    W_in = property(lambda self: self.c_fc.weight.T)  # [d_model, d_mlp]
    b_in = property(lambda self: self.c_fc.bias)
    W_out = property(lambda self: self.c_proj.weight.T)  # [d_mlp, d_model]
    b_out = property(lambda self: self.c_proj.bias)

    def forward(self, x):
        pre = self.hook_pre(self.c_fc(x))
        return self.c_proj(self.hook_post(F.gelu(pre, approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [B, T, d_model]
        self.hook_attn_in = HookPoint()  # [B, T, H, d_model]: each head's copy of its input
        self.hook_q_input = HookPoint()  # [B, T, H, d_model]: each head's query input (from hook_attn_in)
        self.hook_k_input = HookPoint()  # [B, T, H, d_model]
        self.hook_v_input = HookPoint()  # [B, T, H, d_model]
        self.hook_attn_out = HookPoint()  # [B, T, d_model]
        self.hook_resid_mid = HookPoint()  # [B, T, d_model]
        self.hook_mlp_in = HookPoint()  # [B, T, d_model]
        self.hook_mlp_out = HookPoint()  # [B, T, d_model]
        self.hook_resid_post = HookPoint()  # [B, T, d_model]

    def attn_input(self, x):
        """ln1 of the attention's input: shared [B, T, d_model], or per head and per q/k/v when those are hooked."""
        per_head = (self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if not any(hp.active for hp in per_head):
            return self.ln1(x)
        x = self.hook_attn_in(x[:, :, None].repeat(1, 1, self.n_head, 1))  # [B, T, H, d_model]
        return tuple(self.ln1(hp(_copy_if_hooked(x, hp))) for hp in per_head[1:])

    def forward(self, x, mask=None, z_edit: ZEdit | None = None, kv=None, at: torch.Tensor | None = None):
        """x [B, T, d_model] -> the residual stream after the block [B, T, d_model], or [B, d_model] at one
        position per row with ``at`` [B] (the batched engines' last layer: only those rows' logits are read)."""
        if at is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            return self.finish_mlp(x[rows, at] + self.attn(self.ln1(x), mask, z_edit, at=at))
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.attn_input(x), mask, z_edit, kv)))
        mlp_in = self.hook_mlp_in(_copy_if_hooked(x, self.hook_mlp_in))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(mlp_in))))


    def finish(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The block's output given its attention's z: x [..., d_model] (resid_pre), z [..., H, d_head].
        A variant that differs from a base run first at this layer has the base's z here, edited."""
        return self.finish_mlp(x + self.attn.c_proj(z.reshape(*x.shape[:-1], -1)))

    def finish_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """resid_mid -> resid_post, for any leading shape."""
        return x + self.mlp(self.ln2(x))


def _copy_if_hooked(x: torch.Tensor, hp: HookPoint) -> torch.Tensor:
    # A hook may edit its input in place: give it its own copy so the residual stream is untouched.
    return x.clone() if hp.active else x


class Unembed(nn.Module):
    """The unembedding, tied to the token embedding (GPT-2 has no unembedding bias)."""

    def __init__(self, wte: nn.Embedding):
        super().__init__()
        self._wte = [wte]  # a plain list: the weight is registered once, as wte
        self.hook_in = HookPoint()  # [B, T, d_model], after ln_final
        self.hook_out = HookPoint()  # [B, T, V]: the logits

    def forward(self, x):
        return self.hook_out(self.hook_in(x) @ self._wte[0].weight.T)


def causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """[Tq, Tk] bool, True where query i (the last Tq of Tk positions) may attend key j."""
    offset = Tk - Tq
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=offset)


class GPT2(LensMixin, HookedModule):
    """GPT-2 with TransformerLens's hooks and model API (see minigpt2.lens for the API part).

    ``model(tokens)`` gives logits [B, T, V]; ``model(tokens, positions=p)`` with p
    a LongTensor [B] gives logits [B, V] at one position per row, skipping the
    unembedding everywhere else. ``tokens`` may also be a string or a list of strings
    (tokenized as TransformerLens does, <|endoftext|> prepended), a list or an array of ids.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)  # this model's own copy: cfg.device follows the model
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_tokens = HookPoint()  # [B, T] token ids
        self.hook_embed = HookPoint()  # [B, T, d_model]
        self.hook_pos_embed = HookPoint()  # [B, T, d_model]; zero at padding
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.unembed = Unembed(self.wte)
        self.init_weights()
        self.setup_hooks()

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif isinstance(self.get_submodule(name.rsplit(".", 1)[0]), LayerNorm):
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        object.__setattr__(self.cfg, "device", str(self.wte.weight.device))
        return out

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # The forward in three parts, so that batched interventions can run part of it.
    def embed(self, tokens: torch.Tensor, start: int = 0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the residual stream entering block 0 [B, T, d_model].

        Positions count from ``start`` (the KV cache's length) or, with ``attention_mask``
        [B, start + T], from each row's first real token, as in TransformerLens; padding gets
        no position embedding.
        """
        tokens = self.hook_tokens(tokens)
        self.check_tokens(tokens, start)
        if attention_mask is None:
            pos_embed = self.wpe(torch.arange(start, start + tokens.shape[1], device=tokens.device)).expand(
                tokens.shape[0], -1, -1)
        else:
            real = attention_mask.bool()
            pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # [B, T]
            pos_embed = self.wpe(pos) * real[:, start:, None].to(self.dtype)
        return self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(pos_embed)

    def to_logits(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final residual stream [B, T, d_model] -> logits [B, T, V], or [B, V] at ``positions`` [B]."""
        if positions is not None:
            positions = self.check_positions(positions, x.shape[0], x.shape[1])
            x = x[torch.arange(x.shape[0], device=x.device), positions][:, None]  # [B, 1, d_model]
            return self.unembed(self.ln_final(x))[:, 0]
        return self.unembed(self.ln_final(x))

    def attention_mask(self, attention_mask: torch.Tensor | None, Tq: int, Tk: int) -> torch.Tensor | None:
        """[B, Tk] real-token mask -> [B, 1, Tq, Tk] bool (True = may attend), or None (plain causal).

        A query with no real key before it (left padding) attends nothing: its z is 0.
        """
        if attention_mask is None:
            return None if Tq == Tk else causal_mask(Tq, Tk, self.device)
        if attention_mask.shape[-1] != Tk or attention_mask.ndim != 2:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected [B, {Tk}]")
        return causal_mask(Tq, Tk, attention_mask.device) & attention_mask.bool()[:, None, None, :]

    def forward(self, input, return_type: str | None = "logits", loss_per_token: bool = False,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: "KVCache | None" = None, stop_at_layer: int | None = None,
                prepend_bos: bool | None = None, padding_side: str | None = None):
        """tokens [B, T] (or text) -> logits [B, T, V] ([B, V] with positions [B]).

        ``attention_mask`` [B, T] (1 = real token) masks padded keys and shifts positions of
        left-padded rows; right padding needs none. ``cache`` (a KVCache) makes this call continue
        its sequences. ``return_type``: "logits", "loss" (mean next-token cross-entropy), "both"
        (logits, loss) or None. ``stop_at_layer`` l returns the residual stream entering block l.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        tokens, attention_mask = self.input_to_tokens(input, attention_mask, prepend_bos, padding_side)
        x = self.residual(tokens, attention_mask, cache, stop_at_layer)
        if stop_at_layer is not None or return_type is None:
            return x if stop_at_layer is not None else None
        if positions is not None and return_type != "logits":
            raise ValueError("positions= returns logits at one position per row; a loss needs return_type='logits' "
                             "without positions")
        logits = self.to_logits(x, positions)
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, attention_mask=attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def residual(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: "KVCache | None" = None, stop_at_layer: int | None = None) -> torch.Tensor:
        """tokens [B, T] -> the final residual stream [B, T, d_model], before ln_final and the unembedding
        (or the one entering block ``stop_at_layer``)."""
        tokens = self.as_tokens(tokens)
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check(self, tokens.shape[0])
        self.check_attention_mask(attention_mask, tokens)
        if cache is not None and (attention_mask is not None or cache.mask is not None):
            attention_mask = cache.extend_mask(attention_mask, tokens.shape[1])
        x = self.embed(tokens, start, attention_mask)  # [B, T, d_model]
        mask = self.attention_mask(attention_mask, tokens.shape[1], start + tokens.shape[1])
        blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
        for i, block in enumerate(blocks):
            x = block(x, mask, kv=cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.length += tokens.shape[1]
        return x

    # Input checks that name the culprit.
    def as_tokens(self, tokens) -> torch.Tensor:
        """Token ids as a [B, T] integer tensor on the model's device: lists and arrays accepted, [T] made [1, T]."""
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            raise TypeError("text here must first be tokenized: model.to_tokens(text)")
        if not isinstance(tokens, torch.Tensor):
            try:
                tokens = torch.as_tensor(tokens)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"tokens must be integer ids ([B, T] tensor, list or array): {e}") from None
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        return tokens.to(device=self.device, dtype=torch.long)

    def check_tokens(self, tokens: torch.Tensor, start: int = 0) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}; for one sequence use tokens[None]")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: give at least one sequence of at least one token")
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
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be integer indices, got {positions.dtype}: pass positions.long()")
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

    def generate(self, input="", max_new_tokens: int = 10, **kwargs):
        """Continue ``input`` (text, texts or token ids [B, T]); see :func:`minigpt2.generate.generate`."""
        from .generate import generate

        return generate(self, input, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, **kwargs) -> "GPT2":
        """A checkpoint directory (Hugging Face layout); see :func:`minigpt2.weights.load_pretrained`."""
        from .weights import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **kwargs)

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

    def check(self, model: GPT2, batch: int) -> None:
        if len(self.k) != model.cfg.n_layer:
            raise ValueError(f"this KVCache has {len(self.k)} layers, the model {model.cfg.n_layer}: "
                             f"make one with KVCache(model.cfg.n_layer)")
        rows = None if self.k[0] is None else self.k[0].shape[0]
        if rows is not None and rows != batch:
            raise ValueError(f"this KVCache holds {rows} sequences, the tokens {batch}: a cache continues the batch "
                             "it was filled with; make a new KVCache for another batch")

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def extend_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """The real-token mask over every key [B, length + T], given this call's [B, T] (None: all real)."""
        B = self.k[0].shape[0] if self.k[0] is not None else attention_mask.shape[0]
        device = self.mask.device if self.mask is not None else attention_mask.device
        if self.mask is None:
            self.mask = torch.ones(B, self.length, dtype=torch.long, device=device)
        new = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None else attention_mask.long()
        self.mask = torch.cat([self.mask, new], dim=1)
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
