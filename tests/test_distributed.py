"""minigpt2.distributed: the head-mask engine split over ranks gives the one-process numbers bit for bit, and a
failing or dying rank ends every rank with an error, never a hang.

Each scenario runs in real processes: this file, run as a script, is one rank of a 2-process gloo group
(FileStore rendezvous, OMP_NUM_THREADS=1) and writes what happened to ``OUT/rank<R>.json``; the test
starts the ranks with subprocess and kills them past a deadline, so a hang fails the test instead of
stalling it. The torchrun test runs ``circuits.py sweep`` on two ranks and compares its sweep.json with a
one-process run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_helpers import GROUP_TIMEOUT, ROOT, child_env, rank_main  # noqa: E402
from distributed_helpers import launch as launch_script  # noqa: E402

DEADLINE = 90  # seconds a scenario may take, start-up included, before the test calls it a hang


# ---------------------------------------------------------------- the parent side
def launch(scenario: str, tmp_path: Path, world: int = 2) -> tuple[dict[int, dict], float]:
    """Run ``scenario`` of this file on ``world`` ranks; each rank's record (absent for a rank that died)."""
    return launch_script(__file__, scenario, tmp_path, world=world, deadline=DEADLINE)


@pytest.mark.slow
def test_engine_split_over_ranks_equals_one_process(tmp_path):
    """(a) the sweep and run_with_head_masks (zero, mean, resample; fp32 and bf16) on 2 ranks equal one process
    bit for bit; (b) fewer chunks than ranks; (e) the gather moves values that differ in the last bit exactly;
    and a rank-0-only call in a group this process did not opt into runs alone (the DDP training case)."""
    records, _ = launch("equal", tmp_path)
    for r in (0, 1):
        assert records[r]["status"] == "ok", records[r]
        assert records[r]["checks"] >= 20, records[r]
        log = (tmp_path / "equal" / f"rank{r}.log").read_text()  # each rank's own log (log_to_file)
        assert f"rank {r} INFO minigpt2.distributed: rank {r}: gathered 13 variants from 2 ranks" in log
    assert "13 variants x 13 prompts" in records[0]["log"] and "variants x" not in records[1]["log"]  # progress: rank 0


def test_raising_rank_stops_every_rank(tmp_path):
    """(c) a rank that raises: both ranks end with one DistributedError naming rank 1 and its message."""
    records, wall = launch("raise", tmp_path)
    for r in (0, 1):
        rec = records[r]
        assert rec["status"] == "error" and rec["type"] == "DistributedError", rec
        assert rec["failures"] == {"1": rec["failures"]["1"]} and "boom on rank 1" in rec["failures"]["1"], rec
        assert "rank 1" in rec["message"] and "ValueError: boom on rank 1" in rec["message"], rec
    assert wall < DEADLINE


def test_dying_rank_stops_the_others(tmp_path):
    """(d) a rank that dies outright (os._exit): the other ends with a DistributedError within the timeout."""
    records, wall = launch("die", tmp_path)
    assert 1 not in records  # it died before writing anything
    rec = records[0]
    assert rec["status"] == "error" and rec["type"] == "DistributedError", rec
    assert "died or stopped answering" in rec["message"], rec
    assert rec["elapsed"] < GROUP_TIMEOUT + 10, rec


# ---------------------------------------------------------------- in one process
def test_alone_without_opting_in(monkeypatch):
    from minigpt2 import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.resolve_group(None) is None and distributed.resolve_group(distributed.LOCAL) is None
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.shard([[0, 1], [2]], None) == [[0, 1], [2]]
    outputs = {0: torch.zeros(2)}
    assert distributed.gather(outputs, 1, None) is outputs
    assert distributed.init_from_env("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()
    with pytest.raises(TypeError, match="ProcessGroup"):
        distributed.check_group("world")


def test_timeout_setting(monkeypatch):
    from minigpt2 import distributed

    monkeypatch.delenv("MINIGPT2_DIST_TIMEOUT", raising=False)
    assert distributed.timeout() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv("MINIGPT2_DIST_TIMEOUT", "7.5")
    assert distributed.timeout() == 7.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("MINIGPT2_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="MINIGPT2_DIST_TIMEOUT"):
            distributed.timeout()


def test_log_to_file_alone(tmp_path):
    import logging

    from minigpt2 import distributed

    level = logging.getLogger("minigpt2").level
    path = distributed.log_to_file(tmp_path / "logs")
    try:
        logging.getLogger("minigpt2.distributed").info("hello")
    finally:
        for handler in logging.getLogger("minigpt2").handlers[:]:
            if getattr(handler, "baseFilename", None) == str(path):
                logging.getLogger("minigpt2").removeHandler(handler)
                handler.close()
        logging.getLogger("minigpt2").setLevel(level)
    assert path.name == "rank0.log" and "rank 0 INFO minigpt2.distributed: hello" in path.read_text()


def test_step_alone_raises_the_error_itself():
    from minigpt2 import distributed

    with pytest.raises(KeyError):
        with distributed.step(None):
            raise KeyError("x")


# ---------------------------------------------------------------- torchrun and circuits.py
@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "weights" / "featherweight" / "model.safetensors").exists(),
                    reason="the bundled model is not here")
def test_torchrun_sweep_writes_the_one_process_result(tmp_path):
    """``torchrun --nproc-per-node 2 circuits.py sweep``: rank 0 writes --out, equal to a one-process run's."""
    env = child_env(MINIGPT2_DIST_TIMEOUT="60")
    flags = ["sweep", "--models", "weights/featherweight", "--examples", "3", "--metrics", "accuracy", "logit_diff",
             "--device", "cpu", "--no-progress"]
    one = subprocess.run([sys.executable, "circuits.py", *flags, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "circuits.py", *flags, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "sweep.json").read_text()) == \
        json.loads((tmp_path / "one" / "sweep.json").read_text())
    assert two.stdout.count("written to") == 1  # rank 0 alone prints (and writes)
    assert not list(tmp_path.glob(".*partial*"))


def children_with(parent: int, variable: str) -> list[int]:
    """The processes below ``parent`` whose environment holds ``variable`` (e.g. "LOCAL_RANK=1")."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and variable.encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists() or
                    not (ROOT / "weights" / "featherweight" / "model.safetensors").exists(),
                    reason="needs Linux's /proc and the bundled model")
def test_torchrun_rank_killed_leaves_nothing(tmp_path):
    """A rank killed outright (SIGKILL) mid-sweep: the run ends, non-zero, well within the timeout, and --out is
    neither written nor left half-written."""
    import signal

    env = child_env(MINIGPT2_DIST_TIMEOUT="60", TMPDIR=str(tmp_path))
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "circuits.py", "sweep", "--models", "weights/featherweight", "--examples", "40",
                            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")],
                           cwd=ROOT, env=env, stdout=(tmp_path / "log").open("w"), stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        while (tmp_path / "log").read_text().count("144 heads on 40 examples") < 2:  # both ranks are sweeping
            assert run.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "log").read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        victims = children_with(run.pid, "LOCAL_RANK=1")
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        t1 = time.monotonic()
        run.wait(timeout=90)
    except BaseException:
        run.kill()
        raise
    out = (tmp_path / "log").read_text()
    assert run.returncode != 0 and "circuits.py FAILED" in out, out
    assert time.monotonic() - t1 < 60, out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


# ---------------------------------------------------------------- the ranks' side
def tiny_setup():
    from conftest import TINY, make_model, make_tokens

    from minigpt2.masking import single_head_masks

    model = make_model(TINY, seed=3)
    tokens = make_tokens(seed=4)
    masks = single_head_masks(TINY.n_layer, TINY.n_head)
    return model, tokens, masks


def check_head_masks(rank: int, group) -> int:
    """Zero, mean and resample ablations, fp32 and bf16, logits and a metric: equal to one process's."""
    from minigpt2 import distributed
    from minigpt2.masking import run_with_head_masks

    model, tokens, masks = tiny_setup()
    B = tokens.shape[0]
    reference = tokens.roll(1, dims=0)
    checks = 0
    for ablation in ("zero", "mean", "resample"):
        ref = reference if ablation == "resample" else None
        for dtype in (None, torch.bfloat16):
            for metric in (None, lambda logits: logits[..., :5].logsumexp(-1)):
                kw = dict(ablation=ablation, reference=ref, dtype=dtype, metric=metric, max_rows=3 * B)
                with torch.no_grad():
                    alone = run_with_head_masks(model, tokens, masks, group=distributed.LOCAL, **kw)
                    split = run_with_head_masks(model, tokens, masks, group=group, **kw)
                assert torch.equal(alone, split), (ablation, dtype, metric)
                checks += 1
    for n, per in ((3, 3), (3, 1), (1, 1)):  # one chunk (rank 1 idle), three chunks over two ranks, one variant
        with torch.no_grad():
            alone = run_with_head_masks(model, tokens, masks[:n], max_rows=per * B, group=distributed.LOCAL)
            split = run_with_head_masks(model, tokens, masks[:n], max_rows=per * B, group=group)
        assert torch.equal(alone, split), (n, per)
        checks += 1
    return checks


def check_sweep(rank: int, group) -> int:
    from circuitlab.sweep import Prompts, sweep
    from minigpt2 import distributed
    from minigpt2.engine import Metric

    model, tokens, _ = tiny_setup()
    metric = Metric("first_logit", lambda logits: logits[..., 0])
    checks = 0
    for ablation in ("zero", "resample"):
        prompts = Prompts(tokens, ablation=ablation)
        # max_rows 20: one prompt block, its variants' chunks split over the ranks; 4: whole blocks split
        for dtype, rows in ((None, 20), (torch.bfloat16, 20), (None, 4), (torch.bfloat16, 4)):
            assert (len(prompts.blocks(rows)) > 1) == (rows == 4)
            alone = sweep(model, prompts, [metric], max_rows=rows, dtype=dtype, group=distributed.LOCAL)
            split = sweep(model, prompts, [metric], max_rows=rows, dtype=dtype, group=group, progress=True)
            assert alone.clean == split.clean
            assert torch.equal(alone.ablated["first_logit"], split.ablated["first_logit"])
            assert torch.equal(alone.sem["first_logit"], split.sem["first_logit"])
            checks += 1
    return checks


def check_gather(rank: int, group) -> int:
    """Values one ulp apart, of several dtypes and shapes, cross ranks unchanged; shares are round-robin."""
    from minigpt2 import distributed
    from minigpt2.engine import Core

    one = torch.tensor([1.0, 3.0], dtype=torch.float32)
    ulp = torch.nextafter(one, torch.full_like(one, 2.0))
    values = {0: one, 1: ulp, 2: ulp.to(torch.bfloat16), 3: torch.tensor(7, dtype=torch.int64),
              4: torch.tensor([True, False, True]), 5: torch.zeros(0, 3),
              6: torch.arange(6, dtype=torch.float64).view(2, 3) / 3}
    mine = {v: t for v, t in values.items() if v % 2 == rank}
    got = distributed.gather(mine, len(values), group)
    assert sorted(got) == list(values)
    for v, t in values.items():
        assert got[v].dtype == t.dtype and got[v].shape == t.shape and torch.equal(got[v], t), v
    assert not torch.equal(got[0], got[1])  # they differ in the last bit, and stay so
    assert distributed.shard(list(range(5)), group) == [[0, 2, 4], [1, 3]][rank]
    model, _, _ = tiny_setup()
    assert Core(model, group=group).chunks([0] * 5, 1, 1, max_rows=1) == [[[0], [2], [4]], [[1], [3]]][rank]
    assert Core(model).chunks([0] * 5, 1, 1, max_rows=1) == [[0], [1], [2], [3], [4]]  # no group: alone
    assert distributed.is_writer(group) == (rank == 0)
    with pytest.raises(distributed.DistributedError, match="missing"):
        distributed.gather({0: one}, 2, group)  # both ranks bring variant 0: 1 is missing, 0 twice
    return 4


def check_not_opted_in(rank: int, group) -> int:
    """A group initialised by someone else (DDP training) is not used unasked: rank 0 alone may call."""
    from minigpt2 import distributed
    from minigpt2.masking import run_with_head_masks

    assert distributed.resolve_group(None) is None
    if rank == 0:
        model, tokens, masks = tiny_setup()
        with torch.no_grad():
            run_with_head_masks(model, tokens, masks[:4], progress=False)
    torch.distributed.barrier()
    distributed.use_default_group(True)
    assert distributed.resolve_group(None) is not None and distributed.world_size() == 2
    distributed.use_default_group(False)
    return 1


def scenario_equal(rank: int, group) -> int:
    return (check_not_opted_in(rank, group) + check_gather(rank, group) + check_head_masks(rank, group)
            + check_sweep(rank, group))


def failing_run(rank: int, group, fail) -> int:
    from minigpt2.masking import run_with_head_masks

    model, tokens, masks = tiny_setup()

    def metric(logits):
        if rank == 1:
            fail()
        return logits[..., 0]

    with torch.no_grad():
        run_with_head_masks(model, tokens, masks[:4], metric=metric, max_rows=tokens.shape[0], group=group)
    return 0


def boom():
    raise ValueError("boom on rank 1")


SCENARIOS = {"equal": scenario_equal, "raise": lambda rank, group: failing_run(rank, group, boom),
             "die": lambda rank, group: failing_run(rank, group, lambda: os._exit(3))}

if __name__ == "__main__":
    rank_main(SCENARIOS, sys.argv[1:], logged={"equal"})


def test_shares_by_cost_are_balanced_and_in_order():
    """shard(costs=): every item on one rank, loads within the dearest item of each other, shares in order
    (exact edge patching: attention stages hold most edges, and turn by turn gave one rank nearly all)."""
    from hypothesis import given, strategies as st

    from minigpt2.distributed import owners

    @given(st.lists(st.integers(1, 10_000), max_size=60), st.integers(1, 8))
    def check(costs, world):
        owner = owners(costs, world)
        assert len(owner) == len(costs) and set(owner) <= set(range(world))
        load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(world)]
        assert max(load) - min(load) <= max(costs, default=0)

    check()
    # the case that made it: a dear job (an attention stage) then a cheap one (an MLP stage), 12 times over
    costs = [36 * 13 * (25 - i) if i % 2 else 13 * (25 - i) for i in range(24)]
    owner = owners(costs, 2)
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in (0, 1)]
    assert max(load) / min(load) < 1.05, load
    turn_by_turn = [sum(costs[k::2]) for k in (0, 1)]
    assert max(turn_by_turn) / min(turn_by_turn) > 10  # what round-robin would have done
