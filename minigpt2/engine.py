"""The one batched intervention engine: many ablation variants of one batch, each computed only
where it differs from a shared base run.

Every search here runs on it: :func:`minigpt2.masking.run_with_head_masks` (the 144-head
sweep), the paper's head search (circuitlab.search) and the edge graph's runner
(circuitlab.graph.EdgeRunner, which shares this module's ablation names, metric type,
memory budget, join schedule and precision rule, and model.py's attention maths).

The idea, exact for every variant:

- the base run (the clean model, or the search's current circuit) is computed once and
  kept layer by layer;
- a variant joins the batch at its first layer that differs from the base: below it, it
  *is* the base run; at that layer its q, k, v and z are still the base's, so only its
  edited z's projection W_O and the MLP are computed (:meth:`Block.finish`);
- the final layer is computed at the answer positions only (keys and values at every
  position, one query per row: ``Block.forward(..., at=positions)``);
- variants are processed in chunks of rows sized to a memory budget (:func:`memory_budget`:
  a share of the free memory on CUDA, a fixed default on CPU), and an optional metric reduces
  each chunk's logits as soon as they exist.

Precision: ``dtype=torch.bfloat16`` runs the matmuls in bf16 with fp32 accumulation (torch's
CPU and CUDA kernels), under autocast; the residual stream, layer norms, softmax inputs'
accumulation and metrics stay fp32. :class:`Precision` holds the rule by which the searches
keep their decisions exact: a decision whose margin to its threshold lies within the measured
bf16 error is re-evaluated in fp32.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import distributed
from .hardware import parse_dtype
from .progress import progress

# How an ablated component's output is replaced: "zero"; "mean": its mean over a reference batch;
# "resample": its value on a paired (corrupted) prompt, row by row. "patch": a deprecated name of "resample".
ABLATIONS = ("zero", "mean", "resample")
_DEPRECATED_ABLATIONS = {"patch": "resample"}

CPU_BUDGET = 2**30  # bytes of activations per chunk on a CPU (override: MINIGPT2_MEMORY_BUDGET)
CUDA_SHARE = 0.5  # the share of a GPU's free memory a chunk may use


def check_ablation(name: str, stacklevel: int = 3) -> str:
    """The ablation's name, one of :data:`ABLATIONS`; refuses an unknown one, naming the choices.
    "patch" is taken as "resample" with a DeprecationWarning (pointing ``stacklevel`` frames up)."""
    if not isinstance(name, str):
        raise TypeError(f"the ablation must be a name, one of {ABLATIONS}, got {name!r} ({type(name).__name__})")
    if name in _DEPRECATED_ABLATIONS:
        new = _DEPRECATED_ABLATIONS[name]
        warnings.warn(f"ablation {name!r} is deprecated: pass ablation={new!r}", DeprecationWarning,
                      stacklevel=stacklevel)
        name = new
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {ABLATIONS} (resample: the value on paired "
                         "corrupted prompts, ACDC's default; mean: the mean over a reference batch; zero)")
    return name


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 matmuls with fp32 accumulation on ``device``, or nothing for fp32 / the model's dtype.

    What runs in bf16 is torch's autocast policy, kept after profiling the sweep on an avx512_bf16 CPU
    (BENCHMARKS.md, "bf16 on this CPU (issue 27)"): the linear layers, the unembedding, attention
    (scaled_dot_product_attention) and the MLP's GELU (on its bf16 input) in bf16; layer norms, the residual
    stream's adds and the metrics in fp32.
    The matmuls' weights are cast once per context (autocast's cache: parameters, not their slices), and
    attention in fp32 would cost more than it saves (its inputs are cast back and forth). Whether bf16 can be
    faster at all on a machine: :func:`minigpt2.hardware.bf16_outlook`.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ---------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    """A per-example metric: ``metric(logits [V, B, vocab]) -> [V, B]``; the one metric type of the
    library (the sweep, the head search, ACDC, EAP and the study all take it).

    ``fn(logits, **data)`` gets ``data``, the per-example tensors it needs (targets, clean
    logits), each [B, ...]; ``metric(logits, rows=r)`` scores the rows ``r`` only, so that
    large sets can be scored block by block. Logits are scored in fp32 whatever their dtype.
    ``metric.mean(logits)`` -> [V] is the batch mean the edge methods use. ``step``: the least
    change of one example's value (1 for a right-or-wrong metric such as accuracy; 0 for a
    continuous one), which bf16's decisions must allow for (:class:`Precision`).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    higher_is_better: bool = True
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    step: float = 0.0

    def __call__(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        data = self.data if rows is None else {k: v[rows] for k, v in self.data.items()}
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
        return self.fn(logits, **{k: v.to(logits.device) for k, v in data.items()})

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """[V, B, vocab] -> [V], the mean over examples."""
        return self(logits).mean(dim=-1)

    def subset(self, rows) -> "Metric":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Metric(self.name, self.fn, self.higher_is_better, {k: v[rows] for k, v in self.data.items()}, self.step)


BatchMetric = Callable[[torch.Tensor], torch.Tensor]  # logits [V, B, vocab] -> [V]


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per example, P = softmax(logits_p) (the clean run), Q = softmax(logits_q): the one KL
    of the library (tpp.metrics' "kl" metric, ACDC's default metric, learned masks' faithfulness).

    [..., B, vocab] each, broadcast against one another (e.g. clean [B, vocab] against ablated
    [V, B, vocab]) -> [..., B], in nats, in float32 at least. Tokens to which P gives zero probability
    contribute nothing, even where Q is -inf.
    """
    log_p = torch.log_softmax(logits_p.to(torch.promote_types(logits_p.dtype, torch.float32)), dim=-1)
    log_q = torch.log_softmax(logits_q.to(torch.promote_types(logits_q.dtype, torch.float32)), dim=-1)
    p = log_p.exp()
    terms = p * (log_p - log_q)
    if (p == 0).any():  # checked on P alone (clean, [B, vocab]): the where costs a pass over [V, B, vocab]
        terms = torch.where(p > 0, terms, torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(dim=-1)


class MetricError(TypeError, ValueError):
    """A metric that returned something other than the values asked of it (a scalar where one value per
    variant is due, a vector where a scalar is, None, a string): a TypeError and a ValueError both."""


def check_metric_values(values, n: int, what: str, contract: str) -> torch.Tensor:
    """``values``, what a metric returned for n variants, as a tensor [n, ...]; else :class:`MetricError`
    naming ``what`` and its ``contract`` (e.g. "logits [n, B, vocab] -> [n]")."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise MetricError(f"{what} returned {type(values).__name__}; it must return a tensor: {contract}") from None
    if values.ndim == 0 or values.shape[0] != n:
        raise MetricError(f"{what} returned shape {tuple(values.shape)} for {n} variants; it must return one value "
                          f"(or row) per variant, {contract}: reduce over examples, not over variants")
    return values


def check_variant_values(values, n: int) -> torch.Tensor:
    """What a batch metric returned for n variants, checked to be one value per variant [n] (else
    :class:`MetricError`): the one check of the contract logits [V, B, vocab] -> [V] that ACDC, EAP,
    the faithfulness curves, learned masks and exact edge patching rely on."""
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise MetricError(f"metric must map logits [V, B, vocab] to one value per variant [V], got {got} for V={n}. "
                          "Fix: average over examples, e.g. lambda l: per_example(l).mean(-1), or pass a "
                          "minigpt2.engine.Metric")
    return values


def check_metrics(metrics, what: str) -> list[Metric]:
    """A non-empty list of :class:`Metric` (what the sweep and the search take), else a TypeError/ValueError."""
    if isinstance(metrics, Metric):
        raise TypeError(f"{what} takes a list of metrics: pass [metric]")
    if not isinstance(metrics, (list, tuple)) or not all(isinstance(m, Metric) for m in metrics):
        bad = next((m for m in metrics if not isinstance(m, Metric)), metrics) if isinstance(metrics, (list, tuple)) \
            else metrics
        raise TypeError(f"{what} takes minigpt2.engine.Metric objects (Metric(name, fn), fn(logits [V, B, vocab]) "
                        f"-> [V, B]), got {type(bad).__name__}")
    if not metrics:
        raise ValueError(f"{what} needs at least one metric")
    return list(metrics)


def per_example(metric: Metric, logits: torch.Tensor, rows=None) -> torch.Tensor:
    """``metric(logits [V, b, vocab], rows)``, checked to be per-example values [V, b] (else :class:`MetricError`)."""
    values = metric(logits, rows=rows)
    if not isinstance(values, torch.Tensor) or values.shape != logits.shape[:2]:
        got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise MetricError(f"metric {metric.name!r} returned {got} for logits {tuple(logits.shape)}; a Metric's fn "
                          f"maps logits [V, B, vocab] to one value per variant and example, [V, B] = "
                          f"{list(logits.shape[:2])}: do not reduce over the examples (the algorithms average)")
    return values


def batch_metric(metric) -> BatchMetric:
    """A callable logits [V, B, vocab] -> [V]: a Metric's batch mean, or a callable as it is."""
    if isinstance(metric, Metric):
        return metric.mean
    if not callable(metric):
        raise TypeError(f"metric must be a Metric or a callable logits [V, B, vocab] -> [V], got "
                        f"{type(metric).__name__}")
    return metric


def higher_is_better(metric, default: bool) -> bool:
    return metric.higher_is_better if isinstance(metric, Metric) else default


# ---------------------------------------------------------------- positions and means
def last_positions(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last real position of each row: T - 1, or the last 1 of a right-padded mask."""
    if attention_mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    return attention_mask.long().cumsum(dim=1).argmax(dim=1)


def weighted_mean(x: torch.Tensor, mask: torch.Tensor | None, over_positions: bool = False) -> torch.Tensor:
    """The mean of x [N, B, T, ...] over B (and T with ``over_positions``), counting the real tokens
    of ``mask`` [B, T] only (None: all): [N, T, ...] or [N, ...]."""
    B, T = x.shape[1:3]
    w = torch.ones(B, T, device=x.device, dtype=x.dtype) if mask is None else mask.to(x.device, x.dtype)
    w = w.view(1, B, T, *[1] * (x.ndim - 3))
    dims = (1, 2) if over_positions else (1,)
    return (x * w).sum(dim=dims) / w.sum(dim=dims).clamp(min=1)


# ---------------------------------------------------------------- memory and schedule
def memory_budget(device) -> int:
    """Bytes of transient activations one chunk of variants may take on ``device``.

    CUDA: half of the free memory now. CPU (and others): 1 GiB, or MINIGPT2_MEMORY_BUDGET
    (bytes, or with a KiB / MiB / GiB suffix).
    """
    env = os.environ.get("MINIGPT2_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(2**26, int(free * CUDA_SHARE))
    return CPU_BUDGET


def parse_bytes(text: str) -> int:
    units = {"": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise ValueError(f"MINIGPT2_MEMORY_BUDGET={text!r}: give bytes, e.g. 1073741824 or 1GiB or 512MiB") from None
    if value < 1:
        raise ValueError(f"MINIGPT2_MEMORY_BUDGET={text!r} must be positive")
    return value


def rows_per_chunk(bytes_per_row: int, device, at_least: int = 1, budget: int | None = None) -> int:
    """How many rows (variants x examples) of ``bytes_per_row`` fit the device's budget (at least ``at_least``)."""
    budget = memory_budget(device) if budget is None else budget
    return max(at_least, budget // max(1, bytes_per_row))


def join_schedule(first: Sequence[int], per_chunk: int) -> list[list[int]]:
    """Variants grouped into chunks of ``per_chunk``, in the order of the layer (or stage) where
    they first differ from the base, so that a chunk shares as much of the base as it can."""
    order = sorted(range(len(first)), key=lambda v: first[v])
    per_chunk = max(1, per_chunk)
    return [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]


def progress_bar(items, desc: str, unit: str, enabled: bool) -> Iterator:
    """``items`` with the library's progress display (minigpt2.progress: tqdm on a terminal, a line
    per step with its time in a log, nothing when ``enabled`` is False or --no-progress was given)."""
    if not enabled:
        return iter(items)
    return iter(progress(items, desc, unit, enabled=True))


# ---------------------------------------------------------------- head masks
def check_variant_masks(masks, dims: dict[str, tuple[int, ...]], what: str = "masks", note: str = "",
                        example: str = "") -> torch.Tensor:
    """``masks`` as a real, finite tensor [V, *dims] with V >= 1; ``dims`` names each trailing
    dimension and the sizes it may have (the first listed is the usual one); ``note`` explains the
    shape, ``example`` names a builder of valid masks. One shape check, one set of errors, for head
    masks (check_masks) and edge masks (graph.EdgeRunner)."""
    masks = torch.as_tensor(masks)
    usual = [sizes[0] for sizes in dims.values()]
    shape = ", ".join(f"{name}={sizes[0]}" for name, sizes in dims.items())
    if masks.ndim == len(dims):
        raise ValueError(f"{what} has shape {tuple(masks.shape)}; for a single variant use {what}[None] "
                         f"(shape [1, {', '.join(map(str, usual))}])")
    if masks.ndim != len(dims) + 1 or any(n not in sizes for n, sizes in zip(masks.shape[1:], dims.values())):
        raise ValueError(f"{what} must be [V, {shape}]{note}, got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise ValueError(f"{what} holds no variant (shape [0, ...]): pass at least one [{shape}] mask{example}")
    if masks.dtype.is_complex:
        raise TypeError(f"{what} must be real numbers (1 keeps, 0 ablates), got {masks.dtype}")
    if not torch.isfinite(masks.float()).all():
        raise ValueError(f"{what} holds NaN or infinite values: 1 keeps, 0 ablates, values between interpolate")
    return masks


def check_masks(model, masks) -> torch.Tensor:
    """Head masks [V, n_layer, n_head] on the model's device, float (1 keeps a head, 0 ablates it)."""
    cfg = model.cfg
    masks = check_variant_masks(masks, {"n_layer": (cfg.n_layer,), "n_head": (cfg.n_head,)},
                                example=", e.g. single_head_masks(n_layer, n_head)")
    return masks.to(device=model.device, dtype=model.dtype)  # float64 masks would promote z past the weights' dtype


def check_batch(model, tokens) -> torch.Tensor:
    """[B, T] token ids on the model's device; a batch, not one sequence."""
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 1:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: batched interventions take a batch [B, T]; "
                         "for one sequence pass tokens[None]")
    tokens = model.as_tokens(tokens)
    model.check_tokens(tokens)
    return tokens


def check_model(model, what: str) -> None:
    """Refuse, up front, what is not a minigpt2 GPT2 (a TransformerLens model, a path, None)."""
    # The model imports the engine (through HeadMaskMixin), so the class is looked up, not imported: where
    # minigpt2.model is not loaded, no GPT2 exists.
    core = sys.modules.get(f"{__package__}.model")
    if core is None or not isinstance(model, core.GPT2):
        raise TypeError(f"{what} needs a minigpt2 GPT2 model (e.g. minigpt2.load_pretrained(path)), got "
                        f"{type(model).__name__}")


def check_max_rows(max_rows) -> int | None:
    """None (the device's memory budget decides) or a whole number of rows >= 1."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, numbers.Integral)
                                 or max_rows < 1):
        raise ValueError(f"max_rows must be a whole number of rows >= 1 (variants x examples per chunk), or None "
                         f"for the device's memory budget; got {max_rows!r}")
    return max_rows


def refuse_hooks(model, what: str) -> None:
    hooked = [name for name, hp in model.hook_dict.items() if hp.active]
    if hooked:
        raise RuntimeError(f"{what} computes parts of blocks directly, so hooks would not fire; "
                           f"active hooks: {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}. Remove them "
                           "(leave the `with model.hooks(...)` block or call model.reset_hooks()), or use "
                           "run_with_head_masks_loop, which runs every variant through the hooks")


@torch.no_grad()
def replacement_values(model, ablation: str, tokens: torch.Tensor, reference: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                       mean_over: str = "position") -> list[torch.Tensor] | None:
    """Per layer, the value r an ablated head's z takes: None for zero ablation, else
    [T, H, d_head] or [H, d_head] (mean) or [B, T, H, d_head] (resample). Computed in the model's
    own precision (one forward): cheap to keep exact."""
    ablation = check_ablation(ablation)
    if ablation == "zero":
        return None
    if ablation == "resample":
        if reference is None:
            raise ValueError("resample ablation needs reference=corrupted tokens of the same shape as tokens")
        if reference.shape != tokens.shape:
            raise ValueError(f"resample reference has shape {tuple(reference.shape)}, but tokens have "
                             f"{tuple(tokens.shape)}: corrupted prompts must pair one-to-one with the clean ones, "
                             "at equal length")
        if reference_mask is None:
            reference_mask = attention_mask  # corrupted prompts padded as the clean ones
    else:
        if mean_over not in ("position", "all"):
            raise ValueError(f"mean_over must be 'position' or 'all', got {mean_over!r}")
        if reference is None:
            reference, reference_mask = tokens, attention_mask
        if mean_over == "position" and reference.shape[1] != tokens.shape[1]:
            raise ValueError(f"a per-position mean needs reference sequences of length {tokens.shape[1]}, got "
                             f"{reference.shape[1]}; pad them or use mean_over='all'")
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layer)]
    _, cache = model.run_with_cache(reference.to(model.device), names=names, attention_mask=reference_mask)
    zs = [cache[n] for n in names]  # each [Br, T, H, d_head]
    if ablation == "resample":
        return zs
    return list(weighted_mean(torch.stack(zs), reference_mask, over_positions=mean_over == "all"))


def head_edit(m: torch.Tensor, r: torch.Tensor | None, n_variants: int):
    """The z edit of n variants of B rows each at one layer: z' = m z + (1 - m) r, with m [n, H] and r
    one layer's replacement (None: zero), broadcast over rows [B, T | 1, H, d_head] or positions."""
    def edit(z):  # z [n * B, T, H, d_head]
        zv = z.view(n_variants, z.shape[0] // n_variants, *z.shape[1:])
        mv = m[:, None, None, :, None].to(torch.promote_types(m.dtype, z.dtype))  # [n, 1, 1, H, 1]
        out = zv * mv if r is None else zv * mv + (1 - mv) * r
        return out.reshape(z.shape)
    return edit


# ---------------------------------------------------------------- the engine core
class Core:
    """One batch's way through the model, for variants that each depart from a base run somewhere:
    the only code outside model.py that runs the model's blocks or their parts.

    Every batched method builds its variants' rows (n variants x B examples, variant-major) and
    calls these: head masks (HeadMaskRunner: the sweep, the head search), activation patching
    (minigpt2.patching), edge masks (circuitlab.graph.EdgeRunner: ACDC, EAP's evaluation, MIB's
    faithfulness, learned masks) and exact edge patching (circuitlab.edge_patching). It holds the
    one rule of each kind they share:

    - chunking: :meth:`chunks` (variants in the order they depart from the base, as many per chunk
      as :func:`memory_budget` allows, MINIGPT2_MEMORY_BUDGET included);
    - precision: :meth:`precision` (bf16 matmuls under autocast, fp32 residual stream);
    - the answer positions: the last block runs there only (:meth:`rest`, ``last=True``);
    - the unembedding: :meth:`logits` (ln_final and W_U, in blocks of the vocabulary on a CPU);
    - distribution: given a process group, :meth:`chunks` is this rank's share of the one-process chunks,
      :meth:`step` shares a rank's error with every rank, :meth:`gather` assembles every rank's
      per-variant outputs exactly (minigpt2.distributed);
    - the device: the model's.

    Attention and MLP maths stay in model.py; the model never calls back into the engine.

    Args:
        model: a minigpt2 GPT2.
        attn: the batch's attention mask [B, 1, T, T] (``model.attention_mask``) or None (causal).
        positions: [B] the position each example's logits are read at, or None (every position).
        dtype: None (the model's precision) or torch.bfloat16.
        budget: bytes of activations per chunk (default :func:`memory_budget` of the device).
        group: a torch.distributed process group over which the variants are split (:meth:`chunks` gives
            this rank its share, :meth:`step` and :meth:`gather` bring them together exactly); None:
            this process alone (the core never takes a default group: the runners resolve it,
            minigpt2.distributed.resolve_group).
    """

    def __init__(self, model, attn: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 dtype=None, budget: int | None = None, group=None):
        self.model, self.cfg = model, model.cfg
        self.attn, self.positions = attn, positions
        self.dtype, self.budget = dtype, budget
        self.n_layer = model.cfg.n_layer
        self.group = distributed.check_group(group)  # None: alone

    # --- rules ----------------------------------------------------------------------------------
    def precision(self, exact: bool = False):
        """The context every variant runs in: bf16 matmuls (fp32 accumulation) when the dtype is bf16."""
        return autocast(self.model.device, None if exact else self.dtype)

    def rows(self, bytes_per_row: int, at_least: int = 1, max_rows: int | None = None) -> int:
        """Rows (variants x examples) per chunk: ``max_rows``, else what the memory budget allows."""
        check_max_rows(max_rows)
        return max_rows or rows_per_chunk(bytes_per_row, self.model.device, at_least=at_least, budget=self.budget)

    def chunks(self, first: Sequence[int], per_row: int, B: int, max_rows: int | None = None) -> list[list[int]]:
        """The variants, ``first[v]`` the layer (or stage) where variant v departs from the base, in chunks of
        as many as fit: the one chunking rule (:func:`join_schedule` over :meth:`rows`). Distributed: this
        rank's share of the one-process chunk list (the ranks agree on the smallest rows per chunk any
        of them allows); a runner then calls :meth:`gather` after its chunks, every rank, even with none."""
        rows = self.rows(per_row, at_least=B, max_rows=max_rows)
        if self.group is None:
            return join_schedule(first, rows // B)
        rows = distributed.smallest(rows, self.group)
        return distributed.shard(join_schedule(first, rows // B), self.group)

    def step(self, what: str = "the variants"):
        """The context a rank computes its chunks in: an error in one rank is raised on every rank as one
        minigpt2.distributed.DistributedError naming it, at the end of the step. Alone: nothing."""
        return distributed.step(self.group, what)

    def gather(self, outputs: dict[int, torch.Tensor], n: int) -> dict[int, torch.Tensor]:
        """Every rank's per-variant outputs (variant -> tensor) of variants 0..n-1, exactly (the bytes
        unchanged), on every rank, on the model's device; alone, ``outputs`` as it is."""
        return distributed.gather(outputs, n, self.group, self.model.device)

    @property
    def writer(self) -> bool:
        """Whether this process shows progress and writes: rank 0, or a process alone."""
        return distributed.is_writer(self.group if self.group is not None else distributed.LOCAL)

    def mask(self, n: int, attn: torch.Tensor | None = None) -> torch.Tensor | None:
        """The attention mask of n variants' rows (the batch's, repeated), or None (causal)."""
        attn = self.attn if attn is None else attn
        return None if attn is None else attn.repeat(n, 1, 1, 1)

    def at(self, n: int) -> torch.Tensor:
        """The answer positions of n variants' rows [n * B]."""
        return self.positions.repeat(n)

    # --- the model's parts, by layer -----------------------------------------------------------
    def embed(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream entering block 0 [B, T, d_model]."""
        return self.model.embed_input(tokens, attention_mask=attention_mask)

    def block(self, l: int, x: torch.Tensor, n: int = 1, z_edit=None, last: bool = False, kv=None,
              mask: torch.Tensor | None = None, hooks=()) -> torch.Tensor:
        """Block l on n variants' rows x [n * B, T, d_model] (z edited by ``z_edit``): [n * B, T, d_model], or
        [n * B, d_model] at the answer positions with ``last``. ``kv``: keys and values before x's positions (a
        KV-cache layer); ``mask``: the rows' own attention mask instead of the batch's; ``hooks``: (name, fn)
        pairs active for this block only (activation patching puts its patched values in place with them)."""
        block = self.model.blocks[l]
        mask = self.mask(n) if mask is None else mask
        with self.model.hooks(list(hooks)) if hooks else contextlib.nullcontext():
            if last:
                return block(x, mask, z_edit, at=self.at(n))
            return block(x, mask, z_edit, kv=kv)

    def finish(self, l: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block l given its attention's z (x: its resid_pre [..., d_model], z [..., H, d_head])."""
        return self.model.blocks[l].finish(x, z)

    def finish_mlp(self, l: int, mid: torch.Tensor) -> torch.Tensor:
        """Block l from its resid_mid [..., d_model] on: + MLP(ln2(mid))."""
        return self.model.blocks[l].finish_mlp(mid)

    def mlp(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """Block l's MLP output MLP(ln2(x)) for its input x [..., d_model] (an MLP node of the edge graph)."""
        block = self.model.blocks[l]
        return block.mlp(block.ln2(x))

    def heads(self, l: int, xq, xk, xv, heads: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """Heads ``heads`` of layer l, each on its own query, key and value input: xq, xk, xv [N, T, Hs, d_model]
        residual-stream inputs (before ln1) -> [N, T, Hs, d_model], each head's z_h @ W_O[h] (no b_O); the
        maths is the model's (Attention.head_outputs). The edge graph's head nodes."""
        block = self.model.blocks[l]
        return block.attn.head_outputs(block.ln1(xq), block.ln1(xk), block.ln1(xv), heads, mask)

    def keys_values(self, l: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block l's keys and values [N, T, H, d_head] for its input x [N, T, d_model]."""
        block = self.model.blocks[l]
        _, k, v = block.attn.project(block.attn_input(x))
        return k, v

    def rest(self, l: int, x: torch.Tensor, n: int, last: bool = True) -> torch.Tensor:
        """Blocks l.. on n variants' residual stream x [n * B, T, d_model] entering block l: the final residual
        stream [n * B, d_model] at the answer positions (``last``: the last block computes only there), or
        [n * B, T, d_model] at every position."""
        mask = self.mask(n)
        for k in range(l, self.n_layer - (1 if last else 0)):
            x = self.model.blocks[k](x, mask)
        return self.block(self.n_layer - 1, x, n, last=True) if last and l < self.n_layer else x

    # --- the unembedding -------------------------------------------------------------------------
    VOCAB_BLOCK = 2048  # columns of the unembedding per matmul on a CPU

    def logit_blocks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """ln_final and the unembedding of x [..., d_model], as (start, logits[..., start:start + k]) pairs: in
        blocks of the vocabulary on a CPU, where one [rows, V] matmul runs at about half the speed (its
        output does not stay in cache); in one piece elsewhere, or when W_U is not the plain tied wte."""
        model = self.model
        h = model.ln_final(x)
        if not model.unembed.tied or model.unembed.hook_in.active or model.unembed.hook_out.active \
                or x.device.type != "cpu":
            yield 0, model.unembed(h)
            return
        W = model.wte.weight  # [V, d_model]
        for i in range(0, W.shape[0], self.VOCAB_BLOCK):
            yield i, h @ W[i:i + self.VOCAB_BLOCK].T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> logits [..., V] in the model's dtype: the one unembedding of every method."""
        blocks = list(self.logit_blocks(x))
        if len(blocks) == 1:
            return blocks[0][1].to(self.model.dtype)
        out = x.new_empty(*x.shape[:-1], self.cfg.vocab_size, dtype=torch.promote_types(blocks[0][1].dtype,
                                                                                          self.model.dtype))
        for i, b in blocks:
            out[..., i:i + b.shape[-1]] = b
        return out.to(self.model.dtype)


def prefix_kv(k: torch.Tensor, v: torch.Tensor, n: int = 1):
    """The model's own KV-cache layer (minigpt2.generate's, as generation keeps its prompt's) holding keys and
    values k, v [B, s, H, d_head] of positions before a block's own, for n variants' rows (repeated,
    variant-major: [n * B, s, H, d_head]). ``Core.block(l, x, n, kv=prefix_kv(k, v, n))`` runs x's positions
    after them: its keys and values are appended to these. The layer grows when used: one block call each.
    Activation patching's rows start at position s with the corrupted run's keys and values before it."""
    from .generate import KVCache  # the generation module imports nothing back: no cycle

    layer = KVCache(1).layer(0)
    layer.extend(k if n == 1 else k.repeat(n, 1, 1, 1), v if n == 1 else v.repeat(n, 1, 1, 1))
    return layer


def head_mask_bytes_per_row(cfg, T: int) -> int:
    """One row's transient activations in a head-mask chunk: a block's (all blocks' with autograd on)
    and its logits."""
    per_row = T * (3 * cfg.d_model + 2 * cfg.d_mlp + cfg.n_head * T) * 4
    return per_row * (cfg.n_layer if torch.is_grad_enabled() else 1) + 2 * cfg.vocab_size * 4


class HeadMaskRunner:
    """Head-mask variants [V, n_layer, n_head] of one batch, each computed as a departure from a
    base run: the engine under run_with_head_masks, the sweep and the head search.

    Args:
        tokens: [B, T]; ``attention_mask`` [B, T] if right-padded; ``positions`` [B] the position
            whose logits are read (default: each row's last real token).
        ablation: "zero", "mean" (over ``reference``, default the tokens; per position or, with
            ``mean_over="all"``, over all positions) or "resample" (``reference``: corrupted
            tokens of the same shape, row by row).
        dtype: None (the model's precision) or torch.bfloat16 (bf16 matmuls, fp32 residual).
        budget: bytes of activations per chunk (default :func:`memory_budget` of the device).
        group: the torch.distributed group whose ranks split the variants (results equal to one process's,
            bit for bit, on every rank); None: the default group where this process opted in
            (minigpt2.distributed.init_from_env), else this process alone; minigpt2.distributed.LOCAL: alone.
            Every rank of the group must make the same calls.

    ``runner.run(masks)`` evaluates variants against the base (all heads kept, until
    ``runner.rebase(mask)`` makes another mask the base: the search's current circuit).
    """

    def __init__(self, model, tokens, ablation: str = "zero", reference: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, mean_over: str = "position", dtype=None,
                 budget: int | None = None, group=None):
        check_model(model, "batched head masking")
        refuse_hooks(model, "batched head masking")
        self.model, cfg = model, model.cfg
        self.tokens = check_batch(model, tokens)
        B, T = self.tokens.shape
        dev = model.device
        attention_mask = model.check_attention_mask(attention_mask, self.tokens)
        self.attention_mask = attention_mask
        self.positions = (last_positions(self.tokens, attention_mask) if positions is None
                          else model.check_positions(torch.as_tensor(positions).to(dev), B, T))
        self.ablation = check_ablation(ablation)
        self.dtype = parse_dtype(dtype, model.device)
        self.r = replacement_values(model, self.ablation, self.tokens,
                                    None if reference is None else torch.as_tensor(reference).to(dev),
                                    attention_mask,
                                    None if reference_mask is None else torch.as_tensor(reference_mask).to(dev),
                                    mean_over)
        rows = torch.arange(B, device=dev)
        # The last layer's replacement at the answer positions (its query is computed there only).
        self.r_at = None if self.r is None else (
            self.r[-1][rows, self.positions][:, None] if self.r[-1].ndim == 4 else
            self.r[-1][self.positions][:, None] if self.r[-1].ndim == 3 else self.r[-1])
        self.attn = model.attention_mask(attention_mask, T, T)  # [B, 1, T, T] or None (causal)
        self.budget = budget
        self.core = Core(model, self.attn, self.positions, self.dtype, budget, distributed.resolve_group(group))
        self.base = torch.ones(cfg.n_layer, cfg.n_head, dtype=model.dtype, device=dev)
        self._resid: list[torch.Tensor] = []  # base: the residual stream entering layer l [B, T, d_model]
        self._z: list[torch.Tensor] = []  # base: layer l's z before its edit [B, T, H, d_head]
        self._top: tuple[torch.Tensor, torch.Tensor] | None = None  # base's last layer: (z at [B, 1, H, d], out [B, d])

    # --- the base run, layer by layer, computed when first needed ------------------------------
    def rebase(self, mask: torch.Tensor) -> None:
        """Make ``mask`` [L, H] the base; cached layers above its first change are dropped."""
        mask = mask.to(self.base)
        changed = (mask != self.base).any(dim=1).nonzero()
        if len(changed):
            l = int(changed[0])
            del self._resid[l + 1:], self._z[l:]
            self._top = None
            self.base = mask.clone()

    def _edit(self, m: torch.Tensor, l: int, n: int, at: bool = False):
        """The edit of n variants' z at layer l (m [n, H]), or None where none ablates a head there."""
        if not (m != 1).any():
            return None
        return head_edit(m, self.r_at if at else (None if self.r is None else self.r[l]), n)

    def _prefix(self, l: int) -> None:
        """The base's z of layers <= l and residual stream entering layers <= l + 1 (l <= n_layer - 2)."""
        model = self.model
        if not self._resid:
            self._resid.append(self.core.embed(self.tokens, self.attention_mask))
        while len(self._z) <= l:
            k = len(self._z)
            keep = self._keep(self._edit(self.base[k][None], k, 1))
            self._resid.append(self.core.block(k, self._resid[k], 1, keep))
            self._z.append(keep.z)

    def _final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's last layer at the answer positions: (z [B, 1, H, d_head] before its edit, output [B, d])."""
        if self._top is None:
            L = self.model.cfg.n_layer
            self._prefix(L - 2)
            keep = self._keep(self._edit(self.base[L - 1][None], L - 1, 1, at=True))
            out = self.core.block(L - 1, self._resid[L - 1], 1, keep, last=True)
            self._top = (keep.z, out)
        return self._top

    @staticmethod
    def _keep(edit):
        def keep(z):
            keep.z = z
            return z if edit is None else edit(z)
        return keep

    def bytes_per_row(self) -> int:
        return head_mask_bytes_per_row(self.model.cfg, self.tokens.shape[1])

    # --- the variants -------------------------------------------------------------------------
    def run(self, masks, metric=None, max_rows: int | None = None, progress: bool = False) -> torch.Tensor:
        """logits [V, B, vocab] at the answer positions, or ``metric(logits)`` [V, ...] chunk by chunk
        (``metric``: any callable logits [n, B, vocab] -> [n, ...], e.g. a Metric)."""
        model, L = self.model, self.model.cfg.n_layer
        masks = check_masks(model, masks)
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be None (return the logits) or a callable logits [n, B, vocab] -> "
                            f"[n, ...], got {type(metric).__name__}")
        check_max_rows(max_rows)
        B = self.tokens.shape[0]
        differs = (masks != self.base).any(dim=2)  # [V, L]
        first = torch.where(differs.any(dim=1), differs.float().argmax(dim=1),
                            torch.full_like(differs[:, 0], L, dtype=torch.long)).tolist()
        chunks = self.core.chunks(first, self.bytes_per_row(), B, max_rows)
        outputs: dict[int, torch.Tensor] = {}
        with self.core.precision(), self.core.step("head-mask variants"):
            for chunk in progress_bar(chunks, "head-mask variants", "chunk", progress and self.core.writer):
                x = self._chunk(masks, chunk, [first[v] for v in chunk])  # [n * B, d_model], in chunk order
                logits = self.core.logits(x).view(len(chunk), B, -1)
                values = logits if metric is None else check_metric_values(metric(logits), len(chunk), "metric",
                                                                            "logits [n, B, vocab] -> [n, ...]")
                outputs.update(zip(chunk, values))
        outputs = self.core.gather(outputs, masks.shape[0])  # distributed: every rank's share, exactly
        return torch.stack([outputs[v] for v in range(masks.shape[0])])

    def _chunk(self, masks: torch.Tensor, chunk: list[int], first: list[int]) -> torch.Tensor:
        """The final residual stream at the answer positions of variants ``chunk`` (sorted by ``first``,
        the layer where each departs from the base): [len(chunk) * B, d_model]."""
        core, L = self.core, self.model.cfg.n_layer
        rows, at = torch.arange(self.tokens.shape[0], device=self.model.device), self.positions
        self._prefix(min(min(first), L - 1) - 1)
        x = self._resid[0].new_empty(0, *self._resid[0].shape[1:])  # running variants, variant-major rows
        running: list[int] = []
        for l in range(min(first), L - 1):
            joining = [v for v, f in zip(chunk, first) if f == l]
            if running:
                x = core.block(l, x, len(running), self._edit(masks[running, l], l, len(running)))
            if joining:  # the base's run up to this layer's z: only W_O and the MLP differ
                n = len(joining)
                self._prefix(l)
                edit = self._edit(masks[joining, l], l, n)
                z = self._z[l].repeat(n, 1, 1, 1)
                x = torch.cat([x, core.finish(l, self._resid[l].repeat(n, 1, 1), z if edit is None else edit(z))])
                running += joining
        final = []
        if running:
            n = len(running)
            final.append(core.block(L - 1, x, n, self._edit(masks[running, L - 1], L - 1, n, at=True), last=True))
        joining = [v for v, f in zip(chunk, first) if f == L - 1]
        late = [v for v, f in zip(chunk, first) if f == L]  # no different from the base
        if joining or late:
            z_top, out_top = self._final()
        if joining:
            n = len(joining)
            edit = self._edit(masks[joining, L - 1], L - 1, n, at=True)
            z = z_top.repeat(n, 1, 1, 1)
            final.append(core.finish(L - 1, self._resid[L - 1][rows, at].repeat(n, 1), z if edit is None else edit(z)))
        if late:
            final.append(out_top.repeat(len(late), 1))
        assert running + joining + late == chunk  # variants leave in chunk order (join_schedule sorts them)
        return torch.cat(final)


# ---------------------------------------------------------------- exact decisions in bf16
class Precision:
    """Decisions that stay exact when the arithmetic is bf16.

    ``Precision.measure(low, exact)`` takes a decision metric's values on the same variants in
    bf16 and in fp32 and keeps ``error``: SAFETY times the largest difference seen, plus a floor
    of 2^-12 of the values' scale. A metric of discrete values (accuracy: a mean of 0s and 1s)
    passes ``step``, its least change (1/B): bf16 may flip an example's argmax where the
    measured variants flipped none (a model right on no example measures no error at all), so
    the difference is taken as at least one step. A search then asks ``near(margin, terms)``, where margin is how
    far a decision's quantity lies from its threshold, in the metric's units, and terms how many
    bf16 values it combines (a drop compares a candidate with a baseline: 2, plus the threshold
    times the baseline for a relative drop); a decision near its threshold is re-evaluated in
    fp32, so the circuit equals the fp32 circuit whenever the error holds as measured.
    In fp32 (``exact``), nothing is near.
    """

    SAFETY = 4.0

    def __init__(self, error: float = 0.0, exact: bool = True):
        self.error, self.exact = error, exact
        self.rechecked = 0

    @classmethod
    def measure(cls, low: Sequence[float], exact: Sequence[float], safety: float = SAFETY,
                step: float = 0.0) -> "Precision":
        if len(low) != len(exact) or not low:
            raise ValueError("Precision.measure needs the same variants' values in both precisions")
        diff = max(step, *(abs(a - b) for a, b in zip(low, exact)))
        scale = max(abs(b) for b in exact)
        return cls(safety * diff + 2**-12 * scale, exact=False)

    def near(self, margin: float, terms: float = 2.0) -> bool:
        return not self.exact and abs(margin) <= self.error * terms

    def to_json(self) -> dict:
        return {"exact": self.exact, "error": self.error, "rechecked": self.rechecked}
