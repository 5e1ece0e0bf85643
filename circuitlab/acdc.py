"""ACDC, automatic circuit discovery (Conmy et al. 2023), on the edge graph of circuitlab.graph.

The algorithm: visit the receivers in reverse topological order, from the logits
back to the first layer. For each, try removing its incoming edges one at a time
(latest sender first), each on top of the edges already removed; an edge is
removed for good when the metric gets worse by less than the threshold, and the
metric after its removal becomes the current one. A receiver whose component no
longer writes along any kept edge is skipped and all its incoming edges removed
(they cannot change the output), as ACDC does.

Metrics are callables ``metric(logits [V, B, vocab]) -> [V]``, lower is better
unless ``higher_is_better`` (ACDC minimises; its default metric is the KL
divergence to the clean model, :func:`kl_metric`). Thresholds:

    absolute (ACDC):   remove if worsening <  threshold
    relative (paper):  remove if worsening <  threshold * |current metric|

Speed. The plain algorithm runs one forward per edge. Here the candidate edges of
one receiver are evaluated together as speculative variants in one batched pass
(``EdgeRunner.run``: shared prefix, only reached nodes recomputed). Variant j
removes candidate j on top of the removals predicted for candidates before it
(first guess: all removed). Walking the batch in order, every value is exact as
long as the predictions before it held; at the first wrong prediction the
decision is taken from its exact value, the remaining predictions are refreshed
from the batch just computed, and the rest is evaluated again. The decisions,
and so the circuit, are those of the plain sequential algorithm
(``batched=False``), up to float rounding of values that sit on the threshold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .graph import Circuit, EdgeRunner, Metric, Trace

THRESHOLD_MODES = ("absolute", "relative")


@dataclass
class ACDCResult:
    """ACDC's circuit, with the metric along the way.

    circuit.scores: for each evaluated edge, how much removing it worsened the metric
    (ACDC's effect size; 0 for edges removed without evaluation).
    log: one dict per edge decision (sender, receiver, value, worsening, removed, skipped).
    """

    circuit: Circuit
    metric_clean: float
    metric_final: float
    n_evaluated: int
    n_passes: int
    seconds: float
    log: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"metric_clean": self.metric_clean, "metric_final": self.metric_final,
                "n_evaluated": self.n_evaluated, "n_passes": self.n_passes, "seconds": self.seconds,
                **self.circuit.node_counts()}


def kl_metric(clean_logits: torch.Tensor) -> Metric:
    """ACDC's default metric: mean over examples of KL(clean || variant), in nats.

    clean_logits: [B, vocab] the full model's logits at the answer positions.
    """
    log_p = torch.log_softmax(clean_logits.detach().to(torch.promote_types(clean_logits.dtype, torch.float32)), -1)
    p = log_p.exp()

    def kl(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
        log_q = torch.log_softmax(logits.to(log_p.dtype), -1)
        return (p * (log_p - log_q)).sum(-1).mean(-1)
    return kl


def check_threshold(threshold: float, mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; choose 'absolute' (ACDC: remove an edge if the metric "
                         "worsens by less than the threshold) or 'relative' (the paper: by less than threshold x "
                         "the current metric)")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if mode == "absolute" and threshold < 0:
        raise ValueError(f"threshold={threshold} is negative: an absolute threshold is how much the metric may "
                         "worsen per removed edge. Fix: pass a value >= 0 (ACDC uses e.g. 0.01 to 1 for KL)")
    if mode == "relative" and not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold} is out of range for threshold_mode='relative', a fraction of the "
                         "current metric. Fix: pass a value in [0, 1] (the paper uses 0.1)")


def metric_values(metric: Metric, logits: torch.Tensor) -> list[float]:
    """Apply a metric to [V, B, vocab] logits and check it gives one value per variant."""
    values = metric(logits)
    if not torch.is_tensor(values) or values.shape != logits.shape[:1]:
        shape = tuple(values.shape) if torch.is_tensor(values) else type(values).__name__
        raise ValueError(f"metric must map logits [V, B, vocab] to one value per variant [V], got {shape} for "
                         f"V={logits.shape[0]}. Fix: average over examples, e.g. lambda l: per_example(l).mean(-1)")
    return values.detach().double().cpu().tolist()


def receiver_order(runner: EdgeRunner) -> list[int]:
    """Receivers in ACDC's reverse topological order: logits, then per layer from the last:
    the MLP input, then the value, key and query inputs of the heads (last head first)."""
    g = runner.graph
    order = [g.n_receivers - 1]
    for st in reversed(g.stages[:-1]):
        if st.kind == "mlp":
            order.append(st.rows[0])
        else:
            order += [st.rows[kind * g.n_head + h] for kind in (2, 1, 0) for h in reversed(range(g.n_head))]
    return order


def acdc(runner: EdgeRunner, metric: Metric, threshold: float, *, threshold_mode: str = "absolute",
         higher_is_better: bool = False, receivers: Sequence[str] | None = None, batched: bool = True,
         progress: bool = False) -> ACDCResult:
    """Run ACDC on ``runner``'s batch and ablation.

    Args:
        metric: ``fn(logits [V, B, vocab]) -> [V]``; lower is better unless ``higher_is_better``.
        threshold, threshold_mode: see the module docstring; relative thresholds lie in [0, 1].
        receivers: only decide the edges into these receivers (names, e.g. "logits", "m11",
            "a11.h3<q>"); the others stay in the circuit. Default: every receiver.
        batched: evaluate each receiver's candidates as speculative batched variants (fast);
            False runs the plain algorithm, one forward per edge.

    Returns an ACDCResult whose ``circuit`` holds the kept edges.
    """
    check_threshold(threshold, threshold_mode)
    g = runner.graph
    only = None if receivers is None else {g.receiver_index(r) for r in receivers}
    start = time.perf_counter()
    state = _State(runner, metric, threshold, threshold_mode, higher_is_better)
    order = receiver_order(runner)
    if progress:
        from tqdm.auto import tqdm
        order = tqdm(order, desc="ACDC receivers", unit="receiver")
    with torch.no_grad():
        for r in order:
            if only is not None and r not in only:
                continue
            owner = g.owner(r)
            candidates = [u for u in reversed(range(int(g.n_in[r]))) if state.mask[r, u] != 0]
            if owner is not None and not state.mask[:, owner].any():
                for u in candidates:
                    state.mask[r, u] = 0
                    state.log.append({"sender": g.senders[u], "receiver": g.receivers[r], "removed": True,
                                      "skipped": True})
                state.dirty = bool(candidates) or state.dirty
                continue
            if batched:
                state.speculate(r, candidates)
            else:
                for u in candidates:
                    trial = state.mask.clone()
                    trial[r, u] = 0
                    value = metric_values(metric, runner.trace(trial).logits[None])[0]
                    state.n_evaluated += 1
                    state.n_passes += 1
                    state.decide(r, u, value)
    circuit = Circuit(g, state.mask.bool(), state.scores, {"method": "acdc", "threshold": threshold,
                                                           "threshold_mode": threshold_mode,
                                                           "ablation": runner.ablation})
    return ACDCResult(circuit, state.clean_value, state.cur, state.n_evaluated, state.n_passes,
                      time.perf_counter() - start, state.log)


class _State:
    """The current circuit and metric of a run, and the decision rule."""

    def __init__(self, runner: EdgeRunner, metric: Metric, threshold: float, mode: str, higher_is_better: bool):
        self.runner, self.metric = runner, metric
        self.threshold, self.mode, self.sign = threshold, mode, (-1.0 if higher_is_better else 1.0)
        self.mask = runner.clean.mask.clone()
        self.base: Trace = runner.clean
        self.dirty = False  # base no longer matches mask
        self.cur = self.clean_value = metric_values(metric, runner.clean.logits[None])[0]
        self.scores = torch.zeros(self.mask.shape, dtype=torch.float64)
        self.n_evaluated = self.n_passes = self.n_removed = self.n_kept = 0
        self.log: list[dict] = []
        self.max_window = max(2, runner.max_rows // runner.tokens.shape[0])  # variants per batched chunk
        self.window = min(16, self.max_window)  # candidates evaluated per speculative pass

    def worsening(self, value: float, cur: float) -> float:
        return self.sign * (value - cur)

    def removes(self, value: float, cur: float) -> bool:
        limit = self.threshold if self.mode == "absolute" else self.threshold * abs(cur)
        return self.worsening(value, cur) < limit

    def decide(self, r: int, u: int, value: float) -> bool:
        g = self.runner.graph
        remove = self.removes(value, self.cur)
        self.scores[r, u] = self.worsening(value, self.cur)
        self.log.append({"sender": g.senders[u], "receiver": g.receivers[r], "value": value,
                         "worsening": self.scores[r, u].item(), "removed": remove, "skipped": False})
        self.n_removed += remove
        self.n_kept += not remove
        if remove:
            self.mask[r, u] = 0
            self.cur = value
            self.dirty = True
        return remove

    def speculate(self, r: int, pending: list[int]) -> None:
        # First guess: all removed while nearly all edges so far were (the start, and the usual
        # course of a run), which makes the batch the chain of cumulative removals; otherwise all
        # kept, which makes it the single removals, whose values predict the rest well.
        predict = {u: self.n_removed >= 4 * self.n_kept for u in pending}
        while pending:
            if self.dirty:
                self.base = self.runner.retrace(self.base, self.mask)
                self.dirty = False
            batch, variants, trial = pending[:self.window], [], self.mask.clone()
            for u in batch:
                v = trial.clone()
                v[r, u] = 0
                variants.append(v)
                if predict[u]:
                    trial[r, u] = 0
            values = metric_values(self.metric, self.runner.run(torch.stack(variants), base=self.base))
            self.n_evaluated += len(batch)
            self.n_passes += 1
            guessed, prev = [predict[u] for u in batch], self.cur
            stop, missed = len(batch), False
            for j, u in enumerate(batch):
                if self.decide(r, u, values[j]) != guessed[j]:
                    stop, missed = j + 1, True
                    break
            # A window that guessed right grows (up to one chunk of the runner, beyond which a
            # batch is no faster per variant); a wrong guess shrinks it, as it wastes the rest.
            self.window = max(2, self.window // 2) if missed else min(2 * self.window, self.max_window)
            # Refresh the guesses for the rest: variant j differs from the last variant before it
            # that was guessed removed by exactly edge j, so the pair estimates edge j's decision
            # on a base that is nearly right.
            for j, u in enumerate(batch):
                if j >= stop:
                    predict[u] = self.removes(values[j], prev)
                if guessed[j]:
                    prev = values[j]
            pending = pending[stop:]
