"""EAP and EAP-IG: scores are the first-order change of the metric (finite differences), head
scores agree with edge scores and with head-mask gradients, and the comparison tools measure
what they claim."""

from __future__ import annotations

import pytest
import torch

from circuitlab.compare import (circuit_faithfulness, circuit_overlap, exact_head_effects, faithfulness_curve,
                                head_score_agreement, roc_curve, spearman)
from circuitlab.eap import eap, edge_attribution, head_attribution, threshold_circuit, top_k_circuit
from circuitlab.graph import Circuit, EdgeRunner, Graph
from conftest import make_model, make_tokens
from minigpt2 import GPT2Config
from minigpt2.masking import run_with_head_masks

CFG = GPT2Config(n_layer=2, n_head=4, d_model=28, d_mlp=37, n_ctx=17, vocab_size=99)
B, T = 5, 6
ABLATIONS = ["resample", "mean", "zero"]
C, W = torch.tensor([3, 14, 15, 92, 65]), torch.tensor([35, 89, 79, 32, 38])  # "correct" and "wrong" tokens


def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
    rows = torch.arange(B)
    return (logits[..., rows, C] - logits[..., rows, W]).mean(-1)


@pytest.fixture(scope="module")
def model():
    return make_model(CFG, seed=2, std=0.3).double()


@pytest.fixture(scope="module")
def data():
    return make_tokens(B, T, 99, seed=6), make_tokens(B, T, 99, seed=7)


def kwargs(data, ablation):
    return dict(ablation=ablation, corrupted=data[1] if ablation == "resample" else None)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_eap_scores_are_finite_differences(model, data, ablation):
    run = EdgeRunner(model, data[0], **kwargs(data, ablation))
    g = run.graph
    scores = edge_attribution(run, logit_diff)
    eps = 1e-6
    edges = g.valid.nonzero()[torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:25]]
    masks = g.ones(torch.double)[None].repeat(len(edges), 1, 1)
    masks[torch.arange(len(edges)), edges[:, 0], edges[:, 1]] = 1 - eps  # a step towards ablating the edge
    clean = logit_diff(run.clean.logits[None])
    fd = (run.run(masks, metric=logit_diff) - clean) / eps
    torch.testing.assert_close(scores[edges[:, 0], edges[:, 1]], fd, atol=1e-6 * scores.abs().max(), rtol=1e-4)
    assert scores[~g.valid].abs().max() == 0


def test_eap_ig_with_one_step_is_eap_and_converges_with_more(model, data):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    eap_scores = edge_attribution(run, logit_diff)
    torch.testing.assert_close(edge_attribution(run, logit_diff, "eap-ig", steps=1), eap_scores)
    coarse, fine, finer = (edge_attribution(run, logit_diff, "eap-ig", steps=s) for s in (4, 16, 32))
    assert (finer - fine).abs().max() < (finer - coarse).abs().max()  # a Riemann sum converging


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_head_scores_are_the_sum_of_their_out_edges(model, data, method, ablation):
    run = EdgeRunner(model, data[0], **kwargs(data, ablation))
    g = run.graph
    edges = edge_attribution(run, logit_diff, method, steps=3)
    heads = head_attribution(model, data[0], logit_diff, method, steps=3, **kwargs(data, ablation))
    summed = torch.tensor([[edges[:, g.head_sender(l, h)].sum().item() for h in range(CFG.n_head)]
                           for l in range(CFG.n_layer)], dtype=torch.double)
    torch.testing.assert_close(heads, summed)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_head_scores_are_head_mask_finite_differences(model, data, ablation):
    heads = head_attribution(model, data[0], logit_diff, **kwargs(data, ablation))
    eps = 1e-6
    masks = torch.ones(1 + CFG.n_layer * CFG.n_head, CFG.n_layer, CFG.n_head, dtype=torch.double)
    masks[1:] -= eps * torch.eye(CFG.n_layer * CFG.n_head, dtype=torch.double).view(-1, CFG.n_layer, CFG.n_head)
    mode = {"resample": "patch", "mean": "mean", "zero": "zero"}[ablation]
    values = run_with_head_masks(model, data[0], masks, mode=mode, reference=data[1] if mode == "patch" else None,
                                 metric=logit_diff)
    torch.testing.assert_close(heads.flatten(), (values[1:] - values[0]) / eps, atol=1e-5, rtol=1e-4)


def test_head_scores_rank_like_the_exact_sweep(model, data):
    out = head_score_agreement(model, data[0], logit_diff, steps=4, **kwargs(data, "resample"))
    exact = exact_head_effects(model, data[0], logit_diff, **kwargs(data, "resample"))
    torch.testing.assert_close(out["exact"], exact)
    assert out["spearman_eap"] == pytest.approx(spearman(out["eap"], exact))
    assert out["spearman_eap"] > 0.5 and out["spearman_eap-ig"] > 0.5  # first order is informative here


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)
    with pytest.raises(ValueError, match="same size"):
        spearman(a, a[:2])


def test_circuits_from_scores_and_their_comparison(model, data):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    g = run.graph
    scores = edge_attribution(run, logit_diff)
    top = top_k_circuit(g, scores, 10)
    assert top.n_edges == 10 and scores.abs()[top.edges].min() >= scores.abs()[g.valid & ~top.edges].max()
    by_threshold = threshold_circuit(g, scores, scores.abs()[top.edges].min().item())
    assert torch.equal(by_threshold.edges, top.edges)
    assert torch.equal(eap(run, logit_diff, top_k=10).edges, top.edges)

    ov = circuit_overlap(top, top_k_circuit(g, scores, 20))
    assert (ov["both"], ov["precision"], ov["recall"], ov["jaccard"]) == (10, 1.0, 0.5, 0.5)
    roc = roc_curve(scores, top)
    assert roc["auc"] == pytest.approx(1.0) and roc["tpr"][10] == 1 and roc["fpr"][10] == 0
    assert roc_curve(torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)), top)["auc"] < 1.0

    curve = faithfulness_curve(run, logit_diff, scores, [0, 10, g.n_edges])
    assert curve["normalized"][0].item() == pytest.approx(0.0) and curve["normalized"][-1].item() == pytest.approx(1.0)
    one = circuit_faithfulness(run, logit_diff, top)
    assert one["value"] == pytest.approx(curve["values"][1].item())


def test_bad_inputs_are_named(model, data):
    run = EdgeRunner(model, data[0], "zero")
    with pytest.raises(ValueError, match="unknown attribution method 'ig'"):
        edge_attribution(run, logit_diff, "ig")
    with pytest.raises(ValueError, match="steps=0"):
        edge_attribution(run, logit_diff, "eap-ig", steps=0)
    with pytest.raises(ValueError, match="unknown ablation 'random'"):
        head_attribution(model, data[0], logit_diff, ablation="random")
    with pytest.raises(ValueError, match="needs corrupted"):
        head_attribution(model, data[0], logit_diff, ablation="resample")
    with pytest.raises(ValueError, match="k=10000"):
        top_k_circuit(run.graph, torch.zeros_like(run.clean.mask), 10000)
    with pytest.raises(ValueError, match="exactly one of top_k"):
        eap(run, logit_diff)
    with pytest.raises(ValueError, match="one value per variant"):
        edge_attribution(run, lambda logits: logits.sum(-1))
    with pytest.raises(ValueError, match="different graphs"):
        circuit_overlap(Circuit(run.graph, run.graph.valid), Circuit(Graph(3, 4), Graph(3, 4).valid))
