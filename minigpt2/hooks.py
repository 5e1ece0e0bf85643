"""Hook points: identity modules placed where an activation is made, with TransformerLens's hook API.

A forward hook is ``fn(activation, hook) -> tensor | None``: returning a tensor replaces the
activation (the next hook on the same point sees the replacement), returning None leaves it.
A backward hook is ``fn(grad, hook) -> tensor | None``: ``grad`` is the gradient with respect to
the activation (after the forward hooks); a returned tensor replaces the gradient that flows
on to what made the activation. As in TransformerLens, every backward hook of a point sees the
same gradient, and the last one that returns a tensor decides; the backward hooks are those on
the point when the forward ran.

``with model.hooks(fwd_hooks, bwd_hooks):`` adds hooks for the block's duration and removes them
in ``finally`` (unless ``reset_hooks_end=False``); ``model.add_hook`` adds them until
``model.reset_hooks()`` (permanent ones until ``reset_hooks(including_permanent=True)``).

A hook point with any hook on it, forward or backward, is *active*: the model reads that to decide
whether to compute expensive activations (attention patterns, per-head results, per-head inputs),
so a hook not asked for costs nothing.

TransformerLens's switches (``cfg.use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``,
``use_hook_mlp_in``, ``use_hook_tokens``; ``model.set_use_attn_result(True)`` ...) decide which hook
points are *live*, exactly as in TransformerLens: a name filter (``lambda n: ...``), a default
``run_with_cache()`` and ``cache.items()`` see only live points, and ``hook_dict`` / ``mod_dict`` list
what TransformerLens lists (every point, but ``hook_tokens`` only with ``use_hook_tokens``). With
``use_split_qkv_input`` or ``use_attn_in`` on, ln1's hooks are per head ([B, T, H, 1] and
[B, T, H, d_model]), as TransformerLens's. The switches never change what is computed: that is
still decided by what is hooked. Two differences from TransformerLens, both deliberate:

- A point named exactly (``fwd_hooks=[("blocks.0.attn.hook_result", fn)]``, ``add_hook(name, ...)``)
  fires whatever the switches say: you asked for it. (TransformerLens's hooks() silently never
  fires it, and its add_hook asserts.)
- A point that fires several times in one forward caches its last activation (as TransformerLens)
  and, with ``incl_bwd``, the *sum* of its gradients: d loss / d a change made at every call, which
  is what finite differences of a hook that edits it measure. TransformerLens calls ln1 three times
  per block (once per q, k, v input, in every setting) and caches one call's share.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Literal, Sequence, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
Direction = Literal["fwd", "bwd"]

# The per-head attention inputs ([B, T, H, d_model]): hooking them makes the model copy its attention
# input per head and run ln1 per head and per q/k/v, which makes ln1's hook_scale / hook_normalized
# [B, T, H, ...]. Live only with use_attn_in / use_split_qkv_input, off by default, as in TransformerLens.
PER_HEAD_INPUT_HOOKS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")

# The hook points each of TransformerLens's switches turns on (the last one or two parts of their names).
SWITCHED_HOOKS = {"attn.hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
                  "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
                  "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in", "hook_tokens": "use_hook_tokens"}
# TransformerLens creates hook_tokens only with use_hook_tokens; every other point always exists there.
UNLISTED_WHEN_OFF = ("use_hook_tokens",)


def switch_of(name: str) -> str | None:
    """The cfg switch a hook point's liveness depends on (None: always live)."""
    parts = name.split(".")
    return SWITCHED_HOOKS.get(".".join(parts[-2:])) or SWITCHED_HOOKS.get(parts[-1])


class HookError(TypeError, ValueError):
    """A hook given or behaving wrongly: an entry of fwd_hooks / bwd_hooks that is not (name or filter, fn),
    or a hook that returns a tensor of another shape, dtype or device than its activation. The message
    names the hook point (or the entry) and the fix."""


@dataclass
class LensHandle:
    """One hook on a hook point (TransformerLens's name for it)."""

    user_hook: HookFn
    is_permanent: bool = False
    context_level: int | None = None  # the ``model.hooks()`` block that added it; None: added by hand


class HookPoint(nn.Module):
    """Identity unless hooked. ``name`` is its module path, set by the owning model."""

    def __init__(self):
        super().__init__()
        self.name: str = ""
        self.switch: str | None = None  # the cfg switch that makes it live (set by the owning model)
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict = {}  # scratch space for hooks (TransformerLens's hook.ctx)

    @property
    def active(self) -> bool:
        """True when any hook, forward or backward, is on this point: the model then makes the activation."""
        return bool(self.fwd_hooks or self.bwd_hooks)

    @property
    def fns(self) -> list[HookFn]:
        """The forward hook functions, in order (read-only: add them with ``add_hook``)."""
        return [h.user_hook for h in self.fwd_hooks]

    def add_hook(self, hook: HookFn, dir: Direction = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        if not callable(hook):
            raise HookError(f"the hook for {self.name or 'this hook point'} is a {type(hook).__name__}, not a "
                            "function: a hook is fn(activation, hook) -> tensor or None")
        handles = self._handles(dir)
        handle = LensHandle(hook, is_permanent, level)
        if prepend:
            handles.insert(0, handle)
        else:
            handles.append(handle)

    def add_perma_hook(self, hook: HookFn, dir: Direction = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def has_hooks(self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = True,
                  level: int | None = None) -> bool:
        handles = self.fwd_hooks + self.bwd_hooks if dir == "both" else self._handles(dir)
        return any((including_permanent or not h.is_permanent) and (level is None or h.context_level == level)
                   for h in handles)

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False,
                     level: int | None = None) -> None:
        """Remove this point's hooks in ``dir``: all of them with ``including_permanent``, else the
        non-permanent ones (of context ``level`` only, if given)."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")

        def keep(h: LensHandle) -> bool:
            if including_permanent:
                return False
            return h.is_permanent or (level is not None and h.context_level != level)

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        """The layer index of a hook named ``blocks.{layer}....``."""
        if not self.name:
            raise ValueError("this hook point has no name (it is not part of a model)")
        parts = self.name.split(".")
        try:
            return int(parts[1])
        except (IndexError, ValueError):
            raise ValueError(f"{self.name} is not inside a layer (blocks.{{layer}}....)") from None

    def _handles(self, dir: str) -> list[LensHandle]:
        if dir == "fwd":
            return self.fwd_hooks
        if dir == "bwd":
            return self.bwd_hooks
        raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fwd_hooks:
            for h in tuple(self.fwd_hooks):  # a hook may add or remove hooks
                out = h.user_hook(x, self)
                if out is not None:
                    self._check(out, x, "returned")
                    x = out
        if self.bwd_hooks and torch.is_grad_enabled() and x.requires_grad:
            # A node of its own, so that the hook sees the gradient with respect to this activation
            # only (the same tensor may be another point's too: resid_post of one layer is resid_pre
            # of the next) and what it returns flows on to what made the activation.
            x = x.view_as(x)
            x.register_hook(partial(self._backward, tuple(self.bwd_hooks)))
        return x

    def _backward(self, handles: tuple[LensHandle, ...], grad: torch.Tensor):
        new = None
        for h in handles:
            out = h.user_hook(grad, self)
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]
            if out is not None:
                self._check(out, grad, "returned a gradient of")
                new = out
        return new

    def _check(self, out, x: torch.Tensor, what: str) -> None:
        if not isinstance(out, torch.Tensor):
            raise HookError(f"hook on {self.name} returned {type(out).__name__}; return a tensor or None")
        if out.shape != x.shape:
            raise HookError(f"hook on {self.name} {what} shape {tuple(out.shape)}, expected {tuple(x.shape)}: "
                            "return a tensor of the activation's shape (edit a clone of it)")
        if out.dtype != x.dtype and not (out.is_floating_point() and x.is_floating_point()
                                         and torch.is_autocast_enabled(x.device.type)):  # autocast mixes floats
            raise HookError(f"hook on {self.name} {what} dtype {str(out.dtype).removeprefix('torch.')}, the activation "
                            f"is {str(x.dtype).removeprefix('torch.')}: return out.to(activation.dtype)")
        if out.device != x.device:
            raise HookError(f"hook on {self.name} {what} a tensor on {out.device}, the activation is on {x.device}: "
                            "return out.to(activation.device)")

    def extra_repr(self) -> str:
        bits = [self.name] if self.name else []
        if self.fwd_hooks:
            bits.append(f"{len(self.fwd_hooks)} fwd")
        if self.bwd_hooks:
            bits.append(f"{len(self.bwd_hooks)} bwd")
        return ", ".join(bits)


def names_to_filter(names: NamesFilter) -> Callable[[str], bool]:
    """TransformerLens's names_filter as a function: None (everything), a name, a list of names, or a function."""
    if names is None:
        return lambda name: True
    if isinstance(names, str):
        return lambda name: name == names
    if callable(names):
        return names
    if isinstance(names, Iterable):
        wanted = set(names)
        return lambda name: name in wanted
    raise TypeError(f"names_filter must be a hook name, a list of names or a function name -> bool, got {names!r}")


def _count_call(calls: dict[str, list[int]], name: str, is_backward: bool) -> bool:
    """Pair a caching hook's backward calls with its forward calls: True when this gradient is to be added
    to one already cached in the same backward pass (a point that fired several times in one forward)."""
    count = calls.setdefault(name, [0, 0])
    if not is_backward:
        if count[1]:  # a new forward after a backward pass: start counting again
            count[:] = [0, 0]
        count[0] += 1
        return False
    add = count[1] > 0
    count[1] += 1
    if count[1] >= count[0]:  # every call's gradient seen (or no forward recorded: TransformerLens's overwrite)
        count[:] = [0, 0]
    return add


def check_hook_list(hooks, what: str) -> list[tuple]:
    """``hooks`` as a list of (name or filter, fn) pairs; a HookError naming the bad entry and the fix otherwise."""
    if isinstance(hooks, dict):
        raise HookError(f"{what} is a dict; it is a list of (name, fn) pairs: pass list({what}.items())")
    if isinstance(hooks, tuple) and len(hooks) == 2 and not isinstance(hooks[0], (tuple, list)) \
            and callable(hooks[1]):
        raise HookError(f"{what} is one (name, fn) pair; it is a list of them: pass [{what}]")
    try:
        hooks = list(hooks)
    except TypeError:
        raise HookError(f"{what} must be a list of (name or filter, fn) pairs, got {type(hooks).__name__}") from None
    for i, entry in enumerate(hooks):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            got = repr(entry) if isinstance(entry, str) else f"{type(entry).__name__} of length " \
                f"{len(entry)}" if isinstance(entry, (tuple, list)) else type(entry).__name__
            raise HookError(f"{what}[{i}] is {got}: each entry is a pair (hook name or filter, fn(activation, hook)); "
                            "a name without its function does nothing")
        name, fn = entry
        if not (isinstance(name, str) or callable(name)):
            raise HookError(f"{what}[{i}]: the target {name!r} is neither a hook name nor a filter fn(name) -> bool")
        if not callable(fn):
            target = name if isinstance(name, str) else "the filtered points"
            raise HookError(f"{what}[{i}]: the hook for {target} is a {type(fn).__name__}, not a function "
                            "fn(activation, hook) -> tensor or None")
    return hooks


def lookup_hook(points: dict, name: str, listing: str):
    """``points[name]``, or a KeyError naming the closest names (and ``listing``, where every name is)."""
    if name not in points:
        close = difflib.get_close_matches(name, points, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see {listing} for all names"
        raise KeyError(f"no hook point named {name!r}{hint}")
    return points[name]


class HookedModule(nn.Module):
    """Mixin: names every HookPoint after its module path and manages hooks (TransformerLens's
    HookedRootModule API)."""

    def setup_hooks(self) -> None:
        self._all_modules: dict[str, nn.Module] = {}
        self._all_hooks: dict[str, HookPoint] = {}  # every point, live or not
        for name, module in self.named_modules():
            if name == "":
                continue
            self._all_modules[name] = module
            if isinstance(module, HookPoint):
                module.name = name
                module.switch = switch_of(name)
                self._all_hooks[name] = module
        self.context_level = 0
        self.is_caching = False

    setup = setup_hooks  # TransformerLens's name

    # ------------------------------------------------------------------ TransformerLens's switches
    def is_live(self, hp: HookPoint) -> bool:
        """Whether ``hp`` is on under the model's cfg switches (a module without them: always)."""
        switch = getattr(hp, "switch", None)
        return switch is None or bool(getattr(getattr(self, "cfg", None), switch, True))

    def _listed(self, hp: HookPoint) -> bool:
        return getattr(hp, "switch", None) not in UNLISTED_WHEN_OFF or self.is_live(hp)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Name -> HookPoint, as TransformerLens lists them (hook_tokens only with cfg.use_hook_tokens)."""
        return {n: hp for n, hp in self._all_hooks.items() if self._listed(hp)}

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Name -> submodule, hook points included (as hook_dict lists them)."""
        return {n: m for n, m in self._all_modules.items() if not isinstance(m, HookPoint) or self._listed(m)}

    def _set_switch(self, name: str, value: bool) -> None:
        if not hasattr(getattr(self, "cfg", None), name):
            raise AttributeError(f"this model's cfg has no {name} switch")
        setattr(self.cfg, name, value)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Toggle blocks.{l}.attn.hook_result [B, T, H, d_model], each head's write to the residual stream."""
        self._set_switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Toggle blocks.{l}.hook_q_input / _k_ / _v_ [B, T, H, d_model], each head's own q, k, v input
        (ln1's hooks are then per head)."""
        self._set_switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Toggle blocks.{l}.hook_mlp_in [B, T, d_model]."""
        self._set_switch("use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Toggle blocks.{l}.hook_attn_in [B, T, H, d_model] (ln1's hooks are then per head)."""
        self._set_switch("use_attn_in", use_attn_in)

    # ------------------------------------------------------------------ looking hook points up
    def hook_points(self):
        return self.hook_dict.values()

    def hook_point(self, name: str) -> HookPoint:
        """The point named ``name``, live or not (a point named exactly always fires)."""
        return lookup_hook(self._all_hooks, name, "model.hook_dict")

    def _resolve(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        """A name -> its point; a filter -> the live points whose names pass it (TransformerLens's switches)."""
        if isinstance(name, str):
            return [self.hook_point(name)]
        if callable(name):
            return [hp for n, hp in self._all_hooks.items() if self.is_live(hp) and name(n)]
        raise HookError(f"a hook's target must be a hook name or a function name -> bool, got {name!r}")

    # ------------------------------------------------------------------ adding and removing hooks
    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: Direction = "fwd",
                 is_permanent: bool = False, level: int | None = None, prepend: bool = False) -> None:
        """Add ``hook`` to the point ``name`` (or to every point whose name passes the filter) until
        ``reset_hooks()``."""
        for hp in self._resolve(name):
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: Literal["fwd", "bwd", "both"] = "both",
                            including_permanent: bool = False, level: int | None = None) -> None:
        for hp in self._all_hooks.values():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hp in self._all_hooks.values():
            hp.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: Literal["fwd", "bwd", "both"] = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """Remove every hook (but permanent ones, unless ``including_permanent``)."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    def list_hooks(self, name_filter: NamesFilter = None, dir: Literal["fwd", "bwd", "both"] = "both",
                   including_permanent: bool = True) -> dict[str, list[LensHandle]]:
        """The hooks on each point, by name; points without hooks are left out."""
        keep = names_to_filter(name_filter)
        out = {}
        for name, hp in self._all_hooks.items():
            if not keep(name):
                continue
            handles = (hp.fwd_hooks if dir in ("fwd", "both") else []) + (hp.bwd_hooks if dir in ("bwd", "both") else [])
            handles = [h for h in handles if including_permanent or not h.is_permanent]
            if handles:
                out[name] = handles
        return out

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
              bwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Add ``(name or name-filter, fn)`` hooks for the block's duration; they are removed in
        ``finally`` (even if adding a later one fails), unless ``reset_hooks_end=False``."""
        fwd_hooks, bwd_hooks = check_hook_list(fwd_hooks, "fwd_hooks"), check_hook_list(bwd_hooks, "bwd_hooks")
        self.context_level = getattr(self, "context_level", 0) + 1
        level = self.context_level
        try:
            for name, fn in fwd_hooks:
                for hp in self._resolve(name):
                    hp.add_hook(fn, dir="fwd", level=level)
            for name, fn in bwd_hooks:
                for hp in self._resolve(name):
                    hp.add_hook(fn, dir="bwd", level=level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=level)
            self.context_level -= 1

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs):
        """Forward with ``fwd_hooks`` and ``bwd_hooks`` (lists of ``(name or filter, fn)``) on.

        The backward hooks fire when the caller runs ``.backward()`` on the output (they are
        attached to this forward's graph); ``reset_hooks_end=False`` also leaves every hook on the
        model afterwards, until ``model.reset_hooks()``.
        """
        fwd_hooks, bwd_hooks = check_hook_list(fwd_hooks, "fwd_hooks"), check_hook_list(bwd_hooks, "bwd_hooks")
        if bwd_hooks and reset_hooks_end:
            logging.warning("WARNING: Hooks will be reset at the end of run_with_hooks. This removes the backward "
                            "hooks before a backward pass can occur.")
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*args, **kwargs)

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None, pos_slice=None,
                          detach: bool = True):
        """``(cache, fwd_hooks, bwd_hooks)``: hooks that save activations (and gradients, as
        ``<name>_grad``) into ``cache``; nothing is added to the model."""
        from .utils import Slice

        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)
        names = self._cached_names(names_filter)
        calls: dict[str, list[int]] = {}  # name -> [forward calls, gradients seen of them]

        def save(x: torch.Tensor, hook: HookPoint, is_backward: bool = False):
            key = hook.name + ("_grad" if is_backward else "")
            add = _count_call(calls, hook.name, is_backward)
            x = x.detach() if detach or is_backward else x
            if device is not None:
                x = x.to(device)
            if remove_batch_dim:
                x = x[0]
            if pos_slice.mode != "identity":
                # [.., T, H, d] hooks have positions third from last, all others second from last
                # (the query position for attention scores and patterns)
                dim = -3 if hook.name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")
                                               + PER_HEAD_INPUT_HOOKS) else -2
                if x.ndim >= -dim:
                    x = pos_slice.apply(x, dim=dim)
            cache[key] = cache[key] + x if add else x

        fwd = [(n, partial(save, is_backward=False)) for n in names]
        bwd = [(n, partial(save, is_backward=True)) for n in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None) -> dict:
        """Add hooks that save activations (and, with ``incl_bwd``, gradients as ``<name>_grad``) into ``cache``
        (returned) on every forward until ``model.reset_hooks()``; nothing runs here (TransformerLens's)."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for name, fn in fwd:
            self.hook_point(name).add_hook(fn, dir="fwd")
        for name, fn in bwd:
            self.hook_point(name).add_hook(fn, dir="bwd")
        self.is_caching = True
        return cache

    def cache_all(self, cache: dict | None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False):
        """Deprecated in TransformerLens: add_caching_hooks of every live point."""
        logging.warning("cache_all is deprecated and will eventually be removed, use add_caching_hooks or run_with_cache")
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(self, cache: dict | None, names: NamesFilter, incl_bwd: bool = False, device=None,
                   remove_batch_dim: bool = False):
        """Deprecated in TransformerLens: add_caching_hooks of ``names``."""
        logging.warning("cache_some is deprecated and will eventually be removed, use add_caching_hooks or "
                        "run_with_cache")
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    def _cached_names(self, names_filter: NamesFilter) -> list[str]:
        """Names given exactly (each must exist), or the live points a filter (None: all) selects."""
        if isinstance(names_filter, str):
            return [self.hook_point(names_filter).name]
        if names_filter is not None and not callable(names_filter) and isinstance(names_filter, Iterable):
            return [self.hook_point(n).name for n in names_filter]  # an unknown name raises, with a suggestion
        keep = names_to_filter(names_filter)
        return [n for n, hp in self._all_hooks.items() if self.is_live(hp) and keep(n)]

    def run_with_cache(self, *args, names_filter: NamesFilter = None, names: NamesFilter = None,
                       device=None, remove_batch_dim: bool = False, incl_bwd: bool = False,
                       reset_hooks_end: bool = True, clear_contexts: bool = False, pos_slice=None,
                       return_cache_object: bool = True, detach: bool = True, **kwargs):
        """Run forward and return ``(output, cache)``; ``cache`` holds each cached hook's activation.

        ``names_filter`` (or ``names``, the same thing): a hook name, a list of names, a function
        ``fn(name) -> bool`` (applied to the live points), or None for every live point: what
        TransformerLens caches under the same switches (no hook_result unless use_attn_result, no
        per-head inputs unless use_split_qkv_input / use_attn_in, ...). Every other keyword goes to
        the forward (``attention_mask``, ``return_type``, ``stop_at_layer``, ...).

        ``cache`` is an :class:`~minigpt2.cache.ActivationCache` (``return_cache_object=False``: a
        dict). ``remove_batch_dim`` drops the batch axis of a one-row batch; ``device`` moves what is
        cached; ``pos_slice`` keeps only those positions. ``incl_bwd``: also runs ``output.backward()``
        (the output must be a scalar, e.g. ``return_type="loss"``) and caches each hook's gradient as
        ``"<name>_grad"``. Activations are detached unless ``detach=False``.
        """
        if names is not None and names_filter is not None:
            raise TypeError("give names_filter or names (the same thing), not both")
        cache_dict, fwd, bwd = self.get_caching_hooks(names_filter if names is None else names, incl_bwd, device,
                                                      remove_batch_dim=remove_batch_dim, pos_slice=pos_slice,
                                                      detach=detach)
        self.is_caching = True
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*args, **kwargs)
            if incl_bwd:
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise ValueError("incl_bwd=True runs output.backward(), which needs a scalar output: "
                                     "pass return_type='loss'")
                out.backward()
        self.is_caching = False
        if not return_cache_object:
            return out, cache_dict
        from .cache import ActivationCache

        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
