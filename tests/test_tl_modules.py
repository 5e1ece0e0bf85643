"""TransformerLens's modules called as modules, and forward from a layer, against TransformerLens 3.9.

A notebook calls ``model.embed(tokens)`` (W_E[tokens], without positions), ``model.pos_embed(tokens)``,
``model.blocks[0](resid)``, ``model.ln_final(x)``, ``model.unembed(x)`` and reads ``model.embed.W_E``,
``model.unembed.W_U`` / ``b_U``, ``blocks[l].ln1.w``: each here against the same call on
TransformerLens's HookedTransformer with the same weights (conftest's tl_twin). ``start_at_layer``
(forward from the residual stream entering a block) likewise.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_model, make_tokens

pytest.importorskip("transformer_lens")

ATOL = 1e-5
MODEL_ARGS = dict(seed=7)  # the `pair` fixture's model (conftest.module_model)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_embed_is_the_token_embedding_alone(pair):
    """ARENA's copying scores read model.embed(tokens): W_E[tokens], not the residual stream."""
    model, tl = pair
    tokens = make_tokens(3, 9, seed=1)
    with torch.no_grad():
        assert torch.equal(model.embed(tokens), tl.embed(tokens))
        assert torch.equal(model.embed(tokens), model.W_E[tokens])
        assert torch.equal(model.embed.W_E, tl.embed.W_E)
        assert torch.equal(model.pos_embed.W_pos, tl.pos_embed.W_pos)
        # the residual entering block 0 is their sum, as in TransformerLens
        close(model(tokens, stop_at_layer=0), model.embed(tokens) + model.pos_embed(tokens))


def test_pos_embed_with_an_offset_and_a_mask(pair):
    model, tl = pair
    tokens = make_tokens(3, 6, seed=2)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding, then positions count from the first real token
    mask[2, :7] = 0
    with torch.no_grad():
        assert torch.equal(model.pos_embed(tokens), tl.pos_embed(tokens))
        assert torch.equal(model.pos_embed(tokens, 4), tl.pos_embed(tokens, 4))
        assert torch.equal(model.pos_embed(tokens, 4, mask), tl.pos_embed(tokens, 4, mask))
        assert torch.equal(model.pos_embed(tokens, past_kv_pos_offset=0, attention_mask=mask[:, :6]),
                           tl.pos_embed(tokens, past_kv_pos_offset=0, attention_mask=mask[:, :6]))


def test_modules_called_as_modules(pair):
    model, tl = pair
    tokens = make_tokens(2, 8, seed=3)
    with torch.no_grad():
        resid = model.embed(tokens) + model.pos_embed(tokens)
        close(resid, tl.embed(tokens) + tl.pos_embed(tokens))
        for l in range(TINY.n_layer):
            close(model.blocks[l].ln1(resid), tl.blocks[l].ln1(resid))
            close(model.blocks[l].mlp(resid), tl.blocks[l].mlp(resid))
            close(model.blocks[l](resid), tl.blocks[l](resid))
            resid = tl.blocks[l](resid)
        close(model.ln_final(resid), tl.ln_final(resid))
        close(model.unembed(model.ln_final(resid)), tl.unembed(tl.ln_final(resid)))
        close(model.unembed(model.ln_final(resid)), model(tokens))


@pytest.mark.parametrize("name", ["embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U", "ln_final.w",
                                  "ln_final.b", "blocks.1.ln1.w", "blocks.1.ln2.b", "blocks.2.attn.W_Q",
                                  "blocks.2.attn.b_V", "blocks.0.attn.W_O", "blocks.0.mlp.W_in", "blocks.0.mlp.b_out"])
def test_parameters_under_transformer_lens_names(pair, name):
    model, tl = pair
    ours, theirs = model.get_submodule(name.rsplit(".", 1)[0]), tl.get_submodule(name.rsplit(".", 1)[0])
    a, b = getattr(ours, name.rsplit(".", 1)[1]), getattr(theirs, name.rsplit(".", 1)[1])
    assert a.shape == b.shape and torch.equal(a, b), name


def test_embed_edits_write_through(pair):
    """model.embed.W_E is the model's tensor: an edit changes the forward (and, tied, the unembedding)."""
    model, _ = pair
    model = make_model(seed=7)
    tokens = make_tokens(1, 5, seed=4)
    with torch.no_grad():
        before = model(tokens)
        model.embed.W_E[tokens[0, 0]] += 1.0
        assert not torch.allclose(model(tokens), before)
        assert model.unembed.W_U.data_ptr() == model.embed.W_E.data_ptr()


@pytest.mark.parametrize("start, stop", [(0, None), (1, None), (2, 3), (-1, None), (1, -1)])
def test_start_at_layer_equals_transformer_lens(pair, start, stop):
    model, tl = pair
    tokens = make_tokens(3, 7, seed=5)
    with torch.no_grad():
        first = start % TINY.n_layer
        resid = tl(tokens, stop_at_layer=first)
        close(model(resid, start_at_layer=start, stop_at_layer=stop),
              tl(resid, start_at_layer=start, stop_at_layer=stop))
        if stop is None:
            close(model(resid, start_at_layer=start), model(tokens))  # the rest of the forward
            close(model(resid, start_at_layer=start, tokens=tokens, return_type="loss"),
                  tl(resid, start_at_layer=start, tokens=tokens, return_type="loss"))


def test_start_at_layer_with_an_attention_mask(pair):
    """The mask masks keys only: positions are in the residual stream already (TransformerLens's rule)."""
    model, tl = pair
    tokens = make_tokens(3, 7, seed=6)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    with torch.no_grad():
        resid = model(tokens, attention_mask=mask, stop_at_layer=1)
        ours = model(resid, start_at_layer=1, attention_mask=mask)
        close(ours, tl(resid, start_at_layer=1, attention_mask=mask))
        close(ours[mask.bool()], model(tokens, attention_mask=mask)[mask.bool()])
        loss = model(resid, start_at_layer=1, attention_mask=mask, tokens=tokens, return_type="loss",
                     loss_per_token=True)
        close(loss, tl(resid, start_at_layer=1, attention_mask=mask, tokens=tokens, return_type="loss",
                       loss_per_token=True))


def test_start_at_layer_refusals(pair):
    model, _ = pair
    tokens = make_tokens(2, 5, seed=7)
    resid = model(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match=r"the input is the residual stream \[B, T, 32\]"):
        model(tokens, start_at_layer=1)
    with pytest.raises(ValueError, match="needs tokens="):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(resid, start_at_layer=1, attention_mask=torch.ones(2, 4))
