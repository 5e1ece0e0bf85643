"""Checkpoints survive a kill at any instant: a save killed at each of its filesystem
operations leaves a complete checkpoint that --resume finds (restoring it if a kill left it
hidden), never a state where --overwrite is the only advice while a complete one exists.
Also: damaged checkpoint files are named with their fix, never a traceback or a pickle load;
non-finite weights are never saved; written files have ordinary permissions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune import checkpoint as ckpt
from minigpt2 import GPT2, GPT2Config, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script at the repository root)


def tiny(seed=0) -> GPT2:
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=8, d_mlp=11, n_ctx=6, vocab_size=13))
    model.init_weights(seed=seed)
    return model


def trained(seed=0) -> tuple[GPT2, torch.optim.Optimizer]:
    """A model and an AdamW that has taken one step (so it has moment tensors)."""
    model = tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(6)[None]).sum().backward()
    opt.step()
    return model, opt


def state(step: int) -> dict:
    return {"step": step, "tokens_seen": 6 * step, "last_eval": {}, "last_eval_step": None}


def save(out: Path, step: int, tag: str) -> Path:
    model, opt = trained()
    return ckpt.save_checkpoint(out, model, opt, state(step), {"tag": tag}, keep=1)


def publish(out: Path, tag: str) -> Path:
    return ckpt.save_final(out, tiny(), {"tag": tag})


# ---------------------------------------------------------------- killing a save at step k
class Killed(BaseException):
    """The process died here: nothing after it touches the disk."""


FS_OPS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (shutil, "rmtree")]


class Injector:
    """Wraps the filesystem operations a save uses; ``kill_at=k``: the k-th one (0-based) and
    every later one raise Killed instead of running (a SIGKILL); ``fail_at=k``: only the k-th
    raises OSError (a full disk); neither: counts them."""

    def __init__(self, monkeypatch, kill_at=None, fail_at=None):
        self.count, self.kill_at, self.fail_at, self.dead = 0, kill_at, fail_at, False
        for module, name in FS_OPS:
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, real):
        def op(*args, **kwargs):
            k, self.count = self.count, self.count + 1
            if self.dead or k == self.kill_at:
                self.dead = True
                raise Killed(f"killed at filesystem operation {k}")
            if k == self.fail_at:
                raise OSError(28, "No space left on device (injected)")
            return real(*args, **kwargs)
        return op


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """fsync makes a save durable against power loss, which no test here simulates; on a busy
    disk it is most of a save's time."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def count_ops(tmp_path, monkeypatch, before, action) -> int:
    out = tmp_path / "count"
    before(out)
    with monkeypatch.context() as m:
        injector = Injector(m)
        action(out)
    shutil.rmtree(out)
    return injector.count


def hidden(out: Path) -> list[str]:
    """Leftovers of a save: hidden directories and temporary files, anywhere in the run (not the
    run's lock file, which stays: see minigpt2.fileio.DirLock)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name != ".lock")


def check_checkpoint(out: Path, tags: set[str], steps: set[int]) -> None:
    """The run resumes (check-only first, as every DDP rank does) from a complete checkpoint."""
    ckpt.prepare_run_dir(out, resume=True, overwrite=False, create=False)
    ckpt.prepare_run_dir(out, resume=True, overwrite=False)  # recovers what the kill left
    assert hidden(out) == []
    path = ckpt.latest_checkpoint(out)
    model = tiny(seed=1)
    opt = torch.optim.AdamW(model.parameters())
    loaded = ckpt.load_checkpoint(path, model, opt)
    assert loaded["step"] in steps
    assert json.loads((path / "metadata.json").read_text())["tag"] in tags
    assert all(ckpt.is_complete(p) for p in ckpt.checkpoint_dirs(out))


SCENARIOS = {  # name: (what is there before, the save that is killed, what --resume may then find)
    "same step saved again": (lambda out: save(out, 4, "old"), lambda out: save(out, 4, "new"), {4}),
    "next step (prunes the last)": (lambda out: save(out, 4, "old"), lambda out: save(out, 6, "new"), {4, 6}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_kill_at_any_step_of_a_checkpoint_save_leaves_one_to_resume(tmp_path, monkeypatch, scenario, capsys):
    before, action, steps = SCENARIOS[scenario]
    n = count_ops(tmp_path, monkeypatch, before, action)
    assert n >= 6  # the file renames, the directory renames, the deletion of the replaced one
    for k in range(n + 1):
        out = tmp_path / f"kill{k}"
        before(out)
        with monkeypatch.context() as m:
            Injector(m, kill_at=k)
            with pytest.raises(Killed) if k < n else nullcontext():
                action(out)
        check_checkpoint(out, {"old", "new"}, steps)
    capsys.readouterr()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_an_error_at_any_step_of_a_save_keeps_a_visible_checkpoint(tmp_path, monkeypatch, scenario):
    """An exception (not a kill) needs no recovery: the replaced checkpoint is moved back."""
    before, action, steps = SCENARIOS[scenario]
    n = count_ops(tmp_path, monkeypatch, before, action)
    for k in range(n):
        out = tmp_path / f"fail{k}"
        before(out)
        with monkeypatch.context() as m:
            Injector(m, fail_at=k)
            try:
                action(out)
            except OSError:
                pass
        path = ckpt.latest_checkpoint(out)
        assert path is not None and ckpt.is_complete(path), f"no complete checkpoint after an error at op {k}"
        ckpt.load_checkpoint(path, (m := tiny(1)), torch.optim.AdamW(m.parameters()))


def test_a_kill_during_the_first_save_advises_overwrite_only_when_nothing_is_complete(tmp_path, monkeypatch):
    n = count_ops(tmp_path, monkeypatch, lambda out: None, lambda out: save(out, 2, "new"))
    for k in range(n):
        out = tmp_path / f"kill{k}"
        (out / "checkpoints").mkdir(parents=True)
        with monkeypatch.context() as m:
            Injector(m, kill_at=k)
            with pytest.raises(Killed):
                save(out, 2, "new")
        complete_somewhere = any(ckpt.is_complete(p) for p in (out / "checkpoints").iterdir())
        if complete_somewhere:
            check_checkpoint(out, {"new"}, {2})
        else:
            with pytest.raises(FileNotFoundError, match="--overwrite"):
                ckpt.prepare_run_dir(out, resume=True, overwrite=False)
            assert hidden(out) == []  # the unfinished copy was cleaned up


def test_a_kill_at_any_step_of_publishing_model_leaves_a_complete_model(tmp_path, monkeypatch):
    def before(out):
        save(out, 4, "ckpt")
        publish(out, "old")

    n = count_ops(tmp_path, monkeypatch, before, lambda out: publish(out, "new"))
    for k in range(n):
        out = tmp_path / f"kill{k}"
        before(out)
        with monkeypatch.context() as m:
            Injector(m, kill_at=k)
            with pytest.raises(Killed):
                publish(out, "new")
        ckpt.recover_run(out)
        assert hidden(out) == []
        assert ckpt.is_complete(out / "model")
        load_pretrained(out / "model")
        assert json.loads((out / "model" / "metadata.json").read_text())["tag"] in {"old", "new"}


def test_a_real_kill_between_the_renames_of_a_resave_is_recovered_by_resume(tmp_path, capsys):
    """The reported case, with a real process death: a finished run resumed (which saves its last
    step again) is killed after the old checkpoint was renamed aside; --resume recovers it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} of a small animal is {v}." for w in "abcdefghij" for v in "klmnopqrst"))
    argv = ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-head", "2",
            "--d-model", "8", "--block-size", "8", "--batch-size", "4", "--eval-size", "2", "--max-steps", "2",
            "--no-progress", "--device", "cpu"]
    train.main(argv)  # a finished run; resuming it saves step 2 again
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import train
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if ".old-" in os.path.basename(dst):
                os._exit(9)  # killed between the two renames
        os.replace = replace
        train.main({argv + ["--resume"]!r})
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 9, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert ckpt.latest_checkpoint(run) is None  # the reported state: no visible checkpoint
    capsys.readouterr()
    assert train.main(argv + ["--resume"])["steps"] == 2
    assert "--resume: restored" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(run).name == "step-00000002" and hidden(run) == []


# ---------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = save(tmp_path / "run", 3, "x")
    (path / ckpt.MARKER).unlink()  # as older code wrote them: each file's own check is reached
    return path


def pickled(path: Path) -> None:
    torch.save({"state": {}}, path)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def foreign_optimizer(path: Path) -> None:
    """The same tensor names, the wrong shapes (as another model's optimizer would have)."""
    tensors, _ = ckpt.optimizer_to_flat(trained()[1])
    save_file({k: torch.zeros(3) for k in tensors}, str(path))


def edit_state(**changes):
    def edit(path: Path) -> None:
        state = json.loads(path.read_text())
        for k, v in changes.items():
            state.pop(k) if v is None else state.__setitem__(k, v)
        path.write_text(json.dumps(state))
    return edit


DAMAGE = {
    "optimizer truncated": ("optimizer.safetensors", truncated, "not a readable safetensors"),
    "optimizer pickled": ("optimizer.safetensors", pickled, "is a pickle"),
    "optimizer foreign": ("optimizer.safetensors", foreign_optimizer, "does not fit this model"),
    "rng truncated": ("rng.safetensors", truncated, "not a readable safetensors"),
    "rng pickled": ("rng.safetensors", pickled, "is a pickle"),
    "rng foreign": ("rng.safetensors", lambda p: save_file({"torch": torch.zeros(3)}, str(p)),
                    "not a random-generator state"),
    "model truncated": ("model.safetensors", truncated, "truncated or corrupt"),
    "state without step": ("state.json", edit_state(step=None), "lacks .* step"),
    "state invalid JSON": ("state.json", lambda p: p.write_text('{"step": 3,'), "not valid JSON"),
    "state not an object": ("state.json", lambda p: p.write_text("[3]"), "not an object"),
    "state of another step": ("state.json", edit_state(step=5), "says step 5"),
    "metadata invalid JSON": ("metadata.json", lambda p: p.write_text("{"), "not valid JSON"),
    "state.json missing": ("state.json", Path.unlink, "missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_file_is_named_with_its_fix(checkpoint, case, monkeypatch):
    name, damage, message = DAMAGE[case]
    damage(checkpoint / name)
    monkeypatch.setattr("pickle.load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    monkeypatch.setattr("torch.load", lambda *a, **k: pytest.fail("torch.load was called"))
    model = tiny(1)
    with pytest.raises(ValueError, match=message) as e:
        ckpt.load_checkpoint(checkpoint, model, torch.optim.AdamW(model.parameters()))
    assert name in str(e.value) and "Fix: " in str(e.value) and "--overwrite" in str(e.value)


def test_a_truncated_file_is_caught_by_the_marker_and_an_older_checkpoint_is_offered(tmp_path):
    model, opt = trained()
    out = tmp_path / "run"
    ckpt.save_checkpoint(out, model, opt, state(2), {}, keep=2)
    path = ckpt.save_checkpoint(out, model, opt, state(4), {}, keep=2)
    truncated(path / "optimizer.safetensors")
    with pytest.raises(ValueError, match=r"optimizer.safetensors is \d+ bytes, complete.json records.*Fix: move it out of the "
                                         r"way.*step-00000002"):
        ckpt.load_checkpoint(path, model, opt)


# ---------------------------------------------------------------- what is written
def test_non_finite_weights_or_optimizer_state_are_never_saved(tmp_path):
    model, opt = trained()
    with torch.no_grad():
        next(iter(opt.state.values()))["exp_avg"].fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        ckpt.save_checkpoint(tmp_path, model, opt, state(1), {})
    with torch.no_grad():
        model.wte.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        ckpt.save_final(tmp_path, model, {})
    assert ckpt.latest_checkpoint(tmp_path) is None and not (tmp_path / "model").exists()
    assert hidden(tmp_path) == []


def test_every_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save(tmp_path, 1, "x")
        publish(tmp_path, "x")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"optimizer.safetensors", "rng.safetensors", "model.safetensors", "state.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_dir()} == {"0o755"}

