"""Evaluators: callables ``evaluate(model) -> {set name: {metric: value}}`` run by the trainer.

* ``tpp_evaluator``: the paper's two evaluation sets (3000 examples; 1150 whose c
  is one token), scored by ``tpp.metrics.summarize`` on the logits at the
  answer position: loss, accuracy, logit difference (each with its s.e.m.).
* ``heldout_evaluator``: next-token loss and accuracy on held-out text blocks.

The copying probe of a pretraining run (its heads' induction and previous-token scores) is
circuitlab's: ``circuitlab.copying.copying_evaluator`` (finetune does not import circuitlab).

The trainer calls them under ``torch.no_grad()`` with the model in eval mode.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from minigpt2 import GPT2

Evaluator = Callable[[GPT2], dict]


def tpp_eval_sets(exclude, eval_size: int = 3000, single_token_eval_size: int = 1150, seed: int = 0,
                  space: str = "prompt") -> dict:
    """Both TPP evaluation sets, "eval" and "single_token_eval", none of whose prompts is in
    ``exclude`` (the master set); the first in the finetuning's answer format ``space`` (the
    second always has ' c')."""
    import tpp

    return {
        "eval": tpp.encode_eval(tpp.make_eval_set(n=eval_size, seed=seed, exclude=exclude), space=space),
        "single_token_eval": tpp.encode_eval(
            tpp.make_single_token_eval_set(n=single_token_eval_size, seed=seed, exclude=exclude), single_token=True),
    }


def tpp_evaluator(exclude, eval_size: int = 3000, single_token_eval_size: int = 1150, seed: int = 0,
                  batch_size: int = 64, space: str = "prompt") -> Evaluator:
    """An evaluator scoring a model on both TPP evaluation sets (see :func:`tpp_eval_sets`)."""
    sets = tpp_eval_sets(exclude, eval_size, single_token_eval_size, seed, space)

    def evaluate(model: GPT2) -> dict:
        return {name: tpp_metrics(model, batch, batch_size) for name, batch in sets.items()}

    return evaluate


def tpp_metrics(model: GPT2, batch, batch_size: int = 64) -> dict:
    import tpp.metrics

    tokens = torch.as_tensor(batch.tokens)
    mask = torch.as_tensor(batch.attention_mask) if batch.attention_mask is not None else None
    pos = torch.as_tensor(batch.answer_pos)
    logits = []
    for i in range(0, len(tokens), batch_size):
        logits.append(model(tokens[i:i + batch_size].to(model.device),
                            attention_mask=None if mask is None else mask[i:i + batch_size].to(model.device),
                            positions=pos[i:i + batch_size].to(model.device)).float().cpu())  # [b, V]
    summary = tpp.metrics.summarize(torch.cat(logits), batch)
    out = {}
    for name, (mean, sem) in summary.items():
        out[name], out[f"{name}_sem"] = float(mean), float(sem)
    out["n"] = len(tokens)
    return out


def heldout_evaluator(blocks: torch.Tensor, batch_size: int = 8) -> Evaluator:
    """Next-token loss, perplexity and accuracy on ``blocks`` [N, T] of held-out text."""

    def evaluate(model: GPT2) -> dict:
        loss_sum, correct, n = 0.0, 0, 0
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size].to(model.device)
            logits = model(x)[:, :-1].float()  # [b, T-1, V]
            target = x[:, 1:]
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            n += target.numel()
        loss = loss_sum / n
        return {"heldout": {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "accuracy": correct / n,
                            "n_tokens": n}}

    return evaluate
