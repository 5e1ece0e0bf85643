"""A plain PyTorch training loop: AdamW, gradient clipping, warmup and decay, gradient
accumulation, DistributedDataParallel, atomic checkpoints and exact resume.

One optimizer step consumes one global batch of ``batch_size`` rows, a slice of
a permutation fixed by (seed, epoch). Under torchrun each rank takes its own
contiguous part of the batch and splits it into micro-batches of at most
``micro_batch_size`` rows; every micro-batch's summed loss is divided by the
number of targets in the whole global batch, so one process, several ranks and
any micro-batch size compute the same gradient (up to float summation order).
Because the data order is a function of the step, a checkpoint needs only the
step to continue where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minigpt2 import GPT2, hardware
from minigpt2.fileio import FileError, parse_json

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import TrainData, batch_order, shard
from .evaluate import Evaluator
from .loss import LossModule


class NonFiniteLoss(RuntimeError):
    """Training met a NaN or inf. ``fix``: "resume" (from ``checkpoint``, with a lower learning
    rate) or "restart" (no checkpoint can help); ``bfloat16``: the run computed in bfloat16."""

    def __init__(self, message: str, fix: str = "restart", checkpoint: Path | None = None, bfloat16: bool = False):
        super().__init__(message)
        self.fix, self.checkpoint, self.bfloat16 = fix, checkpoint, bfloat16


# ---------------------------------------------------------------- where and how the run computes
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, d: Dist) -> torch.device:
    """--device (auto: cuda, else mps, else cpu; minigpt2.hardware's resolver), on this rank's GPU under DDP."""
    device = hardware.resolve_device(name, unset="(or auto)")
    if device.type == "cuda":
        if d.world > 1 and device.index is None:
            device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32 (minigpt2.hardware's parser: auto, fp32/float32, bf16/bfloat16)."""
    return hardware.autocast_dtype(name, device)


def init_distributed(d: Dist, device: torch.device) -> None:
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


# ---------------------------------------------------------------- the learning-rate schedule
@dataclass(frozen=True)
class Schedule:
    lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "linear"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return self.lr * (1.0 - progress)
        if self.kind == "cosine":
            floor = self.min_lr_ratio * self.lr
            return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"kind={self.kind!r}: choose linear, cosine or constant")


def make_optimizer(model: GPT2, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; inf for a line cut short by a crash (so it is dropped)."""
    try:
        row = parse_json(line, "log.jsonl") if line.strip() else None
    except FileError:
        return math.inf
    return row.get("step", 0) if isinstance(row, dict) else math.inf


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Trains ``model`` on ``data``; rank 0 writes logs and checkpoints under ``cfg.out``.

    ``evaluate(model)`` (optional) runs at each epoch end (and every ``eval_every``
    steps) on rank 0. ``metadata`` is merged into every checkpoint's metadata.json.
    ``on_step(trainer)`` (optional) is called after each optimizer step.
    """

    def __init__(self, model: GPT2, data: TrainData, cfg: TrainConfig, evaluate: Evaluator | None = None,
                 metadata: dict | None = None, on_step: Callable[["Trainer"], None] | None = None):
        self.cfg, self.data, self.evaluate, self.on_step = cfg, data, evaluate, on_step
        self.out = Path(cfg.out)
        self.dist = Dist.from_env()
        self.device = resolve_device(cfg.device, self.dist)
        self.autocast_dtype = resolve_dtype(cfg.dtype, self.device)
        init_distributed(self.dist, self.device)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, cfg)
        self.steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule = Schedule(cfg.lr, cfg.epochs * self.steps_per_epoch, cfg.warmup_steps, cfg.schedule,
                                 cfg.min_lr_ratio)
        self.step, self.tokens_seen, self.last_eval, self.last_eval_step = 0, 0, {}, None
        self.metadata = {**(metadata or {}), "git_commit": ckpt.git_commit(), "train_config": asdict(cfg),
                         "n_train_rows": len(data), "steps_per_epoch": self.steps_per_epoch}
        if cfg.resume:
            self._resume()
        self._stop_requested = False
        self.loss_module = LossModule(self.model)
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=ids)

    # -- state
    def _resume(self) -> None:
        if self.dist.world == 1:  # train.py has done it already; a library caller may not have
            ckpt.recover_run(self.out)
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise FileNotFoundError(f"resume: {self.out} holds no complete checkpoint")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.last_eval, self.last_eval_step = state["last_eval"], state["last_eval_step"]
        if self.dist.main:
            self._truncate_log(self.step)
            self.log({"kind": "resume", "step": self.step, "checkpoint": str(path)})

    def state(self) -> dict:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": batch, "tokens_seen": self.tokens_seen,
                "schedule": asdict(self.schedule), "last_eval": self.last_eval, "last_eval_step": self.last_eval_step}

    def full_metadata(self) -> dict:
        return {**self.metadata, "steps": self.step, "epochs_done": self.step / self.steps_per_epoch,
                "tokens_seen": self.tokens_seen, "final_metrics": self.last_eval,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0); a NaN or inf in the weights or the optimizer
        state stops training with NonFiniteLoss instead (every rank checks its identical copy)."""
        bad = ckpt.non_finite_tensors(self.model, self.optimizer)
        if bad:
            self._non_finite(f"{len(bad)} tensors ({', '.join(bad[:2])}{', ...' if len(bad) > 2 else ''})",
                             "not finite", after_update=True)
        if not self.dist.main:
            return None
        path = ckpt.save_checkpoint(self.out, self.model, self.optimizer, self.state(), self.full_metadata(),
                                    self.cfg.keep_checkpoints)
        ckpt.clear_non_finite_note(self.out, self.step)
        return path

    # -- logging
    def log(self, record: dict) -> None:
        if self.dist.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop lines logged after the checkpoint being resumed (they will be logged again)."""
        path = self.out / "log.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines(keepends=True) if _logged_step(ln) <= step]
            ckpt.write_atomic(path, lambda tmp: Path(tmp).write_text("".join(keep)))

    # -- one optimizer step
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _micro_batches(self, rows: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """(rows, weight) of each forward on this rank; an empty share still runs one
        zero-weight forward, because every rank must take part in the gradient all-reduce."""
        mine = shard(rows, self.dist.rank, self.dist.world)
        if len(mine) == 0:
            return [(rows[:1], 0.0)]
        size = self.cfg.micro_batch_size or len(mine)
        return [(mine[i:i + size], 1.0) for i in range(0, len(mine), size)]

    def train_step(self, rows: np.ndarray) -> dict:
        n_targets = self.data.n_targets(rows)
        if n_targets == 0:
            raise ValueError(f"step {self.step}: the batch holds no labelled token; check the data's labels")
        micro = self._micro_batches(rows)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for j, (part, weight) in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.dist.world == 1 else self.loss_module.no_sync()
            with sync:
                with self.autocast():
                    s, _ = self.loss_module(*self._to_device(part), head_scale=self.head_scale(part))
                (s * (weight * self.dist.world / n_targets)).backward()
            loss_sum += s.detach().double() * weight
        if self.dist.world > 1:  # the summed loss, and whether any rank was asked to stop
            both = torch.stack([loss_sum, torch.tensor(float(self._stop_requested), device=self.device).double()])
            dist.all_reduce(both)
            loss_sum, self._stop_requested = both[0], bool(both[1] > 0)
        loss = loss_sum.item() / n_targets
        if not math.isfinite(loss):
            self._non_finite("loss", loss)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):
            self._non_finite("gradient norm", grad_norm)
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def head_scale(self, rows: np.ndarray) -> torch.Tensor | None:
        """[B, n_layer, n_head] factors on the heads' outputs for this step's ``rows``: 0 for a
        dropped head, 1 / (1 - p) for a kept one; None without head dropout.

        Each row's draw depends only on (seed, step, row), so a resumed run, a run split into
        micro-batches and one on several ranks drop the same heads."""
        p = self.cfg.head_dropout
        if p == 0:
            return None
        shape = (self.model.cfg.n_layer, self.model.cfg.n_head)
        keep = np.stack([np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(11, self.step, int(r))))
                         .random(shape) >= p for r in rows])
        return torch.from_numpy(keep / (1 - p)).float().to(self.device)

    def _to_device(self, rows: np.ndarray):
        d = self.data
        mask = None if d.attention_mask is None else d.attention_mask[rows].to(self.device)
        return d.input_ids[rows].to(self.device), d.labels[rows].to(self.device), mask

    def _non_finite(self, what: str, value, after_update: bool = False):
        """Stop on a NaN/inf computed from the weights after optimizer step ``self.step``: in the
        loss or gradient of the next step, or (``after_update``) in the weights themselves.
        Says which checkpoint is still of use, and records the stop for train.py's --resume."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step if after_update else self.step + 1
        where = (f"after step {step}" if after_update else f"at step {step}") + \
            f" (epoch {(step - 1) // self.steps_per_epoch}, batch {(step - 1) % self.steps_per_epoch})"
        fact = (f"{what} are {value} {where}; training stopped without saving them" if after_update
                else f"{what} is {value} {where}; training stopped before applying it")
        last = ckpt.latest_checkpoint(self.out)
        fix, advice = self._non_finite_advice(last)
        if self.dist.main:
            ckpt.write_non_finite_note(self.out, {"step": step, "what": what, "value": str(value),
                                                  "checkpoint": last.name if last else None, "fix": fix})
        raise NonFiniteLoss(f"{fact}; {advice}", fix=fix, checkpoint=last,
                            bfloat16=self.autocast_dtype == torch.bfloat16)

    def _non_finite_advice(self, last: Path | None) -> tuple[str, str]:
        """("resume" or "restart", the advice, in TrainConfig's names): resuming helps only from a
        checkpoint older than the weights that diverged, since the failed step recomputes from the
        checkpoint's weights."""
        if last is None:
            return "restart", ("no checkpoint was saved before it. Fix: start over (overwrite) with a lower lr "
                               "or more warmup_steps")
        if int(ckpt.STEP_DIR.match(last.name).group(1)) < self.step:
            return "resume", (f"the last checkpoint, {last}, is from before the updates that diverged. Fix: resume "
                              "it with a lower lr or more warmup_steps (after a stop like this one, resume "
                              "accepts a changed lr, warmup_steps or grad_clip)")
        bf16 = self.autocast_dtype == torch.bfloat16
        float32 = "; or resume it in float32 (dtype float32)" if bf16 else ""
        return "restart", (f"the last checkpoint, {last}, holds the very weights that gave it, so resuming it with "
                           f"any lr would compute the same value. Fix: start over (overwrite) with a lower lr or "
                           f"more warmup_steps{float32}")

    def _tokens(self, rows: np.ndarray) -> int:
        d = self.data
        return int(d.attention_mask[rows].sum()) if d.attention_mask is not None else len(rows) * d.input_ids.shape[1]

    # -- evaluation
    def run_eval(self) -> None:
        if self.evaluate is not None and self.dist.main:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                self.last_eval = self.evaluate(self.model)
            self.model.train()
            self.log({"kind": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                      "metrics": self.last_eval})
        self.last_eval_step = self.step
        if self.dist.world > 1:
            dist.barrier()

    # -- the loop
    def request_stop(self, *_):
        """First Ctrl-C: stop after the current step and save; a second one stops at once."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.dist.main:
            tqdm.write("stopping after this step to save a checkpoint (interrupt again to quit without saving)")

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def train(self) -> dict:
        """Run to the end (or max_steps); return the final metadata. Raises KeyboardInterrupt
        after saving a checkpoint when interrupted, NonFiniteLoss on a NaN/inf loss."""
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.dist.main),
                   dynamic_ncols=True, desc=f"train {self.out.name}")
        busy, tokens0 = 0.0, self.tokens_seen  # tokens/s counts training steps only, not evals or saves
        with self._signals():
            while self.step < self.total_steps:
                epoch, b = divmod(self.step, self.steps_per_epoch)
                rows = batch_order(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch)[b]
                t0 = time.perf_counter()
                metrics = self.train_step(rows)
                busy += time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += self._tokens(rows)
                tok_s = (self.tokens_seen - tokens0) / max(busy, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self.log({"kind": "train", "step": self.step, "epoch": epoch, **metrics,
                              "tokens": self.tokens_seen, "tok_per_s": round(tok_s, 1)})
                self._after_step()
        bar.close()
        if self.last_eval_step != self.step:
            self.run_eval()
        self.save()
        if self.dist.main:
            ckpt.save_final(self.out, self.model, self.full_metadata())
        return self.full_metadata()

    def _after_step(self) -> None:
        epoch_end = self.step % self.steps_per_epoch == 0
        if epoch_end or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
            self.run_eval()
        if self.step < self.total_steps and (epoch_end or (self.cfg.save_every and self.step % self.cfg.save_every == 0)):
            self.save()
        if self.on_step is not None:
            self.on_step(self)
        if self._stop_requested:
            path = self.save()
            raise KeyboardInterrupt(f"interrupted after step {self.step}; checkpoint {path}")
