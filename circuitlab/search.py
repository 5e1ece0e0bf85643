"""The paper's attention-focused circuit search (section 5.3): greedy head ablation, layer by layer.

The algorithm (:func:`search_reference` is its plain transcription):

    ablated = {}
    for layer in layers (0 upward for "layer-up", as the paper; from the top for
                         "layer-down", ACDC's direction, heads also in reverse):
        baseline = perf(ablated)                         # this layer's baseline
        for head in layer:
            if drop(baseline, perf(ablated + {head})) < threshold:
                ablated += {head}                        # kept ablation: head leaves the circuit

Heads ablated in this layer stay ablated for the later heads of the same layer,
but every check compares with the baseline taken when the layer began.

``drop`` is how much worse a check is than the layer's baseline:
    "relative" (the default; the paper's "performance relative to the baseline"):
        (baseline - perf) / |baseline|   with |baseline| floored at 1e-12
    "absolute":
        baseline - perf
For metrics where lower is better (loss, KL) the sign flips (perf - baseline).
An ablation is kept when drop < threshold, so a check that does no worse than
the baseline is always kept. With the paper's accuracy and threshold 0.03, a
head is removed when accuracy stays above 97 % of the layer's baseline.
(A relative drop is undefined where the baseline is 0, as KL to the clean model
is at the start; use "absolute" there.)

Rigorous mode (the paper's lesson that circuits found on 100 examples fall
apart on 3000): an ablation that passes on the search prompts is re-checked on
a larger set against that set's own layer baseline, and kept only if it passes
there too.

:func:`search` gives the same circuit as :func:`search_reference`, faster:
  * prefix sharing: the residual stream entering the current layer, with the
    ablations kept so far, is computed once and shared by every candidate of the
    layer; only the layers from there up run per candidate;
  * baselines are never recomputed: a layer's baseline is the value of the last
    accepted candidate (or of the previous baseline);
  * speculative batches: the next ``speculate`` heads are evaluated together as
    variants built on a predicted sequence of decisions (each head decided like
    the one before it); results are used up to the first head whose decision
    differs from the prediction, the rest are discarded and re-run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from minigpt2 import GPT2
from minigpt2.masking import _z_edit, replacement_values, run_with_head_masks_loop

from .sweep import BLOCK_ROWS, Metric, Prompts, rows_per_block

ORDERS = ("layer-up", "layer-down")
DROPS = ("relative", "absolute")
EPS = 1e-12


def check_search_args(threshold: float, order: str, drop: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown search order {order!r}; choose one of {ORDERS}")
    if drop not in DROPS:
        raise ValueError(f"unknown drop {drop!r}; choose one of {DROPS}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r} "
                         "(the paper uses 0.03: keep an ablation that costs less than 3 %)")
    if drop == "relative" and threshold > 1:
        raise ValueError(f"threshold {threshold} is out of range for a relative drop: it must lie in [0, 1] "
                         "(0.03 keeps an ablation that costs less than 3 % of the layer's baseline); "
                         "for a drop in the metric's own units use drop='absolute' (--drop absolute)")


def performance_drop(baseline: float, value: float, higher_is_better: bool, drop: str = "relative") -> float:
    """How much worse ``value`` is than ``baseline`` (see the module docstring)."""
    d = baseline - value if higher_is_better else value - baseline
    return d / max(abs(baseline), EPS) if drop == "relative" else d


def search_order(n_layer: int, n_head: int, order: str) -> list[list[tuple[int, int]]]:
    """The heads, grouped by layer, in the order they are checked."""
    layers = [[(l, h) for h in range(n_head)] for l in range(n_layer)]
    return layers if order == "layer-up" else [heads[::-1] for heads in layers[::-1]]


@dataclass
class Check:
    """One head's check: its values against the layer's baseline, and the decision."""

    layer: int
    head: int
    baseline: float
    value: float
    drop: float
    kept: bool  # True: the ablation was kept (the head left the circuit)
    rigorous_baseline: float | None = None
    rigorous_value: float | None = None
    rigorous_drop: float | None = None


@dataclass
class SearchResult:
    n_layer: int
    n_head: int
    metric: str
    higher_is_better: bool
    threshold: float
    drop: str
    order: str
    ablation: str
    n_examples: int
    rigorous_examples: int | None
    ablated: list[tuple[int, int]]
    checks: list[Check] = field(repr=False)
    variants_evaluated: int = 0
    seconds: float = 0.0

    @property
    def kept_heads(self) -> list[tuple[int, int]]:
        gone = set(self.ablated)
        return [(l, h) for l in range(self.n_layer) for h in range(self.n_head) if (l, h) not in gone]

    @property
    def clean_value(self) -> float:
        """The metric of the intact model on the search prompts."""
        return self.checks[0].baseline

    @property
    def final_value(self) -> float:
        """The metric of the found circuit (every kept ablation) on the search prompts."""
        kept = [c for c in self.checks if c.kept]
        return kept[-1].value if kept else self.clean_value

    def mask(self) -> torch.Tensor:
        """[L, H]: 1 for a head of the circuit, 0 for an ablated one."""
        m = torch.ones(self.n_layer, self.n_head)
        for l, h in self.ablated:
            m[l, h] = 0
        return m

    def to_json(self, model: str, config: dict) -> dict:
        """The circuit file: {"model", "config", "metric", "threshold", "ablated_heads", "kept_heads", ...}."""
        return {
            "model": model, "config": config, "metric": self.metric, "higher_is_better": self.higher_is_better,
            "threshold": self.threshold, "drop": self.drop, "order": self.order, "ablation": self.ablation,
            "n_examples": self.n_examples, "rigorous_examples": self.rigorous_examples,
            "ablated_heads": [list(x) for x in sorted(self.ablated)],
            "kept_heads": [list(x) for x in self.kept_heads],
            "n_ablated": len(self.ablated), "n_kept": len(self.kept_heads),
            "clean_value": self.clean_value, "circuit_value": self.final_value,
            "variants_evaluated": self.variants_evaluated, "seconds": round(self.seconds, 3),
            "checks": [asdict(c) for c in self.checks],
        }


def _mean_perf(values: torch.Tensor) -> list[float]:
    """Per-example metric values [V, B] -> the mean of each variant."""
    return values.to(torch.float64).mean(dim=1).tolist()


def _validate(model: GPT2, prompts: Prompts, metric: Metric, rigorous, rigorous_metric, threshold, order, drop):
    check_search_args(threshold, order, drop)
    if len(prompts) == 0:
        raise ValueError("search needs at least one prompt; the eval set is empty")
    if (rigorous is None) != (rigorous_metric is None):
        raise ValueError("rigorous mode needs both rigorous_prompts and rigorous_metric (a metric bound to those prompts)")


def search_reference(model: GPT2, prompts: Prompts, metric: Metric, threshold: float = 0.03,
                     order: str = "layer-up", drop: str = "relative", rigorous_prompts: Prompts | None = None,
                     rigorous_metric: Metric | None = None) -> SearchResult:
    """The paper's algorithm, plainly: one forward (through hooks) per check and per baseline."""
    _validate(model, prompts, metric, rigorous_prompts, rigorous_metric, threshold, order, drop)
    t0 = time.perf_counter()
    L, H = model.cfg.n_layer, model.cfg.n_head
    count = [0]

    def perf(mask, p: Prompts, m: Metric) -> float:
        count[0] += 1
        with torch.no_grad():
            values = run_with_head_masks_loop(model, p.tokens, mask[None], metric=m, **p.masking_kwargs())
        return _mean_perf(values)[0]

    def dropped(base, value):
        return performance_drop(base, value, metric.higher_is_better, drop)

    mask = torch.ones(L, H, dtype=model.dtype)
    checks: list[Check] = []
    for heads in search_order(L, H, order):
        base = perf(mask, prompts, metric)
        rbase = perf(mask, rigorous_prompts, rigorous_metric) if rigorous_prompts is not None else None
        for l, h in heads:
            trial = mask.clone()
            trial[l, h] = 0
            value = perf(trial, prompts, metric)
            check = Check(l, h, base, value, dropped(base, value), False)
            check.kept = check.drop < threshold
            if check.kept and rigorous_prompts is not None:
                check.rigorous_baseline = rbase
                check.rigorous_value = perf(trial, rigorous_prompts, rigorous_metric)
                check.rigorous_drop = dropped(rbase, check.rigorous_value)
                check.kept = check.rigorous_drop < threshold
            if check.kept:
                mask = trial
            checks.append(check)
    return _result(model, prompts, metric, threshold, order, drop, rigorous_prompts, checks, count[0],
                   time.perf_counter() - t0)


def _result(model, prompts, metric, threshold, order, drop, rigorous_prompts, checks, n, seconds) -> SearchResult:
    return SearchResult(
        n_layer=model.cfg.n_layer, n_head=model.cfg.n_head, metric=metric.name,
        higher_is_better=metric.higher_is_better, threshold=threshold, drop=drop, order=order,
        ablation=prompts.ablation, n_examples=len(prompts),
        rigorous_examples=len(rigorous_prompts) if rigorous_prompts is not None else None,
        ablated=[(c.layer, c.head) for c in checks if c.kept], checks=checks,
        variants_evaluated=n, seconds=seconds,
    )


class _Block:
    """One block of prompts (similar lengths, trimmed) and its residual stream entering
    each layer under the runner's current mask."""

    def __init__(self, model: GPT2, rows: torch.Tensor, prompts: Prompts):
        kw = prompts.masking_kwargs()
        self.model, self.rows = model, rows
        self.tokens = prompts.tokens.to(model.device)
        B, T = self.tokens.shape
        self.positions = model.check_positions(kw["positions"].to(model.device), B, T)
        am = kw["attention_mask"]
        am = None if am is None else am.to(model.device)
        ref, ref_mask = kw.get("reference"), kw.get("reference_mask")
        self.r = replacement_values(model, kw["mode"], self.tokens, None if ref is None else ref.to(model.device),
                                    am, None if ref_mask is None else ref_mask.to(model.device))
        self.attn = model.attention_mask(am, T, T)  # [B, 1, T, T] or None
        self.resid = [model.embed(self.tokens, attention_mask=am)]  # resid[l]: [B, T, d_model] entering layer l

    def layer(self, l: int, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Layer l on n variants' rows (variant-major), head mask m [n, H]."""
        n = m.shape[0]
        edit = _z_edit(m, None if self.r is None else self.r[l], n) if (m != 1).any() else None
        attn = None if self.attn is None else self.attn.repeat(n, 1, 1, 1)
        return self.model.blocks[l](x, attn, edit)

    def prefix(self, l: int, mask: torch.Tensor) -> torch.Tensor:
        while len(self.resid) <= l:
            k = len(self.resid) - 1
            self.resid.append(self.layer(k, self.resid[k], mask[k][None]))
        return self.resid[l]


class _Runner:
    """perf(mask): the mean metric over a set of prompts, evaluated in blocks of similar
    length; each block caches the residual stream entering each layer for the current
    mask (the ablations kept so far), which all candidates of a layer share."""

    def __init__(self, model: GPT2, prompts: Prompts, metric: Metric, max_rows: int | None):
        self.model, self.metric, self.n = model, metric, len(prompts)
        cfg = model.cfg
        max_rows = max_rows or rows_per_block(model, prompts.tokens.shape[1])
        self.blocks = [_Block(model, rows, p) for rows, p in prompts.blocks(max_rows, len(prompts) // BLOCK_ROWS)]
        self.max_rows = max_rows
        self.mask = torch.ones(cfg.n_layer, cfg.n_head, dtype=model.dtype, device=model.device)
        self.memo: dict[bytes, float] = {}
        self.evaluated = 0

    def sync(self, mask: torch.Tensor) -> None:
        """Make ``mask`` current: cached layers above its first change are dropped."""
        changed = (mask != self.mask).any(dim=1).nonzero()
        if len(changed):
            for b in self.blocks:
                del b.resid[int(changed[0]) + 1:]
            self.mask = mask.clone()

    def perf(self, masks: list[torch.Tensor]) -> list[float]:
        """Mean metric of each mask; masks must equal the current mask below the layer where they differ."""
        L = self.model.cfg.n_layer
        keys = [m.cpu().numpy().tobytes() for m in masks]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        total = {i: 0.0 for i in todo}
        for b in self.blocks:
            per_chunk = max(1, self.max_rows // len(b.rows))
            for c in range(0, len(todo), per_chunk):
                chunk = todo[c:c + per_chunk]
                mv = torch.stack([masks[i] for i in chunk])  # [n, L, H]
                differs = (mv != self.mask).any(dim=2).any(dim=0)  # [L]
                start = int(differs.float().argmax()) if differs.any() else L
                x = b.prefix(start, self.mask).repeat(len(chunk), 1, 1)  # [n * b, T, d_model]
                for l in range(start, L):
                    x = b.layer(l, x, mv[:, l])
                logits = self.model.to_logits(x, b.positions.repeat(len(chunk))).view(len(chunk), len(b.rows), -1)
                sums = self.metric(logits, rows=b.rows).to(torch.float64).sum(dim=1).tolist()
                for i, v in zip(chunk, sums):
                    total[i] += v
        for i in todo:
            self.memo[keys[i]] = total[i] / self.n
        self.evaluated += len(todo)
        return [self.memo[k] for k in keys]


@torch.no_grad()
def search(model: GPT2, prompts: Prompts, metric: Metric, threshold: float = 0.03, order: str = "layer-up",
           drop: str = "relative", rigorous_prompts: Prompts | None = None, rigorous_metric: Metric | None = None,
           speculate: int = 4, max_rows: int | None = None, progress: bool = False) -> SearchResult:
    """The paper's circuit search; same result as :func:`search_reference`, batched.

    Args:
        prompts: the search prompts (the paper: 100 examples) and the ablation mode.
        metric: per-example metric bound to ``prompts``.
        threshold, drop, order: see the module docstring.
        rigorous_prompts, rigorous_metric: a larger set on which each kept ablation is re-checked.
        speculate: heads evaluated per speculative batch (1: no speculation).
        max_rows: rows (variants x prompts) per forward chunk.
    """
    _validate(model, prompts, metric, rigorous_prompts, rigorous_metric, threshold, order, drop)
    if speculate < 1:
        raise ValueError(f"speculate must be >= 1 (heads per speculative batch), got {speculate}")
    t0 = time.perf_counter()
    L, H = model.cfg.n_layer, model.cfg.n_head
    runner = _Runner(model, prompts, metric, max_rows)
    rigorous = _Runner(model, rigorous_prompts, rigorous_metric, max_rows) if rigorous_prompts is not None else None
    runners = [runner] + ([rigorous] if rigorous else [])

    def dropped(base, value):
        return performance_drop(base, value, metric.higher_is_better, drop)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=L * H, desc=f"search ({metric.name})", unit="head")
    kept = torch.ones(L, H, dtype=model.dtype, device=model.device)
    checks: list[Check] = []
    predicted = True  # each head is predicted to be decided like the one before it
    for heads in search_order(L, H, order):
        base = runner.perf([kept])[0]
        rbase = rigorous.perf([kept])[0] if rigorous else None
        i = 0
        while i < len(heads):
            batch = heads[i:i + speculate]
            variants, cur = [], kept
            for l, h in batch:
                trial = cur.clone()
                trial[l, h] = 0
                variants.append(trial)
                if predicted:
                    cur = trial
            values = runner.perf(variants)
            passed = [dropped(base, v) < threshold for v in values]
            rvalues: dict[int, float] = {}
            if rigorous:
                # Candidates that passed on the search prompts need the re-check; stop at the first
                # head whose decision already contradicts the prediction (what follows is discarded).
                need = []
                for k, ok in enumerate(passed):
                    if ok:
                        need.append(k)
                    elif predicted:
                        break
                rvalues = dict(zip(need, rigorous.perf([variants[k] for k in need])))
            for k, ((l, h), value) in enumerate(zip(batch, values)):
                check = Check(l, h, base, value, dropped(base, value), passed[k])
                if check.kept and rigorous:
                    check.rigorous_baseline, check.rigorous_value = rbase, rvalues[k]
                    check.rigorous_drop = dropped(rbase, rvalues[k])
                    check.kept = check.rigorous_drop < threshold
                checks.append(check)
                if check.kept:
                    kept = variants[k]
                mispredicted = check.kept != predicted
                predicted = check.kept
                if mispredicted:
                    break
            i += k + 1
            if bar is not None:
                bar.update(k + 1)
            for r in runners:
                r.sync(kept)
    if bar is not None:
        bar.close()
    evaluated = sum(r.evaluated for r in runners)
    return _result(model, prompts, metric, threshold, order, drop, rigorous_prompts, checks, evaluated,
                   time.perf_counter() - t0)
