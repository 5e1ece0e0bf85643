"""MIB's faithfulness: CPR and CMD on hand-computed cases, the score direction of each method, one
batched run, and the whole evaluation against a port of MIB's own (hannamw/MIB-circuit-track's
evaluate_area_under_curve on hannamw/EAP-IG's apply_topn, prune and evaluate_graph) on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from circuitlab.compare import circuit_faithfulness
from circuitlab.eap import eap, edge_attribution
from circuitlab.faithfulness import (PERCENTAGES, FaithfulnessCurve, area, importance_sign, mib_faithfulness,
                                     plot_faithfulness, top_edges)
from circuitlab.graph import Circuit, EdgeRunner, Graph
from conftest import make_tokens
from minigpt2 import GPT2Config
from minigpt2.engine import Metric

CFG = GPT2Config(n_layer=2, n_head=4, d_model=28, d_mlp=37, n_ctx=17, vocab_size=99)
B, T = 5, 6
C, W = torch.tensor([3, 14, 15, 92, 65]), torch.tensor([35, 89, 79, 32, 38])


def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
    rows = torch.arange(B)
    return (logits[..., rows, C] - logits[..., rows, W]).mean(-1)


# ------------------------------------------------------------------ a runner where f is linear
class LinearRunner:
    """m(mask) = sum of w over the kept edges; counts its batched calls."""

    def __init__(self, graph: Graph, w: torch.Tensor):
        self.graph, self.w, self.calls, self.ablation = graph, w, [], "resample"
        self.model = type("M", (), {"dtype": torch.float64})()
        self.tokens = torch.zeros(3, 2, dtype=torch.long)

    def run(self, masks, metric=None):
        self.calls.append(masks.shape[0])
        return (masks * self.w).flatten(1).sum(1)


def unused(logits):  # the linear runner computes its own metric
    return logits


# Graph(1, 1): 8 edges. Signed scores s; each edge contributes s / 4 (they sum to 1: m(N) = 1, m(empty) = 0).
S8 = torch.tensor([8.0, -7, 6, -5, 4, -3, 2, -1], dtype=torch.float64)


def linear_case():
    g = Graph(1, 1)
    scores = torch.zeros(g.valid.shape, dtype=torch.float64)
    scores[g.valid] = S8
    return g, scores, LinearRunner(g, scores / 4)


def test_cpr_and_cmd_by_hand():
    g, scores, runner = linear_case()
    c = mib_faithfulness(runner, unused, scores, sign=1, prune=False, fractions=(0.25, 0.5, 1))
    assert c.n_edges == [2, 4, 8]
    # signed ranking 8, 6, 4, 2, ...: f = 14/4, 20/4, 4/4; absolute 8, -7, 6, -5, ...: f = 1/4, 2/4, 1
    assert c.cpr_faithfulness == pytest.approx([3.5, 5.0, 1.0])
    assert c.cmd_faithfulness == pytest.approx([0.25, 0.5, 1.0])
    assert c.cpr == pytest.approx(0.25 * (3.5 + 5) / 2 + 0.5 * (5 + 1) / 2)  # 2.5625
    assert c.cmd == pytest.approx(0.25 * (0.75 + 0.5) / 2 + 0.5 * (0.5 + 0) / 2)  # 0.28125
    assert c.cpr_average == pytest.approx(9.5 / 3) and c.cmd_average == pytest.approx(1.75 / 3)
    assert (c.full, c.empty) == (pytest.approx(1.0), 0.0)
    assert runner.calls == [2 + 2 * 3]  # one batched run: full, empty and every size of both rankings
    log = mib_faithfulness(runner, unused, scores, sign=1, prune=False, fractions=(0.25, 0.5, 1), log_scale=True)
    assert log.cpr == pytest.approx(math.log(2) * ((3.5 + 5) / 2 + (5 + 1) / 2))


def test_mib_percentages_round_down_and_the_x_axis_is_the_fraction_itself():
    g, scores, runner = linear_case()
    c = mib_faithfulness(runner, unused, scores, sign=1, prune=False)
    assert c.fractions == list(PERCENTAGES) == [.001, .002, .005, .01, .02, .05, .1, .2, .5, 1]
    assert c.n_edges == [0, 0, 0, 0, 0, 0, 0, 1, 4, 8]  # int(0.2 * 8) = 1
    assert c.cpr_faithfulness == pytest.approx([0] * 7 + [2.0, 5.0, 1.0])
    assert c.cmd_faithfulness == pytest.approx([0] * 7 + [2.0, 0.5, 1.0])
    assert c.cpr == pytest.approx(0.1 * (0 + 2) / 2 + 0.3 * (2 + 5) / 2 + 0.5 * (5 + 1) / 2)  # 2.65
    assert c.cmd == pytest.approx(0.099 * 1 + 0.1 * (1 + 1) / 2 + 0.3 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0) / 2)  # 0.549
    # a perfect curve spans [0.001, 1]: its CPR is 0.999, as in MIB (no rescaling of the axis)
    assert area(PERCENTAGES, [1.0] * 10) == pytest.approx(0.999)


def test_the_score_direction_of_each_method():
    g, scores, runner = linear_case()
    importance = mib_faithfulness(runner, unused, scores, sign=1, prune=False)
    # EAP on a higher-is-better metric: the score is the metric's change when the edge is ablated,
    # negative for a needed edge; the default sign turns it round
    effect = mib_faithfulness(runner, logit_diff, -scores, prune=False)
    assert effect.info["sign"] == -1 and effect.cpr == pytest.approx(importance.cpr)
    assert effect.cmd == pytest.approx(importance.cmd)  # CMD ranks |score|: the sign never matters
    lower = Metric("kl", lambda logits: logits[..., 0], higher_is_better=False)
    assert importance_sign(scores, lower) == 1.0
    assert importance_sign(scores, Metric("ld", lambda logits: logits[..., 0])) == -1.0
    assert importance_sign(Circuit(g, g.valid, scores, {"method": "acdc"}), logit_diff) == 1.0  # worsenings
    assert importance_sign(Circuit(g, g.valid, scores, {"method": "eap", "higher_is_better": False}), logit_diff) == 1
    assert importance_sign(Circuit(g, g.valid, scores, {"score_convention": "importance"})) == 1.0
    acdc = mib_faithfulness(runner, logit_diff, Circuit(g, g.valid, scores, {"method": "acdc"}), prune=False)
    assert acdc.cpr == pytest.approx(importance.cpr) and acdc.name == "acdc"
    wrong = mib_faithfulness(runner, logit_diff, scores, prune=False)  # importance scores taken for EAP's
    assert wrong.cpr < importance.cpr


def test_bad_inputs_are_named():
    g, scores, runner = linear_case()
    with pytest.raises(ValueError, match="no edge scores"):
        mib_faithfulness(runner, unused, Circuit(g, g.valid))
    with pytest.raises(ValueError, match=r"must be \[R=5, S=3\]"):
        mib_faithfulness(runner, unused, scores[:2])
    with pytest.raises(ValueError, match="sign=2.0"):
        mib_faithfulness(runner, unused, scores, sign=2)
    with pytest.raises(ValueError, match="increasing fractions"):
        mib_faithfulness(runner, unused, scores, fractions=(0.5, 0.1))


def test_curve_json_and_plot(tmp_path):
    g, scores, runner = linear_case()
    a = mib_faithfulness(runner, unused, scores, sign=1, prune=False, name="A")
    b = mib_faithfulness(runner, unused, -scores, sign=1, prune=False, name="B")
    assert FaithfulnessCurve.from_json(a.to_json()) == a
    path = plot_faithfulness([a, b], tmp_path / "figs" / "faithfulness.png", title="two methods")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plot_faithfulness({"first": a}, tmp_path / "one.png").exists()


# ------------------------------------------------------------------ MIB's code, ported
def forward_to_backward(L: int, H: int) -> torch.Tensor:
    """hannamw/EAP-IG Graph.forward_to_backward [n_forward, n_backward]: a node's own inputs."""
    f2b = torch.zeros(1 + L * (H + 1), L * (3 * H + 1) + 1, dtype=torch.bool)
    for l in range(L):
        for h in range(H):
            for i in range(3):
                f2b[1 + l * (H + 1) + h, l * (3 * H + 1) + i * H + h] = True
        f2b[1 + l * (H + 1) + H, l * (3 * H + 1) + 3 * H] = True
    return f2b


def reference_prune(in_graph: torch.Tensor, f2b: torch.Tensor) -> torch.Tensor:
    """hannamw/EAP-IG Graph.prune (src/eap/graph.py), on in_graph [n_forward, n_backward]."""
    in_graph = in_graph.clone()
    nodes = torch.zeros(in_graph.shape[0], dtype=torch.bool)
    same = False
    while not same:
        outgoing = in_graph.any(dim=1)
        ingoing = (in_graph.any(dim=0).float() @ f2b.float().T) > 0
        ingoing[0] = True  # the input node
        old_nodes = nodes.clone()
        nodes = outgoing & ingoing
        backward = nodes.float() @ f2b.float()
        backward[-1] = 1  # logits
        old_edges = in_graph.clone()
        in_graph &= (nodes.float()[:, None] * backward[None]) > 0
        same = torch.equal(old_nodes, nodes) and torch.equal(old_edges, in_graph)
    return in_graph


def reference_topn(scores: torch.Tensor, n: int, absolute: bool, f2b: torch.Tensor) -> torch.Tensor:
    """Graph.apply_topn(n, absolute, level='edge', prune=True) on scores [n_forward, n_backward]."""
    s = scores.abs() if absolute else scores.clone()
    s[torch.isnan(s)] = -torch.inf  # edges that are not real (NaN here)
    in_graph = torch.zeros(scores.numel(), dtype=torch.bool)
    in_graph[torch.argsort(s.flatten(), descending=True)[:n]] = True
    return reference_prune(in_graph.view_as(scores), f2b)


def reference_evaluate(model, clean, corrupted, in_graph: torch.Tensor, metric) -> float:
    """hannamw/EAP-IG evaluate_graph (src/eap/evaluate.py, no neurons, not Gemma) under "patching",
    on minigpt2's TransformerLens hooks: each input hook adds (corrupted - actual) of the senders whose
    edge is out of the graph; the input node is hook_embed."""
    L, H, d = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_model
    n_fwd = 1 + L * (H + 1)
    diff = torch.zeros(*clean.shape, n_fwd, d, dtype=model.dtype)

    def activation_hook(index, add):
        def fn(acts, hook):
            diff[:, :, index] += acts if add else -acts
        return fn

    out_hooks = [("hook_embed", 0)]
    for l in range(L):
        out_hooks += [(f"blocks.{l}.attn.hook_result", slice(1 + l * (H + 1), 1 + l * (H + 1) + H)),
                      (f"blocks.{l}.hook_mlp_out", 1 + l * (H + 1) + H)]
    ablate = 1 - in_graph.to(model.dtype)

    def construct(prev, column):
        def fn(acts, hook):
            return acts + torch.einsum("bpfd,f...->bp...d", diff[:, :, :prev], column)
        return fn

    nodes = in_graph.any(1) | (torch.arange(n_fwd) == 0)  # after pruning: a node with outgoing edges
    hooks = []
    for l in range(L):
        prev = 1 + l * (H + 1)
        heads_in = nodes[prev:prev + H].any()
        for i, letter in enumerate("qkv"):
            cols = slice(l * (3 * H + 1) + i * H, l * (3 * H + 1) + (i + 1) * H)
            if heads_in and not in_graph[:prev, cols].all():
                hooks.append((f"blocks.{l}.hook_{letter}_input", construct(prev, ablate[:prev, cols])))
        m, col = prev + H, l * (3 * H + 1) + 3 * H
        if nodes[m] and not in_graph[:m, col].all():
            hooks.append((f"blocks.{l}.hook_mlp_in", construct(m, ablate[:m, col])))
    hooks.append((f"blocks.{L - 1}.hook_resid_post", construct(n_fwd, ablate[:, -1])))
    with torch.no_grad():
        with model.hooks([(n, activation_hook(i, True)) for n, i in out_hooks]):
            model(corrupted)
        with model.hooks([(n, activation_hook(i, False)) for n, i in out_hooks] + hooks):
            logits = model(clean)
    return metric(logits[:, -1][None])[0].item()


def reference_auc(model, clean, corrupted, scores_ref: torch.Tensor, metric, absolute: bool):
    """MIB_circuit_track/evaluation.py evaluate_area_under_curve (log_scale=False): (area_under,
    area_from_1, faithfulnesses)."""
    L, H = model.cfg.n_layer, model.cfg.n_head
    f2b = forward_to_backward(L, H)
    real = Graph(L, H).valid.T  # real_edge_mask
    with torch.no_grad():
        baseline = metric(model(clean)[:, -1][None])[0].item()
    empty = reference_evaluate(model, clean, corrupted, torch.zeros_like(real), metric)
    n_edges = int(real.sum())
    s = scores_ref.clone()
    s[~real] = torch.nan  # not real: never chosen
    f = []
    for pct in (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1):
        in_graph = reference_topn(s, int(pct * n_edges), absolute, f2b)
        f.append((reference_evaluate(model, clean, corrupted, in_graph, metric) - empty) / (baseline - empty))
    pcts = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)
    under = sum((pcts[i + 1] - pcts[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    from_1 = sum((pcts[i + 1] - pcts[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(9))
    return under, from_1, f


MODEL_ARGS = dict(cfg=CFG, seed=2, std=0.3, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


@pytest.fixture(scope="module")
def data():
    return make_tokens(B, T, 99, seed=6), make_tokens(B, T, 99, seed=7)


def test_pruning_is_the_references(model):
    g = Graph(3, 4)
    f2b = forward_to_backward(3, 4)
    gen = torch.Generator().manual_seed(0)
    for density in (0.01, 0.03, 0.1, 0.3, 0.7):
        for _ in range(20):
            edges = (torch.rand(g.valid.shape, generator=gen) < density) & g.valid
            ours = top_edges(g, edges.double(), int(edges.sum()))  # the kept edges, pruned
            assert torch.equal(ours, Circuit(g, edges).pruned(resample=True).edges)
            assert torch.equal(ours.T, reference_prune(edges.T, f2b))


def task_metric(model, data):
    """A logit difference the clean run wins and the corrupted one loses: the clean prompts' top token
    against the corrupted prompts' (so that m(N) > m(empty), as on a real task)."""
    with torch.no_grad():
        good, bad = model(data[0])[:, -1].argmax(-1), model(data[1])[:, -1].argmax(-1)
    rows = torch.arange(B)
    return lambda logits: (logits[..., rows, good] - logits[..., rows, bad]).mean(-1)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_faithfulness_is_mibs(model, data, method):
    """The whole evaluation on a tiny model, against the port of MIB's (resample = MIB's "patching")."""
    run = EdgeRunner(model, data[0], "resample", corrupted=data[1])
    logit_diff = task_metric(model, data)
    circuit = eap(run, logit_diff, method, steps=5, top_k=10)
    calls = []
    run_run = run.run
    run.run = lambda masks, **kw: calls.append(masks.shape[0]) or run_run(masks, **kw)
    ours = mib_faithfulness(run, logit_diff, circuit)
    assert calls == [22]  # one batched run
    # MIB attributes a loss (minus the logit difference): its scores are minus circuitlab's, over [S, R]
    mib_scores = -circuit.scores.T
    cpr, _, f_cpr = reference_auc(model, data[0], data[1], mib_scores, logit_diff, absolute=False)
    _, cmd, f_cmd = reference_auc(model, data[0], data[1], mib_scores, logit_diff, absolute=True)
    assert ours.cpr_faithfulness == pytest.approx(f_cpr, abs=1e-9)
    assert ours.cmd_faithfulness == pytest.approx(f_cmd, abs=1e-9)
    assert (ours.cpr, ours.cmd) == (pytest.approx(cpr, abs=1e-9), pytest.approx(cmd, abs=1e-9))
    assert ours.cpr_faithfulness[-1] == pytest.approx(1.0) and ours.cpr_faithfulness[0] == pytest.approx(0.0)
    assert ours.full > ours.empty
    chance = mib_faithfulness(run, logit_diff, torch.randn(circuit.scores.shape, dtype=torch.float64,
                                                            generator=torch.Generator().manual_seed(0)))
    assert ours.cpr > chance.cpr + 0.3 and ours.cmd < chance.cmd - 0.2  # the method finds what matters
    assert ours.n_edges == [int(p * run.graph.n_edges) for p in PERCENTAGES]
    assert all(kept <= n for kept, n in zip(ours.cpr_kept, ours.n_edges))


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_pruning_can_be_switched_off_and_matters_under_mean_and_zero(model, data, ablation):
    run = EdgeRunner(model, data[0], ablation)
    scores = edge_attribution(run, logit_diff, "eap")
    pruned = mib_faithfulness(run, logit_diff, scores, fractions=(0.05, 0.1, 0.2))
    raw = mib_faithfulness(run, logit_diff, scores, fractions=(0.05, 0.1, 0.2), prune=False)
    for i, k in enumerate(pruned.n_edges):  # each point is the circuit's faithfulness (pruned or not)
        top = Circuit(run.graph, top_edges(run.graph, -scores.double(), k, prune=False))
        assert raw.cpr_faithfulness[i] == pytest.approx(circuit_faithfulness(run, logit_diff, top)["normalized"])
        assert pruned.cpr_faithfulness[i] == pytest.approx(
            circuit_faithfulness(run, logit_diff, top.pruned(resample=True))["normalized"])
    assert pruned.cpr_faithfulness != pytest.approx(raw.cpr_faithfulness, abs=1e-6)
