"""Prompt templates of the Transitive Property Problem.

A template states aRb and bRc and stops where c is to be predicted, e.g.
"if all {a} are {b} and {b} are {c} then all {a} are". The prompt is the
filled template plus one trailing space (see tpp.examples).
"""

from __future__ import annotations

import difflib
import os
import string
from collections.abc import Iterable, Mapping
from pathlib import Path

# The paper's appendix, word for word, in its order. The appendix lists
# "a implies b and if b then c therefore by the transitive property a also
# implies" twice (first and fifth); both entries are kept, under two names, so
# that sampling templates uniformly gives that text the paper's weight of 2/7.
TEMPLATES: dict[str, str] = {
    "implies-transitive": "{a} implies {b} and if {b} then {c} therefore by the transitive property {a} also implies",
    "all-are": "if all {a} are {b} and {b} are {c} then all {a} are",
    "type-of-inferred": "if all {a} are {b} and {b} is a type of {c} then it can be inferred that all {a} are a type of",
    "implies": "{a} implies {b} and if {b} then {c} therefore {a} also implies",
    "implies-transitive-repeat": "{a} implies {b} and if {b} then {c} therefore by the transitive property {a} also implies",
    "implies-chain": "{a} implies {b} and {b} implies {c} then by the transitive property {a} also implies",
    "type-of": "{a} is a type of {b} and all {b} are {c} therefore {a} is also a type of",
    # Section 5.1's worked example; not in the appendix, hence off by default.
    "all-are-inferred": "if all {a} are {b} and all {b} are {c} it can be inferred that all {a} are",
}

# The seven appendix templates (the duplicate included); "all-are-inferred" is opt-in.
DEFAULT_TEMPLATE_NAMES: tuple[str, ...] = tuple(name for name in TEMPLATES if name != "all-are-inferred")

_PLACEHOLDERS = {"a", "b", "c"}


def check_template(name: str, text: str) -> None:
    """Raise ValueError, naming the template, unless `text` is a usable TPP template.

    Usable: only the placeholders {a}, {b} and {c}, each at least once, no
    format specs, no leading or trailing whitespace, and not ending with {c}
    (the prompt must stop where c is predicted).
    """
    where = f"template {name!r} ({text!r})"
    if not text or text != text.strip():
        raise ValueError(f"{where} is empty or has leading/trailing whitespace; "
                         "tpp adds the prompt's trailing space itself. Fix: strip the template.")
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{where} is not a valid format string ({e}). "
                         "Fix: write literal braces as {{ and }}.") from e
    seen = set()
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in _PLACEHOLDERS or spec or conversion:
            raise ValueError(f"{where} has placeholder {{{field}}} with spec {spec!r}/conversion {conversion!r}; "
                             "only plain {a}, {b} and {c} are allowed.")
        seen.add(field)
    if seen != _PLACEHOLDERS:
        missing = ", ".join("{" + p + "}" for p in sorted(_PLACEHOLDERS - seen))
        raise ValueError(f"{where} lacks {missing}; a TPP template states a->b and b->c, "
                         "so it needs all of {a}, {b} and {c}.")
    if text.endswith("{c}"):
        raise ValueError(f"{where} ends with {{c}}, but the prompt must stop where c is predicted. "
                         "Fix: end it with the words that precede the answer, e.g. '... then all {a} are'.")


def _read_template_file(path: Path) -> dict[str, str]:
    """One template a line; blank lines and '#' comments skipped; names are 'file:line'."""
    from minigpt2.fileio import read_text  # every text input alike: UTF-8, a byte-order mark refused

    lines = read_text(path, name=f"template file {str(path)!r}").splitlines()
    templates = {}
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            templates[f"{path.name}:{lineno}"] = line
    if not templates:
        raise ValueError(f"template file {str(path)!r} holds no templates. Fix: write one template a line.")
    return templates


def _by_names(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    if not names:
        raise ValueError("no template names given. Fix: pass None for the defaults, or names from tpp.TEMPLATES.")
    out = {}
    for name in names:
        if name not in TEMPLATES:
            close = difflib.get_close_matches(name, TEMPLATES, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown template name {name!r}.{hint} Known: {', '.join(TEMPLATES)}; "
                             "or pass a file with one template a line.")
        out[name] = TEMPLATES[name]
    return out


def load_templates(spec: str | Iterable[str] | Mapping[str, str] | None = None) -> dict[str, str]:
    """Resolve a template selection to an ordered {name: template} dict.

    spec:
      None            the seven appendix templates (DEFAULT_TEMPLATE_NAMES).
      "all"           all of TEMPLATES, section 5.1's template included.
      "n1,n2"         names from TEMPLATES, comma-separated (or any iterable of names).
      a file path     one template a line with {a}, {b}, {c} placeholders; blank
                      lines and lines starting with '#' are skipped; names are
                      "<file name>:<line number>". Repeated lines are kept, which
                      weights them, as the appendix does.
      a mapping       {name: template}, used as given.

    Every template is checked by check_template; an unknown name raises
    ValueError listing close matches. Examples sample the returned entries
    uniformly, so a template listed twice is drawn twice as often.
    """
    if spec is None:
        templates = _by_names(DEFAULT_TEMPLATE_NAMES)
    elif isinstance(spec, Mapping):
        templates = dict(spec)
        if not templates:
            raise ValueError("the template mapping is empty. Fix: pass at least one {name: template}.")
    elif isinstance(spec, (str, os.PathLike)):
        spec_str = os.fspath(spec)
        if spec_str == "all":
            templates = dict(TEMPLATES)
        elif os.path.isfile(spec_str):
            templates = _read_template_file(Path(spec_str))
        elif os.path.isdir(spec_str):
            raise ValueError(f"template file {spec_str!r} is a folder. Fix: pass a file with one template a line.")
        elif os.sep in spec_str or spec_str.endswith(".txt"):
            raise ValueError(f"template file {spec_str!r} does not exist. Fix: check the path, "
                             "or pass template names from tpp.TEMPLATES.")
        else:
            templates = _by_names(n.strip() for n in spec_str.split(",") if n.strip())
    else:
        templates = _by_names(spec)
    for name, text in templates.items():
        check_template(name, text)
    return templates
