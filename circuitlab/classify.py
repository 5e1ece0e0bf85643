"""Head classes from attention patterns (the paper's section 5.4).

For each example and head, a score per class, averaged over the example's real
query positions 1 .. n-1 (position 0 can attend only to itself, so it tells
nothing; padding is never a query):

    first      attention to position 0
    self       attention to the query's own position (the diagonal)
    previous   attention to the position before (the diagonal at offset -1)
    induction  attention to the token after an earlier occurrence of the query's
               token (positions j + 1 with tokens[j] == tokens[q], j + 1 < q),
               averaged over the queries that have such an occurrence; undefined
               for an example without a repeated token, which then does not count

An example shows a class when its score exceeds ``score_threshold`` (0.4); a head
is given the class when at least ``fraction`` (80 %) of the examples where the
score is defined show it. A head may get several classes, or none.

A count depends on the examples drawn: a head whose share of examples lies near 80 % is
in or out by chance. Each count comes with its bootstrap interval (the examples resampled
with replacement, :data:`BOOTSTRAP_RESAMPLES` times, the central 95 %) and each head's
share with its standard error sqrt(f (1 - f) / n).

Target attention (the paper's Figure 2): attention from each example's final
position to marked key positions (the c tokens), per head, averaged over examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clikit import Range
from minigpt2 import GPT2
from minigpt2.engine import check_model

CLASSES = ("first", "self", "previous", "induction")


@torch.no_grad()
def attention_patterns(model: GPT2, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       with_logits: bool = False):
    """[B, L, H, T, T]: every head's attention pattern (query x key); with ``with_logits``,
    (logits [B, T, V], patterns) from the same forward pass."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layer)]
    logits, cache = model.run_with_cache(tokens.to(model.device), names=names, attention_mask=None
                                         if attention_mask is None else attention_mask.to(model.device))
    patterns = torch.stack([cache[n] for n in names], dim=1).float()
    return (logits, patterns) if with_logits else patterns


def class_weights(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per class, [B, T(query), T(key)] weights: each defined query's row sums to 1/(its example's query count)."""
    B, T = tokens.shape
    real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    tokens = tokens.cpu()
    query = real.clone()
    query[:, 0] = False  # [B, T]
    q = torch.arange(T)
    eye = torch.eye(T, dtype=torch.bool)
    first = torch.zeros(T, T, dtype=torch.bool)
    first[:, 0] = True
    previous = torch.zeros(T, T, dtype=torch.bool)
    previous[q[1:], q[1:] - 1] = True
    # induction: key k = j + 1 where tokens[j] == tokens[q], j + 1 < q, j real
    same = (tokens[:, :, None] == tokens[:, None, :]) & real[:, :, None] & real[:, None, :]  # [B, q, j]
    earlier = torch.zeros(T, T, dtype=torch.bool)
    earlier[:, :] = q[None, :] + 1 < q[:, None]  # j + 1 < q
    induction = torch.zeros(B, T, T, dtype=torch.bool)
    induction[:, :, 1:] = (same & earlier)[:, :, :-1]  # shift j -> j + 1
    out = {}
    for name, w in (("first", first), ("self", eye), ("previous", previous), ("induction", induction)):
        w = (w.expand(B, T, T) & query[:, :, None]).float()
        has = w.sum(dim=2) > 0  # [B, q]: the query counts for this class
        n = has.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        out[name] = w / n[:, :, None]
    return out


def class_scores(patterns: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """patterns [B, L, H, T, T] -> per class [B, L, H] scores (NaN where undefined)."""
    out = {}
    for name, w in class_weights(tokens, attention_mask).items():
        score = torch.einsum("blhqk,bqk->blh", patterns, w.to(patterns.device))
        defined = w.sum(dim=(1, 2)) > 0  # [B]
        out[name] = torch.where(defined[:, None, None], score, torch.full_like(score, float("nan")))
    return out


# ---------------------------------------------------------------- uncertainty over the examples drawn
BOOTSTRAP_RESAMPLES, BOOTSTRAP_LEVEL = 1000, 0.95


def bootstrap_weights(n_examples: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """[R, B]: how often each of B examples is drawn in each of R resamples with replacement (rows sum to B).
    The same seed and sizes give the same resamples, so models classified on the same prompts share them."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_examples, (n_resamples, n_examples), generator=g)
    return torch.zeros(n_resamples, n_examples).scatter_add_(1, draws, torch.ones(n_resamples, n_examples))


def resampled_assignment(shown: torch.Tensor, defined: torch.Tensor, weights: torch.Tensor,
                         min_fraction: float) -> torch.Tensor:
    """[R, L, H] bool: the class assignment (shown in >= min_fraction of the defined examples) in each
    resample. shown, defined [B, L, H] bool; weights [R, B] (:func:`bootstrap_weights`)."""
    B, L, H = shown.shape
    n = weights @ defined.reshape(B, -1).float()  # [R, L*H]
    frac = (weights @ (shown & defined).reshape(B, -1).float()) / n.clamp(min=1)
    return ((frac >= min_fraction) & (n > 0)).view(-1, L, H)


def resampled_attending(per_example: torch.Tensor, threshold: float, weights: torch.Tensor) -> torch.Tensor:
    """[R, L, H] bool: heads whose mean target attention over each resample exceeds ``threshold``;
    per_example [B, L, H] (:func:`target_attention`), weights [R, B]."""
    B, L, H = per_example.shape
    mean = (weights @ per_example.reshape(B, -1).float().cpu()) / weights.sum(dim=1, keepdim=True)
    return (mean > threshold).view(-1, L, H)


def count_interval(assigned: torch.Tensor, among: list[tuple[int, int]] | None = None,
                   level: float = BOOTSTRAP_LEVEL) -> tuple[int, int]:
    """The central ``level`` interval of a head count over resamples: assigned [R, L, H] bool, counted
    among the heads ``among`` (a circuit's; None: all)."""
    if among is not None:
        keep = torch.zeros(assigned.shape[1:], dtype=torch.bool)
        for l, h in among:
            keep[l, h] = True
        assigned = assigned & keep
    counts = assigned.flatten(1).sum(dim=1).double()
    lo, hi = torch.quantile(counts, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return int(round(lo)), int(round(hi))


@dataclass
class HeadClasses:
    """Per class: mean score [L, H], fraction of examples over the threshold [L, H] and its standard error,
    the heads assigned, and the assignment in each bootstrap resample of the examples [R, L, H]."""

    mean: dict[str, torch.Tensor]
    fraction: dict[str, torch.Tensor]
    heads: dict[str, list[tuple[int, int]]]
    score_threshold: float
    min_fraction: float
    n_examples: int
    sem: dict[str, torch.Tensor] = field(default_factory=dict)  # sqrt(f (1 - f) / n): the share's standard error
    resampled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def interval(self, name: str, among: list[tuple[int, int]] | None = None,
                 level: float = BOOTSTRAP_LEVEL) -> tuple[int, int]:
        """The bootstrap interval of how many heads (of ``among``) class ``name`` has."""
        return count_interval(self.resampled[name], among, level)

    def borderline(self, name: str, z: float = 2.0) -> list[tuple[int, int]]:
        """Heads whose share lies within ``z`` standard errors of min_fraction: the ones another draw of
        examples may classify otherwise."""
        f, se = self.fraction[name], self.sem[name]
        near = ((f - self.min_fraction).abs() <= z * se) & (se > 0)
        return [tuple(x) for x in near.nonzero().tolist()]

    def classes_of(self, layer: int, head: int) -> list[str]:
        return [c for c, hs in self.heads.items() if (layer, head) in hs]

    def head_lists(self) -> dict[str, list[list[int]]]:
        """Per class, its heads as [layer, head] lists (JSON's form)."""
        return {c: [list(h) for h in hs] for c, hs in self.heads.items()}

    def counts(self, among: list[tuple[int, int]] | None = None) -> dict[str, int]:
        """How many heads (of ``among``, e.g. a circuit's) each class has."""
        keep = None if among is None else set(map(tuple, among))
        return {c: sum(1 for h in hs if keep is None or h in keep) for c, hs in self.heads.items()}

    def to_json(self) -> dict:
        return {"score_threshold": self.score_threshold, "min_fraction": self.min_fraction,
                "n_examples": self.n_examples, "heads": self.head_lists(),
                **({"count_interval": {c: list(self.interval(c)) for c in self.resampled},
                    "interval_level": BOOTSTRAP_LEVEL, "fraction_sem": {c: v.tolist() for c, v in self.sem.items()}}
                   if self.resampled else {}),
                "mean": {c: v.tolist() for c, v in self.mean.items()},
                "fraction": {c: v.tolist() for c, v in self.fraction.items()}}


def check_class_args(score_threshold: float, min_fraction: float, c_threshold: float | None = None) -> None:
    """Refuse thresholds outside their ranges (NaN included): attention weights lie in [0, 1]."""
    weight = Range(0, 1)
    weight.check("score_threshold", score_threshold, why="an attention weight; the paper: 0.4")
    Range(0, 1, lo_open=True).check("min_fraction", min_fraction, why="a share of the examples; the paper: 0.8")
    if c_threshold is not None:
        weight.check("c_threshold", c_threshold, why="an attention weight; the paper: 0.4")


def classify_heads(model: GPT2, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   score_threshold: float = 0.4, min_fraction: float = 0.8,
                   patterns: torch.Tensor | None = None, bootstrap_seed: int = 0) -> HeadClasses:
    """Classify every head of ``model`` on the prompts ``tokens`` [B, T] (see the module docstring), with
    each count's bootstrap interval over the prompts (resamples seeded by ``bootstrap_seed``)."""
    check_class_args(score_threshold, min_fraction)
    check_model(model, "classify_heads")
    tokens = tokens if isinstance(tokens, torch.Tensor) else model.as_tokens(tokens).cpu()
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"classify_heads needs a non-empty [B, T] batch of prompts, got shape {tuple(tokens.shape)}")
    attention_mask = model.check_attention_mask(attention_mask, tokens)
    if patterns is None:
        patterns = attention_patterns(model, tokens, attention_mask)
    scores = class_scores(patterns, tokens, attention_mask)
    weights = bootstrap_weights(tokens.shape[0], seed=bootstrap_seed)
    mean, fraction, sem, heads, resampled = {}, {}, {}, {}, {}
    for name, s in scores.items():
        s = s.cpu()
        defined = ~s.isnan()  # [B, L, H]
        n = defined.sum(dim=0)
        mean[name] = torch.where(defined, s, torch.zeros_like(s)).sum(dim=0) / n.clamp(min=1)
        fraction[name] = ((s > score_threshold) & defined).sum(dim=0) / n.clamp(min=1)
        sem[name] = (fraction[name] * (1 - fraction[name]) / n.clamp(min=1)).sqrt()
        assigned = (fraction[name] >= min_fraction) & (n > 0)
        heads[name] = [tuple(x) for x in assigned.nonzero().tolist()]
        resampled[name] = resampled_assignment(s > score_threshold, defined, weights, min_fraction)
    return HeadClasses(mean, fraction, heads, score_threshold, min_fraction, tokens.shape[0], sem, resampled)


def target_attention(patterns: torch.Tensor, query_positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention from each example's query position to its marked keys, summed over the keys.

    patterns [B, L, H, T, T], query_positions [B], key_mask [B, T] bool -> [B, L, H].
    """
    B = patterns.shape[0]
    rows = patterns[torch.arange(B), :, :, query_positions.long()]  # [B, L, H, T(key)]
    return (rows * key_mask[:, None, None, :].to(rows.dtype)).sum(dim=-1)


def attending_heads(mean_attention: torch.Tensor, threshold: float = 0.4) -> list[tuple[int, int]]:
    """Heads whose mean target attention [L, H] exceeds ``threshold``, strongest first."""
    flat = mean_attention.flatten()
    H = mean_attention.shape[1]
    order = flat.argsort(descending=True).tolist()
    return [(i // H, i % H) for i in order if flat[i] > threshold]


# ---------------------------------------------------------------- induction on repeated random tokens
def repeated_random_tokens(n_examples: int = 10, seq_len: int = 50, vocab_size: int = 50257, seed: int = 0,
                           bos: int | None = 50256, pool: torch.Tensor | None = None) -> torch.Tensor:
    """[n_examples, (1) + 2 seq_len]: ``bos`` (GPT-2's <|endoftext|>; None: none), then seq_len random
    tokens, then the same tokens again. Tokens are drawn uniformly from [0, vocab_size), as
    TransformerLens's tutorials draw them, or from the ids in ``pool``; seeded on the CPU."""
    Range(1, whole=True).check("n_examples", n_examples, why="repeated random token sequences")
    Range(2, whole=True).check("seq_len", seq_len, why="random tokens per sequence, each repeated once")
    g = torch.Generator().manual_seed(seed)
    if pool is None:
        seq = torch.randint(0, vocab_size, (n_examples, seq_len), generator=g)
    else:
        pool = torch.as_tensor(pool, dtype=torch.long).flatten()
        if len(pool) == 0:
            raise ValueError("pool holds no token id to draw from")
        seq = pool[torch.randint(0, len(pool), (n_examples, seq_len), generator=g)]
    parts = [seq, seq] if bos is None else [torch.full((n_examples, 1), bos, dtype=torch.long), seq, seq]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def induction_scores(model: GPT2, tokens: torch.Tensor | None = None, seq_len: int = 50, **random) -> torch.Tensor:
    """[n_layer, n_head]: TransformerLens's induction score (its tutorials' ``induction_attn_detector``):
    on repeated random tokens [BOS, s, s] with |s| = seq_len, every head's attention pattern's
    diagonal at offset 1 - seq_len (from each token of the second s to the token after its first
    occurrence), averaged over that diagonal and the examples. An induction head scores near 1,
    other heads near 0. ``tokens``: such a batch (default: ``repeated_random_tokens(seq_len=seq_len,
    vocab_size=model's, **random)``)."""
    if tokens is None:
        tokens = repeated_random_tokens(seq_len=seq_len, vocab_size=model.cfg.vocab_size, **random)
    if tokens.ndim != 2 or tokens.shape[1] < 2 * seq_len:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} cannot hold two repeats of seq_len={seq_len}")
    return induction_from_patterns(attention_patterns(model, tokens), seq_len)


def induction_from_patterns(patterns: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[L, H]: ``induction_scores`` from the patterns [B, L, H, T, T] of [BOS, s, s], |s| = seq_len."""
    return patterns.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1).mean(dim=(0, -1))


# ---------------------------------------------------------------- a model's census, for its card
# the paper's section 5.4, in GPT-2 small's circuit
PAPER_CLASS_COUNTS = {"first": 29, "self": 1, "previous": 4, "induction": 3, "c-attending": 6}
INDUCTION_SEQ_LEN, INDUCTION_EXAMPLES = 50, 10  # TransformerLens's tutorials: [BOS, s, s], |s| = 50, 10 sequences


def induction_seq_len(model: GPT2) -> int:
    """|s| of the induction probe: 50, or what n_ctx holds of [BOS, s, s]."""
    return min(INDUCTION_SEQ_LEN, (model.cfg.n_ctx - 1) // 2)


def prepend_bos(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, bos: int = 50256
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, 1 + T]: ``bos`` (GPT-2's <|endoftext|>) before every prompt, as TransformerLens's ``to_tokens``
    prepends it by default (``prepend_bos=True``); the attention mask likewise (None stays None)."""
    first = torch.full_like(tokens[:, :1], bos)
    mask = None if attention_mask is None else torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], 1)
    return torch.cat([first, tokens], 1), mask


@torch.no_grad()
def head_census(model: GPT2, batch, n_examples: int = 100, seed: int = 0, pool: torch.Tensor | None = None,
                score_threshold: float = 0.4, min_fraction: float = 0.8) -> dict:
    """What ``circuits.py classify --seed SEED --examples N`` counts for one model: head classes on
    ``n_examples`` prompts of the eval ``batch`` (a tpp.EvalBatch) drawn as it draws them, as they
    are and with <|endoftext|> before each (TransformerLens's default input: "classes_bos"), and
    heads with an induction score > ``score_threshold`` on repeated random tokens (TransformerLens's
    recipe, and from ``pool``, the base's most frequent pretraining tokens, when given)."""
    Range(1, len(batch), whole=True).check("n_examples", n_examples, why=f"the batch's {len(batch)} examples")
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    sub = batch.select(order[:n_examples])
    hc = classify_heads(model, sub.tokens, sub.attention_mask, score_threshold, min_fraction)
    hb = classify_heads(model, *prepend_bos(sub.tokens, sub.attention_mask), score_threshold, min_fraction)
    rep_len = induction_seq_len(model)
    census = {"n_examples": n_examples, "seed": seed, "score_threshold": score_threshold, "min_fraction": min_fraction,
              "classes": hc.counts(), "heads": hc.head_lists(), "classes_bos": hb.counts(), "heads_bos": hb.head_lists(),
              "classes_interval": {c: list(hc.interval(c)) for c in CLASSES}, "interval_level": BOOTSTRAP_LEVEL}
    probes = {"induction_random": {}, **({"induction_frequent": {"pool": pool}} if pool is not None else {})}
    for key, extra in probes.items():
        s = induction_scores(model, seq_len=rep_len, n_examples=INDUCTION_EXAMPLES, seed=seed, **extra).cpu()
        census[key] = {"heads": int((s > score_threshold).sum()), "max": float(s.max()), "seq_len": rep_len,
                       **({"pool_size": len(pool)} if extra else {})}
    return census
