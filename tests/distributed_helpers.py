"""Spawning real 2-process gloo groups for the distributed tests, with a kill deadline.

A test module that is also a rank script (``python tests/test_x.py SCENARIO RANK WORLD STORE OUT``) calls
:func:`rank_main` with its scenarios when run as a script; its tests call :func:`launch`, which starts the
ranks with subprocess (FileStore rendezvous, OMP_NUM_THREADS=1), kills them past ``deadline`` (a hang fails
the test instead of stalling it) and returns each rank's record, written to ``OUT/rank<R>.json``.
:func:`child_env` is also the environment of a ``python -m torch.distributed.run ... circuits.py`` test.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GROUP_TIMEOUT = 15  # seconds: the children's process-group timeout


def child_env(**extra: str) -> dict:
    """The environment of a spawned rank or torchrun: one thread, the repository on the path, no WORLD_SIZE."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT),
           "MINIGPT2_DIST_TIMEOUT": str(GROUP_TIMEOUT),
           "NLTK_DATA": os.environ.get("NLTK_DATA", "/work/shared/nltk_data"), **extra}
    env.pop("WORLD_SIZE", None)
    return env


def launch(script: str | Path, scenario: str, tmp_path: Path, world: int = 2,
           deadline: float = 90) -> tuple[dict[int, dict], float]:
    """Run ``scenario`` of the rank script ``script`` on ``world`` ranks; each rank's record (absent for a rank
    that died, its output under "log"), and the wall time. pytest.fail when a rank is still running after
    ``deadline`` seconds (all of them are killed)."""
    out = tmp_path / scenario
    out.mkdir()
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), scenario, str(r), str(world), str(out / "store"),
                               str(out)], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - (time.monotonic() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"scenario {scenario!r} hung: its ranks were still running after {deadline} s")
    records = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(world)
               if (out / f"rank{r}.json").exists()}
    for r, rec in records.items():
        rec["log"] = logs[r]
    return records, time.monotonic() - t0


def assert_ok(records: dict[int, dict], world: int = 2) -> None:
    """Every rank finished its scenario without an error (the record and the rank's output otherwise)."""
    for r in range(world):
        assert r in records, f"rank {r} died without a record"
        assert records[r]["status"] == "ok", f"rank {r}: {records[r]}"


def rank_main(scenarios: dict, argv: list[str], logged: frozenset[str] | set[str] = frozenset()) -> None:
    """One rank: join the gloo group (FileStore), run ``scenarios[name](rank, group)`` (the number of checks
    made), write the record (status, checks or the error, elapsed seconds) and leave at once (no teardown
    that could wait on a dead peer). ``argv``: SCENARIO RANK WORLD STORE OUT. The scenarios named in
    ``logged`` log to ``OUT/rank<R>.log`` (minigpt2.distributed.log_to_file)."""
    import torch.distributed as dist

    name, rank, world, store, out = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    if name in logged:
        from minigpt2.distributed import log_to_file

        log_to_file(out)
    t0 = time.monotonic()
    try:
        record = {"status": "ok", "checks": scenarios[name](rank, dist.group.WORLD)}
    except BaseException as e:  # noqa: BLE001  (the parent test judges it)
        import traceback

        record = {"status": "error", "type": type(e).__name__, "message": str(e),
                  "traceback": traceback.format_exc(),
                  "failures": {str(r): m for r, m in getattr(e, "failures", {}).items()}}
    record["elapsed"] = time.monotonic() - t0
    path = Path(out) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").rename(path)
    sys.stdout.flush()
    os._exit(0)
