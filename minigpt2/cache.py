"""ActivationCache: what ``model.run_with_cache`` returns, with TransformerLens's API.

It maps hook names to activations like a dict (``cache["blocks.3.attn.hook_pattern"]``) and takes
TransformerLens's shorthand: ``cache["pattern", 0]``, ``cache["resid_post", -1]``, ``cache["z", 3, "attn"]``,
``cache["scale", 2, "ln1"]``, ``cache["embed"]``. Its analysis methods (``accumulated_resid``,
``decompose_resid``, ``stack_head_results``, ``get_full_resid_decomposition``, ``apply_ln_to_stack``,
``logit_attrs`` ...) give the same shapes, labels and values as TransformerLens's, for the model the
cache came from (it holds a reference to it, for W_U, W_O, W_out, the biases and ln_final).

Shapes: q, k, v, z [B, T, H, d_head]; pattern, attn_scores [B, H, Tq, Tk]; result [B, T, H, d_model];
pre, post [B, T, d_mlp]; residual-stream vectors [B, T, d_model]; scale [B, T, 1]. After
``remove_batch_dim()`` the leading B is gone, and every method here copes with that.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterator, Optional, Union

import torch

from .utils import Slice, SliceInput, get_act_name


def _projection_2d(project: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], bool]:
    """A [d_model] projection as [d_model, 1] (and whether to squeeze the result back)."""
    if project is None:
        return None, False
    if project.ndim == 1:
        return project[:, None], True
    return project, False


def _heads_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """[..., n, d] -> [n, ..., d] (einops "... n d -> n ... d")."""
    return x.movedim(-2, 0)


class ActivationCache:
    """Cached activations of one forward, by hook name, and TransformerLens's analyses of them.

    Args:
        cache_dict: hook name -> activation.
        model: the model they come from (a reference is kept; set ``cache.model = None`` to drop it).
        has_batch_dim: whether the activations have their batch axis.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in self.cache_dict
        self.has_pos_embed = "hook_pos_embed" in self.cache_dict

    # ------------------------------------------------------------------ the model's numbers
    @property
    def _n_layers(self) -> int:
        cfg = self.model.cfg
        return cfg.n_layer if hasattr(cfg, "n_layer") else cfg.n_layers

    @property
    def _n_heads(self) -> int:
        cfg = self.model.cfg
        return cfg.n_head if hasattr(cfg, "n_head") else cfg.n_heads

    @property
    def _device(self):
        device = getattr(self.model, "device", None)
        if device is None:
            device = next(iter(self.cache_dict.values())).device if self.cache_dict else "cpu"
        return device

    @property
    def _W_U(self) -> torch.Tensor:  # [d_model, V]; the model's own once its weights are processed
        return self.model.W_U

    def _accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the biases of every layer output (b_O, b_out) up to the input of ``layer``."""
        bias = torch.zeros(self.model.cfg.d_model, device=self._device, dtype=self._W_U.dtype)
        for i in range(layer):
            block = self.model.blocks[i]
            bias = bias + block.attn.b_O
            if include_mlp_biases:
                bias = bias + block.mlp.b_out
        if mlp_input:
            if layer >= self._n_layers:
                raise ValueError("Cannot include attn_bias from beyond the final layer")
            bias = bias + self.model.blocks[layer].attn.b_O
        return bias

    def _to_single_token(self, string: str) -> int:
        token = self.model.to_tokens(string, prepend_bos=False).squeeze()
        if token.shape:
            raise ValueError(f"Input string: {string} is not a single token!")
        return int(token.item())

    def _residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding vector of each token: [d_model], or [..., d_model] for a tensor of tokens."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self._W_U[:, tokens.to(self._W_U.device)].movedim(0, -1)
        if isinstance(tokens, str):
            token = self._to_single_token(tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise ValueError(f"Improper input for tokens {tokens}")
        return self._W_U[:, token]

    # ------------------------------------------------------------------ the dict part
    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.cache_dict[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache; cache it with run_with_cache(..., names_filter=...) "
                           f"(this cache has {len(self.cache_dict)} activations)") from None

    def __getitem__(self, key) -> torch.Tensor:
        """An activation by full name or by shorthand: ``"embed"``, ``("pattern", 0)``, ``("resid_post", -1)``,
        ``("scale", 2, "ln1")`` (see :func:`minigpt2.utils.get_act_name`); a negative layer counts from the end."""
        if isinstance(key, str):
            if key in self.cache_dict:
                return self.cache_dict[key]
            return self._get(get_act_name(key))
        if len(key) > 1 and key[1] is not None and key[1] < 0:
            key = (key[0], self._n_layers + key[1], *key[2:])
        return self._get(get_act_name(*key))

    def __contains__(self, key) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict.keys())}"

    def to(self, device) -> "ActivationCache":
        """Move every activation to ``device`` (the model stays where it is)."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)``: global state, as in TransformerLens."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    def _batch_size(self) -> int:
        counts = Counter(v.size(0) for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a one-row cache (in place; returns the cache)."""
        if self.has_batch_dim:
            batch_size = self._batch_size()
            if batch_size != 1:
                raise ValueError(f"Cannot remove batch dimension from cache with batch size {batch_size}")
            for key, value in self.cache_dict.items():
                if value.ndim > 0 and value.size(0) == 1:
                    self.cache_dict[key] = value[0]
            self.has_batch_dim = False
        else:
            logging.warning("Tried removing batch dimension after already having removed it.")
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Union[Slice, SliceInput]) -> "ActivationCache":
        """A new cache of the rows ``batch_slice`` picks (an int drops the batch axis)."""
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        if not (self.has_batch_dim or batch_slice.mode == "empty"):
            raise ValueError("Cannot index into a cache without a batch dim")
        still_batched = batch_slice.mode != "int" and self.has_batch_dim
        batch_size = self._batch_size()
        new = {k: (batch_slice.apply(v, dim=0) if v.ndim > 0 and v.size(0) == batch_size else v)
               for k, v in self.cache_dict.items()}
        return ActivationCache(new, self.model, has_batch_dim=still_batched)

    # ------------------------------------------------------------------ residual stream
    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Union[Slice, SliceInput] = None, mlp_input: bool = False,
                          return_labels: bool = False):
        """The residual stream entering each layer up to ``layer`` (None / -1 / n_layers: all, plus the final
        one), stacked: [layers_covered, *batch_and_pos, d_model]; labels "0_pre", "0_mid", ..., "final_post".

        ``incl_mid`` adds resid_mid of earlier layers, ``mlp_input`` resid_mid of ``layer``; ``apply_ln``
        applies ln_final (recomputed per component, for the logit lens) when ``layer`` is the last,
        else the cached scale of ``layer``'s layer norm.
        """
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        L = self._n_layers
        if layer is None or layer == -1:
            layer = L
        labels, components = [], []
        for l in range(layer + 1):
            if l == L:
                components.append(self[("resid_post", L - 1)])
                labels.append("final_post")
                continue
            components.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                components.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == L)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Union[Slice, SliceInput] = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering ``layer`` as the stack of what wrote it: embed, pos_embed and each
        earlier layer's attn_out / mlp_out (``mode`` "all", "attn" or "mlp"); ``mlp_input`` adds ``layer``'s
        attn_out. Labels "embed", "pos_embed", "0_attn_out", "0_mlp_out", ..."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        if layer is None or layer == -1:
            layer = self._n_layers
        incl_attn, incl_mlp = mode != "mlp", mode != "attn"
        components, labels = [], []
        if incl_embeds:
            if self.has_embed:
                components.append(self["hook_embed"])
                labels.append("embed")
            if self.has_pos_embed:
                components.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for l in range(layer):
            if incl_attn:
                components.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                components.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            components.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ heads
    def compute_head_results(self) -> None:
        """Put each head's write to the residual stream, z @ W_O ("blocks.{l}.attn.hook_result",
        [..., T, H, d_model]), into the cache, from the cached z, unless it is cached already."""
        if not self._missing_head_results():
            logging.warning("Tried to compute head results when they were already cached")
        self._ensure_head_results()

    def _missing_head_results(self) -> list[int]:
        return [l for l in range(self._n_layers) if f"blocks.{l}.attn.hook_result" not in self.cache_dict]

    def _ensure_head_results(self) -> None:
        # a default cache has no hook_result (use_attn_result is off): made here without a warning, as TransformerLens
        for l in self._missing_head_results():
            z = self[("z", l, "attn")]
            W_O = self.model.blocks[l].attn.W_O  # [H, d_head, d_model]
            self.cache_dict[f"blocks.{l}.attn.hook_result"] = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype))

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Union[Slice, SliceInput] = None, apply_ln: bool = False):
        """Every head's result in the layers before ``layer``: [layer * H, *batch_and_pos, d_model], labels
        "L0H0", "L0H1", ...; ``incl_remainder`` adds resid_post of layer - 1 minus their sum ("remainder")."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        if layer is None or layer == -1:
            layer = self._n_layers
        self._ensure_head_results()
        labels, components = [], []
        for l in range(layer):
            components.append(pos_slice.apply(self[("result", l, "attn")], dim=-3))
            labels.extend(f"L{l}H{h}" for h in range(self._n_heads))
        if components:
            stack = _heads_last_to_first(torch.cat(components, dim=-2))
            if incl_remainder:
                remainder = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2) - stack.sum(dim=0)
                stack = torch.cat([stack, remainder[None]], dim=0)
                labels.append("remainder")
        elif incl_remainder:
            stack = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)[None]
            labels.append("remainder")
        else:
            stack = torch.zeros(0, *pos_slice.apply(self["hook_embed"], dim=-2).shape, device=self._device)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: Optional[str] = None) -> torch.Tensor:
        """``activation_name`` of every layer before ``layer``, stacked: [layers, ...]."""
        if layer is None or layer == -1:
            layer = self._n_layers
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)], dim=0)

    # ------------------------------------------------------------------ neurons
    def get_neuron_results(self, layer: int, neuron_slice: Union[Slice, SliceInput] = None,
                           pos_slice: Union[Slice, SliceInput] = None,
                           project_output_onto: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each neuron's write to the residual stream in ``layer``: [..., T, d_mlp, d_model] (or projected
        onto ``project_output_onto`` [d_model] / [d_model, n], without making the d_model axis)."""
        neuron_slice = neuron_slice if isinstance(neuron_slice, Slice) else Slice(neuron_slice)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        acts = pos_slice.apply(self[("post", layer, "mlp")], dim=-2)
        W_out = self.model.blocks[layer].mlp.W_out  # [d_mlp, d_model]
        acts = neuron_slice.apply(acts, dim=-1)
        W_out = neuron_slice.apply(W_out, dim=0)
        if project_output_onto is None:
            return acts[..., None] * W_out
        projected = W_out @ project_output_onto
        return acts * projected if projected.ndim == 1 else acts[..., None] * projected

    def _neuron_stack_ln_projected(self, layer: int, pos_slice: Slice, neuron_slice: Slice,
                                   project_2d: torch.Tensor) -> torch.Tensor:
        # LN_s(a W_out_n) @ p = (a / s) (W_out_n @ p - mean(W_out_n) sum(p)), with the cached scale s of
        # layer's ln1, as TransformerLens does it.
        scale = self._cached_ln_scale(layer, mlp_input=False, pos_slice=pos_slice)
        sum_p = project_2d.sum(dim=0)
        components = []
        for l in range(layer):
            W = neuron_slice.apply(self.model.blocks[l].mlp.W_out, dim=0)
            lin = W @ project_2d - W.mean(dim=-1)[:, None] * sum_p[None, :]
            a = neuron_slice.apply(pos_slice.apply(self[("post", l, "mlp")], dim=-2), dim=-1)
            components.append((a / scale)[..., None] * lin)
        if not components:
            empty = pos_slice.apply(self["hook_embed"], dim=-2)
            return torch.zeros(0, *empty.shape[:-1], project_2d.shape[-1], device=self._device)
        return _heads_last_to_first(torch.cat(components, dim=-2))

    def stack_neuron_results(self, layer: int, pos_slice: Union[Slice, SliceInput] = None,
                             neuron_slice: Union[Slice, SliceInput] = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: Optional[torch.Tensor] = None):
        """Every neuron's result in the layers before ``layer``: [layer * d_mlp, *batch_and_pos, d_model],
        labels "L0N0", "L0N1", ... (large: pass ``project_output_onto`` to keep only a projection)."""
        if layer is None or layer == -1:
            layer = self._n_layers
        neuron_slice = neuron_slice if isinstance(neuron_slice, Slice) else Slice(neuron_slice)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        project_2d, squeeze = _projection_2d(project_output_onto)
        neuron_labels = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0)
        if neuron_labels.ndim == 0:
            neuron_labels = neuron_labels[None]
        labels = [f"L{l}N{h}" for l in range(layer) for h in neuron_labels.tolist()]
        ln_folded = apply_ln and project_2d is not None
        if ln_folded:
            stack = self._neuron_stack_ln_projected(layer, pos_slice, neuron_slice, project_2d)
            if incl_remainder:
                resid_post = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)
                remainder = self.apply_ln_to_stack(resid_post[None], layer, pos_slice=pos_slice)[0] @ project_2d
                if stack.shape[0] > 0:
                    remainder = remainder - stack.sum(dim=0)
                stack = torch.cat([stack, remainder[None]], dim=0)
                labels.append("remainder")
        else:
            per_layer = [self.get_neuron_results(l, pos_slice=pos_slice, neuron_slice=neuron_slice,
                                                 project_output_onto=project_2d) for l in range(layer)]
            if per_layer:
                stack = _heads_last_to_first(torch.cat(per_layer, dim=-2))
                if incl_remainder:
                    full = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)
                    if project_2d is not None:
                        full = full @ project_2d
                    stack = torch.cat([stack, (full - stack.sum(dim=0))[None]], dim=0)
                    labels.append("remainder")
            elif incl_remainder:
                full = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)
                if project_2d is not None:
                    full = full @ project_2d
                stack = full[None]
                labels.append("remainder")
            else:
                shape_src = pos_slice.apply(self["hook_embed"], dim=-2)
                if project_2d is not None:
                    shape_src = shape_src @ project_2d
                stack = torch.zeros(0, *shape_src.shape, device=self._device)
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ layer norm
    def _cached_ln_scale(self, layer: Optional[int], mlp_input: bool, pos_slice: Slice,
                         batch_slice: Optional[Slice] = None) -> torch.Tensor:
        if layer is None or layer == self._n_layers:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if key not in self.cache_dict:
            raise KeyError(f"Cached LN scale not found at '{key}'. apply_ln operations need it in the cache: "
                           "run_with_cache with it in names_filter")
        scale = pos_slice.apply(self._get(key), dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: Optional[int] = None, mlp_input: bool = False,
                          pos_slice: Union[Slice, SliceInput] = None, batch_slice: Union[Slice, SliceInput] = None,
                          has_batch_dim: bool = True, recompute_ln: bool = False) -> torch.Tensor:
        """Each component of ``residual_stack`` [n, *batch_and_pos, d_model] as the given layer norm sees it:
        centred and divided by the cached scale of ``layer``'s ln1 (ln2 with ``mlp_input``; ln_final for
        layer None / -1 / n_layers), as TransformerLens does (no weight or bias: those are the next
        layer's). ``recompute_ln`` with the final layer applies ln_final itself to each component."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        if layer is None or layer == -1:
            layer = self._n_layers
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == self._n_layers:
            results = []
            for x in residual_stack:
                shape = x.shape
                if not has_batch_dim:
                    x = x.unsqueeze(0)
                if x.ndim == 2:
                    x = x.unsqueeze(1)
                results.append(self.model.ln_final(x).reshape(shape))
            return torch.stack(results, dim=0)
        residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        return residual_stack / self._cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: Union[Slice, SliceInput] = None, return_labels: bool = False,
                                     project_output_onto: Optional[torch.Tensor] = None):
        """The residual stream entering ``layer`` split into every head, every neuron (or each MLP with
        ``expand_neurons=False``), embed, pos_embed and the summed biases ("bias"), stacked on dim 0 in
        that order, as TransformerLens's (labels "L0H0", ..., "L0N0", ..., "embed", "pos_embed", "bias")."""
        if layer is None or layer == -1:
            layer = self._n_layers
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        project_2d, squeeze = _projection_2d(project_output_onto)
        ln_folded = apply_ln and project_2d is not None

        def ln_then_project(stack: torch.Tensor) -> torch.Tensor:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            return stack @ project_2d if project_2d is not None else stack

        def finish(stack: torch.Tensor) -> torch.Tensor:
            if ln_folded:
                return ln_then_project(stack)
            return stack @ project_2d if project_2d is not None else stack

        head_stack, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                     return_labels=True)
        components = [finish(head_stack)]
        if layer > 0:
            if expand_neurons:
                neuron_stack, neuron_labels = self.stack_neuron_results(
                    layer, pos_slice=pos_slice, return_labels=True, apply_ln=ln_folded, project_output_onto=project_2d)
                labels.extend(neuron_labels)
                components.append(neuron_stack)
            else:
                mlp_stack, mlp_labels = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                             incl_embeds=False, mode="mlp", return_labels=True)
                labels.extend(mlp_labels)
                components.append(finish(mlp_stack))
        if self.has_embed:
            labels.append("embed")
            components.append(finish(pos_slice.apply(self["embed"], -2)[None]))
        if self.has_pos_embed:
            labels.append("pos_embed")
            components.append(finish(pos_slice.apply(self["pos_embed"], -2)[None]))
        bias = self._accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        if ln_folded:
            shape = (1,) + tuple(head_stack.shape[1:-1]) + (self.model.cfg.d_model,)
            bias = ln_then_project(bias.expand(shape))
        else:
            if project_2d is not None:
                bias = bias @ project_2d
            bias = bias.expand((1,) + components[0].shape[1:])
        labels.append("bias")
        components.append(bias)
        stack = torch.cat(components, dim=0)
        if apply_ln and not ln_folded:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ logits
    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: Union[Slice, SliceInput] = None, batch_slice: Union[Slice, SliceInput] = None,
                    has_batch_dim: bool = True) -> torch.Tensor:
        """Each component's direct logit for ``tokens`` (a token string or id, or ids [batch] / [batch, pos]),
        or for ``tokens`` minus ``incorrect_tokens``: the component, scaled by the cached ln_final scale,
        dotted with the token's unembedding direction. [n, *batch_and_pos]."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)

        def shape_of(t):
            if isinstance(t, str):
                return torch.as_tensor(self._to_single_token(t)).shape
            return torch.as_tensor(t).shape

        directions = self._residual_directions(tokens)
        if incorrect_tokens is not None:
            if shape_of(tokens) != shape_of(incorrect_tokens):
                raise ValueError(f"tokens and incorrect_tokens must have the same shape! (tokens.shape="
                                 f"{shape_of(tokens)}, incorrect_tokens.shape={shape_of(incorrect_tokens)})")
            directions = directions - self._residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions).sum(dim=-1)


__all__ = ["ActivationCache"]
