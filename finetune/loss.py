"""Next-token loss that unembeds only the labelled positions.

For finetuning on TPP only the c tokens carry a label, and the unembedding to
V = 50257 is most of a small model's cost; so the residual stream is gathered at
the labelled positions before ``model.unembed``. The result equals the loss on
full logits (tests/test_train.py checks it).

Both functions return the *sum* of cross-entropies and the number of targets:
the trainer divides by the count of the whole global batch, so gradient
accumulation and data-parallel ranks give the same update as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt2 import GPT2
from minigpt2.engine import head_edit

from .data import IGNORE


def lm_loss(model: GPT2, input_ids: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of CE over labelled positions, their count); Hugging Face label convention.

    input_ids, labels [B, T]; labels[:, t + 1] is the target of position t.
    """
    targets = labels[:, 1:]  # [B, T-1]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # [N], [N]
    if rows.numel() == 0:
        return model.wte.weight.sum() * 0.0, 0
    T = int(cols.max()) + 1  # causal: later positions cannot change these logits
    input_ids = input_ids[:, :T]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :T]
        if _harmless(attention_mask, rows, cols):
            attention_mask = None  # the fused causal path gives the same logits here
    x = model.residual(input_ids, attention_mask)  # [B, T, d_model]
    logits = model.to_logits(x[rows, cols][None])[0]  # [N, V]
    return F.cross_entropy(logits.float(), targets[rows, cols], reduction="sum"), int(rows.numel())


def _harmless(attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> bool:
    """True when the mask cannot change the gathered logits: padding only on the right
    (so a real query sees only real keys) and no labelled prediction made at a pad."""
    m = attention_mask.bool()
    right_padded = bool((m[:, 1:] <= m[:, :-1]).all())
    return right_padded and bool(m[rows, cols].all())


def full_lm_loss(model: GPT2, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The reference: full logits [B, T, V], then CE. Same return as ``lm_loss``."""
    logits = model(input_ids, attention_mask=attention_mask)
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


class LossModule(nn.Module):
    """The model with ``lm_loss`` as its forward, so DistributedDataParallel can wrap the
    whole loss computation (its gradient hooks are set up in forward)."""

    def __init__(self, model: GPT2):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, head_scale=None):
        """``head_scale`` [B, n_layer, n_head] (head dropout) multiplies each head's output z."""
        if head_scale is None:
            return lm_loss(self.model, input_ids, labels, attention_mask)

        def scale(layer):  # each row its own variant of the masking engine's head edit, z' = m z
            edit = head_edit(head_scale[:, layer], None, n_variants=head_scale.shape[0])
            return lambda z, hook: edit(z)

        hooks = [(f"blocks.{layer}.attn.hook_z", scale(layer)) for layer in range(head_scale.shape[1])]
        with self.model.hooks(fwd_hooks=hooks):
            return lm_loss(self.model, input_ids, labels, attention_mask)
