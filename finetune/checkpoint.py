"""Run directories and checkpoints, written atomically and without pickle.

A run directory holds::

    args.json                   the resolved arguments of the run
    log.jsonl                   one line per logged step and per evaluation
    checkpoints/step-00000120/  model.safetensors + config.json (Hugging Face layout),
                                optimizer.safetensors, rng.safetensors (tensors),
                                state.json (step, data position, optimizer groups, RNG scalars),
                                metadata.json
    model/                      the final model: model.safetensors, config.json, metadata.json

A checkpoint is written into a temporary directory, every file fsynced, then the
directory is renamed to its step-N name: the rename is the commit, so a crash
leaves either the whole checkpoint or none of it, and the newest step-N
directory is always complete. Tensors go to safetensors, everything else to
JSON; nothing is pickled, nothing is read with torch.load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minigpt2 import GPT2, save_pretrained
from minigpt2.weights import atomic_write as write_atomic  # noqa: F401  (re-exported for the trainer)
from minigpt2.weights import load_state_dict_strict, read_state_dict

STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = 1


# ---------------------------------------------------------------- atomic files and directories
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def commit_dir(parent: Path, name: str, fill) -> Path:
    """Build directory ``parent/name`` atomically: ``fill(tmp_dir)`` writes into a temporary
    directory that is then renamed; an older ``name`` is replaced only after the new one is complete."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the published directory private
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = parent / name
        old = None
        if final.exists():
            old = parent / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- the run directory
def is_run_dir(out: Path) -> bool:
    return (out / "args.json").exists() or (out / "checkpoints").is_dir()


def prepare_run_dir(out: str | os.PathLike, resume: bool, overwrite: bool, create: bool = True) -> Path:
    """Check ``out`` against --resume / --overwrite; then, if ``create``, clear (--overwrite) and
    create it. Never deletes anything but a run directory."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: keep one")
    if resume:
        if latest_checkpoint(out) is None:
            raise FileNotFoundError(
                f"--resume: {out} holds no checkpoint to resume from"
                + (" (the run stopped before its first save); restart it with --overwrite" if is_run_dir(out)
                   else "; drop --resume to start a new run there"))
        return out
    if out.exists() and any(out.iterdir()):
        if not is_run_dir(out):
            raise FileExistsError(f"--out {out} exists, is not empty and is not a run directory (no args.json): "
                                  "choose another --out; nothing outside a run directory is ever deleted")
        if not overwrite:
            raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
        if create:
            shutil.rmtree(out)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def check_resume_args(saved: dict, now: dict, may_change: set[str]) -> None:
    """Refuse to resume with settings that would make a different run than the one saved."""
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if k not in may_change and saved.get(k) != now.get(k)}
    if changed:
        lines = "\n  ".join(f"--{k.replace('_', '-')}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"--resume with settings that differ from the run being resumed:\n  {lines}\n"
                         "Fix: pass the run's own values (see args.json), or start a new run with another --out")


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the repository holding this code, '+dirty' when tracked files changed; None outside git."""
    where = where or Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=where, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- optimizer and RNG state, without pickle
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = t
    for key, v in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, {"numpy": [kind, pos, has_gauss, cached], "python": [version, gauss_next]}


def rng_from_flat(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- checkpoints
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never named step-N)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(out: Path, model: GPT2, optimizer, state: dict, metadata: dict, keep: int = 1) -> Path:
    """Write checkpoints/step-N (N = state["step"]) atomically; keep the newest ``keep``."""
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_to_flat()

    def fill(tmp: Path):
        save_pretrained(model, tmp)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {**state, "format": FORMAT, "optimizer": opt_meta, "rng": rng_meta})
        write_json(tmp / "metadata.json", metadata)

    path = commit_dir(Path(out) / "checkpoints", f"step-{state['step']:08d}", fill)
    for old in checkpoint_dirs(out)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: GPT2, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint directory; return its state.json."""
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}/state.json has format {state.get('format')!r}, this code reads {FORMAT}: "
                         "resume with the code version that wrote it")
    sd, _ = read_state_dict(path)
    load_state_dict_strict(model, sd, source=str(path))
    optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    rng_from_flat(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def save_final(out: Path, model: GPT2, metadata: dict) -> Path:
    """The finished model, loadable by minigpt2.load_pretrained and transformers: out/model/."""
    def fill(tmp: Path):
        save_pretrained(model, tmp)
        write_json(tmp / "metadata.json", metadata)

    return commit_dir(Path(out), "model", fill)
