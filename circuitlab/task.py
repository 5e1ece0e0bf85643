"""The TPP task as the circuit methods see it: data, metrics and runners, in one place.

Every command of circuits.py (the study's sections, ``acdc`` and ``eap``) and the benchmarks
build their prompts, metrics and edge runners here:

* :data:`METRICS`: the metric names, whether higher is better, and their table headings;
  :func:`make_metric` builds one as a :class:`minigpt2.engine.Metric` (per-example values
  [V, B]; ``metric.mean`` is the batch mean [V] that ACDC, EAP and the faithfulness checks read);
* :func:`build_data` / :func:`corrupted_partners`: eval prompts (and corrupted partners for
  resample ablation) in the models' answer format, outside their finetuning data;
* :func:`clean_logits`, :func:`to_prompts` (the sweep's and the search's batch), :func:`edge_runner`
  (the edge graph's runner);
* :func:`read_metadata`, :func:`finetuning_master`, :func:`answer_space_of`: what a model
  directory's metadata.json says about the data it was finetuned on;
* :data:`DTYPES` / :func:`torch_dtype`: the ``--dtype`` names (fp32, bf16) as the API takes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import tpp
from clikit import Range
from minigpt2.engine import Metric, kl_div
from minigpt2.fileio import FileError, load_json
from minigpt2.hardware import DTYPE_NAMES, autocast_dtype
from tpp.encoding import SPACES

from .circuitfile import json_kind
from .sweep import Prompts

METRICS = {  # name -> (higher is better, table heading)
    "accuracy": (True, "Frac Correct"),
    "logit_diff": (True, "Logit Diff"),
    "loss": (False, "Cross-entropy"),
    "kl": (False, "KL to clean"),
}
DTYPES = tuple(DTYPE_NAMES.values())  # --dtype: fp32 (the model's own precision) or bf16 matmuls (minigpt2.engine)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """A precision name (circuits.py's --dtype) as the API takes it: None for fp32 (the model's precision),
    torch.bfloat16 for bf16
    (minigpt2.hardware's parser: either spelling, fp32/float32, bf16/bfloat16)."""
    if name is not None and (not isinstance(name, str) or name.strip().lower() == "auto"):
        raise ValueError(f"dtype={name!r}: choose one of {list(DTYPES)}")
    try:
        return autocast_dtype(name)
    except ValueError:
        raise ValueError(f"dtype={name!r}: choose one of {list(DTYPES)}") from None


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """``{"dtype": dtype}``, or nothing for fp32 (None): the API's default is its own precision."""
    return {} if dtype is None else {"dtype": dtype}


# ---------------------------------------------------------------- model directories
def read_metadata(path) -> dict:
    """A model directory's metadata.json (written by train.py and finetune.publish), or {} when it has none.

    The fields read here are checked: data.master_size and data.data_seed (integers >= 0), answer_space
    and eval_data.answer_space (one of SPACES); a file that is not a JSON object is refused, naming it.
    """
    meta = Path(path) / "metadata.json"
    if not meta.is_file():
        return {}
    fix = "Fix: restore it from the run that wrote it (train.py, finetune.publish), or delete it"
    try:  # minigpt2.fileio: bounded size and depth, strict JSON, a byte-order mark refused
        d = load_json(meta, "")
    except FileError as e:
        raise ValueError(f"{e}. {fix}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{meta} holds a JSON {json_kind(d)}, not an object of run metadata. {fix}")
    for key in ("data", "eval_data"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f'{meta}: field "{key}" is a JSON {json_kind(d[key])}, not an object. {fix}')
    for key in ("master_size", "data_seed"):
        v = (d.get("data") or {}).get(key)
        if Range(0, whole=True, optional=True).problem(v) is not None:
            raise ValueError(f'{meta}: field "data.{key}" is {json.dumps(v)}, not an integer >= 0. {fix}')
    for key, v in (("answer_space", d.get("answer_space")), ("eval_data.answer_space",
                                                             (d.get("eval_data") or {}).get("answer_space"))):
        if v is not None and v not in SPACES:
            raise ValueError(f'{meta}: field "{key}" is {json.dumps(v)}, not one of {list(SPACES)}. {fix}')
    return d


def finetuning_master(paths) -> tuple[int, int]:
    """(size, seed) of the master dataset these models were finetuned on, from their metadata.json:
    the largest master_size found (0: none recorded, nothing to exclude) and its data_seed."""
    size, seed = 0, 0
    for path in paths:
        data = read_metadata(path).get("data") or {}
        size = max(size, data.get("master_size") or 0)
        seed = data.get("data_seed", seed) or 0
    return size, seed


def answer_space_of(paths, override: str | None = None) -> str:
    """The first eval set's answer format for these models: ``override``, else the one they were
    finetuned in (metadata.json: a run's answer_space, or a card's eval_data.answer_space), else the
    paper's "prompt" (a trailing space, c on its own). Models that disagree need ``override``."""
    if override is not None:
        if override not in SPACES:
            raise ValueError(f"answer_space={override!r}: choose 'prompt' (the paper's) or 'answer' (' c')")
        return override
    found = {}
    for path in paths:
        meta = read_metadata(path)
        space = meta.get("answer_space") or (meta.get("eval_data") or {}).get("answer_space")
        if space:
            found[str(path)] = space
    spaces = set(found.values())
    if len(spaces) > 1:
        raise ValueError(f"the models were finetuned in different answer formats ({found}); pass "
                         "answer_space='prompt' or 'answer' to score them all in one")
    return spaces.pop() if spaces else "prompt"


# ---------------------------------------------------------------- data
def corrupted_partners(examples, seed: int = 0, tries: int = 200):
    """For each example, the same template with three other random nouns and the same token
    length. Returns (kept examples, their partners); examples without a partner are dropped."""
    from tpp.encoding import encode_many

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    pool = tpp.load_nouns()
    kept, partners = [], []
    lengths = [len(t) for t in encode_many([e.prompt for e in examples])]
    for e, n in zip(examples, lengths):
        template = tpp.TEMPLATES.get(e.template)
        if template is None:
            continue
        for _ in range(tries):
            a, b, c = (pool[i] for i in rng.integers(len(pool), size=3))
            if len({a, b, c, e.a, e.b, e.c}) < 6:
                continue
            prompt = template.format(a=a, b=b, c=c) + " "
            if len(encode_many([prompt])[0]) == n:
                kept.append(e)
                partners.append(tpp.Example(e.template, a, b, c, prompt))
                break
    return kept, partners


def build_data(n: int, seed: int, ablation: str, space: str = "prompt", exclude=()):
    """(clean EvalBatch, corrupted tokens or None) of n TPP prompts in answer format ``space``,
    none of them among the examples in ``exclude`` (the models' finetuning data)."""
    examples = tpp.make_eval_set(n, seed, exclude=exclude)
    corrupted = None
    if ablation == "resample":
        examples, partners = corrupted_partners(examples, seed)
        if not examples:
            raise ValueError("no prompt found a corrupted partner of the same token length; use more examples "
                             "or ablation='mean' or 'zero'")
        corrupted = tpp.encode_eval(partners, space=space).tokens
    batch = tpp.encode_eval(examples, space=space)
    if corrupted is not None and corrupted.shape != batch.tokens.shape:
        raise ValueError(f"corrupted prompts padded to {tuple(corrupted.shape)}, clean ones to "
                         f"{tuple(batch.tokens.shape)}")
    return batch, corrupted


# ---------------------------------------------------------------- metrics and runners
@torch.no_grad()
def clean_logits(model, batch: tpp.EvalBatch, rows: int = 256) -> torch.Tensor:
    """[B, vocab] logits at the answer positions (on the model's device)."""
    out = []
    for i in range(0, len(batch), rows):
        b = batch.select(slice(i, i + rows))
        out.append(model(b.tokens.to(model.device), attention_mask=b.attention_mask.to(model.device),
                         positions=b.answer_pos.to(model.device)))
    return torch.cat(out)


_clean_logits = clean_logits  # make_metric's argument of that name shadows it


def make_metric(name: str, batch: tpp.EvalBatch, model=None, clean_logits: torch.Tensor | None = None) -> Metric:
    """A per-example TPP metric (logits [V, B, vocab] -> [V, B]) bound to ``batch``'s targets.

    "kl" (KL(clean || variant) per example, in nats; ACDC's default) compares with the clean
    logits [B, vocab] at the answer positions: ``clean_logits`` if given (e.g. an edge runner's
    ``runner.clean.logits``), else those of ``model`` on ``batch``.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {list(METRICS)}")
    higher = METRICS[name][0]
    m = tpp.metrics
    if name == "accuracy":
        return Metric(name, lambda logits, c: m.accuracy(logits, c), higher, {"c": batch.c_token}, step=1.0)
    if name == "logit_diff":
        return Metric(name, lambda logits, c, b: m.logit_diff(logits, c, b), higher,
                      {"c": batch.c_token, "b": batch.b_token})
    if name == "loss":
        return Metric(name, lambda logits, c: m.cross_entropy(logits, c), higher, {"c": batch.c_token})
    if clean_logits is None:
        if model is None:
            raise ValueError("the kl metric compares with the clean model's logits: pass the model or its clean logits")
        clean_logits = _clean_logits(model, batch)
    return Metric(name, lambda logits, clean: kl_div(clean, logits), higher, {"clean": clean_logits.detach()})


def to_prompts(batch: tpp.EvalBatch, ablation: str = "zero", seed: int = 0) -> Prompts:
    """The sweep's and the search's batch: ``batch``'s prompts, read at the answer positions."""
    if len(batch) == 0:
        raise ValueError("the eval set is empty; ask for at least one example")
    return Prompts(batch.tokens, batch.attention_mask, batch.answer_pos, ablation=ablation, seed=seed)


def edge_runner(model, batch: tpp.EvalBatch, corrupted: torch.Tensor | None, ablation: str,
                dtype: torch.dtype | None = None):
    """The edge graph's runner (circuitlab.graph.EdgeRunner) of ``batch`` under ``ablation``, on the
    model's device: "resample" takes ``corrupted`` [B, T] (from :func:`build_data`), "mean" and
    "zero" need none. ``dtype`` (None: the model's precision; torch.bfloat16) is the runner's
    arithmetic, which ACDC and EAP use."""
    from .graph import EdgeRunner

    dev = model.device
    return EdgeRunner(model, batch.tokens.to(dev), ablation, corrupted=None if corrupted is None else corrupted.to(dev),
                      attention_mask=batch.attention_mask.to(dev), positions=batch.answer_pos.to(dev),
                      **dtype_kwargs(dtype))
