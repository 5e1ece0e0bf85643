"""Benchmark: every edge method on the bundled models, scored as MIB scores them (CPR, CMD, seconds).

    python bench/bench_mib_methods.py                          # the four bundled models, all eight methods
    python bench/bench_mib_methods.py --methods eap eap-ig --examples 16 --out reports/mib_bench

This is the study's MIB section (circuitlab.study.mib_section) with every method of
circuitlab.methods.EDGE_METHODS: scores from ``--examples`` TPP prompts, MIB's faithfulness curve
of each method's top 0.1 % ... 100 % of edges on as many held-out prompts, resample ablation with
corrupted partners and the logit difference (MIB's defaults). It writes mib.md, mib.json and one PNG
of curves per model to ``--out`` and prints the table; the seconds are each method's own time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuitlab.methods import EDGE_METHODS, check_methods  # noqa: E402
from circuitlab.study import EdgeOptions, Session, mib_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", nargs="+", default=[str(ROOT / "weights" / m) for m in
                                                    ("base", "featherweight", "lightweight", "welterweight")])
parser.add_argument("--methods", nargs="+", default=list(EDGE_METHODS), metavar="METHOD")
parser.add_argument("--examples", type=int, default=16, help="prompts to score on, as many held out (default 16)")
parser.add_argument("--out", default=None, help="report directory (default: a temporary one, printed only)")
parser.add_argument("--device", default=None)
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    check_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session(args.models, seed=args.seed, device=args.device)
    opts = EdgeOptions(mib_methods=tuple(args.methods), mib_examples=args.examples)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        section = mib_section(session, out, opts)
        print((out / "mib.md").read_text())
    print(f"\n{section.summary}; {time.perf_counter() - t:.0f} s in all, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
