"""EAP and EAP-IG: scores are the first-order change of the metric (finite differences), equal
hannamw/EAP-IG's (the code MIB runs, ported below onto minigpt2's TransformerLens hooks) under
both interpolation rules, as do EAP-IG-activations and clean-corrupted; head scores agree with
edge scores and with head-mask gradients, and the comparison tools measure what they claim."""

from __future__ import annotations

import pytest
import torch

from circuitlab.compare import (circuit_faithfulness, circuit_overlap, exact_head_effects, faithfulness_curve,
                                head_score_agreement, roc_curve, spearman)
from circuitlab.eap import (IG_RULES, METHODS, eap, edge_attribution, head_attribution, ig_alphas, layer_nodes,
                            resolve_rule, threshold_circuit, top_k_circuit)
from circuitlab.graph import Circuit, EdgeRunner, Graph
from conftest import make_tokens
from minigpt2 import GPT2Config
from minigpt2.engine import Metric
from minigpt2.masking import run_with_head_masks

CFG = GPT2Config(n_layer=2, n_head=4, d_model=28, d_mlp=37, n_ctx=17, vocab_size=99)
B, T = 5, 6
ABLATIONS = ["resample", "mean", "zero"]
C, W = torch.tensor([3, 14, 15, 92, 65]), torch.tensor([35, 89, 79, 32, 38])  # "correct" and "wrong" tokens


def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
    rows = torch.arange(B)
    return (logits[..., rows, C] - logits[..., rows, W]).mean(-1)


MODEL_ARGS = dict(cfg=CFG, seed=2, std=0.3, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


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


def test_ig_rules_are_named_and_the_default_is_the_references():
    assert ig_alphas(4) == ig_alphas(4, "mib") == [0.0, 0.25, 0.5, 0.75]  # k = 0..m-1: corrupted end in
    assert ig_alphas(4, "hanna2024") == [0.25, 0.5, 0.75, 1.0]  # k = 1..m: clean end in
    assert IG_RULES == ("mib", "hanna2024")
    with pytest.raises(ValueError, match="unknown EAP-IG rule 'left'"):
        ig_alphas(4, "left")


def test_eap_ig_with_one_step_and_convergence(model, data):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    eap_scores = edge_attribution(run, logit_diff)
    # the old rule's one point is the clean input: plain EAP; the reference's is the corrupted one
    torch.testing.assert_close(edge_attribution(run, logit_diff, "eap-ig", steps=1, rule="hanna2024"), eap_scores)
    at_corrupted = edge_attribution(run, logit_diff, "eap-ig", steps=1)
    assert (at_corrupted - eap_scores).abs().max() > 0.1 * eap_scores.abs().max()
    scores = {(rule, s): edge_attribution(run, logit_diff, "eap-ig", steps=s, rule=rule)
              for rule in IG_RULES for s in (4, 16, 32)}
    for rule in IG_RULES:  # each a Riemann sum converging
        coarse, fine, finer = (scores[rule, s] for s in (4, 16, 32))
        assert (finer - fine).abs().max() < (finer - coarse).abs().max()
    gap = {s: (scores["mib", s] - scores["hanna2024", s]).abs().max() for s in (4, 16, 32)}
    assert gap[32] < gap[16] < gap[4]  # the two rules meet as steps grow
    # the two rules differ by (f(0) - f(1)) / m exactly: the end points swapped
    torch.testing.assert_close(scores["mib", 4] - scores["hanna2024", 4], (at_corrupted - eap_scores) / 4)


# ------------------------------------------------ hannamw/EAP-IG's algorithm, on minigpt2's hooks
def reference_scores(model, clean, corrupted, metric, method="EAP", steps=1, first_step=0):
    """[n_forward, n_backward]: a line-by-line port of hannamw/EAP-IG's get_scores_eap and
    get_scores_eap_ig (src/eap/attribute.py; make_hooks_and_matrices, src/eap/utils.py) for one
    batch under "patching": activation_difference = corrupted - clean at hook_embed (the token
    embedding alone), attn.hook_result and hook_mlp_out; scores from the gradients at hook_{q,k,v}_input,
    hook_mlp_in and the last hook_resid_post, divided by the number of examples (and steps).
    first_step: 0 (``range(0, steps)``, the code since February 2025) or 1 (``range(1, steps+1)``)."""
    L, H, d = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_model
    n_fwd, n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
    B, T = clean.shape
    diff = torch.zeros(B, T, n_fwd, d, dtype=model.dtype)
    scores = torch.zeros(n_fwd, n_bwd, dtype=model.dtype)

    def activation_hook(index, add):
        def fn(acts, hook):
            if add:
                diff[:, :, index] += acts.detach()
            else:
                diff[:, :, index] -= acts.detach()
        return fn

    def gradient_hook(prev_index, bwd_index):
        def fn(grads, hook):
            g = grads.detach()
            if g.ndim == 3:
                g = g.unsqueeze(2)
            s = torch.einsum("bpfh,bpkh->fk", diff[:, :, :prev_index], g)
            scores[:prev_index, bwd_index] += s.squeeze(1)
        return fn

    fwd_corrupted = [("hook_embed", activation_hook(0, True))]  # the input node: the token embedding alone
    fwd_clean = [("hook_embed", activation_hook(0, False))]
    bwd = []
    for l in range(L):
        a = slice(1 + l * (H + 1), 1 + l * (H + 1) + H)
        fwd_corrupted.append((f"blocks.{l}.attn.hook_result", activation_hook(a, True)))
        fwd_clean.append((f"blocks.{l}.attn.hook_result", activation_hook(a, False)))
        for i, letter in enumerate("qkv"):
            start = l * (3 * H + 1) + i * H
            bwd.append((f"blocks.{l}.hook_{letter}_input", gradient_hook(a.start, slice(start, start + H))))
        m = 1 + l * (H + 1) + H
        fwd_corrupted.append((f"blocks.{l}.hook_mlp_out", activation_hook(m, True)))
        fwd_clean.append((f"blocks.{l}.hook_mlp_out", activation_hook(m, False)))
        bwd.append((f"blocks.{l}.hook_mlp_in", gradient_hook(m, l * (3 * H + 1) + 3 * H)))
    bwd.append((f"blocks.{L - 1}.hook_resid_post", gradient_hook(n_fwd, -1)))

    def value(logits):  # the metric at the last position, as a scalar (MIB: mean=True)
        return metric(logits[:, -1][None])[0]

    if corrupted is not None:  # None: the reference's "zero" intervention (no corrupted run)
        with torch.no_grad(), model.hooks(fwd_corrupted):
            model(corrupted)
    if method == "EAP":
        with torch.enable_grad(), model.hooks(fwd_clean, bwd):
            value(model(clean)).backward()
        return scores / B
    input_corrupted = diff[:, :, 0].clone()
    with torch.no_grad(), model.hooks(fwd_clean):
        model(clean)
    input_clean = input_corrupted - diff[:, :, 0]
    for k in range(first_step, first_step + steps):
        def interpolate(acts, hook, k=k):
            new = input_corrupted + (k / steps) * (input_clean - input_corrupted)
            new.requires_grad = True
            return new
        with torch.enable_grad(), model.hooks([("hook_embed", interpolate)], bwd):
            value(model(clean)).backward()
    return scores / B / steps


@pytest.mark.parametrize("method,rule,first_step", [("eap", "mib", 0), ("eap-ig", "mib", 0),
                                                    ("eap-ig", "hanna2024", 1)])
def test_scores_equal_the_reference_implementation(model, data, method, rule, first_step):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    ref = reference_scores(model, data[0], data[1], logit_diff, "EAP" if method == "eap" else "EAP-IG", steps=5,
                           first_step=first_step).T  # the reference's [forward, backward] is [S, R]
    ours = edge_attribution(run, logit_diff, method, steps=5, rule=rule, scale="reference")
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    # the default scale is the first-order change of the metric: B times the reference's
    torch.testing.assert_close(edge_attribution(run, logit_diff, method, steps=5, rule=rule), B * ref,
                               atol=1e-10, rtol=1e-8)
    if method == "eap-ig":  # and the other rule is not the reference's
        other = "hanna2024" if rule == "mib" else "mib"
        assert not torch.allclose(edge_attribution(run, logit_diff, method, 5, rule=other, scale="reference"), ref,
                                  atol=1e-6, rtol=1e-3)


def test_under_zero_ablation_only_the_input_node_differs_from_the_reference(model, data):
    """The reference's input node is the token embedding alone (hook_embed): zero ablation leaves its
    position embedding in place, circuitlab's zeroes token + position. Every other sender agrees."""
    run = EdgeRunner(model, data[0], "zero")
    ref = reference_scores(model, data[0], None, logit_diff, "EAP").T
    ours = edge_attribution(run, logit_diff, scale="reference")
    torch.testing.assert_close(ours[:, 1:], ref[:, 1:], atol=1e-10, rtol=1e-8)
    assert not torch.allclose(ours[:, 0], ref[:, 0], atol=1e-6, rtol=1e-3)


def reference_nodes(model, diff, scores):
    """The reference's forward nodes [(hook name, index into n_forward)] and its backward hooks, which
    add einsum(activation difference, gradient) into ``scores`` [n_forward, n_backward] (hannamw/EAP-IG's
    attribute.py, as its EAP-IG-activations and clean-corrupted scorers build them)."""
    L, H = model.cfg.n_layer, model.cfg.n_head
    n_fwd = 1 + L * (H + 1)

    def gradient_hook(prev_index, bwd_index):
        def fn(grads, hook):
            g = grads.detach()
            if g.ndim == 3:
                g = g.unsqueeze(2)
            scores[:prev_index, bwd_index] += torch.einsum("bpfh,bpkh->fk", diff[:, :, :prev_index], g).squeeze(1)
        return fn

    nodes, bwd = [("hook_embed", 0)], []
    for l in range(L):
        a = slice(1 + l * (H + 1), 1 + l * (H + 1) + H)
        nodes += [(f"blocks.{l}.attn.hook_result", a), (f"blocks.{l}.hook_mlp_out", a.stop)]
        for i, letter in enumerate("qkv"):
            start = l * (3 * H + 1) + i * H
            bwd.append((f"blocks.{l}.hook_{letter}_input", gradient_hook(a.start, slice(start, start + H))))
        bwd.append((f"blocks.{l}.hook_mlp_in", gradient_hook(a.stop, l * (3 * H + 1) + 3 * H)))
    bwd.append((f"blocks.{L - 1}.hook_resid_post", gradient_hook(n_fwd, -1)))
    return nodes, bwd


def reference_ig_activations(model, clean, corrupted, metric, steps=5, first_step=1, means=None,
                             start_at_mean=False):
    """[n_forward, n_backward]: a port of hannamw/EAP-IG's get_scores_ig_activations (src/eap/attribute.py,
    the same at MIB's pinned commit 7af394a and now) for one batch. activations_clean / _corrupted: each
    sender's output (hook_embed, attn.hook_result, hook_mlp_out) in the clean / corrupted run (zeros when
    there is none: "zero", "mean"); activation_difference = corrupted - clean (+ means for "mean-positional",
    means [T, n_forward, d]). For each node of nodeslist (input, a{l}.h0 = all of layer l's heads at
    hook_result, m{l}) and k in range(first_step, first_step + steps) (the reference: range(1, steps+1)),
    a clean run with that node's output replaced by k/steps clean + (1 - k/steps) corrupted, a constant;
    the backward hooks add every edge's score in every run; scores / B / (number of runs).
    start_at_mean: interpolate from the means instead of from zeros (circuitlab's choice, not the reference's)."""
    L, H, d = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_model
    n_fwd, n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
    B, T = clean.shape
    diff, acts_corrupted, acts_clean = (torch.zeros(B, T, n_fwd, d, dtype=model.dtype) for _ in range(3))
    scores = torch.zeros(n_fwd, n_bwd, dtype=model.dtype)

    def store(into, index):
        def fn(acts, hook):
            into[:, :, index] += acts.detach()
        return fn

    nodes, bwd = reference_nodes(model, diff, scores)

    def value(logits):
        return metric(logits[:, -1][None])[0]

    with torch.no_grad():
        if corrupted is not None:  # 'patching'
            with model.hooks([(name, store(acts_corrupted, i)) for name, i in nodes]):
                model(corrupted)
        elif means is not None:  # 'mean-positional'
            diff += means
        with model.hooks([(name, store(acts_clean, i)) for name, i in nodes]):
            model(clean)
        diff += acts_corrupted - acts_clean
        if start_at_mean:
            acts_corrupted += means
    runs = 0
    for name, index in nodes:
        for k in range(first_step, first_step + steps):
            runs += 1
            c, x = acts_clean[:, :, index], acts_corrupted[:, :, index]

            def interpolate(acts, hook, k=k, c=c, x=x):
                return (k / steps) * c + (1 - k / steps) * x
            with torch.enable_grad(), model.hooks([(name, interpolate)], bwd):
                value(model(clean)).backward()
    return scores / B / runs


def sender_means(model, tokens):
    """[T, n_forward, d]: each sender's per-position mean over the batch (the reference's
    compute_mean_activations(per_position=True), the input node being hook_embed)."""
    L = model.cfg.n_layer
    names = ["hook_embed"] + [n for l in range(L) for n in (f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out")]
    with torch.no_grad(), model.hooks([(n, lambda a, hook: None) for n in names]):
        _, cache = model.run_with_cache(tokens, names=names)
    parts = [cache["hook_embed"][:, :, None]]
    for l in range(L):
        parts += [cache[f"blocks.{l}.attn.hook_result"], cache[f"blocks.{l}.hook_mlp_out"][:, :, None]]
    return torch.cat(parts, 2).mean(0)


def without_position_embeddings(model):
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.wpe.weight.zero_()
    return m


@pytest.mark.parametrize("rule,first_step", [(None, 1), ("hanna2024", 1), ("mib", 0)])
def test_eap_ig_activations_equals_the_reference_implementation(model, data, rule, first_step):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    ref = reference_ig_activations(model, data[0], data[1], logit_diff, steps=3, first_step=first_step).T
    ours = edge_attribution(run, logit_diff, "eap-ig-activations", steps=3, rule=rule, scale="reference")
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(edge_attribution(run, logit_diff, "eap-ig-activations", steps=3, rule=rule), B * ref,
                               atol=1e-10, rtol=1e-8)
    # not EAP-IG on inputs, nor plain EAP
    for other in (edge_attribution(run, logit_diff, "eap-ig", steps=3, rule=rule, scale="reference"),
                  edge_attribution(run, logit_diff, scale="reference")):
        assert not torch.allclose(ours, other, atol=1e-6, rtol=1e-3)


def test_eap_ig_activations_under_zero_and_mean_ablation(model, data):
    """Zero: the reference's zero intervention exactly, once the input nodes agree (no position
    embedding). Mean: the reference multiplies by mean - clean but interpolates from 0; circuitlab
    starts the path at the mean, which is the port with its start moved there."""
    bare = without_position_embeddings(model)
    ref = reference_ig_activations(bare, data[0], None, logit_diff, steps=3).T
    ours = edge_attribution(EdgeRunner(bare, data[0], "zero"), logit_diff, "eap-ig-activations", 3, scale="reference")
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)

    run = EdgeRunner(model, data[0], "mean")
    means = sender_means(model, data[0])
    ours = edge_attribution(run, logit_diff, "eap-ig-activations", steps=3, scale="reference")
    moved = reference_ig_activations(model, data[0], None, logit_diff, steps=3, means=means, start_at_mean=True).T
    torch.testing.assert_close(ours, moved, atol=1e-10, rtol=1e-8)
    verbatim = reference_ig_activations(model, data[0], None, logit_diff, steps=3, means=means).T
    assert not torch.allclose(ours, verbatim, atol=1e-6, rtol=1e-3)


def test_eap_ig_activations_layer_nodes_and_its_clean_point(model, data):
    """The layer nodes are the reference's nodeslist; with one step at alpha = 1 every run is the clean
    forward with one layer node frozen in turn, so a receiver's gradient is EAP's in the runs of the
    nodes upstream of it, 0 in its own node's run, and EAP's without the frozen node's path in the
    runs of the nodes downstream of it."""
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    g = run.graph
    groups = layer_nodes(g)
    assert [list(r) for r in groups] == [[0], [1, 2, 3, 4], [5], [6, 7, 8, 9], [10]]
    assert resolve_rule("eap-ig-activations", None) == "hanna2024" and resolve_rule("eap-ig", None) == "mib"
    ours = edge_attribution(run, logit_diff, "eap-ig-activations", steps=1)
    plain = edge_attribution(run, logit_diff)
    n = len(groups)
    torch.testing.assert_close(ours[-1], plain[-1])  # the logits: downstream of every node
    last_mlp = g.receiver_index(f"m{CFG.n_layer - 1}")  # downstream of all but its own node
    torch.testing.assert_close(ours[last_mlp], plain[last_mlp] * (n - 1) / n)
    assert not torch.allclose(ours[:-1], plain[:-1], atol=1e-6, rtol=1e-3)


def reference_clean_corrupted(model, clean, corrupted, metric):
    """A port of hannamw/EAP-IG's get_scores_clean_corrupted (src/eap/attribute.py, unchanged since MIB's
    pinned 7af394a): activation_difference = corrupted - clean, then one backward on the clean run and
    one on the corrupted run, with the same gradient hooks; scores / B / 2. Written with the EAP port's
    hooks: EAP's scores at the clean run plus the same at the corrupted run."""
    L, H, d = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_model
    n_fwd = 1 + L * (H + 1)
    B, T = clean.shape
    diff = torch.zeros(B, T, n_fwd, d, dtype=model.dtype)
    scores = torch.zeros(n_fwd, L * (3 * H + 1) + 1, dtype=model.dtype)

    def store(sign, index):
        def fn(acts, hook):
            diff[:, :, index] += sign * acts.detach()
        return fn

    nodes, bwd = reference_nodes(model, diff, scores)
    with torch.no_grad():
        with model.hooks([(n, store(1.0, i)) for n, i in nodes]):
            model(corrupted)
        with model.hooks([(n, store(-1.0, i)) for n, i in nodes]):
            model(clean)
    with torch.enable_grad(), model.hooks(bwd_hooks=bwd):
        metric(model(clean)[:, -1][None])[0].backward()
        metric(model(corrupted)[:, -1][None])[0].backward()
    return scores / B / 2


def test_clean_corrupted_is_the_mean_of_the_gradients_at_the_two_ends(model, data):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    ours = edge_attribution(run, logit_diff, "clean-corrupted", scale="reference")
    torch.testing.assert_close(ours, reference_clean_corrupted(model, data[0], data[1], logit_diff).T,
                               atol=1e-10, rtol=1e-8)
    for ablation in ABLATIONS:  # the clean end (EAP) and the ablated one (EAP-IG's alpha = 0), averaged
        run = EdgeRunner(model, data[0], **kwargs(data, ablation))
        corrupted_end = edge_attribution(run, logit_diff, "eap-ig", steps=1, rule="mib")
        ends = (edge_attribution(run, logit_diff) + corrupted_end) / 2
        torch.testing.assert_close(edge_attribution(run, logit_diff, "clean-corrupted", steps=99), ends)


def test_the_new_methods_are_listed_and_recorded(model, data):
    assert METHODS == ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted")
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    c = eap(run, logit_diff, "eap-ig-activations", steps=2, top_k=5)
    assert c.info == {"method": "eap-ig-activations", "steps": 2, "ablation": "resample", "scale": "metric",
                      "rule": "hanna2024", "top_k": 5}
    torch.testing.assert_close(c.scores, edge_attribution(run, logit_diff, "eap-ig-activations", 2, "hanna2024"))
    c = eap(run, logit_diff, "clean-corrupted", top_k=5)
    assert c.info == {"method": "clean-corrupted", "steps": 2, "ablation": "resample", "scale": "metric", "top_k": 5}
    with pytest.raises(ValueError, match="available for edges only"):
        head_attribution(model, data[0], logit_diff, "eap-ig-activations", **kwargs(data, "resample"))
    with pytest.raises(ValueError, match="steps=0"):
        edge_attribution(run, logit_diff, "eap-ig-activations", steps=0)
    with pytest.raises(ValueError, match="unknown EAP-IG rule 'new'"):
        edge_attribution(run, logit_diff, "eap-ig-activations", rule="new")


def test_a_metric_and_a_callable_give_the_same_scores(model, data):
    run = EdgeRunner(model, data[0], **kwargs(data, "resample"))
    rows = torch.arange(B)
    per_example = Metric("logit_diff", lambda logits: logits[..., rows, C] - logits[..., rows, W])
    for method in ("eap", "eap-ig"):
        torch.testing.assert_close(edge_attribution(run, per_example, method, steps=3),
                                   edge_attribution(run, logit_diff, method, steps=3))
    torch.testing.assert_close(head_attribution(model, data[0], per_example, "eap-ig", 3, **kwargs(data, "resample")),
                               head_attribution(model, data[0], logit_diff, "eap-ig", 3, **kwargs(data, "resample")))
    circuit = eap(run, per_example, "eap-ig", steps=3, top_k=7, rule="hanna2024", scale="reference")
    assert circuit.info == {"method": "eap-ig", "steps": 3, "ablation": "resample", "scale": "reference",
                            "rule": "hanna2024", "metric": "logit_diff", "higher_is_better": True, "top_k": 7}
    torch.testing.assert_close(circuit.scores, edge_attribution(run, logit_diff, "eap-ig", 3, "hanna2024") / B)
    assert torch.equal(circuit.edges, eap(run, logit_diff, "eap-ig", steps=3, top_k=7, rule="hanna2024").edges)


@pytest.mark.parametrize("method,rule", [("eap", "mib"), ("eap-ig", "mib"), ("eap-ig", "hanna2024"),
                                         ("clean-corrupted", None)])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_head_scores_are_the_sum_of_their_out_edges(model, data, method, rule, ablation):
    run = EdgeRunner(model, data[0], **kwargs(data, ablation))
    g = run.graph
    edges = edge_attribution(run, logit_diff, method, steps=3, rule=rule)
    heads = head_attribution(model, data[0], logit_diff, method, steps=3, rule=rule, **kwargs(data, ablation))
    summed = torch.tensor([[edges[:, g.head_sender(l, h)].sum().item() for h in range(CFG.n_head)]
                           for l in range(CFG.n_layer)], dtype=torch.double)
    torch.testing.assert_close(heads, summed)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_head_scores_are_head_mask_finite_differences(model, data, ablation):
    heads = head_attribution(model, data[0], logit_diff, **kwargs(data, ablation))
    eps = 1e-6
    masks = torch.ones(1 + CFG.n_layer * CFG.n_head, CFG.n_layer, CFG.n_head, dtype=torch.double)
    masks[1:] -= eps * torch.eye(CFG.n_layer * CFG.n_head, dtype=torch.double).view(-1, CFG.n_layer, CFG.n_head)
    values = run_with_head_masks(model, data[0], masks, ablation=ablation,
                                 reference=data[1] if ablation == "resample" else None, metric=logit_diff)
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
    with pytest.raises(ValueError, match="unknown EAP-IG rule 'new'"):
        edge_attribution(run, logit_diff, "eap-ig", rule="new")
    with pytest.raises(ValueError, match="unknown EAP-IG rule 'new'"):
        head_attribution(model, data[0], logit_diff, "eap-ig", rule="new", ablation="zero")
    with pytest.raises(ValueError, match="unknown scale 'mean'"):
        edge_attribution(run, logit_diff, scale="mean")
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
