"""Batched head masking: many head-ablation variants of one batch in one call.

A variant is a mask [n_layer, n_head]: 1 keeps a head, 0 ablates it, values in
between interpolate (and are differentiable). Ablation acts on hook_z, the
head's output before W_O:

    z'[v, b] = m[v, l, h] * z[v, b] + (1 - m[v, l, h]) * r[b]

with r = 0 ("zero"), the head's mean z over a reference batch ("mean"), or its z
on corrupted inputs, row by row ("resample"). ``ablation=`` names it (``mode=`` and "patch" are its
deprecated old names, still accepted with a DeprecationWarning).

The work is done by minigpt2.engine.HeadMaskRunner, the engine under every search:
each variant joins the clean run at its first ablated layer, that layer costs only
W_O and the MLP, the final layer runs at the answer positions only, and variants
go in chunks sized to the device's memory. Parts of blocks run outside their hook
points, so the call refuses a model with hooks on.
"""

from __future__ import annotations

import operator
import warnings
from typing import TYPE_CHECKING

import torch

from clikit import Range

from .engine import (ABLATIONS, HeadMaskRunner, Metric, check_ablation, check_batch, check_masks, check_metric_values,
                     check_model, head_edit, last_positions, replacement_values)

if TYPE_CHECKING:  # the model imports this module (HeadMaskMixin): no import back at run time
    from .model import GPT2

__all__ = ["ABLATIONS", "HeadMaskMixin", "Metric", "check_batch", "check_masks", "head_edit", "last_positions",
           "replacement_values", "run_with_head_masks", "run_with_head_masks_loop", "single_head_masks"]


class HeadMaskMixin:
    """GPT2.run_with_head_masks; the model inherits it from here."""

    def run_with_head_masks(self, tokens, masks, positions=None, ablation="zero", reference=None, **kwargs):
        """Evaluate ``masks`` [V, n_layer, n_head] ablation variants in one batched call
        (``mode=``: the deprecated name of ``ablation=``).

        See :func:`minigpt2.masking.run_with_head_masks` for the full description.
        """
        return run_with_head_masks(self, tokens, masks, positions=positions, ablation=ablation, reference=reference,
                                   **kwargs)


def run_with_head_masks(model: GPT2, tokens: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                        ablation: str = "zero", reference: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                        mean_over: str = "position", metric=None, max_rows: int | None = None,
                        progress: bool = False, dtype=None, *, mode: str | None = None, group=None) -> torch.Tensor:
    """Evaluate V head-ablation variants of a batch at once.

    Args:
        tokens: [B, T] token ids; ``attention_mask`` [B, T] if right-padded.
        masks: [V, n_layer, n_head] float; 1 keeps a head, 0 ablates it.
        positions: [B] the position whose logits are returned (default: each row's last real token).
        ablation: "zero", "mean" (z replaced by its mean over ``reference`` tokens, default ``tokens``;
            per position, or over all positions with ``mean_over="all"``) or "resample" (z taken from
            a clean run on ``reference``, corrupted tokens of the same shape).
        metric: optional ``fn(logits [Vc, B, vocab]) -> [Vc, ...]`` applied chunk by chunk, so
            that the full [V, B, vocab] logits never exist at once.
        max_rows: rows (variants x examples) per chunk; by default what the device's memory budget allows.
        dtype: None (the model's precision) or torch.bfloat16: bf16 matmuls with fp32 accumulation,
            fp32 residual stream, layer norms and metric (see minigpt2.engine).
        mode: deprecated name of ``ablation`` (a DeprecationWarning).
        group: a torch.distributed process group whose ranks split the variants, each rank getting the whole
            result, bit for bit the one-process result; None: the default group once this process opted in
            (minigpt2.distributed.init_from_env, as circuits.py under torchrun), else this process alone;
            minigpt2.distributed.LOCAL: alone. Every rank must make the call. See minigpt2.distributed.

    Returns:
        logits [V, B, vocab] at ``positions``, or the metric's values concatenated over variants.

    Equals, to float tolerance, :func:`run_with_head_masks_loop` (one forward per variant through hooks).
    """
    ablation = _ablation_argument(ablation, mode, "run_with_head_masks")
    runner = HeadMaskRunner(model, tokens, ablation, reference, attention_mask, reference_mask, positions, mean_over,
                            dtype=dtype, group=group)
    return runner.run(masks, metric=metric, max_rows=max_rows, progress=progress)


def run_with_head_masks_loop(model: GPT2, tokens: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                             ablation: str = "zero", reference: torch.Tensor | None = None,
                             attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                             mean_over: str = "position", metric=None, *, mode: str | None = None) -> torch.Tensor:
    """The plain reference: one forward per variant, heads edited through hook_z hooks."""
    ablation = _ablation_argument(ablation, mode, "run_with_head_masks_loop")
    check_model(model, "run_with_head_masks_loop")
    masks = check_masks(model, masks)
    tokens = check_batch(model, tokens)
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be None or a callable logits [n, B, vocab] -> [n, ...], got "
                        f"{type(metric).__name__}")
    attention_mask = model.check_attention_mask(attention_mask, tokens)
    B, T = tokens.shape
    positions = last_positions(tokens, attention_mask) if positions is None else positions
    r = replacement_values(model, ablation, tokens, reference, attention_mask, reference_mask, mean_over)
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
        results.append(logits if metric is None else
                       check_metric_values(metric(logits[None]), 1, "metric", "logits [n, B, vocab] -> [n, ...]")[0])
    return torch.stack(results)


def _ablation_argument(ablation: str, mode: str | None, what: str) -> str:
    """The ablation's name from ``ablation=`` or the deprecated ``mode=`` (a DeprecationWarning), checked;
    "patch" is taken as "resample" with a DeprecationWarning. Warnings point at the caller's caller."""
    if mode is not None:
        if ablation != "zero" and ablation != mode:
            raise TypeError(f"{what}: got ablation={ablation!r} and mode={mode!r}; pass ablation= only "
                            "(mode= is its deprecated old name)")
        warnings.warn(f"{what}(mode=...) is deprecated: pass ablation={mode!r}", DeprecationWarning, stacklevel=3)
        ablation = mode
    return check_ablation(ablation, stacklevel=4)


def __getattr__(name: str):
    if name == "MODES":  # the old name of ABLATIONS (which no longer lists the deprecated "patch")
        warnings.warn("minigpt2.masking.MODES is deprecated: use ABLATIONS", DeprecationWarning, stacklevel=2)
        return ABLATIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _size(name: str, n) -> int:
    """A model size (n_layer, n_head) given to single_head_masks: an integer >= 1, else a TypeError/ValueError."""
    try:
        value = operator.index(n)  # ints, numpy and torch integers; not floats
    except TypeError:
        value = None
    if value is None or isinstance(n, bool):
        raise TypeError(f"single_head_masks: {name} must be an integer >= 1, got {n!r} ({type(n).__name__}); "
                        "pass model.cfg.n_layer, model.cfg.n_head")
    return Range(1, whole=True).check(f"single_head_masks: {name}", value, why="a model has at least one layer of "
                                      "at least one head", fix="pass model.cfg.n_layer, model.cfg.n_head")


def single_head_masks(n_layer: int, n_head: int, include_clean: bool = True, dtype=torch.float32) -> torch.Tensor:
    """[1 + L*H, L, H] masks: the clean run first, then each head ablated alone (layer-major)."""
    n_layer, n_head = _size("n_layer", n_layer), _size("n_head", n_head)
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"single_head_masks: dtype must be a real torch dtype such as torch.float32, got {dtype!r}")
    eye = 1 - torch.eye(n_layer * n_head, dtype=dtype).view(-1, n_layer, n_head)
    return torch.cat([torch.ones(1, n_layer, n_head, dtype=dtype), eye]) if include_clean else eye
