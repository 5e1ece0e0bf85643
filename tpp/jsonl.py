"""Datasets as JSONL, one Example a line with its GPT-2 token ids, written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tpp.encoding import encode_many
from tpp.examples import Example


def example_rows(examples: Sequence[Example], tokenizer=None) -> list[dict]:
    """One dict per example: its fields plus token ids under both tokenizations.

    prompt_ids: the prompt, trailing space included (its last id is 220, the
    space; drop it for the single-token scheme). c_ids / b_ids: c / b encoded on
    their own. c_space_ids / b_space_ids: " c" / " b" (the single-token scheme).
    """
    examples = list(examples)

    def enc(texts):
        return encode_many(texts, tokenizer)

    columns = {
        "prompt_ids": enc([e.prompt for e in examples]),
        "c_ids": enc([e.c for e in examples]),
        "b_ids": enc([e.b for e in examples]),
        "c_space_ids": enc([" " + e.c for e in examples]),
        "b_space_ids": enc([" " + e.b for e in examples]),
    }
    return [{"template": e.template, "a": e.a, "b": e.b, "c": e.c, "prompt": e.prompt,
             **{k: v[i] for k, v in columns.items()}} for i, e in enumerate(examples)]


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to path via a temporary file in the same folder, fsynced, and a rename, so a reader
    never sees a half-written file, even if this process dies or the disk fills (an OSError naming
    the file: minigpt2.fileio.WriteError)."""
    from minigpt2.fileio import WriteError, atomic_write_text

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path.parent, e) from None
    atomic_write_text(path, text)


def jsonl_text(examples: Sequence[Example], tokenizer=None) -> str:
    return "".join(json.dumps(row) + "\n" for row in example_rows(examples, tokenizer))


def save_examples(path: str | Path, examples: Sequence[Example], tokenizer=None) -> None:
    """Write examples as JSONL (see example_rows for the fields), atomically."""
    write_atomic(path, jsonl_text(examples, tokenizer))


def load_examples(path: str | Path) -> list[Example]:
    """Read the Examples of a JSONL file written by save_examples (token ids are ignored).
    The file is read as every text input is (minigpt2.fileio.read_text: a regular file, UTF-8, no
    byte-order mark), each line as strict JSON of bounded depth; a bad line is named by its number."""
    from minigpt2.fileio import FileError, parse_json, read_text

    path = Path(path)
    fix = "Fix: pass a file written by `python -m tpp build`."
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a JSONL file. {fix} (e.g. {path / 'train.jsonl'})")
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"no file at {path}. {fix}")
    try:
        text = read_text(path, "")
    except FileError as e:
        raise ValueError(f"{e}. {fix}") from None
    examples = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is no line end
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{lineno}")
            if not isinstance(row, dict):
                raise TypeError(f"a JSON {type(row).__name__}, not an object")
            fields = [row["template"], row["a"], row["b"], row["c"], row["prompt"]]
            if not all(isinstance(x, str) for x in fields):
                raise TypeError("template, a, b, c and prompt must be strings")
        except FileError as e:
            raise ValueError(f"{e}: not a TPP example row. {fix}") from None
        except (KeyError, TypeError) as e:
            what = f": it lacks the field {e}" if isinstance(e, KeyError) else f" ({e})"
            raise ValueError(f"{path}:{lineno} is not a TPP example row{what}. {fix}") from None
        examples.append(Example(*fields))
    return examples
