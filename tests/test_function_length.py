"""No function of the library or its scripts is longer than a reader takes in at once (issue 27: 60 lines).

A long function is where closures, special cases and copies of another module's logic accumulate
(patching's 194-line ``_run_patches`` held its own key/value stand-ins and unembedding); the limit keeps
each piece of the engine, the methods and the scripts small enough to read and test on its own.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*(p for pkg in ("minigpt2", "circuitlab", "tpp", "finetune", "clikit") for p in (ROOT / pkg).rglob("*.py")),
           ROOT / "train.py", ROOT / "circuits.py"]
LIMIT = 60  # lines, from ``def`` to the function's last line, docstring included


def long_functions(path: Path, limit: int = LIMIT, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    path = tmp_path / "mod.py"
    path.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(path, root=tmp_path) == [f"mod.py:5 long ({LIMIT + 1} lines)"]


def test_no_function_is_longer_than_the_limit():
    assert len(SOURCES) > 50  # the packages were found
    found = [entry for path in SOURCES for entry in long_functions(path)]
    assert not found, f"functions over {LIMIT} lines (split them): " + "; ".join(found)
