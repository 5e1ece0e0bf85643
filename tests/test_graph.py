"""The edge graph and its masked forward: all masks 1 is the model, removing edges is ablating,
batched variants equal one-at-a-time traces (values and gradients), and bad input is named; ACDC's
graph, whose whole head inputs are edges too: removing one gives the query ACDC's corrupted run has,
gated masks fold into plain ones, and its circuits count, prune and round-trip as ACDC's."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlab.draw import draw_circuit
from circuitlab.graph import Circuit, EdgeRunner, Graph, run_with_edge_masks
from conftest import make_tokens
from minigpt2 import GPT2Config
from minigpt2.masking import run_with_head_masks

SMALL = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=19, vocab_size=99)
B, T = 5, 7
ABLATIONS = ["resample", "mean", "zero"]


def padding(B: int, T: int, seed: int = 3) -> torch.Tensor:
    lengths = torch.randint(3, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = T
    return (torch.arange(T) < lengths[:, None]).long()


MODEL_ARGS = dict(cfg=SMALL, seed=1, std=0.3, dtype=torch.float64)  # the `model` fixture (conftest.module_model)


@pytest.fixture(scope="module")
def data():
    return make_tokens(B, T, 99, seed=1), make_tokens(B, T, 99, seed=2)


def runner_for(model, data, ablation, attention_mask=None):
    tokens, corrupted = data
    return EdgeRunner(model, tokens, ablation, corrupted=corrupted, attention_mask=attention_mask)


def test_graph_sizes_and_names():
    g = Graph(3, 4)
    assert (g.n_senders, g.n_receivers) == (1 + 3 * 5, 3 * 13 + 1)
    per_layer = [12 * (1 + 5 * l) + (1 + 5 * l + 4) for l in range(3)]
    assert g.n_edges == sum(per_layer) + g.n_senders
    assert g.senders[g.head_sender(2, 3)] == "a2.h3" and g.senders[g.mlp_sender(1)] == "m1"
    r = g.receiver_index("a1.h2<k>")
    assert g.senders[g.owner(r)] == "a1.h2" and int(g.n_in[r]) == 1 + 5
    assert g.valid[g.receiver_index("m1"), g.sender_index("a1.h0")]  # an MLP reads its own layer's heads
    assert not g.valid[g.receiver_index("a1.h0<q>"), g.sender_index("a1.h3")]  # a head does not
    with pytest.raises(KeyError, match="a9.h0"):
        g.sender_index("a9.h0")


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_all_ones_is_the_model(model, data, ablation, padded):
    mask = padding(B, T) if padded else None
    run = runner_for(model, data, ablation, mask)
    expected = model(data[0], attention_mask=mask, positions=run.positions)
    torch.testing.assert_close(run.clean.logits, expected)
    torch.testing.assert_close(run.run(run.graph.ones()[None])[0], expected)
    one_call = run_with_edge_masks(model, data[0], run.graph.ones()[None], ablation, corrupted=data[1],
                                   attention_mask=mask)
    torch.testing.assert_close(one_call[0], expected)


def test_everything_ablated_under_resample_is_the_corrupted_run(model, data):
    run = runner_for(model, data, "resample")
    g = run.graph
    logits = run.trace(torch.zeros(g.n_receivers, g.n_senders)).logits
    torch.testing.assert_close(logits, model(data[1])[:, -1])


def ablated_input(model, data, ablation, layer: int) -> torch.Tensor:
    """The residual stream before ``layer`` with every sender ablated: corrupted run, mean, or biases only."""
    tokens, corrupted = data
    name = f"blocks.{layer}.hook_resid_pre"
    if ablation == "zero":
        b_O = sum(model.blocks[l].attn.c_proj.bias for l in range(layer))
        return torch.zeros(1, T, SMALL.d_model, dtype=torch.double) + b_O
    _, cache = model.run_with_cache(corrupted if ablation == "resample" else tokens, names=[name])
    return cache[name] if ablation == "resample" else cache[name].mean(0, keepdim=True)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_removing_every_edge_into_a_head_ablates_its_input(model, data, ablation):
    layer, head = 1, 2
    run = runner_for(model, data, ablation)
    g = run.graph
    mask = g.ones()
    for kind in "qkv":
        mask[g.receiver_index(f"a{layer}.h{head}<{kind}>")] = 0
    got = run.trace(mask).logits

    # reference: the head's q, k and v computed by the model's own modules from the ablated residual
    blk, dh = model.blocks[layer], SMALL.d_head
    x = blk.ln1(ablated_input(model, data, ablation, layer))
    q, k, v = blk.attn.c_attn(x).split(SMALL.d_model, dim=-1)
    hooks = [(f"blocks.{layer}.attn.hook_{n}", lambda t, hp, new=new: torch.cat(
        [t[:, :, :head], new.reshape(new.shape[0], T, -1, dh)[:, :, head:head + 1].expand(t.shape[0], -1, -1, -1),
         t[:, :, head + 1:]], dim=2)) for n, new in zip("qkv", (q, k, v))]
    expected = model.run_with_hooks(data[0], fwd_hooks=hooks)[:, -1]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_removing_every_edge_out_of_a_head_is_head_masking(model, data, ablation):
    run = runner_for(model, data, ablation)
    g = run.graph
    mask = g.ones()
    mask[:, g.head_sender(0, 1)] = 0
    heads = torch.ones(1, SMALL.n_layer, SMALL.n_head, dtype=torch.double)
    heads[0, 0, 1] = 0
    expected = run_with_head_masks(model, data[0], heads, ablation=ablation,
                                   reference=data[1] if ablation == "resample" else None)
    torch.testing.assert_close(run.run(mask[None])[0], expected[0])


def random_masks(g: Graph, V: int, seed: int) -> torch.Tensor:
    """Variants of every kind: clean, one edge off, one receiver off, fractional, dense random."""
    gen = torch.Generator().manual_seed(seed)
    masks = g.ones()[None].repeat(V, 1, 1)
    masks[1, g.receiver_index("logits"), 0] = 0
    masks[2, g.receiver_index("a1.h0<v>")] = 0
    masks[3, g.receiver_index("m0"), :] = 0.3
    masks[4:] = (torch.rand(V - 4, g.n_receivers, g.n_senders, generator=gen) > 0.4).double()
    masks[5] *= torch.rand(g.n_receivers, g.n_senders, generator=gen)
    return masks


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_batched_variants_equal_one_at_a_time(model, data, ablation):
    run = runner_for(model, data, ablation, padding(B, T))
    g = run.graph
    masks = random_masks(g, 8, seed=0)
    each = torch.stack([run.trace(m).logits for m in masks])
    torch.testing.assert_close(run.run(masks), each)
    run.max_rows = 2 * B  # chunks of two variants
    torch.testing.assert_close(run.run(masks), each)
    base = run.trace(masks[6])  # variants as differences from another circuit
    torch.testing.assert_close(run.run(masks, base=base), each)
    retraced = run.retrace(base, masks[7])
    torch.testing.assert_close(retraced.effect, run.trace(masks[7]).effect)


@pytest.fixture
def nan_filled_empty_tensors():
    """torch.empty returns NaN-filled memory (deterministic mode's fill_uninitialized_memory), so a
    read of an entry the batched propagation never wrote shows up as NaN in the logits."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def test_batched_propagation_reads_no_unwritten_memory(model, data, nan_filled_empty_tensors):
    """Variants that join at different stages (a removal in the last MLP's inputs, one in a
    head's value input, one edge into the logits, an untouched variant) and untouched heads:
    every entry the propagation reads was computed or zeroed; the in-place retrace of a base
    equals its copy."""
    assert torch.utils.deterministic.fill_uninitialized_memory
    run = runner_for(model, data, "resample", padding(B, T))
    g = run.graph
    masks = g.ones()[None].repeat(5, 1, 1)
    masks[0, g.receiver_index("m1"), g.sender_index("a0.h1")] = 0
    masks[1, g.receiver_index("a1.h2<v>"), g.sender_index("m0")] = 0
    masks[2, g.receiver_index("logits"), g.sender_index("a1.h0")] = 0
    masks[4, g.receiver_index("a0.h0<q>"), 0] = 0.5
    each = torch.stack([run.trace(m).logits for m in masks])
    got = run.run(masks)
    assert not got.isnan().any()
    torch.testing.assert_close(got, each)
    base = run.trace(masks[1])
    copy = run.retrace(base, masks[4])
    in_place = run.retrace(base, masks[4], reuse=True)
    assert in_place.effect is base.effect
    torch.testing.assert_close(in_place.effect, run.trace(masks[4]).effect)
    torch.testing.assert_close(copy.effect, in_place.effect)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # read-only
@given(st.data())
def test_property_sparse_edits_of_any_base_equal_their_traces(model, data, draw):
    """Variants that remove, restore or scale a few edges of a random circuit (ACDC's kind of batch)."""
    run = runner_for(model, data, draw.draw(st.sampled_from(ABLATIONS)))
    g = run.graph
    gen = torch.Generator().manual_seed(draw.draw(st.integers(0, 2**16)))
    base_mask = (torch.rand(g.n_receivers, g.n_senders, generator=gen) > draw.draw(st.sampled_from([0.0, 0.5, 0.9])))
    base = run.trace(base_mask.double())
    V = draw.draw(st.integers(1, 4))
    masks = base_mask.double()[None].repeat(V, 1, 1)
    edges = g.valid.nonzero()
    for v in range(V):
        for e in torch.randint(len(edges), (draw.draw(st.integers(0, 3)),), generator=gen):
            r, u = edges[e]
            masks[v, r, u] = draw.draw(st.sampled_from([0.0, 1.0, 0.5]))
    run.max_rows = B * draw.draw(st.integers(1, 3))
    torch.testing.assert_close(run.run(masks, base=base), torch.stack([run.trace(m).logits for m in masks]))


def test_gradients_of_batched_masks_equal_one_at_a_time(model, data):
    run = runner_for(model, data, "resample")
    masks = random_masks(run.graph, 6, seed=1)
    batched = masks.clone().requires_grad_()
    weights = torch.randn(6, B, SMALL.vocab_size, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    (run.run(batched) * weights).sum().backward()
    single = masks.clone().requires_grad_()
    (torch.stack([run.trace(m).logits for m in single]) * weights).sum().backward()
    torch.testing.assert_close(batched.grad, single.grad)
    assert batched.grad[:, ~run.graph.valid].abs().max() == 0  # no gradient where there is no edge


def test_bad_inputs_name_the_culprit(model, data):
    tokens, corrupted = data
    with pytest.raises(ValueError, match="unknown ablation 'shuffle'"):
        EdgeRunner(model, tokens, "shuffle", corrupted=corrupted)
    with pytest.raises(ValueError, match="same length"):
        EdgeRunner(model, tokens, "resample", corrupted=corrupted[:, :-1])
    with pytest.raises(ValueError, match="needs corrupted"):
        EdgeRunner(model, tokens, "resample")
    run = EdgeRunner(model, tokens, "zero")
    with pytest.raises(ValueError, match=r"masks\[None\]"):
        run.run(run.graph.ones())
    with pytest.raises(ValueError, match="receivers x senders"):
        run.run(torch.ones(1, 3, 3))


def test_circuit_counts_pruning_json_and_drawing(tmp_path):
    g = Graph(2, 3)
    edges = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.bool)
    for u, r in [("input", "a0.h1<v>"), ("input", "a0.h1<q>"), ("a0.h1", "a1.h2<v>"), ("a1.h2", "logits"),
                 ("input", "a1.h0<k>")]:  # the last one dead-ends: a1.h0 writes nowhere
        edges[g.receiver_index(r), g.sender_index(u)] = True
    c = Circuit(g, edges)
    assert c.nodes() == ["input", "a0.h1", "a1.h0", "a1.h2", "logits"]
    assert c.node_counts() == {"edges": 5, "heads": 3, "mlps": 0, "nodes": 3 + 5, "acdc_nodes": 3 + 5 + 4}
    pruned = c.pruned()
    assert pruned.n_edges == 4 and "a1.h0" not in pruned.nodes()
    edges[g.receiver_index("logits"), g.sender_index("m0")] = True  # m0 reads nothing: under resample, a no-op
    assert Circuit(g, edges).pruned(resample=True).edge_list() == pruned.edge_list()
    assert ("m0", "logits") in Circuit(g, edges).pruned().edge_list()
    assert c.head_mask().nonzero().tolist() == [[0, 1], [1, 2]]  # heads that write
    again = Circuit.from_json(c.to_json())
    assert torch.equal(again.edges, c.edges)
    draw_circuit(c, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


# --- ACDC's graph: the whole input of each head's query, key and value as an edge ------------------
def test_acdc_graph_sizes_names_and_folding():
    g, plain = Graph(3, 4, head_inputs=True), Graph(3, 4)
    assert (g.n_columns, g.gate) == (plain.n_senders + 1, plain.n_senders)
    assert torch.equal(g.valid, plain.valid) and g.n_edges == plain.n_edges + 3 * 3 * 4
    assert g.ones().shape == (g.n_receivers, g.n_columns) and int(g.ones()[:, g.gate].sum()) == 36
    r = g.receiver_index("a1.h2<k>")
    assert g.edge_name(r, g.gate) == ("a1.h2<k>", "a1.h2.k") and g.edge_name(r, 0) == ("input", "a1.h2<k>")
    masks = torch.rand(2, g.n_receivers, g.n_columns, generator=torch.Generator().manual_seed(0))
    folded = g.fold(masks)
    heads = g.is_head_input
    torch.testing.assert_close(folded[:, heads], masks[:, heads, :-1] * masks[:, heads, -1:])
    torch.testing.assert_close(folded[:, ~heads], masks[:, ~heads, :-1])  # the column means nothing elsewhere
    assert g.fold(folded) is folded
    with pytest.raises(ValueError, match="S \\+ 1"):
        g.fold(masks[..., :-2])


def corrupted_query(model, data, ablation, layer: int) -> torch.Tensor:
    """hook_q of ``layer`` in ACDC's corrupted run: the corrupted prompts (resample), or the clean ones with
    every write to the residual stream zeroed (zero: block 0's input, each head's result and each MLP's output)."""
    tokens, corrupted = data
    zero = ("blocks.0.hook_resid_pre", "hook_result", "hook_mlp_out")
    hooks = [(n, lambda t, hp: torch.zeros_like(t)) for n in model.hook_dict if ablation == "zero" and n.endswith(zero)]
    store = {}
    hooks.append((f"blocks.{layer}.attn.hook_q", lambda t, hp: store.setdefault("q", t.clone())))
    model.run_with_hooks(corrupted if ablation == "resample" else tokens, fwd_hooks=hooks)
    return store["q"]


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_removing_a_whole_head_input_gives_acdcs_corrupted_query(model, data, ablation):
    layer, head = 1, 2
    run = runner_for(model, data, ablation)
    g = Graph.from_model(model, head_inputs=True)
    mask = g.ones(torch.double)
    mask[g.receiver_index(f"a{layer}.h{head}<q>"), g.gate] = 0
    got = run.run(mask[None])[0]
    q = corrupted_query(model, data, ablation, layer)  # after b_Q; under zero ablation not 0 but W_Q ln1(b_O's) + b_Q

    def patch(t, hp):
        t = t.clone()
        t[:, :, head] = q[:, :, head].expand_as(t[:, :, head])
        return t
    expected = model.run_with_hooks(data[0], fwd_hooks=[(f"blocks.{layer}.attn.hook_q", patch)])[:, -1]
    torch.testing.assert_close(got, expected)
    if ablation == "zero":
        assert q[:, :, head].abs().max() > 0.1


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_whole_head_inputs_fold_into_edges_batched_and_with_gradients(model, data, ablation):
    run = runner_for(model, data, ablation, padding(B, T))
    g = Graph.from_model(model, head_inputs=True)
    gen = torch.Generator().manual_seed(4)
    masks = g.ones(torch.double)[None].repeat(4, 1, 1)
    r = g.receiver_index("a1.h0<v>")
    masks[0, r, g.gate] = 0
    masks[1, r, g.gate] = 0.4  # a fraction scales the input's edges: in_r = floor + 0.4 sum m (out - abl)
    masks[2] = (torch.rand(g.n_receivers, g.n_columns, generator=gen) > 0.3).double()
    masks[3] = torch.rand(g.n_receivers, g.n_columns, generator=gen)
    no_edges = g.ones(torch.double)
    no_edges[r] = 0  # the whole input removed is every edge into it removed, whatever the ablation
    torch.testing.assert_close(run.run(masks[:1])[0], run.run(no_edges[None, :, :-1])[0])
    folded = g.fold(masks)
    torch.testing.assert_close(run.run(masks), run.run(folded))
    torch.testing.assert_close(run.run(masks), torch.stack([run.trace(m).logits for m in masks]))
    m = masks.clone().requires_grad_()
    run.run(m).sum().backward()
    assert m.grad[:, g.is_head_input, g.gate].abs().sum() > 0


def test_circuits_on_acdcs_graph_count_run_prune_and_round_trip(model, data, tmp_path):
    g = Graph(2, 3, head_inputs=True)
    edges = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.bool)
    for u, r in [("input", "a0.h1<v>"), ("input", "a0.h1<q>"), ("a0.h1", "a1.h2<v>"), ("a1.h2", "logits"),
                 ("input", "a1.h0<k>")]:
        edges[g.receiver_index(r), g.sender_index(u)] = True
    whole = torch.zeros(g.n_receivers, dtype=torch.bool)
    for r in ["a0.h1<v>", "a1.h2<v>", "a1.h2<k>"]:  # a0.h1<q>'s whole input removed: its edge goes
        whole[g.receiver_index(r)] = True
    c = Circuit(g, edges, head_inputs=whole)
    assert ("input", "a0.h1<q>") not in c.edge_list() and c.head_input_names() == ["a0.h1<v>", "a1.h2<k>", "a1.h2<v>"]
    # ACDC's counts: 3 kept edges into kept inputs (input->a1.h0<k> has lost its whole input too), 3 whole inputs
    assert c.n_edges == 3 + 3
    counts = c.node_counts()
    assert counts["edges"] == 6 and counts["head_inputs"] == 3
    # present nodes: input, a0.h1, a1.h2 (results); a0.h1<v>, a1.h2<v>, a1.h2<k>, logits (inputs); 3 hook_q/k/v
    assert counts["acdc_nodes"] == 3 + 4 + 3
    assert c.mask().shape == (g.n_receivers, g.n_senders) and c.gated_mask().shape == (g.n_receivers, g.n_columns)
    run = runner_for(model, data, "resample")
    torch.testing.assert_close(run.run(c.gated_mask(torch.double)[None]), run.run(c.mask(torch.double)[None]))
    pruned = c.pruned()
    assert pruned.head_input_names() == ["a0.h1<v>", "a1.h2<v>"]  # a1.h2<k> kept nothing
    assert pruned.n_edges == 3 + 2
    again = Circuit.from_json(json.loads(json.dumps(c.to_json())))
    assert again.graph.head_inputs and torch.equal(again.gated_mask(), c.gated_mask())
    assert len(c.to_json()["edges"]) == c.n_edges and "a1.h2<k>->a1.h2.k" in c.to_json()["edges"]
    gated = torch.cat([edges, whole[:, None]], 1)  # a gated [R, S + 1] mask splits into edges and whole inputs
    assert torch.equal(Circuit(g, gated).gated_mask(), c.gated_mask())
    draw_circuit(c, tmp_path / "c.png")
    with pytest.raises(ValueError, match="ACDC's graph"):
        Circuit(Graph(2, 3), edges, head_inputs=whole)
