"""Evaluators: callables ``evaluate(model) -> {set name: {metric: value}}`` run by the trainer.

* ``tpp_evaluator``: the paper's two evaluation sets (3000 examples; 1150 whose c
  is one token), scored by ``tpp.metrics.summarize`` on the logits at the
  answer position: loss, accuracy, logit difference (each with its s.e.m.).
* ``heldout_evaluator``: next-token loss and accuracy on held-out text blocks.
* ``copying_evaluator``: whether a pretraining model copies from context yet, on
  repeated random tokens: the loss on the first and second copy, and its heads'
  induction and previous-token scores.

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


def copying_evaluator(pool: torch.Tensor, seq_len: int = 50, n_examples: int = 10, threshold: float = 0.4,
                      seed: int = 0) -> Evaluator:
    """Copying from context, measured on ``n_examples`` sequences [<|endoftext|>, s, s] of
    ``seq_len`` tokens drawn from the ids in ``pool`` (``circuitlab.classify.repeated_random_tokens``):

    * loss_first / loss_second: next-token loss on s's first copy (only guessable) and on its
      second copy after the first token (predictable by copying);
    * every head's induction score (TransformerLens's: ``circuitlab.classify.induction_scores``)
      and previous-token score (mean attention from each token to the one before it): the
      largest of each, the heads above ``threshold`` and the best three as "layer.head".

    Logged at every evaluation of a pretraining run, it shows when induction heads form.
    """
    from circuitlab.classify import attention_patterns, induction_from_patterns, repeated_random_tokens

    tokens = repeated_random_tokens(n_examples, seq_len, seed=seed, pool=pool)  # [B, 1 + 2 seq_len]

    @torch.no_grad()
    def evaluate(model: GPT2) -> dict:
        if tokens.shape[1] > model.cfg.n_ctx:
            raise ValueError(f"copying eval: 1 + 2 x seq_len={seq_len} tokens exceed the model's n_ctx="
                             f"{model.cfg.n_ctx}; pass seq_len <= {(model.cfg.n_ctx - 1) // 2}")
        x = tokens.to(model.device)
        logits, patterns = attention_patterns(model, x, with_logits=True)  # [B, T, V], [B, L, H, T, T]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")  # t predicts t + 1
        scores = {"induction": induction_from_patterns(patterns, seq_len),
                  "previous": patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))}  # [L, H]
        out = {"loss_first": float(ce[:, :seq_len].mean()), "loss_second": float(ce[:, seq_len + 1:].mean())}
        for name, s in scores.items():
            top = s.flatten().topk(min(3, s.numel()))
            out[f"{name}_max"] = float(top.values[0])
            out[f"{name}_heads"] = int((s > threshold).sum())
            out[f"{name}_top"] = [f"{int(i) // s.shape[1]}.{int(i) % s.shape[1]}" for i in top.indices]
        out |= {"pool_size": len(pool), "seq_len": seq_len, "n_examples": n_examples, "threshold": threshold}
        return {"copying": out}

    return evaluate
