"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

EAP scores every edge u -> r of circuitlab.graph by the first-order change of the
metric when the edge is ablated:

    score(u -> r) = (abl_u - out_u) . dM/d in_r        (summed over examples, positions, d_model)

from one clean forward and backward (the ablated values come from the runner's one
corrupted forward). EAP-IG replaces the gradient by its average over ``steps``
points on the straight line from the ablated input embedding to the clean one
(inputs x_k = abl_input + k/steps (x - abl_input), k = 1..steps), as in Hanna et
al.'s EAP-IG-inputs. A positive score means ablating the edge raises the metric.

Head attribution does the same for the n_layer x n_head head masks of
minigpt2.masking: score(l, h) = (r_h - z_h) . dM/dz_h, the first-order change of the
metric when head h's z is replaced by r_h (zero, mean or corrupted z), from one
forward and one backward of the plain model (steps of each for EAP-IG).

Circuits come from the scores by top-k or by threshold on |score|.

A metric that is at its optimum on the clean run, like the KL divergence to it, has zero
gradient there: plain EAP scores are then rounding noise, and EAP-IG (whose path starts at
the ablated input) or a task metric such as a logit difference is needed.
"""

from __future__ import annotations

import torch

from minigpt2.masking import last_positions, replacement_values
from minigpt2.model import GPT2

from .graph import Circuit, EdgeRunner, Graph, Metric, check_ablation

METHODS = ("eap", "eap-ig")
_HEAD_MODES = {"resample": "patch", "mean": "mean", "zero": "zero"}


def check_method(method: str, steps: int) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose 'eap' (one gradient at the clean input) "
                         "or 'eap-ig' (gradients averaged along the path from the ablated input)")
    if method == "eap":
        return 1
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: EAP-IG needs a positive integer number of interpolation steps (e.g. 5)")
    return steps


def _scalar(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    value = metric(logits[None])
    if value.shape != (1,):
        raise ValueError(f"metric must map logits [V, B, vocab] to one value per variant [V], got shape "
                         f"{tuple(value.shape)} for V=1. Fix: average over examples, "
                         "e.g. lambda l: per_example(l).mean(-1)")
    return value[0]


def edge_attribution(runner: EdgeRunner, metric: Metric, method: str = "eap", steps: int = 5) -> torch.Tensor:
    """Scores [R, S] for every edge of ``runner.graph`` (0 where there is no edge).

    method "eap": one forward and backward of the edge graph at the clean input.
    "eap-ig": ``steps`` of them along the path from the ablated input embedding.
    """
    steps = check_method(method, steps)
    g, model = runner.graph, runner.model
    ones = g.ones(model.dtype).to(model.device)
    with torch.no_grad():
        clean_embed = model.embed(runner.tokens, attention_mask=runner.attention_mask)
        abl_embed = runner.ablated[0].expand_as(clean_embed)
    grads = None
    for k in range(1, steps + 1):
        embed = None if method == "eap" else abl_embed + k / steps * (clean_embed - abl_embed)
        with torch.enable_grad():
            tr = runner.trace(ones, embed=embed, keep_inputs=True)
            step = torch.autograd.grad(_scalar(metric, tr.logits), tr.inputs)
        grads = step if grads is None else [a + b for a, b in zip(grads, step)]
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=model.dtype, device=model.device)
    D = runner.clean.effect  # out_u - abl_u  [S, B, T, d]
    for st, grad in zip(g.stages, grads):
        eff = runner.clean.effect_at if st.kind == "logits" else D
        # (abl_u - out_u) . mean gradient of in_r
        scores[st.rows.start:st.rows.stop, :st.n_in] = -torch.einsum("r...,u...->ru", grad / steps, eff[:st.n_in])
    return scores.detach()


def head_attribution(model: GPT2, tokens: torch.Tensor, metric: Metric, method: str = "eap", steps: int = 5,
                     ablation: str = "resample", corrupted: torch.Tensor | None = None,
                     reference: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     reference_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [n_layer, n_head]: the first-order change of the metric when each head is ablated
    (its z replaced, as ``run_with_head_masks`` does), all from one forward and backward per step.

    Arguments as for :class:`circuitlab.graph.EdgeRunner`; compare with the exact sweep
    ``circuitlab.compare.exact_head_effects``.
    """
    steps = check_method(method, steps)
    check_ablation(ablation)
    tokens = tokens.to(model.device)
    B, T = tokens.shape
    positions = last_positions(tokens, attention_mask) if positions is None else positions
    mode = _HEAD_MODES[ablation]
    if ablation == "resample" and corrupted is None:
        raise ValueError("ablation='resample' needs corrupted=[B, T] prompts paired with the clean ones")
    ref = corrupted if ablation == "resample" else reference
    r = replacement_values(model, mode, tokens, None if ref is None else torch.as_tensor(ref).to(model.device),
                           attention_mask, reference_mask)  # per layer, or None (zero)
    L = model.cfg.n_layer
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names=["hook_embed", "hook_pos_embed"] + z_names,
                                        attention_mask=attention_mask)
        tok_abl, pos_abl = _ablated_embeddings(model, ablation, tokens, ref, attention_mask, reference_mask, cache)
    grads = [torch.zeros_like(cache[n]) for n in z_names]
    for k in range(1, steps + 1):
        alpha = k / steps
        probes = [torch.zeros_like(g, requires_grad=True) for g in grads]  # dM/dprobe = dM/dz
        hooks = [(n, lambda z, hp, p=p: z + p) for n, p in zip(z_names, probes)]
        if method == "eap-ig":
            hooks += [("hook_embed", lambda x, hp: tok_abl + alpha * (x - tok_abl)),
                      ("hook_pos_embed", lambda x, hp: pos_abl + alpha * (x - pos_abl))]
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, attention_mask=attention_mask, positions=positions, fwd_hooks=hooks)
            step = torch.autograd.grad(_scalar(metric, logits), probes)
        grads = [a + b for a, b in zip(grads, step)]
    scores = []
    for l, n in enumerate(z_names):
        z = cache[n]  # [B, T, H, d_head]
        rl = torch.zeros_like(z) if r is None else r[l].expand_as(z)
        scores.append(torch.einsum("bthe,bthe->h", rl - z, grads[l] / steps))
    return torch.stack(scores).detach()


def _ablated_embeddings(model, ablation, tokens, ref, attention_mask, reference_mask, cache):
    """The token and position embeddings that EAP-IG starts from: corrupted, mean or zero."""
    tok, pos = cache["hook_embed"], cache["hook_pos_embed"]
    if ablation == "zero":
        return torch.zeros_like(tok), torch.zeros_like(pos)
    if ablation == "resample":
        return model.wte(torch.as_tensor(ref).to(model.device)), pos
    ref, ref_mask = (tokens, attention_mask) if ref is None else (torch.as_tensor(ref).to(model.device), reference_mask)
    w = torch.ones(ref.shape, device=model.device) if ref_mask is None else ref_mask.to(model.device).to(tok.dtype)
    mean = (model.wte(ref) * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]  # [T, d]
    return mean.expand_as(tok), pos


def top_k_circuit(graph: Graph, scores: torch.Tensor, k: int, info: dict | None = None) -> Circuit:
    """The k edges with the largest |score|."""
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= graph.n_edges:
        raise ValueError(f"k={k!r} must be an integer in [0, {graph.n_edges}] (the graph's edge count)")
    flat = scores.detach().abs().cpu().double().masked_fill(~graph.valid, -1).flatten()
    edges = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    edges[flat.argsort(descending=True, stable=True)[:k]] = True
    return Circuit(graph, edges.view_as(graph.valid), scores.detach().cpu(), dict(info or {}, top_k=k))


def threshold_circuit(graph: Graph, scores: torch.Tensor, threshold: float, info: dict | None = None) -> Circuit:
    """The edges with |score| >= threshold."""
    if not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold={threshold!r} must be a number >= 0 (edges with |score| >= threshold are kept)")
    edges = scores.detach().abs().cpu() >= threshold
    return Circuit(graph, edges, scores.detach().cpu(), dict(info or {}, threshold=threshold))


def eap(runner: EdgeRunner, metric: Metric, method: str = "eap", steps: int = 5, top_k: int | None = None,
        threshold: float | None = None) -> Circuit:
    """Score every edge and keep the top k (or those with |score| >= threshold); the circuit's
    ``scores`` hold all edge scores."""
    if (top_k is None) == (threshold is None):
        raise ValueError("pass exactly one of top_k (keep the k highest |scores|) or threshold (keep |score| >= it)")
    scores = edge_attribution(runner, metric, method, steps)
    info = {"method": method, "steps": steps if method == "eap-ig" else 1, "ablation": runner.ablation}
    if top_k is not None:
        return top_k_circuit(runner.graph, scores, top_k, info)
    return threshold_circuit(runner.graph, scores, threshold, info)

