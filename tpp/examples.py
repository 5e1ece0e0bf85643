"""TPP examples: a template filled with three distinct random nouns, deterministic from a seed.

Every sampler draws from its own numpy stream, SeedSequence(seed, spawn_key=(stream,)),
so make_eval_set(seed=s) never replays master_dataset(seed=s) and a given
seed gives the same examples on every machine (for a given numpy version).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clikit import Range
from tpp.encoding import encode_many
from tpp.nouns import SHIPPED, check_nouns, load_nouns
from tpp.templates import load_templates

MASTER_SIZE = 158_000  # the paper's master dataset
EVAL_SIZE = 3000  # the paper's first evaluation set
SINGLE_TOKEN_EVAL_SIZE = 1150  # the paper's second evaluation set
# The most examples one set of the command lines (python -m tpp, circuits.py) may ask for: about 6x the
# master dataset. A million Examples take about half a GB, their JSONL with token ids a few GB; the
# templates and nouns allow far more (some 10^14), so without a cap a typo would exhaust memory.
# The library functions have no cap.
MAX_EXAMPLES = 1_000_000

# One random stream per purpose (the spawn_key of the SeedSequence).
_STREAM_EXAMPLES, _STREAM_EVAL, _STREAM_SINGLE, _STREAM_SPLIT, _STREAM_NOUN_SPLIT = range(5)


@dataclass(frozen=True)
class Example:
    """One TPP example.

    template: the template's name (a key of tpp.TEMPLATES, or "<file>:<line>"
        for a user file). prompt: the filled template plus one trailing
        space, ending where c is predicted; c itself is never in the prompt's tail.
    """

    template: str
    a: str
    b: str
    c: str
    prompt: str


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _resolve_nouns(nouns) -> list[str]:
    if nouns is None:
        return load_nouns(SHIPPED)
    if isinstance(nouns, str) or hasattr(nouns, "__fspath__"):
        return load_nouns(nouns)
    return check_nouns(nouns, "the nouns passed in")


def _exclude_set(exclude) -> set[str]:
    """Prompts to avoid, from Examples and/or prompt strings."""
    if exclude is None:
        return set()
    return {e.prompt if isinstance(e, Example) else e for e in exclude}


def _n_distinct_triples(a_pool: Sequence[str], b_pool: Sequence[str], c_pool: Sequence[str]) -> int:
    """How many (a, b, c) with a, b, c pairwise distinct (inclusion-exclusion over equal pairs)."""
    A, B, C = set(a_pool), set(b_pool), set(c_pool)
    return (len(A) * len(B) * len(C) - len(A & B) * len(C) - len(A & C) * len(B)
            - len(B & C) * len(A) + 2 * len(A & B & C))


def _sample(n: int, rng: np.random.Generator, templates: Mapping[str, str],
            pools: tuple[Sequence[str], Sequence[str], Sequence[str]], exclude: set[str],
            what: str) -> list[Example]:
    """n examples with distinct prompts not in `exclude`; a, b, c from pools[0], [1], [2]."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what}: n={n!r} is not a non-negative integer.")
    names = list(templates)
    capacity = len(set(templates.values())) * _n_distinct_triples(*pools)
    if n > capacity:
        raise ValueError(f"{what}: asked for {n} examples, but {len(set(templates.values()))} template(s) and "
                         f"noun pools of sizes {[len(p) for p in pools]} allow only {capacity} distinct prompts. "
                         "Fix: use fewer examples, more nouns or more templates.")
    out: list[Example] = []
    taken = set(exclude)
    stalled = 0
    while len(out) < n:
        # Oversample so one round nearly always suffices; duplicates are rare.
        m = int((n - len(out)) * 1.1) + 16
        t = rng.integers(len(names), size=m)
        abc = [rng.integers(len(pool), size=m) for pool in pools]
        before = len(out)
        for ti, ai, bi, ci in zip(t.tolist(), *(x.tolist() for x in abc)):
            a, b, c = pools[0][ai], pools[1][bi], pools[2][ci]
            if a == b or b == c or a == c:
                continue
            name = names[ti]
            prompt = templates[name].format(a=a, b=b, c=c) + " "
            if prompt in taken:
                continue
            taken.add(prompt)
            out.append(Example(name, a, b, c, prompt))
            if len(out) == n:
                break
        stalled = stalled + 1 if len(out) == before else 0
        if stalled >= 20:
            raise ValueError(f"{what}: could build only {len(out)} of {n} examples whose prompts avoid the "
                             f"{len(exclude)} excluded ones (the pools allow {capacity} prompts in all). "
                             "Fix: ask for fewer, or use more nouns or templates.")
    return out


def make_examples(n: int, seed: int = 0, templates=None, nouns=None, exclude=None) -> list[Example]:
    """n random TPP examples with distinct prompts, deterministic from `seed`.

    Each example picks a template uniformly from the selection (so a template
    listed twice, like the appendix's first, is drawn twice as often) and three
    distinct nouns uniformly from the pool.

    templates: anything tpp.load_templates accepts (None: the seven appendix templates).
    nouns: None (the shipped WordNet list), "shipped", "wordnet", a file path, or a list of nouns.
    exclude: Examples or prompt strings that must not be produced.

    Raises ValueError when the templates and nouns cannot give n distinct prompts.
    """
    pool = _resolve_nouns(nouns)
    return _sample(n, _rng(seed, _STREAM_EXAMPLES), load_templates(templates), (pool, pool, pool),
                   _exclude_set(exclude), "make_examples")


def master_dataset(seed: int = 0, n: int = MASTER_SIZE, templates=None, nouns=None) -> list[Example]:
    """The paper's master dataset: 158,000 examples (make_examples with the same arguments).

    The paper's training sets are its first 10%, 30% and 50% (15,800, 47,400
    and 79,000 examples); slice this list, it is already in random order.
    """
    return make_examples(n, seed=seed, templates=templates, nouns=nouns)


def _check_no_repeated_prompt(examples: Sequence[Example]) -> None:
    seen = set()
    for i, e in enumerate(examples):
        if e.prompt in seen:
            raise ValueError(f"examples[{i}] repeats the prompt {e.prompt!r}; splitting would put one prompt "
                             "in both train and eval. Fix: deduplicate the examples by prompt "
                             "(make_examples never repeats one).")
        seen.add(e.prompt)


def train_eval_split(examples: Sequence[Example], eval_size: int, seed: int = 0,
                     disjoint_nouns: bool = False) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, eval), which share no prompt.

    disjoint_nouns=False: eval is `eval_size` examples chosen at random, train
    is the rest; both keep the input order.

    disjoint_nouns=True (beyond the paper): additionally no noun of an eval
    example appears anywhere in train. Nouns are put in a random order and the
    eval set takes the examples whose nouns come earliest in it, which keeps
    the eval nouns few; train examples that use any eval noun are dropped, so
    train is smaller than len(examples) - eval_size.

    Raises ValueError if examples repeat a prompt (the split would leak it), if
    eval_size is not in 1..len(examples)-1, or if nothing is left for train.
    """
    examples = list(examples)
    Range(1, len(examples) - 1, whole=True).check("eval_size", eval_size, why=f"for {len(examples)} examples",
                                                   fix="choose a smaller eval set or more examples")
    _check_no_repeated_prompt(examples)
    rng = _rng(seed, _STREAM_SPLIT)
    if not disjoint_nouns:
        is_eval = np.zeros(len(examples), dtype=bool)
        is_eval[rng.permutation(len(examples))[:eval_size]] = True
        return ([e for e, v in zip(examples, is_eval) if not v],
                [e for e, v in zip(examples, is_eval) if v])
    nouns = sorted({w for e in examples for w in (e.a, e.b, e.c)})
    rank = dict(zip(nouns, rng.permutation(len(nouns)).tolist()))
    latest = np.array([max(rank[e.a], rank[e.b], rank[e.c]) for e in examples])
    tiebreak = rng.random(len(examples))
    chosen = set(np.lexsort((tiebreak, latest))[:eval_size].tolist())
    eval_nouns = {w for i in chosen for w in (examples[i].a, examples[i].b, examples[i].c)}
    train = [e for i, e in enumerate(examples)
             if i not in chosen and not {e.a, e.b, e.c} & eval_nouns]
    if not train:
        raise ValueError(f"with disjoint_nouns=True, every example outside the {eval_size}-example eval set "
                         "uses an eval noun, so train is empty. Fix: a smaller eval_size or more examples.")
    return train, [e for i, e in enumerate(examples) if i in chosen]


def split_nouns(nouns=None, eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split a noun pool into disjoint (train_nouns, eval_nouns) at random, for building
    train and eval sets that share no noun (pass each as `nouns=`)."""
    pool = _resolve_nouns(nouns)
    k = round(len(pool) * eval_fraction)
    if not 3 <= k <= len(pool) - 3:
        raise ValueError(f"eval_fraction={eval_fraction} of {len(pool)} nouns leaves fewer than 3 on one side. "
                         "Fix: choose a fraction between them or use more nouns.")
    order = _rng(seed, _STREAM_NOUN_SPLIT).permutation(len(pool))
    pick = set(order[:k].tolist())
    return ([w for i, w in enumerate(pool) if i not in pick], [w for i, w in enumerate(pool) if i in pick])


def make_eval_set(n: int = EVAL_SIZE, seed: int = 0, exclude=None, templates=None,
                  nouns=None) -> list[Example]:
    """The paper's first evaluation set: n (3000) random examples, made like the master dataset.

    exclude: the training Examples (or their prompts); no eval prompt equals one
    of them. Pass it: without it nothing is excluded. The examples come from a
    random stream of their own, so seed may equal the training set's seed.
    Scored on c's first token against b's first token (tpp.encode_eval).
    """
    pool = _resolve_nouns(nouns)
    return _sample(n, _rng(seed, _STREAM_EVAL), load_templates(templates), (pool, pool, pool),
                   _exclude_set(exclude), "make_eval_set")


def single_token_nouns(nouns, tokenizer=None) -> list[str]:
    """The nouns w for which GPT-2 encodes " " + w as a single token."""
    pool = _resolve_nouns(nouns)
    ids = encode_many([" " + w for w in pool], tokenizer)
    return [w for w, t in zip(pool, ids) if len(t) == 1]


def make_single_token_eval_set(n: int = SINGLE_TOKEN_EVAL_SIZE, seed: int = 0, exclude=None,
                               templates=None, nouns=None, tokenizer=None,
                               single_token_b: bool = False) -> list[Example]:
    """The paper's second evaluation set: n (1150) examples where " c" is one GPT-2 token.

    Scored with tpp.encode_eval(..., single_token=True), which moves the
    prompt's trailing space onto c (" c") and b (" b"); the Example's prompt
    itself keeps the trailing space, like every other Example, so `exclude`
    compares like with like. c is drawn from the single-token nouns, a from
    the whole pool, b too unless single_token_b=True (then " b" is also one
    token, so the logit difference compares whole words).

    exclude: the training Examples (or their prompts). Pass it: without it
    nothing is excluded. Raises ValueError when too few single-token nouns
    exist for n distinct prompts.
    """
    pool = _resolve_nouns(nouns)
    single = single_token_nouns(pool, tokenizer)
    if not single:
        raise ValueError("no noun in the pool is a single GPT-2 token with a leading space, so no "
                         "single-token eval set can be built. Fix: use a pool with short common nouns.")
    pools = (pool, single if single_token_b else pool, single)
    return _sample(n, _rng(seed, _STREAM_SINGLE), load_templates(templates), pools,
                   _exclude_set(exclude), "make_single_token_eval_set")
