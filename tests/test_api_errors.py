"""Bad API calls end in a named error that names the culprit and the fix, never in a raw traceback from
deep inside torch (issue 25, "Trust, round two": the raw items of part 4 and attention_mask 0.5 of part 3).

One table: each bad call, the exception type it must raise and a fragment of its message that names
the culprit argument. Then properties: an attention mask is accepted exactly when it is binary, and
a binary mask of any dtype computes what its bool version does.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlab.acdc import acdc
from circuitlab.classify import classify_heads
from circuitlab.eap import eap, head_attribution
from circuitlab.graph import EdgeRunner
from circuitlab.search import search
from circuitlab.sweep import Prompts, sweep
from circuitlab.transfer import transfer
from minigpt2 import GPT2Config, KVCache, load_pretrained
from minigpt2 import patching as mp
from minigpt2.engine import Metric, MetricError
from minigpt2.masking import run_with_head_masks, run_with_head_masks_loop, single_head_masks
from minigpt2.model import AttentionMaskError, KVCacheError
from minigpt2.patching import CleanCacheError

from conftest import TINY, make_model, make_tokens

B, T = 3, 5
OTHER = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=20, n_ctx=23, vocab_size=99)  # fewer layers, narrower
NARROW = GPT2Config(n_layer=3, n_head=2, d_model=32, d_mlp=37, n_ctx=23, vocab_size=99)  # TINY's layers, 2 heads


@pytest.fixture(scope="module")
def ctx():
    """A tiny model, corrupted tokens [B, T], clean caches made right and wrong, and KV caches filled by others."""
    model, other, narrow = make_model(), make_model(OTHER, seed=1), make_model(NARROW, seed=2)
    tokens, clean = make_tokens(B, T), make_tokens(B, T, seed=1)

    def cache_of(m, toks):
        return m.run_with_cache(toks)[1]

    def filled(m, dtype=None):
        cache = KVCache(m.cfg.n_layer)
        (m if dtype is None else make_model().to(dtype))(tokens, cache=cache)
        return cache

    def on_meta():  # a cache as a model on another device leaves it (keys [B, T, H, d_head] there)
        cache = KVCache(TINY.n_layer)
        cache.k = [torch.zeros(B, T, TINY.n_head, TINY.d_head, device="meta") for _ in range(TINY.n_layer)]
        cache.v, cache.length = list(cache.k), T
        return cache

    half = torch.ones(B, T)
    half[1, 3] = 0.5
    return SimpleNamespace(
        model=model, tokens=tokens, cache=cache_of(model, clean),
        longer=cache_of(model, make_tokens(B, T + 1, seed=1)), shorter=cache_of(model, make_tokens(B, T - 1, seed=1)),
        fewer=cache_of(model, make_tokens(B - 1, T, seed=1)), other=cache_of(other, clean),
        narrow=cache_of(narrow, clean),
        kv_narrow=filled(narrow), kv_double=filled(model, torch.float64), kv_other=filled(other), kv_meta=on_meta(),
        half=half, metric=lambda logits: logits[:, -1, 0].mean(),
        masks=single_head_masks(TINY.n_layer, TINY.n_head))


def per_example(logits):  # [V, B, vocab] -> [V, B]
    return logits[..., 0]


# (id, call(ctx), exception type, message fragment (a regular expression) naming the culprit and the fix)
CASES = [
    # minigpt2.patching: a clean cache that does not pair with the corrupted run
    ("clean cache longer", lambda c: mp.get_act_patch_resid_pre(c.model, c.tokens, c.longer, c.metric),
     CleanCacheError, r"clean_cache\['blocks.0.hook_resid_pre'\] has shape \(3, 6, 32\).*6 positions, the corrupted 5"),
    ("clean cache shorter, pattern", lambda c: mp.get_act_patch_attn_head_pattern_by_pos(c.model, c.tokens, c.shorter,
                                                                                         c.metric),
     CleanCacheError, r"hook_pattern'\] has shape \(3, 4, 4, 4\).*4 positions, the corrupted 5"),
    ("clean cache of another batch", lambda c: mp.get_act_patch_attn_out(c.model, c.tokens, c.fewer, c.metric),
     CleanCacheError, r"clean batch has 2 prompts, the corrupted 3"),
    ("clean cache of a model of fewer layers", lambda c: mp.get_act_patch_resid_pre(c.model, c.tokens, c.other,
                                                                                    c.metric),
     CleanCacheError, r"holds layers 0\.\.1 only, so it comes from another model.*run_with_cache"),
    ("clean cache of a model of other heads", lambda c: mp.get_act_patch_attn_head_out_by_pos(c.model, c.tokens,
                                                                                              c.narrow, c.metric),
     CleanCacheError, r"hook_z'\] has shape \(3, 5, 2, 16\), the corrupted run's \(3, 5, 4, 8\).*another model"),
    ("clean cache None", lambda c: mp.get_act_patch_resid_pre(c.model, c.tokens, None, c.metric),
     TypeError, r"clean_cache must map hook names"),
    ("patching metric returns a vector", lambda c: mp.get_act_patch_resid_pre(c.model, c.tokens, c.cache,
                                                                              lambda logits: logits[:, -1, 0]),
     MetricError, r"patching_metric returned shape \(3,\).*must return a scalar.*batched_metric=True"),
    ("patching metric returns None", lambda c: mp.get_act_patch_resid_mid(c.model, c.tokens, c.cache, lambda lg: None),
     MetricError, r"patching_metric returned NoneType"),
    ("batched patching metric returns [n, B]", lambda c: mp.get_act_patch_resid_pre(
        c.model, c.tokens, c.cache, lambda logits: logits[:, :, -1, 0], batched_metric=True),
     MetricError, r"patching_metric \(batched_metric=True\) returned shape \(1, 3\).*one value per patch"),
    ("patching metric not callable", lambda c: mp.get_act_patch_resid_pre(c.model, c.tokens, c.cache, 3),
     TypeError, r"patching_metric must be a callable"),
    ("patching a model that is not a GPT2", lambda c: mp.get_act_patch_resid_pre("gpt2", c.tokens, c.cache, c.metric),
     TypeError, r"model must be a minigpt2 GPT2"),
    # minigpt2.masking / engine
    ("single_head_masks(0, 0)", lambda c: single_head_masks(0, 0), ValueError, r"n_layer=0 must be a whole number >= 1"),
    ("single_head_masks(3, -1)", lambda c: single_head_masks(3, -1), ValueError, r"n_head=-1 must be a whole number >= 1"),
    ("single_head_masks(2.5, 2)", lambda c: single_head_masks(2.5, 2), TypeError, r"n_layer must be an integer"),
    ("single_head_masks(None, 2)", lambda c: single_head_masks(None, 2), TypeError, r"n_layer .*got None"),
    ("single_head_masks(True, 2)", lambda c: single_head_masks(True, 2), TypeError, r"n_layer .*got True"),
    ("single_head_masks dtype", lambda c: single_head_masks(3, 4, dtype="float32"), TypeError, r"dtype must be"),
    ("head-mask metric returns a scalar", lambda c: run_with_head_masks(c.model, c.tokens, c.masks,
                                                                        metric=lambda logits: logits.mean()),
     MetricError, r"metric returned shape \(\) for 13 variants.*one value \(or row\) per variant"),
    ("head-mask metric drops a variant", lambda c: run_with_head_masks(c.model, c.tokens, c.masks,
                                                                       metric=lambda logits: logits[1:, :, 0]),
     MetricError, r"metric returned shape \(12, 3\) for 13 variants"),
    ("head-mask loop metric returns a scalar", lambda c: run_with_head_masks_loop(c.model, c.tokens, c.masks[:2],
                                                                                  metric=lambda logits: logits.mean()),
     MetricError, r"metric returned shape \(\) for 1 variants"),
    ("head-mask metric not callable", lambda c: run_with_head_masks(c.model, c.tokens, c.masks, metric="kl"),
     TypeError, r"metric must be None .* or a callable"),
    ("head masks on None", lambda c: run_with_head_masks(None, c.tokens, c.masks), TypeError,
     r"needs a minigpt2 GPT2 model"),
    ("ablation given as a list", lambda c: run_with_head_masks(c.model, c.tokens, c.masks, ablation=["zero"]),
     TypeError, r"the ablation must be a name.*\['zero'\]"),
    ("max_rows 2.5", lambda c: run_with_head_masks(c.model, c.tokens, c.masks, max_rows=2.5), ValueError,
     r"max_rows must be a whole number of rows >= 1.*2\.5"),
    # attention masks: binary only
    ("attention_mask 0.5", lambda c: c.model(c.tokens, attention_mask=c.half), AttentionMaskError,
     r"attention_mask\[1, 3\] is 0\.5.*only 1 \(real token\) and 0 \(padding\).*binary"),
    ("attention_mask 2", lambda c: c.model(c.tokens, attention_mask=torch.full((B, T), 2)), AttentionMaskError,
     r"attention_mask\[0, 0\] is 2"),
    ("attention_mask NaN", lambda c: c.model(c.tokens, attention_mask=torch.full((B, T), math.nan)),
     AttentionMaskError, r"attention_mask\[0, 0\] is nan"),
    ("attention_mask of text", lambda c: c.model(c.tokens, attention_mask="11111"), AttentionMaskError,
     r"attention_mask must be a \[B, T\] tensor"),
    ("attention_mask 0.5 in head masking", lambda c: run_with_head_masks(c.model, c.tokens, c.masks,
                                                                         attention_mask=c.half),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    ("attention_mask 0.5 in generate", lambda c: c.model.generate(c.tokens, max_new_tokens=1, attention_mask=c.half,
                                                                  verbose=False),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    ("attention_mask 0.5 in loss_fn", lambda c: c.model.loss_fn(c.model(c.tokens), c.tokens, attention_mask=c.half),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    ("attention_mask 0.5 in run_with_cache", lambda c: c.model.run_with_cache(c.tokens, attention_mask=c.half),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    # KV caches filled by another model
    ("KVCache of other heads", lambda c: c.model(c.tokens[:, :1], cache=c.kv_narrow), KVCacheError,
     r"filled by another model: its keys are \[B, T, 2, 16\].*this model's \[B, T, 4, 8\].*new KVCache"),
    ("KVCache of another dtype", lambda c: c.model(c.tokens[:, :1], cache=c.kv_double), KVCacheError,
     r"float64 on cpu, this model's .* float32"),
    ("KVCache on another device", lambda c: c.model(c.tokens[:, :1], cache=c.kv_meta), KVCacheError,
     r"float32 on meta, this model's .* float32 on cpu"),
    ("KVCache of fewer layers", lambda c: c.model(c.tokens[:, :1], cache=c.kv_other), KVCacheError,
     r"has 2 layers, the model 3.*KVCache\(model.cfg.n_layer\)"),
    ("cache given as a dict", lambda c: c.model(c.tokens, cache={}), TypeError, r"cache must be a minigpt2 KVCache"),
    ("KVCache('3')", lambda c: KVCache("3"), TypeError, r"KVCache\(n_layer\).*got '3'"),
    # the forward's and generate's other arguments
    ("stop_at_layer past the last block", lambda c: c.model(c.tokens, stop_at_layer=9), ValueError,
     r"stop_at_layer=9 must be a whole number from -3 to 3"),
    ("stop_at_layer '2'", lambda c: c.model(c.tokens, stop_at_layer="2"), TypeError, r"stop_at_layer must be an int"),
    ("positions of text", lambda c: c.model(c.tokens, positions="last"), TypeError,
     r"positions must be integer indices"),
    ("generate seed 1.5", lambda c: c.model.generate(c.tokens, 1, seed=1.5), TypeError, r"seed must be an integer"),
    ("generate eos_token_id outside the vocabulary", lambda c: c.model.generate(c.tokens, 1, eos_token_id=999),
     ValueError, r"eos_token_id: token id 999 is outside the vocabulary \[0, 99\)"),
    ("generate eos_token_id 'x'", lambda c: c.model.generate(c.tokens, 1, eos_token_id="x"), TypeError,
     r"eos_token_id must be a token id"),
    ("generate attention_mask of text", lambda c: c.model.generate(c.tokens, 1, attention_mask="111"),
     AttentionMaskError, r"attention_mask must be a \[B, T\] tensor"),
    # load_pretrained: the arguments, before anything is read (the path does not exist)
    ("load_pretrained(None)", lambda c: load_pretrained(None), TypeError, r"path must be a str or os.PathLike.*None"),
    ("load_pretrained(123)", lambda c: load_pretrained(123), TypeError, r"path must be a str or os.PathLike.*123"),
    ("load_pretrained(device='tpu')", lambda c: load_pretrained("no/such/checkpoint", device="tpu"), ValueError,
     r"device='tpu'\): not a device torch knows"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_call_raises_a_named_error(ctx, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(ctx)
    # named here, not deep inside torch: the innermost frame is the library's own check
    frame = info.traceback[-1]
    assert "/torch/" not in str(frame.path), f"raised inside torch: {frame.path}:{frame.lineno}"


GOOD, MEAN = Metric("logit0", per_example), Metric("mean0", lambda logits: logits[..., 0].mean(-1))  # [V, B]; [V]


def runner(c):
    return EdgeRunner(c.model, c.tokens, ablation="zero")


CIRCUITLAB_CASES = [  # circuitlab's public functions (sweep, search, acdc, eap, transfer, classify), their inputs
    ("sweep of one Metric, not a list", lambda c: sweep(c.model, Prompts(c.tokens), GOOD), TypeError,
     r"sweep takes a list of metrics: pass \[metric\]"),
    ("sweep of a plain function", lambda c: sweep(c.model, Prompts(c.tokens), [per_example]), TypeError,
     r"sweep takes minigpt2.engine.Metric objects"),
    ("sweep metric reducing the examples", lambda c: sweep(c.model, Prompts(c.tokens), [MEAN]), MetricError,
     r"metric 'mean0' returned shape \(13,\).*\[V, B\] = \[13, 3\]"),
    ("sweep of a tensor, not Prompts", lambda c: sweep(c.model, c.tokens, [GOOD]), TypeError,
     r"sweep takes circuitlab.sweep.Prompts"),
    ("search metric reducing the examples", lambda c: search(c.model, Prompts(c.tokens), MEAN), MetricError,
     r"metric 'mean0' returned shape \(1,\)"),
    ("search of a list of metrics", lambda c: search(c.model, Prompts(c.tokens), [GOOD]), TypeError,
     r"search \(metric=\) takes one minigpt2.engine.Metric"),
    ("Prompts with attention_mask 0.5", lambda c: Prompts(c.tokens, attention_mask=c.half), AttentionMaskError,
     r"attention_mask\[1, 3\] is 0\.5"),
    ("Prompts with a mask of another shape", lambda c: Prompts(c.tokens, attention_mask=torch.ones(B, T - 1)),
     AttentionMaskError, r"attention_mask has shape \(3, 4\), expected \(3, 5\)"),
    ("Prompts of float tokens", lambda c: Prompts(c.tokens.float()), TypeError, r"integer token ids"),
    ("acdc on a model, not a runner", lambda c: acdc(c.model, GOOD, 0.1), TypeError, r"acdc takes an EdgeRunner"),
    ("acdc metric returns None", lambda c: acdc(runner(c), lambda logits: None, 0.1), MetricError,
     r"one value per variant \[V\], got NoneType"),
    ("eap on a model, not a runner", lambda c: eap(c.model, GOOD, top_k=3), TypeError,
     r"edge_attribution takes an EdgeRunner"),
    ("eap metric returns None", lambda c: eap(runner(c), lambda logits: None, top_k=3), MetricError,
     r"got NoneType for V=1"),
    ("EdgeRunner of one sequence", lambda c: EdgeRunner(c.model, c.tokens[0]), ValueError,
     r"tokens has shape \(5,\).*tokens\[None\]"),
    ("EdgeRunner with attention_mask 0.5", lambda c: EdgeRunner(c.model, c.tokens, ablation="zero",
                                                               attention_mask=c.half),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    ("head_attribution metric per example", lambda c: head_attribution(c.model, c.tokens, per_example,
                                                                       ablation="zero"),
     MetricError, r"got shape \(1, 3\) for V=1"),
    ("transfer of a list of models", lambda c: transfer([c.model], {"c": {}}, Prompts(c.tokens), [GOOD]),
     TypeError, r"transfer takes models as a dict name -> minigpt2 GPT2, got list"),
    ("transfer of a circuit given as a list", lambda c: transfer({"m": c.model}, {"c": [[0, 1]]},
                                                                 Prompts(c.tokens), [GOOD]),
     TypeError, r"transfer takes circuits as a dict name -> circuit.*holding list"),
    ("classify_heads with attention_mask 0.5", lambda c: classify_heads(c.model, c.tokens, attention_mask=c.half),
     AttentionMaskError, r"attention_mask\[1, 3\] is 0\.5"),
    ("classify_heads of a path, not a model", lambda c: classify_heads("weights/base", c.tokens), TypeError,
     r"classify_heads needs a minigpt2 GPT2 model"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in CIRCUITLAB_CASES],
                         ids=[case[0] for case in CIRCUITLAB_CASES])
def test_circuitlab_bad_call_raises_a_named_error(ctx, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(ctx)
    assert "/torch/" not in str(info.traceback[-1].path)


def test_the_metric_is_checked_before_any_patched_run(ctx):
    calls = []

    def metric(logits):
        calls.append(logits.shape)
        return logits[:, -1, 0]  # a vector: one value per example, not per patch

    with pytest.raises(MetricError):
        mp.get_act_patch_resid_pre(ctx.model, ctx.tokens, ctx.cache, metric)
    assert calls == [(B, T, TINY.vocab_size)]  # one call, on the corrupted run's logits


def test_a_clean_cache_of_one_prompt_broadcasts_as_in_transformer_lens(ctx):
    """A batch-1 clean cache is not refused: TransformerLens's setters broadcast it over the corrupted batch."""
    one = {k: v[:1] for k, v in ctx.cache.items()}
    full = {k: v[:1].expand_as(v).clone() for k, v in ctx.cache.items()}
    got = mp.get_act_patch_resid_pre(ctx.model, ctx.tokens, one, ctx.metric)
    torch.testing.assert_close(got, mp.get_act_patch_resid_pre(ctx.model, ctx.tokens, full, ctx.metric))


# ----------------------------------------------------------------------------- attention masks, as properties
_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=st.data(), value=st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: x not in (0.0, 1.0)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_a_mask_with_any_non_binary_value_is_refused_naming_it(ctx, data, value, dtype):
    mask = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=B * T, max_size=B * T))
    mask = torch.tensor(mask, dtype=dtype).view(B, T)
    b, t = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1))
    mask[b, t] = torch.tensor(value, dtype=torch.float64).to(dtype)  # beyond the dtype's range: inf
    if mask[b, t].item() in (0.0, 1.0):  # rounded to a binary value in a low precision: then it is a fine mask
        return
    with pytest.raises(AttentionMaskError, match=rf"attention_mask\[{b}, {t}\] is "):
        ctx.model(ctx.tokens, attention_mask=mask)


@_SETTINGS
@given(value=st.integers().filter(lambda x: x not in (0, 1)), b=st.integers(0, B - 1), t=st.integers(0, T - 1),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8]))
def test_an_integer_mask_other_than_0_1_is_refused(ctx, value, b, t, dtype):
    info = torch.iinfo(dtype)
    value = min(max(value, info.min), info.max)
    if value in (0, 1):
        return
    mask = torch.ones(B, T, dtype=dtype)
    mask[b, t] = value
    with pytest.raises(AttentionMaskError, match=rf"attention_mask\[{b}, {t}\] is {value}"):
        ctx.model(ctx.tokens, attention_mask=mask)


@_SETTINGS
@given(bits=st.lists(st.booleans(), min_size=B * T, max_size=B * T),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.int8]),
       as_list=st.booleans())
def test_a_binary_mask_of_any_dtype_computes_what_its_bool_version_does(ctx, bits, dtype, as_list):
    real = torch.tensor(bits).view(B, T)
    real[:, -1] = True  # every row has a real token
    mask = real.to(dtype).tolist() if as_list else real.to(dtype)
    torch.testing.assert_close(ctx.model(ctx.tokens, attention_mask=mask), ctx.model(ctx.tokens, attention_mask=real),
                               rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(n_layer=st.integers(-2, 4), n_head=st.integers(-2, 4))
def test_single_head_masks_take_sizes_of_at_least_one(n_layer, n_head):
    if n_layer < 1 or n_head < 1:
        culprit, value = ("n_layer", n_layer) if n_layer < 1 else ("n_head", n_head)  # n_layer is checked first
        with pytest.raises(ValueError, match=rf"{culprit}={value} must be a whole number >= 1 \("):
            single_head_masks(n_layer, n_head)
        return
    masks = single_head_masks(n_layer, n_head)
    n = n_layer * n_head
    assert masks.shape == (1 + n, n_layer, n_head)
    assert masks[0].eq(1).all() and masks[1:].view(n, n).eq(1 - torch.eye(n)).all()  # clean, then each head alone
