"""circuitlab.probe: the forgetting probe's continuations, and its count of English words
(the issue's target: a base whose continuations are made of English words)."""

from __future__ import annotations

import pytest
import torch

from circuitlab.probe import DEFAULT_PROMPT, FUNCTION_WORDS, continuations, english_words, is_english
from minigpt2 import GPT2, GPT2Config


@pytest.mark.parametrize("text, expected", [
    (DEFAULT_PROMPT, (13, 13)),  # closed-class words and inflected WordNet lemmas ("humans", "are")
    ("The cats ran quickly to them.", (6, 6)),  # case and punctuation do not matter
    ("yearsinalnessasticness alive", (1, 2)),  # the bundled base's old output is no word
    ("not not not", (3, 3)),  # degenerate, but English
    ("", (0, 0)),
    ("123 -- ...", (0, 0)),  # no letters, no words
])
def test_english_words_counts_wordnet_lemmas_and_closed_class_words(text, expected):
    assert english_words(text) == expected


def test_closed_class_words_are_what_wordnet_lacks():
    from nltk.corpus import wordnet
    assert {"the", "of", "and", "they", "would"} <= FUNCTION_WORDS
    assert all(wordnet.morphy(w) is None for w in ("the", "of", "they"))  # why the list exists
    assert not is_english("ingness") and is_english("Humans")


def test_every_continuation_carries_its_english_word_count():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=16, d_mlp=16, n_ctx=32)).eval()
    conts = continuations({"m": model}, [DEFAULT_PROMPT[:20], "the cat"], max_new_tokens=6)
    assert len(conts) == 2
    for c in conts:
        assert (c.english_words, c.words) == english_words(c.continuation)
        assert c.to_json()["english_words"] == c.english_words
