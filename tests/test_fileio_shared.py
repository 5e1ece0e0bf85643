"""One I/O module for the whole codebase: the git stamp, JSON writing and atomic directories of
reports, run checkpoints and published models all come from minigpt2.fileio."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import finetune.checkpoint as ckpt
from circuitlab import report
from minigpt2 import fileio

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^[0-9a-f]{40}(\+dirty)?$")


def git(where: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=where, check=True,
                   capture_output=True)


def test_reports_and_checkpoints_record_one_git_stamp():
    stamp = fileio.git_commit()
    if stamp is None:
        pytest.skip("this copy of the code is not a git checkout")
    assert STAMP.match(stamp), stamp
    assert report.provenance([])["git_commit"] == stamp
    assert ckpt.git_commit() == stamp


def test_dirty_is_spelled_as_the_bundled_models_record_it(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "one")
    clean = fileio.git_commit(tmp_path)
    assert STAMP.match(clean) and not clean.endswith("+dirty")
    (tmp_path / "a.txt").write_text("two\n")
    assert fileio.git_commit(tmp_path) == clean + "+dirty"
    (tmp_path / "new.txt").write_text("untracked files do not make it dirty\n")
    git(tmp_path, "checkout", "-q", "a.txt")
    assert fileio.git_commit(tmp_path) == clean
    recorded = json.loads((ROOT / "weights" / "welterweight" / "metadata.json").read_text())["git_commit"]
    assert STAMP.match(recorded), recorded  # the same spelling: HASH or HASH+dirty


def test_outside_git_there_is_no_stamp(tmp_path):
    assert fileio.git_commit(tmp_path / "nowhere") is None  # no such directory: None, not an exception


def test_report_json_keeps_its_layout_and_writes_tensors_as_lists(tmp_path):
    path = report.write_json(tmp_path / "r.json", {"b": torch.tensor([1.5, 2.0]), "a": tmp_path})
    text = path.read_text()
    assert text == '{\n "b": [\n  1.5,\n  2.0\n ],\n "a": "' + str(tmp_path) + '"\n}\n'  # insertion order, indent 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_a_sealed_atomic_directory_is_what_checkpoints_verify(tmp_path):
    with fileio.atomic_dir(tmp_path / "d", marker=True) as tmp:
        (tmp / "x.txt").write_text("hello")
    assert ckpt.is_complete(tmp_path / "d")
    assert fileio.read_marker(tmp_path / "d")["files"] == {"x.txt": 5}
    with fileio.atomic_dir(tmp_path / "d") as tmp:  # replaced whole; the old copy set aside is deleted
        (tmp / "y.txt").write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y.txt"]


def test_a_leftover_of_a_killed_commit_is_recovered_by_its_name(tmp_path):
    """A kill between swap_dir's two renames leaves .NAME.old-PID-* and a sealed .NAME.partial-PID-*:
    the run's recovery restores the newer, sealed one."""
    with fileio.atomic_dir(tmp_path / "step", marker=True) as tmp:
        (tmp / "w").write_text("old")
    (tmp_path / "step").rename(tmp_path / ".step.old-1-abcd")
    partial = tmp_path / ".step.partial-1-efgh"
    partial.mkdir()
    (partial / "w").write_text("new")
    fileio.seal(partial)
    notes = ckpt.recover_dir(tmp_path, "step")
    assert (tmp_path / "step" / "w").read_text() == "new" and len(notes) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]
