"""Draw a Circuit as a layered graph (PNG via matplotlib, without touching pyplot's global state).

Rows from the bottom: the input embedding, then per layer its heads and its MLP, then the
logits; rows without a component of the circuit are left out. Edges run from a sender to the component whose input they feed, coloured by
that input (query, key, value, MLP, logits); with scores, their width grows with |score|.
Only components with a kept edge are drawn. Heads are labelled as everywhere a reader looks ("L3H1",
minigpt2.heads.Head.label); the circuit's JSON files keep MIB's node names ("a3.h1").
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from minigpt2.heads import Head

from .graph import Circuit

COLORS = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple", "logits": "black"}


def layout(circuit: Circuit) -> dict[str, tuple[float, float]]:
    """(x, y) of the circuit's components: heads spread along their layer's row, each MLP on a
    row above them; rows without a component are left out."""
    g = circuit.graph
    mid = (g.n_head - 1) / 2
    level = {"input": (mid, 0), "logits": (mid, 2 * g.n_layer + 1)}
    for l in range(g.n_layer):
        level.update({Head(l, h).mib_name: (float(h), 2 * l + 1) for h in range(g.n_head)})
        level[f"m{l}"] = (mid, 2 * l + 2)
    nodes = circuit.nodes()
    rows = {y: i for i, y in enumerate(sorted({level[n][1] for n in nodes}))}
    return {n: (level[n][0], float(rows[level[n][1]])) for n in nodes}


def node_label(node: str) -> str:
    """The text a figure shows for a node: a head's display label ("a3.h1" -> "L3H1"), else the name."""
    return Head.parse(node).label if node.startswith("a") else node


def _row_label(node: str) -> str:
    return node if node in ("input", "logits") else f"layer {node[1:].split('.')[0]}" + (" MLP" if node[0] == "m" else "")


def _kind(receiver: str) -> str:
    if receiver == "logits":
        return "logits"
    return receiver[-2] if receiver.endswith(">") else "mlp"


def draw_circuit(circuit: Circuit, path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """Draw ``circuit``; save it as a PNG at ``path`` if given. Returns the matplotlib Figure."""
    g = circuit.graph
    pos = layout(circuit)
    nodes = circuit.nodes()
    n_rows = 1 + int(max((y for _, y in pos.values()), default=0))
    fig = Figure(figsize=(max(6.0, 0.9 * g.n_head + 2), 1.5 + 0.75 * n_rows))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scores = None
    if circuit.scores is not None:
        scores = circuit.scores.detach().abs().double()
        top = float(scores[circuit.edges].max()) if circuit.n_edges else 0.0
    for u, r in circuit.edge_list():
        (x0, y0), (x1, y1) = pos[u], pos[g.node(r)]
        width = 1.0
        if scores is not None and top > 0:
            width = 0.5 + 3.0 * float(scores[g.receiver_index(r), g.sender_index(u)]) / top
        ax.annotate("", xy=(x1, y1 - 0.12), xytext=(x0, y0 + 0.12),
                    arrowprops=dict(arrowstyle="-|>", color=COLORS[_kind(r)], lw=width, alpha=0.6,
                                    shrinkA=0, shrinkB=0, connectionstyle="arc3,rad=0.08"))
    for n in nodes:
        x, y = pos[n]
        face = "#f2e6ff" if n.startswith("m") else "#fff3cc" if n in ("input", "logits") else "#e6f0ff"
        ax.text(x, y, node_label(n), ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round,pad=0.25", facecolor=face, edgecolor="gray"))
    ax.set_xlim(-0.8, g.n_head - 0.2)
    ax.set_ylim(-0.7, n_rows - 0.3)
    labels = {y: _row_label(n) for n, (_, y) in sorted(pos.items(), key=lambda kv: kv[1][0])}
    ax.set_yticks(list(labels), list(labels.values()), fontsize=9)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    counts = circuit.node_counts()
    ax.set_title(title or f"{counts['edges']} edges, {counts['heads']} heads, {counts['mlps']} MLPs, "
                          f"{counts['nodes']} nodes", fontsize=11)
    ax.legend(handles=[Line2D([], [], color=c, label=k) for k, c in COLORS.items()], loc="upper right",
              fontsize=9, frameon=False, title="input fed", title_fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
