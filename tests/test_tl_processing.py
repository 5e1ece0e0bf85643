"""TransformerLens's weight processing and state-dict layout, against TransformerLens 3.9 on the same weights.

Each processing function of minigpt2.processing is run beside TransformerLens's own (its ProcessWeights,
which HookedTransformer.from_pretrained applies) on the same state dict, TransformerLens's layout of a
tiny random GPT-2 (conftest's odd sizes, layer-norm gains and biases far from identity); then a whole
model processed here is compared with TransformerLens's HookedTransformer processed by its own
load_and_process_state_dict: state dicts, logits and activations. The layout tests load each side's
state dict into the other.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import make_model, make_tokens
from minigpt2 import GPT2, CheckpointError, load_pretrained
from minigpt2 import processing as P

pytest.importorskip("transformer_lens")
from transformer_lens.weight_processing import ProcessWeights  # noqa: E402

ATOL = 1e-5
FLAG_SETS = [  # TransformerLens's from_pretrained defaults first
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    dict(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
    dict(fold_ln=False, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
         refactor_factored_attn_matrices=True),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


MODEL_ARGS = dict(seed=3)  # the `pair` fixture's model (conftest.module_model)


def tl_processed(tl_raw, **flags):
    """TransformerLens's model processed by TransformerLens (a copy of the unprocessed twin, reloaded)."""
    tl = copy.deepcopy(tl_raw)
    raw = {k: v.clone() for k, v in tl_raw.state_dict().items()}
    tl.load_and_process_state_dict(raw, **flags)
    return tl


def assert_dicts_close(ours: dict, theirs: dict, atol: float = ATOL):
    assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        torch.testing.assert_close(ours[k].to(theirs[k].dtype), theirs[k], atol=atol, rtol=1e-5, msg=k)


# ------------------------------------------------------------------ each function against TransformerLens's
@pytest.mark.parametrize("fold_biases, center_weights", [(True, True), (True, False), (False, False)])
def test_fold_layer_norm_equals_transformer_lens(pair, fold_biases, center_weights):
    model, tl = pair
    sd = tl.state_dict()
    want = ProcessWeights.fold_layer_norm(sd, tl.cfg, fold_biases=fold_biases, center_weights=center_weights)
    got = P.fold_layer_norm(sd, model.cfg, fold_biases=fold_biases, center_weights=center_weights)
    assert_dicts_close(got, want)
    assert not torch.equal(got["blocks.1.attn.W_Q"], sd["blocks.1.attn.W_Q"])  # it did something
    assert torch.equal(sd["blocks.0.ln1.w"], tl.state_dict()["blocks.0.ln1.w"])  # the input is untouched


@pytest.mark.parametrize("name", ["center_writing_weights", "center_unembed", "fold_value_biases",
                                  "refactor_factored_attn_matrices"])
def test_each_step_equals_transformer_lens(pair, name):
    model, tl = pair
    sd = {k: v.clone() for k, v in tl.state_dict().items()}
    theirs = getattr(ProcessWeights, name)
    want = theirs(dict(sd)) if name == "center_unembed" else theirs(dict(sd), tl.cfg)
    got = getattr(P, name)(sd, model.cfg)
    assert_dicts_close(got, want)
    changed = [k for k in sd if not torch.equal(got[k], sd[k])]
    assert changed, name


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_process_weights_equals_transformer_lens(pair, flags):
    model, tl = pair
    sd = {k: v.clone() for k, v in tl.state_dict().items()}
    want = ProcessWeights.process_weights({k: v.clone() for k, v in sd.items()}, tl.cfg, **flags)
    assert_dicts_close(P.process_weights(sd, model.cfg, **flags), want)


# ------------------------------------------------------------------ a processed model against TransformerLens's
@pytest.mark.parametrize("flags", FLAG_SETS)
def test_processed_model_equals_transformer_lens(pair, flags):
    """State dict (layer norms gone when folded), logits, and every activation both have."""
    model, tl_raw = pair
    tl = tl_processed(tl_raw, **flags)
    ours = copy.deepcopy(model)
    ours.load_and_process_state_dict(ours.tl_state_dict(), **flags)
    assert_dicts_close(ours.tl_state_dict(), tl.state_dict())
    assert all(ln.folded for ln in (ours.ln_final, ours.blocks[0].ln1)) == flags["fold_ln"]
    assert ours.cfg.normalization_type == tl.cfg.normalization_type
    tokens = make_tokens(4, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), tl(tokens), atol=ATOL, rtol=1e-5)
        _, cache = ours.run_with_cache(tokens)
        _, tl_cache = tl.run_with_cache(tokens)
    common = [k for k in tl_cache.keys() if k in cache.keys()]
    assert len(common) > 30
    for k in common:
        torch.testing.assert_close(cache[k], tl_cache[k], atol=ATOL, rtol=1e-5, msg=k)
    # the probabilities are the unprocessed model's: processing changes only what a logit means
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).log_softmax(-1), model(tokens).log_softmax(-1), atol=1e-4, rtol=0)


def test_process_weights_in_place_equals_transformer_lens(pair):
    model, tl_raw = pair
    tl = copy.deepcopy(tl_raw)
    tl.process_weights_()
    ours = copy.deepcopy(model)
    ours.process_weights_()
    assert_dicts_close(ours.tl_state_dict(), tl.state_dict())
    assert ours.hf_layout_error() is not None


def test_from_pretrained_processes_as_transformer_lens(pair, tmp_path):
    model, tl_raw = pair
    model.save_pretrained(tmp_path / "tiny")
    tokens = make_tokens(3, 8, seed=2)
    ours = GPT2.from_pretrained(str(tmp_path / "tiny"), device="cpu")
    tl = tl_processed(tl_raw, fold_ln=True, center_writing_weights=True, center_unembed=True,
                      fold_value_biases=True)
    assert_dicts_close(ours.tl_state_dict(), tl.state_dict())
    raw = GPT2.from_pretrained_no_processing(tmp_path / "tiny", device="cpu")
    plain = load_pretrained(tmp_path / "tiny")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), tl(tokens), atol=ATOL, rtol=1e-5)
        assert torch.equal(raw(tokens), plain(tokens))  # load_pretrained stays raw
    assert raw.hf_layout_error() is None and ours.hf_layout_error() is not None
    with pytest.raises(CheckpointError, match="save_pretrained: the weights were processed"):
        ours.save_pretrained(tmp_path / "processed")


def test_from_pretrained_names_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "WEIGHTS_DIR", tmp_path)  # no weights/gpt2 here
    with pytest.raises(FileNotFoundError, match="nothing is downloaded here: put openai-community/gpt2's"):
        GPT2.from_pretrained("gpt2")
    make_model().save_pretrained(tmp_path / "tiny")
    assert P.resolve_name("tiny") == tmp_path / "tiny"  # a bundled model's name
    with pytest.raises(ValueError, match=r"from_pretrained\(hf_model=.*not supported"):
        GPT2.from_pretrained("tiny", hf_model=object())
    with pytest.raises(TypeError, match="unexpected keyword argument 'fold_lm'"):
        GPT2.from_pretrained("tiny", fold_lm=False)
    m = GPT2.from_pretrained("tiny", default_prepend_bos=False, dtype="float64", device="cpu")
    assert m.cfg.default_prepend_bos is False and m.dtype == torch.float64


# ------------------------------------------------------------------ the layout both ways
def test_transformer_lens_state_dict_loads_here_and_back(pair):
    """TL's state dict of the same weights loads here (strict, and strict=False as ARENA does) with the same
    logits; ours loads into TransformerLens strictly with the same logits."""
    model, tl = pair
    tokens = make_tokens(3, 8, seed=4)
    with torch.no_grad():
        want = tl(tokens)
        for strict in (True, False):
            fresh = make_model(seed=11)
            result = fresh.load_state_dict(tl.state_dict(), strict=strict)
            assert not result.missing_keys and not result.unexpected_keys
            torch.testing.assert_close(fresh(tokens), want, atol=ATOL, rtol=1e-5)
        tl_fresh = copy.deepcopy(tl)
        for p in tl_fresh.parameters():
            p.data.normal_()
        tl_fresh.load_state_dict(model.tl_state_dict(), strict=True)
        torch.testing.assert_close(tl_fresh(tokens), want, atol=ATOL, rtol=1e-5)
    assert model.tl_state_dict().keys() == tl.state_dict().keys()
    assert set(model.state_dict()) == set(make_model().state_dict())  # the own layout is unchanged


def test_a_processed_state_dict_loads_into_an_unprocessed_model(pair):
    """TransformerLens's processed layout has no layer-norm weights: loading it folds this model's layer norms."""
    model, tl_raw = pair
    tl = tl_processed(tl_raw, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    fresh = make_model(seed=12)
    fresh.load_state_dict(tl.state_dict())
    assert fresh.ln_final.folded and not fresh.unembed.tied
    tokens = make_tokens(2, 6, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), tl(tokens), atol=ATOL, rtol=1e-5)
    fresh.load_state_dict(tl_raw.state_dict())  # and back: layer norms and the tie restored
    assert not fresh.ln_final.folded and fresh.unembed.tied
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), tl_raw(tokens), atol=ATOL, rtol=1e-5)


def test_bad_state_dicts_are_named(pair):
    model, tl = pair
    sd = tl.state_dict()
    with pytest.raises(RuntimeError, match=r"missing keys \['blocks.0.attn.W_Q'\]"):
        make_model().load_state_dict({k: v for k, v in sd.items() if k != "blocks.0.attn.W_Q"})
    with pytest.raises(RuntimeError, match="size mismatch.*blocks.0.mlp.W_in"):
        make_model().load_state_dict(sd | {"blocks.0.mlp.W_in": torch.zeros(3, 3)})


def test_hooked_transformer_state_dict_is_transformer_lens_s(pair, tmp_path):
    """ARENA's idiom: HookedTransformer.from_pretrained(name, fold_ln=False, center_...=False), then
    other.load_state_dict(model.state_dict(), strict=False) into a module with TransformerLens's names;
    Hugging Face's layout stays on disk."""
    from minigpt2 import HookedTransformer

    model, tl_raw = pair
    model.save_pretrained(tmp_path / "tiny")
    flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False)
    ht = HookedTransformer.from_pretrained(str(tmp_path / "tiny"), device="cpu", **flags)
    tl = tl_processed(tl_raw, fold_value_biases=True, **flags)
    assert type(ht) is HookedTransformer and list(ht.state_dict()) == list(tl.state_dict())
    other = copy.deepcopy(tl)
    for p in other.parameters():
        p.data.zero_()
    result = other.load_state_dict(ht.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = make_tokens(2, 7, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), tl(tokens), atol=ATOL, rtol=1e-5)
        ht.save_pretrained(tmp_path / "again")  # value biases folded: still GPT-2's layout
        torch.testing.assert_close(load_pretrained(tmp_path / "again")(tokens), ht(tokens), atol=ATOL, rtol=1e-5)


def test_from_pretrained_on_a_bundled_model_equals_transformer_lens(tl_twin, bundled_base):
    """The first line of most notebooks, on real trained weights (weights/base, GPT-2's vocabulary): the logits
    and a direct logit attribution TransformerLens prints after its own default processing."""
    from test_lens_api import BASE

    tl = tl_processed(tl_twin(bundled_base, BASE), fold_ln=True, center_writing_weights=True, center_unembed=True,
                      fold_value_biases=True)
    ours = GPT2.from_pretrained("base", device=str(bundled_base.device))
    assert_dicts_close(ours.tl_state_dict(), tl.state_dict(), atol=1e-4)
    tokens = ours.to_tokens("if all cats are dogs and all dogs are birds then all cats are")
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        tl_logits, tl_cache = tl.run_with_cache(tokens)
        torch.testing.assert_close(logits, tl_logits, atol=1e-4, rtol=1e-5)
        birds = ours.to_single_token(" birds")
        direction = ours.tokens_to_residual_directions(birds)
        torch.testing.assert_close(direction, tl.tokens_to_residual_directions(birds), atol=1e-5, rtol=0)
        ours_dla = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=False) @ direction
        tl_dla = tl_cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=False) @ direction
        torch.testing.assert_close(ours_dla, tl_dla, atol=1e-4, rtol=1e-5)
