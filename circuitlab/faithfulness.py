"""MIB's faithfulness of an edge method: CPR, CMD and the faithfulness-against-size curve.

MIB's circuit-localization track (Mueller et al. 2025; hannamw/MIB-circuit-track,
``MIB_circuit_track/evaluation.py``: ``evaluate_area_under_curve``) scores a method's edge
scores by the faithfulness of its top edges,

    f(C) = (m(C) - m(empty)) / (m(N) - m(empty)),

for the top {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100} % of the graph's edges, where m is the
batch mean of the metric (MIB: the logit difference), N the full model and ``empty`` the circuit
with no edge (every edge ablated; MIB's ``graph.apply_topn(0)``). Then, by the trapezoid rule:

    CPR  edges ranked by signed score (MIB: ``absolute=False``); the area under f.  Higher is better.
    CMD  edges ranked by |score| (``--absolute``); the area under |1 - f|.          Lower is better.

As MIB computes them (each point checked against that code):

- top-k: k = int(fraction * n_edges), rounded down, of all the graph's edges (``int(pct *
  n_scored_items)`` with ``n_scored_items = len(graph.edges)``); ties in score are taken in this
  graph's order (MIB's ``torch.argsort`` leaves them unspecified).
- the x axis is the fraction of edges itself, 0.001 .. 1, on a linear scale and not rescaled
  (MIB's default ``log_scale=False``): the area spans [0.001, 1], so f = 1 throughout gives
  CPR = 0.999 and f = 0 throughout CMD = 0.999. ``log_scale=True`` integrates over log(fraction)
  as MIB's option does.
- each top-k circuit is pruned before it is measured (``apply_topn(..., prune=True)`` and
  ``evaluate_graph``'s ``graph.prune()``): components with no incoming kept edge (the input
  node excepted) or with no outgoing one are dropped with their edges, to a fixed point; this is
  :meth:`circuitlab.graph.Circuit.pruned` with ``resample=True``. Exact under resample ablation
  (MIB's default, "patching"); under mean or zero ablation it changes the value, as in MIB.
  ``prune=False`` measures the top-k edges as they are.
- m(N) is the plain model, m(empty) every edge ablated; both come from the same runner.

One difference remains, in the graph: here the input node is the token plus the position
embedding, in MIB's code the token embedding alone. They agree under resample ablation
(clean and corrupted prompts share positions), not under zero ablation.

Scores and their sign. MIB attributes a loss (``loss=True``: minus the logit difference), so its
scores are high for edges the task needs and CPR takes the highest. circuitlab's scores follow
each method: EAP and EAP-IG give the metric's change when the edge is ablated (negative for a
needed edge when the metric is higher-is-better), ACDC the worsening of its metric (positive
for a needed edge). :func:`importance_sign` turns either into MIB's direction; pass ``sign``
when the scores came from a metric of another direction than the one named.

All circuit sizes of both rankings, the full model and the empty circuit are evaluated in one
batched ``EdgeRunner.run``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from minigpt2.engine import BatchMetric, Metric, batch_metric, check_variant_values
from minigpt2.engine import higher_is_better as _metric_higher_is_better

from .graph import Circuit, EdgeRunner, Graph

PERCENTAGES = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)  # MIB's, as fractions of the edges
IMPORTANCE_METHODS = ("acdc",)  # methods whose scores are already high for needed edges


@dataclass
class FaithfulnessCurve:
    """MIB's evaluation of one method's edge scores.

    fractions: the x axis (fractions of the graph's edges); n_edges: the top-k sizes, int(fraction *
    total_edges); cpr_faithfulness / cmd_faithfulness: f at each size, edges ranked by signed score /
    by |score|; cpr_kept / cmd_kept: the edges left after pruning; cpr: area under f (signed
    ranking, higher is better); cmd: area under |1 - f| (absolute ranking, lower is better);
    cpr_average / cmd_average: the mean of f over the points (MIB's "average"); full, empty: m(N)
    and m(empty).
    """

    name: str
    fractions: list[float]
    n_edges: list[int]
    cpr_faithfulness: list[float]
    cmd_faithfulness: list[float]
    cpr_kept: list[int]
    cmd_kept: list[int]
    cpr: float
    cmd: float
    cpr_average: float
    cmd_average: float
    full: float
    empty: float
    total_edges: int
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float))

    @classmethod
    def from_json(cls, d: dict) -> "FaithfulnessCurve":
        return cls(**d)


def area(fractions: Sequence[float], values: Sequence[float], log_scale: bool = False) -> float:
    """The trapezoid rule over the points, as MIB's loop adds it up (x: the fractions, or their logs)."""
    total = 0.0
    for i in range(len(values) - 1):
        x1, x2 = fractions[i], fractions[i + 1]
        if log_scale:
            x1, x2 = math.log(x1), math.log(x2)
        total += (x2 - x1) * ((values[i] + values[i + 1]) / 2)
    return total


def importance_sign(scores, metric=None, higher_is_better: bool | None = None) -> float:
    """+1 or -1: the factor that makes ``scores`` high for the edges a circuit needs (MIB's direction).

    A Circuit from ACDC (``info["method"] == "acdc"``: its scores are worsenings) or one read from
    a MIB file (``info["score_convention"] == "importance"``) is already in that direction: +1.
    Otherwise the scores are taken as EAP's, the metric's change when the edge is ablated: -1 for a
    higher-is-better metric (``higher_is_better``, else the Circuit's ``info["higher_is_better"]``,
    else ``metric.higher_is_better`` for a :class:`minigpt2.engine.Metric`, else True: a plain
    callable is taken for a logit difference, MIB's metric), +1 for a lower-is-better one.
    """
    info = scores.info if isinstance(scores, Circuit) else {}
    if info.get("score_convention") == "importance" or str(info.get("method", "")).lower() in IMPORTANCE_METHODS:
        return 1.0
    if higher_is_better is None:
        higher_is_better = info.get("higher_is_better", _metric_higher_is_better(metric, True))
    return -1.0 if higher_is_better else 1.0


def _scores(scores, graph: Graph) -> torch.Tensor:
    if isinstance(scores, Circuit):
        if scores.scores is None:
            raise ValueError("this circuit has no edge scores; MIB's faithfulness ranks edges by score. Fix: pass "
                             "the method's scores [R, S] (e.g. circuit.scores of an eap() or acdc() circuit)")
        if scores.graph.n_layer != graph.n_layer or scores.graph.n_head != graph.n_head:
            raise ValueError(f"the circuit's graph {scores.graph} is not the runner's {graph}")
        scores = scores.scores
    scores = torch.as_tensor(scores).detach().cpu().double()
    if scores.shape != graph.valid.shape:
        raise ValueError(f"edge scores must be [R={graph.n_receivers}, S={graph.n_senders}] (receivers x senders), "
                         f"got {tuple(scores.shape)}")
    if torch.isnan(scores[graph.valid]).any():
        raise ValueError("edge scores contain NaN; MIB's ranking needs a number for every edge")
    return scores


def top_edges(graph: Graph, ranking: torch.Tensor, k: int, prune: bool = True) -> torch.Tensor:
    """[R, S] bool: the k edges highest in ``ranking`` (ties in graph order), pruned as MIB does."""
    flat = ranking.masked_fill(~graph.valid, -math.inf).flatten()
    edges = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    edges[flat.argsort(descending=True, stable=True)[:k]] = True
    circuit = Circuit(graph, edges.view_as(graph.valid))
    return (circuit.pruned(resample=True) if prune else circuit).edges


def _check_fractions(fractions: Sequence[float], log_scale: bool) -> list[float]:
    """``fractions`` as floats, checked: increasing, in [0, 1], and > 0 for a log scale."""
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions {fractions} must be increasing fractions of the edges in [0, 1], "
                         "e.g. MIB's (0.001, ..., 1)")
    if log_scale and fractions[0] <= 0:
        raise ValueError("log_scale needs fractions > 0")
    return fractions


def _circuits(graph: Graph, ranking: torch.Tensor, sizes: Sequence[int], select: str,
              prune: bool) -> list[torch.Tensor]:
    """[R, S] bool edges of each size, chosen by ``ranking``: the top k (MIB's ``apply_topn``) or grown
    greedily from the logits (its ``apply_greedy``)."""
    if select == "greedy":
        from .info_flow import greedy_edges

        return [greedy_edges(graph, ranking, k, absolute=False, prune=prune).edges for k in sizes]
    return [top_edges(graph, ranking, k, prune) for k in sizes]


def mib_faithfulness(runner: EdgeRunner, metric: Metric | BatchMetric, scores, *, sign: float | None = None,
                     prune: bool = True, fractions: Sequence[float] = PERCENTAGES, log_scale: bool = False,
                     name: str | None = None, select: str = "top", progress: bool = False) -> FaithfulnessCurve:
    """MIB's CPR, CMD and faithfulness curve of edge ``scores`` (any method's), in one batched run.

    runner: the data and the ablation (MIB's default: ablation="resample" with corrupted prompts);
    metric: a :class:`minigpt2.engine.Metric` (its batch mean) or a callable logits [V, B, vocab] ->
    [V] (MIB: the logit difference). scores: [R, S] or a Circuit with scores; ``sign`` (+1 or -1)
    multiplies them into MIB's direction, high for needed edges (default: :func:`importance_sign`).
    prune, fractions, log_scale: as MIB (see the module's docstring); name: the legend's label
    (default: the circuit's info["method"]). select: "top" (the k best edges, MIB's ``apply_topn``)
    or "greedy" (grown from the logits up, MIB's ``apply_greedy``, which MIB uses for
    information-flow routes; :func:`circuitlab.info_flow.greedy_edges`). progress: a bar (or log
    lines) over the batched run's chunks. On a runner with a process group (EdgeRunner's ``group``) the
    run is split over its ranks and every rank returns the one-process curve, bit for bit.
    """
    if select not in ("top", "greedy"):
        raise ValueError(f"select={select!r}: choose 'top' (MIB's apply_topn) or 'greedy' (its apply_greedy)")
    g = runner.graph
    s = _scores(scores, g)
    sign = importance_sign(scores, metric) if sign is None else float(sign)
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign={sign!r} must be +1 or -1 (the factor that makes needed edges' scores high)")
    fractions = _check_fractions(fractions, log_scale)
    sizes = [int(f * g.n_edges) for f in fractions]  # MIB: int(pct * n_scored_items)
    cpr_edges = _circuits(g, sign * s, sizes, select, prune)
    cmd_edges = _circuits(g, s.abs(), sizes, select, prune)
    dtype = runner.model.dtype
    masks = torch.stack([g.ones(dtype), torch.zeros(g.n_receivers, g.n_senders, dtype=dtype)]
                        + [e.to(dtype) for e in cpr_edges + cmd_edges])
    with torch.no_grad():
        # (only an EdgeRunner takes progress; any object with run(masks, metric=) works without it)
        bar = {"progress": True, "desc": f"MIB faithfulness{f' of {name}' if name else ''}"} if progress else {}
        values = check_variant_values(runner.run(masks, metric=batch_metric(metric), **bar), len(masks)).double().cpu()
    full, empty = values[0].item(), values[1].item()
    denom = full - empty
    f = ((values[2:] - empty) / denom).tolist() if denom != 0 else [math.nan] * (2 * len(sizes))
    f_cpr, f_cmd = f[:len(sizes)], f[len(sizes):]
    if name is None:
        name = str(scores.info.get("method", "")) if isinstance(scores, Circuit) else ""
    return FaithfulnessCurve(
        name=name, fractions=fractions, n_edges=sizes, cpr_faithfulness=f_cpr, cmd_faithfulness=f_cmd,
        cpr_kept=[int(e.sum()) for e in cpr_edges], cmd_kept=[int(e.sum()) for e in cmd_edges],
        cpr=area(fractions, f_cpr, log_scale), cmd=area(fractions, [abs(1 - v) for v in f_cmd], log_scale),
        cpr_average=sum(f_cpr) / len(f_cpr), cmd_average=sum(f_cmd) / len(f_cmd), full=full, empty=empty,
        total_edges=g.n_edges,
        info={"ablation": runner.ablation, "examples": int(runner.tokens.shape[0]), "prune": prune,
              "log_scale": log_scale, "sign": sign, "select": select,
              "metric": metric.name if isinstance(metric, Metric) else getattr(metric, "__name__", "")})


def plot_faithfulness(curves, path: str | Path, title: str = "") -> Path:
    """Several methods' faithfulness against circuit size in one PNG: the signed ranking (CPR) on the
    left, the absolute one (CMD) on the right; x: percent of edges (log scale), y: f.

    curves: FaithfulnessCurve objects (labelled by their name) or a dict label -> FaithfulnessCurve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(curves.items()) if isinstance(curves, dict) else [(c.name or f"method {i + 1}", c)
                                                                     for i, c in enumerate(curves)]
    if not items:
        raise ValueError("no curves to plot")
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = [("signed ranking: CPR (area under f, higher is better)", "cpr_faithfulness", "cpr", "CPR"),
              ("absolute ranking: CMD (area under |1 - f|, lower is better)", "cmd_faithfulness", "cmd", "CMD")]
    for ax, (heading, key, score, short) in zip(axes, panels):
        for label, c in items:
            xs = [100 * x for x in c.fractions]
            ax.plot(xs, getattr(c, key), marker="o", markersize=3, label=f"{label} ({short} {getattr(c, score):.3f})")
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        if all(x > 0 for _, c in items for x in c.fractions):
            ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit (% of the graph's)")
        ax.set_title(heading, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("faithfulness f = (m(C) - m(empty)) / (m(N) - m(empty))", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
