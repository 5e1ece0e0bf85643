"""ACDC and EAP on a GPT-2 small-size model (random weights): fast schedules against plain ones.

    python bench/bench_acdc.py [--receivers logits,m11] [--full] [--examples 4] [--seq 8]

1. ACDC (KL to the clean model, resample ablation) with the batched speculative schedule
   against the plain one-edge-per-forward schedule, on the same prompts: wall times,
   forward passes, metric evaluations, and whether the two circuits are identical. Both
   decide only the edges into ``--receivers`` (default: the logits and the last MLP, 313
   edges), because the plain schedule needs one forward per edge: hours for the full
   graph's 32,491 edges on a CPU. ``--full`` adds the batched schedule on the full graph,
   with the plain schedule's time estimated as (edges it would evaluate) x (one forward);
   ``--full-naive`` runs the plain one there too.
2. Head attribution (EAP, EAP-IG) against the exact single-head sweep (the clean run and
   144 ablations by minigpt2's batched head masking), for two metrics: KL to the clean
   model, whose gradient vanishes at the clean input (so EAP cannot rank heads by it, while
   EAP-IG can), and a logit difference between two fixed tokens: wall times, Spearman's rho.
3. Edge attribution: EAP and EAP-IG over all edges, in plain edge-graph forwards.

Attribution timings are the median of ``--repeats`` runs; ACDC's and the exact sweep's are single runs.
Each time is printed as wall seconds and the process's CPU seconds; on a shared machine run
with ``--threads 1`` and compare CPU times, which other jobs disturb far less.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from circuitlab.acdc import acdc, kl_metric  # noqa: E402
from circuitlab.compare import exact_head_effects, spearman  # noqa: E402
from circuitlab.eap import edge_attribution, head_attribution  # noqa: E402
from circuitlab.graph import EdgeRunner  # noqa: E402
from minigpt2 import GPT2, GPT2Config  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("model")
g.add_argument("--preset", default="gpt2", help="model shape (random weights, GPT-2's initialisation)")
g.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
g = parser.add_argument_group("ACDC")
g.add_argument("--examples", type=int, default=4, help="prompts ACDC runs on")
g.add_argument("--seq", type=int, default=8, help="tokens per prompt")
g.add_argument("--receivers", default="logits,m11", help="comma-separated receivers whose incoming edges both "
                                                          "schedules decide")
g.add_argument("--threshold", type=float, default=1e-3, help="absolute KL threshold")
g.add_argument("--full", action="store_true", help="also run the batched schedule on every edge (the plain "
                                                 "schedule's time is estimated)")
g.add_argument("--full-naive", action="store_true", help="also run both schedules on every edge (slow)")
g.add_argument("--skip-acdc", action="store_true", help="only the attribution benchmarks")
g = parser.add_argument_group("attribution")
g.add_argument("--attr-examples", type=int, default=8, help="prompts of the attribution benchmarks")
g.add_argument("--attr-seq", type=int, default=12, help="tokens per prompt")
g.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
g.add_argument("--repeats", type=int, default=3, help="timings per attribution method (the exact sweep: one); "
                                                     "the median is reported")
g = parser.add_argument_group("machine")
g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = parser.parse_args()


class Seconds(float):
    """Wall seconds that also carry the process's CPU seconds (``.cpu``): on a shared machine
    CPU time moves less than wall time when other jobs take the cores."""

    cpu: float = 0.0

    def __str__(self) -> str:
        return f"{float(self):.2f} s (cpu {self.cpu:.2f} s)"


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t, time.process_time() - c))
    wall, cpu = sorted(times)[len(times) // 2]
    s = Seconds(wall)
    s.cpu = cpu
    return s, out


def matmul_roof(n: int = 1536) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b)[0] for _ in range(5)) / 1e9


def prompts(cfg: GPT2Config, B: int, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=gen),
            torch.randint(0, cfg.vocab_size, (B, T), generator=gen))


def ratio(slow: Seconds, fast: Seconds) -> str:
    return f"{slow / fast:.1f}x (cpu {slow.cpu / fast.cpu:.1f}x)"


def bench_acdc(model: GPT2, cfg: GPT2Config) -> None:
    tokens, corrupted = prompts(cfg, args.examples, args.seq, args.seed)
    t_setup, run = timed(lambda: EdgeRunner(model, tokens, "resample", corrupted=corrupted))
    g = run.graph
    metric = kl_metric(run.clean.logits)
    with torch.no_grad():
        t_trace, _ = timed(lambda: run.trace(run.clean.mask), 5)
    print(f"\nACDC on {args.examples} prompts x {args.seq} tokens, KL threshold {args.threshold}, resample ablation")
    print(f"  edge graph: {g.n_senders} senders, {g.n_receivers} receivers, {g.n_edges} edges; setup (clean and "
          f"corrupted runs) {t_setup}; one plain edge-graph forward {t_trace}")

    def compare(receivers, label):
        fast_t, fast = timed(lambda: acdc(run, metric, args.threshold, receivers=receivers))
        naive_t, naive = timed(lambda: acdc(run, metric, args.threshold, receivers=receivers, batched=False))
        rows = list(range(g.n_receivers)) if receivers is None else [g.receiver_index(r) for r in receivers]
        print(f"  deciding the {int(g.valid[rows].sum())} edges into {label}:")
        for name, t, res in (("batched speculative", fast_t, fast), ("one edge per forward", naive_t, naive)):
            print(f"    {name:21s} {str(t):28s} {res.n_passes:5d} passes {res.n_evaluated:5d} evaluations -> "
                  f"{int(res.circuit.edges[rows].sum())} kept, KL {res.metric_final:.4g}")
        same = bool(torch.equal(fast.circuit.edges, naive.circuit.edges))
        print(f"    speedup {ratio(naive_t, fast_t)}; same circuit: {same}")
        return fast

    compare(args.receivers.split(","), args.receivers)
    if args.full_naive:
        full = compare(None, "every receiver")
    elif args.full:
        full_t, full = timed(lambda: acdc(run, metric, args.threshold))
        evaluated = sum(1 for entry in full.log if not entry["skipped"])
        print(f"  full graph ({g.n_edges} edges), batched speculative: {full_t}, {full.n_passes} passes, "
              f"{full.n_evaluated} evaluations")
        est = Seconds(evaluated * t_trace)
        est.cpu = evaluated * t_trace.cpu
        print(f"  full graph, one edge per forward, estimated: {evaluated} edges evaluated x one forward = {est}; "
              f"speedup {ratio(est, full_t)}")
    if args.full or args.full_naive:
        counts = full.circuit.node_counts()
        print(f"  full-graph circuit: {counts['edges']} edges, {counts['heads']} heads, {counts['mlps']} MLPs, "
              f"{counts['nodes']} nodes ({counts['acdc_nodes']} ACDC hook nodes), KL {full.metric_final:.4g}")


def bench_attribution(model: GPT2, cfg: GPT2Config) -> None:
    tokens, corrupted = prompts(cfg, args.attr_examples, args.attr_seq, args.seed + 1)
    kw = dict(ablation="resample", corrupted=corrupted)
    with torch.no_grad():
        clean = model(tokens)[:, -1]
    rows = torch.arange(len(tokens))
    a, b = clean[0].argmax().item(), clean[0].argmin().item()
    metrics = {"KL": kl_metric(clean), "logit diff": lambda logits: (logits[..., rows, a] - logits[..., rows, b]).mean(-1)}
    H = cfg.n_layer * cfg.n_head
    print(f"\nhead attribution ({H} heads) on {args.attr_examples} prompts x {args.attr_seq} tokens, resample ablation")
    for name, metric in metrics.items():
        t_exact, exact = timed(lambda: exact_head_effects(model, tokens, metric, **kw))
        print(f"  {name}: exact sweep (1 + {H} variants, batched) {t_exact}")
        for method in ("eap", "eap-ig"):
            t, s = timed(lambda: head_attribution(model, tokens, metric, method, args.steps, **kw), args.repeats)
            steps = "" if method == "eap" else f" ({args.steps} steps)"
            print(f"    {method + steps:16s} {str(t):28s} faster by {ratio(t_exact, t)}; Spearman rho vs exact "
                  f"{spearman(s, exact):+.3f}")
    run = EdgeRunner(model, tokens, "resample", corrupted=corrupted)
    with torch.no_grad():
        t_trace, _ = timed(lambda: run.trace(run.clean.mask), args.repeats)
    print(f"edge attribution ({run.graph.n_edges} edges), logit diff; one plain edge-graph forward {t_trace}")
    for method in ("eap", "eap-ig"):
        t, _ = timed(lambda: edge_attribution(run, metrics["logit diff"], method, args.steps), args.repeats)
        steps = "" if method == "eap" else f" ({args.steps} steps)"
        print(f"    {method + steps:16s} {str(t):28s} = {t / t_trace:.1f} plain forwards (cpu {t.cpu / t_trace.cpu:.1f})")


def main():
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GPT2Config.preset(args.preset)
    model = GPT2(cfg).eval()
    model.init_weights(seed=args.seed)
    print(f"model {args.preset}: {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.d_model}, random weights; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul roof {matmul_roof():.0f} GFLOP/s")
    if not args.skip_acdc:
        bench_acdc(model, cfg)
    bench_attribution(model, cfg)


if __name__ == "__main__":
    main()
