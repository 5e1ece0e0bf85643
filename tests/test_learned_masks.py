"""Learned edge masks (Edge Pruning): they recover a planted path at a chosen size, a penalty sweep
shrinks the circuit, EAP-IG initialisation works, runs are deterministic given the seed, only
the graph's edges are learned, and bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from circuitlab.acdc import kl_metric
from circuitlab.eap import edge_attribution
from circuitlab.graph import EdgeRunner
from circuitlab.learned_masks import deterministic_mask, learn_edge_mask
from conftest import PLANTED, planted_path_model, make_tokens
from minigpt2.engine import Metric


@pytest.fixture(scope="module")
def planted():
    tokens, corrupted = make_tokens(8, 6, 99, seed=1), make_tokens(8, 6, 99, seed=2)
    return EdgeRunner(planted_path_model(), tokens, "resample", corrupted=corrupted)


def clean_logit_metric(run: EdgeRunner) -> Metric:
    """The logit of the clean model's top token, per example (a Metric, higher is better)."""
    def top_logit(logits, target):  # [V, B, vocab], [B] -> [V, B]
        return logits.gather(-1, target.expand(*logits.shape[:-1])[..., None])[..., 0]
    return Metric("clean_top_logit", top_logit, data={"target": run.clean.logits.argmax(-1)})


def test_learned_masks_recover_a_planted_path(planted):
    res = learn_edge_mask(planted, target_edges=3, steps=100)
    assert sorted(res.circuit.edge_list()) == sorted(PLANTED)
    assert res.circuit.n_edges == 3 and res.faithfulness < 0.1  # the path alone is (nearly) the whole model
    g = planted.graph
    assert torch.equal(res.log_alpha[~g.valid], torch.zeros(int((~g.valid).sum())))  # off the graph: untouched
    assert torch.equal(res.circuit.scores, res.log_alpha) and res.circuit.info["target_edges"] == 3
    assert res.history[-1]["target_edges"] == pytest.approx(3)
    assert abs(res.history[-1]["expected_edges"] - 3) < 2  # the Lagrangian holds E[L0] near the target
    assert res.summary()["edges"] == 3 and res.metric_clean is None


def test_a_metric_objective_keeps_what_the_metric_reads(planted):
    """|top logit - clean top logit| per example: the path alone misses the tokens' direct write
    into the logits, so the circuit is the path plus the edges into the logits, and exact."""
    metric = clean_logit_metric(planted)
    res = learn_edge_mask(planted, metric, penalty=0.1, steps=100)
    assert set(PLANTED) < set(res.circuit.edge_list()) and res.circuit.n_edges <= 6
    assert res.faithfulness < 1e-6 and res.metric_circuit == pytest.approx(res.metric_clean, abs=1e-6)
    assert res.metric_clean == pytest.approx(float(metric.mean(planted.clean.logits[None])[0]))
    assert res.circuit.info["objective"] == "metric"


def test_penalty_sweep_shrinks_the_circuit(planted):
    sizes = []
    for penalty in (0.0, 0.01, 1.0, 100.0):
        res = learn_edge_mask(planted, penalty=penalty, steps=100)
        expected = (deterministic_mask(res.log_alpha) >= 0.5) & planted.graph.valid
        assert torch.equal(res.circuit.edges, expected)  # the circuit: final masks >= 0.5
        sizes.append(res.circuit.n_edges)
        if penalty == 1.0:
            assert sorted(res.circuit.edge_list()) == sorted(PLANTED)
    assert sizes[0] == planted.graph.n_edges and sizes[-1] == 0
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and len(set(sizes)) == 4, sizes


def test_eap_ig_init(planted):
    res = learn_edge_mask(planted, target_edges=3, init="eap-ig", steps=100)
    assert sorted(res.circuit.edge_list()) == sorted(PLANTED)
    assert res.circuit.info["init"] == "eap-ig"
    # the start ranks the path first: its edges have the top EAP-IG scores, so they start at the top logit
    scores = edge_attribution(planted, kl_metric(planted.clean.logits), method="eap-ig")
    short = learn_edge_mask(planted, target_edges=3, init="eap-ig", steps=3)
    given = learn_edge_mask(planted, target_edges=3, init=scores, steps=3)
    assert torch.allclose(short.log_alpha, given.log_alpha, atol=1e-5)  # a score tensor = the same start
    g = planted.graph
    top = short.log_alpha.masked_fill(~g.valid, -1e9).flatten().topk(3).indices
    assert sorted(g.edge_list(torch.zeros(g.valid.numel()).index_fill(0, top, 1).view_as(g.valid))) == sorted(PLANTED)


def test_same_seed_same_circuit(planted, capsys):
    a = learn_edge_mask(planted, penalty=0.05, steps=40, seed=7, samples=2)
    b = learn_edge_mask(planted, penalty=0.05, steps=40, seed=7, samples=2, progress=True)
    c = learn_edge_mask(planted, penalty=0.05, steps=40, seed=8, samples=2)
    assert torch.equal(a.circuit.edges, b.circuit.edges) and torch.equal(a.log_alpha, b.log_alpha)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not torch.equal(a.log_alpha, c.log_alpha)  # the seed drives the noise
    assert "edge masks" in capsys.readouterr().err  # the tqdm bar


def test_bad_arguments_are_named(planted):
    n = planted.graph.n_edges
    with pytest.raises(ValueError, match="penalty=-0.1 must be a number >= 0"):
        learn_edge_mask(planted, penalty=-0.1)
    with pytest.raises(ValueError, match=rf"target_edges={n + 1} must be a whole number from 0 to {n:,}"):
        learn_edge_mask(planted, target_edges=n + 1)
    with pytest.raises(ValueError, match="target_edges=-1"):
        learn_edge_mask(planted, target_edges=-1)
    with pytest.raises(ValueError, match="steps=0 must be a whole number >= 1"):
        learn_edge_mask(planted, penalty=0.1, steps=0)
    with pytest.raises(ValueError, match="unknown init 'random'"):
        learn_edge_mask(planted, penalty=0.1, init="random")
    with pytest.raises(ValueError, match=r"init tensor has shape \(3, 3\)"):
        learn_edge_mask(planted, penalty=0.1, init=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="exactly one of target_edges"):
        learn_edge_mask(planted)
    with pytest.raises(ValueError, match="exactly one of target_edges"):
        learn_edge_mask(planted, target_edges=3, penalty=0.1)
    with pytest.raises(ValueError, match="lr=0"):
        learn_edge_mask(planted, penalty=0.1, lr=0)
    with pytest.raises(ValueError, match=r"one value per variant \[V\]"):
        learn_edge_mask(planted, lambda logits: logits[..., 0], penalty=0.1)  # per example, not averaged


def test_mibs_comparison_ranks_learned_masks_by_keep_probability(planted):
    """circuitlab.methods hands MIB the keep probabilities: >= 0, 0 off the graph, in the logits' order,
    so that CMD's ranking by |score| puts the surest-kept edges first (|log_alpha| would put the
    surest-pruned first)."""
    from circuitlab.learned_masks import keep_probability
    from circuitlab.methods import MethodSettings, edge_scores
    g = planted.graph
    settings = MethodSettings(learned_steps=100)
    scores = edge_scores("learned-masks", planted, None, settings)
    log_alpha = learn_edge_mask(planted, None, penalty=settings.learned_penalty, steps=100).log_alpha
    assert scores.shape == (g.n_receivers, g.n_senders) and (scores >= 0).all() and (scores[~g.valid] == 0).all()
    torch.testing.assert_close(scores[g.valid], keep_probability(log_alpha.double())[g.valid])
    top = scores.flatten().topk(3).indices
    assert torch.equal(top.sort().values, log_alpha.masked_fill(~g.valid, -1e9).flatten().topk(3).indices.sort().values)
