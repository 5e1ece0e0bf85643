"""Circuit analysis of the Transitive Property Problem: the paper's experiments as commands.

    python circuits.py baseline                     # Tables 1 and 2
    python circuits.py sweep                        # every head ablated alone, heatmaps
    python circuits.py search --threshold 0.03      # the attention-focused search (section 5.3)
    python circuits.py transfer --circuits reports/search/circuit_*.json   # Table 3
    python circuits.py classify                     # head classes, attention to c (Figure 2)
    python circuits.py generate                     # the forgetting probe (section 6.1)
    python circuits.py study --out reports/study    # all of it, one report
    python circuits.py acdc / eap                   # edge circuits (circuitlab.edge_cli)

Each command writes JSON, PNG and markdown to --out (replaced whole, only once
complete) and prints its table. Models default to the bundled ones in weights/.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from circuitlab import edge_cli, study as S
from circuitlab.classify import check_class_args
from circuitlab.probe import DEFAULT_PROMPT
from circuitlab.report import atomic_dir, provenance, write_json
from circuitlab.search import DROPS, ORDERS
from circuitlab.sweep import ABLATIONS
from circuitlab.transfer import load_circuit
from tpp.encoding import SPACES

# ---------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

common = argparse.ArgumentParser(add_help=False)
g = common.add_argument_group("models and data")
g.add_argument("--models", nargs="+", default=S.DEFAULT_MODELS, metavar="[LABEL=]DIR",
               help="model directories (config.json + model.safetensors), optionally labelled; default: the bundled four")
g.add_argument("--seed", type=int, default=0, help="seed of the eval sets and of every random choice")
g.add_argument("--master-size", type=int, default=None,
               help="exclude the first N examples of the master dataset from the eval sets "
                    "(default: the largest master_size in the models' metadata.json)")
g.add_argument("--data-seed", type=int, default=None, help="seed of that master dataset (default: from metadata.json)")
g.add_argument("--answer-space", choices=SPACES, default=None,
               help="first eval set's format: prompt (the paper's: trailing space, c on its own) or answer (' c'); "
                    "default: the one the models were finetuned in (metadata.json), else prompt")
g = common.add_argument_group("output and machine")
g.add_argument("--out", type=Path, default=None, help="output directory (default: reports/COMMAND); replaced when done")
g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def search_args(p: argparse.ArgumentParser, examples_flag: str = "--examples") -> None:
    g = p.add_argument_group("circuit search (section 5.3)")
    g.add_argument("--metric", choices=list(S.METRICS), default="accuracy", help="performance measure of each check")
    g.add_argument("--threshold", type=float, default=0.03, help="keep an ablation whose drop is below this")
    g.add_argument("--drop", choices=DROPS, default=None,
                   help="relative: (baseline - value) / |baseline| (default; the paper's reading); absolute: "
                        "baseline - value (default for kl); signs flip for loss and kl")
    g.add_argument("--order", choices=ORDERS, default="layer-up", help="layer-up (the paper) or layer-down (as ACDC)")
    g.add_argument("--ablation", choices=ABLATIONS, default="zero", help="what an ablated head outputs (paper: zero)")
    g.add_argument(examples_flag, dest="search_examples", type=int, default=100, help="examples per check (paper: 100)")
    g.add_argument("--rigorous", type=int, default=0, metavar="N",
                   help="re-check every kept ablation on N examples (0: off)")
    g.add_argument("--speculate", type=int, default=None,
                   help="heads per speculative batch (default: 1 on a CPU, where batching saves nothing, 8 on a GPU)")


p = commands.add_parser("baseline", parents=[common], help="Tables 1 and 2: loss, accuracy, logit difference")
p.add_argument("--examples", type=int, default=3000, help="examples in the first eval set (paper: 3000)")
p.add_argument("--single-examples", type=int, default=1150, help="examples in the single-token set (paper: 1150)")

p = commands.add_parser("sweep", parents=[common], help="every head ablated alone; heatmaps of the effects")
p.add_argument("--examples", type=int, default=100, help="examples drawn from the eval set")
p.add_argument("--metrics", nargs="+", choices=list(S.METRICS), default=["accuracy", "logit_diff", "loss"])
p.add_argument("--ablation", choices=ABLATIONS, default="zero", help="what an ablated head outputs")

p = commands.add_parser("search", parents=[common], help="the paper's greedy layer-by-layer head search")
search_args(p)
p.add_argument("--eval-examples", type=int, default=3000, help="the found circuit is evaluated on this many examples")

p = commands.add_parser("transfer", parents=[common], help="Table 3: each circuit evaluated on each model")
p.add_argument("--circuits", nargs="+", type=Path, required=True, help="circuit JSON files written by search")
p.add_argument("--examples", type=int, default=3000, help="eval set size (paper: 3000)")

p = commands.add_parser("classify", parents=[common], help="head classes and attention to c (Figure 2)")
p.add_argument("--examples", type=int, default=100, help="examples drawn from the eval set (paper: 100)")
p.add_argument("--score-threshold", type=float, default=0.4, help="mean attention that shows a class in an example")
p.add_argument("--min-fraction", type=float, default=0.8, help="fraction of examples needed to assign a class")
p.add_argument("--c-threshold", type=float, default=0.4, help="mean attention to c that makes a c-attending head")
p.add_argument("--circuits", nargs="*", type=Path, default=[], help="count classes among these circuits' heads")

p = commands.add_parser("generate", parents=[common], help="greedy continuations side by side (section 6.1)")
p.add_argument("--prompt", action="append", dest="prompts", default=None, help=f"repeatable; default: {DEFAULT_PROMPT!r}")
p.add_argument("--max-new-tokens", type=int, default=16)

p = commands.add_parser("study", parents=[common], help="everything above into one report directory")
search_args(p, "--search-examples")
p.add_argument("--examples", type=int, default=3000, help="first eval set: baseline and transfer (paper: 3000)")
p.add_argument("--single-examples", type=int, default=1150, help="single-token eval set (paper: 1150)")
p.add_argument("--sweep-examples", type=int, default=100, help="examples of the single-head sweep")
p.add_argument("--classify-examples", type=int, default=100, help="examples of the head classification")
p.add_argument("--max-new-tokens", type=int, default=16, help="length of the forgetting probe's continuations")
g = p.add_argument_group("edge circuits (ACDC, EAP-IG)")
g.add_argument("--no-edges", action="store_true", help="skip ACDC and EAP-IG")
g.add_argument("--acdc-models", nargs="*", default=None, metavar="LABEL",
               help="models to run ACDC on (default: the last model; none: no ACDC)")
g.add_argument("--acdc-threshold", type=float, default=0.7, help="ACDC's absolute KL threshold (the paper: 0.7)")
g.add_argument("--eap-top-k", type=int, default=100, help="edges kept by EAP-IG")
g.add_argument("--edge-examples", type=int, default=50, help="examples to find edge circuits on (as many evaluate)")

edge_cli.add_subcommands(commands)


# ---------------------------------------------------------------- commands
def session(args, n_eval: int = 3000, n_single: int = 1150) -> S.Session:
    return S.Session(args.models, seed=args.seed, n_eval=n_eval, n_single=n_single,
                     master_size=args.master_size, data_seed=args.data_seed, answer_space=args.answer_space)


def search_options(args) -> S.SearchOptions:
    return S.SearchOptions(metric=args.metric, threshold=args.threshold, order=args.order, drop=args.drop,
                           ablation=args.ablation, n_examples=args.search_examples,
                           rigorous_examples=args.rigorous, speculate=args.speculate)


def run_command(args, argv: list[str]) -> tuple[list[S.Section], Path]:
    out = args.out or Path("reports") / args.command
    if args.command == "study":
        ses = session(args, args.examples, args.single_examples)
        edges = None if args.no_edges else S.EdgeOptions(
            acdc_models=args.acdc_models, acdc_threshold=args.acdc_threshold, eap_top_k=args.eap_top_k,
            n_examples=args.edge_examples)
        opts = S.StudyOptions(search=search_options(args), sweep_examples=args.sweep_examples,
                              classify_examples=args.classify_examples, max_new_tokens=args.max_new_tokens,
                              edges=edges)
        return S.study(ses, out, opts, argv), out
    if args.command == "search":
        ses, opts = session(args, args.eval_examples), search_options(args)
        opts.check()
    elif args.command in ("baseline",):
        ses = session(args, args.examples, args.single_examples)
    elif args.command == "transfer":
        ses = session(args, args.examples)
        circuits = {}
        for f in args.circuits:
            c = load_circuit(f)
            circuits[c.get("label") or f.stem] = c
    elif args.command == "classify":
        check_class_args(args.score_threshold, args.min_fraction)
        ses = session(args)
        circuits = {(c := load_circuit(f)).get("label") or f.stem: c for f in args.circuits}
    else:
        ses = session(args)
    with atomic_dir(out) as tmp:
        if args.command == "baseline":
            section = S.baseline(ses, tmp)
        elif args.command == "sweep":
            section = S.head_sweep(ses, tmp, args.examples, args.metrics, args.ablation)
        elif args.command == "search":
            section, _ = S.find_circuits(ses, tmp, opts)
        elif args.command == "transfer":
            section = S.cross_evaluate(ses, tmp, circuits)
        elif args.command == "classify":
            section = S.classify(ses, tmp, args.examples, args.score_threshold, args.min_fraction, args.c_threshold,
                                 circuits or None)
        else:
            section = S.generate(ses, tmp, args.prompts or [DEFAULT_PROMPT], args.max_new_tokens)
        write_json(tmp / "provenance.json", provenance(argv, data=ses.data_info(),
                                                       args={k: str(v) for k, v in vars(args).items()}))
    return [section], out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # A kill (SIGTERM) unwinds like an error, so no half-built --out directory is left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "edge_command", None):
        return args.edge_command(args)
    try:
        sections, out = run_command(args, ["circuits.py", *argv])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "study":
        print("\n".join(f"- {s.title}: {s.summary}" for s in sections))
        print(f"\nreport: {out / 'report.md'}")
    else:
        print(sections[0].markdown)
        print(f"\nwritten to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
