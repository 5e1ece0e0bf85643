"""ACDC, automatic circuit discovery (Conmy et al. 2023), on ACDC's own graph.

The algorithm: visit the receivers in reverse topological order, from the logits
back to the first layer. For each, try removing its incoming edges one at a time
(latest sender first), each on top of the edges already removed; an edge is
removed for good when the metric gets worse by less than the threshold, and the
metric after its removal becomes the current one. A receiver whose component no
longer writes along any kept edge is skipped and all its incoming edges removed
(they cannot change the output), as ACDC does.

The graph and the order are those of the reference implementation
(ArthurConmy/Automatic-Circuit-Discovery: acdc/TLACDCCorrespondence.py, acdc/TLACDCExperiment.py,
run as acdc/main.py runs it), so that the circuits are the same:

- ACDC's graph (``Graph(L, H, head_inputs=True)``, the default) has, besides the edges of
  circuitlab.graph, one edge per head input, hook_{q,k,v}_input[h] -> hook_{q,k,v}[h]: the head's
  whole query, key or value input. Removing it gives hook_q[h] its corrupted value (see
  circuitlab.graph), and the edges into that input are then removed unevaluated (ACDC's
  ``current_node_connected``: hook_q_input[h] no longer feeds anything). Removing a whole
  input is one decision on one metric change, not the sum of decisions on its edges, so the
  circuits differ from the plain graph's (``head_inputs=False``, which stays as an option).
- The order (:func:`decision_order`): the logits, then for each layer from the last: the MLP's
  input edges; then each head's whole value, key and query input (last head first: hook_v
  before hook_k before hook_q, ``reverse_topologically_sort_corr``); then the edges into the
  heads' value, key and query inputs, in the same order.
- The senders of one receiver are tried latest first: m{l-1}, a{l-1}.h{H-1}, ..., a{l-1}.h0,
  m{l-2}, ..., input. That is the order ``TLACDCExperiment.step`` walks ``corr.edges[receiver]``
  in with acdc/main.py's defaults ``--names-mode normal --indices-mode normal`` ("normal":
  the order ``setup_from_model`` inserted the senders in, from the last layer down and from
  the last head down; TLACDCExperiment's own default ``indices_mode="reverse"`` would try the
  heads of a layer first head first).
- Counts (``Circuit.node_counts``): ACDC's edge count (``count_no_edges``) includes the kept
  whole-input edges, its node count (``get_present_nodes``) the hook_q/k/v nodes.

Precision: on a runner with dtype=torch.bfloat16 the candidates are evaluated with bf16
matmuls; the bf16 error of the metric is measured first (the clean run and single removals
of edges into the logits, against fp32), and every decision whose worsening lies within that
error of the threshold is re-evaluated with fp32 forwards, so the circuit is the fp32 one.

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

Distributed: on a runner with a process group (EdgeRunner's ``group``), each batched pass is split over
the ranks and every rank receives all its values, bit for bit those of one process; every rank then
takes the same decisions (nothing in them depends on the rank), so each returns the one-process
circuit. Only the writer rank shows progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from clikit import Range
from minigpt2 import distributed
from minigpt2.engine import (BatchMetric, Metric, Precision, batch_metric, check_variant_values, kl_div,
                             progress_bar)
from minigpt2.engine import higher_is_better as metric_direction

from .graph import Circuit, EdgeRunner, Graph, Trace, check_runner

THRESHOLD_MODES = ("absolute", "relative")


@dataclass
class ACDCResult:
    """ACDC's circuit, with the metric along the way.

    circuit.scores: for each evaluated edge, how much removing it worsened the metric
    (ACDC's effect size; 0 for edges removed without evaluation); on ACDC's graph
    circuit.head_input_scores [R] the same for the whole head inputs.
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


def kl_metric(clean_logits: torch.Tensor) -> BatchMetric:
    """ACDC's default metric: mean over examples of KL(clean || variant), in nats.

    clean_logits: [B, vocab] the full model's logits at the answer positions.
    """
    clean = clean_logits.detach()

    def kl(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
        return kl_div(clean, logits).mean(-1)
    return kl


def check_threshold(threshold: float, mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; choose 'absolute' (ACDC: remove an edge if the metric "
                         "worsens by less than the threshold) or 'relative' (the paper: by less than threshold x "
                         "the current metric)")
    if mode == "absolute":
        Range(0).check("threshold", threshold, why="an absolute threshold is how much the metric may worsen per "
                       "removed edge; ACDC uses e.g. 0.01 to 1 for KL")
    else:
        Range(0, 1).check("threshold", threshold, why="with threshold_mode='relative', a fraction of the current "
                          "metric; the paper uses 0.1")


def metric_values(metric: Metric | BatchMetric, logits: torch.Tensor) -> list[float]:
    """Apply a metric to [V, B, vocab] logits, checked to give one value per variant."""
    return check_variant_values(metric(logits), logits.shape[0]).detach().double().cpu().tolist()


def receiver_order(runner: EdgeRunner) -> list[int]:
    """Receivers in ACDC's reverse topological order: logits, then per layer from the last:
    the MLP input, then the value, key and query inputs of the heads (last head first)."""
    return [r for kind, r in decision_order(runner.graph, head_inputs=False)]


def decision_order(g: Graph, head_inputs: bool | None = None) -> list[tuple[str, int]]:
    """ACDC's visiting order, as ("edges", r) (decide the edges into receiver r, latest sender
    first) and ("input", r) (decide head input r's whole-input edge) steps; ``head_inputs``
    (default: ``g.head_inputs``) includes the latter.

    It is TLACDCExperiment's: ``reverse_topologically_sort_corr`` orders the hook points by their
    forward order, reversed, and within a hook point the heads as ``setup_from_model`` added them,
    last head first. Per layer from the last, after the logits (blocks.{L-1}.hook_resid_post):
    hook_mlp_out (placeholder: nothing decided), hook_mlp_in (the MLP's input edges),
    attn.hook_result (placeholders), attn.hook_v, hook_k, hook_q (the whole value, key, query
    input of each head: ACDC's direct-computation edges, hook_{v,k,q}_input[h] -> hook_{v,k,q}[h]),
    then hook_v_input, hook_k_input, hook_q_input (the edges into each head's inputs); heads
    last first throughout. Without ``head_inputs`` the whole-input steps are left out.
    """
    H = g.n_head
    head_inputs = g.head_inputs if head_inputs is None else head_inputs
    order = [("edges", g.n_receivers - 1)]
    for st in reversed(g.stages[:-1]):
        if st.kind == "mlp":
            order.append(("edges", st.rows[0]))
            continue
        rows = [st.rows[kind * H + h] for kind in (2, 1, 0) for h in reversed(range(H))]  # v, k, q; last head first
        if head_inputs:
            order += [("input", r) for r in rows]
        order += [("edges", r) for r in rows]
    return order


def acdc(runner: EdgeRunner, metric: Metric | BatchMetric, threshold: float, *, threshold_mode: str = "absolute",
         higher_is_better: bool = False, receivers: Sequence[str] | None = None, batched: bool = True,
         head_inputs: bool = True, progress: bool = False) -> ACDCResult:
    """Run ACDC on ``runner``'s batch and ablation.

    Args:
        metric: a minigpt2.engine.Metric (its batch mean; its direction overrides ``higher_is_better``)
            or ``fn(logits [V, B, vocab]) -> [V]``; lower is better unless ``higher_is_better``.
        threshold, threshold_mode: see the module docstring; relative thresholds lie in [0, 1].
        receivers: only decide the edges into these receivers (names, e.g. "logits", "m11",
            "a11.h3<q>"; a head input's name also selects its whole-input edge); the others stay
            in the circuit. Default: every receiver.
        batched: evaluate each step's candidates as speculative batched variants (fast);
            False runs the plain algorithm, one forward per edge.
        head_inputs: ACDC's graph (default): every head's whole query, key and value input is an
            edge of its own, decided before the edges into it (:func:`decision_order`); the
            circuit lives on ``Graph(L, H, head_inputs=True)``. False: the plain edge graph of
            the runner, without them.

    Returns an ACDCResult whose ``circuit`` holds the kept edges.
    """
    check_runner(runner, "acdc")
    check_threshold(threshold, threshold_mode)
    higher_is_better = metric_direction(metric, higher_is_better)
    step = getattr(metric, "step", 0.0) / runner.tokens.shape[0]  # a right-or-wrong metric's least change
    metric = batch_metric(metric)
    g = Graph(runner.graph.n_layer, runner.graph.n_head, head_inputs=True) if head_inputs else runner.graph
    only = None if receivers is None else {g.receiver_index(r) for r in receivers}
    start = time.perf_counter()
    state = _State(runner, g, metric, threshold, threshold_mode, higher_is_better, step)
    steps = progress_bar(_steps(g, head_inputs, only), "ACDC steps", "step", progress and runner.writer)
    with torch.no_grad():
        for kind, rows in steps:
            pairs = state.candidates(kind, rows)
            if not pairs:
                continue
            if batched:
                state.speculate(pairs)
            else:
                state.sequential(pairs)
    circuit = Circuit(g, state.mask.bool(), state.scores, {"method": "acdc", "threshold": threshold,
                                                           "threshold_mode": threshold_mode,
                                                           "ablation": runner.ablation,
                                                           "graph": "acdc" if head_inputs else "edges",
                                                           "dtype": "bf16" if runner.low_precision else "fp32",
                                                           "precision": state.precision.to_json()})
    return ACDCResult(circuit, state.clean_value, state.cur, state.n_evaluated, state.n_passes,
                      time.perf_counter() - start, state.log)


def _steps(g: Graph, head_inputs: bool, only: set[int] | None) -> list[tuple[str, list[int]]]:
    """The decision order (:func:`decision_order`, restricted to the receivers ``only``) as steps
    (kind, rows): the whole inputs of one layer are decided in one speculative batch, since none of
    them changes whether another is skipped; every other step is one receiver's edges."""
    order = decision_order(g, head_inputs)
    if only is not None:
        order = [(kind, r) for kind, r in order if r in only]
    steps: list[tuple[str, list[int]]] = []
    for kind, r in order:
        if kind == "input" and steps and steps[-1][0] == "input" and g.stage_of[steps[-1][1][0]] == g.stage_of[r]:
            steps[-1][1].append(r)
        else:
            steps.append((kind, [r]))
    return steps


class _State:
    """The current circuit and metric of a run, and the decision rule."""

    def __init__(self, runner: EdgeRunner, graph: Graph, metric: Metric | BatchMetric, threshold: float, mode: str,
                 higher_is_better: bool, step: float = 0.0):
        self.runner, self.graph, self.metric = runner, graph, metric
        self.threshold, self.mode, self.sign = threshold, mode, (-1.0 if higher_is_better else 1.0)
        self.mask = graph.ones(runner.model.dtype).to(runner.model.device)  # [R, S'], in the graph's width
        self.base: Trace = runner.clean
        self.dirty = False  # base no longer matches mask
        self.cur = self.clean_value = metric_values(metric, runner.clean.logits[None])[0]
        self.scores = torch.zeros(self.mask.shape, dtype=torch.float64)
        self.n_evaluated = self.n_passes = self.n_removed = self.n_kept = 0
        self.log: list[dict] = []
        rows = distributed.smallest(runner.max_rows, runner.group)  # the ranks' windows agree: they decide alike
        self.max_window = max(2, rows // runner.tokens.shape[0])  # variants per batched chunk
        self.window = min(16, self.max_window)  # candidates evaluated per speculative pass
        self.precision = self.calibrate(step) if runner.low_precision else Precision()
        self._exact_cur: tuple[bytes, float] | None = None  # fp32 metric of the current mask

    def calibrate(self, step: float = 0.0) -> Precision:
        """bf16's error: the clean run and single removals of the last 15 senders' edges into the logits;
        at least ``step``, a right-or-wrong metric's least change (Precision.measure)."""
        g = self.graph
        r = g.n_receivers - 1
        masks = [self.mask]
        for u in list(reversed(range(int(g.n_in[r]))))[:15]:
            m = self.mask.clone()
            m[r, u] = 0
            masks.append(m)
        low = metric_values(self.metric, self.runner.run(torch.stack(masks)))
        return Precision.measure(low, self.runner.exact_values(masks, self.metric), step=step)

    def exact(self, r: int, u: int) -> tuple[float, float]:
        """fp32 values of the current mask and of it without edge u -> r."""
        key = self.mask.cpu().numpy().tobytes()
        if self._exact_cur is None or self._exact_cur[0] != key:
            self._exact_cur = (key, self.runner.exact_values([self.mask], self.metric)[0])
        trial = self.mask.clone()
        trial[r, u] = 0
        return self._exact_cur[1], self.runner.exact_values([trial], self.metric)[0]

    def writes(self, sender: int) -> bool:
        """Whether a sender still writes along a kept edge."""
        return bool(self.mask[:, sender].any())

    def worsening(self, value: float, cur: float) -> float:
        return self.sign * (value - cur)

    def removes(self, value: float, cur: float) -> bool:
        limit = self.threshold if self.mode == "absolute" else self.threshold * abs(cur)
        return self.worsening(value, cur) < limit

    def decide(self, r: int, u: int, value: float) -> bool:
        g = self.graph
        cur, limit = self.cur, self.threshold if self.mode == "absolute" else self.threshold * abs(self.cur)
        rechecked = self.precision.near(self.worsening(value, cur) - limit,
                                        2 + (self.threshold if self.mode == "relative" else 0))
        if rechecked:  # near the threshold in bf16: decided on fp32 values
            self.precision.rechecked += 1
            cur, value = self.exact(r, u)
        remove = self.removes(value, cur)
        self.scores[r, u] = self.worsening(value, cur)
        sender, receiver = g.edge_name(r, u)
        self.log.append({"sender": sender, "receiver": receiver, "value": value,
                         "worsening": self.scores[r, u].item(), "removed": remove, "skipped": False}
                        | ({"exact_recheck": True} if rechecked else {}))
        self.n_removed += remove
        self.n_kept += not remove
        if remove:
            self.mask[r, u] = 0
            self.cur = value
            self.dirty = True
        return remove

    def candidates(self, kind: str, rows: list[int]) -> list[tuple[int, int]]:
        """The edges (r, u) a step decides: the whole inputs ``rows`` (kind "input") or the kept edges
        into ``rows[0]``, latest sender first. Those that no longer feed anything are removed here,
        unevaluated, as ACDC does, and left out."""
        g = self.graph
        if kind == "input":
            pairs = [(r, g.gate) for r in rows]
            skip = [p for p in pairs if not self.writes(g.owner(p[0]))]
        else:
            r = rows[0]
            pairs = [(r, u) for u in reversed(range(int(g.n_in[r]))) if self.mask[r, u] != 0]
            owner = g.owner(r)
            cut = owner is not None and (not self.writes(owner) or (g.head_inputs and g.is_head_input[r]
                                                                    and self.mask[r, g.gate] == 0))
            skip = pairs if cut else []
        for r, u in skip:  # nothing reads what these feed
            if self.mask[r, u] != 0:
                self.mask[r, u] = 0
                self.dirty = True
                sender, receiver = g.edge_name(r, u)
                self.log.append({"sender": sender, "receiver": receiver, "removed": True, "skipped": True})
        return [p for p in pairs if p not in skip and self.mask[p] != 0]

    def sequential(self, pending: list[tuple[int, int]]) -> None:
        """Decide the candidate edges ``pending`` [(r, u)] as the plain algorithm does: one forward each."""
        for r, u in pending:
            trial = self.mask.clone()
            trial[r, u] = 0
            value = metric_values(self.metric, self.runner.trace(trial).logits[None])[0]
            self.n_evaluated += 1
            self.n_passes += 1
            self.decide(r, u, value)

    def speculate(self, pending: list[tuple[int, int]]) -> None:
        """Decide the candidate edges ``pending`` [(r, u)], in order, by speculative batches."""
        # First guess: all removed while nearly all edges so far were (the start, and the usual
        # course of a run), which makes the batch the chain of cumulative removals; otherwise all
        # kept, which makes it the single removals, whose values predict the rest well.
        predict = {e: self.n_removed >= 4 * self.n_kept for e in pending}
        while pending:
            if self.dirty:
                # the previous base is dropped: update it in place, unless it is the runner's clean run
                self.base = self.runner.retrace(self.base, self.mask, reuse=self.base is not self.runner.clean)
                self.dirty = False
            batch, variants, trial = pending[:self.window], [], self.mask.clone()
            for e in batch:
                v = trial.clone()
                v[e] = 0
                variants.append(v)
                if predict[e]:
                    trial[e] = 0
            values = metric_values(self.metric, self.runner.run(torch.stack(variants), base=self.base))
            self.n_evaluated += len(batch)
            self.n_passes += 1
            guessed, prev = [predict[e] for e in batch], self.cur
            stop, missed = len(batch), False
            for j, (r, u) in enumerate(batch):
                if self.decide(r, u, values[j]) != guessed[j]:
                    stop, missed = j + 1, True
                    break
            # A window that guessed right grows (up to one chunk of the runner, beyond which a
            # batch is no faster per variant); a wrong guess shrinks it, as it wastes the rest.
            self.window = max(2, self.window // 2) if missed else min(2 * self.window, self.max_window)
            # Refresh the guesses for the rest: variant j differs from the last variant before it
            # that was guessed removed by exactly edge j, so the pair estimates edge j's decision
            # on a base that is nearly right.
            for j, e in enumerate(batch):
                if j >= stop:
                    predict[e] = self.removes(values[j], prev)
                if guessed[j]:
                    prev = values[j]
            pending = pending[stop:]
