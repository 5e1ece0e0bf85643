"""Hook points: identity modules placed where an activation is made.

A hook is a function ``fn(tensor, hook) -> tensor | None``; returning a tensor
replaces the activation, returning None leaves it. Hooks are added for the
duration of a ``with model.hooks(...)`` block and always removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Iterable

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity unless hooked. ``name`` is its module path, set by the owning model."""

    def __init__(self):
        super().__init__()
        self.name: str = ""
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook on {self.name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
                x = out
        return x

    def extra_repr(self) -> str:
        return self.name


class HookedModule(nn.Module):
    """Mixin: names every HookPoint after its module path and manages hooks."""

    def setup_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_point(self, name: str) -> HookPoint:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_dict, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_dict for all names"
            raise KeyError(f"no hook point named {name!r}{hint}")
        return self.hook_dict[name]

    def _resolve(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if callable(name):
            return [hp for n, hp in self.hook_dict.items() if name(n)]
        return [self.hook_point(name)]

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = ()):
        """Add ``(name or name-filter, fn)`` hooks for the block's duration."""
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for name, fn in fwd_hooks:
                for hp in self._resolve(name):
                    hp.fns.append(fn)
                    added.append((hp, fn))
            yield self
        finally:
            for hp, fn in reversed(added):
                hp.fns.remove(fn)

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.fns.clear()

    def run_with_hooks(self, *args, fwd_hooks=(), **kwargs):
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names: Iterable[str] | Callable[[str], bool] | None = None,
                       detach: bool = True, **kwargs):
        """Run forward and return ``(logits, cache)``; cache maps hook names to activations.

        ``names``: hook names, a filter ``fn(name) -> bool``, or None for every hook
        (which takes the explicit attention path and computes hook_result).
        """
        if names is None:
            points = list(self.hook_dict.values())
        elif callable(names):
            points = self._resolve(names)
        else:
            points = [self.hook_point(n) for n in names]
        cache: dict[str, torch.Tensor] = {}

        def save(x, hook):
            cache[hook.name] = x.detach() if detach else x

        with self.hooks([(hp.name, save) for hp in points]):
            out = self(*args, **kwargs)
        return out, cache
