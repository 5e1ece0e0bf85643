"""Every circuit method over 2 processes (torch.distributed, gloo on the CPU) gives the numbers of one process,
bit for bit: the edge runner's batched run, exact edge patching, ACDC, every attribution method of
circuitlab.eap, learned masks, MIB's faithfulness and the head search (plain, speculative, rigorous, bf16);
and ``torchrun circuits.py eap`` writes the one-process output.

Each scenario runs in real processes (tests/distributed_helpers.py): this file, run as a script, is one rank
of a 2-process group; each rank computes every result alone (``group=minigpt2.distributed.LOCAL``) and split
over the group, asserts that they are equal (torch.equal on values; identical circuits), and writes the
number of checks it made. The chunk sizes are pinned small, so that the work really is split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_helpers import ROOT, assert_ok, child_env, launch, rank_main  # noqa: E402

B = 13  # examples (conftest's BATCH); chunks are pinned to a few examples or variants


# ---------------------------------------------------------------- the parent side
def run_scenario(name: str, tmp_path: Path, deadline: float = 120) -> dict[int, dict]:
    records, _ = launch(__file__, name, tmp_path, deadline=deadline)
    assert_ok(records)
    return records


def test_edge_runs_split_over_ranks_equal_one_process(tmp_path):
    """EdgeRunner.run / run_with_edge_masks (every ablation, fp32 and bf16, logits and a metric), exact edge
    patching and MIB's faithfulness curve: equal to one process on both ranks; progress on rank 0 only."""
    records = run_scenario("edges", tmp_path)
    assert all(records[r]["checks"] >= 12 for r in (0, 1)), records
    assert "MIB faithfulness" in records[0]["log"] and "MIB faithfulness" not in records[1]["log"]


def test_acdc_split_over_ranks_finds_the_one_process_circuit(tmp_path):
    """ACDC (batched and plain, fp32 and bf16, its own graph and the plain one): the same circuit, scores and log."""
    records = run_scenario("acdc", tmp_path)
    assert all(records[r]["checks"] == 4 for r in (0, 1)), records


def test_attribution_split_over_ranks_equals_one_process(tmp_path):
    """Every method of circuitlab.eap (eap, eap-ig with both rules, eap-ig-activations, clean-corrupted; several
    example chunks and one; bf16), the head attribution methods, and learned masks (uniform and EAP-IG
    initialisation): the one-process scores, log_alpha and circuit, bit for bit."""
    records = run_scenario("gradients", tmp_path, deadline=180)
    assert all(records[r]["checks"] >= 12 for r in (0, 1)), records


def test_head_search_split_over_ranks_equals_one_process(tmp_path):
    """The head search: plain (speculate=1), speculative, rigorous, bf16: the same checks and circuit."""
    records = run_scenario("search", tmp_path)
    assert all(records[r]["checks"] >= 6 for r in (0, 1)), records


# ---------------------------------------------------------------- torchrun and circuits.py
def _strip(summary: dict) -> dict:
    """A summary.json without its timings (which differ from run to run)."""
    return {k: v for k, v in summary.items() if k not in ("seconds",)}


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "weights" / "featherweight" / "model.safetensors").exists(),
                    reason="the bundled model is not here")
def test_torchrun_eap_writes_the_one_process_result(tmp_path):
    """``torchrun --nproc-per-node 2 circuits.py eap``: the ranks split the work (each rank's log says what it
    gathered), and rank 0 alone writes --out, equal to a one-process run's (circuit.json, mib_graph.json,
    summary.json but its timings). (ACDC over ranks is held by the library test above: on the bundled
    12 x 12 model it takes minutes on a CPU.)"""
    env = child_env(MINIGPT2_DIST_TIMEOUT="60", MINIGPT2_DIST_LOG_DIR=str(tmp_path / "logs"))
    flags = ["eap", "--method", "eap-ig", "--steps", "2", "--top-k", "60", "--metric", "logit_diff", "--model",
             "weights/featherweight", "--examples", "2", "--device", "cpu", "--no-progress"]
    one = subprocess.run([sys.executable, "circuits.py", *flags, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "circuits.py", *flags, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr
    for name in ("circuit.json", "mib_graph.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert _strip(summaries[0]) == _strip(summaries[1])
    assert two.stdout.count("written to") == 1  # rank 0 alone prints (and writes)
    for r in (0, 1):
        assert "from 2 ranks" in (tmp_path / "logs" / f"rank{r}.log").read_text()
    # the provenance says how it ran: one process, or torchrun's ranks and backend
    prov = [json.loads((tmp_path / d / "provenance.json").read_text()) for d in ("one", "two")]
    assert prov[0]["ranks"] == {"world_size": 1} and not prov[0]["command"].startswith("torchrun")
    assert prov[1]["ranks"] == {"world_size": 2, "backend": "gloo", "machines": 1}, prov[1]["ranks"]
    assert prov[1]["command"].startswith("torchrun --nproc-per-node 2 circuits.py eap "), prov[1]["command"]


# ---------------------------------------------------------------- the ranks' side
def split_gathers(scenario):
    """The scenario, asserting that the work was really split: some gather brought this rank fewer
    outputs than it returned (the others' share), so no check compares two one-process runs."""

    def run(rank: int, group) -> int:
        from minigpt2 import distributed

        gather, split = distributed.gather, []

        def counting(outputs, n, *args, **kwargs):
            split.append(len(outputs) < n)
            return gather(outputs, n, *args, **kwargs)

        distributed.gather = counting
        try:
            checks = scenario(rank, group)
        finally:
            distributed.gather = gather
        assert any(split), "nothing was split over the ranks"
        return checks
    return run


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaNs in the same places included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a) if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return torch.equal(nan, torch.isnan(b) if b.is_floating_point() else nan) and \
        torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def setup():
    from conftest import TINY, make_model, make_tokens

    model = make_model(TINY, seed=3)
    return model, make_tokens(B, seed=4), make_tokens(B, seed=5)


def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [V, B, vocab] -> [V]
    return (logits[..., 3] - logits[..., 7]).mean(-1)


def runners(ablation: str, group, **kw):
    """The same EdgeRunner alone and on the group."""
    from circuitlab.graph import EdgeRunner
    from minigpt2 import distributed

    model, tokens, corrupted = setup()
    data = dict(corrupted=corrupted if ablation == "resample" else None, **kw)
    one, split = (EdgeRunner(model, tokens, ablation, group=distributed.LOCAL, **data),
                  EdgeRunner(model, tokens, ablation, group=group, **data))
    assert one.group is None and (group in (None, distributed.LOCAL) or split.group is group)
    return one, split


def check_edge_runs(rank: int, group) -> int:
    from circuitlab.graph import run_with_edge_masks
    from minigpt2 import distributed

    model, tokens, corrupted = setup()
    gen = torch.Generator().manual_seed(9)
    alone, _ = runners("zero", distributed.LOCAL)
    g = alone.graph
    masks = (torch.rand(7, g.n_receivers, g.n_senders, generator=gen) < 0.8).float()
    masks[:, :g.n_receivers - 2] = 1  # variants that join late, and one that never departs
    masks[3] = 1
    masks = torch.cat([masks, (torch.rand(3, g.n_receivers, g.n_senders, generator=gen) < 0.9).float()])
    checks = 0
    for ablation in ("resample", "mean", "zero"):
        for dtype in (None, torch.bfloat16):
            for metric in (None, logit_diff):
                kw = dict(corrupted=corrupted if ablation == "resample" else None, dtype=dtype, max_rows=2 * B)
                with torch.no_grad():
                    a = run_with_edge_masks(model, tokens, masks, ablation, metric, group=distributed.LOCAL, **kw)
                    b = run_with_edge_masks(model, tokens, masks, ablation, metric, group=group, **kw)
                assert same(a, b), (ablation, dtype, metric)
                checks += 1
    one, split = runners("resample", group, max_rows=B)  # one variant a chunk: the ranks alternate
    with torch.no_grad():
        assert same(one.run(masks[:1]), split.run(masks[:1]))  # one chunk: rank 1 idle
    return checks + 1


def check_edge_patching(rank: int, group) -> int:
    from circuitlab.edge_patching import edge_patching_scores, edge_patching_values

    checks = 0
    for ablation, dtype in (("resample", None), ("mean", None), ("zero", torch.bfloat16)):
        one, split = runners(ablation, group, dtype=dtype)
        a = edge_patching_values(one, logit_diff, max_rows=3 * B)
        b = edge_patching_values(split, logit_diff, max_rows=3 * B)
        assert same(a, b), ablation
        chosen = torch.zeros_like(one.graph.valid)
        chosen[-1, :5] = True
        assert same(edge_patching_scores(one, logit_diff, chosen, max_rows=B),
                    edge_patching_scores(split, logit_diff, chosen, max_rows=B))
        checks += 2
    return checks


def check_faithfulness(rank: int, group) -> int:
    from circuitlab.faithfulness import mib_faithfulness

    one, split = runners("resample", group, max_rows=2 * B)
    g = one.graph
    scores = torch.randn(g.n_receivers, g.n_senders, generator=torch.Generator().manual_seed(1)) * g.valid
    a = mib_faithfulness(one, logit_diff, scores, sign=1, fractions=(0.1, 0.5, 1))
    b = mib_faithfulness(split, logit_diff, scores, sign=1, fractions=(0.1, 0.5, 1), progress=True, name="random")
    b.name = a.name
    assert a.to_json() == b.to_json()
    return 1


def scenario_edges(rank: int, group) -> int:
    return check_edge_runs(rank, group) + check_edge_patching(rank, group) + check_faithfulness(rank, group)


def same_acdc(a, b) -> None:
    assert torch.equal(a.circuit.edges, b.circuit.edges)
    assert torch.equal(a.circuit.scores, b.circuit.scores)
    assert a.log == b.log and (a.metric_clean, a.metric_final) == (b.metric_clean, b.metric_final)
    assert (a.n_evaluated, a.n_passes) == (b.n_evaluated, b.n_passes)
    assert a.circuit.to_json() == b.circuit.to_json()


def scenario_acdc(rank: int, group) -> int:
    from circuitlab.acdc import acdc, kl_metric

    checks = 0
    for ablation, dtype, kw in (("resample", None, {}), ("zero", None, dict(head_inputs=False)),
                                ("mean", torch.bfloat16, {}), ("resample", None, dict(batched=False))):
        one, split = runners(ablation, group, dtype=dtype, max_rows=B)  # one variant a chunk
        metric = kl_metric(one.clean.logits)
        a = acdc(one, metric, 0.02, **kw)
        b = acdc(split, metric, 0.02, progress=True, **kw)
        same_acdc(a, b)
        assert 0 < a.circuit.n_edges < a.circuit.graph.n_edges, a.circuit.n_edges  # a real mix of decisions
        checks += 1
    return checks


def check_edge_attribution(rank: int, group) -> int:
    from circuitlab.eap import METHODS, edge_attribution

    checks = 0
    for ablation in ("resample", "mean"):
        one, split = runners(ablation, group)
        for method in METHODS:
            for max_rows in (4, None):  # four chunks of examples, and the batch in one
                kw = dict(steps=3, max_rows=max_rows)
                assert same(edge_attribution(one, logit_diff, method, **kw),
                            edge_attribution(split, logit_diff, method, progress=True, **kw)), (method, max_rows)
                checks += 1
    one, split = runners("resample", group)
    for rule in ("mib", "hanna2024"):
        assert same(edge_attribution(one, logit_diff, "eap-ig", 2, rule=rule, scale="reference", max_rows=5),
                    edge_attribution(split, logit_diff, "eap-ig", 2, rule=rule, scale="reference", max_rows=5))
        checks += 1
    one, split = runners("zero", group, dtype=torch.bfloat16)
    assert same(edge_attribution(one, logit_diff, "eap-ig", 2, max_rows=6),
                edge_attribution(split, logit_diff, "eap-ig", 2, max_rows=6))
    return checks + 1


def check_eap_circuits_and_heads(rank: int, group) -> int:
    from circuitlab.eap import eap, head_attribution
    from minigpt2 import distributed

    one, split = runners("resample", group)
    a = eap(one, logit_diff, "eap-ig", 3, top_k=20, max_rows=4)
    b = eap(split, logit_diff, "eap-ig", 3, top_k=20, max_rows=4)
    assert a.to_json() == b.to_json()
    model, tokens, corrupted = setup()
    checks = 1
    for method in ("eap", "eap-ig", "clean-corrupted"):
        kw = dict(method=method, steps=3, ablation="resample", corrupted=corrupted)
        assert same(head_attribution(model, tokens, logit_diff, group=distributed.LOCAL, **kw),
                    head_attribution(model, tokens, logit_diff, group=group, **kw)), method
        checks += 1
    return checks


def check_learned_masks(rank: int, group) -> int:
    from circuitlab.learned_masks import learn_edge_mask

    checks = 0
    for init, kw in (("uniform", dict(penalty=0.01)), ("eap-ig", dict(target_edges=30))):
        one, split = runners("resample", group, max_rows=2 * B)
        a = learn_edge_mask(one, logit_diff, steps=4, init=init, eap_steps=2, samples=2, **kw)
        b = learn_edge_mask(split, logit_diff, steps=4, init=init, eap_steps=2, samples=2, **kw)
        assert torch.equal(a.log_alpha, b.log_alpha) and torch.equal(a.circuit.edges, b.circuit.edges), init
        assert a.history == b.history and (a.faithfulness, a.metric_circuit) == (b.faithfulness, b.metric_circuit)
        checks += 1
    return checks


def scenario_gradients(rank: int, group) -> int:
    return (check_edge_attribution(rank, group) + check_eap_circuits_and_heads(rank, group)
            + check_learned_masks(rank, group))


def search_result(result) -> dict:
    d = asdict(result)
    d.pop("seconds")
    return d


def scenario_search(rank: int, group) -> int:
    from circuitlab.search import search
    from circuitlab.sweep import Metric, Prompts
    from minigpt2 import distributed

    model, tokens, _ = setup()
    big = torch.cat([tokens, tokens.roll(1, dims=1)])
    with torch.no_grad():
        target = model(tokens).argmax(-1)[:, -1]
    def diff(l, t):  # the predicted token's logit minus token 5's
        return l.gather(-1, t.expand(l.shape[:-1])[..., None])[..., 0] - l[..., 5]

    metric = Metric("logit_diff", diff, True, {"t": target})
    rmetric = Metric("logit_diff", diff, True, {"t": torch.cat([target, target])})
    checks = 0
    # rows 2 B: one prompt block, each call's candidates split over the ranks; 5: whole blocks split over them
    for speculate, rigorous, dtype, ablation, rows in ((1, False, None, "zero", 2 * B), (4, False, None, "resample", 2 * B),
                                                       (3, True, None, "mean", 2 * B),
                                                       (4, False, torch.bfloat16, "zero", 2 * B),
                                                       (1, False, None, "zero", 5), (2, True, torch.bfloat16, "mean", 5)):
        prompts = Prompts(tokens, ablation=ablation)
        assert (len(prompts.blocks(rows)) > 1) == (rows == 5)
        kw = dict(threshold=0.05, speculate=speculate, max_rows=rows, dtype=dtype)
        if rigorous:
            kw.update(rigorous_prompts=Prompts(big, ablation=ablation), rigorous_metric=rmetric)
        a = search(model, prompts, metric, group=distributed.LOCAL, **kw)
        b = search(model, prompts, metric, group=group, progress=True, **kw)
        assert search_result(a) == search_result(b), (speculate, rigorous, dtype)
        assert 0 < len(a.ablated) < 12, a.ablated  # a real mix of decisions
        checks += 1
    return checks


SCENARIOS = {name: split_gathers(fn) for name, fn in (("edges", scenario_edges), ("acdc", scenario_acdc),
                                                      ("gradients", scenario_gradients), ("search", scenario_search))}

if __name__ == "__main__":
    rank_main(SCENARIOS, sys.argv[1:])
