"""The Transitive Property Problem (TPP): dataset, GPT-2 tokenization and metrics.

A TPP prompt states a->b and b->c and stops where c is to be predicted:
"if all fish are drinkers and drinkers are preposterous then all fish are ".
This package knows nothing of the model: it makes Examples, encodes them into
token ids, labels and masks, and scores final-position logits (tpp.metrics).

The answer format travels with the model: where the space before c goes, the
paper's trailing space in the prompt ("prompt") or " c" ("answer", the bundled
models'). A model loaded by minigpt2.load_pretrained carries it as
model.answer_space (from its metadata.json); encode_eval(..., model=model)
encodes in it, and metrics.summarize(..., model=model) refuses a batch in the
other format, which would score about 0.

    import torch
    from minigpt2 import load_pretrained
    from tpp import master_dataset, make_eval_set, encode_for_training, encode_eval, metrics
    train = master_dataset(seed=0)[:15_800]            # the paper's 10% run
    batch = encode_for_training(train, space="answer") # input_ids / attention_mask / labels, ' c' format
    model = load_pretrained("weights/welterweight")    # finetuned in ' c': model.answer_space == "answer"
    ev = encode_eval(make_eval_set(200, seed=0, exclude=train), model=model)
    with torch.no_grad():                              # logits [B, vocab] at each prompt's last token
        logits = model(ev.tokens, positions=ev.answer_pos)  # (all positions: metrics.final_position)
    mean, sem = metrics.summarize(logits, ev, model=model)["accuracy"]
    print(f"accuracy {mean:.2f} ± {sem:.2f}")          # about 0.9

CLI: python -m tpp --help
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:  # OpenMP's wait policy, read once when torch loads (minigpt2/threads.py)
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
