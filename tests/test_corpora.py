"""Pretraining corpora: GCIDE entries cleaned to plain English, corpus specs, repeated spans."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from finetune import corpora
from finetune.data import add_repeats

ENTRY = '''Dichotomize \\Di*chot"o*mize\\, v. t. [imp. & p. p.
   {Dichotomized}; p. pr. & vb. n. {Dichotomizing}.] [See
   {Dichotomous}.]
   1. To cut into two parts; to part into two divisions. [R.]
      [1913 Webster]

            The apostolical benediction dichotomizes all good
            things into grace and peace.          --Bp. Hall.
      [1913 Webster]'''


def test_a_gcide_entry_loses_its_markup_and_keeps_its_words():
    text = corpora.clean_gcide_entry(ENTRY)
    assert text == ("Dichotomize, v. t. 1. To cut into two parts; to part into two divisions. The apostolical "
                    "benediction dichotomizes all good things into grace and peace.")
    assert corpora.clean_gcide_entry('Levator (le*va"tor), n. A muscle.') == "Levator, n. A muscle."
    assert corpora.clean_gcide_entry('Dichotomous \\Di*chot"o*mous\\, a. -- {Di*chot"o*mous*ly}, adv.') == \
        "Dichotomous, a. -- Dichotomously, adv."


def test_gcide_documents_from_a_dictd_file(tmp_path):
    """The dictd file: the licence notes before the first entry are dropped, short entries too."""
    path = tmp_path / "gcide.dict.dz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("00-database-info\n   GNU GPL notes, not an entry\n\nA \\A\\ The first letter of the English "
                "and of many other alphabets.\n   [1913 Webster]\n\n" + ENTRY + "\n\nAb \\Ab\\, n. Short.\n")
    docs = corpora.gcide_documents(path)
    assert docs == ["A The first letter of the English and of many other alphabets.",
                    corpora.clean_gcide_entry(ENTRY)]
    with pytest.raises(FileNotFoundError, match="apt-get install dict-gcide"):
        corpora.gcide_documents(tmp_path / "missing.dict.dz")


def test_corpus_specs_are_checked(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one document")
    [(name, docs, info)] = corpora.sources(str(text))
    assert docs == ["one document"] and info["sha256"] == corpora.sha256_file(text) and info["documents"] == 1
    for bad in ("", "wordnet+", "+gcide"):
        with pytest.raises(ValueError, match="joined by '\\+'"):
            corpora.sources(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpora.sources(str(tmp_path / "nowhere.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        corpora.sources(str(tmp_path / "latin1.txt"))


def test_repeats_copy_spans_forward_and_tile_random_sequences():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 1000, (400, 128))
    original = blocks.copy()
    info = add_repeats(blocks, copy_spans=0.3, random_repeats=0.2, seed=3)
    changed = np.nonzero((blocks != original).any(axis=1))[0]
    assert info["n_copy_span_blocks"] + info["n_random_repeat_blocks"] >= len(changed) > 0
    assert 60 < info["n_copy_span_blocks"] < 180 and 40 < info["n_random_repeat_blocks"] < 120
    for i in changed:
        row = blocks[i]
        if (row < 1000).all() and (row == original[i]).mean() > 0.5:  # a copied span: an earlier span recurs
            diff = np.nonzero(row != original[i])[0]
            d, L = diff[0], diff[-1] - diff[0] + 1
            assert any((row[s:s + L] == row[d:d + L]).all() for s in range(0, d - L + 1))
        else:  # a random sequence repeated to fill the block: periodic
            period = next(p for p in range(8, 65) if (row[p:] == row[:-p]).all())
            assert period <= 64
    again = original.copy()
    add_repeats(again, copy_spans=0.3, random_repeats=0.2, seed=3)
    assert (again == blocks).all()  # seeded: the same data every time
    with pytest.raises(ValueError, match=r"copy_spans=1.5 must be a number in \[0, 1\]"):
        add_repeats(original.copy(), copy_spans=1.5, random_repeats=0, seed=0)
    with pytest.raises(ValueError, match="exceed 1"):
        add_repeats(original.copy(), copy_spans=0.6, random_repeats=0.6, seed=0)


def test_random_repeats_can_draw_from_the_most_frequent_tokens():
    rng = np.random.default_rng(1)
    blocks = np.minimum(rng.geometric(0.01, (300, 64)), 5000)  # small ids are the frequent ones
    frequent = set(np.argsort(-np.bincount(blocks.ravel()), kind="stable")[:50].tolist())
    info = add_repeats(blocks, copy_spans=0.0, random_repeats=0.5, seed=0, repeat_vocab=50)
    assert info["repeat_vocab"] == 50 and info["n_random_repeat_blocks"] > 100
    periodic = [row for row in blocks if any((row[p:] == row[:-p]).all() for p in range(8, 33))]
    assert len(periodic) >= info["n_random_repeat_blocks"]
    assert set(np.concatenate(periodic).tolist()) <= frequent | set(range(5001))  # ids stay in range
    drawn = [row for row in periodic if set(row.tolist()) <= frequent]
    assert len(drawn) >= info["n_random_repeat_blocks"]  # every random block uses only the 50 most frequent
    with pytest.raises(ValueError, match="repeat_vocab=-1 must be a whole number from 0 to"):
        add_repeats(blocks.copy(), 0.0, 0.5, seed=0, repeat_vocab=-1)


def test_repeat_length_shortens_the_random_sequences():
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 1000, (300, 128))
    info = add_repeats(blocks, copy_spans=0.0, random_repeats=0.5, seed=0, repeat_length=16)
    assert info["repeat_length"] == 16
    periods = [next((p for p in range(8, 65) if (row[p:] == row[:-p]).all()), None) for row in blocks]
    periods = [p for p in periods if p is not None]
    assert len(periods) == info["n_random_repeat_blocks"] > 100
    assert max(periods) <= 16 and len(set(periods)) > 4  # 8..16, several lengths drawn
    default = rng.integers(0, 1000, (300, 128))
    add_repeats(default, copy_spans=0.0, random_repeats=0.5, seed=0)
    assert max(next(p for p in range(8, 65) if (row[p:] == row[:-p]).all())
               for row in default if any((row[p:] == row[:-p]).all() for p in range(8, 65))) > 16
    for bad in (7, 65, 2.5):
        with pytest.raises(ValueError, match=r"repeat_length=\S+ must be a whole number from 8 to 64"):
            add_repeats(blocks.copy(), 0.0, 0.5, seed=0, repeat_length=bad)


def test_recall_blocks_list_the_same_pairs_in_new_orders():
    rng = np.random.default_rng(3)
    blocks = np.minimum(rng.geometric(0.01, (300, 128)), 5000)
    original = blocks.copy()
    info = add_repeats(blocks, copy_spans=0.1, random_repeats=0.2, seed=4, repeat_vocab=200, repeat_length=32,
                       recall=0.4)
    untouched = original.copy()
    add_repeats(untouched, copy_spans=0.1, random_repeats=0.2, seed=4, repeat_vocab=200, repeat_length=32)
    recalled = np.nonzero((blocks != untouched).any(axis=1))[0]  # the other kinds are drawn as without --recall
    assert len(recalled) == info["n_recall_blocks"] > 80 and info["recall"] == 0.4
    frequent = set(np.argsort(-np.bincount(original.ravel()), kind="stable")[:200].tolist())
    orders = set()
    for i in recalled:
        row = blocks[i]
        n = len(set(row.tolist())) // 2  # pairs of 2n distinct tokens
        assert 4 <= n <= 16 and set(row.tolist()) <= frequent
        rounds = [row[s:s + 2 * n].reshape(-1, 2) for s in range(0, 128, 2 * n)]
        pairs = {tuple(p) for p in rounds[0]}
        assert len(pairs) == n and len({k for k, _ in pairs}) == n
        for r in rounds:  # every round (the last may be cut) lists the same pairs, each once
            assert {tuple(p) for p in r} <= pairs and len({tuple(p) for p in r}) == len(r)
        orders.add(all((r == rounds[0][:len(r)]).all() for r in rounds))
    assert orders == {False}  # in every block the order changes between rounds
    with pytest.raises(ValueError, match=r"copy_spans=0.5 \+ random_repeats=0.2 \+ recall=0.4 exceed 1"):
        add_repeats(original.copy(), copy_spans=0.5, random_repeats=0.2, seed=0, recall=0.4)
