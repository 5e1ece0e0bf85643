"""Every code example a reader meets runs as written and prints what it says it prints.

The ```python blocks of README.md, and the examples in the docstrings of minigpt2, tpp, circuitlab
and finetune (an indented block that starts with an import; ``>>>`` lines are run as doctests), are
executed here on the bundled models, each in a fresh namespace, in a scratch directory where
weights/ is the repository's (so an example that writes runs/x writes it there).
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import io
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minigpt2", "tpp", "circuitlab", "finetune")
START = re.compile(r"(from \S+ import |import )")


def readme_blocks() -> list[tuple[str, str]]:
    """(id, code) of each ```python block of README.md; the id names its section."""
    out, heading = [], "README"
    for part in re.split(r"(^#+ [^\n]*$|^```python\n.*?^```$)", (ROOT / "README.md").read_text(), flags=re.M | re.S):
        if part.startswith("#"):
            heading = part.lstrip("# ").strip()
        elif part.startswith("```python"):
            out.append((f"README.md: {heading}", part[len("```python\n"):-3]))
    return out


def _docstrings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "name", "module"), doc


def _code_blocks(doc: str):
    """Indented runs of lines (or, at the left margin, paragraphs) that start with an import."""
    lines, i = doc.splitlines(), 0
    while i < len(lines):
        indent = len(lines[i]) - len(lines[i].lstrip())
        if START.match(lines[i].strip()) and not lines[i].strip().startswith(">>>"):
            j = i + 1
            while j < len(lines) and (lines[j].strip() if indent == 0 else
                                      not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) >= indent):
                j += 1
            yield textwrap.dedent("\n".join(lines[i:j])).strip() + "\n"
            i = j
        else:
            i += 1


def docstring_blocks() -> list[tuple[str, str]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            for name, doc in _docstrings(path):
                for k, code in enumerate(_code_blocks(doc)):
                    out.append((f"{path.relative_to(ROOT)}: {name}" + (f" #{k + 1}" if k else ""), code))
    return out


def doctest_cases() -> list[tuple[str, str, str]]:
    """(id, module name, docstring) of each docstring with >>> examples."""
    return [(f"{path.relative_to(ROOT)}: {name}", f"{package}.{path.stem}", doc)
            for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))
            for name, doc in _docstrings(path) if ">>>" in doc]


BLOCKS = readme_blocks() + docstring_blocks()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "weights").symlink_to(ROOT / "weights")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(code: str, where: str) -> str:
    """Execute ``code`` as a script; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    return out.getvalue()


def _accuracy(text: str) -> float:
    match = re.search(r"accuracy (\d\.\d+)", text)
    assert match, f"no accuracy printed: {text!r}"
    return float(match.group(1))


# What a reader expects each printing example to print (the examples say so in their comments).
EXPECT = {
    "README.md: A short tour of the API": lambda out: out.splitlines() == [
        "' plants'", "if all roses are flowers and flowers are plants then all roses are plants"],
    "README.md: A short tour of the API #2": lambda out: _accuracy(out) > 0.8,
    "tpp/__init__.py: module": lambda out: _accuracy(out) > 0.8,
    "tpp/encoding.py: encode_eval": lambda out: out.strip() == "answer",
    "circuitlab/methods.py: module": lambda out: re.fullmatch(
        r"eap: 50 edges, \d+ heads\ninformation-flow: \d+ edges, \d+ heads\n", out) is not None,
}


def _ids(blocks):
    """Unique ids: a second block under one README heading gets #2."""
    seen, ids = {}, []
    for where, _ in blocks:
        seen[where] = seen.get(where, 0) + 1
        ids.append(where if seen[where] == 1 else f"{where} #{seen[where]}")
    return ids


IDS = _ids(BLOCKS)


def test_the_examples_are_found():
    assert sum(where.startswith("README.md") for where, _ in BLOCKS) >= 3
    for expected in ["README.md: A short tour of the API", "README.md: TransformerLens notebooks",
                     "tpp/__init__.py: module", "minigpt2/__init__.py: module", "minigpt2/patching.py: module",
                     "circuitlab/methods.py: module", "finetune/__init__.py: module"]:
        assert expected in IDS, IDS
    assert set(EXPECT) <= set(IDS), set(EXPECT) - set(IDS)
    assert any("tokenizer.py" in case[0] for case in doctest_cases())


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=IDS)
def test_example_runs_as_written(code, scratch, request):
    where = request.node.callspec.id
    if re.search(r'\(\s*"(weights/)?gpt2"', code) and not (ROOT / "weights" / "gpt2" / "config.json").exists():
        pytest.skip("GPT-2's own weights are not in weights/gpt2 (nothing is downloaded here; weights/README.md)")
    out = run(code, where)
    if where in EXPECT:
        assert EXPECT[where](out), f"{where} printed {out!r}"


@pytest.mark.parametrize("module,doc", [case[1:] for case in doctest_cases()], ids=[c[0] for c in doctest_cases()])
def test_doctest_examples(module, doc, request):
    """>>> lines run in their module's namespace, as doctest runs them."""
    globs = dict(vars(importlib.import_module(module)))
    test = doctest.DocTestParser().get_doctest(doc, globs, request.node.callspec.id, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    runner.run(test, out=out.write)
    assert runner.summarize(verbose=False).failed == 0, out.getvalue()


def test_the_tours_prompt_is_a_template_in_the_models_format():
    """The tour's TPP prompt is a template filled in with its trailing space left out: the bundled
    models read the answer as ' c' (a prompt with the space, or no template, makes them babble)."""
    import tpp

    tour = next(code for where, code in readme_blocks() if where == "README.md: A short tour of the API")
    (text,) = re.findall(r'"(if all [^"]*)"', tour)
    filled = [re.fullmatch(re.escape(t).replace(r"\{a\}", "(?P<a>.+)", 1).replace(r"\{a\}", "(?P=a)")
                           .replace(r"\{b\}", "(?P<b>.+)", 1).replace(r"\{b\}", "(?P=b)").replace(r"\{c\}", "(?P<c>.+)"),
                           text) for t in tpp.TEMPLATES.values()]
    assert any(filled), f"{text!r} follows no template"
    assert not text.endswith(" ")
