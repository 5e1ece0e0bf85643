"""ACDC: it finds a planted circuit, its batched speculative schedule decides exactly as a plain
loop written here (on the plain edge graph) and as an independent hook-level loop in ACDC's own
order on ACDC's graph (whole head inputs as edges), thresholds behave, bad input is named; and the
CLI glue runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from circuitlab.acdc import acdc, decision_order, kl_metric
from circuitlab.graph import EdgeRunner, Graph
from conftest import PLANTED, planted_path_model, make_model, make_tokens
from minigpt2 import GPT2Config


def test_acdc_recovers_a_planted_circuit():
    model = planted_path_model()
    tokens, corrupted = make_tokens(8, 6, 99, seed=1), make_tokens(8, 6, 99, seed=2)
    run = EdgeRunner(model, tokens, "resample", corrupted=corrupted)
    metric = kl_metric(run.clean.logits)
    res = acdc(run, metric, threshold=0.5)
    assert sorted(res.circuit.edge_list()) == sorted(PLANTED)
    assert res.circuit.nodes() == ["input", "a0.h1", "a1.h2", "logits"]
    assert res.metric_final < 0.1  # the path alone is (nearly) the whole model
    everything = metric(run.trace(torch.zeros_like(run.clean.mask)).logits[None]).item()
    assert everything > 1.0  # while ablating it all is not
    assert all(res.circuit.scores[run.graph.receiver_index(r), run.graph.sender_index(u)] > 0.5 for u, r in PLANTED)


def reference_acdc(run: EdgeRunner, metric, threshold: float, mode: str, higher_is_better: bool) -> torch.Tensor:
    """ACDC as a plain loop: one forward per edge, receivers from the logits back, latest sender first."""
    L, H = run.model.cfg.n_layer, run.model.cfg.n_head
    g = run.graph
    mask = g.ones(run.model.dtype)

    def value(m):
        return metric(run.trace(m).logits[None]).item()

    cur = value(mask)
    order = [("logits", None)]
    for l in reversed(range(L)):
        order.append((f"m{l}", f"m{l}"))
        order += [(f"a{l}.h{h}<{kind}>", f"a{l}.h{h}") for kind in "vkq" for h in reversed(range(H))]
    for receiver, owner in order:
        r = g.receiver_index(receiver)
        if owner is not None and mask[:, g.sender_index(owner)].sum() == 0:
            mask[r] = 0  # nothing reads this component any more
            continue
        for u in reversed(range(g.n_senders)):
            if mask[r, u] == 0:
                continue
            trial = mask.clone()
            trial[r, u] = 0
            new = value(trial)
            worse = cur - new if higher_is_better else new - cur
            if worse < (threshold if mode == "absolute" else threshold * abs(cur)):
                mask, cur = trial, new
    return mask.bool()


@pytest.fixture(scope="module")
def tiny():
    model = make_model(seed=3, std=0.3).double()  # 3 layers x 4 heads, d_model 32, vocab 99
    return EdgeRunner(model, make_tokens(6, 7, 99, seed=4), "resample", corrupted=make_tokens(6, 7, 99, seed=5))


@pytest.mark.parametrize("threshold, mode, metric_name", [
    (0.02, "absolute", "kl"),  # many edges kept
    (0.2, "absolute", "kl"),  # few kept
    (0.1, "relative", "logit_diff"),  # the paper's variant, a metric to maximise
])
def test_batched_acdc_equals_a_plain_loop(tiny, threshold, mode, metric_name):
    c, b = torch.arange(6) * 7 % 99, torch.arange(6) * 11 % 99
    if metric_name == "kl":
        metric, higher = kl_metric(tiny.clean.logits), False
    else:
        metric, higher = (lambda l: (l[..., torch.arange(6), c] - l[..., torch.arange(6), b]).mean(-1)), True
    expected = reference_acdc(tiny, metric, threshold, mode, higher)
    plain = dict(threshold_mode=mode, higher_is_better=higher, head_inputs=False)  # the plain edge graph
    fast = acdc(tiny, metric, threshold, **plain)
    naive = acdc(tiny, metric, threshold, **plain, batched=False)
    assert torch.equal(fast.circuit.edges, expected) and torch.equal(naive.circuit.edges, expected)
    assert 0 < fast.circuit.n_edges < tiny.graph.n_edges
    assert fast.metric_final == pytest.approx(naive.metric_final, abs=1e-9)
    assert fast.n_passes < naive.n_passes  # many edges per forward pass
    final = metric(tiny.trace(fast.circuit.mask(torch.double)).logits[None]).item()
    assert final == pytest.approx(fast.metric_final, abs=1e-9)  # the reported metric is the circuit's


@pytest.mark.parametrize("head_inputs", [True, False])
def test_acdc_on_some_receivers_keeps_the_others(tiny, head_inputs):
    metric = kl_metric(tiny.clean.logits)
    res = acdc(tiny, metric, 0.05, receivers=["logits", "m2"], head_inputs=head_inputs)
    g = res.circuit.graph
    decided = torch.zeros(g.n_receivers, dtype=torch.bool)
    decided[[g.receiver_index("logits"), g.receiver_index("m2")]] = True
    assert torch.equal(res.circuit.edges[~decided], g.valid[~decided])
    assert res.circuit.edges[decided].sum() < g.valid[decided].sum()


# --- ACDC's own graph and order, against an independent loop through the model's hooks -------------
def hooked_acdc(model, tokens, corrupted, ablation: str, threshold: float) -> tuple[dict, dict]:
    """ACDC as TLACDCExperiment runs it (acdc/main.py's defaults, KL metric), written from scratch on
    the model's TransformerLens hooks, one forward per decision, without EdgeRunner.

    Nodes are visited in the order of the reference's reverse-sorted correspondence: the logits
    (blocks.{L-1}.hook_resid_post), then per layer from the last: hook_mlp_out, hook_mlp_in,
    attn.hook_result[h], attn.hook_v[h], hook_k[h], hook_q[h], hook_v_input[h], hook_k_input[h],
    hook_q_input[h] (h from the last head). A node none of whose outgoing edges is kept loses its
    incoming edges unevaluated. Returns the kept edges {(receiver, sender): effect size}; an edge
    is ("a1.h2<q>", sender) into a head input, ("a1.h2.q", "a1.h2<q>") for a whole head input.
    """
    L, H = model.cfg.n_layer, model.cfg.n_head
    senders = ["input"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
    index = {n: i for i, n in enumerate(senders)}

    def value_of(cache, sender):  # a sender's output [B, T, d] in a cache
        if sender == "input":
            return cache["blocks.0.hook_resid_pre"]
        if sender.startswith("m"):
            return cache[f"blocks.{sender[1:]}.hook_mlp_out"]
        l, h = map(int, sender[1:].split(".h"))
        return cache[f"blocks.{l}.attn.hook_result"][:, :, h]

    hooked = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{n}" for l in range(L) for n in
                                            ("attn.hook_result", "hook_mlp_out", "hook_mlp_in", "hook_resid_post",
                                             "hook_q_input", "hook_k_input", "hook_v_input",
                                             "attn.hook_q", "attn.hook_k", "attn.hook_v")]
    writers = ("blocks.0.hook_resid_pre", "hook_result", "hook_mlp_out")
    corrupt: dict[str, torch.Tensor] = {}

    def save(t, hook):  # the corrupted cache; zero ablation zeroes what writes to the residual stream
        if ablation == "zero" and hook.name.endswith(writers):
            t = torch.zeros_like(t)
        corrupt[hook.name] = t.clone()
        return t
    with torch.no_grad():
        model.run_with_hooks(corrupted if ablation == "resample" else tokens, fwd_hooks=[(n, save) for n in hooked])
        clean_logits = model(tokens)[:, -1]
    log_p = torch.log_softmax(clean_logits, -1)

    # receivers: the logits, m{l} and the head inputs; each reads the senders before it
    def n_in(receiver):
        if receiver == "logits":
            return len(senders)
        if receiver.startswith("m"):
            return index[receiver] - 0
        return index[receiver.split("<")[0].split(".h")[0] + ".h0"]
    edges = {}  # (receiver, sender) -> present
    for r in ["logits"] + [f"m{l}" for l in range(L)] + [f"a{l}.h{h}<{x}>" for l in range(L) for h in range(H)
                                                         for x in "qkv"]:
        for u in senders[:n_in(r)]:
            edges[(r, u)] = True
        if "<" in r:
            edges[(r.replace("<", ".")[:-1], r)] = True  # the whole input: hook_q_input[h] -> hook_q[h]
    placeholder = {}  # hook_q[h] -> hook_result[h] and hook_mlp_in -> hook_mlp_out: kept while used
    for l in range(L):
        placeholder[f"m{l}"] = True
        for h in range(H):
            for x in "qkv":
                placeholder[f"a{l}.h{h}.{x}"] = True

    def run() -> float:
        online: dict[str, torch.Tensor] = {}

        def send(t, hook):
            online[hook.name] = t
            return t

        def receive(name_of):  # [(index, receiver)]: corrupted input plus the kept edges' clean minus corrupted
            def hook_fn(t, hook):
                t = corrupt[hook.name].clone()
                for key, receiver in name_of:
                    for u in senders:
                        if edges.get((receiver, u)):
                            t[key] += value_of(online, u) - value_of(corrupt, u)
                return t
            return hook_fn

        def direct(kind, l):  # hook_q[h]: the corrupted value where the whole input is removed
            def hook_fn(t, hook):
                t = t.clone()
                for h in range(H):
                    if not edges[(f"a{l}.h{h}.{kind}", f"a{l}.h{h}<{kind}>")]:
                        t[:, :, h] = corrupt[hook.name][:, :, h]
                return t
            return hook_fn
        hooks = [("blocks.0.hook_resid_pre", send)]
        for l in range(L):
            for x in "qkv":
                hooks.append((f"blocks.{l}.hook_{x}_input",
                              receive([((slice(None), slice(None), h), f"a{l}.h{h}<{x}>") for h in range(H)])))
                hooks.append((f"blocks.{l}.attn.hook_{x}", direct(x, l)))
            hooks += [(f"blocks.{l}.attn.hook_result", send), (f"blocks.{l}.hook_mlp_in", receive([(..., f"m{l}")])),
                      (f"blocks.{l}.hook_mlp_out", send)]
        hooks.append((f"blocks.{L - 1}.hook_resid_post", receive([(..., "logits")])))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1]
        return (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1).mean().item()

    cur, effects = run(), {}

    def try_remove(key):
        nonlocal cur
        edges[key] = False
        new = run()
        effects[key] = new - cur
        if new - cur < threshold:
            cur = new
        else:
            edges[key] = True

    def used(node):  # any kept edge out of the node
        return any(present and u == node for (r, u), present in edges.items())

    def drop_inputs(receiver):
        for key in edges:
            if key[0] == receiver:
                edges[key] = False

    for u in reversed(senders[:len(senders)]):  # logits: latest sender first
        try_remove(("logits", u))
    for l in reversed(range(L)):
        if not used(f"m{l}"):  # hook_mlp_out unused: so is hook_mlp_in
            placeholder[f"m{l}"] = False
        if placeholder[f"m{l}"]:
            for u in reversed(senders[:n_in(f"m{l}")]):
                try_remove((f"m{l}", u))
        else:
            drop_inputs(f"m{l}")
        for h in reversed(range(H)):  # hook_result[h]: placeholders to hook_q/k/v[h]
            if not used(f"a{l}.h{h}"):
                for x in "qkv":
                    placeholder[f"a{l}.h{h}.{x}"] = False
        for x in "vkq":  # hook_v[h], hook_k[h], hook_q[h]: the whole inputs
            for h in reversed(range(H)):
                key = (f"a{l}.h{h}.{x}", f"a{l}.h{h}<{x}>")
                if placeholder[key[0]]:
                    try_remove(key)
                else:
                    edges[key] = False
        for x in "vkq":  # hook_v_input[h], ...: the edges into the heads
            for h in reversed(range(H)):
                r = f"a{l}.h{h}<{x}>"
                if edges[(f"a{l}.h{h}.{x}", r)]:
                    for u in reversed(senders[:n_in(r)]):
                        try_remove((r, u))
                else:
                    drop_inputs(r)
    kept = {key: effects.get(key) for key, present in edges.items() if present}
    return kept, effects


def as_edges(g: Graph, kept: dict) -> torch.Tensor:
    edges = torch.zeros(g.n_receivers, g.n_columns, dtype=torch.bool)
    for r, u in kept:
        if r.endswith((".q", ".k", ".v")):
            edges[g.receiver_index(u), g.gate] = True
        else:
            edges[g.receiver_index(r), g.sender_index(u)] = True
    return edges


ACDC_CASES = [  # (model config, seed, ablation, threshold): each removes some whole head inputs
    (GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=16, vocab_size=99), 5, "resample", 0.03),
    (GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=16, vocab_size=99), 6, "zero", 0.03),
    (GPT2Config(n_layer=3, n_head=2, d_model=16, d_mlp=23, n_ctx=16, vocab_size=51), 7, "resample", 0.01),
    (GPT2Config(n_layer=3, n_head=2, d_model=16, d_mlp=23, n_ctx=16, vocab_size=51), 8, "zero", 0.03),
]


@pytest.mark.parametrize("cfg, seed, ablation, threshold", ACDC_CASES)
def test_acdc_equals_an_independent_hooked_loop_in_acdcs_order(cfg, seed, ablation, threshold):
    model = make_model(cfg, seed=seed, std=0.4).double()
    tokens, corrupted = make_tokens(5, 6, cfg.vocab_size, seed=seed), make_tokens(5, 6, cfg.vocab_size, seed=seed + 50)
    kept, effects = hooked_acdc(model, tokens, corrupted, ablation, threshold)
    run = EdgeRunner(model, tokens, ablation, corrupted=corrupted if ablation == "resample" else None)
    metric = kl_metric(run.clean.logits)
    fast = acdc(run, metric, threshold)
    naive = acdc(run, metric, threshold, batched=False)
    g = fast.circuit.graph
    assert g.head_inputs and g.n_edges == Graph(cfg.n_layer, cfg.n_head).n_edges + 3 * cfg.n_layer * cfg.n_head
    want = as_edges(g, kept)
    assert torch.equal(fast.circuit.gated_mask().bool(), want) and torch.equal(naive.circuit.gated_mask().bool(), want)
    # the effect sizes of every evaluated edge agree, and the count is ACDC's (whole inputs included)
    got = {(e["receiver"], e["sender"]): e["worsening"] for e in fast.log if not e["skipped"]}
    assert got.keys() == effects.keys()
    assert max(abs(got[k] - effects[k]) for k in effects) < 1e-12
    assert fast.circuit.node_counts()["edges"] == len(kept)
    # a meaningful case: some whole inputs go, some stay; and the plain graph's circuit differs
    assert 0 < fast.circuit.node_counts()["head_inputs"] < 3 * cfg.n_layer * cfg.n_head
    plain = acdc(run, metric, threshold, head_inputs=False).circuit
    assert not torch.equal(plain.mask(), fast.circuit.mask())
    final = metric(run.trace(fast.circuit.gated_mask(torch.double)).logits[None]).item()
    assert final == pytest.approx(fast.metric_final, abs=1e-12)


def test_acdcs_order_and_counts():
    g = Graph(2, 2, head_inputs=True)
    names = [(kind, g.receivers[r]) for kind, r in decision_order(g)]
    layer1 = [("edges", "m1")] + [("input", f"a1.h{h}<{x}>") for x in "vkq" for h in (1, 0)] \
        + [("edges", f"a1.h{h}<{x}>") for x in "vkq" for h in (1, 0)]
    assert names[:1 + len(layer1)] == [("edges", "logits")] + layer1
    assert [n for n in names if n[1].startswith("a0.h0")][0] == ("input", "a0.h0<v>")
    assert Graph(12, 12).n_edges == 32491 and Graph(12, 12, head_inputs=True).n_edges == 32923


def test_bad_thresholds_and_metrics_are_named(tiny):
    metric = kl_metric(tiny.clean.logits)
    with pytest.raises(ValueError, match=r"threshold=-0.1 must be a number >= 0 \(an absolute threshold"):
        acdc(tiny, metric, -0.1)
    with pytest.raises(ValueError, match=r"threshold=1.5 must be a number in \[0, 1\] \(with threshold_mode='relative'"):
        acdc(tiny, metric, 1.5, threshold_mode="relative")
    with pytest.raises(ValueError, match="unknown threshold mode 'percent'"):
        acdc(tiny, metric, 0.1, threshold_mode="percent")
    with pytest.raises(ValueError, match="finite"):
        acdc(tiny, metric, float("nan"))
    with pytest.raises(ValueError, match=r"one value per variant \[V\], got shape \(1, 6\)"):
        acdc(tiny, lambda logits: logits[..., 0], 0.1)  # per example, not averaged
    with pytest.raises(KeyError, match="no receiver named 'm7'"):
        acdc(tiny, metric, 0.1, receivers=["m7"])


@pytest.mark.slow
def test_cli_acdc_and_eap_run_on_tpp_prompts(tmp_path):
    pytest.importorskip("tpp")
    from circuitlab.edge_cli import COMMANDS, add_subcommands, corrupted_partners, make_metric

    cfg = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=64, vocab_size=50257)
    make_model(cfg, seed=0, std=0.3).save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    common = ["--model", str(tmp_path / "model"), "--examples", "4", "--threads", "1"]
    args = parser.parse_args(["acdc", *common, "--threshold", "0.05", "--out", str(tmp_path / "acdc")])
    assert COMMANDS[args.command](args) == 0
    summary = json.loads((tmp_path / "acdc" / "summary.json").read_text())
    circuit = json.loads((tmp_path / "acdc" / "circuit.json").read_text())
    assert summary["node_counts"]["edges"] == len(circuit["edges"]) and (tmp_path / "acdc" / "circuit.png").exists()
    args = parser.parse_args(["eap", *common, "--ablation", "zero", "--metric", "logit_diff", "--top-k", "20",
                              "--out", str(tmp_path / "eap")])
    assert COMMANDS[args.command](args) == 0
    assert len(json.loads((tmp_path / "eap" / "circuit.json").read_text())["edges"]) == 20
    with pytest.raises(SystemExit):
        parser.parse_args(["acdc", *common, "--metric", "bleu"])
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        make_metric("bleu", None, None)
    args = parser.parse_args(["acdc", *common, "--threshold", "2", "--threshold-mode", "relative"])
    assert COMMANDS[args.command](args) == 2  # an error message, no traceback

    import tpp
    from tpp.encoding import encode_many

    examples = tpp.make_eval_set(6, seed=1)
    kept, partners = corrupted_partners(examples, seed=1)
    assert kept and all(p.template == e.template and p.c != e.c for e, p in zip(kept, partners))
    lengths = [[len(t) for t in encode_many([e.prompt for e in examples])] for examples in (kept, partners)]
    assert lengths[0] == lengths[1]
