"""The path from argv to the matmul (issue 27): ``python circuits.py sweep`` reaches the first matmul of
an attention or MLP layer through at most 6 of the repository's files, each entered once.

The sweep command runs in-process (circuits.main) on the bundled base model, 2 examples, one metric.
torch.nn.functional.linear, torch.matmul, torch.einsum and Tensor.__matmul__ are wrapped; at the first
call whose innermost repository frame is a method of minigpt2/model.py's Attention or MLP, the Python
stack is taken. Of it, the frames of the repository's own files are kept (not the test, not .venv, not
the standard library or torch), in call order, and consecutive frames of one file are collapsed into
one step. The sequence must name at most 6 distinct files, and no file may appear twice in it: a file
left and entered again is a back-and-forth (model -> engine -> model), which the issue removes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import circuits

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 6
LAYERS = ("Attention", "MLP")  # the classes of minigpt2/model.py whose maths the engine must reach


def repo_file(code) -> str | None:
    """The repository-relative path of a code object's file, or None outside the repository's own code."""
    name = code.co_filename
    if name.startswith("<"):
        return None
    try:
        rel = Path(name).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return None if rel.parts[0] in (".venv", "tests") else rel.as_posix()


def repo_stack(frame) -> list[tuple[str, str]]:
    """(file, qualified function name) of each repository frame from ``frame`` outwards, outermost first."""
    out = []
    while frame is not None:
        path = repo_file(frame.f_code)
        if path is not None:
            out.append((path, frame.f_code.co_qualname))
        frame = frame.f_back
    return out[::-1]


def collapse(stack: list[tuple[str, str]]) -> list[str]:
    """The files of a stack, consecutive frames of one file as one step."""
    steps: list[str] = []
    for path, _ in stack:
        if not steps or steps[-1] != path:
            steps.append(path)
    return steps


@pytest.fixture
def first_layer_matmul(monkeypatch):
    """Wraps the matmul entry points; the returned list receives the repository stack of the first call made
    from a method of model.py's Attention or MLP."""
    caught: list[list[tuple[str, str]]] = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            if not caught:
                stack = repo_stack(sys._getframe(1))
                if stack and stack[-1][0] == "minigpt2/model.py" and stack[-1][1].split(".")[0] in LAYERS:
                    caught.append(stack)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)

    wrap(F, "linear")
    wrap(torch, "matmul")
    wrap(torch, "einsum")
    wrap(torch.Tensor, "__matmul__")
    return caught


def test_sweep_reaches_the_matmul_through_few_files_once_each(first_layer_matmul, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = circuits.main(["sweep", "--models", str(ROOT / "weights" / "base"), "--examples", "2", "--metrics",
                        "logit_diff", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "sweep")])
    assert rc == 0
    assert first_layer_matmul, ("circuits.py sweep made no matmul from minigpt2/model.py's Attention or MLP: the "
                                "attention and MLP maths must stay in model.py (issue 27)")
    stack = first_layer_matmul[0]
    steps = collapse(stack)
    shown = " -> ".join(steps) + "\n  frames: " + " | ".join(f"{p}:{q}" for p, q in stack)
    n_files = len(set(steps))
    assert n_files <= MAX_FILES, f"{n_files} files from argv to the matmul (at most {MAX_FILES}): {shown}"
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert not repeated, f"back-and-forth through {repeated}: {shown}"
