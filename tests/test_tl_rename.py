"""TransformerLens's own demo code, renamed word for word (``transformer_lens`` -> ``minigpt2``), gives
TransformerLens 3.9's numbers on the same weights.

Each DEMO below is cells of a HookedTransformer-era TransformerLens demo (Activation_Patching_in_TL_Demo,
Head_Detector_Demo, Main_Demo; ARENA's use of the switches), as written there, with only the plotting and
the model download left out (``model`` is given: TransformerLens's HookedTransformer, then minigpt2's
model, on the same weights, with no weight processing). The code runs once as it is, against
transformer_lens, and once through ``str.replace("transformer_lens", "minigpt2")``; every variable named
in the test must agree: tensors to float32 rounding at their scale, everything else exactly.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_model
from minigpt2 import GPT2Config

pytest.importorskip("transformer_lens")

ATOL = RTOL = 1e-5
BASE = Path(__file__).resolve().parents[1] / "weights" / "base"
# Small enough for TransformerLens's patching loops to take a second; GPT-2's vocabulary, for real prompts.
SMALL = GPT2Config(n_layer=2, n_head=4, d_model=32, d_mlp=37, n_ctx=48, vocab_size=50257)


def run_demo(code: str, tl_model, our_model, seed: int = 0) -> tuple[dict, dict]:
    """``code`` run against transformer_lens with ``model = tl_model``, and renamed against minigpt2 with
    ``model = our_model``: the two namespaces, each after the same seeds."""
    renamed = code.replace("transformer_lens", "minigpt2")
    assert renamed != code or "transformer_lens" not in code
    spaces = []
    for model, source in ((tl_model, code), (our_model, renamed)):
        ns = {"model": model}
        torch.manual_seed(seed)
        random.seed(seed)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # TransformerLens 3.9 deprecates its utils module
            exec(compile(source, "<demo>", "exec"), ns)
        spaces.append(ns)
    return spaces[0], spaces[1]


def same(ours, theirs, name: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), name
        assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        scale = max(1.0, theirs.abs().max().item()) if theirs.numel() and theirs.is_floating_point() else 1.0
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=ATOL * max(1.0, abs(theirs)), rel=RTOL), name
    elif isinstance(theirs, (list, tuple)) and theirs and isinstance(theirs[0], (torch.Tensor, float, list)):
        assert len(ours) == len(theirs), name
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{name}[{i}]")
    else:
        assert ours == theirs, name


def compare(tl_ns: dict, our_ns: dict, names: list[str]) -> None:
    for name in names:
        same(our_ns[name], tl_ns[name], name)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    from test_lens_api import hf_tokenizer

    return hf_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="module")
def small_pair(tl_twin, hf_tok):
    from test_lens_api import twin

    model = make_model(SMALL, seed=3, std=0.1)
    return model, twin(tl_twin, model, tokenizer=hf_tok)


@pytest.fixture(scope="module")
def base_pair(tl_twin, bundled_base, hf_tok):
    from test_lens_api import twin

    return bundled_base, twin(tl_twin, bundled_base, hf_dir=BASE, tokenizer=hf_tok)


# ---------------------------------------------------------------------- Activation_Patching_in_TL_Demo
ACTIVATION_PATCHING = '''
import torch
import transformer_lens
import transformer_lens.utils as utils
from transformer_lens.hook_points import (
    HookedRootModule,
    HookPoint,
)  # Hooking utilities
from transformer_lens import HookedTransformer, HookedTransformerConfig, FactoredMatrix, ActivationCache
import transformer_lens.patching as patching

prompts = ['When John and Mary went to the shops, John gave the bag to', 'When John and Mary went to the shops, Mary gave the bag to', 'When Tom and James went to the park, James gave the ball to', 'When Tom and James went to the park, Tom gave the ball to']
answers = [(' Mary', ' John'), (' John', ' Mary'), (' Tom', ' James'), (' James', ' Tom')]

clean_tokens = model.to_tokens(prompts)
# Swap each adjacent pair, with a hacky list comprehension
corrupted_tokens = clean_tokens[
    [(i+1 if i%2==0 else i-1) for i in range(len(clean_tokens)) ]
    ]
clean_string = model.to_string(clean_tokens[0])
corrupted_string = model.to_string(corrupted_tokens[0])

answer_token_indices = torch.tensor([[model.to_single_token(answers[i][j]) for j in range(2)] for i in range(len(answers))], device=model.cfg.device)

def get_logit_diff(logits, answer_token_indices=answer_token_indices):
    if len(logits.shape)==3:
        # Get final logits only
        logits = logits[:, -1, :]
    correct_logits = logits.gather(1, answer_token_indices[:, 0].unsqueeze(1))
    incorrect_logits = logits.gather(1, answer_token_indices[:, 1].unsqueeze(1))
    return (correct_logits - incorrect_logits).mean()

clean_logits, clean_cache = model.run_with_cache(clean_tokens)
corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)

clean_logit_diff = get_logit_diff(clean_logits, answer_token_indices).item()
corrupted_logit_diff = get_logit_diff(corrupted_logits, answer_token_indices).item()

CLEAN_BASELINE = clean_logit_diff
CORRUPTED_BASELINE = corrupted_logit_diff
def ioi_metric(logits, answer_token_indices=answer_token_indices):
    return (get_logit_diff(logits, answer_token_indices) - CORRUPTED_BASELINE) / (CLEAN_BASELINE  - CORRUPTED_BASELINE)

resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
attn_head_out_all_pos_act_patch_results = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, ioi_metric)
every_block_result = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)
every_head_all_pos_act_patch_result = patching.get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, ioi_metric)
str_tokens = model.to_str_tokens(clean_tokens[0])
'''


def test_activation_patching_demo(small_pair):
    theirs, ours = run_demo(ACTIVATION_PATCHING, small_pair[1], small_pair[0])
    assert theirs["patching"].__name__ == "transformer_lens.patching" and ours["patching"].__name__ == "minigpt2.patching"
    compare(theirs, ours, ["clean_tokens", "corrupted_tokens", "clean_string", "corrupted_string", "answer_token_indices",
                           "clean_logits", "clean_logit_diff", "corrupted_logit_diff", "resid_pre_act_patch_results",
                           "attn_head_out_all_pos_act_patch_results", "every_block_result",
                           "every_head_all_pos_act_patch_result", "str_tokens"])
    assert list(ours["clean_cache"].keys()) == list(theirs["clean_cache"].keys())


# ---------------------------------------------------------------------- Head_Detector_Demo
HEAD_DETECTOR = '''
import torch
import transformer_lens
from transformer_lens import HookedTransformer, ActivationCache
from transformer_lens.head_detector import detect_head, get_supported_heads

device = model.cfg.device
prompt = "The head detector feature for TransformerLens allows users to check for various common heads automatically, reducing the cost of discovery."
previous_scores = detect_head(model, prompt, "previous_token_head")
_, cache = model.run_with_cache(prompt)
previous_excluding = detect_head(model, prompt, "previous_token_head", exclude_bos=True, exclude_current_token=True)

prompt = "The following lexical sequence has been optimised for the maximisation of loquaciously multitoken letter combinations."
tokens = model.to_str_tokens(prompt)
detection_pattern = []
for i in range(2):
  detection_pattern.append([0 for t in tokens]) # Ignore BOS token and first token.
for i in range(2, len(tokens)):
    current_token = i
    previous_tokens_in_word = 0
    while not tokens[current_token].startswith(' '): # If the current token does not start with a space (and is not the first token) it's part of a word.
      previous_tokens_in_word += 1
      current_token -= 1
    # Hacky code that adds in some 1's where needed, and fills the rest of the row with 0's.
    detection_pattern.append([0 for j in range(i - previous_tokens_in_word)] + [1 for j in range(previous_tokens_in_word)] + [0 for j in range(i+1, len(tokens)+1)])
detection_pattern = torch.as_tensor(detection_pattern).to(device)
word_mul = detect_head(model, prompt, detection_pattern=detection_pattern, exclude_bos=False, exclude_current_token=True, error_measure="mul")
word_abs = detect_head(model, prompt, detection_pattern=detection_pattern, exclude_bos=False, exclude_current_token=True, error_measure="abs")

prompts = [
    "This is the first the test prompt.",
    "This is another test prompt, being just a sequence of tokens.",
    "If you're interested in mechanistic interpretability, this is how the sausage REALLY is made."
]
previous_average = detect_head(model, prompts, "previous_token_head", error_measure="abs")
duplicate_average = detect_head(model, prompts, "duplicate_token_head", error_measure="abs")
induction_average = detect_head(model, prompts, "induction_head", error_measure="abs")
some_heads = detect_head(model, prompt, "induction_head", heads=[(0, 1), (3, 5)], cache=model.run_with_cache(prompt, remove_batch_dim=True)[1])
'''


def test_head_detector_demo(base_pair):
    theirs, ours = run_demo(HEAD_DETECTOR, base_pair[1], base_pair[0])
    assert ours["detect_head"].__module__ == "minigpt2.head_detector"
    compare(theirs, ours, ["previous_scores", "previous_excluding", "tokens", "detection_pattern", "word_mul", "word_abs",
                           "previous_average", "duplicate_average", "induction_average", "some_heads"])
    assert ours["some_heads"][0, 0] == -1 and ours["some_heads"][3, 5] != -1  # unlisted heads score -1
    assert ours["previous_scores"].dtype == torch.float32


def test_transformer_lens_detect_head_runs_on_minigpt2(base_pair):
    """TransformerLens's own detect_head reads cfg.n_layers, n_heads, n_ctx, device and dtype, calls to_tokens and
    run_with_cache(remove_batch_dim=True), and indexes cache["pattern", l, "attn"]: on minigpt2's model it gives
    its numbers on TransformerLens's."""
    from transformer_lens.head_detector import detect_head as tl_detect_head

    ours, tl = base_pair
    # TransformerLens sets tokenizer_prepends_bos from its GPT-2 tokenizer (add_bos_token=True): minigpt2's agrees
    assert ours.cfg.tokenizer_prepends_bos is tl.cfg.tokenizer_prepends_bos is True
    prompt = "When John and Mary went to the shops, John gave the bag to Mary. When John and Mary"
    for name in ("previous_token_head", "duplicate_token_head", "induction_head"):
        for kw in ({}, {"exclude_bos": True, "error_measure": "abs"}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                same(tl_detect_head(ours, prompt, name, **kw), tl_detect_head(tl, prompt, name, **kw), f"{name} {kw}")


# ---------------------------------------------------------------------- Main_Demo
HOOKED_ROOT_MODULE = '''
import torch
import torch.nn as nn
from transformer_lens.hook_points import HookedRootModule, HookPoint


class SquareThenAdd(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))
        self.hook_square = HookPoint()

    def forward(self, x):
        # The hook_square doesn't change the value, but lets us access it
        square = self.hook_square(x * x)
        return self.offset + square


class TwoLayerModel(HookedRootModule):
    def __init__(self):
        super().__init__()
        self.layer1 = SquareThenAdd(3.0)
        self.layer2 = SquareThenAdd(-4.0)
        self.hook_in = HookPoint()
        self.hook_mid = HookPoint()
        self.hook_out = HookPoint()

        # We need to call the setup function of HookedRootModule to build an
        # internal dictionary of modules and hooks, and to give each hook a name
        super().setup()

    def forward(self, x):
        # We wrap the input and each layer's output in a hook - they leave the
        # value unchanged (unless there's a hook added to explicitly change it),
        # but allow us to access it.
        x_in = self.hook_in(x)
        x_mid = self.hook_mid(self.layer1(x_in))
        x_out = self.hook_out(self.layer2(x_mid))
        return x_out


model = TwoLayerModel()
out, cache = model.run_with_cache(torch.tensor(5.0))
output = out.item()
cached = [(key, cache[key].item()) for key in cache]

visited = []
def set_to_zero_hook(tensor, hook):
    visited.append(hook.name)
    return torch.tensor(0.0)

zeroed = model.run_with_hooks(torch.tensor(5.0), fwd_hooks=[("layer2.hook_square", set_to_zero_hook)]).item()
hook_names = sorted(model.hook_dict)
'''


def test_hooked_root_module_demo():
    theirs, ours = run_demo(HOOKED_ROOT_MODULE, None, None)
    assert type(ours["model"]).__mro__[1].__module__ == "minigpt2.hooks"
    compare(theirs, ours, ["output", "cached", "visited", "zeroed", "hook_names"])
    assert ours["output"] == (5.0 ** 2 + 3) ** 2 - 4 and ours["zeroed"] == -4.0


INDUCTION = '''
import torch
import einops
import transformer_lens.utils as utils
from transformer_lens.hook_points import HookPoint
from transformer_lens import evals

batch_size = 3
seq_len = 20
size = (batch_size, seq_len)
input_tensor = torch.randint(1000, 10000, size)

random_tokens = input_tensor.to(model.cfg.device)
repeated_tokens = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
repeated_logits = model(repeated_tokens)
correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
loss_by_position = einops.reduce(correct_log_probs, "batch position -> position", "mean")

induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)
def induction_score_hook(pattern, hook: HookPoint):
    induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1-seq_len)
    induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
    induction_score_store[hook.layer(), :] = induction_score

pattern_hook_names_filter = lambda name: name.endswith("pattern")
model.run_with_hooks(repeated_tokens, return_type=None, fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)])

induction_loss = evals.induction_loss(model, batch_size=2, subseq_len=20, device=model.cfg.device).item()
sanity = evals.sanity_check(model).item()
name = utils.get_act_name("pattern", 3)
import transformer_lens.utilities as utilities  # TransformerLens 3's name for utils
per_token = utilities.lm_cross_entropy_loss(repeated_logits, repeated_tokens, per_token=True)
'''


def test_induction_demo_and_evals(base_pair):
    theirs, ours = run_demo(INDUCTION, base_pair[1], base_pair[0])
    assert ours["evals"].__name__ == "minigpt2.evals"
    compare(theirs, ours, ["repeated_tokens", "loss_by_position", "induction_score_store", "induction_loss", "sanity",
                           "name", "per_token"])
    assert ours["utilities"].lm_cross_entropy_loss is ours["utils"].lm_cross_entropy_loss
    assert ours["induction_score_store"].abs().sum() > 0


def test_ioi_eval_matches(base_pair):
    import transformer_lens.evals as tl_evals

    from minigpt2 import evals

    ours, tl = base_pair
    results = []
    for module, model in ((tl_evals, tl), (evals, ours)):
        ds = module.IOIDataset(tokenizer=model.tokenizer, num_samples=12, seed=7)
        torch.manual_seed(0)
        results.append((len(ds), [ds[i]["prompt"].tolist() for i in range(3)], module.ioi_eval(model, dataset=ds)))
    (n_tl, prompts_tl, res_tl), (n, prompts, res) = results
    assert (n, prompts) == (n_tl, prompts_tl)
    assert res.keys() == res_tl.keys()
    for key in res:
        assert res[key] == pytest.approx(res_tl[key], abs=1e-5)


# ---------------------------------------------------------------------- the switches, as ARENA uses them
SWITCHES = '''
import torch
import transformer_lens.utils as utils

tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat and"])
default_names = list(model.run_with_cache(tokens)[1].keys())

model.set_use_attn_result(True)
_, cache = model.run_with_cache(tokens)
result_names = list(cache.keys())
head_results = cache["result", 1]
per_head, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)

model.set_use_split_qkv_input(True)
def zero_head_0_query_input(q_input, hook):
    q_input[:, :, 0] = 0.0
    return q_input
patched = model.run_with_hooks(tokens, fwd_hooks=[(utils.get_act_name("q_input", 1), zero_head_0_query_input)])
_, cache = model.run_with_cache(tokens, names_filter=lambda name: "ln1" in name or name.endswith("_input"))
split_names = list(cache.keys())
ln1_scale = cache["blocks.0.ln1.hook_scale"]
k_input = cache["k_input", 1]

model.set_use_attn_in(True)
model.set_use_hook_mlp_in(True)
model.set_use_split_qkv_input(False)
_, cache = model.run_with_cache(tokens, names_filter=lambda name: "ln1" in name or "_in" in name)
attn_in_names = list(cache.keys())
attn_in = cache["attn_in", 0]
ln1_normalized = cache["normalized", 1, "ln1"]
mlp_in = cache["mlp_in", 1]
for setter in (model.set_use_attn_result, model.set_use_attn_in, model.set_use_hook_mlp_in):
    setter(False)
'''


def test_the_switches_as_arena_uses_them(small_pair):
    theirs, ours = run_demo(SWITCHES, small_pair[1], small_pair[0])
    compare(theirs, ours, ["default_names", "result_names", "head_results", "per_head", "labels", "patched",
                           "split_names", "ln1_scale", "k_input", "attn_in_names", "attn_in", "ln1_normalized", "mlp_in"])
    assert ours["ln1_scale"].shape[2] == SMALL.n_head  # per head, as TransformerLens's with split inputs
    assert not any(getattr(small_pair[0].cfg, s) for s in ("use_attn_result", "use_attn_in", "use_hook_mlp_in"))


def test_tokenize_and_concatenate_matches(small_pair, tmp_path):
    """TransformerLens's tokenize_and_concatenate with Hugging Face's GPT-2 tokenizer, ours with it and with
    model.tokenizer: the same rows."""
    datasets = pytest.importorskip("datasets")
    from test_lens_api import hf_tokenizer
    from transformer_lens.utilities import tokenize_and_concatenate as tl_tokenize_and_concatenate

    from minigpt2 import utils

    texts = ["The cat sat on the mat.", "Induction heads copy what followed an earlier copy of the token.",
             "short", "A third document, long enough to fill a row of twelve tokens and more besides."] * 3
    dataset = datasets.Dataset.from_dict({"text": texts, "meta": list(range(len(texts)))})
    hf = hf_tokenizer(tmp_path / "tok")
    for i, kw in enumerate(({"max_length": 12}, {"max_length": 7, "add_bos_token": False}, {"max_length": 400})):
        # TransformerLens adds a pad token (<PAD>, id 50257, outside GPT-2's vocabulary) to the tokenizer and pads
        # later calls with it; on a fresh tokenizer it pads with EOS, as minigpt2 always does
        theirs = tl_tokenize_and_concatenate(dataset, hf_tokenizer(tmp_path / f"tok{i}"), num_proc=None, **kw)[:]["tokens"]
        for tokenizer in (hf, small_pair[0].tokenizer):
            ours = utils.tokenize_and_concatenate(dataset, tokenizer, num_proc=None, **kw)
            assert ours.column_names == ["tokens"]
            assert torch.equal(ours[:]["tokens"], theirs), kw
    assert theirs.shape[0] == 1 and theirs[0, -1] == hf.eos_token_id  # one short row, padded with EOS
