"""python -m tpp: build, show and describe TPP datasets; rebuild the shipped noun list.

    python -m tpp build --out data/tpp            # train.jsonl (158,000), eval.jsonl (3000),
                                                  # eval_single_token.jsonl (1150), args.json
    python -m tpp show --n 5                      # a few examples and their tokens
    python -m tpp stats --file data/tpp/train.jsonl
    python -m tpp templates                       # the known templates and their names
    python -m tpp build-nouns                     # regenerate tpp/data/nouns.txt from WordNet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tpp.examples import MAX_EXAMPLES
from clikit import HelpFormatter, Parser, blame, fail, integer, number

DATA_DIR = Path(__file__).resolve().parent / "data"
OUTPUTS = ("train.jsonl", "eval.jsonl", "eval_single_token.jsonl", "args.json")  # what build writes
SEED = integer(0, why="numpy seeds are non-negative")
COUNT = integer(1, MAX_EXAMPLES, why="at most tpp.examples.MAX_EXAMPLES, so that the examples fit in memory")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m tpp", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_source(p, n_default):
        g = p.add_argument_group("what to generate (ignored with --file)")
        g.add_argument("--seed", type=SEED, default=0, help="random seed (>= 0); the same seed gives the same examples")
        g.add_argument("--n", type=COUNT, default=n_default, help=f"number of examples (1 to {MAX_EXAMPLES:,})")
        g.add_argument("--templates", default=None,
                       help="comma-separated names (see `python -m tpp templates`), 'all', or a file with "
                            "one template a line; default: the paper's seven")
        g.add_argument("--nouns", default="shipped",
                       help="'shipped' (WordNet 3.0 list in the package), 'wordnet' (live nltk corpus, "
                            "via NLTK_DATA), or a file with one noun a line")

    p = sub.add_parser("build", help="build the master dataset and both eval sets, save them as JSONL")
    add_source(p, 158_000)
    g = p.add_argument_group("evaluation sets")
    g.add_argument("--eval-n", type=COUNT, default=3000, help="size of the random eval set (paper: 3000)")
    g.add_argument("--single-n", type=COUNT, default=1150,
                   help="size of the eval set where ' c' is one token (paper: 1150)")
    g.add_argument("--disjoint-nouns", action="store_true",
                   help="draw train and eval nouns from disjoint pools (beyond the paper)")
    g.add_argument("--eval-noun-fraction", type=number(0, 1, lo_open=True, why="a share of the nouns"), default=0.2,
                   help="with --disjoint-nouns: the share of nouns reserved for the eval sets")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="folder for the JSONL files and args.json")
    g.add_argument("--overwrite", action="store_true", help="replace the files of a dataset already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (on a terminal) or progress lines (in a log)")

    for name, n_default, what in (("show", 5, "print examples and their GPT-2 tokens"),
                                  ("stats", 158_000, "print token-length, single-token and template statistics")):
        p = sub.add_parser(name, help=what)
        add_source(p, n_default)
        p.add_argument("--file", type=Path, default=None, help="read examples from a JSONL file instead (default: none, generate them)")
        if name == "show":
            p.add_argument("--single-token", action="store_true",
                           help="show the single-token scheme (trailing space moved onto ' c')")

    sub.add_parser("templates", help="list the known templates; * marks the defaults")

    p = sub.add_parser("build-nouns", help="regenerate nouns.txt and WORDNET_LICENSE from nltk's WordNet")
    p.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where to write them (default: tpp/data)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the files in --out-dir differ from a fresh build")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args) -> None:
    """What can be checked before any example is built; raises ValueError naming the flag and the fix."""
    if args.command in ("build", "show", "stats"):
        if getattr(args, "file", None) is not None:
            _check_jsonl(args.file)
        else:
            _check_source(args)
    if args.command == "build":
        _check_folder(args.out, "--out")
        there = [name for name in OUTPUTS if (args.out / name).exists()]
        if there and not args.overwrite:
            raise ValueError(f"--out {args.out} already holds a dataset ({', '.join(there)}); pass --overwrite "
                             "to replace it, or another folder")
    if args.command == "build-nouns":
        _check_folder(args.out_dir, "--out-dir")


def _check_jsonl(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"--file {path} is a folder; pass one of its JSONL files "
                         f"(e.g. {path / 'train.jsonl'}, written by `python -m tpp build`)")
    if not path.is_file():
        raise ValueError(f"--file {path}: no such file; pass a JSONL file written by `python -m tpp build`")


def _check_source(args) -> None:
    from tpp.nouns import SHIPPED, WORDNET, load_nouns
    from tpp.templates import load_templates

    with blame("--templates"):
        load_templates(args.templates)
    if args.nouns not in (SHIPPED, WORDNET):  # the shipped list is known good; 'wordnet' is read when used
        with blame("--nouns"):
            load_nouns(args.nouns)


def _check_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; pass a folder to write into")


def _examples(args):
    from tpp.examples import make_examples
    from tpp.jsonl import load_examples

    if args.file is not None:
        with blame("--file"):
            examples = load_examples(args.file)
        if not examples:
            raise ValueError(f"--file {args.file} holds no examples; pass a JSONL file written by `python -m tpp build`")
        return examples[: args.n] if args.command == "show" else examples
    with blame("--n", args.n):
        return make_examples(args.n, seed=args.seed, templates=args.templates, nouns=args.nouns)


def cmd_build(args) -> None:
    from tpp.examples import (make_eval_set, make_single_token_eval_set, master_dataset, split_nouns)
    from minigpt2.fileio import write_files
    from minigpt2.progress import progress
    from tpp.jsonl import jsonl_text
    from tpp.nouns import load_nouns

    nouns = load_nouns(args.nouns)
    train_nouns, eval_nouns = nouns, nouns
    if args.disjoint_nouns:
        with blame("--eval-noun-fraction", args.eval_noun_fraction):
            train_nouns, eval_nouns = split_nouns(nouns, args.eval_noun_fraction, args.seed)
    # each part takes seconds (the train set's tokens about half of it): a bar, or a line per part in a log
    with progress(total=5, desc="tpp build", unit="part", enabled=args.progress) as bar:
        with blame("--n", args.n):
            train = master_dataset(seed=args.seed, n=args.n, templates=args.templates, nouns=train_nouns)
        bar.update(1, f"{len(train):,} train examples")
        with blame("--eval-n", args.eval_n):
            evals = make_eval_set(args.eval_n, seed=args.seed, exclude=train, templates=args.templates,
                                  nouns=eval_nouns)
        bar.update(1, f"{len(evals):,} eval examples")
        with blame("--single-n", args.single_n):
            single = make_single_token_eval_set(args.single_n, seed=args.seed, exclude=train,
                                                templates=args.templates, nouns=eval_nouns)
        bar.update(1, f"{len(single):,} single-token eval examples")
        # Everything is built and serialized before the first write, so a failure leaves no partial dataset.
        texts = {"train.jsonl": jsonl_text(train), "eval.jsonl": jsonl_text(evals),
                 "eval_single_token.jsonl": jsonl_text(single),
                 "args.json": json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                          if k != "progress"}, indent=2) + "\n"}
        bar.update(1, "tokens and JSONL text")
        write_files(args.out, texts)  # all or none: a full disk leaves neither a part nor an empty --out
        bar.update(1, f"written to {args.out}")
    print(f"wrote {len(train)} train, {len(evals)} eval and {len(single)} single-token eval examples to {args.out}")


def cmd_show(args) -> None:
    from minigpt2.tokenizer import get_tokenizer

    examples = _examples(args)
    tok = get_tokenizer()
    for e in examples:
        prompt = e.prompt[:-1] if args.single_token else e.prompt
        answer = (" " if args.single_token else "") + e.c
        print(f"[{e.template}] a={e.a!r} b={e.b!r} c={e.c!r}")
        print(f"  prompt {prompt!r} -> {answer!r}")
        print(f"  prompt tokens {[tok.decode([t]) for t in tok.encode_ordinary(prompt)]}")
        print(f"  c tokens      {[tok.decode([t]) for t in tok.encode_ordinary(answer)]}")


def _histogram(counts: Counter, total: int) -> str:
    return "\n".join(f"    {k:>4}: {v:>7} ({v / total:6.1%})" for k, v in sorted(counts.items()))


def cmd_stats(args) -> None:
    from tpp.encoding import encode_many

    examples = _examples(args)
    n = len(examples)
    prompt_len = [len(p) for p in encode_many([e.prompt for e in examples])]
    c_len = [len(c) for c in encode_many([e.c for e in examples])]
    c_space_len = [len(c) for c in encode_many([" " + e.c for e in examples])]
    print(f"examples: {n} ({len({e.prompt for e in examples})} distinct prompts)")
    print(f"prompt tokens (trailing space included): min {min(prompt_len)}, "
          f"mean {sum(prompt_len) / n:.2f}, max {max(prompt_len)}")
    print(_histogram(Counter(prompt_len), n))
    print(f"longest training row (prompt + c tokens; encode_for_training's T): "
          f"{max(p + c for p, c in zip(prompt_len, c_len))}")
    print(f"c is one token on its own: {sum(x == 1 for x in c_len) / n:.1%}; "
          f"' c' is one token: {sum(x == 1 for x in c_space_len) / n:.1%}")
    print("c tokens (on its own):")
    print(_histogram(Counter(c_len), n))
    print("examples per template:")
    for name, count in sorted(Counter(e.template for e in examples).items()):
        print(f"    {name}: {count} ({count / n:.1%})")


def cmd_templates(args) -> None:
    from tpp.templates import DEFAULT_TEMPLATE_NAMES, TEMPLATES

    for name, text in TEMPLATES.items():
        print(f"{'*' if name in DEFAULT_TEMPLATE_NAMES else ' '} {name}: {text}")
    names_of: dict[str, list[str]] = {}
    for name in DEFAULT_TEMPLATE_NAMES:
        names_of.setdefault(TEMPLATES[name], []).append(name)
    for names in names_of.values():
        if len(names) > 1:
            print(f"note: {' and '.join(names)} have the same text: the paper's appendix lists it "
                  f"{'twice' if len(names) == 2 else f'{len(names)} times'}, so drawing templates uniformly gives it the paper's weight, {len(names)}/"
                  f"{len(DEFAULT_TEMPLATE_NAMES)}")


def cmd_build_nouns(args) -> int:
    from tpp.jsonl import write_atomic
    from tpp.nouns import format_noun_file, wordnet_license_text, wordnet_nouns

    nouns, version = wordnet_nouns()
    files = {"nouns.txt": format_noun_file(nouns, version), "WORDNET_LICENSE": wordnet_license_text()}
    if files["WORDNET_LICENSE"] is None:
        raise LookupError("the WordNet corpus found by nltk has no LICENSE file; its license must ship beside "
                          "nouns.txt. Fix: use a complete WordNet corpus (nltk.download('wordnet')).")
    if args.check:
        stale = [name for name, text in files.items()
                 if not (args.out_dir / name).is_file() or (args.out_dir / name).read_text(encoding="utf-8") != text]
        print(f"{', '.join(stale)} differ from a fresh build" if stale else "up to date")
        return 1 if stale else 0
    for name, text in files.items():
        write_atomic(args.out_dir / name, text)
    print(f"wrote {len(nouns)} WordNet {version} nouns to {args.out_dir / 'nouns.txt'}")
    return 0


def main(argv=None) -> int:
    """Exit status: 0, 1 (build-nouns --check found stale files) or 2 with one line ``prog: error: ...``
    (a bad flag makes argparse exit 2 the same way)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"build": cmd_build, "show": cmd_show, "stats": cmd_stats, "templates": cmd_templates,
                "build-nouns": cmd_build_nouns}
    try:
        check_args(args)
        return commands[args.command](args) or 0
    except (ValueError, LookupError, OSError) as e:
        return fail(f"{parser.prog} {args.command}", e)
    except KeyboardInterrupt:  # as train.py and circuits.py: one line, status 130; writes are all-or-none
        print(f"\n{parser.prog} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
