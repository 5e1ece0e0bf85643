"""Information flow routes: the scores equal a direct computation through the model's own hooks and a
port of the reference (hannamw/EAP-IG's get_scores_information_flow_routes, which MIB runs), they put
a planted path on top, the greedy selection is the reference's, and MIB's faithfulness takes them
with the importance sign."""

from __future__ import annotations

import heapq

import pytest
import torch

from circuitlab.acdc import kl_metric
from circuitlab.faithfulness import importance_sign, mib_faithfulness
from circuitlab.graph import EdgeRunner, Graph
from circuitlab.info_flow import greedy_edges, information_flow_routes, information_flow_scores
from conftest import PLANTED, planted_path_model, make_tokens
from minigpt2 import GPT2Config

CFG = GPT2Config(n_layer=2, n_head=4, d_model=28, d_mlp=37, n_ctx=17, vocab_size=99)
B, T = 5, 6


MODEL_ARGS = dict(cfg=CFG, seed=2, std=0.3, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


@pytest.fixture(scope="module")
def tokens():
    return make_tokens(B, T, 99, seed=6)


def padding_mask() -> torch.Tensor:
    lengths = torch.tensor([6, 4, 5, 6, 3])
    return (torch.arange(T)[None] < lengths[:, None]).long()


def hooked(model, tokens, attention_mask=None):
    """Every sender's output and every stage's receiver input, through the model's own hooks."""
    L = model.cfg.n_layer
    names = ["hook_embed", "hook_pos_embed"] + [n for l in range(L) for n in (
        f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out", f"blocks.{l}.hook_resid_pre",
        f"blocks.{l}.hook_resid_mid")] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad(), model.hooks([(n, lambda a, hook: None) for n in names]):
        _, cache = model.run_with_cache(tokens, names=names, attention_mask=attention_mask)
    return cache


def direct_scores(model, tokens, attention_mask=None, weights=None) -> torch.Tensor:
    """A plain loop, receiver by receiver and sender by sender, over circuitlab's graph (input = token +
    position embedding): Ferrando & Voita's proximity max(|x|_1 - |x - out_u|_1, 0), normalised over
    the receiver's senders, averaged over each example's real positions (or those where ``weights``
    [B, T] is 1) and then over examples."""
    g = Graph.from_model(model)
    L, H = model.cfg.n_layer, model.cfg.n_head
    cache = hooked(model, tokens, attention_mask)
    outs = [cache["hook_embed"] + cache["hook_pos_embed"]]
    for l in range(L):
        outs += [cache[f"blocks.{l}.attn.hook_result"][:, :, h] for h in range(H)] + [cache[f"blocks.{l}.hook_mlp_out"]]
    mask = weights if weights is not None else attention_mask
    mask = torch.ones(tokens.shape, dtype=torch.double) if mask is None else mask.double()
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.double)
    for r, name in enumerate(g.receivers):
        if name == "logits":
            x = cache[f"blocks.{L - 1}.hook_resid_post"]
        else:
            l = int(name[1:].split(".")[0].split("<")[0])
            x = cache[f"blocks.{l}.hook_resid_pre" if name.startswith("a") else f"blocks.{l}.hook_resid_mid"]
        senders = [u for u in range(g.n_senders) if g.valid[r, u]]
        prox = torch.stack([(x.abs().sum(-1) - (x - outs[u]).abs().sum(-1)).clamp(min=0) for u in senders])
        importance = prox / prox.sum(0)
        for i, u in enumerate(senders):
            per_example = (importance[i] * mask).sum(1) / mask.sum(1)
            scores[r, u] = per_example.mean()
    return scores


def reference_information_flow(model, tokens, input_lengths=None) -> torch.Tensor:
    """[n_forward, n_backward]: a port of hannamw/EAP-IG's get_scores_information_flow_routes (src/eap/
    attribute.py, unchanged since MIB's pinned 7af394a) onto minigpt2's hooks, line by line: output
    activations at hook_embed (the token embedding alone), attn.hook_result and hook_mlp_out; at each
    input hook (hook_{q,k,v}_input, hook_mlp_in, the last hook_resid_post) the proximity, its share,
    the mean over real positions, the sum over the batch; scores / total_items."""
    L, H, d = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_model
    n_fwd, n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
    batch_size, n_pos = tokens.shape
    input_lengths = torch.full((batch_size,), n_pos) if input_lengths is None else input_lengths
    scores = torch.zeros(n_fwd, n_bwd, dtype=model.dtype)
    output_activations = torch.zeros(batch_size, n_pos, n_fwd, d, dtype=model.dtype)

    def output_hook(index):
        def fn(activations, hook):
            output_activations[:, :, index] = activations.detach()
        return fn

    def input_hook(prev_index, bwd_index):
        def fn(activations, hook):
            acts = activations.detach()
            if acts.ndim == 3:
                acts = acts.unsqueeze(2)
            acts = acts.unsqueeze(2)
            out = output_activations.unsqueeze(3)
            proximity = torch.clamp(- torch.linalg.vector_norm(out[:, :, :prev_index] - acts, ord=1, dim=-1)
                                    + torch.linalg.vector_norm(acts, ord=1, dim=-1), min=0)
            importance = proximity / torch.sum(proximity, dim=2, keepdim=True)
            max_len = input_lengths.max()
            mask = torch.arange(max_len).expand(len(input_lengths), max_len) < input_lengths.unsqueeze(1)
            importance = importance * mask.unsqueeze(-1).unsqueeze(-1)
            importance = importance.sum(1) / input_lengths.view(-1, 1, 1)
            importance = importance.sum(0).squeeze(1)
            scores[:prev_index, bwd_index] += importance
        return fn

    hooks = [("hook_embed", output_hook(0))]
    for l in range(L):
        a = slice(1 + l * (H + 1), 1 + l * (H + 1) + H)
        hooks.append((f"blocks.{l}.attn.hook_result", output_hook(a)))
        for i, letter in enumerate("qkv"):
            start = l * (3 * H + 1) + i * H
            hooks.append((f"blocks.{l}.hook_{letter}_input", input_hook(a.start, slice(start, start + H))))
        hooks.append((f"blocks.{l}.hook_mlp_out", output_hook(a.stop)))
        hooks.append((f"blocks.{l}.hook_mlp_in", input_hook(a.stop, l * (3 * H + 1) + 3 * H)))
    hooks.append((f"blocks.{L - 1}.hook_resid_post", input_hook(n_fwd, n_bwd - 1)))
    attention_mask = (torch.arange(n_pos)[None] < input_lengths[:, None]).long()
    with torch.no_grad(), model.hooks(hooks):
        model(tokens, attention_mask=attention_mask)
    return scores / batch_size


@pytest.mark.parametrize("padded", [False, True])
def test_scores_equal_a_direct_computation(model, tokens, padded):
    mask = padding_mask() if padded else None
    run = EdgeRunner(model, tokens, "zero", attention_mask=mask)
    scores = information_flow_scores(run)
    torch.testing.assert_close(scores, direct_scores(model, tokens, mask), atol=1e-12, rtol=1e-10)
    assert scores[~run.graph.valid].abs().max() == 0 and scores.min() >= 0
    # each receiver's shares sum to one at every position, so their means do too
    torch.testing.assert_close(scores.sum(1), torch.ones(run.graph.n_receivers, dtype=torch.double))
    # one clean forward: the ablation plays no part
    other = EdgeRunner(model, tokens, "resample", corrupted=make_tokens(B, T, 99, seed=7), attention_mask=mask)
    torch.testing.assert_close(information_flow_scores(other), scores, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("padded", [False, True])
def test_scores_equal_the_reference_implementation_without_position_embeddings(model, tokens, padded):
    """The reference's input node is hook_embed alone; with no position embedding it is circuitlab's."""
    import copy
    bare = copy.deepcopy(model)
    with torch.no_grad():
        bare.wpe.weight.zero_()
    lengths = padding_mask().sum(1) if padded else None
    run = EdgeRunner(bare, tokens, "zero", attention_mask=padding_mask() if padded else None)
    torch.testing.assert_close(information_flow_scores(run), reference_information_flow(bare, tokens, lengths).T,
                               atol=1e-12, rtol=1e-10)
    # with position embeddings only the input node's shares (and so every share's normaliser) move
    ours = information_flow_scores(EdgeRunner(model, tokens, "zero"))
    assert not torch.allclose(ours, reference_information_flow(model, tokens).T, atol=1e-6)


def test_answer_positions_take_the_scored_position_only(model, tokens):
    run = EdgeRunner(model, tokens, "zero", positions=torch.tensor([5, 3, 4, 5, 2]))
    at = information_flow_scores(run, positions="answer")
    # the same as averaging over a mask that keeps only the scored position
    only = torch.zeros(B, T, dtype=torch.long)
    only[torch.arange(B), run.positions] = 1
    torch.testing.assert_close(at, direct_scores(model, tokens, weights=only), atol=1e-12, rtol=1e-10)
    assert not torch.allclose(at, information_flow_scores(run), atol=1e-6)
    with pytest.raises(ValueError, match="positions='last'"):
        information_flow_scores(run, positions="last")


# ------------------------------------------------------------ a planted path (copied from test_acdc)
@pytest.fixture(scope="module")
def planted():
    return EdgeRunner(planted_path_model(), make_tokens(8, 6, 99, seed=1), "resample",
                      corrupted=make_tokens(8, 6, 99, seed=2))


def test_the_planted_path_ranks_on_top(planted):
    g = planted.graph
    scores = information_flow_scores(planted)
    silent = [u for u in range(g.n_senders) if g.senders[u] not in ("input", "a0.h1", "a1.h2")]
    assert scores[:, silent].abs().max() < 1e-12  # components that write nothing carry nothing
    for u, r in PLANTED:  # on each receiver of the path, the path's sender contributes the most
        ri, ui = g.receiver_index(r), g.sender_index(u)
        assert scores[ri, ui] == scores[ri].max() and scores[ri, ui] > 0.5
    # the routes above any threshold, pruned, are the path's components exactly
    routes = information_flow_routes(planted, threshold=1e-6)
    pruned = routes.pruned(resample=True)
    assert pruned.nodes() == ["input", "a0.h1", "a1.h2", "logits"]
    assert set(PLANTED) <= set(pruned.edge_list())
    # MIB's greedy selection from the logits up reaches the whole path in 7 edges
    greedy = information_flow_routes(planted, greedy=7)
    assert greedy.n_edges == 7 and set(PLANTED) <= set(greedy.edge_list())
    assert greedy.nodes() == ["input", "a0.h1", "a1.h2", "logits"]
    top = information_flow_routes(planted, top_k=3)
    assert top.n_edges == 3 and top.info["top_k"] == 3


def test_mib_faithfulness_takes_the_importance_sign(planted):
    metric = kl_metric(planted.clean.logits)
    routes = information_flow_routes(planted, top_k=10)
    assert routes.info["score_convention"] == "importance" and importance_sign(routes, metric) == 1.0
    assert importance_sign(routes.scores, metric, higher_is_better=True) == -1.0  # a bare tensor: pass sign=+1
    by_circuit = mib_faithfulness(planted, metric, routes)
    by_tensor = mib_faithfulness(planted, metric, information_flow_scores(planted), sign=+1)
    assert by_circuit.info["sign"] == 1.0 and by_circuit.name == "information-flow-routes"
    assert by_circuit.cpr == pytest.approx(by_tensor.cpr) and by_circuit.cmd == pytest.approx(by_tensor.cmd)
    flipped = mib_faithfulness(planted, metric, information_flow_scores(planted), sign=-1)
    assert by_tensor.cpr > flipped.cpr + 0.3  # the important edges first recover the model sooner


def test_greedy_selection_recovers_the_planted_model_where_top_n_does_not(planted):
    """Why MIB selects this method's circuits greedily: the shares of the early receivers are the largest
    (a layer-0 head input reads the input node alone: share 1), so the top-n edges stop short of the
    logits and prune to nothing; from the logits up, 7 edges recover the model."""
    metric = kl_metric(planted.clean.logits)
    g = planted.graph
    scores = information_flow_scores(planted)
    empty = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.double)
    greedy = greedy_edges(g, scores, 7).mask(torch.double)
    top = information_flow_routes(planted, top_k=15).pruned(resample=True).mask(torch.double)
    full, none, by_greedy, by_top = planted.run(torch.stack([g.ones(torch.double), empty, greedy, top]),
                                                metric=metric).tolist()
    assert (by_greedy - none) / (full - none) > 0.9
    assert top.sum() == 0 and by_top == none


# ------------------------------------------------------------ MIB's greedy selection
def reference_greedy(graph: Graph, scores: torch.Tensor, n_edges: int, absolute: bool = True) -> set:
    """A port of hannamw/EAP-IG's Graph.apply_greedy (src/eap/graph.py, at MIB's 7af394a) without the
    prune: sorted candidate lists merged lazily with heapq.merge, the logits' parent edges first, a
    node's parent edges merged in when it first joins."""
    S = graph.n_senders
    score = {(r, u): float(scores[r, u]) for r, u in graph.valid[:, :S].nonzero().tolist()}
    key = (lambda e: abs(score[e])) if absolute else (lambda e: score[e])
    in_graph = set()
    parent_edges = {}
    for (r, u) in score:
        parent_edges.setdefault(graph.owner(r), []).append((r, u))
    edges = heapq.merge(sorted(parent_edges[None], key=key, reverse=True), key=key, reverse=True)
    chosen = set()
    while n_edges > 0:
        n_edges -= 1
        top = next(edges)
        chosen.add(top)
        parent = top[1]
        if parent not in in_graph:
            in_graph.add(parent)
            new = sorted(parent_edges.get(parent, []), key=key, reverse=True)
            edges = heapq.merge(edges, new, key=key, reverse=True)
    return chosen


@pytest.mark.parametrize("absolute", [True, False])
def test_greedy_is_the_references(absolute):
    g = Graph(3, 2)
    scores = torch.randn(g.n_receivers, g.n_senders, generator=torch.Generator().manual_seed(3), dtype=torch.double)
    for k in (0, 1, 5, 17, 40, g.n_edges):
        ours = greedy_edges(g, scores, k, absolute=absolute, prune=False)
        assert set(map(tuple, ours.edges.nonzero().tolist())) == reference_greedy(g, scores, k, absolute)
        for r, u in ours.edges.nonzero().tolist():  # every receiver kept belongs to a component in the circuit
            owner = g.owner(r)
            assert owner is None or ours.edges[:, owner].any()
        assert torch.equal(greedy_edges(g, scores, k, absolute=absolute).edges, ours.pruned(resample=True).edges)
    assert greedy_edges(g, scores, g.n_edges, prune=False).n_edges == g.n_edges


def test_bad_inputs_are_named(planted):
    with pytest.raises(ValueError, match="exactly one of threshold"):
        information_flow_routes(planted)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        information_flow_routes(planted, threshold=0.1, top_k=3)
    with pytest.raises(ValueError, match="k=1000"):
        greedy_edges(planted.graph, information_flow_scores(planted), 1000)
