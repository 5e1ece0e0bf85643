"""A tokenizer with the parts of Hugging Face's GPT-2 tokenizer that TransformerLens code uses.

``model.tokenizer`` is one of these: ``encode`` / ``decode`` / ``batch_decode`` / ``tokenize``,
``tokenizer(texts, padding=True, return_tensors="pt")`` with Hugging Face's arguments and
defaults, the vocabulary (``vocab``, ``convert_ids_to_tokens`` ...), and the pad / eos / bos
ids, all <|endoftext|> as TransformerLens sets them for GPT-2 (Hugging Face's own GPT-2
tokenizer has no pad token). ``padding_side`` ("right") is the default side of padding for
this tokenizer and for ``model.to_tokens``. As TransformerLens's ``model.tokenizer`` (loaded
with ``add_bos_token=True``), ``encode`` and the call prepend <|endoftext|> unless
``add_special_tokens=False``; ``LensTokenizer(add_bos_token=False)`` is GPT-2's own tokenizer,
which adds nothing. It wraps the offline tiktoken Encoding of minigpt2.tokenizer, so ids are GPT-2's.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .tokenizer import ENCODER_JSON_SHA256, EOT_TOKEN, N_VOCAB, _read_checked, get_tokenizer


class BatchEncoding(dict):
    """Hugging Face's tokenizer output: a dict whose keys are also attributes (``enc.input_ids``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# Hugging Face's clean_up_tokenization (decode(..., clean_up_tokenization_spaces=True)).
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class LensTokenizer:
    bos_token_id = eos_token_id = pad_token_id = unk_token_id = EOT_TOKEN
    bos_token = eos_token = pad_token = unk_token = "<|endoftext|>"
    all_special_ids = [EOT_TOKEN]
    all_special_tokens = ["<|endoftext|>"]
    model_max_length = 1024
    name_or_path = "gpt2"
    truncation_side = "right"

    def __init__(self, padding_side: str = "right", add_bos_token: bool = True):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.add_bos_token = bool(add_bos_token)
        self._enc = None
        self._vocab = None

    @property
    def enc(self):
        """The tiktoken Encoding (loaded on first use)."""
        if self._enc is None:
            self._enc = get_tokenizer()
        return self._enc

    @property
    def vocab_size(self) -> int:
        return N_VOCAB

    def __len__(self) -> int:
        return N_VOCAB

    # ---------------------------------------------------------------- vocabulary
    @property
    def vocab(self) -> dict[str, int]:
        """Token string (GPT-2's byte-to-unicode form, "Ġ" for a space) -> id, as Hugging Face's ``vocab``."""
        if self._vocab is None:
            self._vocab = json.loads(_read_checked("encoder.json", ENCODER_JSON_SHA256))
            self._id_to_token = {i: t for t, i in self._vocab.items()}
        return self._vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def convert_ids_to_tokens(self, ids):
        """An id (or ids) -> its token string(s) in the vocabulary's form ("Ġworld")."""
        self.vocab
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token[int(ids)]
        return [self._id_to_token[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens):
        """A token string (or strings) in the vocabulary's form -> id(s); unknown ones -> unk (<|endoftext|>)."""
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings in the vocabulary's form, as Hugging Face's ``tokenize`` (no BOS)."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None, **kwargs) -> list[int]:
        """Text -> ids, <|endoftext|> first when ``add_bos_token`` and ``add_special_tokens`` (TransformerLens's
        tokenizer); "<|endoftext|>" written in the text is the special token, as in Hugging Face's."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        ids = ([self.bos_token_id] if add_special_tokens and self.add_bos_token else []) + \
            self.enc.encode(text, allowed_special="all")
        return ids[:max_length] if truncation and max_length is not None else ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False,
               **kwargs) -> str:
        """Ids (list, tensor, array, or one id) -> text; bytes that are not whole UTF-8 characters become U+FFFD."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        text = self.enc.decode(ids)
        if clean_up_tokenization_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def batch_decode(self, rows, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False,
                     **kwargs) -> list[str]:
        if isinstance(rows, (torch.Tensor, np.ndarray)):
            rows = rows.tolist()
        return [self.decode(r, skip_special_tokens, clean_up_tokenization_spaces) for r in rows]

    # ---------------------------------------------------------------- batches
    def _rows(self, input, prepend_bos: bool, max_length: int | None) -> list[list[int]]:
        texts = [input] if isinstance(input, str) else list(input) if isinstance(input, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a string or a non-empty list of strings, got {_describe(input)}")
        rows = [([EOT_TOKEN] if prepend_bos else []) + self.encode(t, add_special_tokens=False) for t in texts]
        if any(not r for r in rows):
            raise ValueError("an empty string with prepend_bos=False has no tokens: give text, or prepend_bos=True")
        return [r[:max_length] for r in rows] if max_length else rows

    def pad(self, input, prepend_bos: bool = True, padding_side: str = "right",
            max_length: int | None = None) -> torch.Tensor:
        """[B, T] ids, shorter rows padded with <|endoftext|> on ``padding_side``."""
        return self._padded(input, prepend_bos, padding_side, max_length)[0]

    def attention_mask(self, input, prepend_bos: bool = True, padding_side: str = "right",
                       max_length: int | None = None) -> torch.Tensor:
        """[B, T] 1 = real token, for the rows ``pad`` makes of ``input``."""
        return self._padded(input, prepend_bos, padding_side, max_length)[1]

    def _padded(self, input, prepend_bos, padding_side, max_length, rows=None, width=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = self._rows(input, prepend_bos, max_length) if rows is None else rows
        T = max(map(len, rows)) if width is None else width
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    def __call__(self, text, padding: bool | str = False, truncation: bool | str = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True,
                 return_attention_mask: bool = True, **kwargs) -> BatchEncoding:
        """Hugging Face's call: {"input_ids", "attention_mask"} for a text (flat lists) or a list of texts.

        ``padding``: False / "do_not_pad", True / "longest" (pad to the longest row), "max_length"
        (pad to ``max_length``); ``truncation`` with ``max_length`` cuts rows on the right;
        ``return_tensors="pt"`` gives [B, T] tensors (rows must then be of one length) and [1, T] for
        one text. Pads are <|endoftext|>, on ``padding_side`` (the tokenizer's by default).
        """
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {_describe(text)}")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation not in (False, "do_not_truncate") and max_length is not None:
            rows = [r[:max_length] for r in rows]
        side = padding_side or self.padding_side
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max([max_length, *map(len, rows)])
        elif padding in (True, "longest"):
            width = max(map(len, rows), default=0)
        else:
            width = None
        if width is not None and rows:
            ids, mask = self._padded(None, False, side, None, rows=rows, width=width)
            ids, mask = ids.tolist(), mask.tolist()
        else:
            ids, mask = rows, [[1] * len(r) for r in rows]
        if return_tensors is not None:
            if len({len(r) for r in ids}) > 1:
                raise ValueError("Unable to create tensor, you should probably activate truncation and/or padding "
                                 "with 'padding=True' 'truncation=True' to have batched tensors with the same length.")
            if return_tensors == "pt":
                ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
            else:
                ids, mask = np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)
        elif single:
            ids, mask = ids[0], mask[0]
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = mask
        return out

    def __repr__(self) -> str:
        return (f"LensTokenizer(name_or_path='gpt2', vocab_size={N_VOCAB}, padding_side={self.padding_side!r}, "
                f"add_bos_token={self.add_bos_token})")


def _describe(x) -> str:
    if isinstance(x, (list, tuple)):
        kinds = sorted({type(t).__name__ for t in x})
        return f"an empty {type(x).__name__}" if not x else f"a {type(x).__name__} of {', '.join(kinds)}"
    return type(x).__name__


__all__ = ["BatchEncoding", "LensTokenizer"]
