"""All single-head zero-ablations of a GPT-2 small-size model: one batched call vs a hook loop.

    python bench/bench_head_masks.py [--prompts 100] [--seq 24] [--repeats 3]

Both paths evaluate the clean run plus the 144 single-head ablations on the same
prompts and reduce them to the same per-example metric (log-probability of a
target token at the last position), so the comparison is apples to apples and
the [145, 100, 50257] logits never have to exist at once. Prints the median of
``--repeats`` timings of each, their ratio, the largest difference between the
two results, and the batched path's achieved GFLOP/s against a matmul roof
measured on the spot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2.masking import run_with_head_masks_loop, single_head_masks  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompts", type=int, default=100, help="examples per variant")
parser.add_argument("--seq", type=int, default=24, help="tokens per prompt")
parser.add_argument("--repeats", type=int, default=3, help="timings per path; the median is reported")
parser.add_argument("--preset", default="gpt2", help="model shape (random weights)")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = parser.parse_args()


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


def matmul_roof(n: int = 1536, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config.preset(args.preset)
    model = GPT2(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (args.prompts, args.seq))
    target = torch.randint(0, cfg.vocab_size, (args.prompts,))
    masks = single_head_masks(cfg.n_layer, cfg.n_head)  # [1 + L*H, L, H], clean first

    def metric(logits):  # [V, B, vocab] -> [V, B]
        return logits.log_softmax(-1).gather(-1, target.expand(logits.shape[0], -1)[..., None])[..., 0]

    with torch.no_grad():
        t_batch, batched = timed(lambda: model.run_with_head_masks(tokens, masks, metric=metric), args.repeats)
        t_loop, looped = timed(lambda: run_with_head_masks_loop(model, tokens, masks, metric=metric), args.repeats)
    roof = matmul_roof()
    work = batched_flops(cfg, masks, args.prompts, args.seq)
    gflops = work / t_batch / 1e9
    print(f"model {args.preset} ({cfg.n_layer}x{cfg.n_head}, d_model {cfg.d_model}), {args.prompts} prompts x {args.seq} tokens, "
          f"{masks.shape[0]} variants (clean + {masks.shape[0] - 1} single-head zero-ablations), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"batched run_with_head_masks : {t_batch:8.2f} s (median of {args.repeats})")
    print(f"one forward per variant     : {t_loop:8.2f} s (median of {args.repeats})")
    print(f"speed-up                    : {t_loop / t_batch:8.2f} x")
    print(f"work ratio (FLOPs loop/batch): {loop_flops(cfg, masks.shape[0], args.prompts, args.seq) / work:8.2f} x "
          "(the speed-up if both ran at the same FLOP rate)")
    print(f"max |batched - loop|        : {(batched - looped).abs().max().item():.2e} (log-prob of the target token)")
    print(f"batched achieved            : {gflops:8.1f} GFLOP/s; matmul roof {roof:.1f} GFLOP/s ({100 * gflops / roof:.0f} %)")


if __name__ == "__main__":
    main()
