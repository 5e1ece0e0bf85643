"""The Transitive Property Problem (TPP): dataset, GPT-2 tokenization and metrics.

A TPP prompt states a->b and b->c and stops where c is to be predicted:
"if all fish are drinkers and drinkers are preposterous then all fish are ".
This package knows nothing of the model: it makes Examples, encodes them into
token ids, labels and masks, and scores final-position logits (tpp.metrics).

    from tpp import master_dataset, make_eval_set, encode_for_training, encode_eval, metrics
    train = master_dataset(seed=0)[:15_800]           # the paper's 10% run
    batch = encode_for_training(train)                 # input_ids / attention_mask / labels
    ev = encode_eval(make_eval_set(3000, seed=0, exclude=train))
    metrics.summarize(metrics.final_position(logits, ev), ev)

CLI: python -m tpp --help
"""

from tpp import metrics
from tpp.encoding import EOT_TOKEN, IGNORE_INDEX, EvalBatch, encode_eval, encode_for_training
from tpp.examples import (
    Example,
    make_eval_set,
    make_examples,
    make_single_token_eval_set,
    master_dataset,
    single_token_nouns,
    split_nouns,
    train_eval_split,
)
from tpp.jsonl import load_examples, save_examples
from tpp.nouns import load_nouns
from tpp.templates import DEFAULT_TEMPLATE_NAMES, TEMPLATES, check_template, load_templates

__all__ = [
    "TEMPLATES", "DEFAULT_TEMPLATE_NAMES", "load_templates", "check_template", "load_nouns",
    "Example", "make_examples", "master_dataset", "train_eval_split", "split_nouns",
    "encode_for_training", "EvalBatch", "make_eval_set", "make_single_token_eval_set",
    "single_token_nouns", "encode_eval", "metrics", "save_examples", "load_examples",
    "EOT_TOKEN", "IGNORE_INDEX",
]
