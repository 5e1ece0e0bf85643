"""Single-head ablation sweep: every head ablated alone, all in one batched pass.

Also the two small types every circuit algorithm here shares:

* :class:`Metric`: a name, ``fn(logits [V, B, vocab]) -> [V, B]`` (one value per
  variant and example) and whether higher is better. Metrics know the task
  (targets, clean logits); the algorithms do not.
* :class:`Prompts`: a batch of prompts, the position read in each, and how an
  ablated head is replaced ("zero", "mean" over the batch, or "resample": its
  output on another prompt of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt2 import GPT2, distributed
from minigpt2.engine import (ABLATIONS, Metric, check_ablation, check_metrics, check_model, head_mask_bytes_per_row,
                             per_example, rows_per_chunk)
from minigpt2.masking import single_head_masks

__all__ = ["ABLATIONS", "BLOCK_ROWS", "Metric", "Prompts", "SweepResult", "evaluate_masks", "resample_partners",
           "rows_per_block", "sweep"]

# Prompts are evaluated in blocks of rows of similar length, each trimmed to its longest row: at
# most BLOCK_ROWS prompts a block; with many variants, as few as MIN_BLOCK_ROWS, so that a batched call
# holds about CALL_ROWS rows (variants x prompts). Measured on the bundled models (2 cores): the
# 145-variant sweep of 40 prompts (padded to 40 tokens, 24 on average) took 7.5 s in blocks of 4
# against 11.5 s in one block; 5 variants of 1,000 prompts were fastest in blocks of 32.
BLOCK_ROWS, MIN_BLOCK_ROWS, CALL_ROWS = 32, 4, 512


@dataclass(frozen=True)
class Prompts:
    """Prompts [B, T] (right-padded, with ``attention_mask``), read at ``positions`` [B].

    ``ablation`` says what an ablated head's output (its hook_z) becomes:
      "zero";
      "mean": its mean at the same position over ``reference`` (default: these prompts);
      "resample": its output on a paired prompt, row by row: ``reference`` [B, T]
          (default: the prompts themselves, shuffled within groups of equal length
          by :func:`resample_partners` with ``seed``).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    ablation: str = "zero"
    seed: int = 0
    reference: torch.Tensor | None = None
    reference_mask: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "ablation", check_ablation(self.ablation))
        if not isinstance(self.tokens, torch.Tensor):
            try:
                object.__setattr__(self, "tokens", torch.as_tensor(self.tokens))
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"Prompts needs token ids [B, T] (a tensor or nested list of ints), got "
                                f"{type(self.tokens).__name__}") from None
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0:
            raise ValueError(f"Prompts needs a non-empty [B, T] batch of token ids, got shape {tuple(self.tokens.shape)}; "
                             "is the eval set empty?")
        if self.tokens.dtype.is_floating_point or self.tokens.dtype.is_complex or self.tokens.dtype == torch.bool:
            raise TypeError(f"Prompts needs integer token ids, got {self.tokens.dtype}")
        if self.attention_mask is not None:
            object.__setattr__(self, "attention_mask", GPT2.check_attention_mask(self.attention_mask, self.tokens))
        if self.positions is None:
            last = (self.attention_mask.long().cumsum(1).argmax(1) if self.attention_mask is not None
                    else torch.full((len(self),), self.tokens.shape[1] - 1))
            object.__setattr__(self, "positions", last)
        if self.reference is None and self.ablation == "mean":
            object.__setattr__(self, "reference", self.tokens)
            object.__setattr__(self, "reference_mask", self.attention_mask)
        if self.reference is None and self.ablation == "resample":
            object.__setattr__(self, "reference", self.tokens[resample_partners(self.lengths(), self.seed)])
        if self.ablation == "resample" and self.reference.shape != self.tokens.shape:
            raise ValueError(f"resample reference has shape {tuple(self.reference.shape)}, prompts have "
                             f"{tuple(self.tokens.shape)}: each prompt needs one paired prompt of the same padded length")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def lengths(self) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.full((len(self),), self.tokens.shape[1])
        return self.attention_mask.long().sum(1)

    def subset(self, rows, trim: bool = False) -> "Prompts":
        """Some rows; a mean ablation keeps the whole reference, a resample keeps each row's pair.

        ``trim`` drops the columns after the last read position: causal attention makes
        them irrelevant, so the result is exactly the same, for less work.
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        T = int(self.positions[rows].max()) + 1 if trim and len(rows) else self.tokens.shape[1]
        reference, reference_mask = self.reference, self.reference_mask
        if self.ablation == "resample":
            reference = reference[rows]
        cut = (lambda t: None if t is None else t[..., :T])
        return Prompts(self.tokens[rows, :T], cut(None if self.attention_mask is None else self.attention_mask[rows]),
                       self.positions[rows], self.ablation, self.seed, cut(reference), cut(reference_mask))

    def blocks(self, max_rows: int, n_variants: int = 1) -> list[tuple[torch.Tensor, "Prompts"]]:
        """(rows, Prompts) blocks of similar length, each trimmed: sorting by length means little
        padding is computed. A block holds at most ``max_rows`` rows, and as many prompts as make
        a batched call of ``n_variants`` variants about CALL_ROWS rows (MIN_BLOCK_ROWS to BLOCK_ROWS)."""
        order = self.positions.argsort(stable=True)
        per_block = min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, -(-CALL_ROWS // max(1, n_variants))))
        n = max(len(self) // per_block, -(-len(self) // max_rows))
        return [(rows, self.subset(rows, trim=True)) for rows in order.tensor_split(min(n, len(self)))]

    def masking_kwargs(self) -> dict:
        """The keyword arguments of minigpt2's run_with_head_masks for this batch and ablation."""
        kw = dict(positions=self.positions, attention_mask=self.attention_mask)
        if self.ablation == "zero":
            return kw | dict(ablation="zero")
        if self.ablation == "mean":
            return kw | dict(ablation="mean", reference=self.reference, reference_mask=self.reference_mask)
        return kw | dict(ablation="resample", reference=self.reference)


def check_prompts(prompts, what: str) -> None:
    if not isinstance(prompts, Prompts):
        raise TypeError(f"{what} takes circuitlab.sweep.Prompts(tokens, attention_mask=..., ablation=...), got "
                        f"{type(prompts).__name__}")


def resample_partners(lengths: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """For each row, another row to take ablated activations from: a random derangement
    within each group of equal length; a row alone in its group pairs with any other row."""
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    partner = torch.arange(n)
    if n < 2:
        return partner
    alone = []
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero()[:, 0]
        if len(rows) < 2:
            alone += rows.tolist()
            continue
        perm = rows[torch.randperm(len(rows), generator=gen)]
        partner[perm] = perm.roll(1)  # a cycle: nobody is its own partner
    for row in alone:
        other = torch.randint(n - 1, (1,), generator=gen).item()
        partner[row] = other + (other >= row)
    return partner


def rows_per_block(model: GPT2, T: int) -> int:
    """Rows (variants x prompts) of length T whose activations and logits fit the device's memory
    budget (minigpt2.engine.memory_budget: the one budget of every batched engine)."""
    return rows_per_chunk(head_mask_bytes_per_row(model.cfg, T), model.device)


@torch.no_grad()
def evaluate_masks(model: GPT2, prompts: Prompts, masks: torch.Tensor, metrics: list[Metric],
                   max_rows: int | None = None, progress: bool = False, dtype=None, group=None) -> torch.Tensor:
    """Every metric on every variant: masks [V, L, H] -> per-example values [V, B, n_metrics].

    Prompts are taken in blocks of at most ``max_rows`` (default: what the device's memory
    budget allows, logits included); each block is one batched call of minigpt2's
    run_with_head_masks, which shares each variant's clean prefix. ``dtype``: None or
    torch.bfloat16 (see minigpt2.engine). ``group``: the torch.distributed group whose ranks split the
    prompt blocks, or the variants of each block where there are fewer blocks than ranks (see minigpt2.distributed: the values equal one process's, bit for bit, on every rank; only
    rank 0 shows progress); None: the default group where this process opted in, else alone.
    """
    group = distributed.resolve_group(group)
    max_rows = max_rows or rows_per_block(model, prompts.tokens.shape[1])
    max_rows = distributed.smallest(max_rows, group)  # the ranks agree on the blocks
    blocks = prompts.blocks(max_rows, n_variants=masks.shape[0])
    if group is not None and len(blocks) >= distributed.world_size(group):
        return _blocks_over_ranks(model, prompts, blocks, masks, metrics, max_rows, progress, dtype, group)
    if progress and distributed.is_writer(group):
        from minigpt2.progress import progress as progress_bar
        blocks = progress_bar(blocks, f"{masks.shape[0]} variants x {len(prompts)} prompts", "block")
    out = torch.empty(0)
    for rows, p in blocks:
        values = _evaluate_block(model, p, rows, masks, metrics, max_rows, dtype, group)  # [V, b, M]
        if not out.numel():
            out = values.new_empty(values.shape[0], len(prompts), values.shape[2])
        out[:, rows] = values
    return out


def _evaluate_block(model: GPT2, p: Prompts, rows, masks: torch.Tensor, metrics: list[Metric], max_rows: int,
                    dtype, group) -> torch.Tensor:
    """Every metric on every variant for one block of prompts (``rows`` of the whole set): [V, b, M]."""
    def all_metrics(logits):  # [Vc, b, vocab] -> [Vc, b, M]
        return torch.stack([per_example(m, logits, rows).to(torch.float64) for m in metrics], dim=-1)

    return model.run_with_head_masks(p.tokens, masks, metric=all_metrics, max_rows=max_rows, dtype=dtype,
                                     group=group, **p.masking_kwargs())


def _blocks_over_ranks(model: GPT2, prompts: Prompts, blocks: list, masks: torch.Tensor, metrics: list[Metric],
                       max_rows: int, progress: bool, dtype, group) -> torch.Tensor:
    """evaluate_masks with whole prompt blocks split over the ranks: each block computed by one rank exactly
    as one process computes it (alone), then every block's values gathered, byte for byte, on every rank.
    (Splitting a block's variants instead leaves ranks idle where a block's variants fit one chunk, as on a
    GPU.)"""
    def wrap(mine):
        if not (progress and distributed.is_writer(group)):
            return mine
        from minigpt2.progress import progress as progress_bar
        return progress_bar(mine, f"{masks.shape[0]} variants x {len(prompts)} prompts (rank 0's blocks)", "block")

    values = distributed.share(len(blocks), lambda i: _evaluate_block(model, blocks[i][1], blocks[i][0], masks,
                                                                      metrics, max_rows, dtype, distributed.LOCAL),
                               group, "the sweep's prompt blocks", model.device, wrap=wrap)
    out = values[0].new_empty(values[0].shape[0], len(prompts), values[0].shape[2])
    for i, (rows, _) in enumerate(blocks):
        out[:, rows] = values[i]
    return out


@dataclass
class SweepResult:
    """Per metric: the clean mean and the mean with each head ablated alone, [L, H]."""

    metrics: list[str]
    higher_is_better: dict[str, bool]
    clean: dict[str, float]
    ablated: dict[str, torch.Tensor]  # name -> [L, H] mean over prompts
    sem: dict[str, torch.Tensor]  # name -> [L, H] standard error of that mean
    n_examples: int
    ablation: str

    def effect(self, name: str) -> torch.Tensor:
        """[L, H]: ablated - clean (negative hurts when higher is better)."""
        return self.ablated[name] - self.clean[name]

    def harm(self, name: str) -> torch.Tensor:
        """[L, H]: how much ablating each head worsens the metric (positive = worse)."""
        e = self.effect(name)
        return -e if self.higher_is_better[name] else e

    def top(self, name: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The k heads whose ablation hurts ``name`` most: (layer, head, effect)."""
        harm = self.harm(name)
        H = harm.shape[1]
        idx = harm.flatten().argsort(descending=True)[:k].tolist()
        return [(i // H, i % H, float(self.effect(name).flatten()[i])) for i in idx]

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "ablation": self.ablation, "n_examples": self.n_examples,
                "clean": self.clean, "ablated": {k: v.tolist() for k, v in self.ablated.items()},
                "sem": {k: v.tolist() for k, v in self.sem.items()}}


def sweep(model: GPT2, prompts: Prompts, metrics: list[Metric], max_rows: int | None = None,
          progress: bool = False, dtype=None, group=None) -> SweepResult:
    """Ablate each of the n_layer x n_head heads alone and measure every metric.

    One call of minigpt2's batched head masking evaluates the clean model and
    all L*H variants, sharing each variant's clean prefix (the layers below its
    ablated head). ``group``: a torch.distributed group whose ranks split the prompt blocks (see
    :func:`evaluate_masks`), every rank
    getting the one-process result bit for bit (None: the default group where this process opted in,
    as circuits.py under torchrun, else alone; see minigpt2.distributed).
    """
    check_model(model, "sweep")
    check_prompts(prompts, "sweep")
    metrics = check_metrics(metrics, "sweep")
    L, H = model.cfg.n_layer, model.cfg.n_head
    masks = single_head_masks(L, H, dtype=model.dtype)  # [1 + L*H, L, H], clean first
    with torch.no_grad():
        values = evaluate_masks(model, prompts, masks, metrics, max_rows, progress, dtype, group)  # [1 + L*H, B, M]
    mean = values.mean(dim=1)  # [1 + L*H, M]
    sem = values.std(dim=1) / max(1, values.shape[1]) ** 0.5 if values.shape[1] > 1 else torch.zeros_like(mean)
    return SweepResult(
        metrics=[m.name for m in metrics],
        higher_is_better={m.name: m.higher_is_better for m in metrics},
        clean={m.name: float(mean[0, i]) for i, m in enumerate(metrics)},
        ablated={m.name: mean[1:, i].view(L, H).float() for i, m in enumerate(metrics)},
        sem={m.name: sem[1:, i].view(L, H).float() for i, m in enumerate(metrics)},
        n_examples=len(prompts), ablation=prompts.ablation,
    )
