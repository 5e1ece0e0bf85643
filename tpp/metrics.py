"""The paper's metrics, from the logits at the answer position.

Shapes: logits are [..., B, vocab] (final-position logits; a leading variant
axis V, e.g. one row per ablated circuit, broadcasts), token ids are [B] or
broadcastable to [..., B]. Every metric returns per-example values [..., B];
mean_sem reduces the last axis, so a [V, B, vocab] stack gives [V] means.
Computation is in float32 at least, whatever the logits' dtype.
"""

from __future__ import annotations

import math

import torch



def __getattr__(name: str):
    # The one KL lives in minigpt2.engine (ACDC's metric); tpp never imports the model package at import time.
    if name == "kl_div":
        from minigpt2.engine import kl_div
        return kl_div
    raise AttributeError(f"module 'tpp.metrics' has no attribute {name!r}")


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _pick(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """logits[..., b, token[..., b]] -> [..., B]."""
    token = torch.as_tensor(token, device=logits.device).long()
    token = torch.broadcast_to(token, logits.shape[:-1])
    return logits.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def final_position(logits: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    """Logits at each row's answer position: [..., B, T, vocab] -> [..., B, vocab].

    answer_pos: [B] long (EvalBatch.answer_pos), or an EvalBatch.
    """
    answer_pos = getattr(answer_pos, "answer_pos", answer_pos)
    answer_pos = torch.as_tensor(answer_pos, device=logits.device).long()
    rows = torch.arange(logits.shape[-3], device=logits.device)
    return logits[..., rows, answer_pos, :]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per example: [..., B, vocab], [B] -> [..., B]."""
    return -_pick(torch.log_softmax(_float(logits), dim=-1), target)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1.0 where the argmax of the logits is the target, else 0.0: [..., B] float.

    On a tie the lowest token id wins (torch.argmax), so a tie counts as
    correct only when the target is that id.
    """
    target = torch.broadcast_to(torch.as_tensor(target, device=logits.device).long(), logits.shape[:-1])
    return (logits.argmax(dim=-1) == target).float()


def logit_diff(logits: torch.Tensor, c_token: torch.Tensor, b_token: torch.Tensor) -> torch.Tensor:
    """logit[c's first token] - logit[b's first token] per example: [..., B].

    Positive when the model prefers c over b, which the prompt mentions twice.
    """
    logits = _float(logits)
    return _pick(logits, c_token) - _pick(logits, b_token)


def mean_sem(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error of the mean) over the last axis: [..., B] -> ([...], [...]).

    The standard error is the sample standard deviation (Bessel-corrected)
    over sqrt(B); it is NaN when B = 1, where it is undefined.
    """
    values = _float(torch.as_tensor(values))
    n = values.shape[-1]
    if n == 0:
        raise ValueError("mean_sem got an empty last axis. Fix: pass at least one example's values.")
    mean = values.mean(dim=-1)
    if n == 1:
        return mean, torch.full_like(mean, math.nan)
    return mean, values.std(dim=-1, correction=1) / math.sqrt(n)


def check_format(batch, model, fn: str = "summarize") -> None:
    """Refuse a batch in one answer format scored on a model finetuned in the other (it would score
    about 0, silently). The paper's single-token set (' c') is scored on every model; a model whose
    format is unrecorded (``answer_space`` None or absent) is scored on anything."""
    from tpp.encoding import FORMATS, model_space

    own = model_space(model)
    space = getattr(batch, "space", "prompt")
    if own is None or getattr(batch, "single_token", False) or own == space:
        return
    raise ValueError(f"{fn}: the batch is in the {space!r} format ({FORMATS[space]}), but the model was "
                     f"finetuned in {own!r} ({FORMATS[own]}); it would score about 0. "
                     "Fix: encode the batch with tpp.encode_eval(examples, model=model).")


def summarize(logits: torch.Tensor, batch, model=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The paper's three metrics as (mean, sem) over the batch.

    logits: final-position logits [..., B, vocab] (tpp.metrics.final_position
    turns full [..., B, T, vocab] logits into these); batch: a tpp.EvalBatch.
    model: the model that made the logits (anything with an ``answer_space``
    attribute, as minigpt2.load_pretrained sets); given, a batch in the other
    answer format than the model's is refused (see check_format).
    Returns {"loss": cross-entropy on c's first token, "accuracy": fraction
    whose argmax is c's first token, "logit_diff": logit c minus logit b},
    each a (mean, sem) pair of tensors of shape [...] (0-dim for a plain batch).
    """
    if model is not None:
        check_format(batch, model)
    if logits.ndim < 2 or logits.shape[-2] != len(batch):
        raise ValueError(f"summarize got logits of shape {tuple(logits.shape)} for a batch of {len(batch)}; "
                         "it needs final-position logits [..., B, vocab]. "
                         "Fix: pass tpp.metrics.final_position(logits, batch).")
    return {
        "loss": mean_sem(cross_entropy(logits, batch.c_token)),
        "accuracy": mean_sem(accuracy(logits, batch.c_token)),
        "logit_diff": mean_sem(logit_diff(logits, batch.c_token, batch.b_token)),
    }
