"""Greedy and sampled generation with a KV cache."""

from __future__ import annotations

import torch

from .model import GPT2, KVCache
from .tokenizer import EOT_TOKEN


@torch.no_grad()
def generate(model: GPT2, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, stop_token: int | None = EOT_TOKEN, seed: int | None = None) -> torch.Tensor:
    """Continue ``tokens`` [B, T] (equal lengths) by up to ``max_new_tokens``.

    temperature 0 is greedy; otherwise sample from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens if given. A row stops after
    emitting ``stop_token``; stopped rows are padded with it. The prompt is
    encoded once; every new token costs one single-position forward.

    Returns [B, T + n] with n <= max_new_tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    tokens = tokens.to(model.device)
    max_new_tokens = min(max_new_tokens, model.cfg.n_ctx - tokens.shape[1])
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg.n_layer)
    out = tokens
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=model.device)
    logits = model(tokens, cache=cache)[:, -1]  # [B, vocab]
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits.float() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)[:, 0]
        if stop_token is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
            done |= nxt == stop_token
        out = torch.cat([out, nxt[:, None]], dim=1)
        if stop_token is not None and done.all():
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out
