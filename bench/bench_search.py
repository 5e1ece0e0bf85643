"""Benchmark: the paper's greedy circuit search, fast (circuitlab.search.search) against the
plain loop of one hooked forward per check (circuitlab.search.search_reference).

    python bench/bench_search.py                          # a bundled model if present, else random
    python bench/bench_search.py --model weights/lightweight --metric accuracy --threads 2
    python bench/bench_search.py --preset gpt2 --metric kl --examples 3000 --device cuda --dtype bf16 \
        --skip-reference --speculate 8

Both must find the same circuit; the script fails otherwise (with --dtype bf16, whose decisions
may differ from fp32 ones, it only reports it). Times are wall-clock and process CPU seconds
(CPU time is the steadier figure on a shared machine). --preset gpt2 searches a random model of
GPT-2 small's shape; --tiny a 2-layer one (to check the script); --skip-reference times the fast
search alone. :func:`main` returns the figures (bench/device_suite.py reads them).
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
from circuitlab.search import search, search_reference  # noqa: E402
from circuitlab.task import answer_space_of, make_metric, to_prompts  # noqa: E402
from minigpt2 import GPT2, GPT2Config, load_pretrained  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="model directory (default: weights/lightweight if present, "
                    "else a random 12x12 model of the bundled width)")
parser.add_argument("--metric", default="accuracy", choices=["accuracy", "logit_diff", "loss", "kl"])
parser.add_argument("--threshold", type=float, default=0.03)
parser.add_argument("--drop", default=None, choices=["relative", "absolute"], help="default: relative (absolute for kl)")
parser.add_argument("--order", default="layer-up", choices=["layer-up", "layer-down"])
parser.add_argument("--ablation", default="zero", choices=["zero", "mean", "resample"])
parser.add_argument("--examples", type=int, default=100, help="examples per check (the paper: 100)")
parser.add_argument("--speculate", type=int, nargs="+", default=[1, 4], help="speculation depths to time")
parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--preset", default=None, help="a random model of this shape (gpt2: GPT-2 small) instead of --model")
parser.add_argument("--tiny", action="store_true", help="a random 2-layer, 2-head, d_model 32 model (checks the script)")
parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the fast search's matmuls")
parser.add_argument("--skip-reference", action="store_true", help="time the fast search only")


def timed(fn, device="cpu"):
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, time.perf_counter() - w, time.process_time() - c


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    bundled = "weights/lightweight" if Path("weights/lightweight/config.json").exists() else None
    path = None if (args.tiny or args.preset) else (args.model or bundled)
    if path:
        model, what = load_pretrained(path, device=dev), path
    else:
        torch.manual_seed(args.seed)
        cfg = (GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=64) if args.tiny
               else GPT2Config.preset(args.preset) if args.preset
               else GPT2Config(n_layer=12, n_head=12, d_model=96, d_mlp=384, n_ctx=128))
        model = GPT2(cfg).eval()
        model.init_weights(seed=args.seed)
        model.to(dev)
        what = (f"random {cfg.n_layer}x{cfg.n_head}, d_model {cfg.d_model}"
                + ("" if args.tiny or args.preset else " (no bundled model found)"))
    space = answer_space_of([path]) if path else "prompt"  # the model's finetuning format
    batch = tpp.encode_eval(tpp.make_eval_set(n=args.examples, seed=args.seed), space=space)
    prompts, metric = to_prompts(batch, args.ablation, args.seed), make_metric(args.metric, batch, model)
    drop = args.drop or ("absolute" if args.metric == "kl" else "relative")
    kw = dict(threshold=args.threshold, order=args.order, drop=drop)
    fast_kw = kw | ({} if dtype is None else {"dtype": dtype})
    print(f"model: {what}; {args.examples} prompts (T={batch.tokens.shape[1]}), metric {args.metric}, "
          f"{drop} drop < {args.threshold}, {args.order}, {args.ablation} ablation; torch {torch.__version__}, "
          f"{args.threads} threads, {dev}, fast search {args.dtype}")
    figures = {"dtype": args.dtype, "device": str(dev), "examples": args.examples, "runs": {}}
    ref = None
    if not args.skip_reference:
        ref, w0, c0 = timed(lambda: search_reference(model, prompts, metric, **kw), dev)
        figures["reference"] = {"wall_s": w0, "cpu_s": c0, "forwards": ref.variants_evaluated,
                                "heads_ablated": len(ref.ablated)}
        print(f"{'plain loop (search_reference)':34s} {w0:8.1f} s wall {c0:8.1f} s CPU  {ref.variants_evaluated:4d} "
              f"forwards  -> {len(ref.ablated)} heads ablated")
    elif dev.type == "cuda":
        search(model, to_prompts(batch.select(slice(0, 4)), args.ablation, args.seed),
               make_metric(args.metric, batch.select(slice(0, 4)), model), speculate=1, **fast_kw)  # warm-up
    for s in args.speculate:
        fast, w, c = timed(lambda: search(model, prompts, metric, speculate=s, **fast_kw), dev)
        run = {"wall_s": w, "cpu_s": c, "variants": fast.variants_evaluated, "heads_ablated": len(fast.ablated)}
        line = (f"{f'search, speculate={s}':34s} {w:8.1f} s wall {c:8.1f} s CPU  {fast.variants_evaluated:4d} variants"
                f"  -> {len(fast.ablated)} heads ablated")
        if ref is not None:
            same = fast.ablated == ref.ablated
            run |= {"same_circuit": same, "speedup_wall": w0 / w}
            line += f"; same circuit: {same}; x{w0 / w:.2f} wall, x{c0 / c:.2f} CPU"
        print(line)
        figures["runs"][str(s)] = run
        if ref is not None and not run["same_circuit"] and dtype is None:
            sys.exit("the fast search found another circuit than the plain loop")
    return figures


if __name__ == "__main__":
    main()
