"""One vocabulary (issue #27): one head type, one ablation name set (old names deprecated, same
numbers), one dtype parser, one device resolver, one KL, one metric-shape check."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitlab.acdc import kl_metric
from circuitlab.graph import Circuit, EdgeRunner, Graph
from circuitlab.sweep import Prompts, sweep
from conftest import TINY, make_model, make_tokens
from minigpt2.engine import MetricError, check_ablation, check_variant_values, kl_div
from clikit import DTYPE_SPELLINGS, dtype_flag
from minigpt2.hardware import DTYPES, autocast_dtype, dtype_name, parse_dtype, resolve_device
from minigpt2.heads import Head, head_labels
from minigpt2.masking import single_head_masks

L, H = TINY.n_layer, TINY.n_head
heads = st.builds(Head, st.integers(0, 200), st.integers(0, 200))


# ---------------------------------------------------------------- heads
@settings(max_examples=200, deadline=None)
@given(head=heads, extra=st.integers(1, 50))
def test_head_conversions_round_trip(head, extra):
    n_head = head.head + extra
    assert Head.from_index(head.flat_index(n_head), n_head) == head
    assert head.flat_index(n_head) == head.layer * n_head + head.head  # layer-major, as single_head_masks
    assert Head.parse(head.label) == head and str(head) == head.label == f"L{head.layer}H{head.head}"
    assert Head.parse(head.mib_name) == head and head.mib_name == f"a{head.layer}.h{head.head}"
    assert Head.parse(f"{head.layer}.{head.head}") == head  # older training logs' copying "*_top"
    assert Head.of(tuple(head)) == head == tuple(head) and Head.of(head.label) == head


@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 10_000), n_head=st.integers(1, 64))
def test_flat_indices_round_trip(index, n_head):
    assert Head.from_index(index, n_head).flat_index(n_head) == index


def test_head_labels_follow_the_masks_the_graph_and_the_lens():
    model = make_model()
    assert head_labels(L, H) == model.all_head_labels()  # TransformerLens's "L{l}H{h}" order
    masks = single_head_masks(L, H, include_clean=False)
    g = Graph.from_model(model)
    for i, label in enumerate(head_labels(L, H)):
        head = Head.parse(label)
        assert (masks[i] == 0).nonzero().tolist() == [list(head)]  # mask i ablates flat head i
        assert g.senders[g.head_sender(*head)] == head.mib_name  # MIB's node name is the graph's sender
    edges = torch.zeros_like(g.valid)
    edges[g.receiver_index("logits"), [g.head_sender(2, 1), g.head_sender(0, 3)]] = True
    circuit = Circuit(g, edges)
    assert circuit.heads() == [Head(0, 3), Head(2, 1)]
    assert [h.mib_name for h in circuit.heads()] == [n for n in circuit.nodes() if n.startswith("a")]


@pytest.mark.parametrize("bad, error, named", [
    ("L3", ValueError, "names no head"), ("a3h1", ValueError, "names no head"), ("L-1H2", ValueError, "names no head"),
    (3, TypeError, "a head is a"), ((1.5, 2), TypeError, "layer must be an integer"),
    ((True, 2), TypeError, "layer must be an integer"), ((1, -2), TypeError, "head must be an integer >= 0")])
def test_bad_heads_are_named(bad, error, named):
    with pytest.raises(error, match=named):
        Head.of(bad)


def test_a_head_past_n_head_has_no_flat_index():
    with pytest.raises(ValueError, match="head 4 >= 4"):
        Head(0, 4).flat_index(4)


# ---------------------------------------------------------------- ablation names
def test_patch_is_a_deprecated_name_of_resample_everywhere():
    model, tokens, corrupted = make_model(), make_tokens(4, 6), make_tokens(4, 6, seed=1)
    assert check_ablation("resample") == "resample"
    with pytest.warns(DeprecationWarning, match="pass ablation='resample'"):
        assert check_ablation("patch") == "resample"
    masks = torch.ones(2, *Graph.from_model(model).valid.shape)
    masks[1, :, 3] = 0
    want = EdgeRunner(model, tokens, "resample", corrupted=corrupted).run(masks)
    with pytest.warns(DeprecationWarning, match="ablation 'patch' is deprecated"):
        got = EdgeRunner(model, tokens, "patch", corrupted=corrupted).run(masks)
    assert torch.equal(got, want)
    with pytest.warns(DeprecationWarning, match="ablation 'patch' is deprecated"):
        assert Prompts(tokens, ablation="patch").ablation == "resample"


# ---------------------------------------------------------------- precision and devices
def test_one_dtype_parser_takes_both_spellings():
    for name in ("fp32", "float32", "FP32", " float32 "):
        assert parse_dtype(name) is torch.float32 and autocast_dtype(name) is None and dtype_flag(name) == "fp32"
    for name in ("bf16", "bfloat16", "BF16"):
        assert parse_dtype(name) is torch.bfloat16 is autocast_dtype(name) and dtype_flag(name) == "bf16"
    assert parse_dtype(None) is None and parse_dtype(torch.bfloat16) is torch.bfloat16
    assert dtype_name(None) == dtype_name("float32") == "fp32" and dtype_name(torch.bfloat16) == "bf16"
    assert parse_dtype("auto", "cpu") is None and dtype_flag("auto") == "auto"
    assert dtype_flag("fp16") == "fp16"  # unknown: left for the flag's choices to refuse, naming them
    for bad in ("fp16", torch.float16, 32):
        with pytest.raises(ValueError, match="fp32, float32.*bf16, bfloat16"):
            parse_dtype(bad)


def test_the_flags_precision_names_are_the_parsers():
    # clikit spells --dtype without torch (train.py parses before torch loads); both name the same precisions
    assert set(DTYPE_SPELLINGS) == set(DTYPES)
    assert all(parse_dtype(canonical) is DTYPES[name] for name, canonical in DTYPE_SPELLINGS.items())


def test_the_flags_accept_both_spellings():
    import circuits
    import train

    args = circuits.parser.parse_args(["sweep", "--models", "A=x", "--dtype", "bfloat16"])
    assert args.dtype == "bf16"
    assert circuits.parser.parse_args(["acdc", "--model", "x", "--dtype", "bfloat16"]).dtype == "bf16"
    assert train.build_parser().parse_args(["pretrain", "--dtype", "float32", "--out", "o"]).dtype == "fp32"


def test_one_device_resolver(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" cpu ") == torch.device("cpu")
    for bad, named in (("nonsense", "is not a torch device"), ("meta", "a meta device cannot run the model")):
        with pytest.raises(ValueError, match=named):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda: this machine has no CUDA device; pass cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------- KL and the metric-shape check
def test_one_kl_matches_torch_and_acdc_uses_it():
    gen = torch.Generator().manual_seed(0)
    clean, ablated = torch.randn(5, 11, generator=gen), torch.randn(3, 5, 11, generator=gen) * 2
    want = F.kl_div(ablated.log_softmax(-1), clean.log_softmax(-1).expand(3, 5, 11), log_target=True,
                    reduction="none").sum(-1)  # KL(clean || ablated) per example
    torch.testing.assert_close(kl_div(clean, ablated), want)
    torch.testing.assert_close(kl_metric(clean)(ablated), want.mean(-1))
    import tpp.metrics

    assert tpp.metrics.kl_div is kl_div
    inf = torch.tensor([[0.0, -torch.inf]])  # P gives the second token zero probability, Q as well
    assert kl_div(inf, inf).item() == 0.0


def test_one_metric_shape_check():
    values = torch.zeros(3)
    assert check_variant_values(values, 3) is values
    for bad, got in ((torch.zeros(1, 3), r"got shape \(1, 3\) for V=3"), (None, "got NoneType for V=3"),
                     (torch.zeros(()), r"got shape \(\) for V=3")):
        with pytest.raises(MetricError, match=r"one value per variant \[V\], " + got):
            check_variant_values(bad, 3)


def test_sweep_runs_on_the_renamed_ablation():
    model, tokens = make_model(), make_tokens(4, 6)
    from circuitlab.sweep import Metric

    metric = Metric("top", lambda logits: logits.amax(-1))
    r = sweep(model, Prompts(tokens, ablation="mean"), [metric])
    assert r.effect("top").shape == (L, H)
