"""The copying probe of a pretraining run: whether a model copies from context yet.

Logged at every evaluation of ``train.py pretrain`` (it is one of the evaluators that
finetune's trainer runs), it shows when induction and previous-token heads form. It lives in
circuitlab because it measures heads (:mod:`circuitlab.classify`); finetune does not import circuitlab.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from minigpt2 import GPT2
from minigpt2.heads import Head

from .classify import attention_patterns, induction_from_patterns, repeated_random_tokens


def copying_evaluator(pool: torch.Tensor, seq_len: int = 50, n_examples: int = 10, threshold: float = 0.4,
                      seed: int = 0) -> Callable[[GPT2], dict]:
    """Copying from context, measured on ``n_examples`` sequences [<|endoftext|>, s, s] of
    ``seq_len`` tokens drawn from the ids in ``pool`` (``circuitlab.classify.repeated_random_tokens``):

    * loss_first / loss_second: next-token loss on s's first copy (only guessable) and on its
      second copy after the first token (predictable by copying);
    * every head's induction score (TransformerLens's: ``circuitlab.classify.induction_scores``)
      and previous-token score (mean attention from each token to the one before it): the
      largest of each, the heads above ``threshold`` and the best three by their labels ("L3H1"; logs written
      before labels name them "3.1", which ``minigpt2.heads.Head.parse`` reads too).

    Logged at every evaluation of a pretraining run, it shows when induction heads form.
    """
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
            out[f"{name}_top"] = [Head.from_index(int(i), s.shape[1]).label for i in top.indices]
        out |= {"pool_size": len(pool), "seq_len": seq_len, "n_examples": n_examples, "threshold": threshold}
        return {"copying": out}

    return evaluate
