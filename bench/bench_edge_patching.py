"""Exact edge patching on GPT-2 small's shapes (random weights): batched against one forward per edge.

    python bench/bench_edge_patching.py [--prompts 4] [--seq 16] [--scope all] [--sample 1] [--repeats 3]
    python bench/bench_edge_patching.py --model weights/base --prompts 1 --seq 16 --repeats 1   # a bundled model

The model has GPT-2 small's shapes (12 layers, 12 heads, d_model 768, d_mlp 3072, vocabulary
50257; GPT-2's initialisation with a fixed seed: the pretrained weights cannot be downloaded
here); ``--prompts`` random prompts of ``--seq`` tokens, resample ablation against as many
random corrupted prompts, and a logit difference at the last position (two fixed tokens, MIB's
kind of metric). Its graph has 32,491 edges.

1. Batched: circuitlab.edge_patching.edge_patching_scores, every edge (``--scope all``), timed
   once; or ``--scope strata``: the edges into one head's q, k and v inputs and into the MLP of
   each layer, and into the logits, timed ``--repeats`` times (median), the head-input part
   scaled by the number of heads (every head of a layer costs the same: one head recomputed,
   then the same blocks).
2. One forward per edge: the plain loop (``plain_edge_patching_scores``: a full
   ``EdgeRunner.trace`` per edge) on a stratified sample, ``--sample`` edges drawn at random in
   each of the 49 strata (the logits; per layer the MLP input and the heads' q, k and v inputs;
   every edge of a stratum costs the same full forward), each timed ``--repeats`` times
   (median); the loop over all edges is estimated as sum over strata of (mean time of the
   stratum's sampled edges) x (edges in the stratum). Also the plain model forward at the answer
   positions (median of ``--repeats``) x 32,491: the cost of the cheapest conceivable forward
   per edge.
3. Equality: the batched scores of the sampled edges against the loop's (max |difference|).

Times are wall seconds and the process's CPU seconds; on the shared development machine run
with ``--threads 1`` (the default) and read the CPU ones. ``--tiny`` checks the script on a
2-layer model in seconds. :func:`main` returns the figures.
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
from circuitlab.edge_patching import edge_patching_scores, plain_edge_patching_scores  # noqa: E402
from circuitlab.graph import EdgeRunner, Graph  # noqa: E402
from minigpt2 import GPT2, GPT2Config, load_pretrained  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompts", type=int, default=4, help="clean prompts (each paired with a corrupted one)")
parser.add_argument("--seq", type=int, default=16, help="tokens per prompt")
parser.add_argument("--scope", choices=("all", "strata"), default="all",
                    help="all: time the batched path on every edge; strata: on one head's inputs and the MLP per "
                         "layer and the logits, scaled (see the docstring)")
parser.add_argument("--sample", type=int, default=1, help="edges per stratum for the one-forward-per-edge loop")
parser.add_argument("--repeats", type=int, default=3, help="timings per measurement (the median is reported; "
                                                           "the all-edges batched run: once)")
parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and sample")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
parser.add_argument("--tiny", action="store_true", help="a 2-layer, 3-head, d_model 48 model (checks the script)")
parser.add_argument("--model", default=None, help="a model directory (e.g. weights/base, a bundled model: every edge "
                                                   "in seconds) instead of GPT-2 small's shapes with random weights")

GPT2_SMALL = GPT2Config(n_layer=12, n_head=12, d_model=768, d_mlp=3072, n_ctx=1024, vocab_size=50257)
TINY = GPT2Config(n_layer=2, n_head=3, d_model=48, d_mlp=96, n_ctx=64, vocab_size=501)


def timed(fn, repeats: int = 1):
    """(median wall seconds, median CPU seconds, the last result) of ``repeats`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def strata(g: Graph) -> dict[str, list[tuple[int, int]]]:
    """The edges by cost class: 'logits', 'm{l}', 'L{l}<q|k|v>' (the q, k or v inputs of layer l's heads)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for r, u in g.valid.nonzero().tolist():
        name = g.receivers[r]
        key = name if "<" not in name else f"L{name[1:].split('.')[0]}{name[-3:]}"
        out.setdefault(key, []).append((r, u))
    return out


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        model = load_pretrained(args.model).eval()
        cfg = model.cfg
    else:
        cfg = TINY if args.tiny else GPT2_SMALL
        model = GPT2(cfg)
        model.init_weights(seed=args.seed)
        model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.prompts, args.seq), generator=gen)
    corrupted = torch.randint(0, cfg.vocab_size, (args.prompts, args.seq), generator=gen)
    t_setup, c_setup, run = timed(lambda: EdgeRunner(model, tokens, "resample", corrupted=corrupted))
    g = run.graph
    clean = run.clean.logits
    a, b = int(clean[0].argmax()), int(clean[0].argmin())

    def metric(logits):  # [V, B, vocab] -> [V]: the logit difference of two fixed tokens
        return (logits[..., a] - logits[..., b]).mean(-1)

    shape = args.model or ("a tiny model" if args.tiny else "GPT-2 small shapes")
    print(f"edge patching: {shape} ({cfg.n_layer} layers x {cfg.n_head} heads, d_model {cfg.d_model}, "
          f"vocab {cfg.vocab_size}), {'its weights' if args.model else 'random weights'}; {args.prompts} prompts x "
          f"{args.seq} tokens, resample ablation, "
          f"logit difference; {g.n_edges} edges; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"  setup (clean and corrupted runs, clean trace): {t_setup:.2f} s (cpu {c_setup:.2f} s)")

    # 2. the loop: one full edge-graph forward per sampled edge
    groups = strata(g)
    pick = torch.Generator().manual_seed(args.seed + 1)
    sample: dict[str, list[tuple[int, int]]] = {}
    for key, edges in groups.items():
        idx = torch.randperm(len(edges), generator=pick)[:args.sample].tolist()
        sample[key] = [edges[i] for i in idx]
    loop_wall = loop_cpu = 0.0
    loop_scores = {}
    for key, edges in sample.items():
        walls, cpus = [], []
        for r, u in edges:
            one = torch.zeros_like(g.valid)
            one[r, u] = True
            w, c, s = timed(lambda: plain_edge_patching_scores(run, metric, edges=one), args.repeats)
            walls.append(w)
            cpus.append(c)
            loop_scores[(r, u)] = float(s[r, u])
        loop_wall += statistics.mean(walls) * len(groups[key])
        loop_cpu += statistics.mean(cpus) * len(groups[key])
    n_sampled = sum(len(v) for v in sample.values())
    with torch.no_grad():
        fw, fc, _ = timed(lambda: model(tokens, positions=run.positions), args.repeats)
    print(f"  one forward per edge (EdgeRunner.trace), from {n_sampled} sampled edges in {len(groups)} strata: "
          f"estimated {loop_wall:.0f} s (cpu {loop_cpu:.0f} s) for all {g.n_edges}")
    print(f"  one plain model forward: {fw * 1e3:.1f} ms (cpu {fc * 1e3:.1f} ms); x {g.n_edges} edges = "
          f"{fw * g.n_edges:.0f} s (cpu {fc * g.n_edges:.0f} s)")

    # 1. batched
    if args.scope == "all":
        bw, bc, scores = timed(lambda: edge_patching_scores(run, metric))
        got = {e: float(scores[e]) for e in loop_scores}
        label = f"all {g.n_edges} edges, one run"
    else:
        bw = bc = 0.0
        got = {}
        H = g.n_head
        for key, edges in groups.items():
            if key.startswith("L"):  # one head's edges, scaled by the number of heads
                h0 = [e for e in edges if (e[0] - g.stages[g.stage_of[e[0]]].rows.start) % H == 0]
                chosen, scale = h0, H
            else:
                chosen, scale = edges, 1
            mask = torch.zeros_like(g.valid)
            for r, u in chosen:
                mask[r, u] = True
            w, c, s = timed(lambda: edge_patching_scores(run, metric, edges=mask), args.repeats)
            bw += w * scale
            bc += c * scale
            got.update({e: float(s[e]) for e in loop_scores if mask[e]})
        for e in loop_scores:  # sampled edges of other heads: scored on their own
            if e not in got:
                one = torch.zeros_like(g.valid)
                one[e] = True
                got[e] = float(edge_patching_scores(run, metric, edges=one)[e])
        label = f"all {g.n_edges} edges, estimated from one head per layer and kind, median of {args.repeats}"
    diff = max(abs(got[e] - loop_scores[e]) for e in loop_scores)
    scale = max(abs(v) for v in loop_scores.values())
    print(f"  batched edge_patching_scores ({label}): {bw:.1f} s (cpu {bc:.1f} s)")
    print(f"  speed-up over one EdgeRunner.trace per edge: {loop_wall / bw:.1f}x (cpu {loop_cpu / bc:.1f}x); "
          f"over one plain model forward per edge: {fw * g.n_edges / bw:.1f}x (cpu {fc * g.n_edges / bc:.1f}x)")
    print(f"  equal results: max |batched - loop| over the {len(loop_scores)} sampled edges {diff:.2e} "
          f"(largest |score| {scale:.3g})")
    # the work: blocks each variant recomputes (a full block at every position = 1; the last block at
    # the answer positions only is counted as 0)
    L = cfg.n_layer
    blocks = sum(len(v) * (L - 1 - g.stages[g.stage_of[v[0][0]]].layer) for k, v in groups.items() if k != "logits")
    print(f"  work: a batched variant recomputes {blocks / g.n_edges:.2f} full blocks on average (a forward: "
          f"{L}), plus its own head or MLP, the last block at the answer positions and the unembedding")
    return {"edges": g.n_edges, "prompts": args.prompts, "seq": args.seq, "scope": args.scope,
            "batched_s": bw, "batched_cpu_s": bc, "loop_s": loop_wall, "loop_cpu_s": loop_cpu,
            "forward_s": fw, "forward_cpu_s": fc, "speedup": loop_wall / bw, "speedup_cpu": loop_cpu / bc,
            "speedup_vs_forward": fw * g.n_edges / bw, "max_abs_diff": diff, "sampled": n_sampled}


if __name__ == "__main__":
    main()
