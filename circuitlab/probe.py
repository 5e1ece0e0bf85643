"""The forgetting probe (the paper's section 6.1): greedy continuations of the same
prompts by several models, side by side, each with how many *distinct* English words it
uses (``distinct_english``: in WordNet, any part of speech and inflection, or a closed-class
word; a lemma of one letter, as "ys" -> "y", is no word) and, apart, how repetitive it is
(``repeated``: words that repeat an earlier one; " men men men" uses 1 distinct word, 2 repeated)."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass

import torch

from clikit import Range
from minigpt2 import GPT2, get_tokenizer
from minigpt2.tokenizer import EOT_TOKEN

DEFAULT_PROMPT = "if all men are humans and humans are alive then all men are"

# English's closed classes (articles, pronouns, prepositions, conjunctions, auxiliaries, ...),
# which WordNet (nouns, verbs, adjectives and adverbs only) leaves out.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither no none all both half
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its
itself we us our ours ourselves they them their theirs themselves who whom whose which what whoever
whatever whichever one ones oneself somebody someone something anybody anyone anything nobody
nothing everybody everyone everything other another such
of in on at by for with without to from into onto upon about above below over under between among
through throughout during before after since until till against toward towards within beneath
beside besides beyond across along around behind near off out up down per via than as like unlike
and or but nor so yet if then else because although though while whereas whether unless once when
whenever where wherever why how
am is are was were be been being have has had having do does did done doing will would shall
should can could may might must ought not
there here very too also just only even ever never always often again more most less least much
many few several own same
""".split())
WORD = re.compile(r"[A-Za-z]+")


@functools.lru_cache(maxsize=1)
def _wordnet():
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise LookupError("WordNet was not found by nltk, and the forgetting probe counts English words with "
                          "it. Point NLTK_DATA at a folder holding corpora/wordnet (here: ../shared/nltk_data), "
                          "or run python -m nltk.downloader wordnet") from None
    return wordnet


def is_english(word: str) -> bool:
    """A closed-class word, or a lemma of WordNet (of any part of speech) after its inflections
    are undone ("humans" -> "human", "ran" -> "run"); case is ignored. WordNet's one-letter lemmas
    (the letters as nouns) do not count, so neither does "ys" (-> "y")."""
    w = word.lower()
    if w in FUNCTION_WORDS:
        return True
    lemma = _wordnet().morphy(w)
    return lemma is not None and len(lemma) > 1


def english_words(text: str) -> tuple[int, int]:
    """(English words, words) of ``text``, repeats counted each time; a word is a maximal run of ASCII letters."""
    words = WORD.findall(text)
    return sum(map(is_english, words)), len(words)


@dataclass(frozen=True)
class WordCount:
    """A continuation's words: how many, how many distinct English ones, and how repetitive it is."""

    words: int  # runs of letters
    english: int  # of them English, each repeat counted (english_words)
    distinct_english: int  # distinct English words (case ignored)
    repeated: int  # words equal to an earlier word of the text (case ignored)
    longest_run: int  # the longest run of one word said again and again (" alive alive alive": 3)


def count_words(text: str) -> WordCount:
    """:class:`WordCount` of ``text``."""
    words = [w.lower() for w in WORD.findall(text)]
    english = [w for w in words if is_english(w)]
    run = longest = 0
    for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        longest = max(longest, run)
    return WordCount(len(words), len(english), len(set(english)), len(words) - len(set(words)), longest)


@dataclass
class Continuation:
    model: str
    prompt: str
    continuation: str  # the generated text only
    tokens: list[int]  # the generated ids
    stopped: bool  # True if the model emitted <|endoftext|> (the paper's "chose to end the sequence")
    english_words: int  # of the continuation's words, those that are English (see english_words)
    words: int
    distinct_english_words: int = 0  # distinct English words (count_words)
    repeated_words: int = 0  # words repeating an earlier one
    longest_run: int = 0  # the longest run of one word

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def continuations(models: dict[str, GPT2], prompts: list[str], max_new_tokens: int = 16) -> list[Continuation]:
    """Greedy continuation of every prompt by every model (stopping at <|endoftext|>)."""
    Range(1, whole=True).check("max_new_tokens", max_new_tokens)
    prompts = [p for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty prompt to continue")
    enc = get_tokenizer()
    out = []
    for prompt in prompts:
        ids = enc.encode_ordinary(prompt)
        for name, model in models.items():
            # greedy, as the paper's probe (generate's default may sample)
            tokens = model.generate(torch.tensor([ids]), max_new_tokens, do_sample=False)[0, len(ids):].tolist()
            stopped = EOT_TOKEN in tokens
            new = tokens[:tokens.index(EOT_TOKEN)] if stopped else tokens
            text = enc.decode(new)
            n = count_words(text)
            out.append(Continuation(name, prompt, text, new, stopped, n.english, n.words, n.distinct_english,
                                    n.repeated, n.longest_run))
    return out
