"""Output directories written atomically, markdown tables, JSON, and the run's provenance."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from pathlib import Path

from minigpt2 import distributed, fileio


def fmt(x, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, NaN as an en dash."""
    if x is None:
        return "–"
    if isinstance(x, bool) or isinstance(x, int) or isinstance(x, str):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"


def pm(mean, sem) -> str:
    """mean ± standard error."""
    return f"{fmt(mean)} ± {fmt(sem, 2)}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as JSON at ``path``, written atomically (minigpt2.fileio: a full disk leaves no part)."""
    path = Path(path)
    fileio.write_json(path, obj, indent=1, sort_keys=False, default=_jsonable)  # tensors as lists
    return path


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def check_out_dir(out: str | Path) -> Path:
    """Refuse an ``out`` (circuits.py's --out) that atomic_dir must not replace: a file, or a directory of
    files that no command wrote (a report directory holds provenance.json), which would be deleted whole."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} exists and is not a directory. Fix: choose another path")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"out={out}: {above} is a file, so no directory can be made there. Fix: choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "provenance.json").is_file():
        raise ValueError(f"out={out} holds files that circuits.py did not write (it has no provenance.json), "
                         "and that directory is replaced whole. Fix: choose a new or empty directory, or an earlier "
                         "report directory")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``,
    on any error (Ctrl-C and a full disk included) it is deleted, so ``out`` is either the complete
    new result or untouched; ``.OUT.partial-PID-*`` directories left by a killed process are removed.
    ``out`` must be new, empty or an earlier report directory (:func:`check_out_dir`). The directory
    gets an ordinary mode (0777 less the umask), as run directories do. See minigpt2.fileio.atomic_dir."""
    with fileio.atomic_dir(check_out_dir(out)) as tmp:
        yield tmp


def provenance(argv: list[str] | None = None, **extra) -> dict:
    """The exact command line, versions, commit and anything else worth keeping (seeds)."""
    import numpy
    import torch

    argv = sys.argv if argv is None else argv
    return {
        "command": " ".join([*_launcher(), *map(_quote, argv)]),
        "argv": list(argv),
        "ranks": _ranks(),
        "cwd": os.getcwd(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__},
        "git_commit": fileio.git_commit(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    } | extra


def _launcher() -> list[str]:
    """How the command was started: the interpreter, or torchrun with its processes per machine (multi-machine
    runs give each machine's count; "ranks" says the whole)."""
    if not distributed.launched():
        return [Path(sys.executable).name]
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return ["torchrun", *(["--nproc-per-node", local] if local.isdigit() else [])]


def _ranks() -> dict:
    """The processes that computed the results: 1 alone; under torchrun the group's size and backend (the
    values equal one process's, bit for bit, with the same per-process settings; minigpt2.distributed)."""
    if not distributed.launched():
        return {"world_size": 1}
    import torch.distributed as dist

    ranks = {"world_size": int(os.environ["WORLD_SIZE"]), "backend": dist.get_backend() if dist.is_initialized() else None}
    if os.environ.get("GROUP_WORLD_SIZE", "").isdigit():  # torchrun: its machines (agents)
        ranks["machines"] = int(os.environ["GROUP_WORLD_SIZE"])
    return ranks


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
