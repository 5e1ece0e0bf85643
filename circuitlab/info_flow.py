"""Information flow routes (Ferrando & Voita 2024) on the edge graph: the cheapest screen.

Every receiver's input is a sum of its senders' outputs (circuitlab.graph: in_r = c_r + sum_u out_u
on the clean run, c_r the b_O constants). Ferrando & Voita's importance of sender u for receiver r is
the share of in_r that out_u accounts for, by L1 proximity:

    proximity(u, r) = max(||in_r||_1 - ||in_r - out_u||_1, 0)
    importance(u, r) = proximity(u, r) / sum_{u' -> r} proximity(u', r)        (in [0, 1], sums to 1)

at every example and position, from the clean forward alone: no gradient, no corrupted run, no
metric. As MIB computes it (hannamw/EAP-IG, src/eap/attribute.py: ``get_scores_information_flow_routes``,
the same at the commit MIB pins, 7af394a, and now; MIB runs it as method "information-flow-routes"):

- the receivers are the q, k and v inputs of every head (``hook_{q,k,v}_input``: all of layer l's
  head inputs are the same residual stream, so they share their scores), the MLP inputs
  (``hook_mlp_in``) and the final residual (``blocks.{L-1}.hook_resid_post``), at every position;
  the senders the input node, each head (``attn.hook_result``) and each MLP (``hook_mlp_out``);
- the importance is averaged over each example's real positions (padding masked: ``input_lengths``),
  then over the examples (``scores /= total_items``); the final residual too, at every position,
  not only the scored one. ``positions="answer"`` takes the scored position alone instead (the
  runner's ``positions``: a route to the prediction, as Ferrando & Voita draw them).

Differences: the input node here is the token plus the position embedding (the reference's is the
token embedding alone, ``hook_embed``, the position embedding then being part of in_r but of no
sender); with no position embedding the two agree exactly. A position where every proximity is 0
(the reference divides 0 by 0 there) gets importance 0.

Sign convention: these are importance scores, high (and >= 0) for the edges that carry much of a
receiver's input, the opposite of EAP's (circuitlab.eap: the metric's change when the edge is
ablated, negative for a needed edge of a higher-is-better metric). For
:func:`circuitlab.faithfulness.mib_faithfulness` pass ``sign=+1`` with a raw score tensor (without
it the scores are taken as EAP's and, for a higher-is-better metric like the logit difference,
negated), or pass the Circuit of :func:`information_flow_routes`, whose ``info["score_convention"]
== "importance"`` makes :func:`circuitlab.faithfulness.importance_sign` return +1.

MIB evaluates this method's circuits with a greedy selection rather than the top-n of the other
methods (MIB-circuit-track, run_evaluation.py: ``apply_greedy = args.method in
["information-flow-routes"]``; hannamw/EAP-IG's ``Graph.apply_greedy``): :func:`greedy_edges`.

Ferrando & Voita prune a route by a threshold on the importance (keep edges with importance >= tau);
:func:`information_flow_routes` takes ``threshold`` (or ``top_k``, or ``greedy``).
"""

from __future__ import annotations

import heapq

import torch

from clikit import Range

from .eap import threshold_circuit, top_k_circuit
from .graph import Circuit, EdgeRunner, Graph

POSITIONS = ("all", "answer")


def _position_weights(runner: EdgeRunner, positions: str) -> torch.Tensor:
    """[B, T]: each example's weights over positions, summing to 1."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose 'all' (the mean over each example's real positions, "
                         "MIB's) or 'answer' (the runner's scored position only)")
    B, T = runner.tokens.shape
    dev, dtype = runner.model.device, runner.model.dtype
    if positions == "answer":
        w = torch.zeros(B, T, device=dev, dtype=dtype)
        w[torch.arange(B, device=dev), runner.positions] = 1
        return w
    w = torch.ones(B, T, device=dev, dtype=dtype) if runner.attention_mask is None \
        else runner.attention_mask.to(dev).to(dtype)
    return w / w.sum(1, keepdim=True).clamp(min=1)


@torch.no_grad()
def information_flow_scores(runner: EdgeRunner, positions: str = "all", chunk: int = 32) -> torch.Tensor:
    """Importance scores [R, S] of every edge of ``runner.graph`` (0 where there is no edge) from the
    runner's clean forward (``runner.clean``): the mean over examples and positions of the share of
    each receiver's input that each sender contributes, by L1 proximity (see the module's docstring).

    Higher = more important (in [0, 1]; each receiver's row sums to 1 at every position): give
    ``sign=+1`` to :func:`circuitlab.faithfulness.mib_faithfulness`. The ablation of the runner plays
    no part. positions: "all" (default, MIB's) or "answer". chunk: senders per proximity batch
    (memory: chunk x B x T x d_model).
    """
    g, model = runner.graph, runner.model
    w = _position_weights(runner, positions)  # [B, T]
    effect, ablated = runner.clean.effect, runner.ablated  # out_u - abl_u [S, B, T, d], abl_u [S, B|1, T|1, d]

    def out(u0: int, u1: int) -> torch.Tensor:  # the clean outputs of senders u0..u1-1
        return (effect[u0:u1] + ablated[u0:u1]).to(model.dtype)

    B, T, d = effect.shape[1:]
    b_O = torch.stack([blk.attn.c_proj.bias for blk in model.blocks]).detach().to(model.dtype)  # [L, d]
    summed = torch.zeros(B, T, d, dtype=model.dtype, device=model.device)  # the outputs of senders < done
    done = 0
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=model.dtype, device=model.device)
    for st in g.stages:
        for u0 in range(done, st.n_in, chunk):
            summed += out(u0, min(u0 + chunk, st.n_in)).sum(0)
        done = st.n_in
        # the stage's receiver input on the clean run: c_r (b_O of the layers before) + its senders' outputs
        x = summed + b_O[:st.layer + (st.kind != "attn")].sum(0)  # [B, T, d]
        norm = x.abs().sum(-1)  # [B, T]
        prox = torch.cat([(norm - (x - out(u0, min(u0 + chunk, st.n_in))).abs().sum(-1)).clamp(min=0)
                          for u0 in range(0, st.n_in, chunk)])  # [n_in, B, T]
        total = prox.sum(0, keepdim=True)
        importance = torch.where(total > 0, prox / total.clamp(min=torch.finfo(prox.dtype).tiny), 0)
        scores[st.rows.start:st.rows.stop, :st.n_in] = torch.einsum("ubt,bt->u", importance, w) / B
    return scores


def greedy_edges(graph: Graph, scores: torch.Tensor, k: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """The k edges chosen greedily from the logits up, as MIB selects information-flow-routes circuits
    (hannamw/EAP-IG, src/eap/graph.py: ``Graph.apply_greedy``): the candidates are the edges into the
    logits; the best candidate (by |score|, or by score when ``absolute=False``) is kept, and when its
    sender joins the circuit for the first time, the edges into that sender's inputs become candidates.
    So every kept edge's receiver belongs to a component already in the circuit. Ties go in graph order
    (the reference's are in its edge order). prune: then :meth:`Circuit.pruned` with ``resample=True``
    (MIB's ``graph.prune()``)."""
    S = graph.n_senders
    Range(0, graph.n_edges, whole=True).check("k", k, why="the graph's edge count")
    valid = graph.valid[:, :S]
    s = torch.as_tensor(scores).detach().cpu().double()[:, :S]
    key = s.abs() if absolute else s
    inputs: dict[int, list[int]] = {}  # sender -> its receivers
    for r in range(graph.n_receivers):
        owner = graph.owner(r)
        if owner is not None:
            inputs.setdefault(owner, []).append(r)
    heap: list[tuple[float, int, int]] = []

    def push(rows: list[int]) -> None:
        for r in rows:
            for u in valid[r].nonzero()[:, 0].tolist():
                heapq.heappush(heap, (-float(key[r, u]), r * S + u, r))

    push([graph.n_receivers - 1])
    edges = torch.zeros_like(valid)
    joined = torch.zeros(S, dtype=torch.bool)
    for _ in range(k):
        if not heap:
            break
        _, flat, r = heapq.heappop(heap)
        u = flat % S
        edges[r, u] = True
        if not joined[u]:
            joined[u] = True
            push(inputs.get(u, []))
    circuit = Circuit(graph, edges, s, {"greedy": k, "absolute": absolute})
    return circuit.pruned(resample=True) if prune else circuit


def information_flow_routes(runner: EdgeRunner, threshold: float | None = None, top_k: int | None = None,
                            greedy: int | None = None, positions: str = "all") -> Circuit:
    """The information flow routes circuit: :func:`information_flow_scores`, then the edges with
    importance >= ``threshold`` (Ferrando & Voita's tau), or the ``top_k`` most important, or ``greedy``
    edges chosen from the logits up (:func:`greedy_edges`, MIB's selection; pruned). Exactly one of the
    three. The circuit's ``scores`` hold every edge's importance and its ``info`` says so
    (``score_convention="importance"``: :func:`circuitlab.faithfulness.importance_sign` gives +1)."""
    if sum(x is not None for x in (threshold, top_k, greedy)) != 1:
        raise ValueError("pass exactly one of threshold (keep importance >= it), top_k (the k most important "
                         "edges) or greedy (k edges chosen from the logits up, as MIB does)")
    scores = information_flow_scores(runner, positions)
    info = {"method": "information-flow-routes", "score_convention": "importance", "positions": positions}
    if threshold is not None:
        return threshold_circuit(runner.graph, scores, threshold, info)
    if top_k is not None:
        return top_k_circuit(runner.graph, scores, top_k, info)
    c = greedy_edges(runner.graph, scores, greedy)
    return Circuit(runner.graph, c.edges, scores.detach().cpu(), dict(info, greedy=greedy))
