"""Token ids, attention masks and labels for TPP examples (GPT-2 tokenizer).

Tokenization follows the paper: the prompt keeps its trailing space (GPT-2
encodes it as its own token, 220, so the prompt's last token is always that
space), and c is encoded on its own, without a leading space, so its first
token is often a word piece ("preposterous" -> "prep" "oster" "ous").

Label convention (Hugging Face's): labels are aligned with input_ids and the
loss shifts them, `loss = CE(logits[:, :-1], labels[:, 1:])`, i.e. the logit at
position t is scored against labels[t + 1]. -100 is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # tpp.examples imports this module (encode_many): Example is only an annotation here
    from tpp.examples import Example

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, the pad token (GPT-2 has no pad token)
IGNORE_INDEX = -100  # ignored by torch's cross_entropy
LABEL_STYLES = ("teacher-forced", "paper")


def _tokenizer(tokenizer):
    if tokenizer is None:
        from minigpt2.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    return tokenizer


def encode_many(texts: Sequence[str], tokenizer=None) -> list[list[int]]:
    """Token ids of each text, each distinct text encoded once (nouns repeat a lot).

    Serial on purpose: tiktoken's encode_ordinary_batch was 2-3x slower than
    this loop for ~30-token prompts (thread-pool overhead per item).
    """
    tokenizer = _tokenizer(tokenizer)
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    cache: dict[str, list[int]] = {}
    out = []
    for t in texts:
        ids = cache.get(t)
        if ids is None:
            ids = cache[t] = list(encode(t))
        out.append(ids)
    return out


def _place(array: np.ndarray, rows: list[list[int]], start: np.ndarray) -> None:
    """array[i, start[i] : start[i] + len(rows[i])] = rows[i] for every i, without a Python loop over i."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    row_idx = np.repeat(np.arange(len(rows)), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)  # flat index of each row's first token
    array[row_idx, np.repeat(start, lengths) + np.arange(len(flat)) - first] = flat


def _pad_id(tokenizer) -> int:
    return getattr(tokenizer, "eot_token", EOT_TOKEN)


def _check_nonempty(examples, fn: str) -> list[Example]:
    examples = list(examples)
    if not examples:
        raise ValueError(f"{fn} got no examples. Fix: pass at least one tpp.Example.")
    return examples


SPACES = ("prompt", "answer")  # where the space before c goes: the paper's trailing space, or ' c'
FORMATS = {"prompt": "the paper's: trailing space in the prompt, c on its own",
           "answer": "the space on the answer: ' c'"}


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space={space!r} is unknown. Fix: use 'prompt' (the paper's) or 'answer'.")


def model_space(model) -> str | None:
    """The answer format a model was finetuned in: its ``answer_space`` attribute ("prompt" or "answer"),
    which minigpt2.load_pretrained reads from the directory's metadata.json; None when unrecorded
    (a model built in code, GPT-2's own files). tpp never imports the model: any object will do."""
    space = getattr(model, "answer_space", None)
    if space is not None and space not in SPACES:
        raise ValueError(f"the model's answer_space is {space!r}, not one of {list(SPACES)}. "
                         "Fix: correct answer_space in its metadata.json, or set model.answer_space.")
    return space


def resolve_space(space: str | None, model=None, fn: str = "encode_eval") -> str:
    """``space`` if given, else the model's format, else the paper's "prompt"; a ``space`` that
    contradicts the model's recorded format is refused, naming both."""
    own = model_space(model)
    if space is None:
        return own or "prompt"
    check_space(space)
    if own is not None and own != space:
        raise ValueError(f"{fn}: space={space!r}, but the model was finetuned in {own!r} ({FORMATS[own]}); "
                         "data in one format scores about 0 on a model of the other. "
                         f"Fix: drop space= (the model's format is then used) or pass space={own!r}.")
    return space


def encode_for_training(examples: Sequence[Example], label_style: str = "teacher-forced",
                        tokenizer=None, pad_to: int | None = None, space: str = "prompt") -> dict[str, torch.Tensor]:
    """Encode examples for finetuning: {"input_ids", "attention_mask", "labels"}, each LongTensor [N, T].

    Let p be the index of the last prompt token (the trailing space) and
    c_1..c_k the tokens of c encoded on its own. In both styles
    labels[i, p+1 .. p+k] = c_1..c_k and labels is -100 everywhere else, so
    with the Hugging Face shift, loss = CE(logits[:, :-1], labels[:, 1:]), the
    logit at p is scored on c_1, the logit at p+1 on c_2, and so on.

    label_style:
      "teacher-forced" (default)  input_ids[i, p+1 .. p+k] = c_1..c_k too: the
          model sees c_1..c_{j-1} when predicting c_j. attention_mask is 1 on
          the prompt and the c tokens.
      "paper"  the paper's scheme: input_ids hold only the prompt, and EOS pads
          (50256) sit at p+1 .. p+k, so c_2 is predicted from a pad position.
          attention_mask is 1 on the prompt only.

    Every row is right-padded with EOS (50256) to T, with attention_mask 0 and
    labels -100 on the padding. T = pad_to if given (e.g. the longest row of the
    whole master dataset, as the paper did), else the longest row here
    (prompt + c tokens).

    space: "prompt" (the paper's finetuning format) keeps the trailing space in
    the prompt and encodes c on its own; "answer" moves it to the front of c
    (" c"), the format of the single-token eval set, in which c's tokens are
    the very tokens the prompt already holds.

    Raises ValueError for an unknown label_style or space, or when a row needs more than pad_to tokens.
    """
    if label_style not in LABEL_STYLES:
        raise ValueError(f"label_style={label_style!r} is unknown. Fix: use one of {LABEL_STYLES}.")
    check_space(space)
    examples = _check_nonempty(examples, "encode_for_training")
    tokenizer = _tokenizer(tokenizer)
    if space == "prompt":
        prompts = encode_many([e.prompt for e in examples], tokenizer)
        answers = encode_many([e.c for e in examples], tokenizer)
    else:
        prompts = encode_many([e.prompt[:-1] for e in examples], tokenizer)
        answers = encode_many([" " + e.c for e in examples], tokenizer)
    n_p = np.array([len(p) for p in prompts], dtype=np.int64)
    n_c = np.array([len(c) for c in answers], dtype=np.int64)
    longest = int((n_p + n_c).max())
    T = longest if pad_to is None else pad_to
    if longest > T:
        i = int(np.argmax(n_p + n_c))
        raise ValueError(f"example {i} ({examples[i].prompt!r} + {examples[i].c!r}) needs {longest} tokens, "
                         f"but pad_to={pad_to}. Fix: raise pad_to to at least {longest} or pass None.")
    input_ids = np.full((len(examples), T), _pad_id(tokenizer), dtype=np.int64)
    labels = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    _place(input_ids, prompts, np.zeros_like(n_p))
    _place(labels, answers, n_p)
    if label_style == "teacher-forced":
        _place(input_ids, answers, n_p)
    real = n_p + n_c if label_style == "teacher-forced" else n_p
    mask = (np.arange(T)[None, :] < real[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


@dataclass
class EvalBatch:
    """Prompts to score on the next token, with the tokens that decide the score.

    tokens: [N, T] long, the prompts right-padded with EOS (50256).
    attention_mask: [N, T] long, 1 on prompt tokens.
    answer_pos: [N] long, index of each prompt's last token: the logit there predicts c.
    c_token: [N] long, c's first token (the target). b_token: [N] long, b's
        first token, encoded the same way (for the logit difference).
    examples: the N Examples, in row order.
    space: the answer format the rows are in, "prompt" (the paper's) or "answer" (' c'); a model
        finetuned in the other one is refused by tpp.metrics.summarize(..., model=model).
    single_token: the paper's second eval set (' c', scored on every model whatever its format).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor
    c_token: torch.Tensor
    b_token: torch.Tensor
    examples: list[Example]
    space: str = "prompt"
    single_token: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def to(self, device) -> "EvalBatch":
        """A copy with every tensor on `device`."""
        return EvalBatch(self.tokens.to(device), self.attention_mask.to(device), self.answer_pos.to(device),
                         self.c_token.to(device), self.b_token.to(device), self.examples, self.space, self.single_token)

    def select(self, index) -> "EvalBatch":
        """Rows `index` (a slice, or a sequence / tensor of row numbers) as a new EvalBatch.

        T is kept, so rows may end in padding; use answer_pos, not T - 1.
        """
        rows = list(range(len(self)))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        return EvalBatch(self.tokens[idx], self.attention_mask[idx], self.answer_pos[idx],
                         self.c_token[idx], self.b_token[idx], [self.examples[r] for r in rows], self.space,
                         self.single_token)


def encode_eval(examples: Sequence[Example], single_token: bool = False, tokenizer=None,
                space: str | None = None, *, model=None) -> EvalBatch:
    """Encode examples for scoring the first token of c at the end of the prompt.

    The answer format, where the space before c goes, must be the one the model was finetuned in
    (scored in the other, a model gets about 0 accuracy). Pass the model, and its format is used:

        from minigpt2 import load_pretrained
        from tpp import encode_eval, make_eval_set
        model = load_pretrained("weights/welterweight")    # model.answer_space == "answer"
        batch = encode_eval(make_eval_set(300, seed=0), model=model)
        print(batch.space)                                 # answer

    space="prompt" (the paper's first eval set; the default without a model, or
        when the model's format is unrecorded): the prompt keeps its trailing
        space, whose token is the last one; c and b are encoded on their own,
        without a space, and their first tokens are the targets.
    space="answer": the trailing space moves onto the answer: the prompt is
        encoded without it and the targets are the first tokens of " c" and
        " b". The format of models finetuned with ``space="answer"`` (the bundled ones).
    model: any object with an ``answer_space`` attribute ("prompt", "answer" or None: unrecorded),
        as minigpt2.load_pretrained sets from metadata.json. A ``space`` that contradicts it is refused.
    single_token=True (the paper's second eval set) is space="answer" on every model: for
        examples from make_single_token_eval_set, " c" is exactly one token.

    Returns an EvalBatch (its .space says the format); rows are right-padded with EOS to the longest prompt.
    Raises ValueError on no examples, an unknown space, a space the model was not finetuned in, or
    (space "answer") a prompt without its trailing space.
    """
    examples = _check_nonempty(examples, "encode_eval")
    if single_token and space is not None:
        check_space(space)
    space = "answer" if single_token else resolve_space(space, model)
    moved = space == "answer"
    if moved:
        for i, e in enumerate(examples):
            if not e.prompt.endswith(" "):
                raise ValueError(f"examples[{i}].prompt {e.prompt!r} has no trailing space to move onto c. "
                                 "Fix: build Examples with tpp.make_examples (prompts end with one space).")
    tokenizer = _tokenizer(tokenizer)
    lead = " " if moved else ""
    prompts = encode_many([e.prompt[:-1] if moved else e.prompt for e in examples], tokenizer)
    first_c = [ids[0] for ids in encode_many([lead + e.c for e in examples], tokenizer)]
    first_b = [ids[0] for ids in encode_many([lead + e.b for e in examples], tokenizer)]
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    tokens = np.full((len(examples), int(lengths.max())), _pad_id(tokenizer), dtype=np.int64)
    _place(tokens, prompts, np.zeros_like(lengths))
    mask = (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return EvalBatch(
        tokens=torch.from_numpy(tokens),
        attention_mask=torch.from_numpy(mask),
        answer_pos=torch.from_numpy(lengths - 1),
        c_token=torch.tensor(first_c, dtype=torch.long),
        b_token=torch.tensor(first_b, dtype=torch.long),
        examples=examples,
        space=space,
        single_token=single_token,
    )
