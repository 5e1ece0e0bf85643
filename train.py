"""Finetune GPT-2 on the Transitive Property Problem, or pretrain a small GPT-2 on text.

    python train.py finetune --preset featherweight --out runs/featherweight
    python train.py pretrain --n-layer 12 --n-head 12 --d-model 96 --out runs/wordnet-12x12
    torchrun --nproc_per_node 4 train.py finetune --preset welterweight --out runs/welterweight
    python train.py finetune --out runs/featherweight --resume        # after a crash or Ctrl-C

A running train.py locks its --out (OUT/.lock, released by the OS when the process ends, however it
ends): a second one on the same run is refused, naming the first. --resume verifies each file of the
checkpoint against the sha256 its complete.json records, and the training data against the hash the
run recorded (an edited corpus is refused unless --accept-data-change, which metadata.json records).

Every setting is a flag: the training loop's are finetune.TrainConfig's fields, each flag built
from its field (default, help and range written once, there); the data's and the model's are
declared below. The resolved values go to OUT/args.json. The loop, data, checkpoints, resuming
and evaluation live in the finetune package. An impossible flag value
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
import re
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from clikit import Parser, Range, as_flags, dtype_flag, flag, in_flags
from finetune.config import TrainConfig, config_problems, default, mode_default
from finetune.presets import PRESETS
from finetune.resume import advised_commands, check_resumed, record_resume_changes, saved_settings

ROOT = Path(__file__).resolve().parent
DEFAULT_BASE = "weights/gpt2"
PRESET_FLAGS = set(PRESETS["featherweight"].to_dict())  # unset, they take the --preset's values
WHOLE = dict(whole=True)
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def add(group, dest: str, range: Range | None = None, **kwargs) -> None:
    """A flag that is not a TrainConfig setting (data, model, run directory), with its range."""
    group.add_argument(flag(dest), **kwargs)
    if range is not None:
        RANGES[dest] = range


RANGES: dict[str, Range] = {}  # what add() declared; TrainConfig's settings carry their own


def add_config_flags(p, groups, mode: str) -> None:
    """One flag per TrainConfig field, its default, help, range and choices taken from the field."""
    for f in fields(TrainConfig):
        md = f.metadata
        if md.get("flag") is False:
            continue
        g, help, value = groups[md["group"]], md["help"], mode_default(f, mode)
        if f.type == "bool":
            name = flag(f.name) if not value else "--no-" + f.name.replace("_", "-")
            g.add_argument(name, dest=f.name, action="store_false" if value else "store_true", help=help)
            continue
        kwargs = dict(type=int if f.type.startswith("int") else float if f.type == "float" else str,
                      choices=md.get("choices"), help=help, default=value)
        if md.get("flag") == "required":
            kwargs.update(required=True, default=None)
        if mode == "finetune" and f.name in PRESET_FLAGS:
            kwargs.update(default=None, help=f"{help} (default: the --preset's)")
        g.add_argument(flag(f.name), **kwargs)


def mode_parser(modes, mode: str, help: str):
    p = modes.add_parser(mode, help=help, error_prog="train.py", flag_first=True)
    groups = {name: p.add_argument_group(name) for name in
              ("run", "optimization (AdamW)", "data", "hardware", "logging and checkpoints")}
    add_config_flags(p, groups, mode)
    run, data = groups["run"], groups["data"]
    add(run, "overwrite", action="store_true", help="delete the run already in --out and start anew")
    add(run, "accept_data_change", action="store_true",
        help="with --resume: go on although the training data differs from the data the run started on (an "
             "edited corpus file); the change is recorded in metadata.json")
    groups["hardware"].add_argument("--dtype", default=default("dtype"), type=dtype_flag,
                                    choices=["auto", "fp32", "bf16"],
                                    help="autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere (weights "
                                         "stay float32)")
    if mode == "finetune":
        add(data, "fraction", Range(0, 1, lo_open=True), type=float,
            help="fraction of the master dataset (default: the --preset's)")
        add(data, "eval_size", Range(1, **WHOLE), type=int, default=3000, help="examples in the first TPP eval set")
    else:
        add(data, "fraction", Range(0, 1, lo_open=True), type=float, default=1.0, help="fraction of the corpus's blocks")
        add(data, "eval_size", Range(1, **WHOLE), type=int, default=64, help="held-out blocks")
    return p


def finetune_flags(p) -> None:
    task = p.add_argument_group("finetuning")
    add(task, "preset", choices=list(PRESETS), default="featherweight",
        help="the paper's runs: 10%% x 3 epochs, 30%% x 3, 50%% x 20 (lr 5e-5, batch 64)")
    add(task, "base", default=DEFAULT_BASE,
        help="directory with the base model's model.safetensors + config.json (GPT-2 small)")
    add(task, "label_style", choices=["paper", "teacher-forced"], default="paper",
        help="paper: inputs hold only the prompt, c's tokens are labels after it; "
             "teacher-forced: c's tokens are also inputs, each predicted from the ones before")
    add(task, "answer_space", choices=["prompt", "answer"], default="prompt",
        help="prompt: the paper's format, the prompt keeps its trailing space and c is encoded on "
             "its own; answer: the space moves onto c (' c', the single-token eval set's format)")
    add(task, "master_size", Range(1, **WHOLE), type=int, default=158_000, help="examples in the master dataset")
    add(task, "data_seed", Range(0, **WHOLE), type=int, default=0, help="seed of the master dataset and eval sets")
    add(task, "single_token_eval_size", Range(1, **WHOLE), type=int, default=1150,
        help="examples in the second eval set (c one token)")


def pretrain_flags(p) -> None:
    corpus = p.add_argument_group("corpus")
    add(corpus, "corpus", default="wordnet",
        help="'wordnet' (WordNet 3.0 glosses and examples via nltk; set NLTK_DATA), 'gcide' (the "
             "Collaborative International Dictionary of English: apt-get install dict-gcide), a .txt "
             "path, or several joined by '+' (wordnet+gcide)")
    add(corpus, "block_size", Range(2, **WHOLE), type=int, default=128, help="tokens per packed training block")
    add(corpus, "repeat_docs", Range(1, **WHOLE), type=int, default=1,
        help="write each document this many times in a row: a repeat is predictable only by "
             "copying from context, a direct training signal for induction heads")
    add(corpus, "copy_spans", Range(0, 1), type=float, default=0.0,
        help="fraction of training blocks in which a span of the block's text is copied to a "
             "later place (induction-head signal)")
    add(corpus, "random_repeats", Range(0, 1), type=float, default=0.0,
        help="fraction of training blocks replaced by a repeated sequence of random tokens")
    add(corpus, "recall", Range(0, 1), type=float, default=0.0,
        help="fraction of training blocks of associative recall: random (key, value) pairs "
             "listed round after round in new orders (previous-token-head signal)")
    add(corpus, "repeat_vocab", Range(0, **WHOLE), type=int, default=0,
        help="draw --random-repeats' and --recall's tokens from this many most frequent tokens "
             "of the corpus (default: 0, the whole vocabulary)")
    add(corpus, "repeat_length", Range(0, **WHOLE), type=int, default=0,
        help="longest --random-repeats sequence, at least 8 (default: 0, half a block); shorter "
             "sequences repeat more often, a denser copying signal; --recall lists up to half "
             "as many pairs")
    add(corpus, "init", help="start from this checkpoint's weights (continued pretraining) instead of a "
                             "random initialisation; its shape must equal the model flags (default: none)")
    arch = p.add_argument_group("model (GPT-2 tokenizer, vocabulary 50257)")
    add(arch, "n_layer", Range(1, **WHOLE), type=int, default=12, help="transformer blocks")
    add(arch, "n_head", Range(1, **WHOLE), type=int, default=12, help="attention heads per block")
    add(arch, "d_model", Range(1, **WHOLE), type=int, default=96, help="residual width; a multiple of --n-head")
    add(arch, "d_mlp", Range(1, optional=True, **WHOLE), type=int, help="MLP width (default: 4 x --d-model)")
    add(arch, "n_ctx", Range(1, optional=True, **WHOLE), type=int, help="positions (default: --block-size)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="train.py", description=__doc__, error_prog="train.py", flag_first=True)
    modes = parser.add_subparsers(dest="mode", required=True)
    ft = mode_parser(modes, "finetune", "supervised finetuning on TPP (the paper's section 4)")
    finetune_flags(ft)
    pt = mode_parser(modes, "pretrain", "train a small GPT-2 from scratch on text")
    pretrain_flags(pt)
    parser.modes = {"finetune": ft, "pretrain": pt}
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags: a finetuning preset's settings, pretraining's computed model widths."""
    if args.mode == "pretrain":
        args.d_mlp = args.d_mlp or 4 * args.d_model
        args.n_ctx = args.n_ctx or args.block_size
        return args
    preset = PRESETS[args.preset].to_dict()
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset_overrides = {k: getattr(args, k) for k in preset if getattr(args, k) != preset[k]}
    return args


# ---------------------------------------------------------------- checking the flags
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
    problems = config_problems(args) + [(dest, rng.problem(getattr(args, dest))) for dest, rng in RANGES.items()
                                        if hasattr(args, dest)]
    for dest, why in problems:
        if why is not None:
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
    saved = saved_settings(args.out, vars(args))
    if saved is None:  # nothing saved yet: a fresh start
        validate(parser, args)
        return args
    saved = unset_as_default(args, saved)
    parser.modes[args.mode].set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "overwrite")})
    args = resolve(parser.parse_args(argv))
    validate(parser, args, source=Path(args.out) / "args.json")
    check_resumed(saved, vars(args), args.out)
    return args


def unset_as_default(args, saved: dict) -> dict:
    """``saved`` with each flag that the run's args.json lacks or holds as None (the run predates the
    flag) set to the flag's default: the value that computes what the run computed. A None that is
    the flag's own default stays None."""
    defaults = vars(build_parser().parse_args([args.mode, "--out", str(args.out)]))  # resolve() fills the rest
    filled = {k: v for k, v in defaults.items() if v is not None and saved.get(k) is None}
    return saved | filled


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
    from circuitlab.copying import copying_evaluator

    heldout = finetune.heldout_evaluator(held_out)
    if args.n_ctx < 5:  # no room for [<|endoftext|>, s, s] with |s| >= 2
        return heldout
    pool = copying_pool(args, data) if pool is None else pool
    copying = copying_evaluator(pool, seq_len=min(50, (args.n_ctx - 1) // 2))
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
    """TrainConfig from the flags: each of its settings is a flag of the same name."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


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
        settings = settings_argv(args, leave_out=("resume", "overwrite", "accept_data_change", "lr"))
        advice = advised_commands(e, args.mode, args.out, args.lr, settings)
        said = in_flags(str(e), ("lr", "warmup_steps", "grad_clip", "dtype", "resume", "overwrite"))
        raise NonFiniteLoss(f"{said}. Run:\n{advice}", e.fix, e.checkpoint, e.bfloat16) from None
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


# The flag of each library parameter that an error of finetune's data may name: "repeat=0 must be ..." is said
# "--repeat-docs 0 must be ..." (clikit.as_flags).
LIBRARY_FLAGS = {**{p: flag(p) for p in ("fraction", "copy_spans", "random_repeats", "recall", "repeat_vocab",
                                          "repeat_length", "block_size", "corpus")},
                 "repeat": "--repeat-docs", "eval_blocks": "--eval-size"}


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
            print(f"train.py: error: {as_flags(str(e), LIBRARY_FLAGS)}", file=sys.stderr)
        return status
    print(json.dumps({"steps": meta["steps"], "final_metrics": meta["final_metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
