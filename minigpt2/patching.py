"""Activation patching with TransformerLens's API, many patches per forward.

The functions of ``transformer_lens.patching`` (3.x) with the same names, arguments, output
shapes and index orders::

    from minigpt2 import load_pretrained
    from minigpt2.patching import get_act_patch_resid_pre, get_act_patch_attn_head_out_by_pos
    model = load_pretrained("weights/welterweight")
    clean_tokens = model.to_tokens("if all kings are rulers and rulers are tyrants then all kings are")
    corrupted_tokens = model.to_tokens("if all kings are rulers and rulers are liars then all kings are")
    ty, li = model.to_single_token(" ty"), model.to_single_token(" li")   # " tyrants", " liars"
    def patching_metric(logits):                  # [B, T, V] -> the clean answer's lead at the end
        return logits[0, -1, ty] - logits[0, -1, li]
    _, clean_cache = model.run_with_cache(clean_tokens)
    out = get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)   # [n_layers, pos]

As in TransformerLens, each patch runs the model on ``corrupted_tokens`` with one activation
edited by ``patch_setter(corrupted_activation, index, clean_activation)`` (the activation
``get_act_name(activation_name, layer=index[0])``, ``index`` a list such as [layer, pos, head]),
and ``patching_metric(logits [B, T, V])`` reduces the patched run to a number (``.item()``).
The output is a float32 tensor with one dimension per index axis (or one value per row of
``index_df``), in the order of ``itertools.product`` over the axes.

The difference is how the patched runs are computed: not one forward per patch but many patches
per forward, each patch a group of B rows (variants x examples), with exactly the same values:

- a patch at layer l leaves the residual stream entering block l equal to the corrupted run's, so
  that run is computed once and each patch starts at its own block (prefix sharing over layers);
- a patch that leaves positions < s of the activation unchanged (a ``pos`` index, or a clean
  activation equal to the corrupted one there, as at the common prefix of two prompts) changes
  nothing at positions < s anywhere downstream (attention is causal): those positions' keys,
  values and logits are the corrupted run's, and only positions s.. are recomputed. The position s
  is found by comparing the patched activation with the corrupted one, so any patch setter works;
  a patch that changes nothing gets the corrupted run's metric;
- the computation is the engine core's (:class:`minigpt2.engine.Core`): the model's blocks, with the
  corrupted keys and values before s in a KV-cache layer (as generation keeps its prompt's); patches
  grouped by s run in chunks of rows sized by its memory rule (:func:`minigpt2.engine.memory_budget`,
  MINIGPT2_MEMORY_BUDGET included; ``max_rows`` overrides it); the unembedding is its own
  (``Core.logits``: in blocks of the vocabulary on a CPU, where that is faster).

The patched activation is the setter applied to the corrupted run's activation (upstream of the
patch nothing changed, so that is what TransformerLens's hook receives), computed before the
batched forward and put in place by a hook on that row group's rows. Every hook point of the
patched block fires as in a plain forward (but on positions s.. only), so the model must carry
no hooks of its own while patching.

The metric keeps TransformerLens's contract: it is called once per patch, on a fresh tensor of
that patch's logits [B, T, V] (every position; those before s copied from the corrupted run), and
must return a scalar; a patch that changes nothing gets the value of one call on the corrupted
run's logits, the call made first, before any patched run, so that a metric returning anything else
(a vector, None) fails at once with a MetricError. Two opt-in keywords make it cheaper, both accepted by every function here:

- ``batched_metric=True``: the metric is instead called on many patches' logits at once,
  [n, B, T, V], and must return [n] (one value per patch);
- ``logit_positions=[p, ...]``: the metric reads only these positions (e.g. ``[-1]``): logits are
  computed there only, the last block computes queries, W_O and the MLP there only, and every other
  position of the tensor the metric gets is NaN (that tensor is reused between calls: a metric must
  not keep it). For a metric that reads only these positions the values are the same.

The accepted ``clean_cache`` is anything indexable by hook name: minigpt2's ``run_with_cache``
cache (a dict or an ActivationCache), a plain dict name -> tensor, or TransformerLens's cache. Its
activations must have the corrupted run's shapes (a batch of 1 broadcasts, as in TransformerLens): one
from clean tokens of another length or batch, or from another model, is refused up front
(CleanCacheError, naming the activation, both shapes and which of the three it is).
"""

from __future__ import annotations

import itertools
import numbers
import re
from functools import partial
from typing import Callable, Mapping, Sequence

import torch

from .engine import Core, MetricError, check_max_rows, check_metric_values, memory_budget, prefix_kv, progress_bar
from .model import GPT2
from .utils import get_act_name

Logits = torch.Tensor
AxisNames = str  # "layer", "pos", "head_index", "head", "src_pos", "dest_pos"
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]

__all__ = [
    "CleanCacheError", "MetricError", "get_act_name", "make_df_from_ranges", "generic_activation_patch",
    "layer_pos_patch_setter", "layer_pos_head_vector_patch_setter", "layer_head_vector_patch_setter",
    "layer_head_pattern_patch_setter", "layer_head_pos_pattern_patch_setter",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every",
]


class CleanCacheError(ValueError):
    """A clean cache that does not pair with the corrupted run: another model's, or another batch's or length's."""


# ----------------------------------------------------------------------------- names and indices
def _model_name(model: GPT2, name: str) -> str:
    """A TransformerLens hook name, checked: this model's hooks have TransformerLens's names."""
    model.hook_point(name)  # raises KeyError, with close matches
    return name


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """A pandas DataFrame of every combination of ``range(m)`` per column (the last column varying fastest),
    as ``transformer_lens.patching.make_df_from_ranges``. Needs pandas (only for ``index_df``)."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover
        raise ImportError("index data frames need pandas: pip install pandas") from e
    return pd.DataFrame(list(itertools.product(*[range(m) for m in column_max_ranges])), columns=list(column_names))


def _axis_ranges(model: GPT2, corrupted_tokens: torch.Tensor, activation_name: str) -> dict[str, int]:
    n_heads = model.cfg.n_head
    if activation_name in ("k", "v") and getattr(model.cfg, "n_key_value_heads", None):
        n_heads = model.cfg.n_key_value_heads  # GPT-2 has none: as TransformerLens, for configs that do
    T = corrupted_tokens.shape[-1]
    return {"layer": model.cfg.n_layer, "pos": T, "head_index": n_heads, "head": n_heads, "src_pos": T, "dest_pos": T}


def _clean_activation(clean_cache, name: str, tl_name: str) -> torch.Tensor:
    for key in dict.fromkeys((name, tl_name)):
        try:
            return clean_cache[key]
        except KeyError:
            pass
    layers = {int(m.group(1)) for k in _keys(clean_cache) if (m := re.match(r"blocks\.(\d+)\.", str(k)))}
    if layers and int(name.split(".")[1]) > max(layers):
        raise CleanCacheError(f"clean_cache has no activation {name!r}: it holds layers 0..{max(layers)} only, so it "
                              f"comes from another model (of {max(layers) + 1} layers?); make it with this model: "
                              "model.run_with_cache(clean_tokens)")
    raise KeyError(f"clean_cache has no activation {name!r}: make it with model.run_with_cache(clean_tokens) "
                   f"(every hook), or with names=[..., {name!r}]")


def _keys(clean_cache) -> list:
    try:
        return list(clean_cache.keys())
    except (AttributeError, TypeError):
        return []


def _check_clean(name: str, clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    """The clean activation must have the corrupted run's shape (a batch of 1 broadcasts, as in TransformerLens)."""
    if not isinstance(clean, torch.Tensor):
        raise CleanCacheError(f"clean_cache[{name!r}] is a {type(clean).__name__}, not a tensor: pass the cache "
                              "of model.run_with_cache(clean_tokens)")
    if clean.shape == corrupted.shape or (clean.ndim == corrupted.ndim and clean.shape[0] == 1
                                          and clean.shape[1:] == corrupted.shape[1:]):
        return
    axis = _pos_axis(name)
    positions = (2, 3) if axis == 2 else (1,)  # patterns [B, H, dest, src]; else [B, T, ...]
    widths = [i for i in range(1, corrupted.ndim) if i not in positions]
    if clean.ndim != corrupted.ndim or any(clean.shape[i] != corrupted.shape[i] for i in widths):
        why = "it comes from another model (other widths or head counts): make it with this model"
    elif clean.shape[axis] != corrupted.shape[axis]:
        why = (f"the clean tokens have {clean.shape[axis]} positions, the corrupted {corrupted.shape[axis]}: pad or "
               "trim the prompts to one length (patching pairs position p of one run with position p of the other)")
    else:
        why = (f"the clean batch has {clean.shape[0]} prompts, the corrupted {corrupted.shape[0]}: pair them one to "
               "one (or give one clean prompt, batch 1, for all)")
    raise CleanCacheError(f"clean_cache[{name!r}] has shape {tuple(clean.shape)}, the corrupted run's "
                          f"{tuple(corrupted.shape)}: {why}")


def _metric_value(patching_metric, logits: torch.Tensor, batched: bool, n: int = 1) -> list[float]:
    """The metric on n patches' logits ([n, B, T, V] if ``batched``, else [B, T, V] with n = 1), checked: one
    number per patch, else :class:`MetricError`."""
    if batched:
        values = check_metric_values(patching_metric(logits), n, "patching_metric (batched_metric=True)",
                                     "logits [n, B, T, V] -> [n]")
        if values.numel() != n:
            raise MetricError(f"patching_metric (batched_metric=True) returned shape {tuple(values.shape)} for {n} "
                              "patches: return one value per patch, [n] (reduce over the batch and positions)")
        return [float(v) for v in values.reshape(-1).tolist()]
    value = patching_metric(logits)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return [value.item()]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's scalars too
        return [float(value)]
    what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise MetricError(f"patching_metric returned {what} for one patch's logits {tuple(logits.shape)} [B, T, V]; it "
                      "must return a scalar (reduce over the batch, e.g. .mean()), or take many patches at once "
                      "with batched_metric=True: [n, B, T, V] -> [n]")


def _pos_axis(name: str) -> int:
    """The axis of an activation that is the (query) position: 2 for [B, H, dest, src] patterns, else 1."""
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


# ----------------------------------------------------------------------------- patch setters (TransformerLens's)
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]; activation [batch, pos, ...]: position pos taken from the clean run."""
    assert len(index) == 2
    layer, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head_index]; activation [batch, pos, head_index, ...] (q, k, v, z, result)."""
    assert len(index) == 3
    layer, pos, head_index = index
    corrupted_activation[:, pos, head_index] = clean_activation[:, pos, head_index]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; activation [batch, pos, head_index, ...]: the head at every position."""
    assert len(index) == 2
    layer, head_index = index
    corrupted_activation[:, :, head_index] = clean_activation[:, :, head_index]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; activation [batch, head_index, dest_pos, src_pos] (scores, patterns)."""
    assert len(index) == 2
    layer, head_index = index
    corrupted_activation[:, head_index, :, :] = clean_activation[:, head_index, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos]; activation [batch, head_index, dest_pos, src_pos]."""
    assert len(index) == 3
    layer, head_index, dest_pos = index
    corrupted_activation[:, head_index, dest_pos, :] = clean_activation[:, head_index, dest_pos, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos, src_pos]; activation [batch, head_index, dest_pos, src_pos]."""
    assert len(index) == 4
    layer, head_index, dest_pos, src_pos = index
    corrupted_activation[:, head_index, dest_pos, src_pos] = clean_activation[:, head_index, dest_pos, src_pos]
    return corrupted_activation


# ----------------------------------------------------------------------------- the batched engine
LOGIT_SHARE = 4  # the logits computed at once take at most 1/LOGIT_SHARE of the memory budget
PATCH_SHARE = 4  # patched activations kept between planning and running: 1/PATCH_SHARE of it (the rest are recomputed)


def _replace_rows(start: int, stop: int, value: torch.Tensor):
    """A hook that puts ``value`` in rows start:stop of the activation."""
    def hook(act, hook):
        if start == 0 and stop == act.shape[0]:
            return value.to(act.dtype)
        return torch.cat([act[:start], value.to(act.dtype), act[stop:]])
    return hook


class _Patch:
    __slots__ = ("i", "index", "name", "layer", "start")

    def __init__(self, i, index, name, layer):
        self.i, self.index, self.name, self.layer, self.start = i, index, name, layer, None


class _PatchRun:
    """The patched runs of one call, on the engine core (:class:`minigpt2.engine.Core`: its blocks, its
    chunking rule, its unembedding): the corrupted run once, then the patches in chunks of one start
    position s, each patch B rows that join the batch at its block with the corrupted run's keys and values
    before s (a KV-cache layer, :func:`minigpt2.engine.prefix_kv`)."""

    def __init__(self, model: GPT2, tokens: torch.Tensor, clean_cache, patching_metric, patch_setter: PatchSetter,
                 names: dict[str, str], batched_metric: bool, logit_positions, max_rows: int | None):
        self.model, self.core, self.L = model, Core(model), model.cfg.n_layer
        self.B, self.T = tokens.shape
        self.metric, self.setter, self.batched, self.max_rows = patching_metric, patch_setter, batched_metric, max_rows
        self.lp = self._logit_positions(logit_positions)
        L = self.L
        wanted = ([f"blocks.{l}.hook_resid_pre" for l in range(L)]
                  + [f"blocks.{l}.attn.hook_{kv}" for l in range(L) for kv in "kv"] + sorted(names))
        self.corrupted_logits, self.cache = model.run_with_cache(tokens, names=list(dict.fromkeys(wanted)))
        self.clean = {n: _clean_activation(clean_cache, n, names[n]) for n in sorted(names)}  # a missing one first
        for n, clean in self.clean.items():
            _check_clean(n, clean, self.cache[n])
            self.clean[n] = clean.to(model.device)
        self.act_per_token = max((self.cache[n].numel() // (self.B * self.T) for n in names), default=0)
        self.stored: dict[int, torch.Tensor] = {}  # patched activations kept from planning, by patch
        self._nan: torch.Tensor | None = None

    def _logit_positions(self, logit_positions) -> list[int] | None:
        """The positions the metric reads, sorted, counted from 0; None: every position."""
        if logit_positions is None:
            return None
        T = self.T
        given = torch.as_tensor(logit_positions).reshape(-1).tolist()
        if not given or any(not -T <= int(p) < T for p in given):
            raise ValueError(f"logit_positions must be positions of the {T}-token prompts (negative ones count from "
                             f"the end), got {logit_positions!r}")
        return sorted({int(p) % T for p in given})

    # --- the patched activations ---------------------------------------------------------------
    def patched(self, p: _Patch) -> torch.Tensor:
        """The setter applied to (a copy of) the corrupted run's activation, checked."""
        if p.i in self.stored:
            return self.stored[p.i]
        act = self.cache[p.name]
        out = self.setter(act.clone(), p.index, self.clean[p.name])
        if out is None:
            raise TypeError("patch_setter returned None: return the patched activation (in TransformerLens an edit "
                            "in place without a return is lost whenever activations require grad, its default)")
        if not isinstance(out, torch.Tensor) or out.shape != act.shape:
            raise ValueError(f"patch_setter returned {type(out).__name__} of shape "
                             f"{tuple(getattr(out, 'shape', ()))} for {p.name} at index {p.index}; expected the "
                             f"activation's shape {tuple(act.shape)}")
        return out

    def plan(self, patches: list[_Patch]) -> None:
        """Each patch's start: the first position where its activation differs from the corrupted one (None:
        nowhere the metric reads). Patched activations are kept while they fit a share of the memory budget."""
        room = memory_budget(self.model.device) // PATCH_SHARE
        for p in patches:
            act, out = self.cache[p.name], self.patched(p)
            axis = _pos_axis(p.name)
            differs = (out != act).movedim(axis, 0).reshape(act.shape[axis], -1).any(dim=1)
            first = int(differs.float().argmax()) if bool(differs.any()) else None
            if first is not None and self.lp is not None and first > self.lp[-1]:
                first = None  # changes only positions the metric does not read
            p.start = first
            size = out.numel() * out.element_size()
            if first is not None and size <= room:
                self.stored[p.i] = out
                room -= size

    def chunks(self, patches: list[_Patch]) -> list[list[_Patch]]:
        """The patches that change something, by start position, in chunks of rows sized by the engine's rule
        (Core.rows: the memory budget, or ``max_rows``); in a chunk, by (layer, name, i)."""
        live = sorted((p for p in patches if p.start is not None), key=lambda p: (p.start, p.layer, p.name, p.i))
        cfg, B, T = self.model.cfg, self.B, self.T
        per_token = 4 * (6 * cfg.d_model + 2 * cfg.d_mlp + 3 * cfg.n_head * T + self.act_per_token)
        chunks: list[list[_Patch]] = []
        for s, group in itertools.groupby(live, key=lambda p: p.start):
            group = list(group)
            n = max(1, self.core.rows(per_token * (T - s), at_least=B, max_rows=self.max_rows) // B)
            chunks += [group[i:i + n] for i in range(0, len(group), n)]
        return chunks

    # --- the blocks --------------------------------------------------------------------------------
    def prefix(self, l: int, s: int, n: int):
        """The corrupted run's keys and values of block l before position s, for n patches' rows (a KV-cache
        layer), or None when s is 0."""
        if not s:
            return None
        return prefix_kv(self.cache[f"blocks.{l}.attn.hook_k"][:, :s], self.cache[f"blocks.{l}.attn.hook_v"][:, :s], n)

    def block_rows(self, l: int, x: torch.Tensor, s: int, hooks) -> torch.Tensor:
        """Block l on rows x [N, T - s, d_model] (positions s..; the corrupted keys and values before s)."""
        n = x.shape[0] // self.B
        return self.core.block(l, x, n, kv=self.prefix(l, s, n), hooks=hooks)

    def last_block_at(self, x: torch.Tensor, s: int, sel: list[int]) -> torch.Tensor:
        """The last block on rows x [N, T - s, d_model] that it does not patch, at positions s + sel only: keys
        and values at every position, queries, W_O and the MLP at those: [N, len(sel), d_model]. The keys of
        the other positions go into the KV-cache layer, the block appends those of ``sel``; the mask follows
        that order of keys."""
        l, n, dev = self.L - 1, x.shape[0] // self.B, x.device
        others = sorted(set(range(x.shape[1])) - set(sel))
        k, v = self.core.keys_values(l, x[:, others])
        if s:
            before_k, before_v = (self.cache[f"blocks.{l}.attn.hook_{kv}"][:, :s].repeat(n, 1, 1, 1) for kv in "kv")
            k, v = torch.cat([before_k, k], dim=1), torch.cat([before_v, v], dim=1)
        key_pos = torch.tensor(list(range(s)) + [s + j for j in others + sel], device=dev)
        query_pos = torch.tensor([s + j for j in sel], device=dev)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, len(sel), T]
        return self.core.block(l, x[:, sel], n, kv=prefix_kv(k, v), mask=mask)

    def joiners(self, joining: list[_Patch], l: int, s: int, offset: int):
        """The rows of patches that start at block l (the corrupted resid_pre, repeated) and the hooks that put their
        patched activations in place, for rows counted from ``offset``."""
        rows = self.cache[f"blocks.{l}.hook_resid_pre"][:, s:].repeat(len(joining), 1, 1)
        hooks = []
        for name, members in itertools.groupby(joining, key=lambda p: p.name):
            value = torch.cat([self.patched(p).narrow(_pos_axis(name), s, self.T - s) for p in members])
            hooks.append((name, _replace_rows(offset, offset + value.shape[0], value)))
            offset += value.shape[0]
        return rows, hooks

    def final_residual(self, chunk: list[_Patch]) -> tuple[torch.Tensor, bool]:
        """The final residual stream of a chunk's patches (one start s), [n, B, T - s, d_model] in chunk order;
        ``narrowed`` (second value): [n, B, k, d_model] at the k logit positions >= s only."""
        s, L = chunk[0].start, self.L
        sel = None if self.lp is None else [q - s for q in self.lp if q >= s]
        x, narrowed = None, False
        for l in range(chunk[0].layer, L):
            joining = [p for p in chunk if p.layer == l]
            # With logit positions, the last block runs at those positions only, for the rows patched before it.
            shortcut = l == L - 1 and sel is not None and len(sel) < self.T - s and x is not None
            offset = 0 if shortcut or x is None else x.shape[0]
            rows, hooks = self.joiners(joining, l, s, offset) if joining else (None, [])
            if shortcut:
                parts = [self.last_block_at(x, s, sel)]
                if rows is not None:
                    parts.append(self.block_rows(l, rows, s, hooks)[:, sel])
                x, narrowed = torch.cat(parts), True
            else:
                if rows is not None:
                    x = rows if x is None else torch.cat([x, rows])
                x = self.block_rows(l, x, s, hooks)
        return x.view(len(chunk), self.B, x.shape[1], x.shape[-1]), narrowed

    # --- logits and the metric ---------------------------------------------------------------------
    def nan_buffer(self, n: int) -> torch.Tensor:
        """[n, B, T, V] of NaN but at the logit positions (which every use overwrites): reused between calls."""
        if self._nan is None or self._nan.shape[0] < n:
            self._nan = self.corrupted_logits.new_full((n, *self.corrupted_logits.shape), float("nan"))
        return self._nan[:n]

    def metric_inputs(self, x: torch.Tensor, s: int, narrowed: bool = False):
        """The logits of n patches from their residual stream x [n, B, T - s, d_model] at positions s..
        (``narrowed``: [n, B, k, d_model] at the k logit positions >= s): one [n, B, T, V] tensor with
        batched_metric or logit_positions, else n fresh [B, T, V] tensors (one each: a big fresh tensor costs
        a page fault per 4 KiB, ones of a patch's size are recycled by the allocator)."""
        n, corrupted = x.shape[0], self.corrupted_logits
        if self.lp is not None:
            buf = self.nan_buffer(n)
            before, after = [q for q in self.lp if q < s], [q for q in self.lp if q >= s]
            if before:
                buf[:, :, before] = corrupted[:, before]
            if after:
                buf[:, :, after] = self.core.logits(x if narrowed else x[:, :, [q - s for q in after]])
            return buf
        outs = [corrupted.new_empty(n, *corrupted.shape)] if self.batched else \
            [corrupted.new_empty(corrupted.shape) for _ in range(n)]
        for out in outs:
            if s:
                out[..., :s, :] = corrupted[:, :s]
        for i, block in self.core.logit_blocks(x):  # [n, B, T - s, k]
            cols = slice(i, i + block.shape[-1])
            if self.batched:
                outs[0][:, :, s:, cols] = block
            else:
                for out, b in zip(outs, block):
                    out[:, s:, cols] = b
        return outs[0] if self.batched else outs

    def evaluate(self, logits, group: list[_Patch], results: list) -> None:
        """The metric of each patch of ``group`` on its logits, into ``results``."""
        if self.batched:
            for p, v in zip(group, _metric_value(self.metric, logits, True, len(group))):
                results[p.i] = v
        else:
            for j, p in enumerate(group):
                results[p.i] = _metric_value(self.metric, logits[j], False)[0]

    def corrupted_value(self) -> float:
        """The metric on the corrupted run: what patches that change nothing get, and a check of the metric's
        contract before any patched run."""
        if self.lp is None:
            logits = self.corrupted_logits[None]
        else:
            logits = self.nan_buffer(1)
            logits[:, :, self.lp] = self.corrupted_logits[:, self.lp]
        return _metric_value(self.metric, logits if self.batched else logits[0], self.batched)[0]

    def run(self, patches: list[_Patch], progress: bool) -> list[float]:
        """Every patch's value, in the order of ``patches`` (``p.i``)."""
        self.plan(patches)
        results: list[float | None] = [None] * len(patches)
        value = self.corrupted_value()
        for p in patches:
            if p.start is None:
                results[p.i] = value
        per_logit_row = 4 * self.corrupted_logits.shape[-1] * self.T  # the NaN buffer is full-length too
        with self.core.precision():
            for chunk in progress_bar(self.chunks(patches), "activation patching", "chunk", progress):
                x, narrowed = self.final_residual(chunk)  # rows: patches sorted by (layer, name, i), as `chunk` is
                step = max(1, self.core.rows(LOGIT_SHARE * per_logit_row, at_least=self.B) // self.B)
                for i in range(0, len(chunk), step):
                    logits = self.metric_inputs(x[i:i + step], chunk[0].start, narrowed)
                    self.evaluate(logits, chunk[i:i + step], results)
                    del logits
        return results


def _check_args(model, clean_cache, patching_metric, patch_setter, max_rows) -> None:
    """Wrong types, named up front (TypeError) rather than deep inside the batched forward."""
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a minigpt2 GPT2 (e.g. load_pretrained(path)), got {type(model).__name__}")
    if not hasattr(clean_cache, "__getitem__") or isinstance(clean_cache, (str, bytes, torch.Tensor)):
        raise TypeError(f"clean_cache must map hook names to activations (the cache of "
                        f"model.run_with_cache(clean_tokens)), got {type(clean_cache).__name__}")
    if not callable(patching_metric):
        raise TypeError(f"patching_metric must be a callable logits [B, T, V] -> scalar, got "
                        f"{type(patching_metric).__name__}")
    if not callable(patch_setter):
        raise TypeError(f"patch_setter must be a callable (corrupted_activation, index, clean_activation) -> "
                        f"activation, got {type(patch_setter).__name__}")
    check_max_rows(max_rows)


def _indices(model: GPT2, corrupted_tokens, activation_name: str, index_axis_names, index_df, return_index_df: bool):
    """The patches' indices, the output's shape, and the index DataFrame (made from the axes when asked)."""
    if index_df is not None:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        return [row[1].to_list() for row in index_df.iterrows()], [len(index_df)], index_df
    if index_axis_names is None:
        raise ValueError("give index_axis_names (axes to iterate over, e.g. ('layer', 'pos')) or index_df")
    ranges_by_axis = _axis_ranges(model, torch.as_tensor(corrupted_tokens), activation_name)
    unknown = [a for a in index_axis_names if a not in ranges_by_axis]
    if unknown:
        raise ValueError(f"unknown index axis names {unknown}; choose from {sorted(ranges_by_axis)}")
    shape = [ranges_by_axis[a] for a in index_axis_names]
    indices = [list(t) for t in itertools.product(*[range(m) for m in shape])]
    return indices, shape, make_df_from_ranges(shape, index_axis_names) if return_index_df else None


def _refuse_hooks(model: GPT2) -> None:
    hooked = [name for name, hp in model.hook_dict.items() if hp.active]
    if hooked:
        raise RuntimeError(f"activation patching runs blocks on part of the batch and positions, so the model's "
                           f"own hooks would see partial activations; active hooks: {', '.join(hooked[:3])}"
                           f"{' ...' if len(hooked) > 3 else ''}. Remove them (model.reset_hooks()) first")


def _patches(model: GPT2, indices: list[list], activation_name: str) -> tuple[list[_Patch], dict[str, str]]:
    """One patch per index, at the hook ``get_act_name(activation_name, layer=index[0])``, which must be inside a
    block; and each hook's name as TransformerLens spells it (the clean cache may hold either)."""
    patches, tl_names = [], {}
    for i, index in enumerate(indices):
        tl_name = get_act_name(activation_name, layer=index[0])
        name = _model_name(model, tl_name)
        tl_names[name] = tl_name
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None or not 0 <= int(m.group(1)) < model.cfg.n_layer:
            raise ValueError(f"{name!r} is not an activation inside a block: patching works on blocks.<layer>.* "
                             "hooks (as in TransformerLens, the first index is the layer)")
        patches.append(_Patch(i, index, name, int(m.group(1))))
    return patches, tl_names


def generic_activation_patch(
    model: GPT2,
    corrupted_tokens: torch.Tensor,
    clean_cache: Mapping[str, torch.Tensor],
    patching_metric: Callable[[torch.Tensor], torch.Tensor],
    patch_setter: PatchSetter,
    activation_name: str,
    index_axis_names: Sequence[AxisNames] | None = None,
    index_df=None,
    return_index_df: bool = False,
    *,
    batched_metric: bool = False,
    logit_positions: Sequence[int] | int | None = None,
    max_rows: int | None = None,
    progress: bool = False,
):
    """Patch one activation at a time from the clean run into the corrupted run, and measure each.

    TransformerLens's ``generic_activation_patch``, batched (see the module docstring). For every index
    (a row of ``index_df``, or every combination of ``index_axis_names`` over their ranges: layer ->
    n_layer, pos / src_pos / dest_pos -> the sequence length, head / head_index -> n_head), the
    activation ``get_act_name(activation_name, layer=index[0])`` of a forward on ``corrupted_tokens``
    becomes ``patch_setter(corrupted_activation, index, clean_activation)``, and the patch's value is
    ``patching_metric(logits [B, T, V])``.

    Args:
        model: the model (it must carry no hooks).
        corrupted_tokens: [B, T] token ids of the corrupted run.
        clean_cache: the clean run's activations by hook name ([B, ...], the same B).
        patching_metric: logits [B, T, V] -> a scalar (``batched_metric``: [n, B, T, V] -> [n]).
        patch_setter: ``(corrupted_activation, index, clean_activation) -> patched activation`` (it may
            edit its first argument in place, a copy, and return it).
        activation_name: the activation's short name ("resid_pre", "z", "pattern", ...).
        index_axis_names: the axes to iterate over fully (the first is the layer); or
        index_df: a pandas DataFrame of indices, one patch per row (the output is then flat).
        return_index_df: also return the DataFrame of indices (needs pandas).
        batched_metric: call the metric on many patches' logits at once (see the module docstring).
        logit_positions: the only positions the metric reads; the others are NaN in its input.
        max_rows: rows (patches x B) per chunk of the batched forward; default: what the engine's memory
            budget allows (minigpt2.engine.memory_budget: 1 GiB on a CPU, MINIGPT2_MEMORY_BUDGET).
        progress: a tqdm bar over chunks.

    Returns:
        float32 [*ranges of index_axis_names] (or [len(index_df)]), and the index DataFrame if asked.
    """
    _check_args(model, clean_cache, patching_metric, patch_setter, max_rows)
    indices, shape, index_df = _indices(model, corrupted_tokens, activation_name, index_axis_names, index_df,
                                        return_index_df)
    _refuse_hooks(model)
    tokens = model.as_tokens(corrupted_tokens)
    model.check_tokens(tokens)
    patches, tl_names = _patches(model, indices, activation_name)
    with torch.no_grad():
        values = _PatchRun(model, tokens, clean_cache, patching_metric, patch_setter, tl_names, batched_metric,
                           logit_positions, max_rows).run(patches, progress) if patches else []
    out = torch.tensor(values, dtype=torch.get_default_dtype()).reshape(shape).to(model.device)
    return (out, index_df) if return_index_df else out


# ----------------------------------------------------------------------------- the named functions
def _named(patch_setter, activation_name, index_axis_names, doc):
    fn = partial(generic_activation_patch, patch_setter=patch_setter, activation_name=activation_name,
                 index_axis_names=index_axis_names)
    fn.__doc__ = (f"{doc}\n\n    ``fn(model, corrupted_tokens, clean_cache, patching_metric, **options)``; "
                  "see generic_activation_patch for the options.\n    ")
    return fn


get_act_patch_resid_pre = _named(layer_pos_patch_setter, "resid_pre", ("layer", "pos"),
                                 "The residual stream entering each block, by position: [n_layers, pos].")
get_act_patch_resid_mid = _named(layer_pos_patch_setter, "resid_mid", ("layer", "pos"),
                                 "The residual stream between attention and MLP, by position: [n_layers, pos].")
get_act_patch_attn_out = _named(layer_pos_patch_setter, "attn_out", ("layer", "pos"),
                                "Each attention layer's output, by position: [n_layers, pos].")
get_act_patch_mlp_out = _named(layer_pos_patch_setter, "mlp_out", ("layer", "pos"),
                               "Each MLP layer's output, by position: [n_layers, pos].")
get_act_patch_attn_head_out_by_pos = _named(layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"),
                                            "Each head's output z, by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_q_by_pos = _named(layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"),
                                          "Each head's queries, by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_k_by_pos = _named(layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"),
                                          "Each head's keys, by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_v_by_pos = _named(layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"),
                                          "Each head's values, by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_pattern_by_pos = _named(
    layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"),
    "Each head's attention pattern, by destination position: [n_layers, n_heads, dest_pos].")
get_act_patch_attn_head_pattern_dest_src_pos = _named(
    layer_head_dest_src_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos", "src_pos"),
    "Each entry of each head's attention pattern: [n_layers, n_heads, dest_pos, src_pos].")
get_act_patch_attn_head_out_all_pos = _named(layer_head_vector_patch_setter, "z", ("layer", "head"),
                                             "Each head's output z at every position: [n_layers, n_heads].")
get_act_patch_attn_head_q_all_pos = _named(layer_head_vector_patch_setter, "q", ("layer", "head"),
                                           "Each head's queries at every position: [n_layers, n_heads].")
get_act_patch_attn_head_k_all_pos = _named(layer_head_vector_patch_setter, "k", ("layer", "head"),
                                           "Each head's keys at every position: [n_layers, n_heads].")
get_act_patch_attn_head_v_all_pos = _named(layer_head_vector_patch_setter, "v", ("layer", "head"),
                                           "Each head's values at every position: [n_layers, n_heads].")
get_act_patch_attn_head_pattern_all_pos = _named(layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"),
                                                 "Each head's whole attention pattern: [n_layers, n_heads].")


def _pad_heads(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, like.size(-1) - x.size(-1)))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **options) -> torch.Tensor:
    """Every head at every position, for output, query, key, value and pattern: [5, n_layers, n_heads]."""
    out = get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric, **options)
    q = get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, metric, **options)
    k = get_act_patch_attn_head_k_all_pos(model, corrupted_tokens, clean_cache, metric, **options)
    v = get_act_patch_attn_head_v_all_pos(model, corrupted_tokens, clean_cache, metric, **options)
    pattern = get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, metric, **options)
    return torch.stack([out, q, _pad_heads(k, q), _pad_heads(v, q), pattern], dim=0)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **options) -> torch.Tensor:
    """Every head by position, for output, query, key, value and pattern (by destination): [5, n_layers, pos, n_heads]."""
    out = get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric, **options)
    q = get_act_patch_attn_head_q_by_pos(model, corrupted_tokens, clean_cache, metric, **options)
    k = get_act_patch_attn_head_k_by_pos(model, corrupted_tokens, clean_cache, metric, **options)
    v = get_act_patch_attn_head_v_by_pos(model, corrupted_tokens, clean_cache, metric, **options)
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **options)
    return torch.stack([out, q, _pad_heads(k, q), _pad_heads(v, q), pattern.permute(0, 2, 1)], dim=0)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **options) -> torch.Tensor:
    """The residual stream entering each block, each attention layer's and each MLP's output, by position:
    [3, n_layers, pos]."""
    return torch.stack([get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric, **options),
                        get_act_patch_attn_out(model, corrupted_tokens, clean_cache, metric, **options),
                        get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, metric, **options)], dim=0)
