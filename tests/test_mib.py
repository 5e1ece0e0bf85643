"""The graph JSON of hannamw/EAP-IG (MIB's circuit files): the exact names, order and fields of a
hand-written file in the reference's format, exact round trips of circuits and scores, and the
score direction across the export."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlab.eap import eap
from circuitlab.faithfulness import mib_faithfulness
from circuitlab.graph import Circuit, EdgeRunner, Graph
from circuitlab.mib import from_mib_json, mib_edge_names, to_mib_json, write_mib_json
from conftest import make_model, make_tokens
from minigpt2 import GPT2Config
from minigpt2.engine import Metric

# A 1-layer, 1-head graph as hannamw/EAP-IG's Graph.from_model builds it and Graph.to_json writes it:
# nodes input, a0.h0, m0, logits; edges in add_edge order (q, k, v of each head from each earlier node,
# then the MLP from each earlier node, then the logits from every node).
REFERENCE_FILE = {
    "cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 8},
    "nodes": {"input": {"in_graph": True}, "a0.h0": {"in_graph": True}, "m0": {"in_graph": False},
              "logits": {"in_graph": True}},
    "edges": {
        "input->a0.h0<q>": {"score": 0.5, "in_graph": True},
        "input->a0.h0<k>": {"score": -0.25, "in_graph": False},
        "input->a0.h0<v>": {"score": 1.5, "in_graph": True},
        "input->m0": {"score": 0.125, "in_graph": False},
        "a0.h0->m0": {"score": -2.0, "in_graph": False},
        "input->logits": {"score": 3.0, "in_graph": True},
        "a0.h0->logits": {"score": 0.75, "in_graph": True},
        "m0->logits": {"score": -0.0625, "in_graph": False},
    },
}


def test_a_file_in_the_references_format_reads_edge_by_edge():
    c = from_mib_json(REFERENCE_FILE)
    g = c.graph
    assert (g.n_layer, g.n_head) == (1, 1)
    for name, e in REFERENCE_FILE["edges"].items():
        u, r = name.split("->")
        i, j = g.receiver_index(r), g.sender_index(u)
        assert c.scores[i, j].item() == e["score"] and bool(c.edges[i, j]) == e["in_graph"]
    assert sorted(f"{u}->{r}" for u, r in c.edge_list()) == sorted(
        n for n, e in REFERENCE_FILE["edges"].items() if e["in_graph"])
    assert c.info == {"source": "hannamw/EAP-IG Graph.to_json", "score_convention": "importance"}
    assert c.scores.dtype == torch.float64 and c.scores[~g.valid].abs().sum() == 0


def test_the_export_has_the_references_names_order_and_fields():
    c = from_mib_json(REFERENCE_FILE)
    out = to_mib_json(c, d_model=8)  # scores already in MIB's direction: sign +1
    assert out["cfg"] == REFERENCE_FILE["cfg"]
    assert list(out["nodes"]) == list(REFERENCE_FILE["nodes"]) and out["nodes"] == REFERENCE_FILE["nodes"]
    assert list(out["edges"]) == list(REFERENCE_FILE["edges"]) and out["edges"] == REFERENCE_FILE["edges"]
    assert out["circuitlab"]["score_sign"] == 1.0 and "hook_embed" in out["circuitlab"]["differences"][0]
    assert [f"{u}->{r}" for u, r in mib_edge_names(1, 1)] == list(REFERENCE_FILE["edges"])


def test_the_node_rule_is_the_references():
    g = Graph(2, 2)
    edges = torch.zeros(g.valid.shape, dtype=torch.bool)
    edges[g.receiver_index("a1.h0<k>"), g.sender_index("a0.h1")] = True  # a0.h1 has no input: out
    edges[g.receiver_index("logits"), g.sender_index("a1.h0")] = True
    edges[g.receiver_index("m0"), g.sender_index("input")] = True  # m0 has no output: out
    nodes = to_mib_json(Circuit(g, edges), d_model=4)["nodes"]
    assert {n for n, v in nodes.items() if v["in_graph"]} == {"input", "a1.h0", "logits"}


@pytest.fixture(scope="module")
def setup():
    cfg = GPT2Config(n_layer=2, n_head=3, d_model=21, d_mlp=23, n_ctx=11, vocab_size=53)
    model = make_model(cfg, seed=4, std=0.3).double()
    tokens, corrupted = make_tokens(4, 5, 53, seed=1), make_tokens(4, 5, 53, seed=2)
    rows = torch.arange(4)
    good, bad = torch.tensor([1, 2, 3, 4]), torch.tensor([9, 8, 7, 6])
    metric = Metric("logit_diff", lambda logits: logits[..., rows, good] - logits[..., rows, bad])
    return model, EdgeRunner(model, tokens, "resample", corrupted=corrupted), metric


def test_round_trip_keeps_edges_scores_and_info_exactly(setup, tmp_path):
    model, run, metric = setup
    c = eap(run, metric, "eap-ig", steps=3, top_k=17)
    path = write_mib_json(c, tmp_path / "circuit.json", d_model=model.cfg.d_model)
    d = json.loads(path.read_text())
    assert d["circuitlab"]["score_sign"] == -1.0  # EAP on a higher-is-better metric: turned to MIB's direction
    i, j = c.scores.abs().argmax() // c.scores.shape[1], c.scores.abs().argmax() % c.scores.shape[1]
    name = f"{c.graph.senders[j]}->{c.graph.receivers[i]}"
    assert d["edges"][name]["score"] == -c.scores[i, j].item()
    assert sum(e["in_graph"] for e in d["edges"].values()) == 17 and len(d["edges"]) == c.graph.n_edges
    back = from_mib_json(path)
    assert torch.equal(back.edges, c.edges) and back.edges.sum() == 17
    assert torch.equal(back.scores, c.scores.double())
    assert back.info == c.info
    # the faithfulness of the file's circuit is the original's
    assert mib_faithfulness(run, metric, back).to_json() == mib_faithfulness(run, metric, c).to_json()


def test_scores_alone_and_an_acdc_circuit(setup):
    model, run, metric = setup
    g = run.graph
    scores = torch.randn(g.valid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * g.valid
    d = to_mib_json(scores, g, d_model=21, higher_is_better=True)
    assert not any(e["in_graph"] for e in d["edges"].values())  # as MIB's importances.json
    back = from_mib_json(d)
    assert torch.equal(back.scores, scores) and back.n_edges == 0
    acdc = Circuit(g, scores > 0.5, scores.abs(), {"method": "acdc", "threshold": 0.5})
    d = to_mib_json(acdc, d_model=21)
    assert d["circuitlab"]["score_sign"] == 1.0  # ACDC's worsenings are MIB's direction already
    back = from_mib_json(d)
    assert torch.equal(back.scores, acdc.scores) and torch.equal(back.edges, acdc.edges) and back.info == acdc.info
    empty = from_mib_json(to_mib_json(Circuit(g, g.valid), d_model=21))
    assert empty.scores is None and torch.equal(empty.edges, g.valid)


def test_a_foreign_file_is_read_in_mibs_direction(setup):
    model, run, metric = setup
    c = eap(run, metric, "eap", top_k=5)
    d = to_mib_json(c, d_model=21)
    del d["circuitlab"]  # as another tool would write it: MIB-direction scores, no record of a sign
    foreign = from_mib_json(d)
    assert torch.equal(foreign.scores, -c.scores.double())
    assert mib_faithfulness(run, metric, foreign).cpr == pytest.approx(mib_faithfulness(run, metric, c).cpr)


def test_bad_files_are_named():
    with pytest.raises(ValueError, match="missing"):
        from_mib_json({"cfg": {}, "edges": {}})
    with pytest.raises(ValueError, match="parallel_attn_mlp"):
        from_mib_json(dict(REFERENCE_FILE, cfg=dict(REFERENCE_FILE["cfg"], parallel_attn_mlp=True)))
    with pytest.raises(ValueError, match="'m0->a0.h0<q>'"):
        from_mib_json(dict(REFERENCE_FILE, edges={"m0->a0.h0<q>": {"score": 1.0, "in_graph": True}}))
    with pytest.raises(ValueError, match="not in the 1-layer"):
        from_mib_json(dict(REFERENCE_FILE, edges={"a3.h0->logits": {"score": 1.0, "in_graph": True}}))
    with pytest.raises(ValueError, match="neuron-level"):
        from_mib_json(dict(REFERENCE_FILE, nodes=dict(REFERENCE_FILE["nodes"],
                                                      m0={"in_graph": True, "neurons": [True, False]})))
    with pytest.raises(ValueError, match="d_model"):
        to_mib_json(from_mib_json(REFERENCE_FILE), d_model=0)
