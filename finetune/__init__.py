"""finetune: the training library behind train.py (finetuning on TPP, pretraining on text).

    from minigpt2 import load_pretrained
    from finetune import Trainer, TrainConfig, finetune_data, tpp_evaluator
    model = load_pretrained("weights/base")
    data, master = finetune_data(0.01, master_size=15_800, space="answer")   # 158 TPP examples, ' c'
    evaluate = tpp_evaluator(master, eval_size=64, single_token_eval_size=64, space="answer")
    Trainer(model, data, TrainConfig(out="runs/x", max_steps=2, progress=False), evaluate=evaluate).train()

Pretraining is the same loop on text: ``pretrain_data("wordnet", block_size=128)`` gives training
blocks and held-out blocks for ``heldout_evaluator``.

Modules: data (rows and their order), loss (the position-gathered next-token loss),
trainer (the loop, DDP), resume (a run's own settings on --resume, the advice after a NaN),
checkpoint (atomic run directories without pickle),
evaluate (TPP and held-out metrics), config (TrainConfig: every setting of the loop, with its
flag's help and range), presets (the paper's three runs).

Everything but the presets is imported on first use, so that train.py can check its
flags (which need only config, presets and resume, all torch-free) without importing torch.
finetune imports nothing of circuitlab: the copying probe of a pretraining run
(circuitlab.copying) and the head census of a published card (circuitlab.census) are circuitlab's.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:  # OpenMP's wait policy, read once when torch loads (minigpt2/threads.py)
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib import import_module

from .presets import PRESETS, Preset

_WHERE = {
    "latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "prepare_run_dir": "checkpoint",
    "save_checkpoint": "checkpoint",
    "IGNORE": "data", "TrainData": "data", "batch_order": "data", "corpus_tokens": "data", "finetune_data": "data",
    "frequent_tokens": "data", "pretrain_data": "data",
    "heldout_evaluator": "evaluate", "tpp_evaluator": "evaluate",
    "full_lm_loss": "loss", "lm_loss": "loss",
    "Dist": "trainer", "NonFiniteLoss": "trainer", "Schedule": "trainer", "TrainConfig": "config",
    "Trainer": "trainer",
}

__all__ = sorted([*_WHERE, "PRESETS", "Preset"])


MOVED = {"copying_evaluator": "circuitlab.copying"}  # finetune does not import circuitlab


def __getattr__(name: str):
    if name in MOVED:
        raise AttributeError(f"finetune.{name} moved to {MOVED[name]}.{name}: import it from there")
    if name not in _WHERE:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
