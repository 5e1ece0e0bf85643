"""Pretraining text: documents from corpora installed on this machine, nothing fetched at run time.

A corpus spec names one or more sources joined by ``+`` (``wordnet+gcide``); each
gives a list of documents (plain English strings):

* ``wordnet``: WordNet 3.0's glosses and example sentences, one document per synset,
  through nltk (set NLTK_DATA). License: WordNet 3.0 license (BSD-like).
* ``gcide``: the Collaborative International Dictionary of English 0.48 (Webster's
  1913 with WordNet additions; definitions and literary quotations), one document per
  entry, read from Debian's ``dict-gcide`` package (``apt-get install dict-gcide``:
  /usr/share/dictd/gcide.dict.dz). License: GNU GPL v2 or later. Its markup
  (pronunciations, etymologies in brackets, source tags, citation authors, syllable
  marks) is removed; the words stay.
* a path to a UTF-8 ``.txt`` file: the file is one document.

``sources(spec)`` also returns, per source, what a model card records: where the
text came from, its license and the sha256 of the file read.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from minigpt2.fileio import read_text, sha256_file

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
LICENSES = {"wordnet": "WordNet 3.0 license (Princeton University; BSD-like)",
            "gcide": "GNU General Public License v2 or later (GCIDE 0.48)"}


def wordnet_documents() -> list[str]:
    """WordNet 3.0's glosses and example sentences, one document per synset, in nltk's order."""
    try:
        from nltk.corpus import wordnet as wn

        synsets = list(wn.all_synsets())
    except LookupError as e:
        raise FileNotFoundError(
            "WordNet was not found by nltk. Point NLTK_DATA at a folder holding corpora/wordnet "
            "(here: NLTK_DATA=/work/shared/nltk_data), or run python -m nltk.downloader wordnet; "
            "or train on a text file: corpus=path/to/file.txt"
        ) from e
    return [" ".join([s.definition().strip() + "."] + [x.strip() for x in s.examples()]) for s in synsets]


_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")                       # \Ab*do"men\
_BRACKETS = re.compile(r"\[[^\]]*\]")                              # [L. abdomen ...], [1913 Webster]
_CITATION = re.compile(r"--\s?[A-Z][A-Za-z']*\.?(?: (?:[A-Z][A-Za-z']*\.?|of|de))*")  # --Bp. Hall.
_SYLLABLE = re.compile(r"(?<=\w)[\"*`'](?=\w)|(?<=\w)[\"*`](?=\W)")  # Di*chot"o*mous -> Dichotomous
_GREEK = re.compile(r"(?:(?<=\s)|^)\?(?=[\s,.;:)])")                # ? stands for an untranscribed Greek word
_HEAD_PARENS = re.compile(r"^([^,(\n]*?)\s*\([^)\n]*\)(?=\s*,)")  # a headword's respelling: Levator (le*va"tor),
_SPACE = re.compile(r"\s+")
_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")


def clean_gcide_entry(entry: str) -> str:
    """One GCIDE entry as plain text: the headword, its part of speech, definitions and quotations."""
    s = _PRONUNCIATION.sub("", entry)
    s = _HEAD_PARENS.sub(r"\1", s, count=1)
    s = _BRACKETS.sub("", s)
    s = _CITATION.sub("", s)
    s = s.replace("{", "").replace("}", "").replace("[", "").replace("]", "")
    s = _SYLLABLE.sub("", s)
    s = _GREEK.sub("", s)
    s = _BEFORE_PUNCT.sub(r"\1", _SPACE.sub(" ", s)).strip()
    s = re.sub(r"([,.;:])(?:\s*[,.;:])+", r"\1", s)  # punctuation left doubled by a removal
    return s


def gcide_documents(path: Path | str = GCIDE_PATH, min_words: int = 6) -> list[str]:
    """GCIDE's entries (dictd format, gzip), cleaned, one document each, in the dictionary's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GCIDE not found at {path}: install Debian's dict-gcide "
                                "(apt-get install dict-gcide), or leave gcide out of the corpus")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    start = text.find("\nA \\A\\")  # the licence and database notes come before the first entry
    entries = re.split(r"\n\s*\n(?=\S)", text[start:] if start >= 0 else text)
    docs = (clean_gcide_entry(e) for e in entries)
    return [d for d in docs if len(d.split()) >= min_words]




def _wordnet_file() -> Path | None:
    try:
        from nltk.corpus import wordnet as wn

        return Path(wn.root.path) / "data.noun" if hasattr(wn.root, "path") else None
    except (LookupError, AttributeError):
        return None


def sources(spec: str) -> list[tuple[str, list[str], dict]]:
    """(name, documents, card info) for each source of a ``+``-joined corpus spec."""
    names = [s.strip() for s in spec.split("+")]
    if not spec.strip() or any(not n for n in names):
        raise ValueError(f"corpus={spec!r}: name sources joined by '+', e.g. wordnet+gcide or a .txt path")
    out = []
    for name in names:
        if name == "wordnet":
            docs = wordnet_documents()
            wn_file = _wordnet_file()
            info = {"source": "WordNet 3.0 via nltk (glosses and examples)", "license": LICENSES["wordnet"],
                    "sha256_data.noun": sha256_file(wn_file) if wn_file and wn_file.is_file() else None}
        elif name == "gcide":
            docs = gcide_documents()
            info = {"source": f"GCIDE 0.48, Debian package dict-gcide ({GCIDE_PATH})", "license": LICENSES["gcide"],
                    "sha256": sha256_file(GCIDE_PATH)}
        else:
            path = Path(name)
            if not path.exists() and not path.is_symlink():
                raise FileNotFoundError(f"corpus={name}: no such file; pass a UTF-8 text file, 'wordnet' or 'gcide'")
            docs = [read_text(path, name=f"corpus={name}")]  # every text input alike: UTF-8, no byte-order mark
            info = {"source": str(path), "license": "as stated by the file's owner", "sha256": sha256_file(path)}
        out.append((name, docs, info | {"documents": len(docs)}))
    return out
