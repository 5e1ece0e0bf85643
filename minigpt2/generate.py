"""Generation with a KV cache, with TransformerLens's keywords.

``model.generate(input, max_new_tokens, ...)`` takes TransformerLens 3.x's arguments
(``stop_at_eos``, ``eos_token_id``, ``do_sample``, ``top_k``, ``top_p``, ``temperature``,
``freq_penalty``, ``use_past_kv_cache``, ``prepend_bos``, ``padding_side``, ``return_type``,
``verbose``) with its defaults, and computes what TransformerLens computes with them: it samples by
default (``do_sample=True``, ``temperature=1.0``), drawing as its ``utils.sample_logits`` does (with
``seed=None`` from torch's global generator, so ``torch.manual_seed(s)`` before either gives the same
tokens), and ``do_sample=False`` is greedy.

Where minigpt2 differs:
  * ``verbose=False`` by default (no progress bar; TransformerLens shows one);
  * ``stop_token`` (minigpt2's older keyword: one token id, or None for no stop) still works;
    ``seed`` samples from a generator of its own; ``attention_mask`` [B, T] (1 = real token)
    generates from a left-padded tensor batch;
  * generation stops at the context length (with a warning saying how many tokens it made)
    instead of failing past it, and ``max_new_tokens=0`` returns the prompt;
  * token ids are taken as they are: TransformerLens also masks trailing <|endoftext|> tokens
    of a tensor prompt as right padding (then continues from a masked position); here a
    prompt's last token is always real, and a left-padded batch says so (``attention_mask``,
    or ``padding_side="left"``).
A batch of several texts is left-padded, as in TransformerLens, so every row continues its
own prompt exactly as it would alone.

The model inherits ``generate`` from :class:`GenerateMixin`, and its forward takes this module's
:class:`KVCache` (``cache=``); this module never imports the model (no import cycle).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING

import torch

from clikit import Range

if TYPE_CHECKING:  # the model imports this module (GenerateMixin, KVCache): no import back at run time
    from .model import GPT2

_UNSET = object()


class GenerateMixin:
    """GPT2.generate, TransformerLens's method; the model inherits it from here."""

    def generate(self, input="", max_new_tokens: int = 10, **kwargs):
        """Continue ``input`` (text, texts or token ids [B, T]); see :func:`minigpt2.generate.generate`."""
        return generate(self, input, max_new_tokens, **kwargs)


@torch.no_grad()
def generate(model: GPT2, input="", max_new_tokens: int = 10, stop_at_eos: bool = True,
             eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
             top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
             use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
             return_type: str = "input", verbose: bool = False, seed: int | None = None,
             attention_mask: torch.Tensor | None = None, stop_token=_UNSET):
    """Continue ``input`` by up to ``max_new_tokens`` tokens.

    ``input``: a text, a list of texts (left-padded into one batch), or token ids [B, T] / [T]
    (a tensor, list or array; with ``attention_mask`` [B, T] when left-padded; with
    ``padding_side="left"`` and no mask, leading <|endoftext|> tokens are taken as padding,
    as TransformerLens does).

    Each step draws from softmax(logits / temperature - freq_penalty * counts) restricted to the
    ``top_k`` most likely tokens or else to the smallest set of mass >= ``top_p`` (TransformerLens's
    default: sampling at temperature 1); temperature 0 or ``do_sample=False`` takes the most likely
    token (greedy). A prompt that leaves fewer than ``max_new_tokens`` positions of the context
    gets as many as fit, with a warning. A row that emits a stop token (``eos_token_id``, <|endoftext|>
    by default, when ``stop_at_eos``) is padded with it afterwards; generation ends once every row has
    stopped.

    Returns, by ``return_type``: "tokens", the ids [B, T + n] (prompt included); "str", the
    decoded text without special tokens (a string for one row, else a list); "input"
    (default), "str" for text input and "tokens" otherwise.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, freq_penalty, do_sample, return_type)
    tokens, mask, from_text = _prompt(model, input, attention_mask, prepend_bos, padding_side)
    stops, pad = _stop_tokens(model, stop_at_eos, eos_token_id, stop_token)
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an integer (or None: torch's global generator), got {seed!r}")
    sample, temperature = bool(do_sample), float(temperature)
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None

    B, T = tokens.shape
    n = max(0, min(max_new_tokens, model.cfg.n_ctx - T))
    if n < max_new_tokens:
        warnings.warn(f"generate: max_new_tokens={max_new_tokens}, but the context of {model.cfg.n_ctx} positions "
                      f"leaves room for {n} after the {T}-token prompt: generating {n} new tokens", stacklevel=3)

    def pick(logits, out):  # logits [B, V], the sequences so far [B, t] -> the next tokens [B]
        if sample:
            return sample_logits(logits, out, temperature, top_k, top_p, freq_penalty, gen)
        return logits.argmax(dim=-1)

    out = _decode(model, tokens, mask, n, stops, pad, use_past_kv_cache, verbose, pick)
    if return_type == "input":
        return_type = "str" if from_text else "tokens"
    if return_type == "str":
        texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if len(texts) == 1 else texts
    return out


def _decode(model: GPT2, tokens: torch.Tensor, mask: torch.Tensor | None, n: int, stops: list[int], pad: int | None,
            use_past_kv_cache: bool, verbose: bool, pick) -> torch.Tensor:
    """The decoding loop of :func:`generate`: up to ``n`` tokens after ``tokens`` [B, T] (``mask``: its
    real-token mask or None), each chosen by ``pick(logits [B, V], sequences so far [B, t])`` -> [B].
    A row that emits one of ``stops`` is padded with ``pad`` afterwards; the loop ends once all have stopped.
    Returns the ids [B, T + n'] (n' <= n)."""
    B = tokens.shape[0]
    stop_ids = torch.tensor(stops, dtype=torch.long, device=model.device)
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    cache = KVCache(model.cfg.n_layer) if use_past_kv_cache else None
    out = tokens

    from tqdm.auto import tqdm

    # The padding is settled (``mask``): padding_side="right" keeps the forward from inferring a mask again.
    for step in tqdm(range(n), disable=not verbose, desc="generate", unit="token"):
        if step == 0 or cache is None:
            step_mask = None if mask is None else torch.cat([mask, mask.new_ones(B, step)], dim=1)
            logits = model(out, attention_mask=step_mask, cache=cache, positions=_last(out), padding_side="right")
        else:  # the cache holds every earlier position (and their mask)
            logits = model(out[:, -1:], cache=cache, positions=_last(out[:, -1:]), padding_side="right")
        nxt = pick(logits, out)
        if stops:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, stop_ids)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if stops and finished.all():
            break
    return out


def sample_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, freq_penalty: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [B] from ``logits`` [B, V], as TransformerLens's utils.sample_logits (same order of
    operations, same draw from the generator); ``tokens`` [B, T], the sequences so far, for ``freq_penalty``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if freq_penalty > 0:
        counts = torch.zeros_like(logits).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = torch.distributions.Categorical(logits=logits.float()).probs
    return torch.multinomial(probs, 1, True, generator=generator)[:, 0]


def _last(tokens: torch.Tensor) -> torch.Tensor:
    return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_args(max_new_tokens, temperature, top_k, top_p, freq_penalty, do_sample, return_type) -> None:
    Range(0, whole=True).check("max_new_tokens", max_new_tokens)
    Range(0).check("temperature", temperature, why="0: the most likely token")
    Range(1, whole=True, optional=True).check("top_k", top_k, why="None: every token")
    Range(0, 1, lo_open=True, optional=True).check("top_p", top_p, why="None: every token")
    if not _is_number(freq_penalty) or math.isnan(freq_penalty):
        raise ValueError(f"freq_penalty must be a number, got {freq_penalty!r}")
    if do_sample not in (True, False):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if return_type not in ("input", "str", "tokens"):
        why = " (minigpt2 generates from text or tokens, not embeddings)" if return_type == "embeds" else ""
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}{why}")


def _prompt(model: GPT2, input, attention_mask, prepend_bos, padding_side):
    """(tokens [B, T], mask [B, T] or None, from_text) of a prompt."""
    if isinstance(input, (list, tuple)) and len(input) == 0:
        raise ValueError("the prompt is empty: give a text, a list of texts or token ids")
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and all(isinstance(t, str) for t in input)):
        if attention_mask is not None:
            raise ValueError("attention_mask= goes with token ids; a batch of texts is left-padded and masked here")
        bos = model._bos(prepend_bos)
        texts = [input] if isinstance(input, str) else list(input)
        for i, t in enumerate(texts):
            if not t and not bos:
                where = "the prompt" if isinstance(input, str) else f"prompt {i}"
                raise ValueError(f"{where} is an empty string and prepend_bos=False: it has no tokens to continue")
        if len(texts) == 1:
            return model.to_tokens(texts[0], prepend_bos=bos, padding_side=padding_side), None, True
        # TransformerLens pads a batch of texts on the left whatever padding_side says: every row then ends
        # with its last real token, where generation continues.
        tokens = model.to_tokens(texts, prepend_bos=bos, padding_side="left")
        mask = model.tokenizer.attention_mask(texts, prepend_bos=bos, padding_side="left", max_length=model.cfg.n_ctx)
        return tokens, (mask.to(tokens.device) if not bool(mask.all()) else None), True
    tokens = model.as_tokens(input)
    if tokens.numel() == 0:
        raise ValueError(f"the prompt is empty: token ids of shape {tuple(tokens.shape)}")
    if attention_mask is None and model._side(padding_side) == "left":
        _, attention_mask = model.input_to_tokens(tokens, None, prepend_bos, "left")
    if attention_mask is not None:
        try:
            attention_mask = torch.as_tensor(attention_mask, device=tokens.device)
        except (TypeError, ValueError, RuntimeError):
            model.check_attention_mask(attention_mask, tokens)  # raises AttentionMaskError, naming the type
            raise
        if attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
        model.check_attention_mask(attention_mask, tokens)
        ends_padded = ~attention_mask[:, -1].bool()
        if ends_padded.any():
            row = ends_padded.nonzero()[0].item()
            raise ValueError(f"attention_mask row {row} ends with padding: generation continues each row from its "
                             "last token, so pad on the left (padding_side='left')")
        attention_mask = attention_mask.long()
        if bool(attention_mask.all()):
            attention_mask = None
    return tokens, attention_mask, False


def _stop_tokens(model: GPT2, stop_at_eos: bool, eos_token_id, stop_token) -> tuple[list[int], int | None]:
    """(the ids that stop a row, the id that pads a stopped row); ids given are checked (:func:`_token_id`)."""
    if stop_token is not _UNSET:
        if eos_token_id is not None:
            raise ValueError("give eos_token_id= or stop_token= (its older name), not both")
        if stop_token is None:
            return [], None
        stop = _token_id(model, stop_token, "stop_token")
        return [stop], stop
    if not stop_at_eos:
        return [], None
    eos = model.tokenizer.eos_token_id
    if eos_token_id is None:
        return [eos], eos
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, (list, tuple)):
        eos = _token_id(model, eos_token_id, "eos_token_id")
        return [eos], eos
    ids = [_token_id(model, i, "eos_token_id") for i in eos_token_id]
    if not ids:
        raise ValueError("eos_token_id is an empty list: give at least one id, or stop_at_eos=False")
    # TransformerLens pads with the tokenizer's eos when given several; a tiny vocabulary may not have it.
    return ids, eos if eos < model.cfg.vocab_size else ids[0]


def _token_id(model: GPT2, value, name: str) -> int:
    """A stop token id given by the caller: an int of the model's vocabulary (another could never stop a row)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a token id (an int) or a list of them, got {value!r}")
    if not 0 <= value < model.cfg.vocab_size:
        raise ValueError(f"{name}: token id {value} is outside the vocabulary [0, {model.cfg.vocab_size}), so it "
                         "could never stop a row; give an id of this model's vocabulary")
    return int(value)




class KVCacheError(ValueError):
    """A KVCache used with a model, or a batch, other than the one it was made for and filled by."""


class KVCache:
    """Keys and values of the positions seen so far, per layer, for generation."""

    def __init__(self, n_layer: int):
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
            raise TypeError(f"KVCache(n_layer) takes the model's number of layers, an int >= 1: "
                            f"KVCache(model.cfg.n_layer); got {n_layer!r}")
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.mask: torch.Tensor | None = None  # [B, Tk] real-token mask, when one was given
        self.length = 0

    def check(self, model: GPT2, batch: int) -> None:
        """Refuse (:class:`KVCacheError`) a cache made for another model, or filled by one, or by another batch."""
        if not isinstance(self.k, list) or len(self.k) != model.cfg.n_layer:
            raise KVCacheError(f"this KVCache has {len(self.k)} layers, the model {model.cfg.n_layer}: "
                               f"make one with KVCache(model.cfg.n_layer)")
        k = self.k[0]
        if k is None:
            return
        cfg = model.cfg
        dtype_differs = k.dtype != model.dtype and not torch.is_autocast_enabled(model.device.type)  # autocast: bf16 k
        if k.shape[2:] != (cfg.n_head, cfg.d_head) or k.device != model.device or dtype_differs:
            raise KVCacheError(
                f"this KVCache was filled by another model: its keys are [B, T, {k.shape[2]}, {k.shape[3]}] "
                f"{str(k.dtype).removeprefix('torch.')} on {k.device}, this model's [B, T, {cfg.n_head}, {cfg.d_head}] "
                f"(n_head, d_head) {str(model.dtype).removeprefix('torch.')} on {model.device}: a cache continues "
                "the model and the sequences that filled it; make a new KVCache(model.cfg.n_layer) for this model")
        if k.shape[0] != batch:
            raise KVCacheError(f"this KVCache holds {k.shape[0]} sequences, the tokens {batch}: a cache continues "
                               "the batch it was filled with; make a new KVCache for another batch")

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def extend_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """The real-token mask over every key [B, length + T], given this call's [B, T] (None: all real)."""
        B = self.k[0].shape[0] if self.k[0] is not None else attention_mask.shape[0]
        device = self.mask.device if self.mask is not None else attention_mask.device
        if self.mask is None:
            self.mask = torch.ones(B, self.length, dtype=torch.long, device=device)
        new = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None else attention_mask.long()
        self.mask = torch.cat([self.mask, new], dim=1)
        return self.mask

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (sequences that are still generating)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        if self.mask is not None:
            self.mask = self.mask[rows]


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        c, i = self.cache, self.i
        c.k[i] = k if c.k[i] is None else torch.cat([c.k[i], k], dim=1)
        c.v[i] = v if c.v[i] is None else torch.cat([c.v[i], v], dim=1)
        return c.k[i], c.v[i]


__all__ = ["GenerateMixin", "KVCache", "KVCacheError", "generate", "sample_logits"]
