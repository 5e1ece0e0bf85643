"""TransformerLens 4's TransformerBridge for GPT-2, over minigpt2's model: a TL 4 notebook runs by renaming
``transformer_lens.model_bridge`` to ``minigpt2.model_bridge``.

    from minigpt2.model_bridge import TransformerBridge     # was: from transformer_lens.model_bridge import ...
    bridge = TransformerBridge.boot_transformers("base")    # a local directory or bundled model; "gpt2": weights/gpt2
    logits, cache = bridge.run_with_cache("When Mary and John went to the store")
    cache["blocks.0.attn.hook_pattern"]; cache["blocks.0.hook_out"]   # TL 4's names, and TL 3's aliases
    bridge.enable_compatibility_mode()                      # HookedTransformer's weight processing

TransformerLens 4 wraps each Hugging Face module in a component with ``hook_in`` and ``hook_out``
(``blocks.0.ln1.hook_in``, ``blocks.0.attn.q.hook_out``, ``blocks.0.mlp.in.hook_out``) and names
TransformerLens 3's hooks as aliases of those (``blocks.0.hook_resid_pre`` is ``blocks.0.hook_in``,
``blocks.0.attn.hook_z`` is ``blocks.0.attn.o.hook_in``), in every mode. Here each component's
hook points are fed by minigpt2's model: a component's hook_in / hook_out by a forward (pre-)hook
on the minigpt2 module it wraps, its inner hooks (hook_q, hook_pattern, hook_scale, ...) by
minigpt2's own hook points, linked only while hooked, so the fast paths stay as they are.

Where TransformerLens 4.3 differs from TransformerLens 3 (and minigpt2's own hooks), this follows it:
masked attention scores are the dtype's minimum until ``enable_compatibility_mode()`` (-inf after);
``hook_resid_mid`` is ln2's input (a hook on it changes the MLP's input, not the residual stream);
``attn.q.hook_in`` feeds the query projection alone; the per-head inputs (``hook_q_input``,
``hook_attn_in``) are copies of the block's input before ln1, whose own hooks stay [B, T, 1]; a hook
that a ``use_*`` switch keeps off is refused by name and skipped by filters; ``attn.qkv``'s hooks are
listed and never fire, nor do ``attn.q.hook_in`` (per-head inputs on) and ``attn.o.hook_out``
(per-head results on). Checked against TransformerLens 4.3 (tests/test_tl4_bridge.py).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookPoint, NamesFilter, lookup_hook

# TransformerLens 4's aliases (TL 3's names), per component: alias -> the hook it names.
TOP_ALIASES = {"hook_embed": "embed.hook_out", "hook_pos_embed": "pos_embed.hook_out",
               "hook_unembed": "unembed.hook_out"}
BLOCK_ALIASES = {"hook_resid_pre": "hook_in", "hook_resid_mid": "ln2.hook_in", "hook_resid_post": "hook_out",
                 "hook_attn_in": "attn.hook_attn_in", "hook_attn_out": "attn.hook_out",
                 "hook_q_input": "attn.hook_q_input", "hook_k_input": "attn.hook_k_input",
                 "hook_v_input": "attn.hook_v_input", "hook_mlp_out": "mlp.hook_out"}
ATTN_ALIASES = {"hook_q": "q.hook_out", "hook_k": "k.hook_out", "hook_v": "v.hook_out", "hook_z": "o.hook_in"}
MLP_ALIASES = {"hook_pre": "in.hook_out", "hook_post": "out.hook_in"}
# TransformerLens 4's switches and the hooks each gates (by the end of the name; TL 4's own rule): a gated hook
# cannot be hooked by name (an error says which switch to turn on) and a name filter skips it (with a warning).
GATES = (("attn.hook_result", "use_attn_result"),
         (("hook_q_input", "hook_k_input", "hook_v_input"), "use_split_qkv_input"),
         ("mlp_in", "use_hook_mlp_in"), ("attn_in", "use_attn_in"))
SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")


class Component(nn.Module):
    """One TransformerLens 4 component: ``hook_in`` and ``hook_out`` around a minigpt2 module, which it
    calls; attributes it lacks (W_Q, b_O, w, ...) are the minigpt2 module's."""

    def __init__(self, original: nn.Module | None, **parts: nn.Module):
        super().__init__()
        self.__dict__["original_component"] = original  # not a submodule: its parameters are the bridge's model's
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()
        self._modules.update(parts)  # add_module would see the original's attribute of the same name

    def forward(self, *args, **kwargs):
        return self.original_component(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original_component")
            if original is None or name.startswith("_"):
                raise
            return getattr(original, {"w": "weight", "b": "bias"}.get(name, name))


class NormComponent(Component):
    def __init__(self, original: nn.Module, like: Callable[[], torch.Tensor]):
        super().__init__(original)
        self.__dict__["_like"] = like  # a tensor of the model's device and dtype, for the folded gain and bias
        self.hook_scale = HookPoint()  # [B, T, 1]
        self.hook_normalized = HookPoint()  # [B, T, d_model], before the gain and bias

    # Once folded, TransformerLens 4's layer norms keep a gain of ones and a bias of zeros; minigpt2's have none.
    @property
    def w(self) -> torch.Tensor:
        ln = self.original_component
        return ln.weight if ln.weight is not None else self._like().new_ones(ln.d)

    @property
    def b(self) -> torch.Tensor:
        ln = self.original_component
        return ln.bias if ln.bias is not None else self._like().new_zeros(ln.d)

    weight, bias = w, b


class AttentionComponent(Component):
    def __init__(self, original: nn.Module):
        # qkv: TransformerLens 4.3 lists its hooks and never fires them; q, k, v are slices of c_attn
        super().__init__(original, qkv=Component(original.c_attn), q=Component(None), k=Component(None),
                         v=Component(None), o=Component(original.c_proj))
        self.hook_attn_scores = HookPoint()  # [B, H, Tq, Tk], the dtype's minimum where masked (-inf once compatible)
        self.hook_pattern = HookPoint()  # [B, H, Tq, Tk]
        self.hook_hidden_states = HookPoint()  # [B, T, d_model], the attention's output
        self.hook_result = HookPoint()  # [B, T, H, d_model]
        self.hook_attn_in = HookPoint()  # [B, T, H, d_model], TransformerLens 3's per-head inputs
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()


class BlockComponent(Component):
    def __init__(self, original: nn.Module, like: Callable[[], torch.Tensor]):
        super().__init__(original, ln1=NormComponent(original.ln1, like), attn=AttentionComponent(original.attn),
                         ln2=NormComponent(original.ln2, like),
                         mlp=Component(original.mlp, **{"in": Component(original.mlp.c_fc),
                                                        "out": Component(original.mlp.c_proj)}))
        self.hook_mlp_in = HookPoint()  # [B, T, d_model]


def _first_arg(fn: Callable[[torch.Tensor], torch.Tensor]):
    """A torch forward pre-hook that passes a module's first argument through ``fn``."""
    def pre(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (fn(args[0]),) + tuple(args[1:])
    return pre


def _output(fn: Callable[[torch.Tensor], torch.Tensor]):
    return lambda module, args, out: fn(out)


def _through(*points: HookPoint) -> Callable[[torch.Tensor], torch.Tensor]:
    """x through each hooked point in turn (a point with no hook is skipped: nothing to call)."""
    def run(x):
        for hp in points:
            if hp.active:
                x = hp(x)
        return x
    return run


class _Links:
    """Links from the bridge's inner hook points to minigpt2's: a link is on only while its bridge points are
    hooked (a minigpt2 point with a hook makes its activation, which may be expensive)."""

    def __init__(self):
        self.links: list[tuple[tuple[HookPoint, ...], HookPoint, Callable]] = []
        self.on: set[int] = set()

    def add(self, wanted_by: tuple[HookPoint, ...], point: HookPoint, fn: Callable) -> None:
        self.links.append((wanted_by, point, fn))

    def sync(self) -> None:
        for i, (wanted_by, point, fn) in enumerate(self.links):
            want = any(hp.active for hp in wanted_by)
            if want and i not in self.on:
                point.add_hook(fn, is_permanent=True)
                self.on.add(i)
            elif not want and i in self.on:
                point.fwd_hooks = [h for h in point.fwd_hooks if h.user_hook is not fn]
                self.on.discard(i)


def _scores_in(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(x == float("-inf"), torch.finfo(x.dtype).min)


def _scores_out(x: torch.Tensor) -> torch.Tensor:
    # back to -inf: minigpt2's rule that a query with no key left attends nothing (z = 0) then still holds
    return x.masked_fill(x <= torch.finfo(x.dtype).min, float("-inf"))


def _converted(hp: HookPoint) -> Callable:
    """A minigpt2 hook fn that passes the activation through the bridge's ``hp``."""
    return lambda x, hook: hp(x)


class _Projection:
    """The link for minigpt2's hook_q / hook_k / hook_v (``index`` 0, 1, 2) of one layer. TransformerLens 4 feeds
    each projection its own input: ``q.hook_in`` (the attention's input) or, with use_split_qkv_input /
    use_attn_in, ``hook_q_input`` / ``hook_attn_in`` (the block's input copied per head, before ln1). While
    one is hooked, this link projects what the hook leaves (through ln1 for the per-head inputs); then
    ``q.hook_out``."""

    def __init__(self, bridge: "TransformerBridge", layer: int, index: int):
        self.bridge, self.layer, self.index = bridge, layer, index

    def __call__(self, y: torch.Tensor, hook) -> torch.Tensor:
        bridge, layer, i = self.bridge, self.layer, self.index
        a, block = bridge.blocks[layer].attn, bridge.original_model.blocks[layer]
        part = (a.q, a.k, a.v)[i]
        per_head = bridge.per_head_input(layer, i)
        if per_head is not None:  # [B, T, H, d_model] -> ln1 -> [B, T, H, d_head]
            ln = block.ln1
            x = F.layer_norm(per_head, per_head.shape[-1:], ln.weight, ln.bias, ln.eps)
            W = (block.attn.W_Q, block.attn.W_K, block.attn.W_V)[i]  # [H, d_model, d_head]
            b = (block.attn.b_Q, block.attn.b_K, block.attn.b_V)[i]  # [H, d_head]
            y = torch.einsum("bthm,hmd->bthd", x, W) + b
        elif part.hook_in.active and not bridge.silent(part.hook_in.name) and (layer, "attn") in bridge._inputs:
            x = part.hook_in(bridge._inputs[(layer, "attn")])  # [B, T, d_model] -> [B, T, H, d_head]
            D, H = block.attn.c_attn.in_features, block.attn.n_head
            rows = slice(i * D, (i + 1) * D)
            y = F.linear(x, block.attn.c_attn.weight[rows], block.attn.c_attn.bias[rows]).view(*x.shape[:-1], H, D // H)
        return part.hook_out(y) if part.hook_out.active else y


class TransformerBridge(nn.Module):
    """TransformerLens 4's TransformerBridge for a minigpt2 GPT2 (``bridge.original_model``).

    The forward, the hooks' values and generation are minigpt2's; the names, the components
    (``bridge.blocks[0].attn.q``, ``bridge.embed``, ``bridge.unembed``), the aliases, the default
    cache and the API (run_with_cache, run_with_hooks, hooks, generate, to_tokens, ...) are
    TransformerLens 4's. ``boot_transformers`` gives raw weights (Hugging Face's numbers);
    ``enable_compatibility_mode()`` processes them as HookedTransformer does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.original_model = model  # a submodule: parameters(), to() and state_dict() are the model's
        # The bridge's own cfg: its use_* switches are TransformerLens 4's, read here; minigpt2's model keeps its own
        self.cfg = copy.copy(model.cfg)
        for switch in SWITCHES:
            object.__setattr__(self.cfg, switch, False)
        self.compatibility_mode = False
        self.embed = Component(model.embed)
        self.pos_embed = Component(model.pos_embed)
        like = lambda: model.W_E  # noqa: E731
        self.blocks = nn.ModuleList(BlockComponent(block, like) for block in model.blocks)
        self.ln_final = NormComponent(model.ln_final, like)
        self.unembed = Component(model.unembed)
        self._inputs: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "attn" | "resid" | "attn_in"), one forward
        self._links = _Links()
        self._wire()
        self._name_hooks()
        self.context_level = 0

    # ------------------------------------------------------------------ booting
    @classmethod
    def boot_transformers(cls, model_name: str, device=None, dtype: torch.dtype = torch.float32,
                          **kwargs) -> "TransformerBridge":
        """Boot GPT-2 from a local directory (Hugging Face layout): a path, "gpt2" (weights/gpt2) or a bundled
        model's name. Nothing is downloaded. The weights are raw, as TransformerLens 4 boots them."""
        from .model import GPT2
        from .processing import refuse_unsupported, resolve_name

        defaults = {"hf_model": None, "tokenizer": None, "load_weights": True, "trust_remote_code": False,
                    "hf_config_overrides": None, "revision": None, "n_ctx": None}
        refuse_unsupported("boot_transformers", kwargs, defaults)
        try:
            path = resolve_name(model_name)
        except FileNotFoundError as e:
            raise FileNotFoundError(str(e).replace("from_pretrained(", "boot_transformers(", 1)) from None
        model = GPT2.load_pretrained(path, dtype=dtype, device=device)
        object.__setattr__(model.cfg, "model_name", str(model_name))
        return cls(model)

    def _wire(self) -> None:
        """Connect every hook point of the bridge to the minigpt2 module or hook point that makes its value."""
        m = self.original_model
        self._around(m.embed, pre=[self.embed.hook_in], post=[self.embed.hook_out])
        pos_in = self.pos_embed.hook_in  # positions [T] here, [1, T] in TransformerLens 4
        m.wpe.register_forward_pre_hook(_first_arg(  # pos_embed's nn.Embedding: the positions go in there
            lambda p: pos_in(p[None])[0] if p.ndim == 1 and pos_in.active else _through(pos_in)(p)))
        self._around(m.pos_embed, post=[self.pos_embed.hook_out])
        for layer, (block, part) in enumerate(zip(m.blocks, self.blocks)):
            self._wire_block(layer, block, part)
        self._wire_norm(m.ln_final, self.ln_final)
        self._around(m.unembed, pre=[self.unembed.hook_in], post=[self.unembed.hook_out])

    def _around(self, module: nn.Module, pre=(), post=()) -> None:
        if pre:
            module.register_forward_pre_hook(_first_arg(_through(*pre)))
        if post:
            module.register_forward_hook(_output(_through(*post)))

    def _wire_norm(self, ln: nn.Module, part: NormComponent) -> None:
        self._around(ln, pre=[part.hook_in], post=[part.hook_out])
        for name in ("hook_scale", "hook_normalized"):
            self._links.add((getattr(part, name),), getattr(ln, name), _converted(getattr(part, name)))

    def _wire_block(self, layer: int, block: nn.Module, part: BlockComponent) -> None:
        attn, a = block.attn, part.attn
        block.register_forward_pre_hook(_first_arg(partial(self._block_input, layer, part)))
        self._around(block, post=[part.hook_out])
        self._wire_norm(block.ln1, part.ln1)
        self._wire_norm(block.ln2, part.ln2)
        attn.register_forward_pre_hook(_first_arg(partial(self._attn_input, layer, a)))
        self._around(attn, post=[a.o.hook_out, a.hook_hidden_states, a.hook_out])
        for i, (name, proj, split) in enumerate((("hook_q", a.q, a.hook_q_input), ("hook_k", a.k, a.hook_k_input),
                                                 ("hook_v", a.v, a.hook_v_input))):
            self._links.add((proj.hook_in, proj.hook_out, split, a.hook_attn_in), getattr(attn, name),
                            _Projection(self, layer, i))
        self._links.add((a.hook_attn_scores,), attn.hook_attn_scores, partial(self._scores, a.hook_attn_scores))
        self._links.add((a.hook_pattern,), attn.hook_pattern, _converted(a.hook_pattern))
        self._links.add((a.o.hook_in,), attn.hook_z, _converted(a.o.hook_in))
        self._links.add((a.hook_result,), attn.hook_result, _converted(a.hook_result))  # hooked only when switched on
        self._links.add((part.hook_mlp_in,), block.hook_mlp_in, _converted(part.hook_mlp_in))
        mlp = part.mlp
        self._around(block.mlp, pre=[mlp.hook_in], post=[mlp.hook_out])
        self._around(block.mlp.c_fc, pre=[getattr(mlp, "in").hook_in], post=[getattr(mlp, "in").hook_out])
        self._around(block.mlp.c_proj, pre=[mlp.out.hook_in], post=[mlp.out.hook_out])

    def _scores(self, hp: HookPoint, x: torch.Tensor, hook) -> torch.Tensor:
        """Masked scores are float32's minimum in TransformerLens 4's raw mode, -inf in compatibility mode."""
        if self.compatibility_mode:
            return hp(x)
        return _scores_out(hp(_scores_in(x)))

    def _block_input(self, layer: int, part: BlockComponent, x: torch.Tensor) -> torch.Tensor:
        x = _through(part.hook_in)(x)
        a = part.attn
        if any(hp.active for hp in (a.hook_attn_in, a.hook_q_input, a.hook_k_input, a.hook_v_input)):
            self._inputs[(layer, "resid")] = x
        return x

    def _attn_input(self, layer: int, a: AttentionComponent, x: torch.Tensor) -> torch.Tensor:
        x = _through(a.hook_in)(x)
        if a.q.hook_in.active or a.k.hook_in.active or a.v.hook_in.active:
            self._inputs[(layer, "attn")] = x
        return x

    def per_head_input(self, layer: int, index: int) -> torch.Tensor | None:
        """The input [B, T, H, d_model] of projection ``index`` (0 q, 1 k, 2 v) of ``layer`` after its per-head
        hook (hook_q_input / _k_ / _v_, or hook_attn_in, shared by the three), or None when none is on and hooked."""
        a = self.blocks[layer].attn
        if self.cfg.use_split_qkv_input:
            point, key = (a.hook_q_input, a.hook_k_input, a.hook_v_input)[index], (layer, f"split{index}")
        elif self.cfg.use_attn_in:
            point, key = a.hook_attn_in, (layer, "attn_in")
        else:
            return None
        if not point.active or (layer, "resid") not in self._inputs:
            return None
        if key not in self._inputs:  # the block's input, one copy per head (hook_attn_in: one for q, k and v)
            resid = self._inputs[(layer, "resid")]
            self._inputs[key] = point(resid[:, :, None].repeat(1, 1, self.cfg.n_head, 1))
        return self._inputs[key]

    # ------------------------------------------------------------------ names
    def _name_hooks(self) -> None:
        self._canonical: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint) and not name.startswith("original_model."):
                module.name = name
                self._canonical[name] = module
        aliases = dict(TOP_ALIASES)
        for layer in range(len(self.blocks)):
            for table, where in ((BLOCK_ALIASES, ""), (ATTN_ALIASES, "attn."), (MLP_ALIASES, "mlp.")):
                aliases.update({f"blocks.{layer}.{where}{a}": f"blocks.{layer}.{where}{t}" for a, t in table.items()})
        self.hook_aliases = aliases
        self._hooks = {**self._canonical, **{a: self._canonical[t] for a, t in aliases.items()}}

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook name, TransformerLens 4's and its aliases (TL 3's names), -> its HookPoint (an alias and
        its target are the same point)."""
        return dict(self._hooks)

    def get_hook_point(self, name: str) -> HookPoint | None:
        return self._hooks.get(name)

    def _point(self, name: str) -> HookPoint:
        return lookup_hook(self._hooks, name, "bridge.hook_dict")

    def _targets(self, name, api: str = "hooks") -> list[tuple[str, HookPoint]]:
        """The (name, point) pairs a hook's target names: one name (refused while its switch is off), or each
        point a filter passes once (aliases pass as their point; points gated off are skipped, with a
        warning, as in TransformerLens 4). Points that never fire under the switches are left out."""
        if isinstance(name, str):
            hp = self._point(name)
            switch = self.gate(hp.name)
            if switch is not None:
                raise ValueError(f"Cannot add hook {name} because {switch} is False. Call set_{switch}(True) first.")
            return [] if self.silent(name) else [(name, hp)]
        if not callable(name):
            raise TypeError(f"a hook's target is a hook name or a filter fn(name) -> bool, got {name!r}")
        seen, gated, out = set(), [], []
        for n, hp in self._hooks.items():
            if id(hp) in seen or not name(n):
                continue
            seen.add(id(hp))
            if self.gate(hp.name) is not None:
                gated.append(n)
            elif not self.silent(n):
                out.append((n, hp))
        if gated:
            warnings.warn(f"{api}: skipped {len(gated)} gated-off hook name(s) that would never fire: {gated}. "
                          "Call the relevant set_use_*(True) setter first to enable them.", stacklevel=4)
        return out

    def gate(self, name: str) -> str | None:
        """The switch (``use_attn_result``, ...) that is off and keeps hook ``name`` from firing, or None."""
        for ends, switch in GATES:
            if name.endswith(ends) and not getattr(self.cfg, switch):
                return switch
        return None

    def silent(self, name: str) -> bool:
        """Whether hook ``name`` never fires in TransformerLens 4.3 under the switches as they are: the joint
        qkv's hooks always; q / k / v.hook_in while the per-head inputs replace them; o.hook_out while
        per-head results are made."""
        name = self._hooks[name].name if name in self._hooks else name
        if ".attn.qkv." in name:
            return True
        if name.endswith(("attn.q.hook_in", "attn.k.hook_in", "attn.v.hook_in")):
            return self.cfg.use_split_qkv_input or self.cfg.use_attn_in
        return name.endswith("attn.o.hook_out") and self.cfg.use_attn_result

    def default_cached_names(self) -> list[str]:
        """What run_with_cache() caches without a names_filter, as TransformerLens 4: every name that fires
        (aliases too) but those the switches keep off."""
        return [n for n in self._hooks if self.gate(n) is None and not self.silent(n)]

    def _set_switch(self, switch: str, value: bool) -> None:
        other = {"use_attn_in": "use_split_qkv_input", "use_split_qkv_input": "use_attn_in"}.get(switch)
        if value and other and getattr(self.cfg, other):
            raise ValueError(f"use_attn_in and use_split_qkv_input are mutually exclusive. Call set_{other}(False) "
                             f"before enabling {switch}.")
        setattr(self.cfg, switch, bool(value))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Toggle blocks.{l}.attn.hook_result [B, T, H, d_model], each head's write to the residual stream."""
        self._set_switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Toggle blocks.{l}.hook_q_input / _k_ / _v_ [B, T, H, d_model]: each head's own copy of the block's
        input, before ln1, for its query, key and value."""
        self._set_switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Toggle blocks.{l}.hook_attn_in [B, T, H, d_model]: each head's copy of the block's input, before ln1."""
        self._set_switch("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Toggle blocks.{l}.hook_mlp_in [B, T, d_model]."""
        self._set_switch("use_hook_mlp_in", use_hook_mlp_in)

    # ------------------------------------------------------------------ hooks
    def add_hook(self, name, hook, dir: str = "fwd", is_permanent: bool = False, level: int | None = None,
                 prepend: bool = False) -> None:
        """Add ``hook`` fn(activation, hook) to the point ``name`` (or every point a filter passes) until
        ``reset_hooks()``."""
        for _, hp in self._targets(name):
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name, hook, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        for hp in self._canonical.values():
            if clear_contexts:
                hp.clear_context()
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)
        self._links.sync()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False) -> None:
        self.reset_hooks(False, direction, including_permanent)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Add ``(name or filter, fn)`` hooks for the block's duration; removed in ``finally``."""
        self.context_level += 1
        level = self.context_level
        try:
            for hooks, direction in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
                for name, fn in hooks:
                    for _, hp in self._targets(name):
                        hp.add_hook(fn, dir=direction, level=level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=level)
            self.context_level -= 1

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs):
        """The forward with ``fwd_hooks`` / ``bwd_hooks`` (lists of (name or filter, fn)) on for its duration."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names_filter: NamesFilter = None, device=None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, return_cache_object: bool = True, **kwargs):
        """``(output, cache)``: the forward, and each cached hook's activation under the name asked for (an
        alias and its target both, when both are cached). ``names_filter``: a name, a list, a filter
        fn(name) -> bool, or None for :meth:`default_cached_names`. ``incl_bwd`` also runs
        ``output.backward()`` and caches gradients as ``<name>_grad``."""
        if names_filter is None:
            names = self.default_cached_names()
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):  # every name it passes, an alias and its target both
            passed = [n for n, _ in self._targets(names_filter, "run_with_cache")]
            points = {id(self._hooks[n]) for n in passed}
            names = [n for n, hp in self._hooks.items() if id(hp) in points and names_filter(n)]
        else:
            names = list(names_filter)
        cache: dict[str, torch.Tensor] = {}

        def save(key: str, x: torch.Tensor, hook) -> None:
            x = x.detach()
            x = x.to(device) if device is not None else x
            cache[key] = x[0] if remove_batch_dim else x

        fwd = [(n, partial(save, n)) for n in names]
        bwd = [(n, partial(save, n + "_grad")) for n in names] if incl_bwd else []
        with self.hooks(fwd, bwd):
            out = self(*args, **kwargs)
            if incl_bwd:
                out.backward()
        if not return_cache_object:
            return out, cache
        from .cache import ActivationCache

        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------ the forward and generation
    def forward(self, input, return_type: str | None = "logits", **kwargs):
        """``input`` (text, texts or token ids [B, T]) -> logits [B, T, V] (or "loss", "both", None), as
        minigpt2's forward (attention_mask, prepend_bos, padding_side, loss_per_token, start_at_layer,
        stop_at_layer ...), with the bridge's hooks."""
        self._links.sync()
        try:
            return self.original_model(input, return_type=return_type, **kwargs)
        finally:
            self._inputs.clear()

    def generate(self, input="", max_new_tokens: int = 10, do_sample: bool = True, temperature: float = 1.0,
                 verbose: bool = True, **kwargs):
        """TransformerLens 4's generate, with its defaults (sampling at temperature 1 from torch's global
        generator, so ``torch.manual_seed`` gives TL 4's tokens): minigpt2's generate, with the bridge's hooks."""
        self._links.sync()
        try:
            return self.original_model.generate(input, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                                verbose=verbose, **kwargs)
        finally:
            self._inputs.clear()

    # ------------------------------------------------------------------ weight processing
    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False) -> None:
        """HookedTransformer's numbers: process the weights as TransformerLens does (minigpt2.processing:
        fold the layer norms, centre the writing weights and the unembedding, fold the value biases) unless
        ``no_processing``. The hook names are the same in both modes (TL 4.3 lists TL 3's aliases always).
        As in TransformerLens 4, calling it twice processes twice."""
        self.compatibility_mode = True
        if no_processing:
            return
        self.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                             center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                             refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    def process_weights(self, verbose: bool = False, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True,
                        refactor_factored_attn_matrices: bool = False) -> None:
        from .processing import load_and_process_state_dict, tl_state_dict

        model = self.original_model
        sd = {k: v.detach().clone() for k, v in tl_state_dict(model).items()}
        load_and_process_state_dict(model, sd, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                    center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                    refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    # ------------------------------------------------------------------ TransformerLens's model API
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name not in _FROM_MODEL:
                raise
            return getattr(self._modules["original_model"], name)

    @property
    def device(self) -> torch.device:
        return self.original_model.device

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for field in ("device", "dtype"):  # the model's cfg follows the model; the bridge's copy follows it
            object.__setattr__(self.cfg, field, getattr(self.original_model.cfg, field))
        return out

    def __str__(self) -> str:
        return f"TransformerBridge(minigpt2 GPT2: {self.cfg.n_layer} layers, {self.cfg.n_head} heads, " \
               f"d_model {self.cfg.d_model})"


# What the bridge answers from minigpt2's model (TransformerLens's API on both).
_FROM_MODEL = frozenset({
    "tokenizer", "to_tokens", "to_string", "to_str_tokens", "to_single_token", "to_single_str_token",
    "get_token_position", "tokens_to_residual_directions", "loss_fn", "input_to_tokens", "dtype",
    "W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_out", "b_in", "b_out", "QK", "OV", "W_E_pos", "accumulated_bias", "all_head_labels",
})

__all__ = ["TransformerBridge", "Component"]
