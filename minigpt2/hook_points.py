"""``transformer_lens.hook_points`` renamed: ``from minigpt2.hook_points import HookedRootModule, HookPoint``.

HookedRootModule is minigpt2's :class:`~minigpt2.hooks.HookedModule`: subclass it, place HookPoints in
``__init__``, call ``self.setup()`` at its end, and the module has TransformerLens's hook API
(``run_with_hooks``, ``run_with_cache``, ``hooks()``, ``add_hook``, ``reset_hooks``, ``hook_dict``,
``mod_dict``). A module without a ``cfg`` holding TransformerLens's switches has every point live.
"""

from __future__ import annotations

from .hooks import HookedModule, HookError, HookFn, HookPoint, LensHandle, NamesFilter

HookedRootModule = HookedModule  # TransformerLens's name

__all__ = ["HookedRootModule", "HookPoint", "LensHandle", "HookError", "HookFn", "NamesFilter"]
