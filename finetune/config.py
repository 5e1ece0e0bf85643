"""TrainConfig: every setting of the training loop, declared once.

Each field carries its default, its range and its help in ``dataclasses.field`` metadata; train.py
builds its flags from them (``--micro-batch-size`` from ``micro_batch_size``), so a default is never
written twice. A field whose default differs when pretraining names it under ``pretrain``
(:func:`mode_default`); a finetuning preset (finetune.presets) sets its own epochs, lr and batch size.
Torch-free, so that train.py checks its flags before torch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from clikit import Range

MODES = ("finetune", "pretrain")
WHOLE = dict(whole=True)


def setting(default, help: str, range: Range | None = None, group: str = "optimization (AdamW)", **more):
    """A TrainConfig field with its flag's metadata: ``help``, ``range`` (checked by TrainConfig and
    train.py), ``group`` (of --help), ``pretrain`` (its default when pretraining, if it differs),
    ``choices``, ``flag`` (False: not a train.py flag)."""
    return field(default=default, metadata=dict(help=help, range=range, group=group, **more))


@dataclass
class TrainConfig:
    out: str = setting(dataclasses.MISSING, "run directory: args.json, log.jsonl, checkpoints/, model/",
                       group="run", flag="required")
    epochs: int = setting(3, "passes over the training data", Range(1, **WHOLE), pretrain=1)
    batch_size: int = setting(64, "examples per optimizer step, over all processes", Range(1, **WHOLE))
    micro_batch_size: int | None = setting(
        None, "examples per forward pass on one process; smaller than a process's share of --batch-size means "
              "gradient accumulation (default: the whole share)", Range(1, optional=True, **WHOLE))
    lr: float = setting(5e-5, "peak learning rate", Range(0, lo_open=True), pretrain=6e-4)
    weight_decay: float = setting(0.0, "AdamW decay on matrices and embeddings (never biases or layer norms)",
                                  Range(0), pretrain=0.1)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's betas", flag=False)
    adam_eps: float = setting(1e-8, "AdamW's eps", flag=False)
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping", Range(0))
    head_dropout: float = setting(
        0.0, "chance of dropping each head's output, per example and step (GPT-2 trained with dropout 0.1; "
             "dropped heads make the model grow backups, such as a second previous-token head); 0 disables it", Range(0, 1, hi_open=True))
    warmup_steps: int = setting(0, "linear warmup steps", Range(0, **WHOLE), pretrain=100)
    schedule: str = setting("linear", "after warmup, over all epochs: linear to 0, cosine (to --min-lr-ratio x "
                                      "--lr), or constant", choices=("linear", "cosine", "constant"),
                            pretrain="cosine")
    min_lr_ratio: float = setting(0.1, "cosine schedule's floor, as a fraction of --lr", Range(0, 1))
    max_steps: int | None = setting(
        None, "stop after this many optimizer steps in all (small runs); the schedule still spans every epoch, so "
              "a run stopped here and resumed equals one run (default: none, every epoch)",
        Range(1, optional=True, **WHOLE))
    seed: int = setting(0, "data order (and, for pretraining, initialisation)", Range(0, **WHOLE), group="run")
    log_every: int = setting(1, "steps between lines of log.jsonl", Range(1, **WHOLE),
                             group="logging and checkpoints")
    eval_every: int = setting(0, "steps between evaluations; 0: each epoch end", Range(0, **WHOLE),
                              group="logging and checkpoints")
    save_every: int = setting(0, "steps between checkpoints; 0: each epoch end (and at the end, and on Ctrl-C)",
                              Range(0, **WHOLE), group="logging and checkpoints")
    keep_checkpoints: int = setting(1, "how many checkpoints to keep", Range(1, **WHOLE),
                                    group="logging and checkpoints")
    device: str = setting("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps", group="hardware")
    dtype: str = setting("auto", "autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere (weights stay "
                                 "float32)", group="hardware", flag=False)  # train.py declares --dtype itself
    resume: bool = setting(False, "continue the run in --out from its last checkpoint", group="run")
    progress: bool = setting(True, "no progress bar", group="logging and checkpoints")

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)!r} ({why})" for name, why in config_problems(self)]
        if problems:
            raise ValueError(f"TrainConfig: {'; '.join(problems)}")


def config_problems(values) -> list[tuple[str, str]]:
    """(parameter, why) for each TrainConfig setting of ``values`` (any object with the fields as
    attributes) outside its range or choices; settings it lacks are skipped."""
    found = []
    for f in fields(TrainConfig):
        if not hasattr(values, f.name):
            continue
        value, rng, choices = getattr(values, f.name), f.metadata.get("range"), f.metadata.get("choices")
        if rng is not None and (why := rng.problem(value)) is not None:
            found.append((f.name, why))
        elif choices is not None and value not in choices:
            found.append((f.name, f"choose {', '.join(choices)}"))
    return found


def mode_default(f: dataclasses.Field, mode: str):
    """A field's default in ``mode`` (finetune or pretrain); before a finetuning preset applies."""
    return f.metadata["pretrain"] if mode == "pretrain" and "pretrain" in f.metadata else f.default


def default(name: str, mode: str = "finetune"):
    """The default of TrainConfig's field ``name`` in ``mode``."""
    return mode_default(next(f for f in fields(TrainConfig) if f.name == name), mode)
