"""Peak memory (max RSS) and wall time of each edge command of circuits.py, each in a fresh process.

    python bench/bench_memory.py                                   # acdc and eap with each --method
    python bench/bench_memory.py --commands eap:eap-ig --budgets 256MiB 1GiB --repeats 3
    python bench/bench_memory.py --examples 20 --json /tmp/memory.json

A command is ``acdc`` or ``eap:METHOD``; each runs as ``circuits.py acdc|eap [--method METHOD]
--examples N --no-progress --out TMP`` on the default model (weights/welterweight), and its peak
resident memory is read from the kernel's accounting of that child alone (os.wait4's ru_maxrss).
``--budgets`` runs every command under each MINIGPT2_MEMORY_BUDGET (minigpt2.engine.memory_budget):
1GiB is the CPU default; a smaller one bounds the peak lower (EAP's gradients and the edge runner's
batched variants are both chunked by it); a huge one (1000GiB) takes every batch whole, EAP's
gradients and MIB's variants alike (never with acdc: its batched variants would take tens of GB).
Figures are the median of ``--repeats`` runs (peak memory hardly varies; wall times do on a
shared machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMMANDS = ("acdc", "eap:eap", "eap:eap-ig", "eap:clean-corrupted", "eap:eap-ig-activations")


def command_line(command: str, examples: int, out: Path) -> list[str]:
    name, _, method = command.partition(":")
    if name not in ("acdc", "eap") or (name == "acdc") == bool(method):
        raise SystemExit(f"bench_memory.py: error: --commands {command!r}: give acdc or eap:METHOD (e.g. eap:eap-ig)")
    argv = [sys.executable, str(ROOT / "circuits.py"), name, "--examples", str(examples), "--no-progress",
            "--out", str(out)]
    return argv + (["--method", method] if method else [])


def measure(argv: list[str], budget: str | None) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one run of ``argv`` in a child process of its own."""
    env = dict(os.environ)
    if budget is not None:
        env["MINIGPT2_MEMORY_BUDGET"] = budget
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
    wall = time.perf_counter() - t0
    err = child.stderr.read().decode(errors="replace")
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"bench_memory.py: error: {' '.join(argv[1:])} failed ({child.returncode}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", nargs="+", default=list(DEFAULT_COMMANDS), help="acdc or eap:METHOD")
    p.add_argument("--examples", type=int, default=50, help="circuits.py's --examples (its default: 50)")
    p.add_argument("--budgets", nargs="+", default=[None], metavar="BYTES",
                   help="MINIGPT2_MEMORY_BUDGET values to run under (default: the environment's, else 1GiB)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args(argv)
    figures = {}
    print(f"{'command':28s} {'budget':>8s} {'peak RSS MB':>12s} {'wall s':>8s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for command in args.commands:
            for budget in args.budgets:
                runs = [measure(command_line(command, args.examples, Path(tmp) / f"run{i}"), budget)
                        for i in range(args.repeats)]
                rss, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                figures[f"{command} {budget or 'default'}"] = {"command": command, "budget": budget,
                                                              "peak_rss_mb": round(rss), "wall_s": round(wall, 1),
                                                              "runs": runs}
                print(f"{command:28s} {budget or 'default':>8s} {rss:12.0f} {wall:8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
