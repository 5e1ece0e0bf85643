"""Runs that share a directory, whose data changed, or that the keyboard or the disk stop (issue 25).

  * a run directory is locked: a second process on it is refused, naming the holder; a killed
    holder releases it;
  * --resume verifies the data against the hash the run recorded (refused, or accepted and
    recorded with --accept-data-change), and every checkpoint file against complete.json's sha256;
  * a missing checkpoint file is called missing; args.json from before a flag resumes;
  * a full disk while train.py checkpoints, Ctrl-C during circuits.py and tpp: one line, nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import finetune.checkpoint as ckpt
from minigpt2 import fileio

from conftest import READ_ONLY, needs_read_only_place

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script at the repository root)

WORDS = "the of a to in is and that for as with by an on which or one from be at used something".split()


def write_corpus(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(200)))
    return path


def argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--corpus", str(corpus), "--out", str(out), "--n-layer", "1", "--n-head", "2",
            "--d-model", "16", "--d-mlp", "24", "--block-size", "12", "--batch-size", "6", "--eval-size", "4",
            "--save-every", "2", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, run directory) of a 2-step run: copy it before changing it."""
    d = tmp_path_factory.mktemp("trust")
    corpus = write_corpus(d / "corpus.txt")
    train.main(argv(corpus, d / "run", "--max-steps", "2"))
    return corpus, d / "run"


def copy_of(run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run and its corpus (args.json pointed at the copied corpus)."""
    corpus, out = run
    shutil.copy(corpus, tmp_path / "corpus.txt")
    shutil.copytree(out, tmp_path / "run")
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    (tmp_path / "run" / "args.json").write_text(json.dumps(args | {"corpus": str(tmp_path / "corpus.txt")}))
    return tmp_path / "corpus.txt", tmp_path / "run"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ the lock
HOLD = """
import sys, time
from minigpt2.fileio import DirLock
DirLock(sys.argv[1], "run directory").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_on_a_run_is_refused_naming_the_holder(run, tmp_path, capsys):
    corpus, out = copy_of(run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 2
        line = one_error_line(capsys)
        assert f"run directory {out} is in use by process {holder.pid} on " in line and "Fix: wait" in line, line
        assert ckpt.latest_checkpoint(out).name == "step-00000002"  # untouched
    finally:
        holder.kill()  # as kill -9: the OS releases the lock
        holder.wait()
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 0
    assert ckpt.latest_checkpoint(out).name == "step-00000004"


def test_train_holds_the_lock_while_it_runs(tmp_path):
    corpus, out = write_corpus(tmp_path / "corpus.txt"), tmp_path / "run"
    seen = []

    def on_step(trainer):
        with pytest.raises(fileio.LockedError, match=r"in use by process \d+"):
            fileio.DirLock(out).acquire()  # a second open file description: refused as another process is
        seen.append(trainer.step)

    train.main(argv(corpus, out, "--max-steps", "1"), on_step=on_step)
    assert seen == [1]
    fileio.DirLock(out).acquire().release()  # released at the end


def test_overwrite_keeps_the_lock_file(run, tmp_path):
    corpus, out = copy_of(run, tmp_path)
    train.main(argv(corpus, out, "--max-steps", "1", "--overwrite"))
    assert (out / ".lock").is_file() and ckpt.latest_checkpoint(out).name == "step-00000001"


# ------------------------------------------------------------------ the data and the checkpoint files
def test_resume_on_edited_data_is_refused_unless_accepted_and_then_recorded(run, tmp_path, capsys):
    corpus, out = copy_of(run, tmp_path)
    write_corpus(corpus, seed=1)  # the corpus file edited between the runs
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 2
    line = one_error_line(capsys)
    assert "is not the data run" in line and "--accept-data-change" in line, line
    assert ckpt.latest_checkpoint(out).name == "step-00000002"
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume", "--accept-data-change")) == 0
    meta = json.loads((out / "model" / "metadata.json").read_text())
    first = json.loads((run[1] / "model" / "metadata.json").read_text())
    assert meta["data_changes"] == [{"step": 2, "from_sha256": first["data_sha256"], "to_sha256": meta["data_sha256"],
                                     "from_data": first["data"], "to_data": meta["data"]}]
    assert meta["data_sha256"] != first["data_sha256"]


@pytest.mark.parametrize("name", ["state.json", "optimizer.safetensors", "rng.safetensors", "metadata.json"])
def test_resume_with_a_checkpoint_file_missing_says_it_is_missing(run, tmp_path, capsys, name):
    corpus, out = copy_of(run, tmp_path)
    (out / "checkpoints" / "step-00000002" / name).unlink()
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 2
    line = one_error_line(capsys)
    assert f"{name} is missing" in line and "size" not in line and "--overwrite" in line, line


def test_a_checkpoint_corrupted_in_place_is_refused_on_resume(run, tmp_path, capsys):
    corpus, out = copy_of(run, tmp_path)
    f = out / "checkpoints" / "step-00000002" / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # the same size: only the checksum sees it
    f.write_bytes(bytes(data))
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 2
    line = one_error_line(capsys)
    assert "optimizer.safetensors's sha256 differs" in line, line


def test_args_json_from_before_a_flag_resumes_as_the_flags_default(run, tmp_path):
    corpus, out = copy_of(run, tmp_path)
    saved = json.loads((out / "args.json").read_text())
    saved["copy_spans"] = None  # written before --copy-spans existed
    del saved["random_repeats"]
    (out / "args.json").write_text(json.dumps(saved))
    train.main(argv(corpus, out, "--max-steps", "3", "--resume"))
    assert ckpt.latest_checkpoint(out).name == "step-00000003"


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(run, tmp_path, capsys,
                                                                                   monkeypatch):
    from safetensors import SafetensorError

    import minigpt2.weights as W

    corpus, out = copy_of(run, tmp_path)
    real = W.save_file

    def full_at_the_optimizer(tensors, file, metadata=None):
        if "optimizer" in Path(file).name:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, file, metadata=metadata)

    monkeypatch.setattr(W, "save_file", full_at_the_optimizer)
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and "optimizer.safetensors" in line and "No space left on device" in line, line
    assert ckpt.latest_checkpoint(out).name == "step-00000002"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert train.cli(argv(corpus, out, "--max-steps", "4", "--resume")) == 0


# ------------------------------------------------------------------ Ctrl-C
def interrupt_after(cmd: list[str], marker: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``; send SIGINT once ``marker`` appears on its stderr; return its result."""
    p = subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    err = []
    for line in p.stderr:
        err.append(line)
        if marker in line:
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            break
    out, rest = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, out, "".join(err) + rest)


def test_ctrl_c_during_circuits_sweep_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "report"
    r = interrupt_after([sys.executable, "circuits.py", "sweep", "--models", "base=weights/base", "--examples", "100",
                         "--master-size", "2000", "--out", str(out)], "[sweep] models", ROOT)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "circuits.py sweep: interrupted" in r.stderr, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the report nor a .report.partial-* directory


def test_ctrl_c_during_tpp_build_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "data"
    r = interrupt_after([sys.executable, "-m", "tpp", "build", "--n", "150000", "--out", str(out)],
                        "tpp build: started", ROOT)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "build: interrupted" in r.stderr, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@needs_read_only_place
def test_circuits_out_in_a_read_only_place_is_one_line(capsys):
    import circuits

    assert circuits.main(["sweep", "--models", "base=weights/base", "--examples", "2", "--master-size", "100",
                          "--out", str(READ_ONLY / "r")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith(f"circuits.py sweep: error: cannot write {READ_ONLY}/r: "), err
    assert "Fix: choose a place you can write to" in err[0], err
