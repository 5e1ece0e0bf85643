"""The study's batched runs on a bundled model, in the study's settings.

    python bench/bench_bundled_runs.py [--model weights/welterweight] [--threads 2]

1. ACDC as ``circuits.py study`` runs it (ACDC's own graph, KL to the clean model, absolute
   threshold 0.7, zero ablation, ``--examples`` prompts, fp32): wall seconds, forward passes,
   candidate evaluations and the circuit's size.
2. MIB's faithfulness evaluation (circuitlab.faithfulness.mib_faithfulness) of EAP-IG's edge
   scores, as the study's MIB comparison runs it (resample ablation, logit difference,
   ``--mib-examples`` prompts to score and as many held out): 20 top-k circuits, the full model
   and the empty circuit in one batched ``EdgeRunner.run``: wall seconds, CPR and CMD.
3. The single-head sweep (circuitlab.sweep: 145 variants, accuracy, logit difference and loss,
   zero ablation) of ``--sweep-examples`` prompts, in blocks of prompts sized for the variant
   count (circuitlab.sweep.CALL_ROWS: about 4 prompts a block here) and in blocks of at least 32
   (what every call used before): wall seconds, and the largest difference of the two results.

Each time is the median of ``--repeats`` runs. To compare two commits, run this file from each
checkout (``git worktree add /tmp/old REV; cp bench/bench_bundled_runs.py /tmp/old/bench/``): it
imports the circuitlab of the tree it sits in. The circuit and CPR / CMD must agree.
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
from circuitlab.acdc import acdc  # noqa: E402
from circuitlab.eap import eap  # noqa: E402
from circuitlab.faithfulness import mib_faithfulness  # noqa: E402
from circuitlab.study import Session  # noqa: E402
from circuitlab.task import build_data, edge_runner, make_metric, to_prompts  # noqa: E402


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/welterweight")
    p.add_argument("--examples", type=int, default=50, help="ACDC's prompts (the study: 50)")
    p.add_argument("--mib-examples", type=int, default=16, help="MIB's scored and held-out prompts (the study: 16)")
    p.add_argument("--sweep-examples", type=int, default=40, help="the sweep's prompts (the study: 100; make demo: 40)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    session = Session([args.model])
    model = session.models[session.labels[0]]
    out = {}

    batch, _ = build_data(2 * args.examples, session.seed, "zero", session.answer_space, session.exclude)
    find = batch.select(slice(0, args.examples))
    runner = edge_runner(model, find, None, "zero")
    kl = make_metric("kl", find, clean_logits=runner.clean.logits)
    seconds, r = timed(lambda: acdc(runner, kl.mean, 0.7, threshold_mode="absolute",
                                    higher_is_better=kl.higher_is_better), args.repeats)
    out["acdc"] = {"seconds": seconds, **r.summary()}
    print(f"ACDC ({args.examples} prompts): {seconds:.1f} s, {r.n_passes} passes, {r.n_evaluated} evaluations, "
          f"{r.circuit.node_counts()['edges']} edges")

    batch, corrupted = build_data(2 * args.mib_examples, session.seed + 1, "resample", session.answer_space,
                                  session.exclude)
    n = args.mib_examples
    find, held = batch.select(slice(0, n)), batch.select(slice(n, 2 * n))
    r_find = edge_runner(model, find, corrupted[:n], "resample")
    r_held = edge_runner(model, held, corrupted[n:], "resample")
    ld, ld_held = make_metric("logit_diff", find, model), make_metric("logit_diff", held, model)
    scores = eap(r_find, ld.mean, "eap-ig", top_k=100)  # a Circuit holding every edge's score
    seconds, curve = timed(lambda: mib_faithfulness(r_held, ld_held.mean, scores, name="eap-ig"), args.repeats)
    out["mib_faithfulness"] = {"seconds": seconds, "cpr": curve.cpr, "cmd": curve.cmd}
    print(f"MIB faithfulness of EAP-IG ({n} held-out prompts, {len(curve.n_edges) * 2 + 2} circuits): "
          f"{seconds:.1f} s, CPR {curve.cpr:.6f}, CMD {curve.cmd:.6f}")

    import circuitlab.sweep as sweeps

    batch = session.sample(args.sweep_examples, "--sweep-examples")
    metrics = [make_metric(m, batch, model) for m in ("accuracy", "logit_diff", "loss")]
    results = {}
    for label, least in (("sized blocks", sweeps.MIN_BLOCK_ROWS), ("blocks of 32", sweeps.BLOCK_ROWS)):
        saved, sweeps.MIN_BLOCK_ROWS = sweeps.MIN_BLOCK_ROWS, least
        try:
            seconds, results[label] = timed(lambda: sweeps.sweep(model, to_prompts(batch), metrics), args.repeats)
        finally:
            sweeps.MIN_BLOCK_ROWS = saved
        out[f"sweep, {label}"] = {"seconds": seconds}
        print(f"sweep of {len(batch)} prompts, {label}: {seconds:.1f} s")
    a, b = results.values()
    diff = max(float((a.ablated[m] - b.ablated[m]).abs().max()) for m in a.ablated)
    out["sweep_max_difference"] = diff
    print(f"largest difference of the two sweeps' means: {diff:.2e}")
    return out


if __name__ == "__main__":
    main()
