"""The edge graph and its masked forward: all masks 1 is the model, removing edges is ablating,
batched variants equal one-at-a-time traces (values and gradients), and bad input is named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitlab.draw import draw_circuit
from circuitlab.graph import Circuit, EdgeRunner, Graph, run_with_edge_masks
from conftest import make_model, make_tokens
from minigpt2 import GPT2Config
from minigpt2.masking import run_with_head_masks

SMALL = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=19, vocab_size=99)
B, T = 5, 7
ABLATIONS = ["resample", "mean", "zero"]


def padding(B: int, T: int, seed: int = 3) -> torch.Tensor:
    lengths = torch.randint(3, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = T
    return (torch.arange(T) < lengths[:, None]).long()


@pytest.fixture(scope="module")
def model():
    return make_model(SMALL, seed=1, std=0.3).double()


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
    mode = {"resample": "patch", "mean": "mean", "zero": "zero"}[ablation]
    expected = run_with_head_masks(model, data[0], heads, mode=mode, reference=data[1] if mode == "patch" else None)
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


@settings(max_examples=10, deadline=None)
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
    with pytest.raises(ValueError, match="unknown ablation 'patch'"):
        EdgeRunner(model, tokens, "patch", corrupted=corrupted)
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
