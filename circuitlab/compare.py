"""How well the fast methods recover the exhaustive ones.

- head scores: Spearman rank correlation between EAP / EAP-IG head attributions and the
  exact single-head ablation sweep (minigpt2.masking.single_head_masks + run_with_head_masks);
- circuits: overlap of two edge sets, and the ROC curve of an edge score (e.g. EAP's)
  against a reference circuit (e.g. ACDC's) over all thresholds;
- faithfulness against circuit size: the metric of the top-k circuit alone, relative to
  the full model and to the fully ablated one, for many k in one batched run.
"""

from __future__ import annotations

import torch

from minigpt2.engine import BatchMetric, Metric, batch_metric, check_ablation
from minigpt2.masking import run_with_head_masks, single_head_masks
from minigpt2.model import GPT2

from .eap import head_attribution, top_k_circuit
from .graph import Circuit, EdgeRunner


def exact_head_effects(model: GPT2, tokens: torch.Tensor, metric: Metric | BatchMetric, ablation: str = "resample",
                       corrupted: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """[n_layer, n_head]: metric(head ablated alone) - metric(clean), by the batched exact sweep."""
    ablation = check_ablation(ablation)
    cfg = model.cfg
    masks = single_head_masks(cfg.n_layer, cfg.n_head, dtype=model.dtype)
    with torch.no_grad():
        values = run_with_head_masks(model, tokens, masks, positions=positions, ablation=ablation,
                                     reference=corrupted if ablation == "resample" else reference,
                                     attention_mask=attention_mask, reference_mask=reference_mask, metric=metric)
    return (values[1:] - values[0]).view(cfg.n_layer, cfg.n_head)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties given their average rank."""
    x = x.flatten().double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two same-size tensors (Pearson's on average ranks)."""
    a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two tensors of the same size >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else (ra @ rb).item() / denom


def head_score_agreement(model: GPT2, tokens: torch.Tensor, metric: Metric | BatchMetric, steps: int = 5,
                         **data) -> dict:
    """EAP and EAP-IG head scores against the exact sweep.

    ``data``: ablation, corrupted, reference, attention_mask, reference_mask, positions (as for
    exact_head_effects). Returns the three [L, H] score tensors and Spearman's rho of each
    fast method against the exact effects, signed and in absolute value.
    """
    exact = exact_head_effects(model, tokens, metric, **data)
    out = {"exact": exact}
    for method in ("eap", "eap-ig"):
        s = head_attribution(model, tokens, metric, method=method, steps=steps, **data)
        out[method] = s
        out[f"spearman_{method}"] = spearman(s, exact)
        out[f"spearman_abs_{method}"] = spearman(s.abs(), exact.abs())
    return out


def circuit_overlap(a: Circuit, b: Circuit) -> dict:
    """Edge-set overlap: sizes, intersection, Jaccard, and precision / recall of a against b."""
    if a.edges.shape != b.edges.shape:
        raise ValueError(f"circuits come from different graphs: {a.graph} and {b.graph}")
    # sender -> receiver edges only: an ACDC circuit's whole head-input edges (Circuit.head_inputs) are not
    # among another method's edges
    na, nb = int(a.edges.sum()), int(b.edges.sum())
    both = int((a.edges & b.edges).sum())
    union = int((a.edges | b.edges).sum())
    return {"edges_a": na, "edges_b": nb, "both": both,
            "jaccard": both / union if union else 1.0,
            "precision": both / na if na else float("nan"),
            "recall": both / nb if nb else float("nan")}


def roc_curve(scores: torch.Tensor, reference: Circuit) -> dict:
    """ROC of ranking the graph's edges by |score| against ``reference``'s edges.

    Returns fpr and tpr [n_edges + 1] (from keeping no edge to keeping all) and the area under
    the curve (ties in score are taken in graph order).
    """
    g = reference.graph
    s = scores.detach().abs().cpu().double()[g.valid]
    truth = reference.edges[g.valid]
    order = s.argsort(descending=True, stable=True)
    hits = truth[order].double()
    tpr = torch.cat([torch.zeros(1), hits.cumsum(0)]) / max(int(truth.sum()), 1)
    fpr = torch.cat([torch.zeros(1), (1 - hits).cumsum(0)]) / max(int((~truth).sum()), 1)
    auc = torch.trapezoid(tpr, fpr).item()
    return {"fpr": fpr, "tpr": tpr, "auc": auc}


def _with_bounds(runner: EdgeRunner, metric: Metric | BatchMetric,
                 masks: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """The metric of each edge mask [R, S] run alone, with the full model's and the empty circuit's,
    in one batched run."""
    g, dtype = runner.graph, runner.model.dtype
    masks = torch.stack([m.to(dtype) for m in masks] + [g.ones(dtype), torch.zeros(g.n_receivers, g.n_senders,
                                                                                   dtype=dtype)])
    with torch.no_grad():
        values = runner.run(masks, metric=batch_metric(metric)).double().cpu()
    return values[:-2], values[-2].item(), values[-1].item()


def faithfulness_curve(runner: EdgeRunner, metric: Metric | BatchMetric, scores: torch.Tensor, sizes) -> dict:
    """The metric of each top-k circuit (by |score|) run alone, for k in ``sizes``, in one batched run.

    normalized = (M(circuit) - M(nothing)) / (M(full) - M(nothing)): 1 is as good as the full
    model, 0 as bad as ablating every edge. The circuits run as they are (not pruned); MIB's curve
    is :func:`circuitlab.faithfulness.mib_faithfulness`.
    """
    sizes = [int(k) for k in sizes]
    values, full, empty = _with_bounds(runner, metric, [top_k_circuit(runner.graph, scores, k).mask() for k in sizes])
    denom = full - empty
    normalized = (values - empty) / denom if denom != 0 else torch.full((len(sizes),), float("nan"))
    return {"sizes": sizes, "values": values, "normalized": normalized, "full": full, "empty": empty}


def circuit_faithfulness(runner: EdgeRunner, metric: Metric | BatchMetric, circuit: Circuit) -> dict:
    """The metric of one circuit alone, with the full model's and the empty circuit's.

    metric: a :class:`minigpt2.engine.Metric` (scored by its batch mean) or a callable logits
    [V, B, vocab] -> [V]. The circuit runs as it is (not pruned); for MIB's faithfulness of a
    method's scores, which prunes, see :func:`circuitlab.faithfulness.mib_faithfulness`.
    """
    values, full, empty = _with_bounds(runner, metric, [circuit.mask()])
    c = values.item()
    return {"value": c, "full": full, "empty": empty,
            "normalized": (c - empty) / (full - empty) if full != empty else float("nan")}


RECOVERS_NOTHING = 0.1  # a circuit whose normalised faithfulness is below this recovers nothing of the model


def recovers_nothing(faith: dict) -> bool:
    """Whether a circuit's held-out faithfulness (circuitlab.compare.circuit_faithfulness) says it recovers
    nothing: normalised below RECOVERS_NOTHING (or undefined, when ablating everything changes nothing)."""
    f = faith["normalized"]
    return f != f or f < RECOVERS_NOTHING


def nothing_to_recover(full: float, empty: float, higher_is_better: bool) -> bool:
    """Whether the full model does no better on the metric than with every edge ablated: then a circuit's
    normalised faithfulness divides by (almost) nothing and says nothing (a base that fails the task)."""
    gain = (full - empty) if higher_is_better else (empty - full)
    return not gain > 0


def not_a_finding(faith: dict, higher_is_better: bool) -> bool:
    """A circuit that recovers nothing, or one of a model with nothing to recover: not drawn as a finding."""
    return recovers_nothing(faith) or nothing_to_recover(faith["full"], faith["empty"], higher_is_better)
