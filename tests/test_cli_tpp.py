"""python -m tpp refuses every bad input before building anything: exit status 2, one line
"python -m tpp COMMAND: error: ..." naming the flag or file, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tpp.examples
from tpp.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
ROW = {"template": "all-are", "a": "cats", "b": "dogs", "c": "owls",
       "prompt": "if all cats are dogs and dogs are owls then all cats are "}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tppcli")
    f = {"root": root, "dir": root / "folder", "dataset": root / "dataset", "file": root / "plain.txt",
         "latin1": root / "latin1.txt", "empty": root / "empty.jsonl", "badrow": root / "badrow.jsonl",
         "nokey": root / "nokey.jsonl", "few": root / "few_nouns.txt", "dup": root / "dup_nouns.txt"}
    f["dir"].mkdir()
    f["dataset"].mkdir()
    (f["dataset"] / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    f["file"].write_text("hello\n")
    f["latin1"].write_bytes("if all {a} are {b} and {b} are {c} then all {a} are caf\xe9\n".encode("latin-1"))
    f["empty"].write_text("\n")
    f["badrow"].write_text(json.dumps(ROW) + "\n{oops\n")
    f["nokey"].write_text(json.dumps({k: v for k, v in ROW.items() if k != "prompt"}) + "\n")
    f["few"].write_text("cat\ndog\n")
    f["dup"].write_text("cat\ndog\ncat\nowl\n")
    return f


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("examples were built before the bad input was refused")

    monkeypatch.setattr(tpp.examples, "_sample", refuse)


def run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


BIG = str(10**12)
CASES = [  # argv ({name}: fixture paths; build gets --out {root}/new unless given), what the line names
    ([], "required"),
    (["nosuch"], "invalid choice"),
    # build
    (["build"], "--out"),
    (["build", "--out", "{file}"], "--out"),
    (["build", "--out", "{dataset}"], "--overwrite"),
    (["build", "--n", "0"], "--n"),
    (["build", "--n", "-5"], "--n"),
    (["build", "--n", "ten"], "--n"),
    (["build", "--n", BIG], "--n"),
    (["build", "--eval-n", "0"], "--eval-n"),
    (["build", "--single-n", str(10**9)], "--single-n"),
    (["build", "--seed", "-1"], "--seed"),
    (["build", "--eval-noun-fraction", "0"], "--eval-noun-fraction"),
    (["build", "--eval-noun-fraction", "1.5"], "--eval-noun-fraction"),
    (["build", "--eval-noun-fraction", "nan"], "--eval-noun-fraction"),
    (["build", "--templates", "nosuch"], "--templates"),
    (["build", "--templates", "{latin1}"], "latin1.txt' is not UTF-8"),
    (["build", "--templates", "{dir}"], "is a folder"),
    (["build", "--templates", "{root}/none.txt"], "does not exist"),
    (["build", "--nouns", "{root}/none.txt"], "--nouns"),
    (["build", "--nouns", "{latin1}"], "latin1.txt' is not UTF-8"),
    (["build", "--nouns", "{few}"], "at least 3"),
    (["build", "--nouns", "{dup}"], "repeats"),
    # show
    (["show", "--n", BIG], "--n"),
    (["show", "--n", "0"], "--n"),
    (["show", "--seed", "-1"], "--seed"),
    (["show", "--file", "{root}/none.jsonl"], "--file"),
    (["show", "--file", "{dir}"], "--file"),
    (["show", "--file", "{latin1}"], "--file: {latin1} is not UTF-8"),
    (["show", "--templates", "all-are,nosuch"], "--templates"),
    # stats
    (["stats", "--n", "0"], "--n"),
    (["stats", "--n", BIG], "--n"),
    (["stats", "--file", "{empty}"], "holds no examples"),
    (["stats", "--file", "{badrow}"], "badrow.jsonl:2"),
    (["stats", "--file", "{nokey}"], "lacks the field 'prompt'"),
    (["stats", "--file", "{dir}"], "--file"),
    # templates, build-nouns
    (["templates", "--bogus"], "--bogus"),
    (["build-nouns", "--out-dir", "{file}"], "--out-dir"),
]


@pytest.mark.parametrize("argv,named", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_input_is_one_named_line(files, capsys, argv, named):
    fill = {k: str(v) for k, v in files.items()}
    argv = [a.format(**fill) for a in argv]
    if argv[:1] == ["build"] and "--out" not in argv and argv != ["build"]:
        argv += ["--out", str(files["root"] / "new")]
    rc, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("python -m tpp") and ": error: " in lines[0], lines[0]
    assert named.format(**fill) in lines[0], lines[0]
    assert not (files["root"] / "new").exists()


def test_build_replaces_a_dataset_only_with_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # this one builds
    out = tmp_path / "ds"
    argv = ["build", "--out", str(out), "--n", "20", "--eval-n", "5", "--single-n", "5"]
    assert main(argv) == 0
    before = (out / "train.jsonl").read_text()
    assert main(argv + ["--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "train.jsonl").read_text() == before
    assert main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "train.jsonl").read_text() != before


def test_library_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()
    nouns = tmp_path / "nouns.txt"
    nouns.write_text("cat\ndog\nowl\n")  # 6 distinct prompts of one template
    rc, err = run(["show", "--nouns", str(nouns), "--templates", "all-are", "--n", "7"], capsys)
    assert rc == 2 and err.startswith("python -m tpp show: error: --n 7: make_examples: asked for 7") and \
        len(err.strip().splitlines()) == 1, err


def test_bad_flags_exit_2_in_a_subprocess():
    p = subprocess.run([sys.executable, "-m", "tpp", "show", "--n", BIG], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "python -m tpp show: error: argument --n: 1,000,000,000,000 is out of range; pass an integer from 1 to "
        "1,000,000 (at most tpp.examples.MAX_EXAMPLES, so that the examples fit in memory)"]


def test_templates_say_that_the_appendix_repeats_one(capsys):
    """Two default templates share a text; the listing says it is the paper's appendix's repetition."""
    from tpp.__main__ import main
    from tpp.templates import DEFAULT_TEMPLATE_NAMES, TEMPLATES

    assert main(["templates"]) in (0, None)
    out = capsys.readouterr().out
    assert len(set(TEMPLATES[n] for n in DEFAULT_TEMPLATE_NAMES)) == len(DEFAULT_TEMPLATE_NAMES) - 1
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert note == ["note: implies-transitive and implies-transitive-repeat have the same text: the paper's appendix "
                    "lists it twice, so drawing templates uniformly gives it the paper's weight, 2/7"]
