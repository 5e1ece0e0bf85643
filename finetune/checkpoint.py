"""Run directories and checkpoints, written atomically and without pickle.

A run directory holds::

    args.json                   the resolved arguments of the run
    log.jsonl                   one line per logged step and per evaluation
    checkpoints/step-00000120/  model.safetensors + config.json (Hugging Face layout),
                                optimizer.safetensors, rng.safetensors (tensors),
                                state.json (step, data position, optimizer groups, RNG scalars),
                                metadata.json, complete.json (the completeness marker)
    model/                      the final model: model.safetensors, config.json, metadata.json, complete.json
    non_finite.json             only after a stop on a NaN/inf: where it happened (see train.py)
    .lock                       held (fcntl.flock) by the train.py running the run: a second one is refused

Committing a directory (a checkpoint, model/; minigpt2.fileio.atomic_dir): it is filled in a
temporary directory ``.NAME.partial-PID-*``, every file fsynced, then ``complete.json`` (each file's
size and sha256) is written last; then an older NAME is renamed aside to ``.NAME.old-PID-*``, the new
one renamed to NAME, and the old one deleted. A kill at any instant leaves NAME complete, or (between
the two renames) a complete ``.NAME.old-*`` and a complete ``.NAME.partial-*``:
``recover_run`` (run by --resume, and by every commit) puts the newest complete one
back under NAME and deletes the rest, so --resume always finds a complete checkpoint
if one was ever committed. --resume then verifies every file against the marker's size and
sha256, so a file missing, truncated or corrupted in place (same size) is refused, named. Pruned checkpoints are renamed to ``.NAME.del-PID`` before
being deleted, so a half-deleted one is never visible.

Tensors go to safetensors, everything else to JSON; nothing is pickled, nothing is
read with torch.load. Every file is written with ordinary permissions (0666 less the umask).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPT2, save_pretrained
from minigpt2 import fileio
from minigpt2.fileio import MARKER, FileError, checksum_problems, fsync_dir, load_json, read_marker
from minigpt2.weights import (CheckpointError, load_state_dict_strict, read_safetensors, read_state_dict,
                              save_safetensors)

STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|tmp|old|del)-[^/]+$")  # left by a killed commit
LOCK = fileio.DirLock.NAME  # the run's lock file (train.py holds it while it runs)
STALE_FILE = re.compile(r"^\..+\.tmp$")  # files left by a killed write_atomic
NON_FINITE_NOTE = "non_finite.json"
FORMAT = 1


# ---------------------------------------------------------------- atomic files (minigpt2.fileio's)
write_atomic = fileio.atomic_write  # write(tmp) on a temporary file, fsynced, 0644, renamed onto the path
write_json = fileio.write_json


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable, malformed or absurdly nested file is a
    ValueError (minigpt2.fileio.JSONFileError) naming the file and ``fix``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileError(f"{path} is missing. Fix: {fix}")
    return load_json(path, "", fix, kind=dict)


# ---------------------------------------------------------------- committed directories
def damaged_files(d: Path, hashes: bool = False) -> list[str] | None:
    """What is wrong with the files of ``d`` against its marker, one phrase each (missing, another
    size, with ``hashes`` another sha256); None without a readable marker."""
    try:
        if read_marker(d) is None:
            return None
        return checksum_problems(d, hashes=hashes)
    except (OSError, ValueError):
        return None


def is_complete(d: Path) -> bool:
    """Whether ``d``'s marker exists and every file it lists is there with its size."""
    return damaged_files(d) == []


def _restorable(kind: str, d: Path) -> bool:
    """A temporary directory is complete only with its marker; an .old one was a committed
    directory (complete by construction), so it needs the marker only if it has one
    (older code wrote none)."""
    if kind in ("partial", "tmp"):  # "tmp": the name older code gave it
        return is_complete(d)
    return kind == "old" and (is_complete(d) or not (d / MARKER).exists())


def leftovers(parent: Path) -> dict[str, list[tuple[str, Path]]]:
    """Directories left in ``parent`` by killed commits, by the name they were committing."""
    found: dict[str, list[tuple[str, Path]]] = {}
    if parent.is_dir():
        for p in sorted(parent.iterdir()):
            if p.is_dir() and (m := LEFTOVER.match(p.name)):
                found.setdefault(m.group("name"), []).append((m.group("kind"), p))
    return found


def recover_dir(parent: Path, name: str, found: list[tuple[str, Path]] | None = None) -> list[str]:
    """Finish what killed commits of ``parent/name`` left: if ``name`` is missing, the newest
    complete leftover becomes it (a complete temporary directory first: it is the newer
    content); every other leftover is deleted. Returns what was done, one line each."""
    found = leftovers(parent).get(name, []) if found is None else found
    final, notes = parent / name, []
    if not final.exists():
        # the newer content first: a sealed temporary directory, then the copy it was replacing
        candidates = sorted(found, key=lambda kp: (kp[0] not in ("partial", "tmp"), -kp[1].stat().st_mtime))
        best = next((p for kind, p in candidates if _restorable(kind, p)), None)
        if best is not None:
            os.replace(best, final)
            fsync_dir(parent)
            notes.append(f"restored {final} from {best.name}, left complete by an interrupted save")
    for kind, p in found:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            what = {"partial": "unfinished", "tmp": "unfinished", "old": "replaced", "del": "half-deleted"}[kind]
            notes.append(f"removed {p}, the {what} copy left by an interrupted save")
    return notes


def recover_run(out: Path) -> list[str]:
    """Recover every directory of run ``out`` a killed save left hidden (checkpoints, model/),
    and delete the temporary files of killed writes. Returns what was done, one line each."""
    out, notes = Path(out), []
    for parent in (out / "checkpoints", out):
        for name, found in leftovers(parent).items():
            notes += recover_dir(parent, name, found)
        if parent.is_dir():
            for f in parent.iterdir():
                if f.is_file() and STALE_FILE.match(f.name):
                    f.unlink()
                    notes.append(f"removed {f}, a file left half-written by an interrupted save")
    return notes


swap_in = fileio.swap_dir  # tmp renamed onto final; an existing final renamed aside first, deleted last


def commit_dir(parent: Path, name: str, fill) -> Path:
    """Build directory ``parent/name`` atomically: ``fill(tmp_dir)`` writes into a temporary
    directory, sealed with the completeness marker, that then replaces ``name`` (minigpt2.fileio's
    atomic_dir; see the module docstring for why a kill at any point leaves a complete copy)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover_dir(parent, name)
    except OSError as e:
        raise fileio.WriteError(parent / name, e) from None
    with fileio.atomic_dir(parent / name, marker=True) as tmp:  # a full disk: named, the earlier NAME untouched
        fill(tmp)
    return parent / name


def remove_dir(path: Path) -> None:
    """Delete a committed directory: renamed to a hidden .del name first, so a kill never
    leaves a half-deleted one visible."""
    doomed = path.parent / f".{path.name}.del-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------- the run directory
def is_run_dir(out: Path) -> bool:
    return (out / "args.json").exists() or (out / "checkpoints").is_dir()


def _recoverable_checkpoint(out: Path) -> bool:
    return any(_restorable(kind, p) for found in leftovers(out / "checkpoints").values() for kind, p in found)


def _prepare_resume(out: Path, create: bool) -> None:
    """--resume: recover what a killed save left (if ``create``; printed), then require a complete
    checkpoint (without ``create``, one that recovery will restore also counts)."""
    if create:
        for note in recover_run(out):
            print(f"--resume: {note}", file=sys.stderr, flush=True)
    if latest_checkpoint(out) is None and not (not create and _recoverable_checkpoint(out)):
        raise FileNotFoundError(
            f"--resume: {out} holds no complete checkpoint to resume from"
            + (f" (the run stopped before its first save completed). Fix: start it again with --overwrite "
               f"(this deletes {out})" if is_run_dir(out) else ". Fix: drop --resume to start a new run there"))


def prepare_run_dir(out: str | os.PathLike, resume: bool, overwrite: bool, create: bool = True) -> Path:
    """Check ``out`` against --resume / --overwrite; then, if ``create``, recover what a killed
    save left (--resume; what was done is printed), or clear (--overwrite) and create it.
    Never deletes anything but a run directory."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: keep one")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run directory: choose another --out")
    if resume:
        _prepare_resume(out, create)
        return out
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        if not is_run_dir(out):
            raise FileExistsError(f"--out {out} exists, is not empty and is not a run directory (no args.json): "
                                  "choose another --out; nothing outside a run directory is ever deleted")
        if not overwrite:
            raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
        if create:
            clear_run_dir(out)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def clear_run_dir(out: Path) -> None:
    """--overwrite: delete everything in ``out`` but its lock file (which this process may hold:
    deleting it would let a second process lock a new file of the same name)."""
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_resume_args(saved: dict, now: dict, may_change: set[str]) -> None:
    """Refuse to resume with settings that would make a different run than the one saved."""
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if k not in may_change and saved.get(k) != now.get(k)}
    if changed:
        lines = "\n  ".join(f"--{k.replace('_', '-')}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"--resume with settings that differ from the run being resumed:\n  {lines}\n"
                         "Fix: pass the run's own values (see args.json), or start a new run with another --out")


def check_resume_data(out: Path, meta: dict, accept: bool) -> list[dict]:
    """--resume: the training data (``meta["data_sha256"]``, this process's) must be the data the run's
    latest checkpoint was trained on; else a ValueError naming both, unless ``accept`` (--accept-data-change).
    Returns the run's record of data changes (carried from checkpoint to checkpoint), this one added."""
    path = latest_checkpoint(out)
    if path is None:
        return []
    saved = read_json_object(path / "metadata.json", _damage_fix(path))
    changes = saved.get("data_changes") if isinstance(saved.get("data_changes"), list) else []
    was, now = saved.get("data_sha256"), meta.get("data_sha256")
    if was is None or now is None or was == now:
        return changes
    source = meta.get("corpus") or "the training data"
    if not accept:
        raise ValueError(f"--resume: {source} is not the data run {out} trained on: its sha256 is {now[:12]}…, the "
                         f"run's checkpoint {path.name} records {was[:12]}… (was a corpus file edited?). Fix: restore "
                         "the data, or pass --accept-data-change to train the rest of the run on the new data "
                         "(recorded in metadata.json), or start a new run with another --out")
    step = read_state(path)["step"]
    return changes + [{"step": step, "from_sha256": was, "to_sha256": now, "from_data": saved.get("data"),
                       "to_data": meta.get("data")}]


def write_non_finite_note(out: Path, note: dict) -> None:
    """Record a stop on a NaN/inf (train.py then lets --resume change the learning-rate flags)."""
    write_json(Path(out) / NON_FINITE_NOTE, note)


def read_non_finite_note(out: Path) -> dict | None:
    path = Path(out) / NON_FINITE_NOTE
    if not path.exists():
        return None
    try:
        note = load_json(path)
    except ValueError:
        return None
    return note if isinstance(note, dict) else None


def clear_non_finite_note(out: Path, step: int) -> None:
    """Drop the note once the run has saved a checkpoint at or past the step that failed."""
    note = read_non_finite_note(out)
    if note is not None and isinstance(note.get("step"), int) and step >= note["step"]:
        (Path(out) / NON_FINITE_NOTE).unlink(missing_ok=True)


git_commit = fileio.git_commit  # HEAD of this code's repository, "+dirty" when tracked files changed


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


def _check_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Raise ValueError unless ``tensors``/``meta`` are this optimizer's kind of state: same
    parameter groups, every moment tensor shaped like its parameter."""
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("scalars"), dict):
        raise ValueError("its optimizer entry lacks param_groups or scalars")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g.get("params", ())) if isinstance(g, dict) else None for g in meta["param_groups"]]
    if saved != sizes:
        raise ValueError(f"its optimizer has parameter groups of sizes {saved}, this model's has {sizes}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise ValueError(f"optimizer tensor {key!r} is not AdamW state of this model")
        if parts[2] in ("exp_avg", "exp_avg_sq") and t.shape != params[int(parts[1])].shape:
            raise ValueError(f"optimizer tensor {key} has shape {tuple(t.shape)}, its parameter "
                             f"{tuple(params[int(parts[1])].shape)}")


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    _check_optimizer_state(optimizer, tensors, meta)
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


# ---------------------------------------------------------------- finiteness
def non_finite_tensors(model: GPT2, optimizer=None) -> list[str]:
    """Names of the model's parameters and optimizer state tensors holding a NaN or an inf."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad.append(f"optimizer {k} of {names.get(id(p), '?')}")
    return bad


# ---------------------------------------------------------------- checkpoints
def checkpoint_dirs(out: Path) -> list[Path]:
    """Committed checkpoints, oldest first (temporary directories are never named step-N)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(out: Path, model: GPT2, optimizer, state: dict, metadata: dict, keep: int = 1) -> Path:
    """Write checkpoints/step-N (N = state["step"]) atomically; keep the newest ``keep``.
    A model or optimizer state holding a NaN or inf is refused (ValueError): it is never saved."""
    bad = non_finite_tensors(model, optimizer)
    if bad:
        raise ValueError(f"refusing to save step {state['step']}: {len(bad)} tensors are not finite "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_to_flat()

    def fill(tmp: Path):
        save_pretrained(model, tmp)
        write_atomic(tmp / "optimizer.safetensors", lambda f: save_safetensors(opt_tensors, f))
        write_atomic(tmp / "rng.safetensors", lambda f: save_safetensors(rng_tensors, f))
        write_json(tmp / "state.json", {**state, "format": FORMAT, "optimizer": opt_meta, "rng": rng_meta})
        write_json(tmp / "metadata.json", metadata)

    path = commit_dir(Path(out) / "checkpoints", f"step-{state['step']:08d}", fill)
    for old in checkpoint_dirs(out)[:-max(keep, 1)]:
        remove_dir(old)
    return path


# state.json: key -> the types its value may have
STATE_KEYS = {"format": (int,), "step": (int,), "tokens_seen": (int,), "last_eval": (dict,), "last_eval_step": (int, type(None)),
              "optimizer": (dict,), "rng": (dict,)}


def _damage_fix(path: Path) -> str:
    """How to go on when checkpoint ``path`` cannot be read."""
    out = path.parent.parent
    others = [p for p in checkpoint_dirs(out) if p != path]
    if others:
        return (f"move it out of the way (mv {path} {out}/{path.name}.damaged) and --resume continues from "
                f"{others[-1].name}")
    return f"it is the run's only checkpoint: start the run again with --overwrite (this deletes {out})"


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, checked: format, every key the trainer needs, its step."""
    fix = _damage_fix(path)
    state = read_json_object(path / "state.json", fix)
    bad = [k for k, types in STATE_KEYS.items()
           if k not in state or not isinstance(state[k], types) or isinstance(state[k], bool)]
    if bad:
        raise ValueError(f"{path}/state.json lacks (or has a wrong type for) {', '.join(bad)}. Fix: {fix}")
    if state["format"] != FORMAT:
        raise ValueError(f"{path}/state.json has format {state['format']!r}, this code reads {FORMAT}: "
                         "resume with the code version that wrote it")
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise ValueError(f"{path}/state.json says step {state['step']}, its directory step {int(m.group(1))}. "
                         f"Fix: {fix}")
    return state


def read_tensors(file: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, recognised by its format (a pickle is named, never unpickled)."""
    try:
        return read_safetensors(file)
    except CheckpointError as e:
        raise ValueError(f"{e} Fix: {fix}") from None


def load_checkpoint(path: Path, model: GPT2, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint directory; return its state.json.
    A damaged or foreign file is a ValueError naming it and the fix."""
    path, fix = Path(path), _damage_fix(Path(path))
    try:
        damaged = checksum_problems(path)  # sizes and sha256: a file corrupted in place is caught here
    except ValueError as e:
        raise ValueError(f"{e}. Fix: {fix}") from None
    if damaged:
        raise ValueError(f"checkpoint {path} is damaged: {'; '.join(damaged)}. Fix: {fix}")
    state = read_state(path)
    read_json_object(path / "metadata.json", fix)
    try:
        sd, _ = read_state_dict(path)
        load_state_dict_strict(model, sd, source=str(path))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{e}\nFix: {fix}") from None
    opt_tensors = read_tensors(path / "optimizer.safetensors", fix)
    rng_tensors = read_tensors(path / "rng.safetensors", fix)
    try:
        optimizer_from_flat(optimizer, opt_tensors, state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}/optimizer.safetensors does not fit this model: {e}. Fix: {fix}") from None
    try:
        rng_from_flat(rng_tensors, state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"{path}/rng.safetensors is not a random-generator state ({e!r}). Fix: {fix}") from None
    return state


def save_final(out: Path, model: GPT2, metadata: dict) -> Path:
    """The finished model, loadable by minigpt2.load_pretrained and transformers: out/model/.
    Refused (ValueError) if a weight is not finite."""
    bad = non_finite_tensors(model)
    if bad:
        raise ValueError(f"refusing to publish {out}/model: {len(bad)} tensors are not finite")

    def fill(tmp: Path):
        save_pretrained(model, tmp)
        write_json(tmp / "metadata.json", metadata)

    return commit_dir(Path(out), "model", fill)
