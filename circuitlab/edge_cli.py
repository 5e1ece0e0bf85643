"""The `acdc` and `eap` commands of circuits.py: edge-level circuits of a model on TPP prompts.

    python circuits.py acdc --model weights/welterweight --metric kl --threshold 0.7 --ablation zero
    python circuits.py eap --model weights/welterweight --metric logit_diff --method eap-ig --top-k 200

``eap --method NAME`` runs any edge method the study ranks but ACDC (:func:`circuitlab.methods.edge_circuit`),
and every output (the printed summary, circuit.png's title, the MIB block) names the method. With no
``--model``, the bundled welterweight is used, and said so before any work.

circuits.py calls :func:`add_subcommands` on its subparsers and dispatches by its one table of
commands, which takes :data:`COMMANDS` (each handler takes the parsed arguments and returns the exit
status; --help shows ACDC_DESCRIPTION / EAP_DESCRIPTION, not this docstring). Data come from tpp: ``--examples``
prompts to discover the circuit on and as many held-out ones to evaluate it on (the
paper: 100 examples, 50 for evaluation). For resample ablation every prompt is paired
with a corrupted one: the same template with other random nouns, at the same token
length (prompts without such a partner are dropped). Prompts, metrics and the edge runner
are circuitlab.task's. ``--device`` (cpu, cuda, cuda:N) and ``--dtype`` (fp32, bf16: the
runner's matmuls) are checked while the command line is parsed.

Under torchrun (``torchrun --nproc-per-node N circuits.py acdc ...``; circuits.py joins the process group,
minigpt2.distributed.init_from_env) the runners take the default group: each method's work (ACDC's
batched passes, EAP's gradient passes, edge patching's chunks, the faithfulness runs) is split over
the ranks with the one-process numbers, bit for bit, and rank 0 alone writes --out and prints.

Output (--out): circuit.json (edges, scores, node counts), mib_graph.json (the same circuit in
the graph format of hannamw/EAP-IG and MIB), circuit.png, summary.json (metrics of the full model
and of the circuit alone, MIB's CPR / CMD and faithfulness curve of the scores, sizes, timings,
arguments).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tpp
from minigpt2.engine import ABLATIONS
from minigpt2.hardware import bf16_outlook
from tpp.encoding import SPACES
from tpp.examples import MAX_EXAMPLES
from clikit import HelpFormatter, default_device, device as device_type, dtype_flag, fail, integer, number

from .acdc import THRESHOLD_MODES, acdc, check_threshold
from .compare import circuit_faithfulness, not_a_finding, nothing_to_recover
from .draw import draw_circuit
from .eap import IG_RULES
from .faithfulness import mib_faithfulness
from .graph import Circuit, EdgeRunner
from .methods import SCORING_METHODS, MethodSettings, edge_circuit
from .mib import write_mib_json
from .paper import METHODS as METHOD_LINES
from .task import (DTYPES, METRICS, answer_space_of, build_data, corrupted_partners,  # noqa: F401 (re-exported)
                   edge_runner, finetuning_master, make_metric, torch_dtype)

DEFAULT_MODEL = "weights/welterweight"


ACDC_DESCRIPTION = """ACDC (Conmy et al. 2023) on the edge graph of one model (the paper's section 5.2):
from the logits down, each edge is ablated and removed for good when the metric worsens by less
than --threshold.

    python circuits.py acdc --model weights/welterweight --metric kl --threshold 0.05 --ablation zero
"""
EAP_DESCRIPTION = """An edge circuit from edge scores: every edge of one model scored by --method, then
the top --top-k edges kept (or those with |score| >= --threshold). The methods are those the study
compares by MIB's faithfulness (mib.md): eap, eap-ig, eap-ig-activations, clean-corrupted,
information-flow, edge-patching, learned-masks.

    python circuits.py eap --model weights/welterweight --metric logit_diff --method eap-ig --top-k 200
"""
EPILOG = """Data: --examples prompts to find the circuit on and as many held-out ones to evaluate it on;
under resample ablation each prompt is paired with the same template with other random nouns, at
the same token length (prompts without such a partner are dropped).
Output (--out): circuit.json (edges, scores, node counts), mib_graph.json (the circuit in the graph
format of hannamw/EAP-IG and MIB), circuit.png, summary.json (metrics of the full model and of the
circuit alone, MIB's CPR / CMD and faithfulness curve of the scores, sizes, timings, arguments)."""


def add_subcommands(subparsers) -> None:
    """Register "acdc" and "eap" on an argparse subparsers object (their handlers: :data:`COMMANDS`)."""
    p = subparsers.add_parser("acdc", help="ACDC edge circuit (section 5.2)", description=ACDC_DESCRIPTION,
                              epilog=EPILOG, formatter_class=HelpFormatter)
    _common(p, default_out="reports/acdc")
    g = p.add_argument_group("ACDC")
    g.add_argument("--threshold", type=number(0), default=0.05,
                   help="remove an edge when the metric worsens by less than this (absolute) or this fraction "
                        "of the current metric (relative)")
    g.add_argument("--threshold-mode", choices=THRESHOLD_MODES, default="absolute",
                   help="absolute: ACDC's rule; relative: the paper's variant (section 5.2)")
    g.add_argument("--naive", action="store_true", help="one forward per edge (the plain schedule; slow)")

    p = subparsers.add_parser("eap", help="edge circuit from edge scores: EAP, EAP-IG, information flow, ... "
                              "(every method the study ranks but ACDC)", description=EAP_DESCRIPTION,
                              epilog=EPILOG, formatter_class=HelpFormatter)
    _common(p, default_out="reports/eap")
    g = p.add_argument_group("edge scores")
    g.add_argument("--method", choices=SCORING_METHODS, default="eap-ig", metavar="METHOD",
                   help="; ".join(f"{m}: {METHOD_LINES[m]}" for m in SCORING_METHODS))
    g.add_argument("--steps", type=integer(1), default=5, help="interpolation steps of eap-ig and eap-ig-activations")
    g.add_argument("--ig-rule", choices=IG_RULES, default=None,
                   help="EAP-IG's points: mib (alpha = k/m, k = 0..m-1: hannamw/EAP-IG since Feb 2025, the code "
                        "MIB pins) or hanna2024 (k = 1..m, the older rule); default: the reference's rule for the "
                        "method (mib for eap-ig, hanna2024 for eap-ig-activations)")
    keep = g.add_mutually_exclusive_group()
    keep.add_argument("--top-k", type=integer(1), default=None,
                      help="keep the k edges of largest |score| (information-flow: k edges grown from the logits "
                           "up, MIB's selection); default: 100 unless --threshold is given")
    keep.add_argument("--threshold", type=number(0), default=None,
                      help="instead of --top-k, keep the edges with |score| >= this (default: none, --top-k 100)")


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (config.json + model.safetensors); default: the bundled "
                        f"{DEFAULT_MODEL} (the best finetune), announced before any work")
    g.add_argument("--examples", type=integer(1, MAX_EXAMPLES // 2), default=50,
                   help="prompts to find the circuit on; as many more evaluate it")
    g.add_argument("--seed", type=integer(0), default=0, help="seed of the eval set and of the corrupted nouns")
    g.add_argument("--answer-space", choices=SPACES, default=None,
                   help="the prompts' format: prompt (the paper's: trailing space) or answer (' c'); "
                        "default: the one the model was finetuned in (metadata.json), else prompt")
    g = p.add_argument_group("metric and ablation")
    g.add_argument("--metric", choices=list(METRICS), default="kl", help="kl (to the clean model; ACDC's default), "
                   "logit_diff (c minus b), accuracy, loss (cross-entropy of c)")
    g.add_argument("--ablation", choices=ABLATIONS, default="resample",
                   help="what an ablated edge carries: resample (corrupted prompts; ACDC's default), mean, "
                        "zero (the paper's choice)")
    g = p.add_argument_group("output and machine")
    g.add_argument("--out", type=Path, default=Path(default_out), help="output directory, replaced when done")
    g.add_argument("--device", type=device_type, default=None,
                   help="torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", type=dtype_flag, choices=DTYPES, default="fp32",
                   help="the edge runner's arithmetic: fp32, or bf16 (bf16 matmuls, fp32 residual stream and metric)")
    g.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads (default: the CPUs this process may use, within a container's quota)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (on a terminal) or progress lines (in a log)")


# The flag of each library parameter that an error of these commands may name (clikit.as_flags).
FLAGS = {"out": "--out", "answer_space": "--answer-space", "dtype": "--dtype", "threshold": "--threshold",
         "threshold_mode": "--threshold-mode", "k": "--top-k", "top_k": "--top-k", "seed": "--seed",
         "ig_steps": "--steps", "rule": "--ig-rule", "ablation": "--ablation", "metric": "--metric"}


def check_args(args) -> tuple[str, str, int, int]:
    """What can be checked before the model is loaded: (device, answer space, master size, data seed)."""
    from .report import check_out_dir

    if args.examples < 1:
        raise ValueError(f"--examples {args.examples}: need at least one prompt")
    if not (Path(args.model) / "config.json").exists():
        raise FileNotFoundError(f"no model at {args.model}: pass --model DIR with config.json and model.safetensors "
                                "(the bundled models are trained by train.py, see weights/README.md)")
    device = default_device(args.device)  # --device itself was checked while parsing (clikit.device)
    check_out_dir(args.out)
    space = answer_space_of([args.model], args.answer_space)
    size, data_seed = finetuning_master([args.model])
    return device, space, size, data_seed


def _setup(args):
    from minigpt2 import load_pretrained

    import torch

    device, space, size, data_seed = check_args(args)
    default = " (the default --model; pass --model DIR for another)" if args.model == DEFAULT_MODEL else ""
    print(f"[{args.command}] model {args.model}{default}, {args.metric}, {args.ablation} ablation, "
          f"{args.examples} + {args.examples} held-out prompts", file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    model = load_pretrained(args.model, device=device).eval()
    if dtype == torch.bfloat16:  # advice before any work: where bf16 cannot win (issue 27)
        note = bf16_outlook(model, device, metric_step=1.0 if args.metric == "accuracy" else 0.0)
        if note:
            print(f"[{args.command}] note: {note}", file=sys.stderr, flush=True)
    batch, corrupted = build_data(2 * args.examples, args.seed, args.ablation, space,
                                  tpp.master_dataset(seed=data_seed, n=size) if size else ())
    half = len(batch) // 2 if len(batch) > 1 else 1
    find, held = batch.select(slice(0, half)), batch.select(slice(half, len(batch)))
    cf = None if corrupted is None else corrupted[:half]
    ch = None if corrupted is None else corrupted[half:]
    runner = edge_runner(model, find, cf, args.ablation, dtype)
    metric = make_metric(args.metric, find, clean_logits=runner.clean.logits)
    evaluate = None
    if len(held):
        held_runner = edge_runner(model, held, ch, args.ablation, dtype)
        evaluate = (held_runner, make_metric(args.metric, held, clean_logits=held_runner.clean.logits))
    return model, runner, metric, evaluate


def _finish(args, circuit: Circuit, summary: dict, evaluate, runner: EdgeRunner, metric) -> int:
    """Measure the circuit, write --out, print the summary; every label is the method's own name."""
    from .report import atomic_dir, provenance, write_json

    method = summary["method"]
    summary["dtype"] = args.dtype
    summary["found_on"] = circuit_faithfulness(runner, metric.mean, circuit) | {"examples": runner.tokens.shape[0]}
    if evaluate is not None:
        held_runner, held_metric = evaluate
        summary["held_out"] = (circuit_faithfulness(held_runner, held_metric.mean, circuit)
                               | {"examples": held_runner.tokens.shape[0]})
    # MIB's faithfulness of the method's edge scores (CPR, CMD, the curve) on the held-out prompts
    mib_runner, mib_metric = evaluate if evaluate is not None else (runner, metric)
    if circuit.scores is not None:
        summary["mib"] = mib_faithfulness(mib_runner, mib_metric, circuit, name=method,
                                          select="greedy" if method == "information-flow" else "top",
                                          progress=args.progress).to_json()
    summary["node_counts"] = circuit.node_counts()
    # without edges that cannot matter (dead ends; under resample also components that read nothing)
    summary["pruned_node_counts"] = circuit.pruned(resample=args.ablation == "resample").node_counts()
    summary["verdict"] = _verdict(summary.get("held_out", summary["found_on"]), metric.higher_is_better)
    if not runner.writer:  # under torchrun: the ranks computed it together; rank 0 alone writes and prints
        return 0
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "circuit.json", circuit.to_json())
        write_mib_json(circuit, tmp / "mib_graph.json", d_model=runner.model.cfg.d_model)
        write_json(tmp / "summary.json", summary)
        write_json(tmp / "provenance.json", provenance(args={k: str(v) for k, v in vars(args).items()}))
        draw_circuit(circuit, tmp / "circuit.png", title=f"{method} on {Path(args.model).name}: "
                                                    f"{summary['node_counts']['edges']} edges")
    counts = summary["node_counts"]
    print(f"{method}: {counts['edges']} edges, {counts['nodes']} nodes ({counts['acdc_nodes']} ACDC hook nodes), "
          f"{counts['heads']} heads, {counts['mlps']} MLPs; {summary['pruned_node_counts']['edges']} edges after "
          "pruning those that cannot matter")
    for where in ("found_on", "held_out"):
        if where in summary:
            s = summary[where]
            print(f"  {args.metric} on {s['examples']} {where.replace('_', ' ')} prompts: full model {s['full']:.4g}, "
                  f"circuit {s['value']:.4g}, all ablated {s['empty']:.4g} (normalized {s['normalized']:.3g})")
    if summary["verdict"]:
        print(f"  {summary['verdict']}")
    if "mib" in summary:
        m = summary["mib"]
        print(f"  MIB faithfulness of the scores ({args.metric}): CPR {m['cpr']:.3f} (higher is better), "
              f"CMD {m['cmd']:.3f} (lower is better)")
    print(f"written to {args.out}/")
    return 0


def _verdict(faith: dict, higher_is_better: bool) -> str | None:
    """The study's flag for a circuit that is no finding (circuitlab.compare.not_a_finding), or None."""
    if nothing_to_recover(faith["full"], faith["empty"], higher_is_better):
        return "not a finding: the full model does no better than with every edge ablated (nothing to recover)"
    if not_a_finding(faith, higher_is_better):
        return f"not a finding: this circuit recovers nothing of the model (normalized {faith['normalized']:.3g} < 0.1)"
    return None


def run_acdc(args, argv=None) -> int:
    try:
        check_threshold(args.threshold, args.threshold_mode)
        model, runner, metric, evaluate = _setup(args)
        res = acdc(runner, metric, args.threshold, threshold_mode=args.threshold_mode,
                   higher_is_better=metric.higher_is_better, batched=not args.naive, progress=args.progress)
        summary = {"method": "acdc", "metric": args.metric, "threshold": args.threshold,
                   "threshold_mode": args.threshold_mode, "ablation": args.ablation, **res.summary()}
        return _finish(args, res.circuit, summary, evaluate, runner, metric)
    except (ValueError, FileNotFoundError) as e:
        return fail(f"circuits.py {args.command}", e, FLAGS)


def _top_k(args, n_edges: int) -> int | None:
    """--top-k, or 100 when neither it nor --threshold is given; refused before any work if the graph is smaller."""
    if args.threshold is not None:
        return args.top_k
    if args.top_k is None:
        if n_edges < 100:
            print(f"[eap] the model's graph has {n_edges} edges: keeping all of them (--top-k defaults to 100)",
                  file=sys.stderr)
        return min(100, n_edges)
    if args.top_k > n_edges:
        raise ValueError(f"--top-k {args.top_k} is more than the {n_edges} edges of {args.model}'s graph. "
                         f"Fix: --top-k {n_edges} or less, or --threshold.")
    return args.top_k


def run_eap(args, argv=None) -> int:
    try:
        model, runner, metric, evaluate = _setup(args)
        top_k = _top_k(args, runner.graph.n_edges)
        if args.method == "eap" and args.metric == "kl":
            print("warning: the KL to the clean model has zero gradient at the clean input, so plain EAP scores "
                  "are noise; use --method eap-ig or a task metric", file=sys.stderr)
        t0 = time.perf_counter()
        settings = MethodSettings(ig_steps=args.steps, progress=args.progress)
        circuit = edge_circuit(args.method, runner, metric, top_k=top_k, threshold=args.threshold,
                               settings=settings, rule=args.ig_rule)
        summary = {"method": args.method, "steps": args.steps, "ig_rule": circuit.info.get("rule"), "metric": args.metric,
                   "top_k": top_k,
                   "threshold": args.threshold, "ablation": args.ablation,
                   "seconds": round(time.perf_counter() - t0, 3)}
        return _finish(args, circuit, summary, evaluate, runner, metric)
    except (ValueError, FileNotFoundError) as e:
        return fail(f"circuits.py {args.command}", e, FLAGS)


COMMANDS = {"acdc": run_acdc, "eap": run_eap}  # circuits.py's handlers (args, argv) -> exit status
