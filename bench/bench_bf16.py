"""Benchmark: bf16 against fp32 on this CPU (issue 27): matmul rates, a profile, the head-mask sweep.

    python bench/bench_bf16.py matmul [--threads 1 2]            # GFLOP/s, fp32 vs bf16, GPT-2 small and d_model 144
    python bench/bench_bf16.py profile [--prompts 16 --seq 20]   # torch.profiler of the sweep, fp32 and bf16
    python bench/bench_bf16.py sweep [--repeats 3]               # the 144-head sweep, fp32 vs bf16, interleaved medians

``matmul`` times ``x @ W.T`` (F.linear) with fp32 operands and with bf16 operands (bf16 weights cast
once, as autocast's cache keeps the model's parameters within a run) at GPT-2 small's shapes (768 x 3072 MLP, 768 x
2304 qkv, the attention bmm) and at the bundled models' (d_model 144, d_mlp 576): the bf16/fp32 ratio
of those rates is the ceiling on any bf16/fp32 ratio of a whole sweep. ``sweep`` runs
minigpt2.masking.run_with_head_masks on a random GPT-2-small-shaped model (the 144 single-head masks)
in fp32 and in bf16, interleaved, and prints each one's median, their ratio and the effects' Spearman
correlation. Timings on a shared machine are indicative: compare ratios within one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2.masking import run_with_head_masks, single_head_masks  # noqa: E402

# (name, rows, in, out): a linear layer's shapes; rows = prompts x tokens of a sweep chunk
LINEARS = [("gpt2 mlp in 768x3072", 2048, 768, 3072), ("gpt2 mlp out 3072x768", 2048, 3072, 768),
           ("gpt2 qkv 768x2304", 2048, 768, 2304), ("gpt2 W_O 768x768", 2048, 768, 768),
           ("d144 mlp in 144x576", 2048, 144, 576), ("d144 mlp out 576x144", 2048, 576, 144),
           ("d144 qkv 144x432", 2048, 144, 432)]
# (name, batch x heads, q, k, d_head): attention's score bmm
BMMS = [("gpt2 attn bmm 20x64x20", 2048 // 20 * 12, 20, 20, 64), ("d144 attn bmm 20x36x20", 2048 // 20 * 4, 20, 20, 36)]


def best_seconds(fn, budget: float = 0.6, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timings, each as many calls as fill ``budget`` seconds."""
    fn()
    t = time.perf_counter()
    fn()
    n = max(1, int(budget / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def linear_rate(rows: int, d_in: int, d_out: int, dtype: torch.dtype) -> float:
    """GFLOP/s of F.linear [rows, d_in] x [d_out, d_in]^T in ``dtype`` (weights already in it)."""
    x, w = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
    return 2 * rows * d_in * d_out / best_seconds(lambda: F.linear(x, w)) / 1e9


def bmm_rate(n: int, q: int, k: int, d: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, q, d, dtype=dtype), torch.randn(n, d, k, dtype=dtype)
    return 2 * n * q * k * d / best_seconds(lambda: torch.bmm(a, b)) / 1e9


def matmul(args) -> None:
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}")
    print("| shape (rows x in x out) | threads | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, rows, d_in, d_out in LINEARS:
            f, b = linear_rate(rows, d_in, d_out, torch.float32), linear_rate(rows, d_in, d_out, torch.bfloat16)
            print(f"| {name} ({rows} x {d_in} x {d_out}) | {threads} | {f:.0f} | {b:.0f} | {b / f:.2f} |")
        for name, n, q, k, d in BMMS:
            f, b = bmm_rate(n, q, k, d, torch.float32), bmm_rate(n, q, k, d, torch.bfloat16)
            print(f"| {name} ({n} x {q} x {d} x {k}) | {threads} | {f:.0f} | {b:.0f} | {b / f:.2f} |")


def sweep_setup(args):
    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, d_mlp=4 * args.d_model,
                     n_ctx=64, vocab_size=args.vocab)
    model = GPT2(cfg).eval()
    tokens = torch.randint(0, args.vocab, (args.prompts, args.seq))
    return model, tokens, single_head_masks(cfg.n_layer, cfg.n_head)


def sweep_once(model, tokens, masks, dtype):
    t = time.perf_counter()
    with torch.no_grad():
        out = run_with_head_masks(model, tokens, masks, dtype=dtype)
    return out, time.perf_counter() - t


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.set_num_threads(args.threads[0])
    model, tokens, masks = sweep_setup(args)
    for dtype in (None, torch.bfloat16):
        sweep_once(model, tokens, masks[:3], dtype)  # warm up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            _, seconds = sweep_once(model, tokens, masks, dtype)
        print(f"\n### {'bf16' if dtype else 'fp32'}: {seconds:.2f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def sweep(args) -> None:
    from circuitlab.compare import spearman
    torch.set_num_threads(args.threads[0])
    model, tokens, masks = sweep_setup(args)
    times = {"fp32": [], "bf16": []}
    outs = {}
    for _ in range(args.repeats):  # interleaved: the machine's load falls on both alike
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            outs[name], seconds = sweep_once(model, tokens, masks, dtype)
            times[name].append(seconds)
    with torch.no_grad():
        clean = model(tokens)[:, -1].log_softmax(-1)
    effects = {k: (clean - v.float().log_softmax(-1)).abs().mean(dim=(1, 2)) for k, v in outs.items()}
    rho = spearman(effects["fp32"], effects["bf16"])
    f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{args.prompts} prompts x {args.seq} tokens, {len(masks)} masks, d_model {args.d_model}, "
          f"{args.threads[0]} threads")
    print(f"fp32 {[round(t, 2) for t in times['fp32']]} median {f:.2f} s")
    print(f"bf16 {[round(t, 2) for t in times['bf16']]} median {b:.2f} s")
    pairs = sorted(x / y for x, y in zip(times["fp32"], times["bf16"]))
    print(f"fp32 / bf16 of each interleaved pair {[round(r, 2) for r in pairs]}, "
          f"median {statistics.median(pairs):.2f}x; "
          f"fastest / fastest {min(times['fp32']) / min(times['bf16']):.2f}x")
    diff = (outs["fp32"].log_softmax(-1) - outs["bf16"].float().log_softmax(-1)).abs().max()
    print(f"bf16 speed-up {f / b:.2f}x (medians); head effects' Spearman {rho:.4f}; max |log-prob diff| {diff:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("matmul", "profile", "sweep"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seq", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="profile: the table's rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"matmul": matmul, "profile": profile, "sweep": sweep}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
