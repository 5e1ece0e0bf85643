"""Finetune GPT-2 on the Transitive Property Problem, or pretrain a small GPT-2 on text.

    python train.py finetune --preset featherweight --out runs/featherweight
    python train.py pretrain --n-layer 12 --n-head 12 --d-model 96 --out runs/wordnet-12x12
    torchrun --nproc_per_node 4 train.py finetune --preset welterweight --out runs/welterweight
    python train.py finetune --out runs/featherweight --resume        # after a crash or Ctrl-C

A running train.py locks its --out (OUT/.lock, released by the OS when the process ends, however it
ends): a second one on the same run is refused, naming the first. --resume verifies each file of the
checkpoint against the sha256 its complete.json records, and the training data against the hash the
run recorded (an edited corpus is refused unless --accept-data-change, which metadata.json records).

Every setting is a flag below; the resolved values go to OUT/args.json. The loop,
data, checkpoints and evaluation live in the finetune package. An impossible flag value
is refused before any work (exit status 2). A NaN or inf stops the run (exit status 3)
without saving it, printing the command that goes on: a fresh start with a lower --lr, or,
when a checkpoint predates the divergence, --resume with a lower --lr (after such a stop,
--resume accepts a changed --lr, --warmup-steps or --grad-clip, and records it in args.json).

Throughput (tokens/s is on the progress bar and in log.jsonl): pretraining the
12-layer, 12-head, d_model 96 model (6.2 M parameters, 4.8 M of them the tied
50257-token embedding, whose unembedding is most of the compute) on WordNet
(1.99 M tokens, 15,540 blocks of 128) ran at about 170-180 tokens/s on a
two-core CPU shared with other jobs (load average ~6), so one epoch takes hours
there; finetuning unembeds only the c tokens and is far cheaper per token.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_BASE = "weights/gpt2"

# Defaults that differ by mode; a finetune preset overrides these, an explicit flag overrides both.
MODE_DEFAULTS = {
    "finetune": dict(lr=5e-5, batch_size=64, epochs=3, fraction=0.10, weight_decay=0.0, warmup_steps=0,
                     schedule="linear", eval_size=3000),
    "pretrain": dict(lr=6e-4, batch_size=64, epochs=1, fraction=1.0, weight_decay=0.1, warmup_steps=100,
                     schedule="cosine", eval_size=64),
}
# Flags that may differ when resuming a run (they do not change what is computed, or only its speed).
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "accept_data_change", "max_steps", "device", "dtype", "micro_batch_size", "progress",
                        "log_every", "eval_every", "save_every", "keep_checkpoints", "out"}
# ... and these too, after a stop on a NaN/inf (the change is recorded in args.json, changed_on_resume)
MAY_CHANGE_AFTER_NON_FINITE = {"lr", "warmup_steps", "grad_clip"}
# Flags added after runs were saved, with the value that computes what those runs computed
ADDED_LATER = {"head_dropout": 0.0, "recall": 0.0}

# What each numeric flag allows. Whole numbers: the least value (None also allowed where listed);
# numbers: an interval, its brackets saying whether each end is allowed.
WHOLE_AT_LEAST = {"epochs": 1, "batch_size": 1, "micro_batch_size": 1, "max_steps": 1, "warmup_steps": 0,
                  "log_every": 1, "eval_every": 0, "save_every": 0, "keep_checkpoints": 1, "seed": 0, "eval_size": 1,
                  "master_size": 1, "data_seed": 0, "single_token_eval_size": 1, "block_size": 2, "repeat_docs": 1, "repeat_vocab": 0,
                  "repeat_length": 0,
                  "n_layer": 1, "n_head": 1, "d_model": 1, "d_mlp": 1, "n_ctx": 1}
OPTIONAL = {"micro_batch_size", "max_steps"}
NUMBER_IN = {"lr": "(0, inf)", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "head_dropout": "[0, 1)",
             "min_lr_ratio": "[0, 1]", "fraction": "(0, 1]", "copy_spans": "[0, 1]", "random_repeats": "[0, 1]",
             "recall": "[0, 1]"}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help, by tpp.flags.HelpFormatter's rule (restated here: tpp imports torch)."""

    def _get_help_string(self, action):
        d, help = action.default, action.help or ""
        if (d is None or d is argparse.SUPPRESS or d in ("", []) or isinstance(d, bool) or action.required or not action.option_strings
                or "default:" in help.lower()):
            return help
        return f"{help} (default: {d})"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``train.py: error: --flag ...`` (exit status 2), and every
    option's default in --help (sub-parsers included)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + ": ", message)
        self.exit(2, f"train.py: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    run = common.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory: args.json, log.jsonl, checkpoints/, model/")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start anew")
    run.add_argument("--seed", type=int, default=0, help="data order (and, for pretraining, initialisation)")
    run.add_argument("--accept-data-change", action="store_true",
                     help="with --resume: go on although the training data differs from the data the run "
                          "started on (an edited corpus file); the change is recorded in metadata.json")

    opt = common.add_argument_group("optimization (AdamW)")
    opt.add_argument("--epochs", type=int, help="passes over the training data (default: finetune the preset's, 3 or 20; pretrain 1)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default: finetune 5e-5, pretrain 6e-4)")
    opt.add_argument("--batch-size", type=int, help="examples per optimizer step, over all processes (default: 64)")
    opt.add_argument("--micro-batch-size", type=int,
                     help="examples per forward pass on one process; smaller than a process's share of "
                          "--batch-size means gradient accumulation (default: the whole share)")
    opt.add_argument("--weight-decay", type=float, help="AdamW decay on matrices (default: finetune 0, pretrain 0.1)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    opt.add_argument("--head-dropout", type=float, default=0.0,
                     help="chance of dropping each head's output, per example and step (GPT-2 trained with "
                          "dropout 0.1; dropped heads make the model grow backups, such as a second "
                          "previous-token head); 0 disables it")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: finetune 0, pretrain 100)")
    opt.add_argument("--schedule", choices=["linear", "cosine", "constant"],
                     help="after warmup, over all epochs: linear to 0, cosine, or constant (default: finetune linear, "
                          "pretrain cosine)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine schedule's floor, as a fraction of --lr")
    opt.add_argument("--max-steps", type=int,
                     help="stop after this many optimizer steps in all (small runs); the schedule still spans "
                          "every epoch, so a run stopped here and resumed equals one run (default: none, every epoch)")

    data = common.add_argument_group("data")
    data.add_argument("--fraction", type=float,
                      help="finetune: fraction of the master dataset; pretrain: of the corpus's blocks (default: finetune the "
                           "preset's, pretrain 1)")
    data.add_argument("--eval-size", type=int,
                      help="finetune: examples in the first TPP eval set; pretrain: held-out blocks (default: finetune 3000, "
                           "pretrain 64)")

    hw = common.add_argument_group("hardware")
    hw.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    hw.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere (weights stay float32)")

    io = common.add_argument_group("logging and checkpoints")
    io.add_argument("--log-every", type=int, default=1, help="steps between lines of log.jsonl")
    io.add_argument("--eval-every", type=int, default=0, help="steps between evaluations; 0: each epoch end")
    io.add_argument("--save-every", type=int, default=0, help="steps between checkpoints; 0: each epoch end")
    io.add_argument("--keep-checkpoints", type=int, default=1, help="how many checkpoints to keep")
    io.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    parser = Parser(description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)

    ft = modes.add_parser("finetune", parents=[common], help="supervised finetuning on TPP (the paper's section 4)")
    task = ft.add_argument_group("finetuning")
    task.add_argument("--preset", choices=["featherweight", "lightweight", "welterweight"], default="featherweight",
                      help="the paper's runs: 10%% x 3 epochs, 30%% x 3, 50%% x 20 (lr 5e-5, batch 64)")
    task.add_argument("--base", default=DEFAULT_BASE,
                      help="directory with the base model's model.safetensors + config.json (GPT-2 small)")
    task.add_argument("--label-style", choices=["paper", "teacher-forced"], default="paper",
                      help="paper: inputs hold only the prompt, c's tokens are labels after it; "
                           "teacher-forced: c's tokens are also inputs, each predicted from the ones before")
    task.add_argument("--answer-space", choices=["prompt", "answer"], default="prompt",
                      help="prompt: the paper's format, the prompt keeps its trailing space and c is encoded on "
                           "its own; answer: the space moves onto c (' c', the single-token eval set's format)")
    task.add_argument("--master-size", type=int, default=158_000, help="examples in the master dataset")
    task.add_argument("--data-seed", type=int, default=0, help="seed of the master dataset and eval sets")
    task.add_argument("--single-token-eval-size", type=int, default=1150,
                      help="examples in the second eval set (c one token)")

    pt = modes.add_parser("pretrain", parents=[common], help="train a small GPT-2 from scratch on text")
    corpus = pt.add_argument_group("corpus")
    corpus.add_argument("--corpus", default="wordnet",
                        help="'wordnet' (WordNet 3.0 glosses and examples via nltk; set NLTK_DATA), 'gcide' (the "
                             "Collaborative International Dictionary of English: apt-get install dict-gcide), a .txt "
                             "path, or several joined by '+' (wordnet+gcide)")
    corpus.add_argument("--block-size", type=int, default=128, help="tokens per packed training block")
    corpus.add_argument("--repeat-docs", type=int, default=1,
                        help="write each document this many times in a row: a repeat is predictable only by "
                             "copying from context, a direct training signal for induction heads")
    corpus.add_argument("--copy-spans", type=float, default=0.0,
                        help="fraction of training blocks in which a span of the block's text is copied to a "
                             "later place (induction-head signal)")
    corpus.add_argument("--random-repeats", type=float, default=0.0,
                        help="fraction of training blocks replaced by a repeated sequence of random tokens")
    corpus.add_argument("--recall", type=float, default=0.0,
                        help="fraction of training blocks of associative recall: random (key, value) pairs "
                             "listed round after round in new orders (previous-token-head signal)")
    corpus.add_argument("--repeat-vocab", type=int, default=0,
                        help="draw --random-repeats' and --recall's tokens from this many most frequent tokens "
                             "of the corpus "
                             "(default: 0, the whole vocabulary)")
    corpus.add_argument("--repeat-length", type=int, default=0,
                        help="longest --random-repeats sequence, at least 8 (default: 0, half a block); shorter "
                             "sequences repeat more often, a denser copying signal; --recall lists up to half "
                             "as many pairs")
    corpus.add_argument("--init", help="start from this checkpoint's weights (continued pretraining) instead of a "
                                       "random initialisation; its shape must equal the model flags (default: none)")
    arch = pt.add_argument_group("model (GPT-2 tokenizer, vocabulary 50257)")
    arch.add_argument("--n-layer", type=int, default=12, help="transformer blocks")
    arch.add_argument("--n-head", type=int, default=12, help="attention heads per block")
    arch.add_argument("--d-model", type=int, default=96, help="residual width; a multiple of --n-head")
    arch.add_argument("--d-mlp", type=int, help="MLP width (default: 4 x --d-model)")
    arch.add_argument("--n-ctx", type=int, help="positions (default: --block-size)")
    parser.modes = {"finetune": ft, "pretrain": pt}
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags: preset first (finetune), then the mode's defaults."""
    from finetune import PRESETS

    filled = dict(PRESETS[args.preset].to_dict()) if args.mode == "finetune" else {}
    for key, value in {**MODE_DEFAULTS[args.mode], **filled}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode == "pretrain":
        args.d_mlp = args.d_mlp or 4 * args.d_model
        args.n_ctx = args.n_ctx or args.block_size
    else:
        preset = PRESETS[args.preset].to_dict()
        args.preset_overrides = {k: getattr(args, k) for k in preset if getattr(args, k) != preset[k]}
    return args


# ---------------------------------------------------------------- checking the flags
def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def whole_problem(value, least: int) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
    return None if ok else f"must be a whole number >= {least}"


def number_problem(value, interval: str) -> str | None:
    """None if ``value`` is a finite number in ``interval`` ("(0, 1]", "[0, inf)", ...), else why not."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    bound = f"{'>' if interval[0] == '(' else '>='} {lo:g}" if hi == math.inf else f"in {interval}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"must be a finite number {bound}"
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return None if above and below else f"must be a number {bound}"


def out_problem(out: str) -> str | None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"--out {out} is a file, not a run directory: choose another --out"
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"--out {out}: {existing} is a file, so no directory can be made there: choose another --out"
    return None


def flag_problem(args) -> str | None:
    """The first impossible value of a single flag, as '--flag value: why'; None if none."""
    if args.resume and args.overwrite:
        return "--resume and --overwrite contradict each other: keep one"
    for dest, least in WHOLE_AT_LEAST.items():
        value = getattr(args, dest, None)
        if hasattr(args, dest) and not (value is None and dest in OPTIONAL):
            if (why := whole_problem(value, least)) is not None:
                return f"{flag(dest)} {value}: {why}"
    for dest, interval in NUMBER_IN.items():
        if hasattr(args, dest) and (why := number_problem(getattr(args, dest), interval)) is not None:
            return f"{flag(dest)} {getattr(args, dest)}: {why}"
    if not DEVICE.match(str(args.device)):
        return f"--device {args.device}: choose auto, cpu, cuda, cuda:N or mps"
    return out_problem(args.out)


def cross_problem(args) -> str | None:
    """The first problem of several flags together (each alone has passed)."""
    if args.mode == "pretrain":
        if args.d_model % args.n_head:
            return f"--d-model {args.d_model} is not a multiple of --n-head {args.n_head}"
        if args.block_size > args.n_ctx:
            return f"--block-size {args.block_size} exceeds --n-ctx {args.n_ctx}: raise --n-ctx"
        if args.copy_spans + args.random_repeats + args.recall > 1:
            return (f"--copy-spans {args.copy_spans} + --random-repeats {args.random_repeats} + --recall "
                    f"{args.recall} exceed 1")
        if args.repeat_vocab > 50256:
            return f"--repeat-vocab {args.repeat_vocab} exceeds the vocabulary's 50256 tokens (0: all of them)"
        if args.repeat_length and not 8 <= args.repeat_length <= args.block_size // 2:
            return (f"--repeat-length {args.repeat_length} must be in [8, {args.block_size // 2}] (half of "
                    f"--block-size {args.block_size}, so that each sequence repeats), or 0")
    elif round(args.fraction * args.master_size) < 1:
        return f"--fraction {args.fraction} of --master-size {args.master_size} keeps no example: raise --fraction"
    return None


def validate(parser: argparse.ArgumentParser, args, source: Path | None = None, cross: bool = True) -> None:
    """Refuse impossible flag values the argparse way (one line, exit status 2), before any work.
    ``source``: the run's args.json, merged in (its values were not checked yet); ``cross``: also
    check flags against each other (not before a resumed run's args.json is read)."""
    why = flag_problem(args)
    if why is not None and source is not None:
        why += f" (the value comes from {source}: repair it there)"
    if why is None and cross:
        why = cross_problem(args)
        if why is not None and source is not None:
            why += f" (with the values of {source})"
    if why is not None:
        parser.error(why)


def parse(argv=None) -> argparse.Namespace:
    """Parse, resolve and check; with --resume, the run's saved args.json supplies every flag not given again."""
    parser = build_parser()
    args = resolve(parser.parse_args(argv))
    validate(parser, args, cross=not args.resume)
    if args.resume:
        args = merge_saved_args(parser, argv, args)
    return args


def merge_saved_args(parser, argv, args) -> argparse.Namespace:
    """The flags of a run being resumed: its args.json, overridden by ``argv`` where allowed."""
    from finetune.checkpoint import check_resume_args, read_json_object, read_non_finite_note

    saved_path = Path(args.out) / "args.json"
    if not saved_path.exists():
        if (Path(args.out) / "checkpoints").is_dir():
            raise ValueError(f"{saved_path} is missing, so the run's settings are unknown. Fix: restore it (each "
                             "checkpoint's metadata.json records the command that started the run), or start the "
                             "run again with --overwrite")
        validate(parser, args)
        return args
    saved = read_json_object(saved_path, fix="it holds the run's settings: repair it (each checkpoint's "
                                             "metadata.json records the command that started the run), or start "
                                             "the run again with --overwrite")
    added = {k: v for k, v in ADDED_LATER.items() if k in vars(args)}  # flags of this mode only
    saved = added | unset_as_default(args, saved)
    parser.modes[args.mode].set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "overwrite")})
    args = resolve(parser.parse_args(argv))
    validate(parser, args, source=saved_path)
    may_change = MAY_CHANGE_ON_RESUME | (MAY_CHANGE_AFTER_NON_FINITE if read_non_finite_note(args.out) else set())
    check_resume_args(saved, vars(args), may_change)
    return args


def unset_as_default(args, saved: dict) -> dict:
    """``saved`` with each flag that the run's args.json lacks or holds as None (the run predates the
    flag) set to the flag's default: the value that computes what the run computed. A None that is
    the flag's own default stays None."""
    defaults = vars(build_parser().parse_args([args.mode, "--out", str(args.out)]))  # resolve() fills the rest
    filled = {k: v for k, v in defaults.items() if v is not None and saved.get(k) is None}
    return saved | filled


def record_resume_changes(args) -> None:
    """After a NaN/inf stop, flags changed on --resume are written to args.json (so a later
    --resume keeps them), with the step they took effect at under changed_on_resume."""
    from finetune.checkpoint import latest_checkpoint, read_json_object, write_json

    path = Path(args.out) / "args.json"
    saved = read_json_object(path, fix="restore it")
    changed = {k: [saved.get(k), getattr(args, k)] for k in sorted(MAY_CHANGE_AFTER_NON_FINITE)
               if saved.get(k) != getattr(args, k)}
    if changed:
        step = int(latest_checkpoint(args.out).name.removeprefix("step-"))
        args.changed_on_resume = saved.get("changed_on_resume", []) + [{"step": step, "changed": changed}]
        write_json(path, {**saved, **{k: new for k, (_, new) in changed.items()},
                          "changed_on_resume": args.changed_on_resume})


# ---------------------------------------------------------------- advice after a NaN/inf stop
def settings_argv(args, leave_out=("resume", "overwrite", "accept_data_change")) -> list[str]:
    """Arguments that reproduce the run's settings: the mode, --out, and every flag whose value
    differs from the one it would get unset."""
    parser = build_parser()
    unset = vars(resolve(parser.parse_args([args.mode, "--out", args.out])))
    argv = [args.mode, "--out", str(args.out)]
    for action in parser.modes[args.mode]._actions:
        dest = action.dest
        if not action.option_strings or dest in (*leave_out, "help", "out") or getattr(args, dest) == unset[dest]:
            continue
        option = action.option_strings[0]
        argv += [option] if action.nargs == 0 else [option, str(getattr(args, dest))]
    return argv


def advised_commands(args, err) -> str:
    """The commands that follow a NonFiniteLoss's advice, to run as they are."""
    lr = f"{min(args.lr / 10, MODE_DEFAULTS[args.mode]['lr']):g}"
    if err.fix == "resume":
        commands = [[args.mode, "--out", str(args.out), "--resume", "--lr", lr]]
    else:
        commands = [settings_argv(args, leave_out=("resume", "overwrite", "accept_data_change", "lr"))
                    + ["--overwrite", "--lr", lr]]
        if err.bfloat16 and err.checkpoint is not None:
            commands.append([args.mode, "--out", str(args.out), "--resume", "--dtype", "float32"])
    return "\n".join(f"  {shlex.join(['python', 'train.py', *c])}" for c in commands)


def load_base(path: str):
    from minigpt2 import load_pretrained

    base = Path(path)
    if not (base / "model.safetensors").exists() and not (base / "model.safetensors.index.json").exists():
        raise FileNotFoundError(
            f"no base weights at {base}/model.safetensors. GPT-2 small's weights are the Hugging Face files "
            "openai-community/gpt2: model.safetensors and config.json "
            "(https://huggingface.co/openai-community/gpt2/tree/main). Put both under weights/gpt2/, "
            "or point --base at the directory that holds them")
    return load_pretrained(base)


COPYING_POOL = 4000  # the copying eval's token pool when --repeat-vocab is 0: this many most frequent tokens


def copying_pool(args, data):
    """The copying probe's tokens: the training data's --repeat-vocab most frequent (else
    COPYING_POOL), most frequent first; a torch tensor."""
    import torch

    import finetune

    n_pool = getattr(args, "repeat_vocab", 0) or COPYING_POOL  # runs from before --repeat-vocab lack it
    return torch.from_numpy(finetune.frequent_tokens(data.input_ids.numpy(), n_pool))


def pretrain_evaluator(args, data, held_out, pool=None):
    """Held-out text loss, and copying on repeated random tokens from ``pool`` (default
    ``copying_pool``): when induction heads form."""
    import finetune

    heldout = finetune.heldout_evaluator(held_out)
    if args.n_ctx < 5:  # no room for [<|endoftext|>, s, s] with |s| >= 2
        return heldout
    pool = copying_pool(args, data) if pool is None else pool
    copying = finetune.copying_evaluator(pool, seq_len=min(50, (args.n_ctx - 1) // 2))
    return lambda model: heldout(model) | copying(model)


def build(args):
    """(model, data, evaluator or None, metadata) for the mode."""
    import torch

    import finetune
    from minigpt2 import GPT2, GPT2Config

    main_rank = finetune.Dist.from_env().main
    if args.mode == "finetune":
        model = load_base(args.base)
        data, master = finetune.finetune_data(args.fraction, args.label_style, args.master_size, args.data_seed,
                                              args.answer_space)
        data.check_fits(model.cfg, f"--base {args.base}")  # the TPP rows in GPT-2's tokens: named, not a raw error
        evaluate = finetune.tpp_evaluator(master, args.eval_size, args.single_token_eval_size,
                                          seed=args.data_seed, space=args.answer_space) if main_rank else None
        meta = {"preset": args.preset, "preset_overrides": args.preset_overrides, "base": args.base,
                "label_style": args.label_style, "answer_space": args.answer_space}
    else:
        cfg = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_mlp=args.d_mlp,
                         n_ctx=args.n_ctx)
        if args.init:
            model = load_base(args.init).float()
            if model.cfg != cfg:
                raise ValueError(f"--init {args.init} holds a model of shape {model.cfg.to_dict()}, the flags ask for "
                                 f"{cfg.to_dict()}: pass the model flags that match it")
        else:
            model = GPT2(cfg)
            model.init_weights(seed=args.seed)
        data, held_out = finetune.pretrain_data(args.corpus, args.block_size, args.fraction, args.eval_size,
                                                args.repeat_docs, args.copy_spans, args.random_repeats, args.seed,
                                                getattr(args, "repeat_vocab", 0), getattr(args, "repeat_length", 0),
                                                args.recall)
        pool = copying_pool(args, data)
        evaluate = pretrain_evaluator(args, data, held_out, pool) if main_rank else None
        meta = {"preset": None, "corpus": args.corpus, "init": args.init, "n_params": sum(p.numel() for p in model.parameters()),
                # the tokens this model was trained on most: circuits.py draws its copying probes from them
                "frequent_tokens": pool.tolist()}
    meta |= {"mode": args.mode, "seed": args.seed, "data_fraction": args.fraction, "data_sha256": data.sha256(),
             "data": data.info, "model_config": model.cfg.to_dict(), "torch": torch.__version__}
    return model, data, evaluate, meta


def train_config(args):
    from finetune import TrainConfig

    return TrainConfig(
        out=args.out, epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip, head_dropout=args.head_dropout,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, max_steps=args.max_steps, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, device=args.device, dtype=args.dtype, resume=args.resume,
        progress=args.progress)


def start_run_dir(args, d, meta: dict, lock) -> None:
    """Rank 0 prepares --out (recovering, clearing or creating it) and locks it, checks that a resumed
    run's data is its own (recording an accepted change in ``meta``), and writes or updates args.json."""
    import torch.distributed as dist

    from finetune import prepare_run_dir
    from finetune.checkpoint import check_resume_data, write_json

    if d.world > 1:  # every rank has checked --out before rank 0 changes it
        dist.barrier()
    if d.main:
        prepare_run_dir(args.out, args.resume, args.overwrite)
        lock.acquire()  # a no-op if --out existed: it was locked before the slow part
        if args.resume:
            changes = check_resume_data(Path(args.out), meta, args.accept_data_change)
            if changes:
                meta["data_changes"] = changes
            record_resume_changes(args)
        else:
            write_json(Path(args.out) / "args.json", vars(args))
    if d.world > 1:
        dist.barrier()


def main(argv=None, on_step=None) -> dict:
    """Run train.py with ``argv``; return the final metadata. ``on_step(trainer)``: see finetune.Trainer."""
    args = parse(argv)  # before torch is imported: a bad flag costs milliseconds
    import torch.distributed as dist

    from finetune import Dist, NonFiniteLoss, Trainer, prepare_run_dir
    from minigpt2.fileio import DirLock
    from finetune.trainer import init_distributed, resolve_device

    d = Dist.from_env()
    init_distributed(d, resolve_device(args.device, d))
    prepare_run_dir(args.out, args.resume, args.overwrite, create=False)  # fail before the slow part
    lock = DirLock(args.out, "run directory")  # a second train.py on this run is refused, naming this one
    if d.main and Path(args.out).is_dir():
        lock.acquire()  # else when start_run_dir has made --out: nothing is written before the slow part
    try:
        model, data, evaluate, meta = build(args)
        meta["command"] = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])
        start_run_dir(args, d, meta, lock)
        if getattr(args, "changed_on_resume", None):
            meta["changed_on_resume"] = args.changed_on_resume
        return Trainer(model, data, train_config(args), evaluate, meta, on_step=on_step).train()
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{e}. Run:\n{advised_commands(args, e)}", e.fix, e.checkpoint, e.bfloat16) from None
    finally:
        lock.release()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def exit_status(e: BaseException) -> int | None:
    """train.py's exit status for an error it explains in one message (2: flags or files,
    3: NaN/inf, 130: Ctrl-C); None for one it does not expect (its traceback is shown)."""
    trainer = sys.modules.get("finetune.trainer")  # imported by then if the error is its NonFiniteLoss
    if trainer is not None and isinstance(e, trainer.NonFiniteLoss):
        return 3
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if isinstance(e, (OSError, ValueError)) else None


def cli(argv=None) -> int:
    """train.py's command line; returns the exit status."""
    try:
        meta = main(argv)
    except SystemExit as e:  # argparse: --help, or a bad flag (already printed)
        return e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        status = exit_status(e)
        if status is None:
            raise
        if status == 130:
            print(f"\n{e or 'interrupted'}; continue with the same command plus --resume", file=sys.stderr)
        else:
            print(f"train.py: error: {e}", file=sys.stderr)
        return status
    print(json.dumps({"steps": meta["steps"], "final_metrics": meta["final_metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
