"""Benchmark: the paper's greedy circuit search, fast (circuitlab.search.search) against the
plain loop of one hooked forward per check (circuitlab.search.search_reference).

    python bench/bench_search.py                          # a bundled model if present, else random
    python bench/bench_search.py --model weights/lightweight --metric accuracy --threads 2

Both must find the same circuit; the script fails otherwise. Times are wall-clock and
process CPU seconds (CPU time is the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tpp  # noqa: E402
from circuitlab.search import search, search_reference  # noqa: E402
from circuitlab.study import answer_space_of, make_metric, to_prompts  # noqa: E402
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


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or ("weights/lightweight" if Path("weights/lightweight/config.json").exists() else None)
    if path:
        model, what = load_pretrained(path), path
    else:
        torch.manual_seed(args.seed)
        model = GPT2(GPT2Config(n_layer=12, n_head=12, d_model=96, d_mlp=384, n_ctx=128)).eval()
        what = "random 12x12, d_model 96 (no bundled model found)"
    space = answer_space_of([path]) if path else "prompt"  # the model's finetuning format
    batch = tpp.encode_eval(tpp.make_eval_set(n=args.examples, seed=args.seed), space=space)
    prompts, metric = to_prompts(batch, args.ablation, args.seed), make_metric(args.metric, batch, model)
    drop = args.drop or ("absolute" if args.metric == "kl" else "relative")
    kw = dict(threshold=args.threshold, order=args.order, drop=drop)
    print(f"model: {what}; {args.examples} prompts (T={batch.tokens.shape[1]}), metric {args.metric}, "
          f"{drop} drop < {args.threshold}, {args.order}, {args.ablation} ablation; torch {torch.__version__}, "
          f"{args.threads} threads")
    ref, w0, c0 = timed(lambda: search_reference(model, prompts, metric, **kw))
    print(f"{'plain loop (search_reference)':34s} {w0:8.1f} s wall {c0:8.1f} s CPU  {ref.variants_evaluated:4d} forwards"
          f"  -> {len(ref.ablated)} heads ablated")
    for s in args.speculate:
        fast, w, c = timed(lambda: search(model, prompts, metric, speculate=s, **kw))
        same = fast.ablated == ref.ablated
        print(f"{f'search, speculate={s}':34s} {w:8.1f} s wall {c:8.1f} s CPU  {fast.variants_evaluated:4d} variants"
              f"  -> {len(fast.ablated)} heads ablated; same circuit: {same}; x{w0 / w:.2f} wall, x{c0 / c:.2f} CPU")
        if not same:
            sys.exit("the fast search found another circuit than the plain loop")


if __name__ == "__main__":
    main()
