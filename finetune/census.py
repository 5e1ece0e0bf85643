"""Re-measure the head census of published models on their stored weights, in place.

    python -m finetune.census weights/base weights/featherweight ...

For a census that gained a measurement after the models were published (finetune.publish writes
it at publishing time): each model's ``head_census`` (circuitlab.classify.head_census, on the eval
set its metadata.json names) is measured again; metadata.json gets the new census and the card
(README.md) its "## Head classes" section anew. Nothing else changes; each file is written to a
temporary file and renamed, so neither is ever half-written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minigpt2 import load_pretrained
from minigpt2.fileio import MARKER, atomic_write, seal

from circuitlab.classify import head_census
from tpp.flags import HelpFormatter

from .checkpoint import read_json_object
from .publish import census_lines, eval_sets, frequent_tokens_of

SECTION = "## Head classes"


def with_section(card: str, lines: list[str], path: Path) -> str:
    """``card`` with its "## Head classes" section (up to the next "## " heading) replaced by ``lines``."""
    rows = card.split("\n")
    if SECTION not in rows:
        raise ValueError(f"{path} has no '{SECTION}' section to refresh. Fix: publish the model again "
                         "(python -m finetune.publish), which writes the whole card")
    start = rows.index(SECTION)
    end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
    return "\n".join(rows[:start] + lines + rows[end:])


@torch.no_grad()
def refresh(dest: Path, base: Path | None = None) -> dict:
    """Measure ``dest``'s census again; write it into its metadata.json and card. Returns the census."""
    fix = "restore it with `git checkout weights/` or publish the model again"
    meta = read_json_object(dest / "metadata.json", fix)
    claimed = meta.get("head_census")
    data = meta.get("eval_data")
    if not isinstance(claimed, dict) or not isinstance(data, dict):
        raise ValueError(f"{dest}/metadata.json has no head_census and eval_data to measure again. Fix: {fix}")
    first = next(iter(eval_sets(data["master_size"], data["data_seed"], data["eval_size"],
                                data["single_token_eval_size"], data.get("answer_space", "prompt")).values()))
    pool = frequent_tokens_of(meta, base)
    census = head_census(load_pretrained(dest), first, claimed["n_examples"], claimed["seed"], pool,
                         claimed["score_threshold"], claimed["min_fraction"])
    card = with_section((dest / "README.md").read_text(), census_lines(census), dest / "README.md")
    text = json.dumps(meta | {"head_census": census}, indent=2) + "\n"
    atomic_write(dest / "metadata.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(dest / "README.md", lambda tmp: Path(tmp).write_text(card))
    if (dest / MARKER).exists():
        seal(dest)  # its checksums again, the files changed on purpose
    return census


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="published model directories, e.g. weights/base")
    p.add_argument("--base", type=Path, default=None,
                   help="the base whose frequent_tokens a finetune's induction probe draws from (default: "
                        "weights/base beside each model)")
    args = p.parse_args(argv)
    for dest in args.models:
        census = refresh(dest, args.base or dest.parent / "base")
        print(f"{dest}: {census['classes']} as they are, {census['classes_bos']} with <|endoftext|> first")


def cli(argv=None) -> int:
    """The command line: 0, or one line ``python -m finetune.census: error: ...`` and status 2 (130 on Ctrl-C)."""
    import sys

    from tpp.flags import fail

    try:
        main(argv)
    except (ValueError, OSError) as e:  # a damaged file, a full disk: named; nothing half-written
        return fail("python -m finetune.census", e)
    except KeyboardInterrupt:
        print("\npython -m finetune.census: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
