"""The head census of published models, measured on their stored weights, in place.

    python -m finetune.publish runs/featherweight weights/featherweight --title ... --about ...
    python -m circuitlab.census weights/featherweight          # its head census, into the card
    python -m circuitlab.census weights/base weights/featherweight ...   # re-measured, after a change

Each model's ``head_census`` (:func:`circuitlab.classify.head_census`: what ``circuits.py classify``
counts, on the eval set its metadata.json names) is measured on the stored weights: metadata.json
gets the census and the card (README.md) its "## Head classes" section, before "## TPP metrics"
(a model just published) or anew (a census measured before: its prompts and thresholds are kept).
Nothing else changes; each file is written to a temporary file and renamed, so neither is ever
half-written, and the model's checksums (complete.json) follow. The census lives here, not in
finetune.publish, because finetune (the training library) does not depend on circuitlab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clikit import Parser, run
from finetune.checkpoint import read_json_object
from finetune.publish import eval_sets, frequent_tokens_of
from minigpt2 import load_pretrained
from minigpt2.fileio import MARKER, atomic_write, seal

from .classify import INDUCTION_EXAMPLES, PAPER_CLASS_COUNTS, head_census

SECTION = "## Head classes"
BEFORE = "## TPP metrics"  # a new census section goes just before this one
CENSUS_EXAMPLES = 100  # the paper's head classes: 100 examples
CLASS_NAMES = {"first": "first-token", "self": "self", "previous": "previous-token", "induction": "induction"}


def census_lines(census: dict) -> list[str]:
    """The card's head classes: what ``circuits.py classify`` counts (tests/test_bundled.py checks them)."""
    counts = ", ".join(f"{census['classes'][c]} {name}" for c, name in CLASS_NAMES.items())
    paper = ", ".join(f"{PAPER_CLASS_COUNTS[c]} {name}" for c, name in CLASS_NAMES.items())
    spans = census.get("classes_interval", {})  # the bootstrap interval over the prompts, when measured
    level = ""
    if spans:
        level = (f" The {census.get('interval_level', 0.95):.0%} bootstrap interval of each count over the prompts "
                 "(another draw of prompts may count otherwise): "
                 + ", ".join(f"{name} {spans[c][0]}–{spans[c][1]}" for c, name in CLASS_NAMES.items() if c in spans)
                 + ".")
    lines = [SECTION, "",
             f"On {census['n_examples']} prompts of the TPP eval set (`circuits.py classify --seed {census['seed']}`, "
             f"and the study's classify section, which draws the same prompts), by "
             f"the paper's rule (score > {census['score_threshold']} in at least {census['min_fraction']:.0%} of the "
             f"prompts): {counts} heads (the paper, in GPT-2 small's circuit: {paper}).{level}", ""]
    if "classes_bos" in census:
        bos = ", ".join(f"{census['classes_bos'][c]} {name}" for c, name in CLASS_NAMES.items())
        lines += [f"The same prompts with <|endoftext|> before each (TransformerLens's default input, "
                  f"`prepend_bos=True`; the TPP prompts have none): {bos} heads.", ""]
    for key, what in (("induction_random", "random tokens of the whole vocabulary (TransformerLens's recipe)"),
                      ("induction_frequent", "random tokens from the {pool_size:,} most frequent pretraining tokens")):
        if key in census:
            c = census[key]
            lines += [f"Induction score on {INDUCTION_EXAMPLES} repeated sequences of {c['seq_len']} "
                      + what.format(**c) + f": {c['heads']} heads > {census['score_threshold']} "
                      f"(largest {c['max']:.2f}).", ""]
    return lines


def with_section(card: str, lines: list[str], path: Path, new: bool = False) -> str:
    """``card`` with its "## Head classes" section (up to the next "## " heading) replaced by ``lines``;
    ``new``: inserted before "## TPP metrics" instead (a card published without a census yet)."""
    rows = card.split("\n")
    if new and SECTION not in rows and BEFORE in rows:
        at = rows.index(BEFORE)
        return "\n".join(rows[:at] + lines + rows[at:])
    if SECTION not in rows:
        raise ValueError(f"{path} has no '{SECTION}' section to refresh. Fix: publish the model again "
                         "(python -m finetune.publish), which writes the whole card, then measure its census "
                         "(python -m circuitlab.census)")
    start = rows.index(SECTION)
    end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
    return "\n".join(rows[:start] + lines + rows[end:])


@torch.no_grad()
def refresh(dest: Path, base: Path | None = None) -> dict:
    """Measure ``dest``'s census; write it into its metadata.json and card. Returns the census."""
    fix = "restore it with `git checkout weights/` or publish the model again"
    meta = read_json_object(dest / "metadata.json", fix)
    claimed, data = meta.get("head_census"), meta.get("eval_data")
    if not isinstance(data, dict) or not isinstance(claimed, (dict, type(None))):
        raise ValueError(f"{dest}/metadata.json has no eval_data (and head_census) to measure on. Fix: {fix}")
    first = next(iter(eval_sets(data["master_size"], data["data_seed"], data["eval_size"],
                                data["single_token_eval_size"], data.get("answer_space", "prompt")).values()))
    pool = frequent_tokens_of(meta, base)
    if claimed is None:  # just published: the paper's 100 prompts, drawn with the eval sets' seed
        census = head_census(load_pretrained(dest), first, min(CENSUS_EXAMPLES, len(first)), data["data_seed"], pool)
    else:
        census = head_census(load_pretrained(dest), first, claimed["n_examples"], claimed["seed"], pool,
                             claimed["score_threshold"], claimed["min_fraction"])
    card = with_section((dest / "README.md").read_text(), census_lines(census), dest / "README.md",
                        new=claimed is None)
    text = json.dumps(meta | {"head_census": census}, indent=2) + "\n"
    atomic_write(dest / "metadata.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(dest / "README.md", lambda tmp: Path(tmp).write_text(card))
    if (dest / MARKER).exists():
        seal(dest)  # its checksums again, the files changed on purpose
    return census


def compared_to(dest: Path) -> Path | None:
    """The base ``dest`` was published against (``--compare-to``, kept with its claims), if any."""
    meta = read_json_object(dest / "metadata.json", "restore it with `git checkout weights/` or publish the "
                                                    "model again")
    claims = meta.get("claims")
    return Path(claims["compare_to"]) if isinstance(claims, dict) and claims.get("compare_to") else None


def main(argv=None) -> None:
    p = Parser(prog="python -m circuitlab.census", description=__doc__)
    p.add_argument("models", nargs="+", type=Path, help="published model directories, e.g. weights/base")
    p.add_argument("--base", type=Path, default=None,
                   help="the base whose frequent_tokens a finetune's induction probe draws from (default: the "
                        "--compare-to it was published with, else weights/base beside each model)")
    args = p.parse_args(argv)
    for dest in args.models:
        census = refresh(dest, args.base or compared_to(dest) or dest.parent / "base")
        print(f"{dest}: {census['classes']} as they are, {census['classes_bos']} with <|endoftext|> first")


def cli(argv=None) -> int:
    """The command line: 0, or one line ``python -m circuitlab.census: error: ...`` and status 2 (130 on Ctrl-C)."""
    return run("python -m circuitlab.census", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
