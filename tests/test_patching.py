"""minigpt2.patching against TransformerLens 3.x's own transformer_lens.patching on the same weights.

The TransformerLens twin is built as bench/bench_sweep.py builds it: our checkpoint loaded by
transformers' GPT2LMHeadModel, converted by convert_gpt2_weights into a HookedTransformer, no weight
processing. Clean and corrupted prompts share a prefix (so that some patches change nothing) and
differ after it. Every named function is compared with TransformerLens's function of the same name,
and a hypothesis property compares the batched computation with one hooked forward per patch
(TransformerLens's algorithm, on our model) on random small models.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt2 import GPT2Config, load_pretrained
from minigpt2 import patching as mp

tl_patching = pytest.importorskip("transformer_lens.patching")

B, T = 3, 5  # batch and sequence length; TINY has 3 layers of 4 heads, vocab 99
ATOL = 1e-5


def tl_twin(model, tmp_path):
    """TransformerLens's HookedTransformer with ``model``'s weights (via transformers' GPT-2), on its device."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp_path / "ckpt")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, default_prepend_bos=False, original_architecture="GPT2LMHeadModel",
        positional_embedding_type="standard", device=str(model.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval()


# The models, their TransformerLens twins and every tensor live on the test device (conftest's ``device``:
# MINIGPT2_TEST_DEVICE, default cpu); the random draws are made on the CPU, so they are the same everywhere.
@pytest.fixture(scope="module")
def setup(tmp_path_factory, device):
    from conftest import make_model

    torch.manual_seed(0)
    model = make_model(device=device)
    tl = tl_twin(model, tmp_path_factory.mktemp("tl"))
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2:] = torch.randint(0, model.cfg.vocab_size, (B, T - 2), generator=gen)  # common prefix of 2
    corrupted[0, 3] = clean[0, 3]
    answers = torch.randint(0, model.cfg.vocab_size, (2, B), generator=gen)
    clean, corrupted, answers = clean.to(device), corrupted.to(device), answers.to(device)
    _, cache = model.run_with_cache(clean)
    _, tl_cache = tl.run_with_cache(clean)
    return model, tl, clean, corrupted, answers, cache, tl_cache


def last_logit_diff(answers):
    rows = torch.arange(answers.shape[1], device=answers.device)

    def metric(logits):  # [B, T, V] -> scalar, at the last position
        return (logits[rows, -1, answers[0]] - logits[rows, -1, answers[1]]).mean()
    return metric


def every_position(targets):
    def metric(logits):  # reads every position: mean log-probability of the clean tokens
        return logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
    return metric


def quiet(fn, *args):
    """Call a TransformerLens function without its tqdm bar and deprecation warnings."""
    bar = tl_patching.tqdm
    tl_patching.tqdm = lambda it, *a, **k: it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    finally:
        tl_patching.tqdm = bar


NAMED = [
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every",
]
SHAPES = {  # TINY: 3 layers, 4 heads; T positions
    "resid_pre": (3, T), "resid_mid": (3, T), "attn_out": (3, T), "mlp_out": (3, T),
    "attn_head_out_by_pos": (3, T, 4), "attn_head_q_by_pos": (3, T, 4), "attn_head_k_by_pos": (3, T, 4),
    "attn_head_v_by_pos": (3, T, 4), "attn_head_pattern_by_pos": (3, 4, T),
    "attn_head_pattern_dest_src_pos": (3, 4, T, T), "attn_head_out_all_pos": (3, 4), "attn_head_q_all_pos": (3, 4),
    "attn_head_k_all_pos": (3, 4), "attn_head_v_all_pos": (3, 4), "attn_head_pattern_all_pos": (3, 4),
    "attn_head_all_pos_every": (5, 3, 4), "attn_head_by_pos_every": (5, 3, T, 4), "block_every": (3, 3, T),
}


@pytest.mark.parametrize("name", NAMED)
def test_named_function_equals_transformer_lens(setup, name):
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    metric = last_logit_diff(answers)
    ours = getattr(mp, name)(model, corrupted, cache, metric)
    theirs = quiet(getattr(tl_patching, name), tl, corrupted, tl_cache, metric)
    assert ours.shape == theirs.shape == SHAPES[name.removeprefix("get_act_patch_")]
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    assert ours.max() - ours.min() > 1e-4  # the patches do something


@pytest.mark.parametrize("name", ["get_act_patch_resid_mid", "get_act_patch_attn_head_v_by_pos",
                                  "get_act_patch_attn_head_pattern_by_pos"])
def test_metric_reading_every_position(setup, name):
    """A metric over all positions sees every position's logits, prefix included, as in TransformerLens."""
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    metric = every_position(torch.randint(0, model.cfg.vocab_size, (B, T),
                                          generator=torch.Generator().manual_seed(2)).to(model.device))
    ours = getattr(mp, name)(model, corrupted, cache, metric)
    theirs = quiet(getattr(tl_patching, name), tl, corrupted, tl_cache, metric)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)


def test_generic_with_index_df_and_custom_setter(setup):
    """index_df (flat output, return_index_df) and a setter of the caller's own (half the batch, residual
    at a layer); TransformerLens's generic function on the same arguments."""
    pd = pytest.importorskip("pandas")
    model, tl, clean, corrupted, answers, cache, tl_cache = setup

    def first_row_setter(act, index, clean_act):  # index = [layer, pos]: only batch row 0
        act[0, index[1]] = clean_act[0, index[1]]
        return act
    df = pd.DataFrame({"layer": [2, 0, 1, 1, 0], "pos": [4, 2, 3, 0, 1]})
    metric = last_logit_diff(answers)
    ours, ours_df = mp.generic_activation_patch(model, corrupted, cache, metric, first_row_setter, "resid_post",
                                                index_df=df, return_index_df=True)
    theirs = quiet(tl_patching.generic_activation_patch, tl, corrupted, tl_cache, metric, first_row_setter,
                   "resid_post", None, df)
    assert ours.shape == (5,) and ours_df is df
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    _, made = mp.generic_activation_patch(model, corrupted, cache, metric, mp.layer_pos_patch_setter, "resid_pre",
                                          ("layer", "pos"), return_index_df=True)
    pd.testing.assert_frame_equal(made, tl_patching.make_df_from_ranges([3, T], ["layer", "pos"]))

    def in_place_setter(act, index, clean_act):  # returns None: refused (TransformerLens would drop the edit)
        act[:, :, index[1]] = clean_act[:, :, index[1]]
    with pytest.raises(TypeError, match="returned None"):
        mp.generic_activation_patch(model, corrupted, cache, metric, in_place_setter, "v",
                                    index_df=pd.DataFrame({"layer": [0, 2], "head": [3, 0]}))


def test_options_give_the_same_values(setup):
    """max_rows (many chunks), a batched metric, logit_positions and a plain-dict cache change nothing."""
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    metric = last_logit_diff(answers)
    ref = mp.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    rows = torch.arange(B, device=model.device)

    def batched(logits):  # [n, B, T, V] -> [n]
        return (logits[:, rows, -1, answers[0]] - logits[:, rows, -1, answers[1]]).mean(dim=1)
    small = {k: v for k, v in cache.items() if k.endswith("hook_z")}
    for kwargs in [dict(max_rows=B), dict(max_rows=2 * B + 1), dict(batched_metric=True),
                   dict(logit_positions=[-1]), dict(logit_positions=T - 1, batched_metric=True, max_rows=5 * B)]:
        m = batched if kwargs.get("batched_metric") else metric
        out = mp.get_act_patch_attn_head_out_by_pos(model, corrupted, small, m, **kwargs)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5, msg=str(kwargs))


def test_logit_positions_gives_nan_elsewhere(setup):
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    seen = []

    def metric(logits):
        seen.append((logits[:, -1].isfinite().all().item(), logits[:, :-1].isnan().all().item()))
        return logits[:, -1].sum()
    mp.get_act_patch_resid_pre(model, corrupted, cache, metric, logit_positions=[T - 1])
    assert seen and all(a and b for a, b in seen)


def test_no_op_patches_give_the_corrupted_metric(setup):
    """Positions of the shared prefix: patching them changes nothing (found by comparison, not computed)."""
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    metric = last_logit_diff(answers)
    out = mp.get_act_patch_resid_pre(model, corrupted, cache, metric)
    base = metric(model(corrupted)).item()
    torch.testing.assert_close(out[:, :2], torch.full((3, 2), base, device=out.device), atol=ATOL, rtol=1e-5)
    assert (out[:, 2:] - base).abs().max() > 1e-3


def test_refuses_hooked_model_and_bad_names(setup):
    model, tl, clean, corrupted, answers, cache, tl_cache = setup
    metric = last_logit_diff(answers)
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        with pytest.raises(RuntimeError, match="active hooks"):
            mp.get_act_patch_resid_pre(model, corrupted, cache, metric)
    with pytest.raises(KeyError, match="no hook point"):
        mp.generic_activation_patch(model, corrupted, cache, metric, mp.layer_pos_patch_setter, "resid_prez",
                                    ("layer", "pos"))
    with pytest.raises(ValueError, match="or index_df"):
        mp.generic_activation_patch(model, corrupted, cache, metric, mp.layer_pos_patch_setter, "resid_pre")
    with pytest.raises(ValueError, match="logit_positions must be"):
        mp.get_act_patch_resid_pre(model, corrupted, cache, metric, logit_positions=[T])
    with pytest.raises(KeyError, match="clean_cache has no activation"):
        mp.get_act_patch_resid_pre(model, corrupted, {}, metric)


def test_get_act_name_matches_transformer_lens():
    from transformer_lens.utilities import get_act_name

    for args in [("resid_pre", 0), ("z", 3), ("pattern", 1), ("attn", 2), ("k6",), ("scale4ln1",), ("pre5",),
                 ("embed",), ("normalized", 27, "ln2"), ("blocks.3.attn.hook_z",), ("q", 1, "a"), ("scale",),
                 ("attn_out", 2), ("mlp_out", 0), ("resid_mid", 1), ("q_input", 2), ("result", 0)]:
        assert mp.get_act_name(*args) == get_act_name(*args), args


def test_bundled_base_model(tmp_path, device):
    """weights/base (12 x 12 heads, d_model 144) on TPP prompts: every patch of ours, a spread of them by
    TransformerLens's generic function (index_df; its full runs would take most of a minute)."""
    pd = pytest.importorskip("pandas")
    from minigpt2 import get_tokenizer

    model = load_pretrained("weights/base", device=device)
    tl = tl_twin(model, tmp_path)
    enc = get_tokenizer()
    texts = [("if all cats are dogs and all dogs are birds then all cats are",
              "if all cats are dogs and all dogs are birds then all dogs are"),
             ("if all cows are frogs and all frogs are fish then all cows are",
              "if all cows are frogs and all frogs are fish then all frogs are")]
    clean = torch.tensor([enc.encode(c) for c, _ in texts], device=device)
    corrupted = torch.tensor([enc.encode(c) for _, c in texts], device=device)
    answers = torch.tensor([[enc.encode(" birds")[0], enc.encode(" fish")[0]],
                            [enc.encode(" dogs")[0], enc.encode(" frogs")[0]]], device=device)
    metric = last_logit_diff(answers)
    _, cache = model.run_with_cache(clean, names=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
    _, tl_cache = tl.run_with_cache(clean)
    L, H, n = model.cfg.n_layer, model.cfg.n_head, clean.shape[1]
    for name, setter, act, axes, grid in [
            ("get_act_patch_resid_pre", mp.layer_pos_patch_setter, "resid_pre", ["layer", "pos"],
             [(l, p) for l in range(L) for p in range(n)]),
            ("get_act_patch_attn_head_out_all_pos", mp.layer_head_vector_patch_setter, "z", ["layer", "head"],
             [(l, h) for l in range(L) for h in range(H)])]:
        ours = getattr(mp, name)(model, corrupted, cache, metric)
        spread = grid[::len(grid) // 12][:12]
        theirs = quiet(tl_patching.generic_activation_patch, tl, corrupted, tl_cache, metric, setter, act, None,
                       pd.DataFrame(spread, columns=axes))
        torch.testing.assert_close(ours[tuple(torch.tensor(spread).T)], theirs, atol=ATOL, rtol=1e-5)
        assert ours.std() > 1e-3


# ----------------------------------------------------------------------------- property: batched = one forward per patch
CASES = [  # (activation name, setter, index axes)
    ("resid_pre", mp.layer_pos_patch_setter, ("layer", "pos")),
    ("resid_post", mp.layer_pos_patch_setter, ("layer", "pos")),
    ("mlp_out", mp.layer_pos_patch_setter, ("layer", "pos")),
    ("pre", mp.layer_pos_patch_setter, ("layer", "pos")),
    ("z", mp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
    ("k", mp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
    ("q_input", mp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
    ("v", mp.layer_head_vector_patch_setter, ("layer", "head")),
    ("result", mp.layer_head_vector_patch_setter, ("layer", "head")),
    ("pattern", mp.layer_head_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos")),
    ("attn_scores", mp.layer_head_dest_src_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos", "src_pos")),
    ("pattern", mp.layer_head_pattern_patch_setter, ("layer", "head_index")),
]


def one_forward_per_patch(model, corrupted, clean_cache, metric, setter, act_name, axes):
    """TransformerLens's algorithm on our model: a hooked forward per index."""
    ranges = mp._axis_ranges(model, corrupted, act_name)
    shape = [ranges[a] for a in axes]
    out = torch.zeros(shape, device=corrupted.device)
    for index in itertools.product(*map(range, shape)):
        name = mp.get_act_name(act_name, layer=index[0])

        def hook(act, hook, index=list(index), name=name):
            return setter(act.clone(), index, clean_cache[name])
        out[index] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).item()
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 3), d_head=st.integers(1, 4), d_mlp=st.integers(1, 9),
       vocab=st.integers(2, 13), batch=st.integers(1, 3), seq=st.integers(1, 4), shared=st.integers(0, 4),
       case=st.sampled_from(range(len(CASES))), max_rows=st.one_of(st.none(), st.integers(1, 12)),
       read=st.integers(0, 15), tell=st.booleans(), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_batched_equals_one_forward_per_patch(new_model, device, n_layer, n_head, d_head, d_mlp, vocab, batch, seq,
                                              shared, case, max_rows, read, tell, batched, seed):
    """``read``: the positions the metric reads (bits; 0 = all); ``tell``: pass them as logit_positions."""
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, d_model=n_head * d_head, d_mlp=d_mlp, n_ctx=seq + 2,
                     vocab_size=vocab)
    model = new_model(cfg, seed=seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupted = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupted[:, :shared] = clean[:, :shared]
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    clean, corrupted, targets = clean.to(device), corrupted.to(device), targets.to(device)
    positions = [p for p in range(seq) if read >> p & 1] or list(range(seq))

    def metric(logits):  # [B, T, V] -> scalar
        return logits[:, positions].log_softmax(-1).gather(-1, targets[:, positions, None]).mean()
    act_name, setter, axes = CASES[case]
    _, cache = model.run_with_cache(clean, names=list(model.hook_dict))  # every point by name: per-head inputs too
    kwargs = dict(max_rows=max_rows, logit_positions=positions if tell else None, batched_metric=batched)
    ours = mp.generic_activation_patch(model, corrupted, cache, torch.vmap(metric) if batched else metric, setter,
                                       act_name, axes, **kwargs)
    ref = one_forward_per_patch(model, corrupted, cache, metric, setter, act_name, axes)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-5)
