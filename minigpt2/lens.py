"""TransformerLens's model API on GPT2: text in, losses out, weights under TransformerLens's names.

GPT2 inherits this mixin, so a TransformerLens notebook's calls work on it:
``model.to_tokens("...")``, ``model.to_str_tokens(...)``, ``model("text", return_type="loss")``,
``model.W_Q`` [L, H, d_model, d_head], ``model.OV`` (a FactoredMatrix), ``from_pretrained`` with
TransformerLens's weight processing (minigpt2.processing) ...
Everything here is thin over the model and the tokenizer; nothing changes what the forward computes
(the weight processing changes the weights, as TransformerLens's does).
Semantics are TransformerLens 3.x's for GPT-2 (default_prepend_bos True, padding on the right
unless ``model.tokenizer.padding_side`` or ``padding_side=`` says otherwise); where TransformerLens
asserts, the error raised here is a :class:`TokenError`, both a ValueError and an AssertionError.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .tokenizer import EOT_TOKEN


class TokenError(ValueError, AssertionError):
    """A bad token argument: a ValueError that is also the AssertionError TransformerLens raises there."""


def _is_text(input) -> bool:
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0
                                      and all(isinstance(t, str) for t in input))


def leading_pad_mask(tokens: torch.Tensor, prepend_bos: bool, pad_token_id: int = EOT_TOKEN) -> torch.Tensor:
    """TransformerLens's attention mask for left-padded token ids (utils.get_attention_mask, padding_side="left"):
    0 on each row's leading pad tokens, except the last of them when ``prepend_bos`` (GPT-2's pad is its BOS)."""
    real = tokens.ne(pad_token_id)
    leading = real.long().cumsum(dim=-1) == 0
    mask = (~leading).long()
    if prepend_bos:
        bos = leading.sum(-1) - 1  # [B]; -1 where a row has no leading pad (then the last column, as in TL)
        mask[torch.arange(mask.shape[0], device=mask.device), bos] = 1
    return mask


class LensMixin:
    # ---------------------------------------------------------------- defaults
    def _bos(self, prepend_bos: bool | None) -> bool:
        """prepend_bos, or the default: ``cfg.default_prepend_bos`` if set, else True (TransformerLens's GPT-2)."""
        if prepend_bos is None:
            return bool(getattr(self.cfg, "default_prepend_bos", True))
        return bool(prepend_bos)

    def _side(self, padding_side: str | None) -> str:
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    # ---------------------------------------------------------------- text <-> tokens
    def input_to_tokens(self, input, attention_mask=None, prepend_bos: bool | None = None,
                        padding_side: str | None = None):
        """(tokens [B, T], attention_mask or None) from text, a list of texts, ids or a tensor.

        As in TransformerLens's forward: with left padding (``padding_side="left"`` or
        ``model.tokenizer.padding_side == "left"``) the batch gets the attention mask that masks
        its padding and shifts its positions; with right padding none is made. For a batch of
        texts the mask comes from each text's length; for token ids, as in TransformerLens,
        from the leading <|endoftext|> tokens of each row (the last of them kept as BOS when
        ``prepend_bos``).
        """
        if _is_text(input):
            side = self._side(padding_side)
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=side)
            if attention_mask is None and side == "left" and not isinstance(input, str):
                attention_mask = self.tokenizer.attention_mask(list(input), prepend_bos=self._bos(prepend_bos),
                                                               padding_side=side,
                                                               max_length=self.cfg.n_ctx).to(tokens.device)
            return tokens, attention_mask
        tokens = self.as_tokens(input)
        if attention_mask is None and self._side(padding_side) == "left":
            attention_mask = leading_pad_mask(tokens, self._bos(prepend_bos), self.tokenizer.pad_token_id)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: the unmasked path computes the same
        return tokens, attention_mask

    @property
    def tokenizer(self):
        """GPT-2's tokenizer with Hugging Face's interface, as TransformerLens's model.tokenizer (add_bos_token=True:
        encode and the call put <|endoftext|> first; minigpt2.tokens.LensTokenizer)."""
        from .tokens import LensTokenizer

        if getattr(self, "_lens_tokenizer", None) is None:
            object.__setattr__(self, "_lens_tokenizer", LensTokenizer())
        return self._lens_tokenizer

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Text (or a list of texts) -> token ids [B, T], <|endoftext|> prepended by default (TransformerLens's
        GPT-2 default), shorter texts padded with <|endoftext|> on ``padding_side`` (the tokenizer's,
        "right", by default), rows cut at n_ctx unless ``truncate=False``."""
        tokens = self.tokenizer.pad(input, prepend_bos=self._bos(prepend_bos), padding_side=self._side(padding_side),
                                    max_length=self.cfg.n_ctx if truncate else None)
        return tokens.to(self.device) if move_to_device else tokens

    def to_string(self, tokens) -> str | list[str]:
        """Token ids -> text: a string for [T] (or one id), a list of strings for [B, T]. Special tokens are kept."""
        if isinstance(tokens, (list, tuple)) and not tokens:
            return ""
        if isinstance(tokens, (list, tuple)) and not all(isinstance(t, (int, np.integer)) for t in tokens):
            if all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in tokens):
                tokens = torch.stack(list(tokens))  # one sequence of 0-d tensors
            else:
                return [self.to_string(t) for t in tokens]  # one string per row (rows may be ragged)
        tokens = torch.as_tensor(tokens)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"to_string takes integer token ids, got {tokens.dtype}")
        if tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens)
        if tokens.ndim <= 1:
            return self.tokenizer.decode(tokens)
        raise ValueError(f"Invalid shape passed in: {tokens.shape}")

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as its string: text (tokenized by to_tokens: BOS prepended by default, cut at n_ctx),
        ids [T] or [1, T] (tensor, array or list of ints) -> list of str; a list of texts (or of
        sequences), or ids [B, T] with B > 1 -> a list of lists."""
        if isinstance(input, (list, tuple)):
            if input and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in input):
                return self._str_tokens(torch.tensor([int(t) for t in input]))
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        if isinstance(input, str):
            return self._str_tokens(self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side,
                                                   move_to_device=False)[0])
        if isinstance(input, (torch.Tensor, np.ndarray)):
            tokens = torch.as_tensor(input).squeeze()  # a trivial batch dim goes, as in TransformerLens
            if tokens.ndim == 0:
                tokens = tokens[None]
            if tokens.ndim == 2:
                return [self._str_tokens(row) for row in tokens]
            if tokens.ndim != 1:
                raise ValueError(f"Invalid tokens input to to_str_tokens, has shape: {tuple(input.shape)}")
            return self._str_tokens(tokens)
        raise ValueError(f"Invalid input type to to_str_tokens: {type(input)}")

    def _str_tokens(self, tokens: torch.Tensor) -> list[str]:
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"to_str_tokens takes integer token ids, got {tokens.dtype}")
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); a TokenError naming the string otherwise."""
        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string, got {type(string).__name__}")
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([t]) for t in ids]
            raise TokenError(f"Input string: {string!r} is not a single token! It is {len(ids)} tokens: {pieces}")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if not isinstance(int_token, (int, np.integer)) or isinstance(int_token, bool):
            raise TypeError(f"to_single_str_token takes an int token id, got {type(int_token).__name__}")
        return self.tokenizer.decode([int(int_token)])

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> int:
        """The position of ``single_token`` (an id, or a string that is one token) in ``input`` (text, tokenized
        with to_tokens, or ids [T] / [1, T]): its first occurrence, or its last with mode="last".
        A TokenError if it does not occur."""
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, move_to_device=False)
        else:
            tokens = torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise TokenError(f"If tokens are rank two, they must have shape [1, seq_len], not {tokens.shape}")
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise TokenError(f"get_token_position needs text or ids [seq_len] / [1, seq_len], not {tokens.shape}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = single_token.item()
        indices = torch.arange(len(tokens), device=tokens.device)[tokens == single_token]
        if len(indices) == 0:
            raise TokenError(f"The token does not occur in the prompt: token {single_token} "
                             f"({self.tokenizer.decode([int(single_token)])!r}) is not among {tokens.tolist()}")
        if mode == "first":
            return indices[0].item()
        if mode == "last":
            return indices[-1].item()
        raise ValueError(f"mode must be 'first' or 'last', not {mode}")

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Each token's unembedding direction (its column of W_U): [d_model] for one token (a string that is one
        token, an int, a one-element tensor), [..., d_model] for a tensor of tokens [...].

        As TransformerLens warns, without layer norm folded in this is not exactly the direction
        the final layer norm's output is dotted with: ln_final's weight scales each dimension first.
        """
        if isinstance(tokens, (list, tuple)):
            tokens = torch.tensor(tokens)
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens.to(self.device)].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
            token = int(tokens)
        elif isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
            token = tokens.item()
        else:
            raise ValueError(f"Invalid token type: {type(tokens)}")
        return self.W_U[:, token]

    # ---------------------------------------------------------------- losses
    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy: [B, T - 1] per token (0 where masked), else its mean (over real tokens
        with a mask), as TransformerLens's lm_cross_entropy_loss."""
        if logits.ndim != 3:
            raise ValueError(f"loss_fn needs logits [B, T, V], got {tuple(logits.shape)}")
        tokens = tokens.to(logits.device)
        if tokens.shape != logits.shape[:2]:
            raise ValueError(f"loss_fn needs tokens {tuple(logits.shape[:2])} for logits {tuple(logits.shape)}, "
                             f"got {tuple(tokens.shape)}")
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        loss = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, T - 1]
        if attention_mask is not None:
            attention_mask = self.check_attention_mask(attention_mask, tokens)  # [B, T] of 0/1, else named
            real = attention_mask[:, 1:].to(loss.device).bool() & attention_mask[:, :-1].to(loss.device).bool()
            if per_token:
                return loss.masked_fill(~real, 0.0)
            return loss.masked_fill(~real, 0.0).sum() / real.sum().clamp(min=1)
        return loss if per_token else loss.mean()

    # ---------------------------------------------------------------- weights under TransformerLens's names
    @property
    def W_E(self) -> torch.Tensor:
        """[V, d_model] token embedding (the tensor itself: edits write through)."""
        return self.wte.weight

    @property
    def W_pos(self) -> torch.Tensor:
        """[n_ctx, d_model] position embedding."""
        return self.wpe.weight

    @property
    def W_E_pos(self) -> torch.Tensor:
        """[V + n_ctx, d_model]: W_E and W_pos stacked (a copy)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, V] unembedding: W_E transposed (GPT-2 ties them; a view), its own once processed."""
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        """[V]: zeros for GPT-2 (as TransformerLens's b_U), its own once processed (fold_ln, center_unembed)."""
        return self.unembed.b_U

    def _stack(self, part: str, name: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks], dim=0)

    # Stacked over layers (copies, as in TransformerLens): per-layer views are model.blocks[l].attn.W_Q etc.
    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[L, H, d_model, d_head]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[L, H, d_model, d_head]")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[L, H, d_model, d_head]")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[L, H, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[L, H, d_head]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[L, H, d_head]")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[L, H, d_head]")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[L, d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[L, d_model, d_mlp]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[L, d_mlp, d_model]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[L, d_mlp]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[L, d_model]")

    @property
    def QK(self):
        """FactoredMatrix [L, H, d_model, d_model]: W_Q @ W_K^T, each head's bilinear attention form."""
        from .factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """FactoredMatrix [L, H, d_model, d_model]: W_V @ W_O, each head's map from what it reads to what it writes."""
        from .factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    # ---------------------------------------------------------------- TransformerLens's loading and processing
    @classmethod
    def from_pretrained(cls, model_name, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, refactor_factored_attn_matrices: bool = False, **kwargs):
        """TransformerLens's from_pretrained, from a local directory ("gpt2" is weights/gpt2, a bundled model's
        name its directory; nothing is downloaded), with its keywords and defaults: the weights are
        processed as TransformerLens processes them (minigpt2.processing). ``load_pretrained`` and
        :meth:`from_pretrained_no_processing` load them as they are. Also: fold_value_biases=True,
        device (TransformerLens's default: cuda if available), dtype="float32", default_prepend_bos,
        default_padding_side, move_to_device, and n_head for a checkpoint without config.json."""
        from .processing import from_pretrained

        return from_pretrained(cls, model_name, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed,
                               refactor_factored_attn_matrices=refactor_factored_attn_matrices, **kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name, fold_ln: bool = False, center_writing_weights: bool = False,
                                      center_unembed: bool = False, refactor_factored_attn_matrices: bool = False,
                                      fold_value_biases: bool = False, **kwargs):
        """from_pretrained with every processing step off by default (the weights as they are)."""
        return cls.from_pretrained(model_name, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                   refactor_factored_attn_matrices=refactor_factored_attn_matrices, **kwargs)

    def load_and_process_state_dict(self, state_dict, fold_ln: bool = True, center_writing_weights: bool = True,
                                    center_unembed: bool = True, fold_value_biases: bool = True,
                                    refactor_factored_attn_matrices: bool = False) -> None:
        """Process ``state_dict`` (TransformerLens's layout, or minigpt2's) as TransformerLens does and load it."""
        from .processing import load_and_process_state_dict

        load_and_process_state_dict(self, state_dict, fold_ln, center_writing_weights, center_unembed,
                                    fold_value_biases, refactor_factored_attn_matrices)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, refactor_factored_attn_matrices: bool = False) -> None:
        """Process this model's weights in place, as TransformerLens's process_weights_."""
        from .processing import process_weights_

        process_weights_(self, fold_ln, center_writing_weights, center_unembed, refactor_factored_attn_matrices)

    # TransformerLens's per-step methods: a state dict in its layout -> the processed one (minigpt2.processing).
    def fold_layer_norm(self, state_dict, fold_biases: bool = True, center_weights: bool = True):
        from .processing import fold_layer_norm

        return fold_layer_norm(state_dict, self.cfg, fold_biases, center_weights)

    def center_writing_weights(self, state_dict):
        from .processing import center_writing_weights

        return center_writing_weights(state_dict, self.cfg)

    def center_unembed(self, state_dict):
        from .processing import center_unembed

        return center_unembed(state_dict, self.cfg)

    def fold_value_biases(self, state_dict):
        from .processing import fold_value_biases

        return fold_value_biases(state_dict, self.cfg)

    def refactor_factored_attn_matrices(self, state_dict):
        from .processing import refactor_factored_attn_matrices

        return refactor_factored_attn_matrices(state_dict, self.cfg)

    def all_head_labels(self) -> list[str]:
        """["L0H0", "L0H1", ...], layer-major."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layer) for h in range(self.cfg.n_head)]


__all__ = ["LensMixin", "TokenError", "EOT_TOKEN", "leading_pad_mask"]
