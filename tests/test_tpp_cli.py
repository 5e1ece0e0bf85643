"""python -m tpp: build writes all files or none, stats and show read them back, build-nouns --check."""

import json

import pytest

from tpp import load_examples
from tpp.__main__ import main
from tpp.encoding import encode_many
from tpp.nouns import wordnet_root


def test_build_writes_leak_free_datasets_with_token_ids(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["build", "--out", str(out), "--n", "300", "--eval-n", "40", "--single-n", "30", "--seed", "7"]) == 0
    train, evals, single = (load_examples(out / f) for f in ("train.jsonl", "eval.jsonl", "eval_single_token.jsonl"))
    assert (len(train), len(evals), len(single)) == (300, 40, 30)
    train_prompts = {e.prompt for e in train}
    assert not train_prompts & {e.prompt for e in evals} and not train_prompts & {e.prompt for e in single}
    row = json.loads((out / "eval_single_token.jsonl").read_text().splitlines()[0])
    assert row["prompt_ids"] == encode_many([row["prompt"]])[0] and len(row["c_space_ids"]) == 1
    assert row["prompt_ids"][:-1] == encode_many([row["prompt"][:-1]])[0]
    assert json.loads((out / "args.json").read_text())["n"] == 300
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "eval.jsonl", "eval_single_token.jsonl",
                                                       "train.jsonl"]  # no temporary files left


def test_disjoint_nouns_build_shares_no_noun(tmp_path):
    out = tmp_path / "ds"
    assert main(["build", "--out", str(out), "--n", "200", "--eval-n", "20", "--single-n", "20",
                 "--disjoint-nouns"]) == 0
    nouns = lambda name: {w for e in load_examples(out / name) for w in (e.a, e.b, e.c)}
    assert not nouns("train.jsonl") & (nouns("eval.jsonl") | nouns("eval_single_token.jsonl"))


def test_failed_build_writes_nothing(tmp_path, capsys):
    nouns = tmp_path / "nouns.txt"
    nouns.write_text("fish\ncat\ndog\nowl\n")  # enough for train, too few for the eval set after it
    out = tmp_path / "ds"
    assert main(["build", "--out", str(out), "--nouns", str(nouns), "--templates", "all-are",
                 "--n", "20", "--eval-n", "10", "--single-n", "1"]) == 2
    assert "make_eval_set" in capsys.readouterr().err
    assert not out.exists()


def test_stats_and_show_read_a_built_file(tmp_path, capsys):
    out = tmp_path / "ds"
    main(["build", "--out", str(out), "--n", "50", "--eval-n", "5", "--single-n", "5"])
    capsys.readouterr()
    assert main(["stats", "--file", str(out / "train.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "examples: 50 (50 distinct prompts)" in text
    counts = [int(line.split(":")[1].split()[0]) for line in text.split("examples per template:")[1].splitlines()
              if line.strip()]
    assert sum(counts) == 50
    assert main(["show", "--file", str(out / "train.jsonl"), "--n", "2", "--single-token"]) == 0
    assert capsys.readouterr().out.count("prompt tokens") == 2


def test_build_nouns_check_agrees_with_the_shipped_files(tmp_path):
    try:
        wordnet_root()
    except LookupError:
        pytest.skip("nltk's WordNet corpus not found (set NLTK_DATA to a folder with corpora/wordnet)")
    assert main(["build-nouns", "--out-dir", str(tmp_path)]) == 0
    assert main(["build-nouns", "--out-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "nouns.txt").write_text("fish\n")
    assert main(["build-nouns", "--out-dir", str(tmp_path), "--check"]) == 1
