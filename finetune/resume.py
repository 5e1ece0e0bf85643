"""Resuming a run with its own settings, and the advice after a NaN/inf stop.

A run's settings are its OUT/args.json (train.py writes every resolved flag there). A resume takes
them back, allowing changes only to settings that do not change what is computed (or only its
speed); after a NaN/inf stop (finetune.checkpoint's note), also to the learning rate, the warmup and
the clipping, each change recorded in args.json under ``changed_on_resume``. Torch-free until a
checkpoint is read, so a bad resume is refused before torch loads.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import default

# Settings that may differ when resuming a run (they do not change what is computed, or only its speed).
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "accept_data_change", "max_steps", "device", "dtype",
                        "micro_batch_size", "progress", "log_every", "eval_every", "save_every", "keep_checkpoints",
                        "out"}
# ... and these too, after a stop on a NaN/inf (the change is recorded in args.json, changed_on_resume)
MAY_CHANGE_AFTER_NON_FINITE = {"lr", "warmup_steps", "grad_clip"}
# Settings added after runs were saved, with the value that computes what those runs computed
ADDED_LATER = {"head_dropout": 0.0, "recall": 0.0}
REPAIR = ("it holds the run's settings: repair it (each checkpoint's metadata.json records the command that "
          "started the run), or start the run again with --overwrite")


def saved_settings(out: str | Path, names) -> dict | None:
    """The settings in ``out``/args.json, with ADDED_LATER's values for those of ``names`` it lacks;
    None for a run that has neither args.json nor checkpoints (nothing to resume yet)."""
    from .checkpoint import read_json_object

    path = Path(out) / "args.json"
    if not path.exists():
        if (Path(out) / "checkpoints").is_dir():
            raise ValueError(f"{path} is missing, so the run's settings are unknown. Fix: restore it (each "
                             "checkpoint's metadata.json records the command that started the run), or start the "
                             "run again with --overwrite")
        return None
    return {k: v for k, v in ADDED_LATER.items() if k in names} | read_json_object(path, fix=REPAIR)


def check_resumed(saved: dict, settings: dict, out: str | Path) -> None:
    """Refuse a resume whose ``settings`` change a saved setting that must stay (finetune.checkpoint)."""
    from .checkpoint import check_resume_args, read_non_finite_note

    may_change = MAY_CHANGE_ON_RESUME | (MAY_CHANGE_AFTER_NON_FINITE if read_non_finite_note(out) else set())
    check_resume_args(saved, settings, may_change)


def record_resume_changes(args) -> None:
    """After a NaN/inf stop, settings changed on resume are written to args.json (so a later resume
    keeps them), with the step they took effect at under changed_on_resume."""
    from .checkpoint import latest_checkpoint, read_json_object, write_json

    path = Path(args.out) / "args.json"
    saved = read_json_object(path, fix="restore it")
    changed = {k: [saved.get(k), getattr(args, k)] for k in sorted(MAY_CHANGE_AFTER_NON_FINITE)
               if saved.get(k) != getattr(args, k)}
    if changed:
        step = int(latest_checkpoint(args.out).name.removeprefix("step-"))
        args.changed_on_resume = saved.get("changed_on_resume", []) + [{"step": step, "changed": changed}]
        write_json(path, {**saved, **{k: new for k, (_, new) in changed.items()},
                          "changed_on_resume": args.changed_on_resume})


def advised_commands(err, mode: str, out: str, lr: float, settings: list[str], script: str = "train.py") -> str:
    """The commands that follow a NonFiniteLoss's advice, to run as they are: resume with a tenth of
    ``lr`` (at most the mode's default), or start over so (``settings``: the run's flags, --lr left
    out), and, for a bfloat16 run with a checkpoint, resume in float32."""
    lower = f"{min(lr / 10, default('lr', mode)):g}"
    if err.fix == "resume":
        commands = [[mode, "--out", str(out), "--resume", "--lr", lower]]
    else:
        commands = [[*settings, "--overwrite", "--lr", lower]]
        if err.bfloat16 and err.checkpoint is not None:
            commands.append([mode, "--out", str(out), "--resume", "--dtype", "float32"])
    return "\n".join(f"  {shlex.join(['python', script, *c])}" for c in commands)
