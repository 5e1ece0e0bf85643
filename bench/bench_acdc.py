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

On a GPU: ``--device cuda`` (times synchronised), ``--dtype bf16`` (the edge runner's matmuls:
minigpt2.engine), ``--skip-naive`` (ACDC's batched schedule alone),
``--skip-heads`` / ``--skip-acdc`` / ``--skip-attribution`` to run one part, ``--methods eap-ig``.
``--tiny`` swaps in a 2-layer model to check the script. :func:`main` returns the figures
(bench/device_suite.py reads them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

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
g.add_argument("--tiny", action="store_true", help="a 2-layer, 2-head, d_model 32 model instead (checks the script)")
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
g.add_argument("--skip-naive", action="store_true", help="time the batched schedule only (no one-edge-per-forward)")
g.add_argument("--skip-acdc", action="store_true", help="only the attribution benchmarks")
g.add_argument("--skip-attribution", action="store_true", help="only the ACDC benchmark")
g = parser.add_argument_group("attribution")
g.add_argument("--attr-examples", type=int, default=8, help="prompts of the attribution benchmarks")
g.add_argument("--attr-seq", type=int, default=12, help="tokens per prompt")
g.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
g.add_argument("--repeats", type=int, default=3, help="timings per attribution method (the exact sweep: one); "
                                                     "the median is reported")
g.add_argument("--skip-heads", action="store_true", help="skip head attribution against the exact sweep")
g.add_argument("--methods", default="eap,eap-ig", help="edge attribution methods, comma-separated")
g = parser.add_argument_group("machine")
g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the edge runner's matmuls")
args = None  # set by main()
FIGURES: dict = {}
TINY = GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=64)


class Seconds(float):
    """Wall seconds that also carry the process's CPU seconds (``.cpu``): on a shared machine
    CPU time moves less than wall time when other jobs take the cores."""

    cpu: float = 0.0

    def __str__(self) -> str:
        return f"{float(self):.2f} s (cpu {self.cpu:.2f} s)"


def sync() -> None:
    if args is not None and torch.device(args.device).type == "cuda":
        torch.cuda.synchronize(args.device)


def dtype_kw() -> dict:
    return {"dtype": torch.bfloat16} if args.dtype == "bf16" else {}


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        times.append((time.perf_counter() - t, time.process_time() - c))
    wall, cpu = sorted(times)[len(times) // 2]
    s = Seconds(wall)
    s.cpu = cpu
    return s, out


def matmul_roof(n: int = 1536) -> float:
    dev, dt = args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b)[0] for _ in range(5)) / 1e9


def prompts(cfg: GPT2Config, B: int, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(args.device),
            torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(args.device))


def ratio(slow: Seconds, fast: Seconds) -> str:
    return f"{slow / fast:.1f}x (cpu {slow.cpu / fast.cpu:.1f}x)"


def bench_acdc(model: GPT2, cfg: GPT2Config) -> None:
    tokens, corrupted = prompts(cfg, args.examples, args.seq, args.seed)
    t_setup, run = timed(lambda: EdgeRunner(model, tokens, "resample", corrupted=corrupted, **dtype_kw()))
    g = run.graph
    metric = kl_metric(run.clean.logits)
    with torch.no_grad():
        t_trace, _ = timed(lambda: run.trace(run.clean.mask), 5)
    print(f"\nACDC on {args.examples} prompts x {args.seq} tokens, KL threshold {args.threshold}, resample ablation, "
          f"{args.dtype}")
    print(f"  edge graph: {g.n_senders} senders, {g.n_receivers} receivers, {g.n_edges} edges; setup (clean and "
          f"corrupted runs) {t_setup}; one plain edge-graph forward {t_trace}")

    def compare(receivers, label):
        fast_t, fast = timed(lambda: acdc(run, metric, args.threshold, receivers=receivers))
        runs = [("batched speculative", fast_t, fast)]
        if not args.skip_naive:
            naive_t, naive = timed(lambda: acdc(run, metric, args.threshold, receivers=receivers, batched=False))
            runs.append(("one edge per forward", naive_t, naive))
        rows = list(range(g.n_receivers)) if receivers is None else [g.receiver_index(r) for r in receivers]
        print(f"  deciding the {int(g.valid[rows].sum())} edges into {label}:")
        for name, t, res in runs:
            print(f"    {name:21s} {str(t):28s} {res.n_passes:5d} passes {res.n_evaluated:5d} evaluations -> "
                  f"{int(res.circuit.edges[rows].sum())} kept, KL {res.metric_final:.4g}")
        FIGURES["acdc"] = {"edges": int(g.valid[rows].sum()), "batched_s": float(fast_t), "passes": fast.n_passes,
                           "evaluations": fast.n_evaluated, "kept": int(fast.circuit.edges[rows].sum()),
                           "kl": float(fast.metric_final), "setup_s": float(t_setup)}
        if not args.skip_naive:
            same = bool(torch.equal(fast.circuit.edges, naive.circuit.edges))
            FIGURES["acdc"] |= {"naive_s": float(naive_t), "same_circuit": same, "speedup": naive_t / fast_t}
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
    rows = torch.arange(len(tokens), device=tokens.device)
    a, b = clean[0].argmax().item(), clean[0].argmin().item()
    metrics = {"KL": kl_metric(clean), "logit diff": lambda logits: (logits[..., rows, a] - logits[..., rows, b]).mean(-1)}
    H = cfg.n_layer * cfg.n_head
    FIGURES["attribution"] = {"heads": {}, "edges": {}}
    if not args.skip_heads:
        print(f"\nhead attribution ({H} heads) on {args.attr_examples} prompts x {args.attr_seq} tokens, resample "
              "ablation")
    for name, metric in ({} if args.skip_heads else metrics).items():
        t_exact, exact = timed(lambda: exact_head_effects(model, tokens, metric, **kw))
        print(f"  {name}: exact sweep (1 + {H} variants, batched) {t_exact}")
        for method in ("eap", "eap-ig"):
            t, s = timed(lambda: head_attribution(model, tokens, metric, method, args.steps, **kw), args.repeats)
            steps = "" if method == "eap" else f" ({args.steps} steps)"
            rho = spearman(s, exact)
            FIGURES["attribution"]["heads"][f"{name} {method}"] = {"s": float(t), "exact_s": float(t_exact),
                                                                   "spearman": float(rho)}
            print(f"    {method + steps:16s} {str(t):28s} faster by {ratio(t_exact, t)}; Spearman rho vs exact "
                  f"{rho:+.3f}")
    run = EdgeRunner(model, tokens, "resample", corrupted=corrupted, **dtype_kw())
    with torch.no_grad():
        t_trace, _ = timed(lambda: run.trace(run.clean.mask), args.repeats)
    print(f"edge attribution ({run.graph.n_edges} edges) on {args.attr_examples} prompts x {args.attr_seq} tokens, "
          f"logit diff, {args.dtype}; one plain edge-graph forward {t_trace}")
    for method in args.methods.split(","):
        t, _ = timed(lambda: edge_attribution(run, metrics["logit diff"], method, args.steps), args.repeats)
        steps = "" if method == "eap" else f" ({args.steps} steps)"
        FIGURES["attribution"]["edges"][method] = {"s": float(t), "forward_s": float(t_trace), "edges": run.graph.n_edges,
                                                   "forwards": float(t / t_trace)}
        print(f"    {method + steps:16s} {str(t):28s} = {t / t_trace:.1f} plain forwards (cpu {t.cpu / t_trace.cpu:.1f})")


def main(argv=None) -> dict:
    global args
    args = parser.parse_args(argv)
    FIGURES.clear()
    FIGURES.update(dtype=args.dtype, device=args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else GPT2Config.preset(args.preset)
    model = GPT2(cfg).eval()
    model.init_weights(seed=args.seed)
    model.to(args.device)
    print(f"model {'tiny' if args.tiny else args.preset}: {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.d_model}, "
          f"random weights; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"{args.dtype}, matmul roof {matmul_roof(256 if args.tiny else 1536):.0f} GFLOP/s")
    if not args.skip_acdc:
        bench_acdc(model, cfg)
    if not args.skip_attribution:
        bench_attribution(model, cfg)
    return dict(FIGURES)


if __name__ == "__main__":
    main()
