"""finetune: the training library behind train.py (finetuning on TPP, pretraining on text).

    from finetune import Trainer, TrainConfig, pretrain_data
    data, held_out = pretrain_data("wordnet", block_size=128)
    Trainer(model, data, TrainConfig(out="runs/x"), evaluate=heldout_evaluator(held_out)).train()

Modules: data (rows and their order), loss (the position-gathered next-token loss),
trainer (the loop, DDP, resume), checkpoint (atomic run directories without pickle),
evaluate (TPP and held-out metrics), presets (the paper's three runs).
"""

from .checkpoint import latest_checkpoint, load_checkpoint, prepare_run_dir, save_checkpoint
from .data import IGNORE, TrainData, batch_order, corpus_tokens, finetune_data, pretrain_data
from .evaluate import heldout_evaluator, tpp_evaluator
from .loss import full_lm_loss, lm_loss
from .presets import PRESETS, Preset
from .trainer import Dist, NonFiniteLoss, Schedule, TrainConfig, Trainer

__all__ = [
    "IGNORE", "PRESETS", "Dist", "NonFiniteLoss", "Preset", "Schedule", "TrainConfig", "TrainData", "Trainer",
    "batch_order", "corpus_tokens", "finetune_data", "full_lm_loss", "heldout_evaluator", "latest_checkpoint",
    "lm_loss", "load_checkpoint", "prepare_run_dir", "pretrain_data", "save_checkpoint", "tpp_evaluator",
]
