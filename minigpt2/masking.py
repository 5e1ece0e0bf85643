"""Batched head masking: many head-ablation variants of one batch in one call.

A variant is a mask [n_layer, n_head]: 1 keeps a head, 0 ablates it, values in
between interpolate (and are differentiable). Ablation acts on hook_z, the
head's output before W_O:

    z'[v, b] = m[v, l, h] * z[v, b] + (1 - m[v, l, h]) * r[b]

with r = 0 ("zero"), the head's mean z over a reference batch ("mean"), or its z
on corrupted inputs, row by row ("patch", resample ablation).

Work shared or skipped, all exact:

- prefix sharing: a variant equals the clean run up to its first ablated layer,
  so the clean residual stream is computed once and each variant joins the batch
  at the layer where it starts to differ;
- at that first layer its q, k, v and z are still the clean run's: only the
  edited z's projection W_O and the MLP are computed;
- only the answer positions' logits are wanted, so the final layer computes keys
  and values at every position but its query, W_O and MLP at those positions only.

Variants are processed in chunks of rows so that memory stays bounded. Parts of
blocks run outside their hook points, so the call refuses a model with hooks on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .model import GPT2

MODES = ("zero", "mean", "patch")
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [V, B, vocab] -> [V, ...]


def check_masks(model: GPT2, masks: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    masks = torch.as_tensor(masks)
    if masks.ndim == 2:
        raise ValueError(f"masks has shape {tuple(masks.shape)}; for a single variant use masks[None] (shape [1, {cfg.n_layer}, {cfg.n_head}])")
    if masks.ndim != 3 or masks.shape[1:] != (cfg.n_layer, cfg.n_head):
        raise ValueError(f"masks must be [V, n_layer={cfg.n_layer}, n_head={cfg.n_head}], got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise ValueError("masks holds no variant (shape [0, ...]): pass at least one [n_layer, n_head] mask, "
                         "e.g. single_head_masks(n_layer, n_head)")
    if masks.dtype.is_complex:
        raise TypeError(f"masks must be real numbers (1 keeps a head, 0 ablates it), got {masks.dtype}")
    if not torch.isfinite(masks.float()).all():
        raise ValueError("masks holds NaN or infinite values: 1 keeps a head, 0 ablates it, values between interpolate")
    return masks.to(device=model.device, dtype=model.dtype)  # float64 masks would promote z past the weights' dtype


def check_batch(model: GPT2, tokens) -> torch.Tensor:
    """[B, T] token ids on the model's device; a batch, not one sequence."""
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 1:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: batched masking takes a batch [B, T]; "
                         "for one sequence pass tokens[None]")
    tokens = model.as_tokens(tokens)
    model.check_tokens(tokens)
    return tokens


def last_positions(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last real position of each row: T - 1, or the last 1 of a right-padded mask."""
    if attention_mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    return attention_mask.long().cumsum(dim=1).argmax(dim=1)


@torch.no_grad()
def replacement_values(model: GPT2, mode: str, tokens: torch.Tensor, reference: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                       mean_over: str = "position") -> list[torch.Tensor] | None:
    """Per layer, the value r an ablated head's z takes: None for zero ablation, else
    [T, H, d_head] or [H, d_head] (mean) or [B, T, H, d_head] (patch)."""
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose one of {MODES}")
    if mode == "zero":
        return None
    if mode == "patch":
        if reference is None:
            raise ValueError("mode='patch' needs reference=corrupted tokens of the same shape as tokens")
        if reference.shape != tokens.shape:
            raise ValueError(f"patch reference has shape {tuple(reference.shape)}, but tokens have {tuple(tokens.shape)}: "
                             "corrupted prompts must pair one-to-one with the clean ones, at equal length")
    if mode == "mean":
        if mean_over not in ("position", "all"):
            raise ValueError(f"mean_over must be 'position' or 'all', got {mean_over!r}")
        if reference is None:
            reference, reference_mask = tokens, attention_mask
        if mean_over == "position" and reference.shape[1] != tokens.shape[1]:
            raise ValueError(f"a per-position mean needs reference sequences of length {tokens.shape[1]}, got "
                             f"{reference.shape[1]}; pad them or use mean_over='all'")
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layer)]
    if mode == "patch" and reference_mask is None:
        reference_mask = attention_mask  # corrupted prompts padded as the clean ones
    _, cache = model.run_with_cache(reference.to(model.device), names=names, attention_mask=reference_mask)
    zs = [cache[n] for n in names]  # each [Br, T, H, d_head]
    if mode == "patch":
        return zs
    w = (torch.ones(reference.shape, device=model.device) if reference_mask is None
         else reference_mask.to(model.device).float())  # [Br, T]
    dims = (0,) if mean_over == "position" else (0, 1)
    denom = w.sum(dim=dims).clamp(min=1)[..., None, None]
    return [(z * w[..., None, None]).sum(dim=dims) / denom for z in zs]


def _z_edit(m: torch.Tensor, r: torch.Tensor | None, n_variants: int):
    """m [n, H] for n variants of B rows each; r as from replacement_values (one layer)."""
    def edit(z):  # z [n * B, T, H, d_head]
        B = z.shape[0] // n_variants
        zv = z.view(n_variants, B, *z.shape[1:])
        mv = m[:, None, None, :, None]  # [n, 1, 1, H, 1]
        out = zv * mv if r is None else zv * mv + (1 - mv) * r.to(z.dtype)
        return out.reshape(z.shape)
    return edit


def run_with_head_masks(model: GPT2, tokens: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                        mode: str = "zero", reference: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                        mean_over: str = "position", metric: Metric | None = None, max_rows: int | None = None,
                        progress: bool = False) -> torch.Tensor:
    """Evaluate V head-ablation variants of a batch at once.

    Args:
        tokens: [B, T] token ids; ``attention_mask`` [B, T] if right-padded.
        masks: [V, n_layer, n_head] float; 1 keeps a head, 0 ablates it.
        positions: [B] the position whose logits are returned (default: each row's last real token).
        mode: "zero", "mean" (z replaced by its mean over ``reference`` tokens, default ``tokens``;
            per position, or over all positions with ``mean_over="all"``) or "patch" (z taken from a
            clean run on ``reference``, corrupted tokens of the same shape: resample ablation).
        metric: optional ``fn(logits [Vc, B, vocab]) -> [Vc, ...]`` applied chunk by chunk, so
            that the full [V, B, vocab] logits never exist at once.
        max_rows: rows (variants x examples) per chunk; by default a chunk's activations stay near 1 GiB.

    Returns:
        logits [V, B, vocab] at ``positions``, or the metric's values concatenated over variants.

    Equals, to float tolerance, :func:`run_with_head_masks_loop` (one forward per variant through hooks).
    """
    cfg = model.cfg
    masks = check_masks(model, masks)
    tokens = check_batch(model, tokens)
    B, T = tokens.shape
    model.check_attention_mask(attention_mask, tokens)
    hooked = [name for name, hp in model.hook_dict.items() if hp.active]
    if hooked:
        raise RuntimeError(f"run_with_head_masks computes parts of blocks directly, so hooks would not fire; "
                           f"active hooks: {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}. Remove them "
                           "(leave the `with model.hooks(...)` block or call model.reset_hooks()), or use "
                           "run_with_head_masks_loop, which runs every variant through the hooks")
    positions = last_positions(tokens, attention_mask) if positions is None else model.check_positions(positions, B, T)
    r = replacement_values(model, mode, tokens, reference, attention_mask, reference_mask, mean_over)
    if max_rows is None:
        # One block's transient activations for one row; with autograd on, every layer's are kept.
        per_row = T * (3 * cfg.d_model + 2 * cfg.d_mlp + cfg.n_head * T) * 4
        per_row *= cfg.n_layer if torch.is_grad_enabled() else 1
        max_rows = max(B, (2**30) // per_row)
    per_chunk = max(1, max_rows // B)

    # The clean run, shared by every variant: the residual stream before each layer [L + 1] x [B, T, d_model]
    # and each layer's z [L] x [B, T, H, d_head].
    attn = model.attention_mask(attention_mask, T, T)
    resid, z_clean = [model.embed(tokens, attention_mask=attention_mask)], []

    def keep(z):
        z_clean.append(z)
        return z

    for block in model.blocks:
        resid.append(block(resid[-1], attn, keep))
    rows = torch.arange(B, device=tokens.device)
    # The final layer is computed at the answer positions only (keys and values at every position,
    # one query per row): the keys each answer position may attend, and the clean z and the
    # replacement values there.
    if attn is None:
        final_keys = (torch.arange(T, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
    else:
        final_keys = attn[rows, 0, positions][:, None, None, :]  # [B, 1, 1, T]
    z_final = z_clean[-1][rows, positions][:, None]  # [B, 1, H, d_head]
    r_final = None if r is None else (r[-1][rows, positions][:, None] if r[-1].ndim == 4 else
                                      r[-1][positions][:, None] if r[-1].ndim == 3 else r[-1])

    differs = (masks != 1).any(dim=2)  # [V, L]
    first = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), torch.full_like(differs[:, 0], cfg.n_layer, dtype=torch.long))
    order = torch.argsort(first, stable=True).tolist()
    first = first.tolist()
    L = cfg.n_layer

    def edit_for(variants: list[int], l: int, rl):
        """The z edit of these variants at layer l, or None where none of them ablates a head there."""
        m = masks[variants, l]  # [n, H]
        return _z_edit(m, rl, len(variants)) if (m != 1).any() else None

    def edited(variants: list[int], l: int, rl, z):
        edit = edit_for(variants, l, rl)
        return z if edit is None else edit(z)

    def finish_block(block, x, z):
        """A block given its z: x [N, T, d_model] or [N, d_model] -> its resid_post."""
        x = x + block.attn.c_proj(z.reshape(*x.shape[:-1], -1))
        return x + block.mlp(block.ln2(x))

    chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="head-mask variants", unit="chunk")
    outputs: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        x = resid[L].new_empty(0, T, cfg.d_model)  # the variants running, rows variant-major: [n * B, T, d_model]
        active: list[int] = []
        for l in range(min(first[v] for v in chunk), L - 1):
            block, joining = model.blocks[l], [v for v in chunk if first[v] == l]
            if active:
                x = block(x, None if attn is None else attn.repeat(len(active), 1, 1, 1),
                          edit_for(active, l, None if r is None else r[l]))
            if joining:  # equal to the clean run up to this layer's z: only W_O and the MLP differ
                n = len(joining)
                z = edited(joining, l, None if r is None else r[l], z_clean[l].repeat(n, 1, 1, 1))
                x = torch.cat([x, finish_block(block, resid[l].repeat(n, 1, 1), z)])
                active += joining
        # The final layer, at the answer positions: [rows, d_model]
        block, final = model.blocks[L - 1], []
        if active:
            n = len(active)
            h = block.ln1(x)
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            D, H, dh = cfg.d_model, cfg.n_head, cfg.d_head
            x_at = x.view(n, B, T, D)[:, rows, positions].reshape(n * B, D)
            q = F.linear(h.view(n, B, T, D)[:, rows, positions], w[:D], b[:D]).view(n * B, H, 1, dh)
            k, v = F.linear(h, w[D:], b[D:]).view(n * B, T, 2, H, dh).permute(2, 0, 3, 1, 4)  # [n * B, H, T, dh]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=final_keys.repeat(n, 1, 1, 1))  # [n * B, H, 1, dh]
            z = edited(active, L - 1, r_final, z.transpose(1, 2))  # [n * B, 1, H, dh]
            final.append(finish_block(block, x_at, z))
        joining = [v for v in chunk if first[v] == L - 1]
        if joining:
            n = len(joining)
            z = edited(joining, L - 1, r_final, z_final.repeat(n, 1, 1, 1))
            final.append(finish_block(block, resid[L - 1][rows, positions].repeat(n, 1), z))
            active += joining
        late = [v for v in chunk if first[v] == L]  # variants that ablate nothing
        if late:
            final.append(resid[L][rows, positions].repeat(len(late), 1))
            active += late
        x = torch.cat(final)  # [n * B, d_model]
        logits = (model.ln_final(x) @ model.wte.weight.T).view(len(active), B, -1)  # [n, B, vocab]
        values = metric(logits) if metric is not None else logits
        for i, v in enumerate(active):
            outputs[v] = values[i]
    return torch.stack([outputs[v] for v in range(masks.shape[0])])


def run_with_head_masks_loop(model: GPT2, tokens: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                             mode: str = "zero", reference: torch.Tensor | None = None,
                             attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                             mean_over: str = "position", metric: Metric | None = None) -> torch.Tensor:
    """The plain reference: one forward per variant, heads edited through hook_z hooks."""
    masks = check_masks(model, masks)
    tokens = check_batch(model, tokens)
    B, T = tokens.shape
    positions = last_positions(tokens, attention_mask) if positions is None else positions
    r = replacement_values(model, mode, tokens, reference, attention_mask, reference_mask, mean_over)
    results = []
    for mask in masks:
        hooks = []
        for l in range(model.cfg.n_layer):
            if (mask[l] != 1).any():
                def hook(z, hp, m=mask[l], rl=None if r is None else r[l]):
                    m = m[None, None, :, None]
                    return z * m if rl is None else z * m + (1 - m) * rl
                hooks.append((f"blocks.{l}.attn.hook_z", hook))
        logits = model.run_with_hooks(tokens, attention_mask=attention_mask, positions=positions, fwd_hooks=hooks)
        results.append(metric(logits[None])[0] if metric is not None else logits)
    return torch.stack(results)


def single_head_masks(n_layer: int, n_head: int, include_clean: bool = True, dtype=torch.float32) -> torch.Tensor:
    """[1 + L*H, L, H] masks: the clean run first, then each head ablated alone (layer-major)."""
    eye = 1 - torch.eye(n_layer * n_head, dtype=dtype).view(-1, n_layer, n_head)
    return torch.cat([torch.ones(1, n_layer, n_head, dtype=dtype), eye]) if include_clean else eye
