"""Examples: determinism, distinct nouns and prompts, leak-free splits and eval sets."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpp import (TEMPLATES, Example, make_eval_set, make_examples, make_single_token_eval_set,
                 master_dataset, train_eval_split)
from tpp.encoding import encode_many
from tpp.examples import split_nouns

FEW = ["fish", "drinker", "cat", "dog", "owl"]  # 5 nouns -> 60 ordered distinct triples


def _check_example(e: Example, templates=TEMPLATES):
    assert len({e.a, e.b, e.c}) == 3
    assert e.prompt == templates[e.template].format(a=e.a, b=e.b, c=e.c) + " "
    assert not e.prompt.rstrip().endswith(e.c)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200))
def test_same_seed_same_examples_all_well_formed(seed, n):
    examples = make_examples(n, seed=seed)
    assert examples == make_examples(n, seed=seed)
    assert len(examples) == n and len({e.prompt for e in examples}) == n
    for e in examples:
        _check_example(e)


def test_different_seeds_differ():
    assert make_examples(50, seed=1) != make_examples(50, seed=2)


def test_master_dataset_has_the_papers_size_and_template_weights():
    examples = master_dataset()
    assert len(examples) == 158_000
    assert examples[:100] == make_examples(158_000)[:100]
    texts = Counter(TEMPLATES[e.template] for e in examples)
    duplicated = TEMPLATES["implies-transitive"]
    # Six distinct texts; the appendix's repeated one is drawn 2/7 of the time.
    assert len(texts) == 6
    assert texts[duplicated] / len(examples) == pytest.approx(2 / 7, abs=0.01)


def test_too_few_nouns_for_the_size_is_refused():
    make_examples(60, nouns=FEW, templates=["all-are"])  # exactly the capacity
    with pytest.raises(ValueError, match="only 60 distinct prompts"):
        make_examples(61, nouns=FEW, templates=["all-are"])


def test_duplicate_nouns_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        make_examples(5, nouns=FEW + ["cat"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(2, 300), frac=st.floats(0.01, 0.99))
def test_split_is_a_partition_without_shared_prompts(seed, n, frac):
    examples = make_examples(n, seed=seed)
    eval_size = min(n - 1, max(1, int(n * frac)))
    train, evals = train_eval_split(examples, eval_size, seed=seed)
    assert len(evals) == eval_size and len(train) == n - eval_size
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert sorted(map(repr, train + evals)) == sorted(map(repr, examples))
    assert (train, evals) == train_eval_split(examples, eval_size, seed=seed)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_disjoint_noun_split_shares_no_noun(seed):
    examples = make_examples(2000, seed=seed, nouns=[f"n{i}" for i in range(100)])
    train, evals = train_eval_split(examples, 50, seed=seed, disjoint_nouns=True)
    assert len(evals) == 50 and train
    nouns = lambda xs: {w for e in xs for w in (e.a, e.b, e.c)}
    assert not nouns(train) & nouns(evals)


def test_split_refuses_repeated_prompts_and_bad_sizes():
    examples = make_examples(10)
    with pytest.raises(ValueError, match="repeats the prompt"):
        train_eval_split(examples + examples[:1], 3)
    for bad in (0, 10, 2.5):
        with pytest.raises(ValueError, match="eval_size"):
            train_eval_split(examples, bad)


def test_eval_set_avoids_training_prompts_even_when_it_must_take_the_rest():
    train = make_examples(50, nouns=FEW, templates=["all-are"])
    evals = make_eval_set(10, seed=0, exclude=train, nouns=FEW, templates=["all-are"])
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    with pytest.raises(ValueError, match="could build only 10 of 11"):
        make_eval_set(11, exclude=[e.prompt for e in train], nouns=FEW, templates=["all-are"])


def test_eval_set_differs_from_master_with_the_same_seed():
    train = make_examples(3000, seed=0)
    evals = make_eval_set(3000, seed=0, exclude=train)
    assert len(evals) == 3000
    assert not {e.prompt for e in evals} & {e.prompt for e in train}


def test_single_token_eval_set_is_single_token():
    train = make_examples(1000, seed=3)
    evals = make_single_token_eval_set(seed=3, exclude=train)
    assert len(evals) == 1150
    assert all(len(ids) == 1 for ids in encode_many([" " + e.c for e in evals]))
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    for e in evals[:50]:
        _check_example(e)
    both = make_single_token_eval_set(200, seed=3, single_token_b=True)
    assert all(len(ids) == 1 for ids in encode_many([" " + e.b for e in both]))


def test_single_token_eval_set_larger_than_possible_is_refused():
    nouns = ["fish", "cat", "preposterous", "aardwolf"]  # only " fish" and " cat" are one token
    with pytest.raises(ValueError, match="only 12 distinct prompts"):
        make_single_token_eval_set(13, nouns=nouns, templates=["all-are"])


def test_split_nouns_is_disjoint_and_complete():
    train, evals = split_nouns([f"n{i}" for i in range(50)], eval_fraction=0.2, seed=1)
    assert len(evals) == 10 and not set(train) & set(evals)
    assert sorted(train + evals) == sorted(f"n{i}" for i in range(50))
