"""Distribution over processes (minigpt2.distributed): 1 process x 2 threads against 2 processes x 1 thread.

    python bench/bench_distributed.py                          # both runs, both benches, on this machine
    python bench/bench_distributed.py --json dist.json --project   # ... and the paper-size projection
    python bench/bench_distributed.py --project --from dist.json   # the projection of earlier measurements
    python bench/bench_distributed.py --tiny                   # a 2-layer model in seconds: checks the script

Three runs of the same work, each a fresh process tree: one process with 2 torch threads
(``python bench_distributed.py --worker``), two processes with 1 thread each under torchrun (gloo,
``torch.distributed.run --standalone --nproc-per-node 2``), whose ranks split the work through
``group=``, and one process with 1 thread (the equality reference, see below). The model has GPT-2
small's shapes (12 layers x 12 heads, d_model 768, vocab 50257; GPT-2's initialisation, seed 0: no
pretrained weights can be downloaded here).

(a) the sweep: ``circuitlab.sweep.evaluate_masks`` (as circuits.py runs it) of the clean model and the
    144 single-head ablations (145 variants) on ``--sweep-prompts`` random prompts of ``--seq`` tokens
    (TPP's prompts average 24.7), the logit difference of two random tokens per prompt. The ranks
    split evaluate_masks's prompt blocks (4 to 32 prompts each): each rank computes every world-th
    block whole, exactly as one process computes it, and the blocks' values are gathered byte for
    byte (where there are fewer blocks than ranks, the ranks share the chunks of variants within each
    block instead: on this CPU's 1 GiB budget GPT-2 small's chunks hold 98 rows at 25 tokens, 7 to
    10 chunks a block). ``--max-rows N`` instead calls
    the engine on all prompts at once (``model.run_with_head_masks(..., max_rows=N, group=)``), in
    chunks of N rows (variants x prompts), e.g. ``--max-rows 240`` (40 variants of 6 prompts a chunk,
    4 chunks);
(b) exact edge patching: ``circuitlab.edge_patching.edge_patching_values`` on ``--edges`` edges (every
    k-th edge of the graph's 32,491, so every stage is represented) for ``--edge-prompts`` prompts,
    resample ablation against random corrupted prompts. The group goes to ``EdgeRunner(group=)`` and to
    ``edge_patching_values(group=)`` where they take it; the header says which do (where neither
    does, both ranks compute every edge and (b)'s 2x1 time is not halved).

Each timed part starts at a barrier after a warm-up and ends when every rank holds every value
(the gather included). Reported: wall and per-rank CPU seconds, the cost per variant (per edge),
the overhead of distribution (2x1 wall / 1x2 wall, and 2x1 wall / half the 1x1 wall: against a
perfect split) and whether the runs' values are equal (``torch.equal``). The third run, 1 process x
1 thread (``--no-reference``: none), checks the guarantee itself: torch's CPU matmuls round
differently with another number of threads, so the 2-thread run may differ from the ranks' in the
last bits, while a one-process run with the ranks' thread count may not.

``--project`` turns the measured costs into the time of (1) the paper-size study on GPT-2 small:
four models, each the 145-variant sweep on 3,000 prompts, the baselines of Tables 1 and 2 (3,000 and
1,150 prompts), the head search on 100 prompts (156 full forwards at most: 12 layer baselines and
144 heads) and Table 3's 9 circuit evaluations on 3,000 prompts; and (2) exact edge patching of
every edge of GPT-2 XL (48 layers x 25 heads, d_model 1600, circuitlab.graph.Graph(48, 25): 2,235,025
edges) on ``--xl-prompts`` prompts. The model of cost: seconds per FLOP, counted per variant
(:func:`sweep_flops`, :func:`edge_flops`: a transformer block is T (24 d^2 + 4 T d) FLOPs, the
unembedding 2 V d per answer position), measured on this CPU for each method; on a GPU the sweep's
rate comes from the device suite's JSON (``--gpu-json``, its fp32 sweep row) or, where there is none
(BENCHMARKS.md "GPU (device suite)" records no GPU figure yet), from ``--gpu-tflops`` (assumed
achieved fp32 TFLOP/s, default 30: an H100's fp32 peak is 67, and minigpt2 does not enable TF32),
and edge patching's GPU rate is the sweep's times the ratio of the two on this CPU. N GPUs: one
GPU's time / N, times the sweep's 2-process overhead against a perfect split measured here (else
2x1 / 1x2) where it is above 1: a GPU rank, like a 1-thread rank here, has its device to itself.
This assumes each call has at least N blocks or chunks to share: the paper-size sweep's 3,000
prompts make about a hundred prompt blocks, which the ranks split (see (a)).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from circuitlab import edge_patching as EP  # noqa: E402
from circuitlab.graph import EdgeRunner, Graph  # noqa: E402
from circuitlab.sweep import Prompts, evaluate_masks  # noqa: E402
from minigpt2 import GPT2, GPT2Config, distributed  # noqa: E402
from minigpt2.engine import Metric  # noqa: E402
from minigpt2.masking import single_head_masks  # noqa: E402

HERE = Path(__file__).resolve()
GPT2_SMALL = GPT2Config(n_layer=12, n_head=12, d_model=768, d_mlp=3072, n_ctx=1024, vocab_size=50257)
GPT2_XL = GPT2Config(n_layer=48, n_head=25, d_model=1600, d_mlp=6400, n_ctx=1024, vocab_size=50257)
TINY = GPT2Config(n_layer=2, n_head=3, d_model=48, d_mlp=96, n_ctx=64, vocab_size=501)
MODELS = 4  # the study's models: GPT-2 and the three finetuned ones
STUDY_PROMPTS, TABLE2_PROMPTS, SEARCH_PROMPTS, TABLE3_EVALS = 3000, 1150, 100, 9
TPP_SEQ = 25  # TPP prompts' mean length (24.7 tokens): the sequence length of the projection and the suite's sweep

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sweep-prompts", type=int, default=6,
                    help="prompts of the sweep (a): about 350 GFLOP per prompt at 25 tokens")
parser.add_argument("--seq", type=int, default=TPP_SEQ, help="tokens per prompt")
parser.add_argument("--max-rows", type=int, default=None,
                    help="(a) through model.run_with_head_masks on all prompts at once, in chunks of this many rows "
                         "(variants x prompts), instead of circuitlab.sweep.evaluate_masks")
parser.add_argument("--edges", type=int, default=1500,
                    help="edges of the edge patching run (b): about 1.9 TFLOP per prompt at 25 tokens; 0: skip it")
parser.add_argument("--edge-prompts", type=int, default=1, help="prompts of the edge patching run (b)")
parser.add_argument("--skip-sweep", action="store_true", help="no sweep run (a)")
parser.add_argument("--ranks", type=int, default=2, help="processes of the distributed run (each 1 thread)")
parser.add_argument("--threads", type=int, default=None, help="threads of the one-process run (default: --ranks)")
parser.add_argument("--no-reference", action="store_true", help="no 1 process x 1 thread run (the equality check "
                                                                  "against the run with the ranks' thread count)")
parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
parser.add_argument("--tiny", action="store_true", help="a 2-layer, 3-head, d_model 48 model (checks the script)")
parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
parser.add_argument("--project", action="store_true", help="also print the paper-size projection")
parser.add_argument("--from", dest="source", type=Path, default=None,
                    help="with --project: take the measurements from this --json file instead of measuring")
parser.add_argument("--gpu-json", type=Path, default=None, help="the device suite's --json (its fp32 sweep row "
                                                                "gives the GPU's rate)")
parser.add_argument("--gpu-tflops", type=float, default=30.0, help="assumed achieved fp32 TFLOP/s of one GPU "
                                                                   "where no --gpu-json is given")
parser.add_argument("--xl-prompts", type=int, default=100, help="prompts of the GPT-2 XL edge patching projection")
parser.add_argument("--gpus", default="1,8", help="GPU counts of the projection")
parser.add_argument("--timeout", type=float, default=1800, help="seconds each run may take")
parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------- the work (one worker: alone or a rank)
def build(args) -> GPT2:
    model = GPT2(TINY if args.tiny else GPT2_SMALL).eval()
    model.init_weights(seed=args.seed)
    return model


def logit_diff(vocab: int, n: int, seed: int) -> Metric:
    c, b = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed + 7))

    def pick(logits, t):
        return logits.gather(-1, t.expand(logits.shape[:-1])[..., None])[..., 0]
    return Metric("logit_diff", lambda logits, c, b: pick(logits, c) - pick(logits, b), True, {"c": c, "b": b})


def timed(fn, group) -> tuple[float, float, object]:
    """(wall, this process's CPU seconds, result) of fn(), from a barrier of the group to its end."""
    if group is not None:
        dist.barrier(group)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def run_sweep(model: GPT2, args, group) -> tuple[dict, torch.Tensor]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.sweep_prompts, args.seq), generator=gen)
    prompts = Prompts(tokens, positions=torch.full((args.sweep_prompts,), args.seq - 1))
    metric = logit_diff(cfg.vocab_size, args.sweep_prompts, args.seed)
    masks = single_head_masks(cfg.n_layer, cfg.n_head)
    evaluate_masks(model, prompts.subset(range(min(2, len(prompts)))), masks[:2], [metric],
                   group=distributed.LOCAL)  # warm-up
    if args.max_rows:  # the engine itself, all prompts in one call, in chunks of max_rows rows
        @torch.no_grad()
        def work():
            return model.run_with_head_masks(tokens, masks, positions=prompts.positions, metric=metric,
                                             max_rows=args.max_rows, group=group)
    else:  # the sweep as circuits.py runs it
        def work():
            return evaluate_masks(model, prompts, masks, [metric], group=group)
    wall, cpu, values = timed(work, group)
    return {"wall_s": wall, "cpu_s": cpu, "variants": int(masks.shape[0]), "prompts": args.sweep_prompts,
            "seq": args.seq, "path": f"run_with_head_masks(max_rows={args.max_rows})" if args.max_rows
            else "circuitlab.sweep.evaluate_masks"}, values


def takes_group(fn) -> bool:
    return "group" in inspect.signature(fn).parameters


def chosen_edges(g: Graph, n: int) -> torch.Tensor:
    """[R, S] bool: ``n`` edges, every k-th of the graph's in (receiver, sender) order: every stage has its share."""
    valid = g.valid.nonzero()
    pick = valid[torch.linspace(0, len(valid) - 1, min(n, len(valid))).round().long().unique()]
    mask = torch.zeros_like(g.valid)
    mask[pick[:, 0], pick[:, 1]] = True
    return mask


def run_edges(model: GPT2, args, group) -> tuple[dict, torch.Tensor]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens, corrupted = torch.randint(0, cfg.vocab_size, (2, args.edge_prompts, args.seq), generator=gen)
    kw = {"group": group if group is not None else distributed.LOCAL}
    runner = EdgeRunner(model, tokens, "resample", corrupted=corrupted, **(kw if takes_group(EdgeRunner) else {}))
    clean = runner.clean.logits
    a, b = int(clean[0].argmax()), int(clean[0].argmin())

    def metric(logits):  # [V, B, vocab] -> [V]: the logit difference of two fixed tokens
        return (logits[..., a] - logits[..., b]).mean(-1)
    mask = chosen_edges(runner.graph, args.edges)
    fn_kw = kw if takes_group(EP.edge_patching_values) else {}
    warm = chosen_edges(runner.graph, 2)
    EP.edge_patching_values(runner, metric, edges=warm, **({"group": distributed.LOCAL} if fn_kw else {}))
    wall, cpu, values = timed(lambda: EP.edge_patching_values(runner, metric, edges=mask, **fn_kw), group)
    blocks = edge_flops(cfg, args.seq, mask) * args.edge_prompts
    return {"wall_s": wall, "cpu_s": cpu, "edges": int(mask.sum()), "prompts": args.edge_prompts, "seq": args.seq,
            "flops": blocks, "EdgeRunner(group=)": takes_group(EdgeRunner),
            "edge_patching_values(group=)": takes_group(EP.edge_patching_values)}, values[mask]


def worker(args) -> int:
    """One process of a run: alone (WORLD_SIZE unset) or a rank of torchrun's group; rank 0 writes."""
    group = None
    if distributed.launched():
        distributed.init_from_env("cpu")
        group = dist.group.WORLD
    torch.set_num_threads(args.threads or 1)
    model = build(args)
    figures, values = {"ranks": distributed.world_size(group), "threads": torch.get_num_threads()}, {}
    if not args.skip_sweep:
        figures["sweep"], values["sweep"] = run_sweep(model, args, group)
    if args.edges:
        figures["edges"], values["edges"] = run_edges(model, args, group)
    if group is not None:
        cpus = [None] * dist.get_world_size()
        dist.all_gather_object(cpus, {k: figures[k]["cpu_s"] for k in ("sweep", "edges") if k in figures})
        for k in ("sweep", "edges"):
            if k in figures:
                figures[k]["cpu_s_per_rank"] = [c[k] for c in cpus]
    if distributed.is_writer(group):
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(values, args.out / "values.pt")
        (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
    if group is not None:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- the two runs
def launch(args, ranks: int, threads: int, out: Path) -> tuple[dict, dict]:
    """(figures, values) of one run: ``ranks`` processes of ``threads`` threads each."""
    argv = [str(HERE), "--worker", "--out", str(out), "--threads", str(threads), "--seq", str(args.seq),
            "--sweep-prompts", str(args.sweep_prompts), "--edges", str(args.edges),
            "--edge-prompts", str(args.edge_prompts), "--seed", str(args.seed)]
    argv += ["--max-rows", str(args.max_rows)] if args.max_rows else []
    argv += ["--tiny"] * args.tiny + ["--skip-sweep"] * args.skip_sweep
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *argv]
    else:
        cmd = [sys.executable, *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        raise SystemExit(f"bench_distributed: the {ranks} x {threads} run failed (exit status {p.returncode}):\n"
                         f"{(p.stdout + p.stderr)[-4000:]}")
    return json.loads((out / "figures.json").read_text()), torch.load(out / "values.pt")


def compare(args) -> dict:
    """The 1 x threads and ranks x 1 runs (and, for the equality, 1 x 1 unless --no-reference)."""
    threads = args.threads or args.ranks
    with tempfile.TemporaryDirectory() as tmp:
        one, v1 = launch(args, 1, threads, Path(tmp) / "one")
        many, vn = launch(args, args.ranks, 1, Path(tmp) / "many")
        ref, vr = (one, v1) if threads == 1 or args.no_reference else launch(args, 1, 1, Path(tmp) / "ref")
    out = {"model": "tiny" if args.tiny else "GPT-2 small shapes", "cpus": os.cpu_count(), "torch": torch.__version__,
           "one": one, "many": many, "label_one": f"1 process x {threads} threads",
           "label_many": f"{args.ranks} processes x 1 thread"}
    if ref is not one:
        out["reference"] = ref
    for k in ("sweep", "edges"):
        if k in one:
            out[k] = {"equal": bool(torch.equal(v1[k], vn[k])), "max_abs_diff": max_diff(v1[k], vn[k]),
                      "overhead": many[k]["wall_s"] / one[k]["wall_s"]}
            if ref is not one:
                out[k].update(equal_1x1=bool(torch.equal(vr[k], vn[k])), max_abs_diff_1x1=max_diff(vr[k], vn[k]),
                              overhead_ideal=many[k]["wall_s"] * args.ranks / ref[k]["wall_s"])
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def report(r: dict) -> None:
    print(f"\n{r['model']}, torch {r['torch']}, {r['cpus']} CPUs: {r['label_one']} against {r['label_many']} (gloo)")
    for k, unit in (("sweep", "variant"), ("edges", "edge")):
        if k not in r:
            continue
        one, many, cmp_ = r["one"][k], r["many"][k], r[k]
        n = one["variants"] if k == "sweep" else one["edges"]
        what = (f"sweep: {n} variants x {one['prompts']} prompts x {one['seq']} tokens, {one['path']}"
                if k == "sweep" else
                f"edge patching: {n} edges x {one['prompts']} prompts x {one['seq']} tokens (EdgeRunner(group=): "
                f"{one['EdgeRunner(group=)']}, edge_patching_values(group=): {one['edge_patching_values(group=)']})")
        print(f"  {what}")
        print(f"    {r['label_one']:24s} {one['wall_s']:8.2f} s wall, {one['cpu_s']:8.2f} s CPU; "
              f"{one['wall_s'] / n * 1e3:.2f} ms per {unit}")
        cpus = ", ".join(f"{c:.2f}" for c in many.get("cpu_s_per_rank", [many["cpu_s"]]))
        print(f"    {r['label_many']:24s} {many['wall_s']:8.2f} s wall, CPU per rank {cpus} s; "
              f"{many['wall_s'] / n * 1e3:.2f} ms per {unit}")
        if "reference" in r:
            ref = r["reference"][k]
            print(f"    {'1 process x 1 thread':24s} {ref['wall_s']:8.2f} s wall, {ref['cpu_s']:8.2f} s CPU; "
                  f"{ref['wall_s'] / n * 1e3:.2f} ms per {unit}")
        print(f"    overhead of distribution: 2x1 wall / 1x2 wall {cmp_['overhead']:.3f}" + (
            f"; 2x1 wall / (1x1 wall / 2), against a perfect split {cmp_['overhead_ideal']:.3f}"
            if "overhead_ideal" in cmp_ else ""))
        print(f"    values equal (torch.equal) with the 1x{r['one']['threads']} run: {cmp_['equal']} "
              f"(max |diff| {cmp_['max_abs_diff']:.1e})" + (
                  f"; with the 1x1 run: {cmp_['equal_1x1']} (max |diff| {cmp_['max_abs_diff_1x1']:.1e})"
                  if "equal_1x1" in cmp_ else ""))


# ---------------------------------------------------------------- the projection
def block_flops(cfg: GPT2Config, T: int) -> float:
    """FLOPs of one transformer block on T positions (q, k, v, out, MLP: 24 d^2 per position; attention 4 T d)."""
    d = cfg.d_model
    return T * (8 * d * d + 4 * d * cfg.d_mlp + 4 * T * d)


def sweep_flops(cfg: GPT2Config, T: int) -> float:
    """FLOPs per prompt of the clean run and the L*H single-head ablations, each sharing its clean prefix
    (the variant of a head of layer l recomputes layers l..L-1), each read at one position."""
    L, H = cfg.n_layer, cfg.n_head
    blocks = L + sum(H * (L - l) for l in range(L))
    return blocks * block_flops(cfg, T) + (1 + L * H) * 2 * cfg.vocab_size * cfg.d_model


def edge_flops(cfg: GPT2Config, T: int, edges: torch.Tensor | None = None) -> float:
    """FLOPs per prompt of exact edge patching of ``edges`` (default all): an edge into a head or MLP of layer
    l recomputes that component (a head: 1/H of the attention; the MLP), the blocks l+1..L-1 (the last one at
    the answer position, keys and values at every position) and the unembedding; into the logits, the latter."""
    g = Graph(cfg.n_layer, cfg.n_head)
    d, L, T = cfg.d_model, cfg.n_layer, int(T)
    mlp, unembed = T * 4 * d * cfg.d_mlp, 2 * cfg.vocab_size * d
    last = T * 4 * d * d + (4 * d * d + 4 * d * cfg.d_mlp + 4 * T * d)
    counts = (g.valid if edges is None else edges).sum(1).tolist()  # edges per receiver
    total = 0.0
    for st in g.stages:
        n = sum(counts[r] for r in st.rows)
        if st.kind == "logits" or not n:
            total += n * unembed
            continue
        own = mlp if st.kind == "mlp" else T * (8 * d * d + 4 * T * d) / cfg.n_head + mlp
        rest = max(0, L - 2 - st.layer) * block_flops(cfg, T) + (last if st.layer < L - 1 else 0)
        total += n * (own + rest + unembed)
    return total


def study_flops(cfg: GPT2Config, T: int) -> dict[str, float]:
    forward = cfg.n_layer * block_flops(cfg, T) + 2 * cfg.vocab_size * cfg.d_model
    return {"sweep": MODELS * STUDY_PROMPTS * sweep_flops(cfg, T),
            "rest": MODELS * forward * (STUDY_PROMPTS + TABLE2_PROMPTS + SEARCH_PROMPTS * (cfg.n_layer + 144))
            + TABLE3_EVALS * STUDY_PROMPTS * forward}


def gpu_rate(args) -> tuple[float, str]:
    """Seconds per FLOP of the batched sweep on one GPU, and where that figure comes from."""
    if args.gpu_json:
        suite = json.loads(args.gpu_json.read_text())
        if suite.get("dry_run"):
            parser.error(f"--gpu-json {args.gpu_json}: a --dry-run suite (a tiny model on the CPU) has no GPU rate")
        row = next(r for r in suite["results"] if r["step"] == "sweep" and r["dtype"] == "fp32")
        f = row["figures"]
        wall = next(m["wall_s"] for k, m in f["methods"].items() if k.startswith("minigpt2 batched"))
        ranks = suite.get("ranks", 1)  # a --distributed suite: the GPUs' time together
        return wall * ranks / (f["prompts"] * sweep_flops(GPT2_SMALL, TPP_SEQ)), (
            f"{suite['machine'].split(',')[0]}: the device suite's fp32 sweep ({f['prompts']} TPP prompts, "
            f"{wall:.2f} s{f' on {ranks} GPUs, x {ranks}' if ranks > 1 else ''}, taken as {TPP_SEQ} tokens each)")
    return 1 / (args.gpu_tflops * 1e12), (f"ASSUMED {args.gpu_tflops:g} TFLOP/s achieved fp32 per GPU (no GPU "
                                          "figure recorded: BENCHMARKS.md 'GPU (device suite)'; pass --gpu-json)")


def hours(s: float) -> str:
    return f"{s:,.0f} s" if s < 600 else f"{s / 60:,.0f} min" if s < 7200 else f"{s / 3600:,.1f} h"


def project(r: dict, args) -> dict:
    cfg = TINY if r["model"] == "tiny" else GPT2_SMALL
    one = r["one"]
    cpu_sweep = one["sweep"]["wall_s"] / (one["sweep"]["prompts"] * sweep_flops(cfg, one["sweep"]["seq"]))
    cpu_edge = one["edges"]["wall_s"] / one["edges"]["flops"] if "edges" in one else cpu_sweep
    gpu, source = gpu_rate(args)
    measured = r.get("sweep", {})
    overhead = max(1.0, measured.get("overhead_ideal", measured.get("overhead", 1.0)))
    if min(one[k]["wall_s"] for k in ("sweep", "edges") if k in one) < 1:
        print("\nnote: runs of under a second measure latencies, not rates: project from runs of real sizes")
    study, xl = study_flops(GPT2_SMALL, TPP_SEQ), args.xl_prompts * edge_flops(GPT2_XL, TPP_SEQ)
    study_total = study["sweep"] + study["rest"]
    rows = {"CPU here (" + r["label_one"] + ")": (study_total * cpu_sweep, xl * cpu_edge)}
    for n in [int(x) for x in args.gpus.split(",") if x]:
        k = 1.0 if n == 1 else overhead / n
        rows[f"{n} GPU{'s' * (n > 1)}"] = (study_total * gpu * k, xl * gpu * cpu_edge / cpu_sweep * k)
    print(f"\nprojection (per-FLOP rates: sweep {1 / cpu_sweep / 1e9:.1f} GFLOP/s, edge patching "
          f"{1 / cpu_edge / 1e9:.1f} GFLOP/s on this CPU; GPU: {source}; edge patching on a GPU at the sweep's rate x "
          f"{cpu_sweep / cpu_edge:.2f}, their ratio here; N GPUs: 1 GPU / N x {overhead:.3f}, the sweep's 2-process "
          f"overhead measured here (against a perfect split of the 1x1 run where measured), at least 1; assumes "
          f"every call has N chunks or more to share)")
    print(f"  study on GPT-2 small: {MODELS} models x (145-variant sweep on {STUDY_PROMPTS} prompts + baselines, "
          f"search, Table 3) = {study_total / 1e15:.1f} PFLOP ({study['sweep'] / study_total:.0%} the sweeps)")
    print(f"  edge patching on GPT-2 XL: {Graph(48, 25).n_edges:,} edges x {args.xl_prompts} prompts x {TPP_SEQ} "
          f"tokens = {xl / 1e15:.1f} PFLOP")
    for name, (s, e) in rows.items():
        print(f"    {name:34s} study {hours(s):>10s}   GPT-2 XL edge patching {hours(e):>10s}")
    return {"cpu_s_per_flop": {"sweep": cpu_sweep, "edges": cpu_edge}, "gpu_s_per_flop": gpu, "gpu_source": source,
            "overhead": overhead, "study_flops": study_total, "xl_flops": xl, "seconds": rows}


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.source and not args.project:
        parser.error("--from reads earlier measurements for --project: pass --project too")
    r = json.loads(args.source.read_text()) if args.source else compare(args)
    if not args.source:
        report(r)
    if args.project:
        r["projection"] = project(r, args)
    if args.json and not args.source:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return r


if __name__ == "__main__":
    main()
