"""Benchmark: the head search and ACDC in bf16 give exactly the fp32 circuits, on the bundled models.

    python bench/bench_precision.py                    # the four bundled models, the study's settings
    python bench/bench_precision.py --models weights/base --device cuda

For each model: the paper's head search (accuracy, threshold 0.03, relative drop, zero ablation,
100 TPP prompts: the study's default) and ACDC (KL, absolute threshold 0.7, zero ablation, 50
prompts: the study's edge section), each in fp32 and with bf16 matmuls (minigpt2.engine). The
script fails unless every bf16 circuit equals the fp32 one. It prints the times, bf16's measured
error and how many decisions were re-evaluated in fp32.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tpp  # noqa: E402
from circuitlab.acdc import acdc  # noqa: E402
from circuitlab.search import search  # noqa: E402
from circuitlab.task import answer_space_of, build_data, edge_runner, make_metric, to_prompts  # noqa: E402
from minigpt2 import load_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", nargs="+", default=[str(ROOT / "weights" / m) for m in
                                                    ("base", "featherweight", "lightweight", "welterweight")])
parser.add_argument("--search-examples", type=int, default=100)
parser.add_argument("--acdc-examples", type=int, default=50)
parser.add_argument("--acdc-threshold", type=float, default=0.7)
parser.add_argument("--skip-acdc", action="store_true")
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, same = [], True
    for path in args.models:
        model = load_pretrained(path, device=args.device).eval()
        space = answer_space_of([path])
        name = Path(path).name
        batch = tpp.encode_eval(tpp.make_eval_set(args.search_examples, args.seed), space=space)
        prompts, metric = to_prompts(batch), make_metric("accuracy", batch, model)
        s32, t32 = timed(lambda: search(model, prompts, metric, 0.03))
        s16, t16 = timed(lambda: search(model, prompts, metric, 0.03, dtype=torch.bfloat16))
        ok = s16.ablated == s32.ablated
        same &= ok
        rows.append((name, "head search", len(s32.kept_heads), t32, t16, s16.precision["error"],
                     s16.precision["rechecked"], ok))
        print(rows[-1], flush=True)
        if args.skip_acdc:
            continue
        find, _ = build_data(args.acdc_examples, args.seed, "zero", space)
        r32 = edge_runner(model, find, None, "zero")
        r16 = edge_runner(model, find, None, "zero", dtype=torch.bfloat16)
        kl = make_metric("kl", find, clean_logits=r32.clean.logits)
        a32, t32 = timed(lambda: acdc(r32, kl, args.acdc_threshold))
        a16, t16 = timed(lambda: acdc(r16, kl, args.acdc_threshold))
        ok = torch.equal(a16.circuit.edges, a32.circuit.edges)
        same &= ok
        p = a16.circuit.info["precision"]
        rows.append((name, "ACDC", a32.circuit.n_edges, t32, t16, p["error"], p["rechecked"], ok))
        print(rows[-1], flush=True)
    print("\n| model | method | circuit size (fp32) | fp32 s | bf16 s | bf16 error | re-checked in fp32 | same circuit |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method, size, t32, t16, err, n, ok in rows:
        print(f"| {name} | {method} | {size} | {t32:.1f} | {t16:.1f} | {err:.2g} | {n} | {'yes' if ok else 'NO'} |")
    print(f"\ntorch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
