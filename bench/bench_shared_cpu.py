"""A CPU shared with other work: OpenMP's wait policy, libgomp's default against PASSIVE (the scripts'
and packages' default since minigpt2.threads), alone and beside one other CPU-bound process.

    python bench/bench_shared_cpu.py                          # the sweep, 3 runs a condition
    python bench/bench_shared_cpu.py --repeats 5 --json /tmp/shared.json
    python bench/bench_shared_cpu.py --command "circuits.py eap --examples 20"

1. Idle waiting: a loop of small parallel ops (2 threads) with 2 ms pauses of the main thread:
   the process's CPU seconds show whether the OpenMP workers spin through the pauses.
2. ``circuits.py sweep --models weights/welterweight --examples 40`` (or ``--command``), wall
   seconds under each policy, with nothing else of ours running ("quiet") and beside one
   ``python -c "while True: pass"`` ("busy", killed after the run). Runs go round-robin over the
   conditions, so that a change of the machine's load spreads over all of them; the figures are
   medians, and the ratios compare conditions measured in the same round.

libgomp's default is reproduced with ``OMP_WAIT_POLICY=`` (empty: libgomp ignores it and the
scripts keep any value a user set), PASSIVE with ``OMP_WAIT_POLICY=PASSIVE``. OMP_NUM_THREADS is
removed, so that torch takes its own count (the CPUs available), as a user's run does.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"default": "", "PASSIVE": "PASSIVE"}
IDLE_PROBE = """
import time, torch
x = torch.randn(2_000_000)
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(200):
    (x * 2).sum()
    time.sleep(0.002)
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def env_of(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_WAIT_POLICY"] = POLICIES[policy]
    return env


def idle_probe(policy: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", IDLE_PROBE], env=env_of(policy), capture_output=True, text=True,
                         check=True)
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def timed_run(argv: list[str], policy: str, busy: bool) -> float:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env_of(policy), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--command", default="circuits.py sweep --models weights/welterweight --examples 40",
                   help="the timed command, run from the repository root with --no-progress and a scratch --out")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    figures: dict = {"load_average_at_start": os.getloadavg(), "cpus": len(os.sched_getaffinity(0))}
    print(f"load average at start: {figures['load_average_at_start']}", flush=True)
    for policy in POLICIES:
        wall, cpu = idle_probe(policy)
        figures[f"idle {policy}"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        print(f"idle waiting, {policy:8s}: wall {wall:6.2f} s, CPU {cpu:6.2f} s", flush=True)
    conditions = [(load, policy) for load in ("quiet", "busy") for policy in POLICIES]
    times = {c: [] for c in conditions}
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, *shlex.split(args.command), "--no-progress", "--out"]
        for r in range(args.repeats):
            for load, policy in conditions:
                t = timed_run(base + [str(Path(tmp) / f"{load}-{policy}-{r}")], policy, load == "busy")
                times[(load, policy)].append(t)
                print(f"round {r + 1}: {load:5s} {policy:8s} {t:7.1f} s", flush=True)
    for load in ("quiet", "busy"):
        ratios = [d / q for d, q in zip(times[(load, "default")], times[(load, "PASSIVE")])]
        for policy in POLICIES:
            figures[f"{load} {policy}"] = {"median_s": round(statistics.median(times[(load, policy)]), 1),
                                           "runs": [round(t, 1) for t in times[(load, policy)]]}
        figures[f"{load} default / PASSIVE"] = round(statistics.median(ratios), 2)
        print(f"{load}: default {figures[f'{load} default']['median_s']} s, PASSIVE "
              f"{figures[f'{load} PASSIVE']['median_s']} s (medians of {args.repeats}); default / PASSIVE "
              f"{figures[f'{load} default / PASSIVE']} (median of the rounds' ratios)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
