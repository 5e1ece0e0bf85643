"""Circuit drawings speak the display vocabulary (issue #27): heads as "L1H2", while the circuit's
files keep MIB's node names ("a1.h2")."""

import json

import torch

from circuitlab.draw import draw_circuit, node_label
from circuitlab.graph import Circuit, Graph


def test_a_drawing_labels_heads_as_L_H_and_the_file_keeps_mib_names(tmp_path):
    g = Graph(2, 3)
    edges = torch.zeros_like(g.valid)
    for u, r in (("input", "a0.h1<q>"), ("a0.h1", "a1.h2<v>"), ("a1.h2", "m1"), ("m1", "logits")):
        edges[g.receiver_index(r), g.sender_index(u)] = True
    circuit = Circuit(g, edges)
    fig = draw_circuit(circuit, tmp_path / "c.png")
    shown = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"L0H1", "L1H2"} <= shown and not any(".h" in t for t in shown)
    assert (tmp_path / "c.png").stat().st_size > 1000
    saved = json.dumps(circuit.to_json())
    assert "a0.h1->a1.h2<v>" in saved and "L0H1" not in saved  # the file keeps MIB's node names
    assert [node_label(n) for n in ("input", "a10.h11", "m3", "logits")] == ["input", "L10H11", "m3", "logits"]
