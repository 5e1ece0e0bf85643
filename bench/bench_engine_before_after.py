"""The engine's benches before and after a refactor, alternating, in one table (issue 27: "no speed lost").

    mkdir -p /tmp/before && git -C . archive 91d0331 | tar -x -C /tmp/before
    python bench/bench_engine_before_after.py --before /tmp/before --before-label 91d0331 [--after .] \
        [--repeats 3] [--markdown before_after.md] [--json before_after.json]
    python bench/bench_engine_before_after.py --before /tmp/before --quick      # checks the harness (tiny sizes)

Seven benches, each a script of bench/ at a size where one run takes about 10 seconds (about 8
minutes in all at --repeats 3 on 2 quiet cores, estimated from the benches' FLOPs; each run's process
seconds are printed as it goes): the head-mask call (bench_head_masks.py), the single-head sweep
(bench_sweep.py), the head search (bench_search.py), ACDC's batched schedule and EAP-IG over every
edge (bench_acdc.py), exact edge patching (bench_edge_patching.py --scope strata, on a bundled model:
on GPT-2 small's shapes it takes minutes) and activation patching (bench_patching.py). GPT-2 small's shapes
with random weights wherever the bench has them.

Each run is a fresh subprocess with its cwd and PYTHONPATH the tree under test. It runs the *same*
bench script for both trees (the after tree's, or each tree's own with ``--own-scripts``): the
script's source is executed with ``__file__`` set to ``TREE/bench/NAME.py``, so the script's own
``sys.path.insert(0, <its repository>)`` picks the tree under test, and the run fails unless
minigpt2 and circuitlab were imported from that tree. The script's ``main()`` returns its figures
(bench_patching.py writes them with ``--json``); the harness reads the method's own seconds from
them (not the process's start-up, model building or the reference loops). Runs alternate before,
after, after, before, ... so that a drift of the machine's load falls on both alike; the table gives
each side's median and after / before (below 1: the after tree is faster). A run that fails is a row
that says so, with its error; the harness goes on.

Environment of every run: OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS = --threads, NLTK_DATA (kept if
set, else /work/shared/nltk_data when it exists), MINIGPT2_PROGRESS=0.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs one bench script in the tree under test: argv = TREE SCRIPT RESULT_JSON [bench args...].
RUNNER = r'''
import json, sys, time, types
from pathlib import Path
tree, script, result = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), Path(sys.argv[3])
fake = tree / "bench" / script.name
sys.argv = [str(fake), *sys.argv[4:]]
sys.path.insert(0, str(tree))
module = types.ModuleType("bench_under_test")
module.__file__ = str(fake)
sys.modules["bench_under_test"] = module
exec(compile(script.read_text(), str(fake), "exec"), module.__dict__)
for name in ("minigpt2", "circuitlab"):
    where = Path(sys.modules[name].__file__).resolve() if name in sys.modules else None
    if where is not None and tree not in where.parents:
        sys.exit(f"{name} was imported from {where}, not from the tree under test {tree}")
t = time.perf_counter()
figures = module.main()
json.dump({"figures": figures if isinstance(figures, dict) else None, "main_s": time.perf_counter() - t},
          open(result, "w"), default=str)
'''


@dataclass
class Bench:
    """One row of the table: which script, with which arguments, and where its seconds are in its figures."""

    name: str
    what: str
    script: str
    args: list[str]
    seconds: object  # figures -> seconds of the measured call
    quick_args: list[str] = field(default_factory=list)
    json_flag: bool = False  # the script writes its figures with --json PATH (main returns nothing)


def _sweep_seconds(f: dict) -> float:
    return f["methods"]["minigpt2 batched masking (circuitlab.sweep)"]["wall_s"]


BENCHES = [
    Bench("head masks", "minigpt2 run_with_head_masks: clean + 144 single-head zero-ablations, GPT-2 small shapes, "
          "2 x 16 random tokens, log-prob metric", "bench_head_masks.py",
          ["--prompts", "2", "--seq", "16", "--repeats", "1", "--loop-variants", "1", "--no-roof"],
          lambda f: f["batched_s"], ["--tiny", "--prompts", "2", "--seq", "8", "--repeats", "1", "--loop-variants",
                                     "1", "--no-roof"]),
    Bench("sweep", "circuitlab.sweep.evaluate_masks: 144 heads + clean, GPT-2 small shapes, 2 TPP prompts, "
          "logit difference", "bench_sweep.py", ["--prompts", "2", "--heads", "144", "--skip-loop"],
          _sweep_seconds, ["--tiny", "--prompts", "2", "--skip-loop"]),
    Bench("search", "circuitlab.search.search (speculate 1): GPT-2 small shapes, 2 TPP prompts, KL, absolute 0.002",
          "bench_search.py", ["--preset", "gpt2", "--metric", "kl", "--threshold", "0.002", "--examples", "2",
                              "--speculate", "1", "--skip-reference"],
          lambda f: f["runs"]["1"]["wall_s"], ["--tiny", "--metric", "kl", "--threshold", "0.002", "--examples", "2",
                                               "--speculate", "1", "--skip-reference"]),
    Bench("ACDC", "circuitlab.acdc batched schedule: the 313 edges into logits and m11, GPT-2 small shapes, "
          "4 x 8 tokens, KL 1e-3, resample", "bench_acdc.py",
          ["--examples", "4", "--seq", "8", "--skip-naive", "--skip-attribution"],
          lambda f: f["acdc"]["batched_s"], ["--tiny", "--examples", "2", "--seq", "4", "--receivers", "logits",
                                             "--skip-naive", "--skip-attribution"]),
    Bench("EAP-IG", "circuitlab.eap.edge_attribution eap-ig (5 steps): all 32,491 edges, GPT-2 small shapes, "
          "4 x 12 tokens, logit difference", "bench_acdc.py",
          ["--skip-acdc", "--skip-heads", "--methods", "eap-ig", "--attr-examples", "4", "--attr-seq", "12",
           "--repeats", "1"],
          lambda f: f["attribution"]["edges"]["eap-ig"]["s"],
          ["--tiny", "--skip-acdc", "--skip-heads", "--methods", "eap-ig", "--attr-examples", "2", "--attr-seq", "4",
           "--repeats", "1"]),
    Bench("edge patching", "circuitlab.edge_patching.edge_patching_scores on weights/base (12 x 12, d_model 144), "
          "1 x 8 tokens, resample, logit difference: the edges into one head's q, k, v and the MLP of each layer and "
          "into the logits (3,781 edges), the head part x 12 (the bench's estimate for all 32,491)",
          "bench_edge_patching.py",
          ["--model", "weights/base", "--prompts", "1", "--seq", "8", "--scope", "strata", "--repeats", "1"],
          lambda f: f["batched_s"], ["--tiny", "--prompts", "1", "--seq", "4", "--repeats", "1"]),
    Bench("activation patching", "minigpt2.patching get_act_patch_resid_pre (12 x 8 patches, full logits): "
          "GPT-2 small shapes, 2 x 8 tokens, other random prompts", "bench_patching.py",
          ["--prompts", "2", "--seq", "8", "--functions", "resid_pre", "--tl-patches", "1", "--skip-loop"],
          lambda f: f["functions"]["resid_pre"]["minigpt2"]["wall_s"],
          ["--prompts", "1", "--seq", "3", "--functions", "resid_pre", "--tl-patches", "1", "--skip-loop"],
          json_flag=True),
]


def run_env(tree: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(tree), MINIGPT2_PROGRESS="0")
    if "NLTK_DATA" not in env and Path("/work/shared/nltk_data").is_dir():
        env["NLTK_DATA"] = "/work/shared/nltk_data"
    return env


def run_once(bench: Bench, tree: Path, script: Path, args, tmp: Path) -> dict:
    """One subprocess run of ``bench`` on ``tree``: {"s": the method's seconds, "process_s", ...} or {"error"}."""
    result = tmp / "result.json"
    figures_json = tmp / "figures.json"
    result.unlink(missing_ok=True)
    figures_json.unlink(missing_ok=True)
    bench_args = (bench.quick_args if args.quick else bench.args) + ["--threads", str(args.threads)]
    if bench.json_flag:
        bench_args += ["--json", str(figures_json)]
    argv = [sys.executable, "-c", RUNNER, str(tree), str(script), str(result), *bench_args]
    t = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=tree, env=run_env(tree, args.threads), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    process_s = time.perf_counter() - t
    if proc.returncode or not result.exists():
        return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-1500:]}", "process_s": process_s}
    out = json.loads(result.read_text())
    figures = json.loads(figures_json.read_text()) if bench.json_flag else out["figures"]
    try:
        seconds = float(bench.seconds(figures))
    except (KeyError, TypeError) as e:
        return {"error": f"no timing in the bench's figures ({e!r})", "process_s": process_s}
    return {"s": seconds, "main_s": out["main_s"], "process_s": process_s}


def cpu_line() -> str:
    """The CPU's model name, its bf16-related flags and torch's CPU capability."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "").split()
    bf16 = [f for f in flags if "bf16" in f or f.startswith("amx")]
    import torch

    return (f"{name}; bf16 flags: {' '.join(bf16) or 'none'}; torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {len(os.sched_getaffinity(0))} CPUs available")


def tree_label(tree: Path) -> str:
    """The tree's path, with its commit (and '+dirty' when it has uncommitted changes) where it is a git checkout."""
    def git(*argv) -> str:
        out = subprocess.run(["git", "-C", str(tree), *argv], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    if Path(git("rev-parse", "--show-toplevel") or "/nonexistent").resolve() != tree:
        return str(tree)  # not a git checkout (a `git archive`), or a folder inside another one
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{tree} ({git('rev-parse', '--short', 'HEAD')}{'+dirty' if dirty else ''})"


def command_of(bench: Bench, args) -> str:
    extra = (bench.quick_args if args.quick else bench.args) + ["--threads", str(args.threads)]
    return " ".join(["python", f"bench/{bench.script}", *extra] + (["--json", "OUT"] if bench.json_flag else []))


def cell(runs: list[dict]) -> tuple[float | None, str]:
    """(median seconds, the table's text) of one side's runs."""
    ok = [r["s"] for r in runs if "s" in r]
    if not ok:
        return None, "failed"
    median = statistics.median(ok)
    failed = len(runs) - len(ok)
    return median, f"{median:.2f}" + (f" ({failed} failed)" if failed else "")


def markdown(rows: list[dict], args, header: str) -> str:
    lines = [header, "", "| bench | what it measures | before median s | after median s | after / before | command |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        b, b_text = cell(row["runs"]["before"])
        a, a_text = cell(row["runs"]["after"])
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        what = ("(--quick: tiny sizes, not the sizes named here) " if args.quick else "") + row["what"]
        lines.append(f"| {row['bench']} | {what} | {b_text} | {a_text} | {ratio} | `{row['command']}` |")
    errors = [(row["bench"], side, r["error"]) for row in rows for side in ("before", "after")
              for r in row["runs"][side] if "error" in r]
    for bench, side, error in errors:
        lines.append(f"\n{bench}, {side}: {error}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="a checkout of the code before the refactor")
    p.add_argument("--after", type=Path, default=ROOT, help="the code after it (default: this repository)")
    p.add_argument("--before-label", default=None, help="what the table calls the before tree (e.g. its commit, "
                   "which a `git archive` copy cannot tell; default: its path, and its commit in a git checkout)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each bench on each tree (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (--threads of each bench)")
    p.add_argument("--benches", nargs="+", default=[b.name for b in BENCHES], metavar="NAME",
                   help=f"a subset of: {', '.join(repr(b.name) for b in BENCHES)}")
    p.add_argument("--own-scripts", action="store_true",
                   help="run each tree's own bench script (when the after tree's needs what the before tree lacks)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness (measures nothing)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = p.parse_args(argv)
    unknown = sorted(set(args.benches) - {b.name for b in BENCHES})
    if unknown:
        p.error(f"--benches: unknown {unknown}; choose from {[b.name for b in BENCHES]}")
    for side in ("before", "after"):
        tree = getattr(args, side)
        if not (tree / "minigpt2" / "__init__.py").is_file():
            p.error(f"--{side} {tree}: not a checkout of this project (no minigpt2/__init__.py)")
        setattr(args, side, tree.resolve())
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    started = time.perf_counter()
    before = args.before_label or tree_label(args.before)
    header = (f"Before: {before}; after: {tree_label(args.after)}. CPU: {cpu_line()}. {args.threads} threads, "
              f"{args.repeats} runs a side, alternating; load average at start "
              f"{os.getloadavg()[0]:.1f}" + ("; --quick: tiny sizes, measures nothing" if args.quick else ""))
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bench in [b for b in BENCHES if b.name in args.benches]:
            row = {"bench": bench.name, "what": bench.what, "command": command_of(bench, args),
                   "runs": {"before": [], "after": []}}
            for r in range(args.repeats):
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    tree = getattr(args, side)
                    script = (tree if args.own_scripts else args.after) / "bench" / bench.script
                    got = run_once(bench, tree, script, args, Path(tmp))
                    row["runs"][side].append(got)
                    shown = f"{got['s']:.2f} s (process {got['process_s']:.1f} s)" if "s" in got else got["error"]
                    print(f"[{time.perf_counter() - started:6.0f} s] {bench.name}, {side}, run {r + 1}: {shown}",
                          flush=True)
            rows.append(row)
    table = markdown(rows, args, header)
    print("\n" + table + f"\n\nharness: {time.perf_counter() - started:.0f} s in all")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
