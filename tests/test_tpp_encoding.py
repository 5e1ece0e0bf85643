"""Tokenization: label offsets in both styles, padding/mask agreement, the eval encodings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt2.tokenizer import get_tokenizer
from tpp import EOT_TOKEN, IGNORE_INDEX, Example, encode_eval, encode_for_training, make_examples

TOK = get_tokenizer()
SPACE = 220  # GPT-2's token for a lone " "


class CharTokenizer:
    """One token per character, so offsets can be checked by eye; 0 is its pad."""

    eot_token = 0

    def encode(self, text):
        return [ord(ch) for ch in text]


examples_lists = st.builds(lambda n, seed: make_examples(n, seed=seed), st.integers(1, 40), st.integers(0, 10_000))


def _hf_targets(batch):
    """What the HF-shifted loss scores each row on: [(logit position, target token)]."""
    labels = batch["labels"]
    return [[(t, int(labels[i, t + 1])) for t in range(labels.shape[1] - 1) if labels[i, t + 1] != IGNORE_INDEX]
            for i in range(labels.shape[0])]


@settings(max_examples=25, deadline=None)
@given(examples=examples_lists, style=st.sampled_from(["teacher-forced", "paper"]))
def test_labels_are_exactly_c_after_the_prompt(examples, style):
    batch = encode_for_training(examples, label_style=style)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape
    for i, (e, targets) in enumerate(zip(examples, _hf_targets(batch))):
        prompt, c = TOK.encode(e.prompt), TOK.encode(e.c)
        p, k = len(prompt) - 1, len(c)
        assert prompt[-1] == SPACE  # the trailing space is the last prompt token
        assert ids[i, : p + 1].tolist() == prompt
        assert targets == [(p + j, c[j]) for j in range(k)]  # logit at p predicts c_1, ...
        assert labels[i, p + 1 : p + 1 + k].tolist() == c
        if style == "teacher-forced":
            assert ids[i, p + 1 : p + 1 + k].tolist() == c
            real = p + 1 + k
        else:
            assert ids[i, p + 1 : p + 1 + k].tolist() == [EOT_TOKEN] * k
            real = p + 1
        assert mask[i].tolist() == [1] * real + [0] * (ids.shape[1] - real)
        assert (ids[i, real:] == EOT_TOKEN).all()


def test_width_is_the_longest_prompt_plus_c():
    examples = make_examples(64, seed=5)
    batch = encode_for_training(examples)
    assert batch["input_ids"].shape == (64, max(len(TOK.encode(e.prompt)) + len(TOK.encode(e.c))
                                               for e in examples))


def test_custom_tokenizer_gives_offsets_by_eye():
    e = Example("t", "x", "y", "zz", "x y so ")
    batch = encode_for_training([e], tokenizer=CharTokenizer(), pad_to=10)
    assert batch["input_ids"][0].tolist() == [ord(ch) for ch in "x y so zz"] + [0]
    assert batch["labels"][0].tolist() == [-100] * 7 + [ord("z")] * 2 + [-100]
    paper = encode_for_training([e], label_style="paper", tokenizer=CharTokenizer(), pad_to=10)
    assert paper["input_ids"][0].tolist() == [ord(ch) for ch in "x y so "] + [0] * 3
    assert paper["attention_mask"][0].tolist() == [1] * 7 + [0] * 3


def test_pad_to_too_small_or_unknown_style_is_refused():
    examples = make_examples(4, seed=1)
    need = encode_for_training(examples)["input_ids"].shape[1]
    assert encode_for_training(examples, pad_to=need + 3)["input_ids"].shape == (4, need + 3)
    with pytest.raises(ValueError, match=f"at least {need}"):
        encode_for_training(examples, pad_to=need - 1)
    with pytest.raises(ValueError, match="label_style='hf'"):
        encode_for_training(examples, label_style="hf")


@settings(max_examples=25, deadline=None)
@given(examples=examples_lists, fmt=st.sampled_from(["prompt", "answer", "single_token"]))
def test_eval_batch_points_at_the_last_prompt_token(examples, fmt):
    """space="answer" and single_token=True both move the trailing space onto c."""
    batch = encode_eval(examples, single_token=True) if fmt == "single_token" else encode_eval(examples, space=fmt)
    single = fmt != "prompt"
    space = " " if single else ""
    assert len(batch) == len(examples) and batch.tokens.shape == batch.attention_mask.shape
    for i, e in enumerate(examples):
        prompt = TOK.encode(e.prompt[:-1] if single else e.prompt)
        pos = int(batch.answer_pos[i])
        assert pos == len(prompt) - 1
        assert batch.tokens[i, : pos + 1].tolist() == prompt
        assert (batch.tokens[i, pos + 1 :] == EOT_TOKEN).all()
        assert batch.attention_mask[i].tolist() == [1] * (pos + 1) + [0] * (batch.tokens.shape[1] - pos - 1)
        assert int(batch.c_token[i]) == TOK.encode(space + e.c)[0]
        assert int(batch.b_token[i]) == TOK.encode(space + e.b)[0]
        assert (batch.tokens[i, pos] == SPACE) != single


def test_papers_worked_example():
    e = Example("all-are-inferred", "fish", "drinkers", "preposterous",
                "if all fish are drinkers and all drinkers are preposterous it can be inferred that all fish are ")
    batch = encode_eval([e])
    assert int(batch.c_token[0]) == 46012  # "prep", as the paper reports
    assert TOK.decode(batch.tokens[0, : int(batch.answer_pos[0]) + 1].tolist()) == e.prompt


def test_select_keeps_rows_together():
    batch = encode_eval(make_examples(9, seed=2))
    sub = batch.select([7, 2])
    assert sub.examples == [batch.examples[7], batch.examples[2]]
    assert torch.equal(sub.c_token, batch.c_token[[7, 2]]) and torch.equal(sub.tokens, batch.tokens[[7, 2]])
    assert batch.select(slice(0, 3)).examples == batch.examples[:3]


def test_single_token_needs_the_trailing_space():
    for kwargs in (dict(single_token=True), dict(space="answer")):
        with pytest.raises(ValueError, match="no trailing space"):
            encode_eval([Example("t", "x", "y", "z", "x y so")], **kwargs)
    with pytest.raises(ValueError, match="space='both' is unknown. Fix: use 'prompt'"):
        encode_eval(make_examples(2, seed=0), space="both")


@settings(max_examples=15, deadline=None)
@given(examples=examples_lists, style=st.sampled_from(["teacher-forced", "paper"]))
def test_space_on_the_answer_makes_c_the_prompt_tokens(examples, style):
    """space="answer": the prompt loses its trailing space and the labels are " c"'s tokens."""
    batch = encode_for_training(examples, label_style=style, space="answer")
    for i, (e, targets) in enumerate(zip(examples, _hf_targets(batch))):
        prompt, c = TOK.encode(e.prompt[:-1]), TOK.encode(" " + e.c)
        p = len(prompt) - 1
        assert prompt[-1] != SPACE
        assert batch["input_ids"][i, : p + 1].tolist() == prompt
        assert targets == [(p + j, c[j]) for j in range(len(c))]
        assert set(c) <= set(TOK.encode(e.prompt))  # " c" appears in the premises: a copy task


def test_unknown_space_is_refused():
    with pytest.raises(ValueError, match="space='left'.*'prompt'"):
        encode_for_training(make_examples(2, seed=0), space="left")
