"""Cells of TransformerLens 4.3's demos/Exploratory_Analysis_Demo.ipynb (the TransformerBridge version), as
written there but for the plots and prints, the model path (MODEL_DIR) and ``torch.set_grad_enabled``.
tests/tools/make_tl4_record.py runs them with TransformerLens 4 and records OUTPUTS; tests/test_tl4_bridge.py
runs them with ``transformer_lens`` renamed to ``minigpt2`` and compares."""

CELLS = '''
from functools import partial

import einops
import torch
from fancy_einsum import einsum

import transformer_lens.utilities as utils
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge

model = TransformerBridge.boot_transformers(MODEL_DIR)
model.enable_compatibility_mode(
    center_unembed=True,
    center_writing_weights=True,
    fold_ln=True,
    refactor_factored_attn_matrices=True,
)
model.set_use_attn_result(True)
device: torch.device = utils.get_device()

prompt_format = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
]
names = [
    (" Mary", " John"),
    (" Tom", " James"),
]
prompts = []
answers = []
answer_tokens = []
for i in range(len(prompt_format)):
    for j in range(2):
        answers.append((names[i][j], names[i][1 - j]))
        answer_tokens.append(
            (
                model.to_single_token(answers[-1][0]),
                model.to_single_token(answers[-1][1]),
            )
        )
        prompts.append(prompt_format[i].format(answers[-1][1]))
answer_tokens = torch.tensor(answer_tokens)

tokens = model.to_tokens(prompts, prepend_bos=True)
original_logits, cache = model.run_with_cache(tokens)


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    if per_prompt:
        return answer_logit_diff
    else:
        return answer_logit_diff.mean()


per_prompt_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True)
original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)

W_U = model.unembed.W_U
answer_residual_directions = W_U[:, answer_tokens]
answer_residual_directions = einops.rearrange(
    answer_residual_directions, "d_model batch correct_incorrect -> batch correct_incorrect d_model"
)
logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

final_residual_stream = cache["resid_post", -1]
final_token_residual_stream = final_residual_stream[:, -1, :]
scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
average_logit_diff = einsum(
    "batch d_model, batch d_model -> ",
    scaled_final_token_residual_stream,
    logit_diff_directions,
) / len(prompts)


def residual_stack_to_logit_diff(residual_stack, cache: ActivationCache) -> float:
    scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return einsum(
        "... batch d_model, batch d_model -> ...",
        scaled_residual_stack,
        logit_diff_directions,
    ) / len(prompts)


accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
per_head_logit_diffs = einops.rearrange(
    per_head_logit_diffs,
    "(layer head_index) -> layer head_index",
    layer=model.cfg.n_layers,
    head_index=model.cfg.n_heads,
)

corrupted_prompts = []
for i in range(0, len(prompts), 2):
    corrupted_prompts.append(prompts[i + 1])
    corrupted_prompts.append(prompts[i])
corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
corrupted_average_logit_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)


def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
    clean_value = clean_cache[hook.name][:, pos, :].clone()
    corrupted_residual_component = corrupted_residual_component.clone()
    corrupted_residual_component[:, pos : pos + 1, :] = clean_value.unsqueeze(1)
    return corrupted_residual_component


def normalize_patched_logit_diff(patched_logit_diff):
    return (patched_logit_diff - corrupted_average_logit_diff) / (
        original_average_logit_diff - corrupted_average_logit_diff
    )


patched_residual_stream_diff = torch.zeros(model.cfg.n_layers, tokens.shape[1], device=device, dtype=torch.float32)
for layer in range(model.cfg.n_layers):
    for position in range(tokens.shape[1]):
        hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
        patched_logits = model.run_with_hooks(
            corrupted_tokens,
            fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)],
            return_type="logits",
        )
        patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens).detach()
        patched_residual_stream_diff[layer, position] = normalize_patched_logit_diff(patched_logit_diff)
'''

# What the record keeps: name -> tensor of the notebook's variables.
OUTPUTS = ("per_prompt_logit_diff", "original_average_logit_diff", "average_logit_diff", "logit_lens_logit_diffs",
           "per_layer_logit_diffs", "per_head_logit_diffs", "corrupted_average_logit_diff",
           "patched_residual_stream_diff", "tokens", "answer_tokens")
