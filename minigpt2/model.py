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

Parameters keep Hugging Face's layout (wte, wpe, blocks.{l}.attn.c_attn, ...; state_dict() and the
safetensors on disk), and TransformerLens's modules are views of them: model.embed (W_E; called,
W_E[tokens]), model.pos_embed (W_pos), model.unembed (W_U, b_U), blocks[l].ln1.w / .b,
attn.W_Q [H, d_model, d_head] ... tl_state_dict() gives TransformerLens's layout and load_state_dict
takes either (minigpt2/processing.py, which also folds the layer norms and unties the unembedding when
TransformerLens's weight processing asks for it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clikit import Range

from .config import GPT2Config
from .generate import GenerateMixin, KVCache, KVCacheError  # noqa: F401  (KVCache, KVCacheError: also here)
from .hooks import HookedModule, HookPoint
from .lens import LensMixin
from .masking import HeadMaskMixin
from .processing import is_tl_layout, load_tl_state_dict, tl_state_dict
from .weights import PretrainedMixin

# z [B, T, H, d_head] -> z: how run_with_head_masks and edge interventions edit head outputs.
ZEdit = Callable[[torch.Tensor], torch.Tensor]


class AttentionMaskError(ValueError):
    """An attention_mask that is not [B, T] of 1 (real token) and 0 (padding)."""


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [..., 1]: sqrt(var + eps)
        self.hook_normalized = HookPoint()  # [..., d_model]: (x - mean) / scale, before weight and bias

    # TransformerLens's names for the gain and bias (None once folded).
    w = property(lambda self: self.weight)
    b = property(lambda self: self.bias)

    @property
    def folded(self) -> bool:
        """True once the weight and bias were folded into the next layer (minigpt2.processing.fold_layer_norm)."""
        return self.weight is None

    def fold(self) -> None:
        """Drop the weight and bias: this becomes TransformerLens's LayerNormPre, (x - mean) / scale."""
        self.weight = self.bias = None

    def unfold(self, like: torch.Tensor) -> None:
        """Weight 1 and bias 0 again, as parameters on ``like``'s device and dtype (to load a state dict
        that has them)."""
        if self.folded:
            self.weight = nn.Parameter(torch.ones(self.d, device=like.device, dtype=like.dtype))
            self.bias = nn.Parameter(torch.zeros(self.d, device=like.device, dtype=like.dtype))

    def forward(self, x):
        if not (self.hook_scale.active or self.hook_normalized.active):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x - x.mean(dim=-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        return x if self.folded else x * self.weight + self.bias


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
        self.cfg = cfg  # the model's own: TransformerLens's use_* switches are read at forward time
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
        """ln1 of the attention's input: shared [B, T, d_model], or per head and per q/k/v when those are hooked,
        or when ln1 is hooked while cfg.use_split_qkv_input or cfg.use_attn_in is on (TransformerLens's ln1 is
        then per head: its hooks are [B, T, H, ...])."""
        per_head = (self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input)
        ln1_per_head = (self.cfg.use_split_qkv_input or self.cfg.use_attn_in) and (
            self.ln1.hook_scale.active or self.ln1.hook_normalized.active)
        if not (ln1_per_head or any(hp.active for hp in per_head)):
            return self.ln1(x)
        x = self.hook_attn_in(x[:, :, None].repeat(1, 1, self.n_head, 1))  # [B, T, H, d_model]
        inputs = [hp(_copy_if_hooked(x, hp)) for hp in per_head[1:]]  # all three before ln1, as TransformerLens
        return tuple(self.ln1(xi) for xi in inputs)

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


class Embed(nn.Module):
    """TransformerLens's embed: tokens [B, T] -> W_E[tokens] [B, T, d_model], the token embedding alone
    (the model's wte; a view, registered once, as wte)."""

    def __init__(self, wte: nn.Embedding):
        super().__init__()
        self._wte = [wte]

    W_E = property(lambda self: self._wte[0].weight)  # [V, d_model]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._wte[0](tokens)


class PosEmbed(nn.Module):
    """TransformerLens's pos_embed: tokens [B, T] -> their position embeddings [B, T, d_model]
    (the model's wpe, registered once, as wpe)."""

    def __init__(self, wpe: nn.Embedding):
        super().__init__()
        self._wpe = [wpe]

    W_pos = property(lambda self: self._wpe[0].weight)  # [n_ctx, d_model]

    def forward(self, tokens: torch.Tensor, past_kv_pos_offset: int = 0,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions count from ``past_kv_pos_offset`` (the KV cache's length) or, with ``attention_mask``
        [B, past_kv_pos_offset + T], from each row's first real token; padding gets zeros."""
        B, T = tokens.shape[0], tokens.shape[-1]
        wpe, start = self._wpe[0], past_kv_pos_offset
        if attention_mask is None:
            return wpe(torch.arange(start, start + T, device=tokens.device)).expand(B, -1, -1)
        real = attention_mask.bool()
        pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:start + T]  # [B, T]
        return wpe(pos) * real[:, start:start + T, None].to(wpe.weight.dtype)


class Unembed(nn.Module):
    """The unembedding: tied to the token embedding (GPT-2: W_U = W_E^T, no bias), or, once weight
    processing changed it (minigpt2.processing), its own parameters W_U [d_model, V] and b_U [V]."""

    def __init__(self, wte: nn.Embedding):
        super().__init__()
        self._wte = [wte]  # a plain list: the weight is registered once, as wte
        self.hook_in = HookPoint()  # [B, T, d_model], after ln_final
        self.hook_out = HookPoint()  # [B, T, V]: the logits

    @property
    def tied(self) -> bool:
        return "W_U" not in self._parameters

    def __getattr__(self, name):
        if name in ("W_U", "b_U") and "W_U" not in self._parameters:  # tied: views of wte, and zeros
            wte = self._wte[0].weight
            return wte.T if name == "W_U" else torch.zeros(wte.shape[0], dtype=wte.dtype, device=wte.device)
        return super().__getattr__(name)

    def untie(self) -> None:
        """Give the unembedding its own W_U (a copy of W_E^T) and b_U (zeros), to be changed apart from W_E."""
        if self.tied:
            wte = self._wte[0].weight
            # straight into _parameters: register_parameter would refuse names that __getattr__ answers
            self._parameters["W_U"] = nn.Parameter(wte.detach().T.clone())
            self._parameters["b_U"] = nn.Parameter(torch.zeros(wte.shape[0], dtype=wte.dtype, device=wte.device))

    def forward(self, x):
        x = self.hook_in(x)
        if self.tied:
            return self.hook_out(x @ self._wte[0].weight.T)
        return self.hook_out(F.linear(x, self.W_U.T, self.b_U))


def causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """[Tq, Tk] bool, True where query i (the last Tq of Tk positions) may attend key j."""
    offset = Tk - Tq
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=offset)


class GPT2(LensMixin, GenerateMixin, HeadMaskMixin, PretrainedMixin, HookedModule):
    """GPT-2 with TransformerLens's hooks and model API (see minigpt2.lens for the API part). The methods
    generate, run_with_head_masks and load/save_pretrained are inherited from the modules that implement
    them (minigpt2.generate, minigpt2.masking, minigpt2.weights), and none of those calls back into this one.

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
        self.embed = Embed(self.wte)  # TransformerLens's modules: tokens -> W_E[tokens], and W_pos by position
        self.pos_embed = PosEmbed(self.wpe)
        self.hook_tokens = HookPoint()  # [B, T] token ids
        self.hook_embed = HookPoint()  # [B, T, d_model]
        self.hook_pos_embed = HookPoint()  # [B, T, d_model]; zero at padding
        self.blocks = nn.ModuleList(Block(self.cfg) for _ in range(cfg.n_layer))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.unembed = Unembed(self.wte)
        self.init_weights()
        self.setup_hooks()
        if self.cfg.dtype != self.wte.weight.dtype:  # HookedTransformerConfig(dtype=...): TransformerLens's weights' dtype
            self.to(self.cfg.dtype)

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(("bias", "b_U")):
                    p.zero_()
                elif isinstance(self.get_submodule(name.rsplit(".", 1)[0]), LayerNorm):
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        object.__setattr__(self.cfg, "device", str(self.wte.weight.device))
        object.__setattr__(self.cfg, "dtype", self.wte.weight.dtype)  # TransformerLens's cfg.dtype
        return out

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # The forward in three parts, so that batched interventions can run part of it.
    def embed_input(self, tokens: torch.Tensor, start: int = 0,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the residual stream entering block 0 [B, T, d_model]: token plus position embedding.

        Positions count from ``start`` (the KV cache's length) or, with ``attention_mask``
        [B, start + T], from each row's first real token, as in TransformerLens; padding gets
        no position embedding.
        """
        tokens = self.hook_tokens(tokens)
        self.check_tokens(tokens, start)
        return self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens, start, attention_mask))

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
                prepend_bos: bool | None = None, padding_side: str | None = None,
                start_at_layer: int | None = None, tokens: torch.Tensor | None = None):
        """tokens [B, T] (or text) -> logits [B, T, V] ([B, V] with positions [B]).

        ``attention_mask`` [B, T] (1 = real token) masks padded keys and shifts positions of
        left-padded rows; right padding needs none. ``cache`` (a KVCache) makes this call continue
        its sequences. ``return_type``: "logits", "loss" (mean next-token cross-entropy), "both"
        (logits, loss) or None. ``stop_at_layer`` l returns the residual stream entering block l.
        ``start_at_layer`` l (TransformerLens's): ``input`` is the residual stream entering block l
        [B, T, d_model] and blocks l, l+1, ... run on it (negative l counts from the end); the
        ``attention_mask`` then only masks keys (positions are in the residual already), and a loss
        needs ``tokens`` [B, T].
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if start_at_layer is None:
            tokens, attention_mask = self.input_to_tokens(input, attention_mask, prepend_bos, padding_side)
            x = self.residual(tokens, attention_mask, cache, stop_at_layer)
        else:
            if cache is not None:
                raise ValueError("start_at_layer= runs blocks on a given residual stream; a KVCache needs every "
                                 "block from the embedding: run without cache=")
            x, attention_mask = self.run_blocks(input, start_at_layer, stop_at_layer, attention_mask)
            if tokens is None and return_type in ("loss", "both"):
                raise ValueError("a loss from start_at_layer= needs tokens= [B, T]: the input is a residual stream")
            tokens = None if tokens is None else self.as_tokens(tokens)
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

    def run_blocks(self, x: torch.Tensor, start_at_layer: int, stop_at_layer: int | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the residual stream after blocks[start_at_layer:stop_at_layer] [B, T, d_model], the checked mask)
        from x [B, T, d_model], the residual stream entering block ``start_at_layer``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.cfg.d_model \
                or not x.dtype.is_floating_point:
            what = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"with start_at_layer=, the input is the residual stream [B, T, {self.cfg.d_model}] "
                             f"(floats) entering that block, got {what}")
        for name, layer in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
                raise TypeError(f"{name} must be an int (a block index), got {layer!r}")
        attention_mask = self.check_attention_mask(attention_mask, x[..., 0])
        mask = self.attention_mask(attention_mask, x.shape[1], x.shape[1])
        for block in self.blocks[start_at_layer:stop_at_layer]:
            x = block(x, mask)
        return x, attention_mask

    def residual(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: "KVCache | None" = None, stop_at_layer: int | None = None) -> torch.Tensor:
        """tokens [B, T] -> the final residual stream [B, T, d_model], before ln_final and the unembedding
        (or the one entering block ``stop_at_layer``)."""
        tokens = self.as_tokens(tokens)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a minigpt2 KVCache (KVCache(model.cfg.n_layer)) or None, got "
                            f"{type(cache).__name__}")
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check(self, tokens.shape[0])
        attention_mask = self.check_attention_mask(attention_mask, tokens)
        if cache is not None and (attention_mask is not None or cache.mask is not None):
            attention_mask = cache.extend_mask(attention_mask, tokens.shape[1])
        x = self.embed_input(tokens, start, attention_mask)  # [B, T, d_model]
        mask = self.attention_mask(attention_mask, tokens.shape[1], start + tokens.shape[1])
        blocks = self.blocks if stop_at_layer is None else self.blocks[:self.check_stop_at_layer(stop_at_layer)]
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
    def check_attention_mask(attention_mask, tokens: torch.Tensor) -> torch.Tensor | None:
        """``attention_mask`` as a tensor on the tokens' device, refused (:class:`AttentionMaskError`) unless it
        is [B, T] like ``tokens`` and binary: bool, or integers or floats that are exactly 0 or 1."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            try:
                attention_mask = torch.as_tensor(attention_mask)
            except (TypeError, ValueError, RuntimeError) as e:
                raise AttentionMaskError(f"attention_mask must be a [B, T] tensor (or list) of 1 (real token) and 0 "
                                         f"(padding), got {type(attention_mask).__name__}: {e}") from None
        if attention_mask.shape != tokens.shape:
            raise AttentionMaskError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                     f"{tuple(tokens.shape)}, the shape of tokens (1 = real token, 0 = padding)")
        if attention_mask.dtype.is_complex:
            raise AttentionMaskError(f"attention_mask must be bool or 0/1 numbers, got {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool:
            bad = ~((attention_mask == 0) | (attention_mask == 1))  # NaN is bad too
            if bool(bad.any()):
                at = tuple(bad.nonzero()[0].tolist())
                raise AttentionMaskError(
                    f"attention_mask{list(at)} is {attention_mask[at].item()!r}: a mask holds only 1 (real token) "
                    "and 0 (padding), exactly. Make it binary, e.g. (attention_mask > 0.5) or attention_mask.bool() "
                    "(nonzero = real)")
        return attention_mask.to(tokens.device)

    def check_stop_at_layer(self, stop_at_layer) -> int:
        """As TransformerLens: the residual stream entering block l (negative l counts from the end)."""
        L, given = self.cfg.n_layer, stop_at_layer
        try:
            stop_at_layer = int(stop_at_layer.__index__())  # ints, numpy's and torch's integers
        except (AttributeError, TypeError, RuntimeError):
            stop_at_layer = None
        if stop_at_layer is None or isinstance(given, bool):
            raise TypeError(f"stop_at_layer must be an integer (a block index) or None, got {given!r}")
        return Range(-L, L, whole=True).check("stop_at_layer", stop_at_layer,
                                              why=f"the residual stream entering that block; {L}: after the last")

    @staticmethod
    def check_positions(positions: torch.Tensor, B: int, T: int) -> torch.Tensor:
        try:
            positions = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"positions must be integer indices [B], one per row, got {positions!r}") from None
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be integer indices, got {positions.dtype}: pass positions.long()")
        if positions.shape != (B,):
            raise ValueError(f"positions must be one index per row, shape [{B}], got {tuple(positions.shape)}")
        if positions.numel() and (positions.max() >= T or positions.min() < -T):
            raise ValueError(f"positions out of range for sequences of length {T}: {positions.tolist()}")
        return positions % T

    # State dicts: minigpt2's own layout (Hugging Face's names, as on disk) out; that or TransformerLens's in.
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load minigpt2's own layout (``state_dict()``'s: wte.weight, blocks.0.attn.c_attn.weight, ...) or
        TransformerLens's (``tl_state_dict()``'s: embed.W_E, blocks.0.attn.W_Q, ...; see minigpt2.processing)."""
        if is_tl_layout(state_dict):
            return load_tl_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def tl_state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The weights under TransformerLens's names and shapes (HookedTransformer.load_state_dict takes it)."""
        return tl_state_dict(self, destination, prefix, keep_vars)

    def hf_layout_error(self) -> str | None:
        """Why Hugging Face's GPT-2 layout cannot hold these weights (they were processed), or None."""
        folded = [n for n, m in self.named_modules() if isinstance(m, LayerNorm) and m.folded]
        if folded or not self.unembed.tied:
            what = f"layer norms folded ({folded[0]}, ...)" if folded else "the unembedding untied from W_E"
            return (f"the weights were processed ({what}: minigpt2.processing, from_pretrained's defaults), and "
                    "GPT-2's Hugging Face layout cannot hold them; save the model before processing, or load it "
                    "with from_pretrained_no_processing")
        return None
