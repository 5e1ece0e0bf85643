"""Circuits and edge scores in the graph JSON of hannamw/EAP-IG, the format MIB reads and writes.

The format (``Graph.to_json`` / ``Graph.from_json`` of hannamw/EAP-IG, src/eap/graph.py; MIB's
``MIB_circuit_track/circuit_loading.py`` reads the same):

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": d},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {...}, ..., "m0": {...}, ..., "logits": {"in_graph": true}},
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": true}, ..., "a0.h1->m0": {...},
               "m1->logits": {...}}}

Its node and edge names are this library's (circuitlab.graph): senders "input", "a{l}.h{h}",
"m{l}"; receivers "a{l}.h{h}<q|k|v>", "m{l}", "logits"; an edge is "sender->receiver". Every edge
of the (sequential, not parallel attention-MLP) graph is listed, in the reference's order, with
its score and whether the circuit keeps it; a node is in the graph when it is the input or has a
kept incoming edge, and has a kept outgoing edge (the reference's rule; logits always). Files of
scores alone (MIB's ``importances.json``, written after attribution) have every ``in_graph``
false, and so do the files written here from scores alone.

Differences from the reference's graph, also recorded in the exported file's ``"circuitlab"``
entry (the reference's loader reads only "cfg", "nodes" and "edges" and ignores it):

- the input node here is the token plus the position embedding; the reference's is the token
  embedding alone (``hook_embed``), its position embedding never ablated. The same under resample
  ablation (the reference's "patching"), not under zero ablation.
- score direction: MIB attributes a loss (minus the logit difference), so its scores are high for
  edges the task needs, and its CPR takes the highest. circuitlab's EAP scores are the metric's
  change when the edge is ablated. The export multiplies the scores by ``sign`` (default
  :func:`circuitlab.faithfulness.importance_sign`: -1 for EAP on a higher-is-better metric, +1 for
  ACDC) and records it; the import divides by a recorded sign, so a round trip gives back the
  scores exactly, and a file from elsewhere is read in MIB's direction (``info["score_convention"]
  = "importance"``).
- scale: the reference's EAP scores are circuitlab's (``scale="metric"``) divided by its batch size
  (see circuitlab.eap); rankings agree.
- precision: the reference holds scores in float32, so a file that passes through its Graph
  (``from_json`` then ``to_json``) comes back rounded to float32; files written here keep float64.
- neuron-level circuits and node scores of the reference have no counterpart here: a file whose
  nodes keep only some neurons is refused; node scores are kept in ``info["node_scores"]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minigpt2.fileio import atomic_write_text, load_json
from minigpt2.heads import Head

from .faithfulness import importance_sign
from .graph import Circuit, Graph

FORMAT = "hannamw/EAP-IG Graph.to_json"
DIFFERENCES = [
    "input node: token + position embedding here; hannamw/EAP-IG's input node is hook_embed (token embedding) "
    "alone, its position embedding never ablated (identical under resample/patching ablation, not under zero)",
    "scores: multiplied by score_sign on export (MIB's direction: high for edges the task needs, as its "
    "loss-attributed scores); divide by it to get circuitlab's",
    "scale: hannamw/EAP-IG divides EAP scores by its batch size; circuitlab's scale='metric' does not "
    "(rankings agree)",
]


def mib_edge_names(n_layer: int, n_head: int) -> list[tuple[str, str]]:
    """(sender, receiver) of every edge, in the order hannamw/EAP-IG's ``Graph.from_model`` adds them."""
    residual, edges = ["input"], []
    for l in range(n_layer):
        heads = [Head(l, h).mib_name for h in range(n_head)]
        for u in residual:
            edges += [(u, f"{a}<{x}>") for a in heads for x in "qkv"]
        residual += heads
        edges += [(u, f"m{l}") for u in residual]
        residual.append(f"m{l}")
    return edges + [(u, "logits") for u in residual]


def _nodes_in_graph(graph: Graph, edges: torch.Tensor) -> dict[str, bool]:
    """The reference's node rule: (the input, or a kept incoming edge) and a kept outgoing edge."""
    outgoing = edges.any(dim=0)  # [S]
    incoming = torch.zeros(graph.n_senders, dtype=torch.bool)
    incoming[0] = True
    for r in range(graph.n_receivers - 1):
        if edges[r].any():
            incoming[graph.owner(r)] = True
    out = {name: bool(outgoing[i] & incoming[i]) for i, name in enumerate(graph.senders)}
    out["logits"] = True
    return out


def to_mib_json(circuit, graph: Graph | None = None, *, d_model: int, sign: float | None = None,
                higher_is_better: bool | None = None) -> dict:
    """The graph JSON of hannamw/EAP-IG for a Circuit (its edges and scores) or for scores [R, S] alone.

    d_model: the model's width (the reference's loader needs it in "cfg"). graph: needed with bare
    scores. sign: +1 or -1, the factor written scores carry (default: MIB's direction, by
    :func:`circuitlab.faithfulness.importance_sign` with ``higher_is_better``). The result is a dict;
    :func:`write_mib_json` writes it.
    """
    if isinstance(circuit, Circuit):
        graph, edges, scores, info = circuit.graph, circuit.edges, circuit.scores, dict(circuit.info)
    else:
        if graph is None:
            raise ValueError("bare scores need graph=Graph(n_layer, n_head) (or pass a Circuit)")
        scores = torch.as_tensor(circuit)
        if scores.shape != graph.valid.shape:
            raise ValueError(f"edge scores must be [R={graph.n_receivers}, S={graph.n_senders}], got "
                             f"{tuple(scores.shape)}")
        edges, info = torch.zeros_like(graph.valid), {}
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
        raise ValueError(f"d_model={d_model!r} must be the model's width (model.cfg.d_model)")
    if sign is None:
        sign = importance_sign(circuit, None, higher_is_better) if scores is not None else 1.0
    sign = float(sign)
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign={sign!r} must be +1 or -1")
    s = None if scores is None else scores.detach().cpu().double()
    edge_dict = {}
    for u, r in mib_edge_names(graph.n_layer, graph.n_head):
        i, j = graph.receiver_index(r), graph.sender_index(u)
        score = 0.0 if s is None else sign * float(s[i, j])
        edge_dict[f"{u}->{r}"] = {"score": score + 0.0, "in_graph": bool(edges[i, j])}  # + 0.0: no -0.0
    nodes = {n: {"in_graph": v} for n, v in _nodes_in_graph(graph, edges).items()}
    meta = {"format": FORMAT, "score_sign": sign, "has_scores": s is not None, "differences": DIFFERENCES,
            "info": json.loads(json.dumps(info, default=float))}
    return {"cfg": {"n_layers": graph.n_layer, "n_heads": graph.n_head, "parallel_attn_mlp": False,
                    "d_model": d_model},
            "nodes": nodes, "edges": edge_dict, "circuitlab": meta}


def write_mib_json(circuit, path: str | Path, graph: Graph | None = None, **kwargs) -> Path:
    """Write :func:`to_mib_json` to ``path`` (what hannamw/EAP-IG's ``Graph.from_json`` and MIB's
    ``run_evaluation.py --circuit-files`` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(to_mib_json(circuit, graph, **kwargs)))  # never half-written
    return path


def from_mib_json(source) -> Circuit:
    """A Circuit from hannamw/EAP-IG's graph JSON (a dict, or a path to the file).

    edges: those with ``in_graph``; scores: every edge's, divided by the file's recorded
    ``score_sign`` if circuitlab wrote it, else as the file has them (MIB's direction:
    ``info["score_convention"] = "importance"``); info: the exported circuit's, or the source's.
    """
    if not isinstance(source, dict):  # a file: read as every JSON file is, and named in any error
        d = load_json(source, "graph JSON", max_bytes=1 << 31, kind=dict)
        try:
            return from_mib_json(d)
        except ValueError as e:
            raise ValueError(f"graph JSON {source}: {e}") from None
    d = source
    missing = [k for k in ("cfg", "nodes", "edges") if k not in d]
    if missing:
        raise ValueError(f"not a hannamw/EAP-IG graph JSON: missing {missing} (it needs 'cfg', 'nodes', 'edges')")
    cfg = d["cfg"]
    if cfg.get("parallel_attn_mlp"):
        raise ValueError("this graph has parallel attention and MLP (parallel_attn_mlp=true); circuitlab's graph is "
                         "GPT-2's sequential one")
    g = Graph(int(cfg["n_layers"]), int(cfg["n_heads"]))
    meta = d.get("circuitlab")
    sign = float(meta["score_sign"]) if meta else 1.0
    edges = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.bool)
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.float64)
    for name, e in d["edges"].items():
        if "->" not in name:
            raise ValueError(f"edge {name!r} is not named 'sender->receiver'")
        u, r = name.split("->", 1)
        try:
            i, j = g.receiver_index(r), g.sender_index(u)
        except KeyError as err:
            raise ValueError(f"edge {name!r} is not in the {g.n_layer}-layer, {g.n_head}-head graph: {err}") from None
        if not g.valid[i, j]:
            raise ValueError(f"edge {name!r} goes backwards (its receiver reads before its sender writes)")
        edges[i, j] = bool(e["in_graph"])
        scores[i, j] = float(e.get("score", math.nan)) / sign
    node_scores = {}
    for name, node in d["nodes"].items():
        neurons = node.get("neurons")
        if neurons is not None and node.get("in_graph") and not all(neurons):
            raise ValueError(f"node {name!r} keeps only some of its neurons: neuron-level circuits are not supported")
        if node.get("score") is not None:
            node_scores[name] = node["score"]
    if meta:
        info = dict(meta.get("info", {}))
        has_scores = meta.get("has_scores", True)
    else:
        info, has_scores = {"source": FORMAT, "score_convention": "importance"}, True
    if node_scores:
        info["node_scores"] = node_scores
    return Circuit(g, edges, scores if has_scores else None, info)
