"""``transformer_lens.head_detector`` renamed: ``detect_head`` and its detection patterns, with TransformerLens's
semantics and numbers (tests/test_tl_rename.py runs TransformerLens's own detect_head on the same weights).

    from minigpt2 import load_pretrained
    from minigpt2.head_detector import detect_head
    model = load_pretrained("weights/base")
    scores = detect_head(model, "one two three one two three", "induction_head")   # [n_layers, n_heads]

What differs: only the attention patterns are cached (TransformerLens caches every activation), and a
bad argument raises :class:`HeadDetectorError` (a ValueError that is also the AssertionError
TransformerLens raises) with TransformerLens's message.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List, Literal, Optional, Tuple, Union, get_args

import numpy as np
import torch

from .utils import is_lower_triangular, is_square

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES: List[str] = list(get_args(HeadName))
ErrorMeasure = Literal["abs", "mul"]
LayerHeadTuple = Tuple[int, int]
LayerToHead = Dict[int, List[int]]

INVALID_HEAD_NAME_ERR = f"detection_pattern must be a Tensor or one of head names: {HEAD_NAMES}; got %s"
CACHE_WITH_SEQ_LIST_ERR = ("A single cache cannot be reused across multiple prompts, so `cache` is not\n"
                           "supported when `seq` is a list. Pass one prompt at a time, or omit `cache`\n"
                           "and let each prompt be run separately.")
SEQ_LEN_ERR = "The sequence must be non-empty and must fit within the model's context window."
DET_PAT_NOT_SQUARE_ERR = ("The detection pattern must be a lower triangular matrix of shape (sequence_length, "
                          "sequence_length); sequence_length=%d; got detection pattern of shape %s")


class HeadDetectorError(ValueError, AssertionError):
    """A bad argument to detect_head (TransformerLens asserts there)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise HeadDetectorError(message)


def detect_head(model, seq: Union[str, List[str]], detection_pattern: Union[torch.Tensor, HeadName],
                heads: Optional[Union[List[LayerHeadTuple], LayerToHead]] = None, cache=None, *,
                exclude_bos: bool = False, exclude_current_token: bool = False,
                error_measure: ErrorMeasure = "mul") -> torch.Tensor:
    """Score every head (or ``heads``; the others get -1) by how closely its attention on ``seq`` matches
    ``detection_pattern`` [T, T] (lower triangular) or a named pattern: [n_layers, n_heads].

    ``error_measure="mul"``: the share of the head's attention that falls where the pattern is 1;
    ``"abs"``: 1 - mean |pattern - attention| * T, rounded to 3 decimals. A list of prompts averages
    the scores of each (a named pattern only). ``cache``: a one-prompt cache with the batch axis removed
    (``run_with_cache(..., remove_batch_dim=True)``). Exactly TransformerLens's detect_head.
    """
    cfg = model.cfg
    tokens = model.to_tokens(seq).to(cfg.device)
    seq_len = tokens.shape[-1]
    _require(error_measure in get_args(ErrorMeasure),
             f"Invalid error_measure={error_measure}; valid values are {get_args(ErrorMeasure)}")
    if isinstance(detection_pattern, str):
        _require(detection_pattern in HEAD_NAMES, INVALID_HEAD_NAME_ERR % detection_pattern)
        if isinstance(seq, list):
            if cache is not None:
                raise HeadDetectorError(CACHE_WITH_SEQ_LIST_ERR)
            scores = [detect_head(model, one, detection_pattern, heads=heads, exclude_bos=exclude_bos,
                                  exclude_current_token=exclude_current_token, error_measure=error_measure)
                      for one in seq]
            return torch.stack(scores).mean(0)
        detection_pattern = PATTERNS[detection_pattern](tokens.cpu()).to(cfg.device)
    if error_measure == "mul" and not set(detection_pattern.unique().tolist()).issubset({0, 1}):
        logging.warning("Using detection pattern with values other than 0 or 1 with error_measure 'mul'")
    _require(1 < tokens.shape[-1] < cfg.n_ctx, SEQ_LEN_ERR)
    _require(is_lower_triangular(detection_pattern) and seq_len == detection_pattern.shape[0],
             DET_PAT_NOT_SQUARE_ERR % (seq_len, detection_pattern.shape))
    if cache is None:
        _, cache = model.run_with_cache(tokens, remove_batch_dim=True, names_filter=lambda n: n.endswith("hook_pattern"))
    matches = -torch.ones(cfg.n_layers, cfg.n_heads, dtype=cfg.dtype)
    for layer, layer_heads in _layer_to_heads(heads, cfg).items():
        patterns = cache["pattern", layer, "attn"]  # [H, Tq, Tk]
        if patterns.ndim == 4:
            _require(patterns.shape[0] == 1, f"the cache holds {patterns.shape[0]} prompts; detect_head takes a "
                                             "one-prompt cache with its batch axis removed (remove_batch_dim=True)")
            patterns = patterns[0]
        for head in layer_heads:
            matches[layer, head] = compute_head_attention_similarity_score(
                patterns[head], detection_pattern=detection_pattern, exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure=error_measure)
    return matches


def _layer_to_heads(heads, cfg) -> LayerToHead:
    if heads is None:
        return {layer: list(range(cfg.n_heads)) for layer in range(cfg.n_layers)}
    if isinstance(heads, list):
        layer2heads: LayerToHead = defaultdict(list)
        for layer, head in heads:
            layer2heads[layer].append(head)
        return layer2heads
    return heads


def get_previous_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[T, T]: 1 from each position to the one before it."""
    pattern = torch.zeros(tokens.shape[-1], tokens.shape[-1])
    pattern[1:, :-1] = torch.eye(tokens.shape[-1] - 1)
    return torch.tril(pattern)


def get_duplicate_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[T, T]: 1 from each position to earlier positions holding the same token."""
    token_pattern = tokens.repeat(tokens.shape[-1], 1).numpy()
    eq_mask = np.equal(token_pattern, token_pattern.T).astype(int)
    np.fill_diagonal(eq_mask, 0)  # a token is trivially a duplicate of itself
    return torch.tril(torch.as_tensor(eq_mask.astype(int)).float())


def get_induction_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[T, T]: 1 from each position to the token after an earlier copy of it."""
    duplicate = get_duplicate_token_head_detection_pattern(tokens)
    shifted = torch.roll(duplicate, shifts=1, dims=1)
    zeros_column = torch.zeros(duplicate.shape[0], 1)  # the roll brought the last column to the front
    return torch.tril(torch.cat((zeros_column, shifted[:, 1:]), dim=1))


PATTERNS = {"previous_token_head": get_previous_token_head_detection_pattern,
            "duplicate_token_head": get_duplicate_token_head_detection_pattern,
            "induction_head": get_induction_head_detection_pattern}


def get_supported_heads() -> None:
    print(f"Supported heads: {HEAD_NAMES}")


def compute_head_attention_similarity_score(attention_pattern: torch.Tensor, detection_pattern: torch.Tensor, *,
                                            exclude_bos: bool, exclude_current_token: bool,
                                            error_measure: ErrorMeasure) -> float:
    """One head's score: attention_pattern [Tq, Tk] (lower triangular) against detection_pattern [T, T]."""
    _require(is_square(attention_pattern), f"Attention pattern is not square; got shape {attention_pattern.shape}")
    if error_measure == "mul":
        if exclude_bos or exclude_current_token:
            attention_pattern = attention_pattern.clone()  # a view into the caller's cache
        if exclude_bos:
            attention_pattern[:, 0] = 0
        if exclude_current_token:
            attention_pattern.fill_diagonal_(0)
        score = attention_pattern * detection_pattern
        return (score.sum() / attention_pattern.sum()).item()
    abs_diff = (attention_pattern - detection_pattern).abs()
    _require((abs_diff - torch.tril(abs_diff).to(abs_diff.device)).sum() == 0,
             "the attention pattern is not lower triangular (causal)")
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        abs_diff.fill_diagonal_(0)
    return 1 - round((abs_diff.mean() * size).item(), 3)


__all__ = ["HEAD_NAMES", "HeadDetectorError", "HeadName", "compute_head_attention_similarity_score", "detect_head",
           "get_duplicate_token_head_detection_pattern", "get_induction_head_detection_pattern",
           "get_previous_token_head_detection_pattern", "get_supported_heads"]
