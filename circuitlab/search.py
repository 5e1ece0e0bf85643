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

import time
from dataclasses import asdict, dataclass, field

import torch

from clikit import Range
from minigpt2 import GPT2, distributed
from minigpt2.engine import HeadMaskRunner, Metric, Precision, check_model, per_example
from minigpt2.hardware import parse_dtype
from minigpt2.heads import Head
from minigpt2.masking import run_with_head_masks_loop

from .sweep import Prompts, check_prompts, rows_per_block

ORDERS = ("layer-up", "layer-down")
DROPS = ("relative", "absolute")
EPS = 1e-12


def check_search_args(threshold: float, order: str, drop: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown search order {order!r}; choose one of {ORDERS}")
    if drop not in DROPS:
        raise ValueError(f"unknown drop {drop!r}; choose one of {DROPS}")
    Range(0).check("threshold", threshold, why="the paper uses 0.03: keep an ablation that costs less than 3 %")
    if drop == "relative":
        Range(0, 1).check("threshold", threshold,
                          why="out of range for a relative drop, where 0.03 keeps an ablation that costs less than "
                              "3 % of the layer's baseline",
                          fix="for a drop in the metric's own units use drop='absolute'")


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
    exact_recheck: bool = False  # bf16 search: decided on fp32 values, as the check lay near the threshold


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
    ablated: list[Head]
    checks: list[Check] = field(repr=False)
    variants_evaluated: int = 0
    seconds: float = 0.0
    dtype: str = "fp32"
    precision: dict = field(default_factory=dict)  # bf16: the measured error and how many checks went to fp32

    @property
    def kept_heads(self) -> list[Head]:
        gone = set(self.ablated)
        return [Head(l, h) for l in range(self.n_layer) for h in range(self.n_head) if (l, h) not in gone]

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
            "dtype": self.dtype, "precision": self.precision,
            "checks": [asdict(c) for c in self.checks],
        }


def _mean_perf(values: torch.Tensor) -> list[float]:
    """Per-example metric values [V, B] -> the mean of each variant."""
    return values.to(torch.float64).mean(dim=1).tolist()


def _validate(model: GPT2, prompts: Prompts, metric: Metric, rigorous, rigorous_metric, threshold, order, drop):
    check_search_args(threshold, order, drop)
    check_model(model, "search")
    for name, value in (("prompts", prompts), ("rigorous_prompts", rigorous)):
        if value is not None or name == "prompts":
            check_prompts(value, f"search ({name}=)")
    for name, value in (("metric", metric), ("rigorous_metric", rigorous_metric)):
        if (value is not None or name == "metric") and not isinstance(value, Metric):
            raise TypeError(f"search ({name}=) takes one minigpt2.engine.Metric (Metric(name, fn), fn(logits "
                            f"[V, B, vocab]) -> [V, B]), got {type(value).__name__}")
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
        ablated=[Head(c.layer, c.head) for c in checks if c.kept], checks=checks,
        variants_evaluated=n, seconds=seconds,
    )


class _Runner:
    """perf(mask): the mean metric over a set of prompts, in blocks of similar length; each block is
    one minigpt2.engine.HeadMaskRunner whose base is the current mask (the ablations kept so far),
    so every candidate of a layer joins the same cached prefix."""

    def __init__(self, model: GPT2, prompts: Prompts, metric: Metric, max_rows: int | None, dtype=None, group=None):
        self.model, self.metric, self.n = model, metric, len(prompts)
        self.max_rows = max_rows or rows_per_block(model, prompts.tokens.shape[1])
        self.max_rows = distributed.smallest(self.max_rows, group)  # the ranks agree on the blocks
        blocks = prompts.blocks(self.max_rows)  # one variant a call (speculate=1, the CPU default)
        # Several ranks: whole blocks split over them where there are enough (each block on one rank, alone,
        # its sums gathered); else every block's candidates split over the ranks (HeadMaskRunner's group).
        split = group is not None and len(blocks) >= distributed.world_size(group)
        self.group = group if split else None  # the group sharing the blocks
        inner = distributed.LOCAL if group is None or split else group  # the group sharing a block's candidates
        self.n_blocks = len(blocks)
        self.blocks = {}  # block index -> (rows, runner), for the blocks this rank computes
        for i in distributed.shard(range(len(blocks)), self.group):
            rows, p = blocks[i]
            kw = p.masking_kwargs()
            self.blocks[i] = (rows, HeadMaskRunner(model, p.tokens, kw.pop("ablation"), dtype=dtype, group=inner, **kw))
        self.memo: dict[bytes, float] = {}
        self.evaluated = 0

    def sync(self, mask: torch.Tensor) -> None:
        """Make ``mask`` the base of every block: cached layers above its first change are dropped."""
        for _, engine in self.blocks.values():
            engine.rebase(mask)

    def perf(self, masks: list[torch.Tensor]) -> list[float]:
        """Mean metric of each mask (memoized)."""
        keys = [m.cpu().numpy().tobytes() for m in masks]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            sums = self._sums(torch.stack([masks[i] for i in todo]))
            total = torch.zeros(len(todo), dtype=torch.float64)
            for b in range(self.n_blocks):  # the blocks' sums added in block order, whichever rank made them
                total += sums[b]
            for i, v in zip(todo, total.tolist()):
                self.memo[keys[i]] = v / self.n
            self.evaluated += len(todo)
        return [self.memo[k] for k in keys]

    def _sums(self, mv: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per block, the metric summed over its prompts for each mask of mv [n, L, H]: {block: [n] float64}."""
        def block_sum(i: int) -> torch.Tensor:
            rows, engine = self.blocks[i]
            values = engine.run(mv, metric=lambda logits: per_example(self.metric, logits, rows),
                                max_rows=self.max_rows)  # [n, b]
            return values.to(torch.float64).sum(dim=1).cpu()

        return distributed.share(self.n_blocks, block_sum, self.group, "the search's prompt blocks",
                                 torch.device("cpu"))


class _Decider:
    """A check's decision, exact in bf16: the candidate's drop from the layer's baseline against the
    threshold, re-evaluated in fp32 (``exact``: fp32 runners) when bf16's measured error could flip it."""

    def __init__(self, metric: Metric, threshold: float, drop: str, precision: Precision,
                 exact: dict[str, "_Runner"] | None = None):
        self.metric, self.threshold, self.drop, self.precision = metric, threshold, drop, precision
        self.exact = exact or {}

    def dropped(self, base: float, value: float) -> float:
        return performance_drop(base, value, self.metric.higher_is_better, self.drop)

    def passes(self, which: str, base_mask, base: float, mask, value: float) -> tuple[bool, float, float, bool]:
        """(kept, baseline, value, re-evaluated) of one check on runner ``which`` ("search" or "rigorous");
        the values are fp32 when the check was re-evaluated."""
        margin = self.dropped(base, value) - self.threshold
        scale = max(abs(base), EPS) if self.drop == "relative" else 1.0
        rechecked = self.precision.near(margin * scale, 2 + self.threshold)
        if rechecked:
            self.precision.rechecked += 1
            base, value = self.exact[which].perf([base_mask, mask])
        return self.dropped(base, value) < self.threshold, base, value, rechecked


@dataclass
class _Search:
    """One search's state: its runners (``runner`` on the search prompts, ``rigorous`` on the larger
    set or None; ``runners`` all of them, fp32 ones included, kept in sync with ``kept``), the decision
    rule, the current mask ``kept`` [L, H] (0: ablated so far), the checks made, and the prediction
    for the next head (decided like the one before it)."""

    runner: _Runner
    rigorous: _Runner | None
    decider: _Decider
    runners: list[_Runner]
    kept: torch.Tensor
    speculate: int
    bar: object = None
    checks: list[Check] = field(default_factory=list)
    predicted: bool = True

    def layer(self, heads: list[tuple[int, int]]) -> None:
        """Decide one layer's ``heads``, in order, by speculative batches of ``speculate`` heads; every
        check compares with the baseline taken when the layer began."""
        layer_mask = self.kept
        base = self.runner.perf([self.kept])[0]
        rbase = self.rigorous.perf([self.kept])[0] if self.rigorous else None
        i = 0
        while i < len(heads):
            n = self.batch(heads[i:i + self.speculate], layer_mask, base, rbase)
            i += n
            if self.bar is not None:
                self.bar.update(n)
            for r in self.runners:
                r.sync(self.kept)

    def batch(self, batch: list[tuple[int, int]], layer_mask: torch.Tensor, base: float,
              rbase: float | None) -> int:
        """Evaluate ``batch`` as variants built on the predicted decisions; returns how many heads were
        decided (up to the first whose decision differs from the prediction)."""
        variants, cur = [], self.kept
        for l, h in batch:
            trial = cur.clone()
            trial[l, h] = 0
            variants.append(trial)
            if self.predicted:
                cur = trial
        values = self.runner.perf(variants)
        # Decisions on the search prompts, in order, up to the first that contradicts the
        # prediction for certain (what follows it is discarded).
        decisions = []
        for k, v in enumerate(values):
            decisions.append(self.decider.passes("search", layer_mask, base, variants[k], v))
            if decisions[-1][0] != self.predicted and (not self.rigorous or not decisions[-1][0]):
                break
        rvalues: dict[int, float] = {}
        if self.rigorous:  # candidates that passed on the search prompts need the re-check
            need = [k for k, d in enumerate(decisions) if d[0]]
            rvalues = dict(zip(need, self.rigorous.perf([variants[k] for k in need])))
        return self.record(batch, variants, decisions, rvalues, layer_mask, rbase)

    def record(self, batch, variants, decisions, rvalues: dict[int, float], layer_mask: torch.Tensor,
               rbase: float | None) -> int:
        """Turn the decisions into Checks (re-checked on the rigorous set when they passed), keeping
        each kept ablation, up to the first misprediction; returns how many heads that was."""
        for k, ((l, h), (ok, b, value, rechecked)) in enumerate(zip(batch, decisions)):
            check = Check(l, h, b, value, self.decider.dropped(b, value), ok, exact_recheck=rechecked)
            if check.kept and self.rigorous:
                check.kept, rb, rv, rre = self.decider.passes("rigorous", layer_mask, rbase, variants[k], rvalues[k])
                check.rigorous_baseline, check.rigorous_value = rb, rv
                check.rigorous_drop = self.decider.dropped(rb, rv)
                check.exact_recheck = check.exact_recheck or rre
            self.checks.append(check)
            if check.kept:
                self.kept = variants[k]
            mispredicted = check.kept != self.predicted
            self.predicted = check.kept
            if mispredicted:
                break
        return k + 1


@torch.no_grad()
def search(model: GPT2, prompts: Prompts, metric: Metric, threshold: float = 0.03, order: str = "layer-up",
           drop: str = "relative", rigorous_prompts: Prompts | None = None, rigorous_metric: Metric | None = None,
           speculate: int = 4, max_rows: int | None = None, progress: bool = False, dtype=None,
           group=None) -> SearchResult:
    """The paper's circuit search; same result as :func:`search_reference`, batched.

    Args:
        prompts: the search prompts (the paper: 100 examples) and the ablation mode.
        metric: per-example metric bound to ``prompts``.
        threshold, drop, order: see the module docstring.
        rigorous_prompts, rigorous_metric: a larger set on which each kept ablation is re-checked.
        speculate: heads evaluated per speculative batch (1: no speculation).
        max_rows: rows (variants x prompts) per forward chunk.
        dtype: None (the model's precision) or torch.bfloat16: candidates are evaluated with bf16
            matmuls; the bf16 error of the metric is measured on the first layer's candidates
            against fp32, and every check whose drop lies within that error of the threshold is
            re-evaluated in fp32, so the circuit is the fp32 circuit (``result.precision`` says how
            many were).
        group: the torch.distributed group whose ranks split the prompt blocks (each block whole on one
            rank, its sums gathered; with fewer blocks than ranks, each batch of candidates, as
            minigpt2.engine.HeadMaskRunner's ``group``): None, the default group where this process opted
            in, else alone; every rank takes the same decisions on the gathered values and returns the
            one-process result, bit for bit. Only the writer rank shows progress.
    """
    _validate(model, prompts, metric, rigorous_prompts, rigorous_metric, threshold, order, drop)
    group = distributed.resolve_group(group)
    Range(1, whole=True).check("speculate", speculate, why="heads per speculative batch")
    dtype = parse_dtype(dtype, model.device)
    low = dtype is not None and dtype != model.dtype
    t0 = time.perf_counter()
    L, H = model.cfg.n_layer, model.cfg.n_head
    runner = _Runner(model, prompts, metric, max_rows, dtype, group)
    rigorous = (_Runner(model, rigorous_prompts, rigorous_metric, max_rows, dtype, group)
                if rigorous_prompts is not None else None)
    runners = [runner] + ([rigorous] if rigorous else [])
    kept = torch.ones(L, H, dtype=model.dtype, device=model.device)
    precision, exact = Precision(), {}
    if low:
        exact = {"search": _Runner(model, prompts, metric, max_rows, group=group)}
        if rigorous:
            exact["rigorous"] = _Runner(model, rigorous_prompts, rigorous_metric, max_rows, group=group)
        precision = _calibrate(runner, rigorous, exact, kept, search_order(L, H, order)[0])
        runners += list(exact.values())
    decider = _Decider(metric, threshold, drop, precision, exact)

    bar = None
    if progress and distributed.is_writer(group if group is not None else distributed.LOCAL):
        from minigpt2.progress import progress as progress_bar
        bar = progress_bar(total=L * H, desc=f"search ({metric.name})", unit="head")
    state = _Search(runner, rigorous, decider, runners, kept, speculate, bar)
    for heads in search_order(L, H, order):
        state.layer(heads)
    if bar is not None:
        bar.close()
    evaluated = sum(r.evaluated for r in runners)
    result = _result(model, prompts, metric, threshold, order, drop, rigorous_prompts, state.checks, evaluated,
                     time.perf_counter() - t0)
    result.dtype = "bf16" if low else "fp32"
    result.precision = precision.to_json()
    return result


def _calibrate(runner: _Runner, rigorous: _Runner | None, exact: dict[str, _Runner], kept: torch.Tensor,
               heads: list[tuple[int, int]]) -> Precision:
    """bf16's error on the first layer's candidates (and the clean run), against fp32. The bf16
    values are memoized, so the search reuses them."""
    masks = [kept]
    for l, h in heads:
        m = kept.clone()
        m[l, h] = 0
        masks.append(m)
    low, high = runner.perf(masks), exact["search"].perf(masks)
    step = runner.metric.step / runner.n  # the batch mean's least change
    if rigorous is not None:
        low, high = low + rigorous.perf(masks), high + exact["rigorous"].perf(masks)
        step = max(step, rigorous.metric.step / rigorous.n)
    return Precision.measure(low, high, step=step)
