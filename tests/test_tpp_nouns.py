"""Nouns: the shipped WordNet list, its reproducibility, and checks on user lists."""

import pytest

from tpp import load_nouns
from tpp.nouns import data_noun_lemmas, format_noun_file, is_tpp_noun, wordnet_license_text, wordnet_nouns, wordnet_root
from tpp.__main__ import DATA_DIR


def _corpus_or_skip():
    try:
        root = wordnet_root()
    except LookupError:
        pytest.skip("nltk's WordNet corpus not found (set NLTK_DATA to a folder with corpora/wordnet)")
    nouns, version = wordnet_nouns(root)
    if version != "3.0":
        pytest.skip(f"the WordNet corpus found is version {version}; the shipped list is from 3.0")
    return root, nouns, version


def test_shipped_list_is_sorted_unique_lowercase_alphabetic_words():
    nouns = load_nouns()
    assert nouns == sorted(set(nouns))
    assert all(is_tpp_noun(n) for n in nouns)
    assert {"aardvark", "fish", "drinker"} <= set(nouns)
    assert "Aachen" not in nouns and "aachen" not in nouns  # a proper noun (capitalized in WordNet)


def test_shipped_files_equal_a_fresh_build():
    root, nouns, version = _corpus_or_skip()
    assert (DATA_DIR / "nouns.txt").read_text(encoding="utf-8") == format_noun_file(nouns, version)
    assert (DATA_DIR / "WORDNET_LICENSE").read_text(encoding="utf-8") == wordnet_license_text(root)
    assert load_nouns("wordnet") == load_nouns("shipped")


@pytest.mark.slow  # loading nltk's WordNet reader alone takes 3-10 s here
def test_reader_agrees_with_nltks_synset_api():
    root, _, _ = _corpus_or_skip()
    from nltk.corpus import wordnet as wn

    synsets = list(data_noun_lemmas(root))
    assert len(synsets) == 82_115  # WordNet 3.0's noun synsets
    for offset, lemmas in synsets[::10]:  # a sample: building every Synset takes nltk ~9 s
        assert lemmas == [l.name() for l in wn.synset_from_pos_and_offset("n", offset).lemmas()]


def test_user_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "nouns.txt"
    path.write_text("# mine\nfish\n\ndrinker\n  cat  \n")
    assert load_nouns(path) == ["fish", "drinker", "cat"]


@pytest.mark.parametrize("text, complaint", [
    ("fish\ncat\nfish\ndog\n", r"repeats 1 noun.*'fish'"),
    ("fish\ncat\n", "at least 3"),
    ("fish\nsea cow\ndog\n", "not single words"),
])
def test_bad_user_lists_are_refused(tmp_path, text, complaint):
    path = tmp_path / "nouns.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=complaint):
        load_nouns(path)


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="'shiped'"):
        load_nouns("shiped")
