"""Every edge method by name, scored the one way MIB scores them (circuitlab.faithfulness).

    from minigpt2 import load_pretrained
    from circuitlab.methods import edge_circuit
    from circuitlab.task import build_data, edge_runner, make_metric
    model = load_pretrained("weights/welterweight")
    batch, corrupted = build_data(8, seed=0, ablation="resample", space=model.answer_space)
    runner, metric = edge_runner(model, batch, corrupted, "resample"), make_metric("logit_diff", batch)
    for method in ("eap", "information-flow"):
        counts = edge_circuit(method, runner, metric, top_k=50).node_counts()
        print(f"{method}: {counts['edges']} edges, {counts['heads']} heads")

``compare_methods(runner, metric, held_runner, held_metric, EDGE_METHODS)`` scores every method
on ``runner``'s prompts and measures its MIB curve on the held-out ones (minutes on a CPU).

Each method gives edge scores [R, S] (or a circuit with scores) on ``runner``'s prompts; its MIB
curve, CPR and CMD are measured on ``held_runner``'s (held-out) prompts. The methods:

    acdc                ACDC (circuitlab.acdc); scores: each evaluated edge's worsening
    eap                 edge attribution patching, one gradient (circuitlab.eap)
    eap-ig              EAP-IG on the input embedding (MIB's rule, k = 0..m-1)
    eap-ig-activations  EAP-IG interpolating each sender's activation
    clean-corrupted     the gradient at the clean and the corrupted end only
    information-flow    information flow routes (Ferrando & Voita 2024): one forward, no gradient
    edge-patching       each edge ablated alone, exactly (circuitlab.edge_patching)
    learned-masks       Edge Pruning's learned masks (circuitlab.learned_masks); scores: each edge's
                        keep probability P(z > 0), in the order of the learned logits

Information-flow routes are selected greedily from the logits up, as MIB does for them; every
other method by its top edges. :func:`edge_circuit` gives any method but ACDC (which decides edge by
edge) as a circuit of its top edges: ``circuits.py eap --method NAME`` runs it. Scores that are importances (higher = needed: ACDC's worsenings, information flow, learned mask
keep probabilities) enter MIB's ranking as they are; the others are the metric's change when the edge is
ablated and are flipped for a higher-is-better metric (faithfulness.importance_sign).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .faithfulness import FaithfulnessCurve, mib_faithfulness

EDGE_METHODS = ("acdc", "eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "information-flow",
                "edge-patching", "learned-masks")
IMPORTANCE = ("acdc", "information-flow", "learned-masks")  # scores already high for needed edges
SCORING_METHODS = tuple(m for m in EDGE_METHODS if m != "acdc")  # scores, then a circuit of the top edges


@dataclass
class MethodSettings:
    """Knobs of the methods that have them."""

    acdc_threshold: float = 0.05  # absolute, on the comparison's metric
    ig_steps: int = 5
    learned_steps: int = 100
    learned_penalty: float = 0.01
    progress: bool = False


@dataclass
class MethodResult:
    method: str
    curve: FaithfulnessCurve
    seconds: float
    info: dict = field(default_factory=dict)


def check_methods(methods) -> list[str]:
    methods = list(methods)
    unknown = [m for m in methods if m not in EDGE_METHODS]
    if unknown:
        raise ValueError(f"unknown edge methods {unknown}; choose from {list(EDGE_METHODS)}")
    if not methods:
        raise ValueError(f"name at least one edge method of {list(EDGE_METHODS)}")
    return methods


def edge_scores(method: str, runner, metric, settings: MethodSettings | None = None):
    """The method's scores [R, S] on ``runner``'s prompts (a Circuit with scores for ACDC)."""
    s = settings or MethodSettings()
    check_methods([method])
    if method == "acdc":
        from .acdc import acdc
        return acdc(runner, metric, s.acdc_threshold, progress=s.progress).circuit
    if method in ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted"):
        from .eap import edge_attribution
        return edge_attribution(runner, metric, method, steps=s.ig_steps, progress=s.progress)
    if method == "information-flow":
        from .info_flow import information_flow_scores
        return information_flow_scores(runner)
    if method == "edge-patching":
        from .edge_patching import edge_patching_scores
        return edge_patching_scores(runner, metric, progress=s.progress)
    from .learned_masks import keep_probability, learn_edge_mask
    log_alpha = learn_edge_mask(runner, None, penalty=s.learned_penalty, steps=s.learned_steps,
                                progress=s.progress).circuit.scores
    # the keep probability P(z > 0): the same order as the logits, but >= 0, so that MIB's CMD
    # (which ranks by |score|) ranks by it too rather than putting the surest-pruned edges first
    valid = runner.graph.valid.to(log_alpha.device)
    return keep_probability(log_alpha.double()).masked_fill(~valid, 0)


def compare_methods(runner, metric, held_runner, held_metric, methods=EDGE_METHODS,
                    settings: MethodSettings | None = None, log=None) -> list[MethodResult]:
    """Each method's scores on ``runner``, its MIB curve on ``held_runner``; with its time."""
    out = []
    for method in check_methods(methods):
        if log:
            log(method)
        t = time.perf_counter()
        scores = edge_scores(method, runner, metric, settings)
        seconds = time.perf_counter() - t
        sign = 1.0 if method in IMPORTANCE else None
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu()
        curve = mib_faithfulness(held_runner, held_metric, scores, sign=sign, name=method,
                                 select="greedy" if method == "information-flow" else "top",
                                 progress=settings is not None and settings.progress)
        out.append(MethodResult(method, curve, seconds))
    return out


def edge_circuit(method: str, runner, metric, top_k: int | None = None, threshold: float | None = None,
                 settings: MethodSettings | None = None, rule: str | None = None):
    """The circuit of a scoring method (any of :data:`SCORING_METHODS`): every edge scored on ``runner``'s
    prompts, then the ``top_k`` edges of largest |score| (information flow: ``top_k`` edges grown from the
    logits up, MIB's selection, then pruned) or those with |score| >= ``threshold``; exactly one of the two.
    The circuit's ``scores`` hold every edge's score and ``info["method"]`` the method's name here."""
    from .eap import METHODS, eap, threshold_circuit, top_k_circuit

    if method not in SCORING_METHODS:
        raise ValueError(f"method {method!r} is not a scoring method; choose from {list(SCORING_METHODS)}"
                         + (" (ACDC has its own command: circuits.py acdc)" if method == "acdc" else ""))
    if (top_k is None) == (threshold is None):
        raise ValueError("pass exactly one of top_k (keep the k highest |scores|) or threshold (keep |score| >= it)")
    s = settings or MethodSettings()
    if method in METHODS:
        return eap(runner, metric, method, s.ig_steps, top_k=top_k, threshold=threshold, rule=rule,
                   progress=s.progress)
    if method == "information-flow":
        from .info_flow import information_flow_routes
        circuit = information_flow_routes(runner, threshold=threshold, greedy=top_k)
        circuit.info["method"] = method
        return circuit
    scores = edge_scores(method, runner, metric, s).detach().cpu()
    info = {"method": method, "ablation": runner.ablation}
    if method in IMPORTANCE:
        info["score_convention"] = "importance"
    elif getattr(metric, "higher_is_better", None) is not None:  # edge patching: the metric's change, as EAP's
        info.update(metric=getattr(metric, "name", None), higher_is_better=metric.higher_is_better)
    if top_k is not None:
        return top_k_circuit(runner.graph, scores, top_k, info)
    return threshold_circuit(runner.graph, scores, threshold, info)
