"""Circuit analysis of the Transitive Property Problem: the paper's experiments as commands.

    python circuits.py baseline                     # Tables 1 and 2
    python circuits.py sweep                        # every head ablated alone, heatmaps
    python circuits.py search --threshold 0.03      # the attention-focused search (section 5.3)
    python circuits.py transfer --circuits reports/search/circuit_*.json   # Table 3 (after search; the study: reports/study/)
    python circuits.py classify                     # head classes, attention to c (Figure 2)
    python circuits.py generate                     # the forgetting probe (section 6.1)
    python circuits.py study --out reports/study    # all of it, one report
    python circuits.py acdc / eap                   # edge circuits: ACDC; eap --method NAME for the others

Each command writes JSON, PNG and markdown to --out (replaced whole, only once
complete) and prints its table. Models default to the bundled ones in weights/.
Every command takes --device (cpu, cuda, cuda:N; default cuda if available, else cpu);
sweep, search, study, acdc and eap also take --dtype fp32|bf16 (bf16 matmuls, fp32 metrics).
Every command runs under torchrun with the same flags and the one-process numbers, its work
split over the ranks (torchrun --nproc-per-node N circuits.py sweep ...; README, "Many GPUs,
many machines"); rank 0 alone writes --out.
A bad flag, model directory or circuit file is refused before any work, in one line
"circuits.py COMMAND: error: ..." (exit status 2) that names it and the fix.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import atexit
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from circuitlab import edge_cli, study as S
from circuitlab.circuitfile import load_circuits
from circuitlab.probe import DEFAULT_PROMPT
from circuitlab.report import atomic_dir, check_out_dir, provenance, write_json
from circuitlab.search import DROPS, ORDERS
from circuitlab.sweep import ABLATIONS
from tpp.encoding import SPACES
from tpp.examples import EVAL_SIZE, MAX_EXAMPLES, SINGLE_TOKEN_EVAL_SIZE
from minigpt2 import distributed
from minigpt2.hardware import bf16_outlook
from clikit import HelpFormatter, Parser, blame, default_device, device, dtype_flag, fail, integer, number, text

# ---------------------------------------------------------------- arguments
# Each flag's type refuses an impossible value while the command line is parsed (one line, exit 2);
# what depends on several flags, the model directories or the circuit files is checked by setup().
EXAMPLES = integer(1, MAX_EXAMPLES, why="at most tpp.examples.MAX_EXAMPLES, so that the eval set fits in memory")
DRAW = integer(1, EVAL_SIZE, why=f"a draw from the {EVAL_SIZE}-example eval set")
SEED = integer(0, why="seeds are non-negative")
ATTENTION = number(0, 1, why="an attention weight")

parser = Parser(prog="circuits.py", description=__doc__, formatter_class=HelpFormatter)
commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

common = argparse.ArgumentParser(add_help=False)
g = common.add_argument_group("models and data")
g.add_argument("--models", nargs="+", default=S.DEFAULT_MODELS, metavar="[LABEL=]DIR",
               help="model directories (config.json + model.safetensors), optionally labelled; default: the bundled four")
g.add_argument("--seed", type=SEED, default=0, help="seed of the eval sets and of every random choice")
g.add_argument("--master-size", type=integer(0, MAX_EXAMPLES), default=None,
               help="exclude the first N examples of the master dataset from the eval sets "
                    "(default: the largest master_size in the models' metadata.json)")
g.add_argument("--data-seed", type=SEED, default=None, help="seed of that master dataset (default: from metadata.json)")
g.add_argument("--answer-space", choices=SPACES, default=None,
               help="first eval set's format: prompt (the paper's: trailing space, c on its own) or answer (' c'); "
                    "default: the one the models were finetuned in (metadata.json), else prompt")
g = common.add_argument_group("output and machine")
g.add_argument("--out", type=Path, default=None,
               help="output directory (default: reports/COMMAND); replaced when done, so it must be new, empty "
                    "or an earlier report")
g.add_argument("--threads", type=integer(1), default=None,
               help="torch CPU threads (default: the CPUs this process may use, within a container's quota)")
g.add_argument("--no-progress", dest="progress", action="store_false",
               help="no progress bars (on a terminal) or progress lines (in a log)")
g.add_argument("--device", type=device, default=None,
               help="where the models run: cpu, cuda, cuda:N (default: cuda if available, else cpu)")


def dtype_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dtype", type=dtype_flag, choices=S.DTYPES, default="fp32",
                   help=f"arithmetic of {what}: fp32, or bf16 (bf16 matmuls with fp32 accumulation; residual stream "
                        "and metrics in fp32)")


def search_args(p: argparse.ArgumentParser, examples_flag: str = "--examples") -> None:
    g = p.add_argument_group("circuit search (section 5.3)")
    g.add_argument("--metric", choices=list(S.METRICS), default="accuracy", help="performance measure of each check")
    g.add_argument("--threshold", type=number(0), default=0.03,
                   help="keep an ablation whose drop is below this (a relative drop: in [0, 1])")
    g.add_argument("--drop", choices=DROPS, default=None,
                   help="relative: (baseline - value) / |baseline| (the paper's reading); absolute: baseline - value; "
                        "signs flip for loss and kl (default: relative, absolute for kl)")
    g.add_argument("--order", choices=ORDERS, default="layer-up", help="layer-up (the paper) or layer-down (as ACDC)")
    g.add_argument("--ablation", choices=ABLATIONS, default="zero", help="what an ablated head outputs (paper: zero)")
    g.add_argument(examples_flag, dest="search_examples", type=EXAMPLES, default=100,
                   help="examples per check (paper: 100)")
    g.add_argument("--rigorous", type=integer(0, MAX_EXAMPLES), default=0, metavar="N",
                   help="re-check every kept ablation on N examples (0: off)")
    g.add_argument("--speculate", type=integer(1), default=None,
                   help="heads per speculative batch (default: 1 on a CPU, where batching saves nothing, 8 on a GPU)")


p = commands.add_parser("baseline", parents=[common], help="Tables 1 and 2: loss, accuracy, logit difference")
p.add_argument("--examples", type=EXAMPLES, default=3000, help="examples in the first eval set (paper: 3000)")
p.add_argument("--single-examples", type=EXAMPLES, default=1150, help="examples in the single-token set (paper: 1150)")

p = commands.add_parser("sweep", parents=[common], help="every head ablated alone; heatmaps of the effects")
p.add_argument("--examples", type=DRAW, default=100, help="examples drawn from the eval set")
p.add_argument("--metrics", nargs="+", choices=list(S.METRICS), default=["accuracy", "logit_diff", "loss"],
               help="one heatmap per metric: accuracy, logit_diff (c minus b), loss (cross-entropy of c), "
                    "kl (to the unablated model)")
p.add_argument("--ablation", choices=ABLATIONS, default="zero", help="what an ablated head outputs")
dtype_arg(p, "the ablated forwards")

p = commands.add_parser("search", parents=[common], help="the paper's greedy layer-by-layer head search")
search_args(p)
p.add_argument("--eval-examples", type=EXAMPLES, default=3000,
               help="the found circuit is evaluated on this many examples")
dtype_arg(p, "the search and the circuit's evaluation")

p = commands.add_parser("transfer", parents=[common], help="Table 3: each circuit evaluated on each model")
p.add_argument("--circuits", nargs="+", type=Path, required=True, help="circuit JSON files written by search")
p.add_argument("--examples", type=EXAMPLES, default=3000, help="eval set size (paper: 3000)")

p = commands.add_parser("classify", parents=[common], help="head classes and attention to c (Figure 2)")
p.add_argument("--examples", type=DRAW, default=100, help="examples drawn from the eval set (paper: 100)")
p.add_argument("--score-threshold", type=ATTENTION, default=0.4, help="mean attention that shows a class in an example")
p.add_argument("--min-fraction", type=number(0, 1, lo_open=True, why="a share of the examples"), default=0.8,
               help="fraction of examples needed to assign a class")
p.add_argument("--c-threshold", type=ATTENTION, default=0.4, help="mean attention to c that makes a c-attending head")
p.add_argument("--circuits", nargs="*", type=Path, default=[],
               help="count classes among these circuits' heads (each labelled with one of --models); default: none")

p = commands.add_parser("generate", parents=[common], help="greedy continuations side by side (section 6.1)")
p.add_argument("--prompt", action="append", dest="prompts", type=text, default=None,
               help=f"repeatable; default: {DEFAULT_PROMPT!r}")
p.add_argument("--max-new-tokens", type=integer(1), default=16,
               help="tokens to generate per prompt (greedy); at most the models' context length less the prompt's")

p = commands.add_parser("study", parents=[common], help="everything above into one report directory")
search_args(p, "--search-examples")
p.add_argument("--examples", type=EXAMPLES, default=3000, help="first eval set: baseline and transfer (paper: 3000)")
p.add_argument("--single-examples", type=EXAMPLES, default=1150, help="single-token eval set (paper: 1150)")
p.add_argument("--sweep-examples", type=EXAMPLES, default=100, help="examples of the single-head sweep")
p.add_argument("--classify-examples", type=DRAW, default=100,
               help="examples of the head classification, drawn from the 3000-example eval set as classify draws them")
p.add_argument("--max-new-tokens", type=integer(1), default=16, help="length of the forgetting probe's continuations")
g = p.add_argument_group("edge circuits (ACDC, EAP-IG)")
g.add_argument("--no-edges", action="store_true", help="skip ACDC and EAP-IG")
g.add_argument("--acdc-models", nargs="*", default=None, metavar="LABEL",
               help="models to run ACDC on (default: the last model; none: no ACDC)")
g.add_argument("--acdc-threshold", type=number(0), default=0.7, help="ACDC's absolute KL threshold (the paper: 0.7)")
g.add_argument("--eap-top-k", type=integer(1), default=100, help="edges kept by EAP-IG")
g.add_argument("--edge-examples", type=integer(1, MAX_EXAMPLES // 2), default=50,
               help="examples to find edge circuits on (as many evaluate)")
g.add_argument("--mib-methods", nargs="*", default=list(S.EdgeOptions.mib_methods), metavar="METHOD",
               help="edge methods compared by MIB's CPR / CMD on every model (none: skip the comparison); "
                    "also acdc, eap-ig-activations, edge-patching, learned-masks (minutes per model on a CPU)")
g.add_argument("--mib-examples", type=integer(2, MAX_EXAMPLES // 2), default=S.EdgeOptions.mib_examples,
               help="prompts the methods score edges on (as many held out measure them)")
dtype_arg(p, "the sweep, the search, ACDC and EAP-IG (the baseline and transfer tables stay fp32)")

edge_cli.add_subcommands(commands)


# ---------------------------------------------------------------- commands
SAME_SHAPE = ("sweep", "search", "transfer", "classify", "study")  # one grid of heads for every model


def session(args) -> S.Session:
    n_eval, n_single = EVAL_SIZE, SINGLE_TOKEN_EVAL_SIZE  # sweep, classify and generate draw from these
    if args.command in ("baseline", "study"):
        n_eval, n_single = args.examples, args.single_examples
    elif args.command == "transfer":
        n_eval = args.examples
    elif args.command == "search":
        n_eval = args.eval_examples
    return S.Session(args.models, seed=args.seed, n_eval=n_eval, n_single=n_single,
                     master_size=args.master_size, data_seed=args.data_seed, answer_space=args.answer_space,
                     device=default_device(args.device))


def search_options(args) -> S.SearchOptions:
    return S.SearchOptions(metric=args.metric, threshold=args.threshold, order=args.order, drop=args.drop,
                           ablation=args.ablation, n_examples=args.search_examples,
                           rigorous_examples=args.rigorous, speculate=args.speculate, dtype=args.dtype)


def study_options(args) -> S.StudyOptions:
    edges = None if args.no_edges else S.EdgeOptions(
        acdc_models=args.acdc_models, acdc_threshold=args.acdc_threshold, eap_top_k=args.eap_top_k,
        n_examples=args.edge_examples, dtype=args.dtype, mib_methods=tuple(args.mib_methods),
        mib_examples=args.mib_examples)
    return S.StudyOptions(search=search_options(args), sweep_examples=args.sweep_examples,
                          classify_examples=args.classify_examples, max_new_tokens=args.max_new_tokens, edges=edges,
                          sweep_dtype=args.dtype)


def setup(args) -> tuple[S.Session, dict[str, dict]]:
    """Everything checked before a model is loaded or a dataset built: the model directories (their
    config.json and metadata.json) and shapes, the circuit files, the flags that bound one another,
    --out. Returns the session and the circuits; raises ValueError or FileNotFoundError."""
    ses = session(args)
    ses.configs  # noqa: B018  (every model directory and its config.json, read now)
    if args.command in SAME_SHAPE:
        ses.check_same_shape()
    circuits = {}
    if args.command == "transfer":
        circuits = load_circuits(args.circuits, ses.configs)
    elif args.command == "classify":
        circuits = load_circuits(args.circuits, ses.configs, own_model=True)
    if args.command in ("classify", "study"):
        ses.frequent_tokens  # read and checked now, before any work
    if args.command in ("generate", "study"):
        check_room(ses, args.prompts if args.command == "generate" and args.prompts else [DEFAULT_PROMPT],
                   args.max_new_tokens)
    if args.command in ("search", "study"):
        opts = search_options(args)
        opts.check()
        flag, eval_flag = ("--examples", "--eval-examples") if args.command == "search" else ("--search-examples",
                                                                                             "--examples")
        ses.check_sample(opts.n_examples, flag, eval_flag)
        if opts.rigorous_examples:
            ses.check_sample(opts.rigorous_examples, "--rigorous", eval_flag)
    if args.command == "study":
        ses.check_sample(args.sweep_examples, "--sweep-examples", "--examples")
        edges = study_options(args).edges
        if edges is not None:
            edges.acdc_models_of(ses)
            if edges.mib_methods:
                from circuitlab.methods import check_methods
                with blame("--mib-methods", " ".join(edges.mib_methods)):
                    check_methods(edges.mib_methods)
    check_out_dir(out_dir(args))
    return ses, circuits


def check_room(ses: S.Session, prompts: list[str], max_new_tokens: int) -> None:
    """Refuse more new tokens than the models' context holds after the longest prompt: generation
    would stop there, and the probe would count fewer tokens than asked for."""
    from minigpt2 import get_tokenizer

    enc = get_tokenizer()
    longest = max(len(enc.encode_ordinary(p)) for p in prompts)
    n_ctx = min(cfg.n_ctx for cfg in ses.configs.values())
    if longest >= n_ctx:
        raise ValueError(f"--prompt: a prompt of {longest} tokens fills the models' context of {n_ctx} tokens, "
                         "leaving no room to generate; shorten it")
    room = n_ctx - longest
    if max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {max_new_tokens:,}: the models' context holds {n_ctx} tokens and the "
                         f"longest prompt has {longest}, so at most {room} new tokens fit; pass "
                         f"--max-new-tokens {room} or less")


def out_dir(args) -> Path:
    return args.out or Path("reports") / args.command


def section(make):
    """A command that writes one report section: ``make(args, session, circuits, tmp)`` fills the
    directory ``tmp`` (renamed to --out once complete) and returns the section."""
    def write(args, ses: S.Session, circuits: dict[str, dict], argv: list[str]) -> list[S.Section]:
        with atomic_dir(out_dir(args)) as tmp:
            made = make(args, ses, circuits, tmp)
            write_json(tmp / "provenance.json", provenance(argv, data=ses.data_info(),
                                                           args={k: str(v) for k, v in vars(args).items()}))
        return [made]
    return write


def study(args, ses: S.Session, circuits, argv: list[str]) -> list[S.Section]:
    return S.study(ses, out_dir(args), study_options(args), argv)


# What each report command writes: (args, session, circuits, argv) -> sections, after setup().
REPORTS = {
    "baseline": section(lambda args, ses, circuits, tmp: S.baseline(ses, tmp)),
    "sweep": section(lambda args, ses, circuits, tmp: S.head_sweep(ses, tmp, args.examples, args.metrics,
                                                                    args.ablation, dtype=args.dtype)),
    "search": section(lambda args, ses, circuits, tmp: S.find_circuits(ses, tmp, search_options(args))[0]),
    "transfer": section(lambda args, ses, circuits, tmp: S.cross_evaluate(ses, tmp, circuits)),
    "classify": section(lambda args, ses, circuits, tmp: S.classify(
        ses, tmp, args.examples, args.score_threshold, args.min_fraction, args.c_threshold, circuits or None)),
    "generate": section(lambda args, ses, circuits, tmp: S.generate(ses, tmp, args.prompts or [DEFAULT_PROMPT],
                                                                     args.max_new_tokens)),
    "study": study,
}


def report(args, argv: list[str]) -> int:
    """Run a report command: everything checked (setup), then its sections written to --out and shown."""
    ses, circuits = setup(args)
    default = " (the default --models: the bundled ones)" if args.models == S.DEFAULT_MODELS else ""
    print(f"[{args.command}] models: {', '.join(f'{label}={path}' for label, path in ses.paths.items())}{default}",
          file=sys.stderr, flush=True)
    if getattr(args, "dtype", "fp32") == "bf16":  # advice before any work: where bf16 cannot win (issue 27)
        step = 1.0 if args.command in ("search", "study") and args.metric == "accuracy" else 0.0
        for note in dict.fromkeys(bf16_outlook(cfg, ses.device, metric_step=step) for cfg in ses.configs.values()):
            if note:
                print(f"[{args.command}] note: {note}", file=sys.stderr, flush=True)
    # A kill (SIGTERM) unwinds like an error, so no half-built --out directory is left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sections = REPORTS[args.command](args, ses, circuits, ["circuits.py", *argv])
    out = out_dir(args)
    if args.command == "study":
        print("\n".join(f"- {s.title}: {s.summary}" for s in sections))
        print(f"\nreport: {out / 'report.md'}")
    else:
        print(sections[0].markdown)
        print(f"\nwritten to {out}/")
    return 0


# The one dispatch table: every subcommand's handler, (args, argv) -> exit status.
COMMANDS = {**{name: report for name in REPORTS}, **edge_cli.COMMANDS}


def library_flags(command: str) -> dict[str, str]:
    """The flag that sets each library parameter an error of ``command`` may name (clikit.as_flags: circuitlab
    speaks in its parameters, "n_eval=0 must be ...", and the command says "--examples 0 must be ...")."""
    if command in edge_cli.COMMANDS:
        return edge_cli.FLAGS
    flags = {"model_specs": "--models", "n_eval": "--examples", "n_single": "--single-examples", "seed": "--seed",
             "master_size": "--master-size", "data_seed": "--data-seed", "answer_space": "--answer-space",
             "dtype": "--dtype", "out": "--out", "threshold": "--threshold", "drop": "--drop", "order": "--order",
             "n_examples": "--examples", "rigorous_examples": "--rigorous", "speculate": "--speculate",
             "acdc_models": "--acdc-models", "max_new_tokens": "--max-new-tokens",
             "score_threshold": "--score-threshold", "min_fraction": "--min-fraction", "c_threshold": "--c-threshold"}
    if command == "search":
        flags["n_eval"] = "--eval-examples"
    if command == "study":
        flags["n_examples"] = "--search-examples"
    return flags


def join_ranks(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1, e.g. ``torchrun --nproc-per-node 2 circuits.py sweep``): join the process
    group (NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU), whose ranks then split every method's
    work (prompt blocks, head-mask variants, edges, gradient passes) with the one-process numbers. Rank 0 alone writes --out and shows
    progress; the other ranks write to a scratch directory, removed at exit, and print nothing to stdout.
    Returns whether it joined (main() then leaves the group at the end: minigpt2.distributed.leave)."""
    if not distributed.launched():
        return False
    args.device = str(distributed.init_from_env(getattr(args, "device", None)))
    if not distributed.is_writer():
        from minigpt2.progress import set_enabled

        set_enabled(False)
        args.out = Path(tempfile.mkdtemp(prefix=f"circuits-rank{distributed.rank()}-"))
        atexit.register(shutil.rmtree, args.out, ignore_errors=True)
        sys.stdout = open(os.devnull, "w")
    return True


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one line ``circuits.py COMMAND: error: ...`` on stderr: a bad flag while
    parsing (argparse exits), anything else found by setup() before any work, or an error while running."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from minigpt2.progress import set_enabled, setting

    before = setting()  # restored at the end: main() called in-process (a notebook, a test) leaves no trace
    set_enabled(None if args.progress else False)  # --no-progress: no bar, no progress line, in any stage
    joined, status = False, 1
    try:
        joined = join_ranks(args)
        status = COMMANDS[args.command](args, argv)
        return status
    # OSError: a read-only --out or a full disk (minigpt2.fileio.WriteError) too; DistributedError: a rank's failure
    except (ValueError, OSError, distributed.DistributedError) as e:
        return fail(f"{parser.prog} {args.command}", e, library_flags(args.command))
    except KeyboardInterrupt:  # as train.py: one line, status 130; atomic_dir has removed the partial --out
        print(f"\n{parser.prog} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        set_enabled(before)
        if joined:  # every rank done (or, after a failure, at once): the group torn down before exit
            distributed.leave(wait=status == 0)


if __name__ == "__main__":
    sys.exit(main())
