"""TransformerLens's weight processing and its state-dict layout, for GPT-2.

Two things a TransformerLens notebook relies on:

* **Its state-dict layout.** ``model.tl_state_dict()`` gives the tensors under TransformerLens's
  names and shapes (``embed.W_E``, ``pos_embed.W_pos``, ``blocks.0.ln1.w``, ``blocks.0.attn.W_Q``
  [H, d_model, d_head], ``b_Q`` [H, d_head], ``W_O`` [H, d_head, d_model], ``mlp.W_in``,
  ``ln_final.w``, ``unembed.W_U`` [d_model, V], ``unembed.b_U``, and the attention's ``mask`` and
  ``IGNORE`` buffers), which ``HookedTransformer.load_state_dict`` takes strictly;
  ``model.load_state_dict`` takes that layout as well as minigpt2's own (which stays Hugging
  Face's, as on disk).
* **Its processing** (``HookedTransformer.from_pretrained``'s defaults): :func:`fold_layer_norm`,
  :func:`center_writing_weights`, :func:`center_unembed`, :func:`fold_value_biases`,
  :func:`refactor_factored_attn_matrices` and :func:`process_weights` combining them, each a
  function of a state dict in TransformerLens's layout that returns a new one, with
  TransformerLens 3.9's arithmetic in its order (its ProcessWeights, GPT-2's case), so the numbers
  agree to float rounding. :func:`load_and_process_state_dict` and :func:`process_weights_` apply
  them to a model: a folded layer norm becomes TransformerLens's LayerNormPre (no weight or bias:
  ``LayerNorm.folded``), and an unembedding that no longer equals W_E^T gets its own W_U and b_U.

A processed model computes the same probabilities (center_unembed shifts every logit of a
position by one constant), but its weights are no longer GPT-2's tied, Hugging Face layout:
``save_pretrained`` refuses it; save before processing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.modules.module import _IncompatibleKeys

from .factored import FactoredMatrix

LN_SUFFIXES = (".ln1.w", ".ln1.b", ".ln2.w", ".ln2.b")
TL_MARKERS = ("embed.W_E", "pos_embed.W_pos", "ln_final.w", "ln_final.b")  # unembed.W_U is also minigpt2's, untied
TL_LAYER_NAMES = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "attn.b_Q",
                  "attn.b_K", "attn.b_V", "attn.b_O", "attn.mask", "attn.IGNORE", "mlp.W_in", "mlp.b_in",
                  "mlp.W_out", "mlp.b_out")


# ------------------------------------------------------------------------------ the layout

def is_tl_layout(state_dict) -> bool:
    """Whether ``state_dict``'s keys are TransformerLens's (embed.W_E, blocks.0.attn.W_Q, ...)."""
    return any(k in TL_MARKERS or (k.startswith("blocks.") and k.split(".", 2)[-1] in TL_LAYER_NAMES)
               for k in state_dict)


def tl_views(model) -> dict[str, torch.Tensor]:
    """TransformerLens key -> the model's tensor under that name and shape: a view of minigpt2's own
    parameter wherever one exists (so a copy into it writes the model), else a new tensor (b_U of a
    tied unembedding: zeros). The attention buffers are TransformerLens's constants."""
    views = {"embed.W_E": model.embed.W_E, "pos_embed.W_pos": model.pos_embed.W_pos}
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            if not getattr(block, ln).folded:
                views[p + ln + ".w"], views[p + ln + ".b"] = getattr(block, ln).weight, getattr(block, ln).bias
        a, m = block.attn, block.mlp
        views |= {p + "attn.W_Q": a.W_Q, p + "attn.W_O": a.W_O, p + "attn.b_Q": a.b_Q, p + "attn.b_O": a.b_O,
                  p + "attn.W_K": a.W_K, p + "attn.W_V": a.W_V, p + "attn.b_K": a.b_K, p + "attn.b_V": a.b_V,
                  p + "attn.mask": torch.empty((0, 0), dtype=torch.bool, device=model.device),
                  p + "attn.IGNORE": torch.tensor(-torch.inf, device=model.device),
                  p + "mlp.W_in": m.W_in, p + "mlp.b_in": m.b_in, p + "mlp.W_out": m.W_out, p + "mlp.b_out": m.b_out}
    if not model.ln_final.folded:
        views["ln_final.w"], views["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    views["unembed.W_U"], views["unembed.b_U"] = model.unembed.W_U, model.unembed.b_U
    return views


def tl_state_dict(model, destination=None, prefix: str = "", keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights in TransformerLens's layout (see the module docstring), in its key order;
    with nn.Module.state_dict's arguments, so a subclass may make it its state_dict."""
    out = {} if destination is None else destination
    for k, v in tl_views(model).items():
        out[prefix + k] = v if keep_vars else v.detach()
    return out


def _is_folded_dict(state_dict) -> bool:
    # TransformerLens's processed layout: an unembedding, and no layer-norm weight anywhere
    return "unembed.W_U" in state_dict and not any(k.endswith((".ln1.w", ".ln2.w")) or k == "ln_final.w"
                                                   for k in state_dict)


def _layer_norms(model) -> dict[str, torch.nn.Module]:
    lns = {f"blocks.{i}.{n}": getattr(b, n) for i, b in enumerate(model.blocks) for n in ("ln1", "ln2")}
    return lns | {"ln_final": model.ln_final}


def _shape_layer_norms(model, state_dict) -> None:
    """Fold the model's layer norms for a processed (folded) state dict; restore those it gives weights for."""
    folded = _is_folded_dict(state_dict)
    for name, ln in _layer_norms(model).items():
        if folded and not ln.folded:
            ln.fold()
        elif ln.folded and (name + ".w" in state_dict or name + ".b" in state_dict):
            ln.unfold(model.wte.weight)
    kind = "LNPre" if all(ln.folded for ln in _layer_norms(model).values()) else "LN"  # TransformerLens's cfg
    object.__setattr__(model.cfg, "normalization_type", kind)


def _shape_unembed(model, state_dict) -> None:
    """Untie the unembedding when the state dict's W_U is not W_E^T or its b_U is not zero; tie it again when
    the dict says it is tied (both W_E and W_U given, equal, b_U zero or absent)."""
    W_U, b_U = state_dict.get("unembed.W_U"), state_dict.get("unembed.b_U")
    W_E = state_dict.get("embed.W_E", model.embed.W_E)
    tied = (W_U is None or (W_U.shape == W_E.T.shape and torch.equal(W_U.to(W_E.device), W_E.T))) and \
           (b_U is None or not bool(b_U.any()))
    if not tied:
        model.unembed.untie()
    elif not model.unembed.tied and W_U is not None and "embed.W_E" in state_dict:
        del model.unembed._parameters["W_U"], model.unembed._parameters["b_U"]


def load_tl_state_dict(model, state_dict, strict: bool = True) -> _IncompatibleKeys:
    """Copy a state dict in TransformerLens's layout into ``model`` (nn.Module.load_state_dict's contract:
    with ``strict``, a missing or unexpected key raises naming it; shapes must match). A dict without
    layer-norm weights (TransformerLens's processed one) folds the model's layer norms; an unembedding
    other than W_E^T unties the model's."""
    _shape_layer_norms(model, state_dict)
    _shape_unembed(model, state_dict)
    views = tl_views(model)
    buffers = {k for k in views if k.endswith(("attn.mask", "attn.IGNORE"))}
    unexpected = [k for k in state_dict if k not in views]
    missing = [k for k in views if k not in state_dict and k not in buffers]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__} (TransformerLens's layout): "
                           f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} given, {tuple(views[k].shape)} here"
             for k in state_dict if k in views and k not in buffers and state_dict[k].shape != views[k].shape]
    if wrong:
        raise RuntimeError("size mismatch in TransformerLens's layout: " + "; ".join(wrong[:8]))
    writable = {k for k in views if k not in buffers and not (model.unembed.tied and k.startswith("unembed."))}
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in writable:
                views[k].copy_(v)
    return _IncompatibleKeys(missing, unexpected)


# ------------------------------------------------------------------------------ the processing
# Each function takes and returns a state dict in TransformerLens's layout; ``cfg`` is the model's
# GPT2Config (n_layers, d_model: TransformerLens's names). The caller's dict and tensors are not changed.

def fold_layer_norm(state_dict: dict[str, torch.Tensor], cfg, fold_biases: bool = True,
                    center_weights: bool = True) -> dict[str, torch.Tensor]:
    """Fold each layer norm's weight (and bias, with ``fold_biases``) into the weights that read its output
    (W_Q, W_K, W_V; W_in; W_U) and their biases, leaving the layer norm weight 1, bias 0; with
    ``center_weights`` also centre those reading weights over d_model (the layer norm's output is centred)."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        w, b = sd[p + "ln1.w"], sd[p + "ln1.b"]
        for x in "QKV":
            W = sd[p + f"attn.W_{x}"]  # [H, d_model, d_head]
            if fold_biases:
                sd[p + f"attn.b_{x}"] = sd[p + f"attn.b_{x}"] + (W * b[None, :, None]).sum(-2)
            W = W * w[None, :, None]
            sd[p + f"attn.W_{x}"] = W - W.mean(1, keepdim=True) if center_weights else W
        if fold_biases:
            sd[p + "ln1.b"] = torch.zeros_like(b)
        sd[p + "ln1.w"] = torch.ones_like(w)
        w, b, W = sd[p + "ln2.w"], sd[p + "ln2.b"], sd[p + "mlp.W_in"]  # W_in [d_model, d_mlp]
        if fold_biases:
            sd[p + "mlp.b_in"] = sd[p + "mlp.b_in"] + (W * b[:, None]).sum(-2)
            sd[p + "ln2.b"] = torch.zeros_like(b)
        W = W * w[:, None]
        sd[p + "ln2.w"] = torch.ones_like(w)
        sd[p + "mlp.W_in"] = W - W.mean(0, keepdim=True) if center_weights else W
    if "ln_final.w" in sd:
        w, W = sd["ln_final.w"], sd["unembed.W_U"]  # W_U [d_model, V]
        if fold_biases and "unembed.b_U" in sd and "ln_final.b" in sd:
            sd["unembed.b_U"] = sd["unembed.b_U"] + (W * sd["ln_final.b"][:, None]).sum(-2)
            sd["ln_final.b"] = torch.zeros_like(sd["ln_final.b"])
        W = W * w[:, None]
        sd["ln_final.w"] = torch.ones_like(w)
        sd["unembed.W_U"] = W - W.mean(0, keepdim=True) if center_weights else W
    return sd


def center_writing_weights(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Centre every weight that writes to the residual stream (W_E, W_pos, W_O, W_out) over d_model, and the
    biases b_O, b_out: the next layer norm removes the mean anyway."""
    sd = dict(state_dict)
    sd["embed.W_E"] = sd["embed.W_E"] - sd["embed.W_E"].mean(-1, keepdim=True)
    sd["pos_embed.W_pos"] = sd["pos_embed.W_pos"] - sd["pos_embed.W_pos"].mean(-1, keepdim=True)
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        for W, b in (("attn.W_O", "attn.b_O"), ("mlp.W_out", "mlp.b_out")):
            sd[p + W] = sd[p + W] - sd[p + W].mean(-1, keepdim=True)
            sd[p + b] = sd[p + b] - sd[p + b].mean()
    return sd


def center_unembed(state_dict: dict[str, torch.Tensor], cfg=None) -> dict[str, torch.Tensor]:
    """Centre W_U and b_U over the vocabulary: every logit of a position moves by one constant, so
    probabilities and losses do not change."""
    sd = dict(state_dict)
    sd["unembed.W_U"] = sd["unembed.W_U"] - sd["unembed.W_U"].mean(-1, keepdim=True)
    if "unembed.b_U" in sd:
        sd["unembed.b_U"] = sd["unembed.b_U"] - sd["unembed.b_U"].mean()
    return sd


def fold_value_biases(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Move each layer's value biases into its output bias: b_O += sum_h b_V[h] @ W_O[h], b_V = 0 (attention
    patterns sum to 1, so a value bias adds a constant to the layer's output)."""
    sd = dict(state_dict)
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        b_V = sd[p + "attn.b_V"]  # [H, d_head]
        sd[p + "attn.b_O"] = sd[p + "attn.b_O"] + (b_V[:, :, None] * sd[p + "attn.W_O"]).sum([0, 1])
        sd[p + "attn.b_V"] = torch.zeros_like(b_V)
    return sd


def refactor_factored_attn_matrices(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Refactor each head's W_Q W_K^T (biases as an extra input row) into halves of equal singular values, and
    W_V W_O into W_V = U S, W_O = V^T (b_V folded into b_O first), as TransformerLens does."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    for l in range(cfg.n_layers):
        p = f"blocks.{l}.attn."
        W_Q_eff = torch.cat([sd[p + "W_Q"], sd[p + "b_Q"][:, None, :]], dim=1)  # [H, d_model + 1, d_head]
        W_K_eff = torch.cat([sd[p + "W_K"], sd[p + "b_K"][:, None, :]], dim=1)
        W_Q_even, W_K_even_T = FactoredMatrix(W_Q_eff, W_K_eff.transpose(-1, -2)).make_even().pair
        W_K_even = W_K_even_T.transpose(-1, -2)
        sd[p + "W_Q"], sd[p + "b_Q"] = W_Q_even[:, :-1, :], W_Q_even[:, -1, :]
        sd[p + "W_K"], sd[p + "b_K"] = W_K_even[:, :-1, :], W_K_even[:, -1, :]
        b_V, W_O = sd[p + "b_V"], sd[p + "W_O"]
        sd[p + "b_O"] = sd[p + "b_O"] + (b_V[:, :, None] * W_O).sum(1).sum(0)
        sd[p + "b_V"] = torch.zeros_like(b_V)
        U, S, V = FactoredMatrix(sd[p + "W_V"], W_O).svd()
        sd[p + "W_V"], sd[p + "W_O"] = U @ S.diag_embed(), V.transpose(-1, -2)
    return sd


# process_weights's flags take these functions' names (TransformerLens's keywords): the steps under other names
_STEPS = dict(fold_layer_norm=fold_layer_norm, center_writing_weights=center_writing_weights,
              center_unembed=center_unembed, fold_value_biases=fold_value_biases,
              refactor_factored_attn_matrices=refactor_factored_attn_matrices)


def process_weights(state_dict: dict[str, torch.Tensor], cfg, fold_ln: bool = True,
                    center_writing_weights: bool = True, center_unembed: bool = True,
                    fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False) -> dict[str, torch.Tensor]:
    """The processing steps in TransformerLens's order (in float32, then back to each tensor's dtype): fold the
    layer norms, centre the writing weights, centre the unembedding, fold the value biases (and centre b_O
    again), refactor the attention matrices."""
    steps = _STEPS
    dtypes = {k: v.dtype for k, v in state_dict.items() if v.is_floating_point() and v.dtype != torch.float32}
    # contiguous, as TransformerLens's parameters are: the same sums in the same order (the SVDs of the
    # refactoring pick each singular vector's sign from them)
    sd = {k: (v.float() if k in dtypes else v).contiguous() for k, v in state_dict.items()}
    if fold_ln:
        sd = steps["fold_layer_norm"](sd, cfg, fold_biases=True, center_weights=True)
    if center_writing_weights:
        sd = steps["center_writing_weights"](sd, cfg)
    if center_unembed:
        sd = steps["center_unembed"](sd, cfg)
    if fold_value_biases:
        sd = steps["fold_value_biases"](sd, cfg)
        if center_writing_weights:
            for l in range(cfg.n_layers):
                sd[f"blocks.{l}.attn.b_O"] = sd[f"blocks.{l}.attn.b_O"] - sd[f"blocks.{l}.attn.b_O"].mean()
    if refactor_factored_attn_matrices:
        sd = steps["refactor_factored_attn_matrices"](sd, cfg)
    return {k: v.to(dtypes[k]) if k in dtypes else v for k, v in sd.items()}


# ------------------------------------------------------------------------------ on a model

def load_and_process_state_dict(model, state_dict: dict[str, torch.Tensor], fold_ln: bool = True,
                                center_writing_weights: bool = True, center_unembed: bool = True,
                                fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False):
    """TransformerLens's HookedTransformer.load_and_process_state_dict: process ``state_dict`` (TransformerLens's
    layout, or minigpt2's: it is converted) and load it into ``model``; with ``fold_ln`` the layer norms
    become LayerNormPre. Returns the model."""
    if not is_tl_layout(state_dict):
        state_dict = _native_to_tl(model, state_dict)
    if fold_ln and not any(k.endswith((".ln1.w", ".ln2.w")) or k == "ln_final.w" for k in state_dict):
        fold_ln = False  # already folded, as TransformerLens skips it
    sd = process_weights(state_dict, model.cfg, fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                         refactor_factored_attn_matrices)
    if fold_ln:
        sd = {k: v for k, v in sd.items() if not (k.endswith(LN_SUFFIXES) or k.startswith("ln_final."))}
    load_tl_state_dict(model, sd, strict=False)
    return model


def _native_to_tl(model, state_dict):
    """minigpt2's own state dict, as the model's, in TransformerLens's layout (through a scratch copy of the model)."""
    import copy

    scratch = copy.deepcopy(model)
    torch.nn.Module.load_state_dict(scratch, state_dict)
    return {k: v.clone() for k, v in tl_state_dict(scratch).items()}


def process_weights_(model, fold_ln: bool = True, center_writing_weights: bool = True,
                     center_unembed: bool = True, refactor_factored_attn_matrices: bool = False):
    """Process the model's own weights in place (TransformerLens's process_weights_, whose value biases are
    always folded). Returns the model."""
    sd = {k: v.clone() for k, v in tl_state_dict(model).items()}
    return load_and_process_state_dict(model, sd, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                       center_unembed=center_unembed,
                                       refactor_factored_attn_matrices=refactor_factored_attn_matrices)


# ------------------------------------------------------------------------------ from_pretrained

GPT2_NAMES = ("gpt2", "gpt2-small", "openai-community/gpt2")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
def refuse_unsupported(function: str, kwargs: dict, defaults: dict) -> None:
    """TransformerLens keywords that make sense only with its hub (``defaults``: each at the value that asks for
    nothing): an unknown keyword is a TypeError, a known one set to anything else a ValueError saying why."""
    for key, value in kwargs.items():
        if key not in defaults:
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
        if value != defaults[key]:
            raise ValueError(f"{function}({key}={value!r}) is not supported here: minigpt2 loads one local GPT-2 "
                             f"checkpoint as it is (leave {key} at {defaults[key]!r}; save a model with "
                             "save_pretrained and pass its directory)")


UNSUPPORTED = {"checkpoint_index": None, "checkpoint_value": None, "checkpoint_label": None, "hf_model": None,
               "tokenizer": None, "first_n_layers": None, "n_ctx": None, "n_devices": 1}


def resolve_name(name) -> Path:
    """A directory for from_pretrained's ``model_name``: a path as it is; "gpt2" (and its aliases) weights/gpt2;
    a bundled model's name (base, featherweight, ...) weights/NAME. Nothing is downloaded."""
    path = Path(name)
    if path.exists():
        return path
    local = WEIGHTS_DIR / ("gpt2" if str(name) in GPT2_NAMES else str(name))
    if local.is_dir():
        return local
    bundled = sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").exists()) \
        if WEIGHTS_DIR.is_dir() else []
    fix = ("put openai-community/gpt2's model.safetensors and config.json under weights/gpt2/ (weights/README.md)"
           if str(name) in GPT2_NAMES else "pass a directory with model.safetensors and config.json")
    raise FileNotFoundError(f"from_pretrained({str(name)!r}): no such directory, and nothing is downloaded here: "
                            f"{fix}; bundled models: {', '.join(bundled) or 'none'}")


def from_pretrained(cls, model_name, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, refactor_factored_attn_matrices: bool = False,
                    fold_value_biases: bool = True, device=None, dtype="float32", move_to_device: bool = True,
                    default_prepend_bos: bool | None = None, default_padding_side: str | None = None,
                    n_head: int | None = None, **kwargs):
    """TransformerLens's HookedTransformer.from_pretrained, from a local directory (see :func:`resolve_name`),
    with its keywords and defaults: the weights are processed (layer norms folded, writing weights and the
    unembedding centred, value biases folded) unless told otherwise."""
    refuse_unsupported("from_pretrained", kwargs, UNSUPPORTED)
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(names)}")
        dtype = names[dtype]
    if device is None:  # TransformerLens's default device
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cls.load_pretrained(resolve_name(model_name), dtype=dtype, n_head=n_head)  # a subclass built as itself
    if default_prepend_bos is not None:
        object.__setattr__(model.cfg, "default_prepend_bos", bool(default_prepend_bos))
    if default_padding_side is not None:
        model.tokenizer.padding_side = default_padding_side
    load_and_process_state_dict(model, {k: v.clone() for k, v in tl_state_dict(model).items()}, fold_ln,
                                center_writing_weights, center_unembed, fold_value_biases,
                                refactor_factored_attn_matrices)
    return model.to(device) if move_to_device and device is not None else model


__all__ = ["center_unembed", "center_writing_weights", "fold_layer_norm", "fold_value_biases", "from_pretrained",
           "is_tl_layout", "load_and_process_state_dict", "load_tl_state_dict", "process_weights",
           "process_weights_", "refactor_factored_attn_matrices", "resolve_name", "tl_state_dict"]
