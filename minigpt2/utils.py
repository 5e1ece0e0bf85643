"""The helpers TransformerLens notebooks import from ``transformer_lens.utils``, for minigpt2.

``from transformer_lens import utils`` becomes ``from minigpt2 import utils``: ``utils.get_act_name``,
``utils.to_numpy``, ``utils.test_prompt``, ``utils.Slice``, ``utils.tokenize_and_concatenate`` (on a
``datasets`` Dataset, imported only there), ``utils.composition_scores`` ... behave as TransformerLens 3's.
(The helpers that download, ``get_dataset`` and ``download_file_from_hf``, are not here.)
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "get_act_name", "to_numpy", "get_corner", "remove_batch_dim", "transpose", "is_square", "is_lower_triangular",
    "lm_cross_entropy_loss", "lm_accuracy", "gelu_new", "gelu_fast", "get_offset_position_ids",
    "get_cumsum_along_dim", "repeat_along_head_dimension", "test_prompt", "Slice", "SliceInput",
    "tokenize_and_concatenate", "keep_single_column", "override_or_use_default_value", "composition_scores",
    "get_device", "filter_dict_by_prefix",
]


# ---------------------------------------------------------------------------------------- names
def get_act_name(name: str, layer: Optional[Union[int, str]] = None, layer_type: Optional[str] = None) -> str:
    """A hook name from TransformerLens's shorthand, exactly as TransformerLens maps it.

    get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"; get_act_name("pre", 2) == "blocks.2.mlp.hook_pre";
    get_act_name("embed") == "hook_embed"; get_act_name("normalized", 27, "ln2") == "blocks.27.ln2.hook_normalized";
    get_act_name("k6") == "blocks.6.attn.hook_k"; get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale";
    get_act_name("scale") == "ln_final.hook_scale". A full name (with a dot, or starting hook_) is returned as is.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)

    layer_type_alias = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
    act_name_alias = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                      "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
    name = act_name_alias.get(name, name)

    full = f"blocks.{layer}." if layer is not None else ""
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    elif layer_type in layer_type_alias:
        layer_type = layer_type_alias[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


# ---------------------------------------------------------------------------------------- tensors
def to_numpy(tensor) -> np.ndarray:
    """A tensor (or list, tuple, number, array) as a numpy array, detached and on the CPU."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_corner(tensor, n: int = 3):
    """The top-left n x n x ... corner of a tensor."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Drop the first axis if it has size 1; otherwise the tensor unchanged."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(-1, -2)


def is_square(x: torch.Tensor) -> bool:
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: torch.Tensor) -> bool:
    return is_square(x) and x.equal(x.tril())


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding gets 0), as TransformerLens."""
    shifted = attention_mask.cumsum(dim=1) - 1
    return shifted.masked_fill(shifted < 0, 0)[:, past_kv_pos_offset:]


def get_cumsum_along_dim(tensor: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    if reverse:
        return tensor.flip(dims=(dim,)).cumsum(dim=dim).flip(dims=(dim,))
    return tensor.cumsum(dim=dim)


def repeat_along_head_dimension(tensor: torch.Tensor, n_heads: int, clone_tensor: bool = True) -> torch.Tensor:
    """[B, T, d_model] -> [B, T, n_heads, d_model]."""
    repeated = tensor[:, :, None].expand(-1, -1, n_heads, -1)
    return repeated.clone() if clone_tensor else repeated


# ---------------------------------------------------------------------------------------- losses
def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy: [B, T - 1] with ``per_token``, else the mean (over real tokens with a mask)."""
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask must have the same shape as tokens, got {tuple(attention_mask.shape)} "
                             f"and {tuple(tokens.shape)}")
        next_real = torch.logical_and(attention_mask[:, :-1].bool(), attention_mask[:, 1:].bool())
        predicted = predicted.masked_fill(~next_real, 0.0)
        n_tokens = next_real.sum().item()
    else:
        n_tokens = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy: [B, T - 1] booleans with ``per_token``, else their mean."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def gelu_new(input: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


def gelu_fast(input: torch.Tensor) -> torch.Tensor:
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


# ---------------------------------------------------------------------------------------- exploring
def _str_tokens(model, text: str, prepend_bos: Optional[bool]) -> list[str]:
    if hasattr(model, "to_str_tokens"):
        return list(model.to_str_tokens(text, prepend_bos=prepend_bos))
    ids = model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()
    return [model.tokenizer.decode([i]) for i in ids]


def _to_string(model, token) -> str:
    if hasattr(model, "to_string"):
        return model.to_string(token)
    return model.tokenizer.decode(torch.as_tensor(token).reshape(-1).tolist())


def test_prompt(prompt: str, answer: Union[str, list[str]], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: Optional[bool] = None, top_k: int = 10) -> None:
    """Print how the model does on ``answer`` after ``prompt``: the answer tokens' rank, logit and
    probability, and the top ``top_k`` tokens (TransformerLens's report, line for line, without its
    bold face). A list of answers compares them all as the next token."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    multiple = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False)
    if multiple:
        answer_tokens = answer_tokens[:, :1]
    prompt_tokens = prompt_tokens.repeat(answer_tokens.shape[0], 1)
    tokens = torch.cat((prompt_tokens, answer_tokens), dim=1)
    prompt_str_tokens = _str_tokens(model, prompt, prepend_bos)
    answer_str_tokens_list = [_str_tokens(model, a, False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if multiple else len(answer_str_tokens_list[0])

    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if multiple:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    with torch.no_grad():
        logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks = []
    for index in range(prompt_length, prompt_length + answer_length):
        answer_tokens = tokens[:, index]
        answer_str_tokens = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]  # the logits at index - 1 predict the token at index
        sorted_token_probs, sorted_token_positions = token_probs.sort(descending=True)
        ranks = sorted_token_positions.argsort(-1)[range(n_answers), answer_tokens.cpu()].tolist()
        answer_ranks.append(list(zip(answer_str_tokens, ranks)))
        if print_details:
            print(f"Performance on answer token{'s' if n_answers > 1 else ''}:\n" + "\n".join(
                f"Rank: {ranks[i]: <8} Logit: {logits[i, index - 1, answer_tokens[i]].item():5.2f} "
                f"Prob: {token_probs[i, answer_tokens[i]].item():6.2%} Token: |{answer_str_tokens[i]}|"
                for i in range(n_answers)))
            for i in range(top_k):
                print(f"Top {i}th token. Logit: {logits[0, index - 1, sorted_token_positions[0, i]].item():5.2f} "
                      f"Prob: {sorted_token_probs[0, i].item():6.2%} "
                      f"Token: |{_to_string(model, sorted_token_positions[0, i])}|")
    if not multiple:
        print(f"Ranks of the answer tokens: {[r[0] for r in answer_ranks]}")
    else:
        print(f"Ranks of the answer tokens: {answer_ranks}")


test_prompt.__test__ = False  # not a pytest test, whatever its name


# ---------------------------------------------------------------------------------------- slices
SliceInput = Optional[Union[int, Tuple[int], Tuple[int, int], Tuple[int, int, int], List[int], torch.Tensor,
                            np.ndarray, slice]]


class Slice:
    """TransformerLens's Slice: one way to index an axis, usable on any tensor.

    int: index with it (the axis goes); tuple: ``slice(*t)`` ((k,) is :k, (m, k) is m:k, (m, k, n)
    is m:k:n); a slice; a list, tensor or array of indices; None: everything (the identity).
    """

    def __init__(self, input_slice: SliceInput = None):
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, torch.Tensor, np.ndarray)):
            self.slice, self.mode = to_numpy(input_slice), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"Invalid input_slice {input_slice}")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``tensor`` indexed by this slice along ``dim`` (negative dims count from the end)."""
        slices: list = [slice(None)] * tensor.ndim
        slices[dim] = self.slice
        return tensor[tuple(slices)]

    def indices(self, max_ctx: Optional[int] = None) -> np.ndarray:
        """The indices this slice takes of an axis of length ``max_ctx``."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Union["Slice", SliceInput]) -> "Slice":
        """A Slice from a Slice or its input; an int becomes [int], so the axis stays."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            slice_input = [slice_input]
        return Slice(slice_input)



# ---------------------------------------------------------------------------------------- data and odds and ends
def override_or_use_default_value(default_flag, override=None):
    """``override`` unless it is None, else ``default_flag``."""
    return override if override is not None else default_flag


def get_device() -> str:
    """"cuda" when there is a GPU, else "cpu" (TransformerLens's choice; MPS is never picked unasked)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """The entries whose keys start with ``prefix`` (a dot added if it has none), the prefix stripped."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(prefix):]: v for k, v in dictionary.items() if k.startswith(prefix)}


def composition_scores(left, right, broadcast_dims: bool = True) -> torch.Tensor:
    """||left @ right|| / (||left|| ||right||) of two FactoredMatrix stacks (Frobenius norms), broadcast over
    their leading dims (left's first) unless ``broadcast_dims=False``: HookedTransformer.all_composition_scores."""
    if broadcast_dims:
        r_leading, l_leading = right.ndim - 2, left.ndim - 2
        for i in range(l_leading):
            right = right.unsqueeze(i)
        for i in range(r_leading):
            left = left.unsqueeze(i + l_leading)
    if left.rdim != right.ldim:
        raise ValueError(f"Composition scores require left.rdim==right.ldim, shapes were left: {left.shape}, "
                         f"right:{right.shape}")
    new_right, new_left = right.collapse_r(), left.collapse_l()
    comp_norms = (new_left @ new_right).norm(dim=[-2, -1])
    return comp_norms / new_right.norm(dim=[-2, -1]) / new_left.norm(dim=[-2, -1])


def keep_single_column(dataset, col_name: str):
    """A Hugging Face dataset with every column but ``col_name`` removed."""
    for key in dataset.features:
        if key != col_name:
            dataset = dataset.remove_columns(key)
    return dataset


def _concatenated_rows(texts: list[str], tokenizer, seq_len: int, add_bos_token: bool) -> np.ndarray:
    """[rows, seq_len (+1 with BOS)]: the documents' tokens joined by EOS, cut into rows (the tail dropped;
    one short row padded with EOS)."""
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        pieces.append(np.asarray(ids, dtype=np.int64))
        if i < len(texts) - 1:
            pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int64))
    tokens = np.concatenate(pieces) if pieces else np.array([], dtype=np.int64)
    if len(tokens) < seq_len:
        tokens = np.concatenate([tokens, np.full(seq_len - len(tokens), tokenizer.eos_token_id)])
    rows = len(tokens) // seq_len
    tokens = tokens[:rows * seq_len].reshape(rows, seq_len)
    if add_bos_token:
        tokens = np.concatenate([np.full((rows, 1), tokenizer.bos_token_id), tokens], axis=1)
    return tokens


def tokenize_and_concatenate(dataset, tokenizer, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: Optional[int] = 10,
                             set_format: bool = True):
    """A Hugging Face dataset of texts -> one column "tokens" of rows of ``max_length`` ids: each batch of
    documents tokenized, joined with EOS, cut into rows, BOS first (``add_bos_token``); TransformerLens's,
    for a GPT-2 tokenizer (``model.tokenizer`` or Hugging Face's). ``num_proc``: processes for ``map``
    (None: this one)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate joins documents with EOS: the tokenizer must have an EOS token")
    dataset = keep_single_column(dataset, column_name)
    seq_len = max_length - 1 if add_bos_token else max_length

    def tokenize_function(examples):
        texts = examples[column_name]
        if not texts:
            return {"tokens": np.array([], dtype=np.int64)}
        return {"tokens": _concatenated_rows(texts, tokenizer, seq_len, add_bos_token)}

    tokenized = dataset.map(tokenize_function, batched=True, remove_columns=[column_name],
                            **({"num_proc": num_proc} if not streaming else {}))
    if set_format:
        tokenized.set_format(type="torch", columns=["tokens"])
    return tokenized
