"""All single-head zero-ablations of a GPT-2 small-size model: one batched call vs a hook loop.

    python bench/bench_head_masks.py [--prompts 100] [--seq 24] [--repeats 3]
    python bench/bench_head_masks.py --device cuda --dtype bf16 --prompts 3000 --loop-variants 13 --repeats 1

Both paths evaluate the clean run plus the 144 single-head ablations on the same
prompts and reduce them to the same per-example metric (log-probability of a
target token at the last position), so the comparison is apples to apples and
the [145, 100, 50257] logits never have to exist at once. Prints the median of
``--repeats`` timings of each, their ratio, the largest difference between the
two results, and the batched path's achieved GFLOP/s against a matmul roof
measured on the spot. ``--dtype bf16`` runs the batched path with bf16 matmuls (minigpt2.engine);
the hook loop stays fp32, so the difference printed is then bf16's error. ``--loop-variants K``
times the loop on K variants (the clean run and single-head ablations spread over the layers) and
scales its time to all of them. ``--tiny`` swaps in a 2-layer model to check the script itself.
:func:`main` returns the figures (bench/device_suite.py reads them).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2.masking import run_with_head_masks_loop, single_head_masks  # noqa: E402

TINY = GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=64)  # --tiny: checks the script, measures nothing
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompts", type=int, default=100, help="examples per variant")
parser.add_argument("--seq", type=int, default=24, help="tokens per prompt")
parser.add_argument("--repeats", type=int, default=3, help="timings per path; the median is reported")
parser.add_argument("--preset", default="gpt2", help="model shape (random weights)")
parser.add_argument("--tiny", action="store_true", help="a 2-layer, 2-head, d_model 32 model instead of --preset")
parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the batched path's matmuls")
parser.add_argument("--loop-variants", type=int, default=None,
                    help="time the hook loop on this many variants, scaled to all (default: every variant)")
parser.add_argument("--no-roof", action="store_true", help="skip the matmul roof measurement")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = None  # set by main()


def block_flops(cfg: GPT2Config, T: int, queries: int | None = None, qkv: bool = True) -> float:
    """Multiply-add FLOPs of one block on one sequence of T tokens: keys and values at all T,
    the query, W_O and the MLP at ``queries`` positions (default all T); without ``qkv``, the
    block starts from a given z (W_O and the MLP only)."""
    d, m = cfg.d_model, cfg.d_mlp
    queries = T if queries is None else queries
    tail = 2 * queries * (d * d + 2 * d * m)  # W_O, MLP
    if not qkv:
        return tail
    return 2 * (2 * T + queries) * d * d + 2 * 2 * queries * T * d + tail


def loop_flops(cfg: GPT2Config, V: int, B: int, T: int) -> float:
    """One full forward per variant, logits at one position per row."""
    return V * B * (cfg.n_layer * block_flops(cfg, T) + 2 * cfg.d_model * cfg.vocab_size)


def batched_flops(cfg: GPT2Config, masks: torch.Tensor, B: int, T: int) -> float:
    """What run_with_head_masks executes: the clean run once, then each variant from its first
    ablated layer (W_O and MLP only there), the final layer at the answer position only."""
    L = cfg.n_layer
    differs = (masks != 1).any(dim=2)
    first = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), torch.tensor(L)).tolist()
    total = L * block_flops(cfg, T)  # the clean run
    for l in first:
        if l < L - 1:
            total += block_flops(cfg, T, qkv=False) + (L - 2 - l) * block_flops(cfg, T) + block_flops(cfg, T, queries=1)
        elif l == L - 1:
            total += block_flops(cfg, 1, qkv=False)
    return B * (total + 2 * cfg.d_model * cfg.vocab_size * len(first))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_roof(n: int = 1536, repeats: int = 5, device="cpu", dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def timed(fn, repeats: int, device="cpu"):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def spread(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1, evenly spread, 0 (the clean run) first."""
    return list(range(n)) if k >= n else sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def main(argv=None) -> dict:
    global args
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TINY if args.tiny else GPT2Config.preset(args.preset)
    name = "tiny" if args.tiny else args.preset
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    model = GPT2(cfg).eval().to(dev)
    tokens = torch.randint(0, cfg.vocab_size, (args.prompts, args.seq)).to(dev)
    target = torch.randint(0, cfg.vocab_size, (args.prompts,)).to(dev)
    masks = single_head_masks(cfg.n_layer, cfg.n_head).to(dev)  # [1 + L*H, L, H], clean first
    V = masks.shape[0]
    loop_rows = spread(V, args.loop_variants or V)
    scale = V / len(loop_rows)

    def metric(logits):  # [V, B, vocab] -> [V, B]
        logits = logits.float()
        return logits.log_softmax(-1).gather(-1, target.expand(logits.shape[0], -1)[..., None])[..., 0]

    kw = {} if dtype is None else {"dtype": dtype}
    with torch.no_grad():
        model.run_with_head_masks(tokens, masks[:2], metric=metric, **kw)  # warm-up (kernels, allocator)
        t_batch, batched = timed(lambda: model.run_with_head_masks(tokens, masks, metric=metric, **kw), args.repeats, dev)
        t_loop, looped = timed(lambda: run_with_head_masks_loop(model, tokens, masks[loop_rows], metric=metric),
                               args.repeats, dev)
    t_loop *= scale
    roof = None if args.no_roof else matmul_roof(device=dev, dtype=dtype or torch.float32)
    work = batched_flops(cfg, masks.cpu(), args.prompts, args.seq)
    gflops = work / t_batch / 1e9
    diff = (batched[loop_rows].float() - looped.float()).abs().max().item()
    print(f"model {name} ({cfg.n_layer}x{cfg.n_head}, d_model {cfg.d_model}), {args.prompts} prompts x {args.seq} tokens, "
          f"{V} variants (clean + {V - 1} single-head zero-ablations), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {dev}, batched path {args.dtype}")
    print(f"batched run_with_head_masks : {t_batch:8.2f} s (median of {args.repeats})")
    print(f"one forward per variant     : {t_loop:8.2f} s (median of {args.repeats}"
          + (f"; {len(loop_rows)} variants, x{scale:.3g})" if scale != 1 else ")"))
    print(f"speed-up                    : {t_loop / t_batch:8.2f} x")
    print(f"work ratio (FLOPs loop/batch): {loop_flops(cfg, V, args.prompts, args.seq) / work:8.2f} x "
          "(the speed-up if both ran at the same FLOP rate)")
    print(f"max |batched - loop|        : {diff:.2e} (log-prob of the target token"
          + ("; bf16 batched against the fp32 loop)" if dtype else ")"))
    print(f"batched achieved            : {gflops:8.1f} GFLOP/s"
          + (f"; matmul roof {roof:.1f} GFLOP/s ({100 * gflops / roof:.0f} %)" if roof else ""))
    return {"batched_s": t_batch, "loop_s": t_loop, "speedup": t_loop / t_batch, "max_abs_diff": diff,
            "gflops": gflops, "roof_gflops": roof, "variants": V, "prompts": args.prompts, "dtype": args.dtype,
            "device": str(dev)}


if __name__ == "__main__":
    main()
