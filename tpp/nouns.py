"""Nouns for a, b and c: WordNet noun lemmas that are lowercase alphabetic single words.

The paper drew its nouns from nltk's WordNet corpus. tpp ships the list built
from WordNet 3.0 (tpp/data/nouns.txt, license in tpp/data/WORDNET_LICENSE) so
that the default needs no download and is the same on every machine;
`python -m tpp build-nouns` regenerates it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

SHIPPED = "shipped"
WORDNET = "wordnet"
_HEADER_PREFIX = "# "
# What nltk.corpus.reader.wordnet strips from a lemma (adjective syntactic markers such as "(a)").
_SYNTACTIC_MARKER = re.compile(r"(.*?)(\(.*\))?$")
_VERSION = re.compile(r"WordNet (\d+(?:\.\d+)?) Copyright")


def is_tpp_noun(lemma: str) -> bool:
    """tpp's noun filter: a lowercase alphabetic single word ("aardvark", not "Aachen" or "ad_hoc")."""
    return lemma.isalpha() and lemma.islower()


def wordnet_root():
    """nltk's path pointer to the WordNet corpus (a folder or a zip), found via NLTK_DATA / nltk.data.path."""
    import nltk

    try:
        return nltk.data.find("corpora/wordnet")
    except LookupError as e:
        raise LookupError(
            "nltk's WordNet corpus was not found on nltk.data.path. Fix: set NLTK_DATA to a folder "
            "holding corpora/wordnet (or run nltk.download('wordnet')), or use the shipped list "
            "(nouns='shipped')."
        ) from e


def data_noun_lemmas(root=None):
    """Yield (synset offset, lemma names) for every noun synset in the corpus's data.noun.

    The names are the strings nltk's Synset.lemmas()[i].name() returns (case
    kept, multiword lemmas joined by "_"), read without building nltk's 82,000
    Synset objects: that takes nltk about 9 s, this under 1 s.
    """
    root = wordnet_root() if root is None else root
    with root.join("data.noun").open() as f:
        for raw in f:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if line.startswith("  "):  # the license header
                continue
            # offset lex_filenum ss_type w_cnt(hex) then w_cnt pairs of (lemma, lex_id)
            head = line.split(" ", 4)
            n_lemmas = int(head[3], 16)
            pairs = head[4].split(" ", 2 * n_lemmas)
            yield int(head[0]), [_SYNTACTIC_MARKER.match(w).group(1) for w in pairs[0:2 * n_lemmas:2]]


def wordnet_version(root=None) -> str:
    """The version stated in the license header of data.noun, e.g. "3.0"."""
    root = wordnet_root() if root is None else root
    with root.join("data.noun").open() as f:
        for raw in f:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if not line.startswith("  "):
                break
            found = _VERSION.search(line)
            if found:
                return found.group(1)
    return "unknown"


def wordnet_nouns(root=None) -> tuple[list[str], str]:
    """(sorted TPP nouns, WordNet version) from the corpus: every noun lemma passing is_tpp_noun.

    Lemmas keep WordNet's case, so proper nouns ("Aachen") fail the lowercase test.
    """
    root = wordnet_root() if root is None else root
    nouns = {w for _, lemmas in data_noun_lemmas(root) for w in lemmas if is_tpp_noun(w)}
    return sorted(nouns), wordnet_version(root)


def wordnet_license_text(root=None) -> str | None:
    """The LICENSE file that comes with the corpus, or None when it has none."""
    root = wordnet_root() if root is None else root
    try:
        with root.join("LICENSE").open() as f:
            data = f.read()
    except (OSError, KeyError):
        return None
    return data.decode("utf-8") if isinstance(data, bytes) else data


def format_noun_file(nouns: list[str], version: str) -> str:
    """The text of tpp/data/nouns.txt: one comment line naming its source, then one noun a line."""
    header = (f"{_HEADER_PREFIX}{len(nouns)} WordNet {version} noun lemmas that are lowercase alphabetic "
              "single words; built by `python -m tpp build-nouns`; license: WORDNET_LICENSE\n")
    return header + "".join(n + "\n" for n in nouns)


def check_nouns(nouns: Iterable[str], source: str = "the noun list") -> list[str]:
    """Return `nouns` as a list, or raise ValueError naming duplicates, empty or multi-word entries."""
    nouns = list(nouns)
    bad = [n for n in nouns if not isinstance(n, str) or not n or n != n.strip() or len(n.split()) != 1]
    if bad:
        raise ValueError(f"{source} has entries that are not single words: {bad[:5]!r}. "
                         "Fix: one word a line, no spaces.")
    seen, dups = set(), []
    for n in nouns:
        if n in seen:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ValueError(f"{source} repeats {len(dups)} noun(s), e.g. {sorted(set(dups))[:5]!r}; "
                         "a repeat would make a, b and c non-distinct or skew sampling. Fix: deduplicate it.")
    if len(nouns) < 3:
        raise ValueError(f"{source} has {len(nouns)} noun(s); a, b and c must be distinct, so at least 3 "
                         "are needed. Fix: add nouns or use the shipped list.")
    return nouns


def _read_noun_file(text: str, source: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    return check_nouns([n for n in lines if n and not n.startswith("#")], source)


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    text = resources.files("tpp").joinpath("data", "nouns.txt").read_text(encoding="utf-8")
    return tuple(_read_noun_file(text, "tpp/data/nouns.txt"))


def load_nouns(source: str | Path = SHIPPED) -> list[str]:
    """The noun pool for a, b and c.

    source:
      "shipped"   tpp/data/nouns.txt, built from WordNet 3.0 (41,492 nouns);
                  no download, identical on every machine. The default.
      "wordnet"   read the live nltk WordNet corpus (found through NLTK_DATA);
                  equals "shipped" when that corpus is WordNet 3.0.
      a path      a text file, one noun a line; blank lines and lines starting
                  with '#' are skipped.

    Raises ValueError on duplicate, empty or multi-word entries and on fewer
    than three nouns; LookupError when "wordnet" finds no corpus.
    """
    source = str(source)
    if source == SHIPPED:
        return list(_shipped())
    if source == WORDNET:
        return wordnet_nouns()[0]
    from minigpt2.fileio import read_text  # every text input alike: UTF-8, a byte-order mark refused

    path = Path(source)
    if not path.exists() and not path.is_symlink():
        raise ValueError(f"noun source {source!r} is neither 'shipped', 'wordnet' nor an existing file. "
                         "Fix: pass one of those.")
    return _read_noun_file(read_text(path, name=f"noun file {source!r}"), source)
