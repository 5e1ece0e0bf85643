"""The study: circuitlab's algorithms on the Transitive Property Problem, command by command.

Each command function takes a :class:`Session` (models and eval sets, loaded once)
and a directory, writes its JSON, PNG and markdown there, and returns a
:class:`Section` (markdown for the report, a short summary line). circuits.py
wraps each in an atomically written --out directory; :func:`study` runs them all
into one report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

import tpp
from minigpt2 import GPT2, GPT2Config, load_pretrained
from minigpt2.heads import Head
from clikit import Range

from . import paper, plots
from .circuitfile import check_circuit, check_own_models
from .compare import RECOVERS_NOTHING, not_a_finding, nothing_to_recover, recovers_nothing  # noqa: F401 (re-exported)
from .classify import (BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, INDUCTION_EXAMPLES, PAPER_CLASS_COUNTS, attending_heads,
                       attention_patterns, bootstrap_weights, check_class_args, classify_heads, count_interval,
                       induction_scores, induction_seq_len, prepend_bos, resampled_attending, target_attention)
from .probe import DEFAULT_PROMPT, continuations
from .report import atomic_dir, fmt, markdown_table, pm, provenance, write_json
from .search import DROPS, ORDERS, check_search_args, search
from .sweep import ABLATIONS, evaluate_masks, sweep
from .task import (DTYPES, METRICS, answer_space_of, build_data, clean_logits, dtype_kwargs,  # noqa: F401 (re-exported)
                   edge_runner, finetuning_master, make_metric, read_metadata, to_prompts, torch_dtype)
from .transfer import check_same_shape, circuit_mask, transfer

# The bundled models (weights/README.md) and their labels in the paper's tables.
BUNDLED = {
    "base": "GPT-2 base analog",
    "featherweight": "Featherweight",
    "lightweight": "Lightweight",
    "welterweight": "Welterweight",
}
DEFAULT_MODELS = [f"weights/{name}" for name in BUNDLED]
TABLE_METRICS = ("loss", "accuracy", "logit_diff")  # the paper's Tables 1 and 2, in its column order


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models and data
def parse_model_spec(spec: str) -> tuple[str, str]:
    """"LABEL=PATH" or "PATH" -> (label, path); bundled directories get the paper's names."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    name = Path(spec.rstrip("/")).name
    return BUNDLED.get(name, name), spec


def check_model_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        hint = (" The bundled models are trained by train.py (see weights/README.md); restore them with "
                "git checkout weights/." if p.parent.name == "weights" else "")
        raise FileNotFoundError(f"no model at {path}: pass model_specs with directories holding config.json and "
                                f"model.safetensors.{hint}")
    return p


def load_model(path: str, device=None) -> GPT2:
    """The model in directory ``path``, on ``device`` (None: the CPU)."""
    return load_pretrained(check_model_path(path), device=device)


def model_config(path: str) -> GPT2Config:
    """A model's config from its config.json, without reading the weights (from them if it has none)."""
    p = check_model_path(path)
    config = p / "config.json" if p.is_dir() else p.with_name("config.json")
    return GPT2Config.from_json(config) if config.is_file() else load_model(path).cfg


def c_key_mask(batch: tpp.EvalBatch) -> torch.Tensor:
    """[B, T] bool: the tokens of c where the prompt states it ("... {b} are {c} then ...")."""
    from minigpt2 import get_tokenizer

    enc = get_tokenizer()
    mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    for i, e in enumerate(batch.examples):
        template = tpp.TEMPLATES.get(e.template)
        start = (len(template.split("{c}")[0].format(a=e.a, b=e.b)) if template and "{c}" in template
                 else e.prompt.find(f" {e.c} ") + 1)
        end = start + len(e.c)
        n = int(batch.attention_mask[i].sum())
        _, offsets = enc.decode_with_offsets(batch.tokens[i, :n].tolist())
        offsets = offsets + [len(e.prompt)]
        for t in range(n):
            if offsets[t] < end and offsets[t + 1] > start:
                mask[i, t] = True
    return mask


@dataclass
class Session:
    """Models and eval sets, loaded once and shared by the commands."""

    model_specs: list[str]
    seed: int = 0
    n_eval: int = tpp.examples.EVAL_SIZE
    n_single: int = tpp.examples.SINGLE_TOKEN_EVAL_SIZE
    master_size: int | None = None  # None: the largest master_size in the models' metadata.json, else 0
    data_seed: int | None = None
    answer_space: str | None = None  # None: the models' finetuning format (answer_space_of)
    device: str | None = None  # where the models are loaded and run (None: the CPU); circuits.py's --device
    labels: list[str] = field(init=False)
    paths: dict[str, str] = field(init=False)

    def __post_init__(self):
        if not self.model_specs:
            raise ValueError("no models given; pass model_specs, model directories (DIR or LABEL=DIR)")
        specs = [parse_model_spec(s) for s in self.model_specs]
        self.labels = [label for label, _ in specs]
        if any(not label.strip() or not path.strip() for label, path in specs):
            raise ValueError(f"model_specs={self.model_specs}: an empty label or directory; pass DIR or LABEL=DIR")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"model_specs: two models share a label in {self.labels}; name them with LABEL=PATH")
        self.paths = dict(specs)
        for name in ("n_eval", "n_single"):
            Range(1, whole=True).check(name, getattr(self, name), why="an empty eval set measures nothing")
        for name in ("master_size", "data_seed", "seed"):
            Range(0, whole=True, optional=True).check(name, getattr(self, name))
        self.answer_space = answer_space_of(self.paths.values(), self.answer_space)
        self._master = finetuning_master(self.paths.values())  # reads (and checks) every metadata.json now

    @cached_property
    def models(self) -> dict[str, GPT2]:
        return {label: load_model(self.paths[label], self.device) for label in self.labels}

    @cached_property
    def configs(self) -> dict[str, GPT2Config]:
        """Each model's config, read from its config.json without loading the weights."""
        if "models" in self.__dict__:
            return {label: m.cfg for label, m in self.models.items()}
        return {label: model_config(self.paths[label]) for label in self.labels}

    @cached_property
    def frequent_tokens(self) -> tuple[str, torch.Tensor] | None:
        """(label, ids): the most frequent pretraining tokens recorded by ``train.py pretrain`` in the
        first model's metadata.json that has them (the base); None when no model has them. Models
        pretrained here saw only these often, unlike GPT-2 small, which saw every token."""
        for label in self.labels:
            ids = read_metadata(self.paths[label]).get("frequent_tokens")
            if ids is None:
                continue
            vocab = self.configs[label].vocab_size
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids)):
                raise ValueError(f"{self.paths[label]}/metadata.json: frequent_tokens must be a non-empty list of "
                                 f"token ids in [0, {vocab}). Fix: restore it from the run that wrote it (train.py), "
                                 "or delete the field")
            return label, torch.tensor(ids, dtype=torch.long)
        return None

    def check_same_shape(self) -> None:
        """Refuse models of different shapes (layers x heads), naming them, before any is loaded."""
        check_same_shape({f"{label} ({self.paths[label]})": cfg for label, cfg in self.configs.items()})

    def check_sample(self, n: int, what: str = "n_examples", eval_what: str = "n_eval") -> None:
        """A draw of ``n`` examples (named ``what``) must fit in the eval set (sized by ``eval_what``); a
        script passes its flags' names."""
        Range(1, self.n_eval, whole=True).check(what, n, why=f"the eval set has {self.n_eval:,} examples",
                                                 fix=f"ask for fewer, or a larger eval set ({eval_what})")

    def _training_data(self) -> tuple[int, int]:
        size, seed = self._master
        return (size if self.master_size is None else self.master_size,
                seed if self.data_seed is None else self.data_seed)

    @cached_property
    def exclude(self) -> list:
        """The master dataset the models were finetuned on: no eval prompt is one of its prompts."""
        size, seed = self._training_data()
        return tpp.master_dataset(seed=seed, n=size) if size else []

    @cached_property
    def eval_batch(self) -> tpp.EvalBatch:
        return self.check_holds(tpp.encode_eval(tpp.make_eval_set(n=self.n_eval, seed=self.seed, exclude=self.exclude),
                                                space=self.answer_space), "TPP eval")

    @cached_property
    def single_batch(self) -> tpp.EvalBatch:
        return self.check_holds(tpp.encode_eval(tpp.make_single_token_eval_set(n=self.n_single, seed=self.seed,
                                                                               exclude=self.exclude),
                                                single_token=True), "single-token eval")

    def check_holds(self, batch: tpp.EvalBatch, what: str) -> tpp.EvalBatch:
        """``batch``, once every model can take it: GPT-2's token ids below its vocabulary size, the
        longest prompt within its n_ctx; else a ValueError naming the model and the reason."""
        top, length = int(batch.tokens.max()), batch.tokens.shape[1]
        for label, cfg in self.configs.items():
            name = f"model {label} ({self.paths[label]})"
            if cfg.vocab_size <= top:
                raise ValueError(f"{name} cannot read the {what} prompts: its vocabulary has {cfg.vocab_size} tokens, "
                                 f"the prompts are GPT-2 tokens with ids up to {top}. Fix: pass a model with GPT-2's "
                                 "vocabulary (vocab_size 50257)")
            if cfg.n_ctx < length:
                raise ValueError(f"{name} cannot read the {what} prompts: its n_ctx is {cfg.n_ctx}, the prompts are up "
                                 f"to {length} tokens long. Fix: pass a model with n_ctx >= {length}")
        return batch

    @cached_property
    def census_batch(self) -> tpp.EvalBatch:
        """The eval set of tpp's full size (3000), from which ``circuits.py classify`` and the model cards'
        head census draw: the eval set itself when it has that size."""
        if self.n_eval == tpp.examples.EVAL_SIZE:
            return self.eval_batch
        return self.check_holds(tpp.encode_eval(tpp.make_eval_set(n=tpp.examples.EVAL_SIZE, seed=self.seed,
                                                                  exclude=self.exclude), space=self.answer_space),
                                "TPP eval")

    def census_sample(self, n: int) -> tpp.EvalBatch:
        """n examples drawn as circuitlab.classify.head_census draws them (a model card's census): the first n
        of a seeded permutation of :attr:`census_batch`, whatever the size of this session's eval set."""
        size = tpp.examples.EVAL_SIZE
        Range(1, size, whole=True).check("n_examples", n, why=f"the census's eval set has {size:,} examples",
                                         fix="ask for fewer")
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
        return self.census_batch.select(order[:n])

    def sample(self, n: int, what: str) -> tpp.EvalBatch:
        """n examples of the eval set drawn at random (seeded); the same n always gives the same rows."""
        self.check_sample(n, what)
        order = torch.randperm(len(self.eval_batch), generator=torch.Generator().manual_seed(self.seed))
        return self.eval_batch.select(order[:n])

    def data_info(self) -> dict:
        size, seed = self._training_data()
        return {"seed": self.seed, "n_eval": self.n_eval, "n_single": self.n_single, "answer_space": self.answer_space,
                "excluded_master_size": size, "master_data_seed": seed, "models": self.paths,
                "device": str(self.device or "cpu")}


@dataclass
class Section:
    title: str
    markdown: str
    summary: str
    data: dict = field(default_factory=dict)


def paper_setup(session: Session, examples: str, answer_space: str | None = None) -> str:
    """The line under a table with the paper's figures: how our setup differs from the paper's."""
    cfg = next(iter(session.configs.values()))
    n_params = None
    if "models" in session.__dict__:  # loaded already: count its parameters (the unembedding is tied)
        n_params = sum(p.numel() for p in next(iter(session.models.values())).parameters())
    return paper.setup_difference(cfg.n_layer, cfg.n_head, cfg.d_model, n_params, examples, answer_space)


def _label_file(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_").lower() or "model"


# ---------------------------------------------------------------- 1. baseline
def baseline(session: Session, out: Path, eval_set_values: dict[str, dict[str, tuple[float, float]]] | None = None
             ) -> Section:
    """The paper's Tables 1 and 2: cross-entropy, accuracy, logit difference (± s.e.m.) per model.

    ``eval_set_values`` ({model: {metric: (mean, sem)}} on the first eval set, e.g. the intact
    models' row of a transfer run) saves evaluating that set again.
    """
    sets = {f"Table 1: the {len(session.eval_batch)}-example eval set": session.eval_batch,
            f"Table 2: the {len(session.single_batch)}-example single-token eval set": session.single_batch}
    papers = [(paper.TABLE1, f"{paper.TABLE1_EXAMPLES}", session.answer_space),
              (paper.TABLE2, f"{paper.TABLE2_EXAMPLES} (its caption says 1500)", None)]
    results, md = {}, []
    for k, (title, batch) in enumerate(sets.items()):
        rows = []
        table, paper_n, space = papers[k]
        metrics = [make_metric(n, batch) for n in TABLE_METRICS]
        for label, model in session.models.items():
            if k == 0 and eval_set_values is not None:
                mean, sem = (torch.tensor([eval_set_values[label][n][i] for n in TABLE_METRICS]) for i in (0, 1))
            else:
                log(f"[baseline] {label} on {len(batch)} examples")
                values = evaluate_masks(model, to_prompts(batch), torch.ones(1, model.cfg.n_layer, model.cfg.n_head),
                                        metrics, progress=True)[0]  # [B, M]
                mean, sem = tpp.metrics.mean_sem(values.T)
            results.setdefault(title, {})[label] = {n: {"mean": float(mean[i]), "sem": float(sem[i])}
                                                    for i, n in enumerate(TABLE_METRICS)}
            theirs = table.get(paper.paper_model(label, session.paths[label]))
            rows.append([label, *(cell for i in range(len(TABLE_METRICS))
                                  for cell in (pm(mean[i], sem[i]), paper.cell(None if theirs is None else theirs[i])))])
        headers = [h for n in TABLE_METRICS for h in (METRICS[n][1], f"{METRICS[n][1]} (paper)")]
        md += [f"**{title}**", "", markdown_table(["Model", *headers], rows), "",
               paper_setup(session, f"examples: ours {len(batch)}, the paper's {paper_n}", space), ""]
    write_json(out / "baseline.json", results)
    text = "\n".join(md)
    (out / "baseline.md").write_text(text + "\n")
    first = next(iter(results.values()))
    summary = "accuracy " + ", ".join(f"{k} {v['accuracy']['mean']:.3f}" for k, v in first.items())
    return Section("Baseline (section 5.1, Tables 1 and 2)", text, summary, results)


# ---------------------------------------------------------------- 2. sweep
def head_sweep(session: Session, out: Path, n_examples: int = 100, metrics: list[str] = ("accuracy", "logit_diff", "loss"),
               ablation: str = "zero", top: int = 3, dtype: str = "fp32") -> Section:
    """Every head ablated alone: its effect on each metric, as heatmaps and a top-k table.
    ``dtype``: "fp32", or "bf16" (bf16 matmuls, fp32 metrics: minigpt2.engine)."""
    precision = torch_dtype(dtype)
    session.check_same_shape()  # the heatmaps share one grid
    batch = session.sample(n_examples, "n_examples")
    results, rows = {}, []
    effects: dict[str, dict[str, torch.Tensor]] = {m: {} for m in metrics}
    n_heads = 0
    for label, model in session.models.items():
        n_heads = model.cfg.n_layer * model.cfg.n_head
        log(f"[sweep] {label}: {n_heads} heads on {len(batch)} examples")
        ms = [make_metric(m, batch, model) for m in metrics]
        r = sweep(model, to_prompts(batch, ablation, session.seed), ms, progress=True, **dtype_kwargs(precision))
        results[label] = r.to_json()
        cells = []
        for m in metrics:
            effects[m][label] = r.effect(m)
            worst = [(l, h, e) for l, h, e in r.top(m, top) if r.harm(m)[l, h] > 0]
            cells.append(f"{fmt(r.clean[m])}: " + (", ".join(f"{Head(l, h)} ({e:+.3g})" for l, h, e in worst)
                                                   or "no head's ablation hurts"))
        rows.append([label, *cells])
    write_json(out / "sweep.json", results)
    md = [f"Each of the {n_heads} heads ablated alone ({ablation} ablation{', bf16' if precision else ''}) on "
          f"{len(batch)} examples. Table: the "
          f"intact model's value, then the {top} heads whose ablation hurts most (the change in brackets). "
          f"Heatmaps: ablated minus intact, one colour convention on every map: **{plots.HARM} = the ablation hurts** "
          f"(accuracy or logit difference falls, loss rises), {plots.HELP} = it helps.", "",
          markdown_table(["Model", *metrics], rows), ""]
    for m in metrics:
        better = METRICS[m][0]
        png = plots.heatmaps(effects[m], out / f"sweep_{m}.png", title=f"Single-head ablation: change in {m} "
                             f"({plots.HARM}: the ablation hurts)", diverging=True, higher_is_better=better,
                             colorbar=plots.harm_label(m, better))
        md += [f"![sweep {m}]({png.name})", ""]
    text = "\n".join(md)
    (out / "sweep.md").write_text(text + "\n")
    return Section("Single-head ablation sweep", text, f"{len(session.models)} models x {n_heads} heads", results)


# ---------------------------------------------------------------- 3. search
@dataclass
class SearchOptions:
    metric: str = "accuracy"
    threshold: float = 0.03
    order: str = "layer-up"
    drop: str | None = None  # None: relative, except absolute for kl (whose baseline starts at 0)
    ablation: str = "zero"
    n_examples: int = 100
    rigorous_examples: int = 0  # 0: off
    speculate: int | None = None  # None: 1 on a CPU, 8 on a GPU
    dtype: str = "fp32"  # or "bf16": bf16 matmuls, fp32 metrics (minigpt2.engine); the circuit's evaluation too

    def resolved_drop(self) -> str:
        return self.drop or ("absolute" if self.metric == "kl" else "relative")

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {list(METRICS)}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {ORDERS}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation mode {self.ablation!r}; choose one of {ABLATIONS}")
        if self.drop is not None and self.drop not in DROPS:
            raise ValueError(f"unknown drop {self.drop!r}; choose one of {DROPS}")
        check_search_args(self.threshold, self.order, self.resolved_drop())
        Range(1, whole=True).check("n_examples", self.n_examples, why="the search needs at least one example per check")
        Range(0, whole=True).check("rigorous_examples", self.rigorous_examples, why="0: no re-check")
        if self.rigorous_examples and self.rigorous_examples <= self.n_examples:
            raise ValueError(f"rigorous_examples={self.rigorous_examples} must exceed the search's {self.n_examples} "
                             "examples (n_examples): the re-check is on a larger set. "
                             "Fix: pass a larger rigorous_examples, or 0 for none")
        Range(1, whole=True, optional=True).check("speculate", self.speculate, why="heads per speculative batch")
        torch_dtype(self.dtype)


def evaluate_circuit(model: GPT2, mask: torch.Tensor, batch: tpp.EvalBatch, metrics=TABLE_METRICS,
                     dtype: torch.dtype | None = None) -> dict:
    """The model intact and with the circuit's ablations, on every example of ``batch``."""
    masks = torch.stack([torch.ones_like(mask), mask])
    values = evaluate_masks(model, to_prompts(batch), masks, [make_metric(m, batch) for m in metrics],
                            **dtype_kwargs(dtype))  # [2, B, M]
    mean, sem = tpp.metrics.mean_sem(values.permute(0, 2, 1))  # [2, M] each
    return {"n_examples": len(batch)} | {m: {"clean": float(mean[0, i]), "circuit": float(mean[1, i]),
                                             "circuit_sem": float(sem[1, i])} for i, m in enumerate(metrics)}


def find_circuits(session: Session, out: Path, opts: SearchOptions,
                  evaluate: bool = True) -> tuple[Section, dict[str, dict]]:
    """The paper's search on each model; circuits written as circuit_<model>.json, each
    evaluated on the full eval set when ``evaluate``."""
    opts.check()
    session.check_same_shape()  # the circuit map shares one grid
    batch = session.sample(opts.n_examples, "n_examples")
    rig = session.sample(opts.rigorous_examples, "rigorous_examples") if opts.rigorous_examples else None
    circuits, rows, masks = {}, [], {}
    precision = torch_dtype(opts.dtype)
    for label, model in session.models.items():
        log(f"[search] {label}: {opts.metric}, threshold {opts.threshold}, {opts.order}, {opts.ablation} ablation"
            + (f", {opts.dtype}" if precision else ""))
        speculate = opts.speculate or (1 if model.device.type == "cpu" else 8)
        r = search(model, to_prompts(batch, opts.ablation, session.seed), make_metric(opts.metric, batch, model),
                   opts.threshold, opts.order, opts.resolved_drop(),
                   rigorous_prompts=None if rig is None else to_prompts(rig, opts.ablation, session.seed),
                   rigorous_metric=None if rig is None else make_metric(opts.metric, rig, model),
                   speculate=speculate, progress=True, **dtype_kwargs(precision))
        c = r.to_json(session.paths[label], model.cfg.to_dict()) | {"label": label, "seed": session.seed}
        full = []
        if evaluate:
            log(f"[search] {label}: the circuit on the {len(session.eval_batch)}-example eval set")
            c["eval"] = evaluate_circuit(model, r.mask(), session.eval_batch, dtype=precision)
            full = [pm(c["eval"]["accuracy"]["circuit"], c["eval"]["accuracy"]["circuit_sem"]),
                    fmt(c["eval"]["accuracy"]["clean"])]
        circuits[label] = c
        masks[label] = r.mask()
        write_json(out / f"circuit_{_label_file(label)}.json", c)
        theirs = paper.TABLE3.get((paper.paper_model(label, session.paths[label]),) * 2)
        rows.append([label, len(r.ablated), paper.cell(None if theirs is None else theirs[0]), len(r.kept_heads),
                     fmt(r.clean_value), fmt(r.final_value), *full, f"{r.seconds:.1f}"])
    png = plots.circuit_map(masks, out / "circuits.png", title="Circuits found by the search: each model's heads, "
                            "kept or ablated")
    rig_text = f", each kept ablation re-checked on {opts.rigorous_examples} examples" if rig is not None else ""
    md = [f"Layer-by-layer search ({opts.order}), metric {opts.metric}, {opts.resolved_drop()} drop < "
          f"{opts.threshold} against each layer's baseline, {opts.ablation} ablation, {opts.n_examples} "
          f"examples{rig_text}{', bf16 matmuls' if precision else ''}.", "",
          markdown_table(["Model", "Heads removed", "Heads removed (paper)", "Heads kept",
                          f"{opts.metric} clean (search set)",
                          f"{opts.metric} with circuit (search set)",
                          *([f"Accuracy with circuit ({len(session.eval_batch)} examples)", "Accuracy intact"]
                            if evaluate else []), "search seconds"], rows), "",
          *paper.method_lines(["search"]), "",
          paper_setup(session, f"search examples: ours {opts.n_examples}, the paper's 100; the paper's setting: "
                               f"accuracy, threshold {paper.TABLE3_THRESHOLD}, zero ablation, layer-up"), "",
          f"![circuits]({png.name})", ""]
    text = "\n".join(md)
    (out / "search.md").write_text(text + "\n")
    summary = ", ".join(f"{k}: {v['n_ablated']} heads removed" for k, v in circuits.items())
    return Section("Attention-focused circuit search (section 5.3)", text, summary, circuits), circuits


# ---------------------------------------------------------------- 4. transfer
def cross_evaluate(session: Session, out: Path, circuits: dict[str, dict],
                   metrics: list[str] = ("accuracy", "logit_diff", "loss")) -> Section:
    """The paper's Table 3: each circuit on each model, on the full eval set."""
    check_same_shape(session.models)
    for label, model in session.models.items():
        for c in circuits.values():
            circuit_mask(c, model, label)  # refuse a circuit of another shape before any work
    batch = session.eval_batch
    log(f"[transfer] {len(circuits)} circuits x {len(session.models)} models on {len(batch)} examples")
    ms = [make_metric(m, batch) for m in metrics]
    r = transfer(session.models, circuits, to_prompts(batch), ms, progress=True)
    rows = []
    for j, cname in enumerate(r.circuits):
        for i, mname in enumerate(r.models):
            theirs = paper.TABLE3.get((paper.paper_model(mname, session.paths.get(mname)),
                                       paper.paper_model(cname, circuits[cname].get("model"))))
            rows.append([mname, cname, fmt(circuits[cname].get("threshold")), r.n_ablated[j],
                         paper.cell(None if theirs is None else theirs[0]),
                         pm(r.values["accuracy"][i, j], r.sem["accuracy"][i, j]),
                         paper.cell(None if theirs is None else theirs[1]),
                         fmt(r.values["logit_diff"][i, j]), fmt(r.clean["accuracy"][i])])
    write_json(out / "transfer.json", r.to_json() | {"circuit_files": {k: c.get("source") for k, c in circuits.items()}})
    text = "\n".join([f"Accuracy on the {len(batch)}-example eval set of each model (rows) with the heads ablated "
                      "that the search removed on another (Constructed on).", "",
                      markdown_table(["Model", "Constructed on Model", "Threshold", "Heads Removed",
                                      "Heads Removed (paper)", "Accuracy", "Accuracy (paper)", "Logit Diff",
                                      "Accuracy intact"], rows), "",
                      paper_setup(session, f"examples: ours {len(batch)}, the paper's {paper.TABLE1_EXAMPLES}; "
                                           f"the paper's circuits: threshold {paper.TABLE3_THRESHOLD} on accuracy",
                                  session.answer_space), ""])
    (out / "transfer.md").write_text(text + "\n")
    best = max(((r.values["accuracy"][i, j].item(), m, c) for i, m in enumerate(r.models)
                for j, c in enumerate(r.circuits)), default=(0, "", ""))
    return Section("Circuits across models (section 5.3, Table 3)", text,
                   f"best: {best[1]} with {best[2]}'s circuit, accuracy {best[0]:.3f}", r.to_json())


# ---------------------------------------------------------------- 5. classify
# The paper's section 5.4, GPT-2 small's circuit: 29 first-token, 1 identity (self), 4 previous-token and
# 3 induction heads; 6 of the circuit's heads attend strongly to c.


def c_attending_nesting(heads: dict[str, list[tuple[int, int]]],
                        resampled: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """The paper's claim (section 5.4): each model's c-attending heads are a subset of the next one's
    (Featherweight's within Lightweight's within Welterweight's). For each consecutive pair of models,
    in the order given: the fraction of the first's heads found in the second, and their Jaccard overlap.
    With ``resampled`` ({model: [R, L, H] bool}, the c-attending heads in each bootstrap resample of the
    same examples): "subset_share", the share of resamples in which the subset holds."""
    labels, out = list(heads), []
    for a, b in zip(labels, labels[1:]):
        A, B = set(heads[a]), set(heads[b])
        out.append({"from": a, "to": b, "n_from": len(A), "n_to": len(B), "shared": len(A & B),
                    "subset_fraction": len(A & B) / len(A) if A else None,
                    "jaccard": len(A & B) / len(A | B) if A | B else None, "is_subset": A <= B})
        if resampled is not None:
            holds = ~(resampled[a] & ~resampled[b]).flatten(1).any(dim=1)  # [R]
            out[-1]["subset_share"] = float(holds.double().mean())
    return out


def nesting_markdown(nested: list[dict], paper_verdicts: list[bool | None] | None = None) -> list[str]:
    if not nested:
        return []
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    verdicts = paper_verdicts or [None] * len(nested)
    rows = [[f"{n['from']} ⊆ {n['to']}", n["n_from"], n["n_to"], n["shared"], fmt(n["subset_fraction"]),
             fmt(n["jaccard"]), "yes" if n["is_subset"] else "no", fmt(n.get("subset_share")),
             "–" if v is None else ("yes" if v else "no")] for n, v in zip(nested, verdicts)]
    return ["c-attending heads nested across models (the paper: all of Featherweight's are in Lightweight's, "
            "all of Lightweight's in Welterweight's). *Subset in resamples*: the share of bootstrap resamples of "
            "the examples in which the subset holds, so a verdict that a few examples can flip reads as such:", "",
            markdown_table(["Pair", "Heads (first)", "Heads (second)", "Shared", "Share of first in second",
                            "Jaccard", "Subset", "Subset in resamples", "Subset (paper)"], rows), ""]


def _count(point: int, interval: tuple[int, int]) -> str:
    """A head count with its bootstrap interval: "3 [2–4]"."""
    return f"{point} [{interval[0]}–{interval[1]}]"


LETTERS = {"first": "F", "self": "S", "previous": "P", "induction": "I"}


@dataclass
class _ModelClasses:
    """One model's classes, c-attending heads and induction scores, with their resamples."""

    hc: object  # classify.HeadClasses on the prompts as they are
    hb: object  # the same with <|endoftext|> first
    c_att: torch.Tensor  # [L, H] mean attention to c
    c_heads: list[tuple[int, int]]
    c_resampled: torch.Tensor  # [R, L, H] bool
    ind: torch.Tensor  # [L, H] induction score on repeated random tokens
    frequent: dict  # the same on the base's frequent tokens ({} without them)
    kept: list[tuple[int, int]] | None  # the model's circuit's heads, if given
    rep_len: int  # |s| of the induction probe's [BOS, s, s]


def _classify_model(session: Session, model: GPT2, batch: tpp.EvalBatch, keys: torch.Tensor, weights: torch.Tensor,
                    thresholds: tuple[float, float, float], circuit: dict | None) -> _ModelClasses:
    score_threshold, min_fraction, c_threshold = thresholds
    patterns = attention_patterns(model, batch.tokens, batch.attention_mask).cpu()  # the scores: with the CPU masks
    hc = classify_heads(model, batch.tokens, batch.attention_mask, score_threshold, min_fraction, patterns)
    # the same prompts as TransformerLens feeds them by default: <|endoftext|> first
    hb = classify_heads(model, *prepend_bos(batch.tokens, batch.attention_mask), score_threshold, min_fraction)
    per_example = target_attention(patterns, batch.answer_pos, keys)  # [B, L, H]
    c_att = per_example.mean(dim=0)
    kept = [tuple(h) for h in check_circuit(circuit)["kept_heads"]] if circuit else None
    # TransformerLens's induction score on repeated random tokens [BOS, s, s], |s| = 50 (or what n_ctx holds)
    rep_len = induction_seq_len(model)
    ind = induction_scores(model, seq_len=rep_len, n_examples=INDUCTION_EXAMPLES, seed=session.seed).cpu()
    frequent = {}
    if session.frequent_tokens is not None:  # the same on tokens the models were pretrained on
        source, pool = session.frequent_tokens
        ind_f = induction_scores(model, seq_len=rep_len, n_examples=INDUCTION_EXAMPLES, seed=session.seed,
                                 pool=pool).cpu()
        frequent = {"scores": ind_f.tolist(), "pool_from": source, "pool_size": len(pool),
                    "heads": [list(h) for h in (ind_f > score_threshold).nonzero().tolist()]}
    return _ModelClasses(hc, hb, c_att, attending_heads(c_att, c_threshold),
                         resampled_attending(per_example, c_threshold, weights), ind, frequent, kept, rep_len)


def _class_row(label: str, m: _ModelClasses, score_threshold: float) -> list:
    """The class table's row: each count with its bootstrap interval; among the circuit's heads when given
    (all heads in brackets)."""
    def cell(resampled, heads):
        heads = [tuple(h) for h in heads]
        every = _count(len(heads), count_interval(resampled))
        if m.kept is None:
            return every
        return f"{_count(len([h for h in heads if h in set(m.kept)]), count_interval(resampled, m.kept))} ({every})"

    def plain(heads):
        n_in = len([h for h in map(tuple, heads) if m.kept is None or h in set(m.kept)])
        return str(len(heads)) if m.kept is None else f"{n_in} ({len(heads)})"
    ind_heads = (m.ind > score_threshold).nonzero().tolist()
    row = [label, "–" if m.kept is None else len(m.kept), *(cell(m.hc.resampled[c], m.hc.heads[c]) for c in LETTERS),
           plain(ind_heads), f"{m.ind.max().item():.2f}"]
    if m.frequent:
        row += [plain(m.frequent["heads"]), f"{torch.tensor(m.frequent['scores']).max().item():.2f}"]
    return row + [cell(m.c_resampled, m.c_heads)]


def _borderline_lines(done: dict[str, _ModelClasses]) -> list[str]:
    """Heads whose share of examples lies within 2 standard errors of the 80 % rule, per model."""
    parts = []
    for label, m in done.items():
        heads = [f"{LETTERS[c]} L{l}H{h} ({m.hc.fraction[c][l, h]:.2f} ± {m.hc.sem[c][l, h]:.2f})"
                 for c in LETTERS for l, h in m.hc.borderline(c)]
        parts.append(f"{label}: {', '.join(heads) if heads else 'none'}")
    return ["Heads whose share of examples lies within 2 standard errors of the rule's "
            f"{next(iter(done.values())).hc.min_fraction:.0%} (share ± s.e.; another draw of examples may classify "
            "them otherwise): " + "; ".join(parts) + ".", ""]


def _two_digits(x: float) -> str:
    """An attention weight in a heatmap cell, three characters: ".58", "1.0"."""
    text = f"{x:.2f}"
    return text[1:] if text.startswith("0.") else text[:3]


def _class_figures(out: Path, done: dict[str, _ModelClasses], c_threshold: float) -> tuple[Path, Path]:
    c_marks = {label: {h: _two_digits(float(m.c_att[h])) for h in m.c_heads} for label, m in done.items()}
    fig2 = plots.heatmaps({label: m.c_att for label, m in done.items()}, out / "c_attention.png",
                          title=f"Mean attention from the final position to c (the paper's Figure 2); numbers: "
                                f"heads above {c_threshold}", vmin=0, vmax=1, cmap="magma", marks=c_marks,
                          colorbar="attention to c", size=5.0)
    marks = {}
    for label, m in done.items():
        marks[label] = {}
        for c, letter in LETTERS.items():
            for h in m.hc.heads[c]:
                marks[label][h] = marks[label].get(h, "") + letter
    class_maps = {label: torch.stack([m.hc.fraction[c] for c in LETTERS]).max(dim=0).values for label, m in done.items()}
    png = plots.heatmaps(class_maps, out / "head_classes.png", cmap="Blues", vmin=0, vmax=1, marks=marks, size=5.0,
                         title="Head classes (letters): F first-token, S self, P previous-token, I induction",
                         colorbar="share of examples showing the head's most frequent class")
    return fig2, png


def classify(session: Session, out: Path, n_examples: int = 100, score_threshold: float = 0.4,
             min_fraction: float = 0.8, c_threshold: float = 0.4, circuits: dict[str, dict] | None = None) -> Section:
    """Head classes (first, self, previous, induction) and c-attending heads, per model, each count with its
    bootstrap interval over the examples; with ``circuits`` ({model label: circuit}), counted among each
    model's circuit's heads too. The examples: ``n_examples`` of the 3000-example eval set, drawn as
    ``circuits.py classify`` and the model cards' census draw them (:meth:`Session.census_sample`)."""
    check_class_args(score_threshold, min_fraction, c_threshold)
    session.check_same_shape()  # the heatmaps share one grid
    if circuits:
        check_own_models(circuits, session.configs)
    batch = session.census_sample(n_examples)
    keys = c_key_mask(batch)
    weights = bootstrap_weights(len(batch), seed=session.seed)  # the same resamples for every model
    done: dict[str, _ModelClasses] = {}
    for label, model in session.models.items():
        log(f"[classify] {label} on {len(batch)} examples")
        done[label] = _classify_model(session, model, batch, keys, weights, (score_threshold, min_fraction, c_threshold),
                                      circuits.get(label) if circuits else None)
    results = {label: _classify_json(m) for label, m in done.items()}
    rows = [_class_row(label, m, score_threshold) for label, m in done.items()]
    freq = session.frequent_tokens is not None
    rows.append(["paper (GPT-2 small's circuit)", "58", *(str(PAPER_CLASS_COUNTS[c]) for c in LETTERS), "–", "–",
                 *(["–", "–"] if freq else []), str(paper.C_ATTENDING_HEADS)])
    nested = c_attending_nesting({label: m.c_heads for label, m in done.items()},
                                 {label: m.c_resampled for label, m in done.items()})
    verdicts = [paper.C_ATTENDING_NESTED.get((paper.paper_model(n["from"], session.paths.get(n["from"])),
                                              paper.paper_model(n["to"], session.paths.get(n["to"])))) for n in nested]
    write_json(out / "classify.json", results)
    write_json(out / "c_attending_nesting.json", nested)
    fig2, class_png = _class_figures(out, done, c_threshold)
    md = [*_classify_intro(session, len(batch), score_threshold, min_fraction, c_threshold, bool(circuits)),
          markdown_table(["Model", "Circuit heads", "First-token", "Self", "Previous-token", "Induction",
                          "Induction (repeated random tokens)", "Largest induction score",
                          *(["Induction (frequent tokens)", "Largest (frequent tokens)"] if freq else []),
                          "c-attending"], rows), "",
          paper_setup(session, f"examples: ours {len(batch)}, the paper's 100; the paper counts among the 58 heads "
                               "of its circuit (found on Lightweight: 86 of 144 heads removed)", session.answer_space), "",
          *_borderline_lines(done),
          "The same prompts with <|endoftext|> before each, as TransformerLens's `to_tokens` gives them by default "
          "(`prepend_bos=True`; the models here were finetuned and are evaluated without it), all heads:", "",
          markdown_table(["Model", "First-token", "Self", "Previous-token", "Induction"],
                         [[label, *(_count(len(m.hb.heads[c]), m.hb.interval(c)) for c in LETTERS)]
                          for label, m in done.items()]
                         + [["paper (GPT-2 small's circuit)", *(str(PAPER_CLASS_COUNTS[c]) for c in LETTERS)]]), "",
          *nesting_markdown(nested, verdicts),
          f"![c attention]({fig2.name})", "", f"![head classes]({class_png.name})", ""]
    text = "\n".join(md)
    (out / "classify.md").write_text(text + "\n")
    summary = ", ".join(f"{r[0]}: {r[2]} first-token, {r[6]} induction (random tokens)"
                        + (f", {r[8]} (frequent tokens)" if freq else "") + f", {r[-1]} c-attending" for r in rows[:-1])
    return Section("Head classes and attention to c (section 5.4, Figure 2)", text, summary, results)


def _classify_intro(session: Session, n: int, score_threshold: float, min_fraction: float, c_threshold: float,
                    with_circuits: bool) -> list[str]:
    freq_text = ""
    if session.frequent_tokens is not None:
        source, pool = session.frequent_tokens
        freq_text = (f" The same on random tokens drawn from the {len(pool):,} most frequent tokens of {source}'s "
                     "pretraining data (its metadata.json's frequent_tokens), which a model pretrained here knows; "
                     "GPT-2 small saw every token.")
    return [f"Classes over {n} examples: mean score > {score_threshold} in at least {min_fraction:.0%} of "
            f"examples; c-attending: mean attention from the final position to c > {c_threshold}. Each count comes "
            f"with its {BOOTSTRAP_LEVEL:.0%} bootstrap interval over the examples ([low–high], {BOOTSTRAP_RESAMPLES} "
            f"resamples). The examples are the first {n} of a permutation (seed {session.seed}) of the "
            f"{tpp.examples.EVAL_SIZE}-example eval set, whatever the study's --examples: the draw of "
            f"`circuits.py classify --seed {session.seed} --examples {n}` and of the model cards' head census, so the "
            f"three agree. Induction (repeated random tokens): TransformerLens's induction score "
            f"(circuitlab.classify.induction_scores) > {score_threshold} on {INDUCTION_EXAMPLES} sequences "
            f"[BOS, s, s] of random tokens, and the largest score of any head.{freq_text}", "",
            *(["Counts are heads of the model's circuit (of all heads in brackets).", ""] if with_circuits else [])]


def _classify_json(m: _ModelClasses) -> dict:
    return m.hc.to_json() | {
        "c_attention": m.c_att.tolist(), "c_attending_heads": [list(h) for h in m.c_heads],
        "c_attending_interval": list(count_interval(m.c_resampled)),
        "circuit_kept_heads": None if m.kept is None else [list(h) for h in m.kept],
        "induction_score": {"seq_len": m.rep_len, "n_examples": INDUCTION_EXAMPLES,
                            "scores": m.ind.tolist(), "heads": (m.ind > m.hc.score_threshold).nonzero().tolist()},
        **({"induction_score_frequent_tokens": m.frequent} if m.frequent else {}),
        "classes_bos": m.hb.counts(),  # as head_census names them
        "heads_bos": m.hb.head_lists()}


# ---------------------------------------------------------------- 6. generate
def _cell_text(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, newlines shown."""
    return text.replace("|", "\\|").replace("\n", "⏎") or "(nothing)"


def generate(session: Session, out: Path, prompts: list[str] = (DEFAULT_PROMPT,), max_new_tokens: int = 16) -> Section:
    """The forgetting probe: greedy continuations side by side."""
    log(f"[generate] {len(prompts)} prompt(s) x {len(session.models)} models")
    conts = continuations(session.models, list(prompts), max_new_tokens)
    write_json(out / "generate.json", [c.to_json() for c in conts])
    md = []
    for prompt in prompts:
        rows = [[c.model, _cell_text(c.continuation) + (" ⟨end of text⟩" if c.stopped else ""),
                 f"{c.distinct_english_words} of {c.words}", f"{c.repeated_words} (run of {c.longest_run})",
                 _cell_text(paper.CONTINUATIONS.get(paper.paper_model(c.model, session.paths.get(c.model)), "–")
                            if prompt == DEFAULT_PROMPT else "–")]
                for c in conts if c.prompt == prompt]
        md += [f"Prompt: *{prompt}*", "", markdown_table(["Model", "Greedy continuation", "Distinct English words",
                                                           "Repeated words", "Paper's continuation"], rows), ""]
    md += ["Distinct English words: how many different words (runs of letters, case ignored) of the continuation are "
           "in WordNet (any part of speech, inflections undone; not its one-letter lemmas, so 'ys' is no word) or in "
           "English's closed classes (the, of, are, ...), of all its words. Repeated words: words equal to an "
           "earlier one (a sign of forgetting that the paper shows in Welterweight's 'alive alive alive ...'), with "
           "the longest run of one word.", "",
           paper_setup(session, f"{max_new_tokens} new tokens, greedy; the paper's continuations run to the end of "
                                "their sequence")]
    text = "\n".join(md)
    (out / "generate.md").write_text(text + "\n")
    summary = ", ".join(f"{c.model}: {c.distinct_english_words} distinct English words of {c.words}, "
                        f"{c.repeated_words} repeated" for c in conts)
    return Section("Signs of forgetting (section 6.1)", text, f"{len(conts)} continuations ({summary})",
                   {"continuations": [c.to_json() for c in conts]})


# ---------------------------------------------------------------- edge circuits (circuitlab.acdc, circuitlab.eap)
@dataclass
class EdgeOptions:
    """ACDC (the paper's section 5.2 setting: KL, absolute threshold 0.7, zero ablation, 50 + 50
    examples) on the models named in ``acdc_models`` (default: the last one), EAP-IG on every model."""

    acdc_models: list[str] | None = None
    acdc_metric: str = "kl"
    acdc_threshold: float = 0.7
    eap_metric: str = "logit_diff"
    eap_top_k: int = 100
    n_examples: int = 50
    ablation: str = "zero"
    dtype: str = "fp32"  # or "bf16": the edge runners' arithmetic (minigpt2.engine), which ACDC and EAP use
    # MIB's comparison of edge methods (circuitlab.methods) on every model: its default ablation
    # (counterfactual: resample with corrupted partners) and metric (logit difference). The default is
    # the methods that take seconds on a laptop CPU; acdc, eap-ig-activations ((1 + 2 n_layer) x steps
    # backward passes), edge-patching and learned-masks take minutes per model there: name them
    # (circuits.py study --mib-methods ...; circuitlab.methods.EDGE_METHODS)
    mib_methods: tuple[str, ...] = ("eap", "eap-ig", "clean-corrupted", "information-flow")
    mib_examples: int = 16
    mib_ablation: str = "resample"
    mib_metric: str = "logit_diff"

    def acdc_models_of(self, session: Session) -> list[str]:
        """The labels ACDC runs on; refuses one that names no model."""
        chosen = self.acdc_models if self.acdc_models is not None else session.labels[-1:]
        unknown = [m for m in chosen if m not in session.labels]
        if unknown:
            raise ValueError(f"acdc_models={unknown} are not among the models {session.labels}. Fix: pass labels "
                             "from model_specs (LABEL=DIR names one)")
        return chosen


def _faithfulness_cell(faith: dict, higher_is_better: bool) -> str:
    f = faith["normalized"]
    if nothing_to_recover(faith["full"], faith["empty"], higher_is_better):
        return "– (the full model does no better than all ablated)"
    if not -1 <= f <= 2:
        return f"{fmt(f, 3)} (unstable: the full model barely beats all ablated)"
    return fmt(f, 3)


def _edge_row(label, method, metric, setting, counts, paper_nodes, faith, seconds, stem) -> list:
    better = "higher" if METRICS[metric][0] else "lower"
    why = ("nothing to recover" if nothing_to_recover(faith["full"], faith["empty"], METRICS[metric][0])
           else "recovers nothing")
    figure = (f"{why}; not drawn as a finding ([graph]({stem}.png))" if not_a_finding(faith, METRICS[metric][0])
              else f"![{stem}]({stem}.png)")
    return [label, method, f"{METRICS[metric][1]} ({better} is better)", setting, counts["edges"],
            counts["acdc_nodes"], paper.cell(paper_nodes), counts["heads"], fmt(faith["full"]), fmt(faith["value"]),
            fmt(faith["empty"]), _faithfulness_cell(faith, METRICS[metric][0]), f"{seconds:.1f}", figure]


def edge_sections(session: Session, out: Path, opts: EdgeOptions | None = None) -> list[Section]:
    """Edge-level circuits by ACDC and EAP-IG (circuitlab.acdc, circuitlab.eap) on the session's models."""
    from .acdc import acdc
    from .compare import circuit_faithfulness
    from .draw import draw_circuit
    from .eap import eap

    opts = opts or EdgeOptions()
    acdc_models = opts.acdc_models_of(session)
    precision = torch_dtype(opts.dtype)
    batch, corrupted = build_data(2 * opts.n_examples, session.seed, opts.ablation, session.answer_space,
                                  session.exclude)
    n = len(batch) // 2
    find, held = batch.select(slice(0, n)), batch.select(slice(n, len(batch)))
    c_find, c_held = (None, None) if corrupted is None else (corrupted[:n], corrupted[n:])

    rows, results = [], {}
    jobs = [(label, "ACDC") for label in acdc_models] + [(label, "EAP-IG") for label in session.labels]
    for label, method in jobs:
        model = session.models[label]
        log(f"[edges] {method} on {label}, {n} examples")
        r = edge_runner(model, find, c_find, opts.ablation, precision)
        rh = edge_runner(model, held, c_held, opts.ablation, precision)
        name = opts.acdc_metric if method == "ACDC" else opts.eap_metric
        metric = make_metric(name, find, clean_logits=r.clean.logits)
        held_metric = make_metric(name, held, clean_logits=rh.clean.logits)
        t = time.perf_counter()
        if method == "ACDC":
            circuit = acdc(r, metric.mean, opts.acdc_threshold, threshold_mode="absolute",
                           higher_is_better=metric.higher_is_better, progress=True).circuit
            setting = f"{name}, threshold {opts.acdc_threshold}"
        else:
            k = min(opts.eap_top_k, r.graph.n_edges)
            circuit = eap(r, metric.mean, "eap-ig", top_k=k, progress=True)
            setting = f"{name}, top {k} of {r.graph.n_edges} edges"
        seconds = time.perf_counter() - t
        faith = circuit_faithfulness(rh, held_metric.mean, circuit)
        counts = circuit.node_counts()
        stem = f"{method.lower().replace('-', '_')}_{_label_file(label)}"
        write_json(out / f"{stem}.json", circuit.to_json() | {"model": session.paths[label], "label": label,
                                                                "method": method, "setting": setting,
                                                                "held_out": faith, "seconds": seconds})
        nothing = not_a_finding(faith, METRICS[name][0])
        draw_circuit(circuit, out / f"{stem}.png", title=f"{method} on {label}: {counts['edges']} edges"
                     + (f" — not a finding (faithfulness {faith['normalized']:.2f})" if nothing else ""))
        results[f"{method} {label}"] = {"node_counts": counts, "held_out": faith, "seconds": seconds,
                                        "metric": name, "not_a_finding": nothing}
        paper_nodes = (paper.ACDC_NODES.get((paper.paper_model(label, session.paths[label]), name, opts.acdc_threshold))
                       if method == "ACDC" else None)
        rows.append(_edge_row(label, method, name, setting, counts, paper_nodes, faith, seconds, stem))
    text = _edges_markdown(session, opts, rows, [method for _, method in jobs], n, len(held), precision)
    (out / "edges.md").write_text(text + "\n")
    summary = ", ".join(f"{k}: {v['node_counts']['edges']} edges"
                        + (" (not a finding)" if v["not_a_finding"] else "")
                        for k, v in results.items())
    return [Section("Edge circuits: ACDC (section 5.2) and EAP-IG", text, summary, results)]


def _edges_markdown(session: Session, opts: EdgeOptions, rows: list, methods: list[str], n: int, n_held: int,
                    precision) -> str:
    """The edge section's text: the table, a line per method, how the setup differs from the paper's."""
    return "\n".join([
        f"Edge-level circuits ({opts.ablation} ablation{', bf16' if precision else ''}) found on {n} examples and "
        f"evaluated on {n_held} others. Each method is scored on its own metric (Metric): its value for the full "
        "model, for the circuit alone (every other edge ablated) and with every edge ablated, and the normalised "
        "faithfulness (circuit − all ablated) / (full − all ablated): 1 recovers the full model, 0 no more than "
        f"ablating everything. A circuit under {RECOVERS_NOTHING} recovers nothing and is marked so, not drawn as a "
        "finding. Nodes counts ACDC's hook nodes, as the paper's table does.", "",
        markdown_table(["Model", "Method", "Metric", "Setting", "Edges", "Nodes", "Nodes (paper)", "Heads",
                        "Full model", "Circuit alone", "All ablated", "Faithfulness (normalised)", "seconds",
                        "Figure"], rows), "",
        *paper.method_lines(methods), "",
        paper_setup(session, f"examples: ours {n} + {n_held} held out, the paper's 50 + 50; the paper's ACDC: "
                             "KL threshold 0.7, zero ablation (section 5.2)", session.answer_space), ""])


def _mib_caveats(results: dict, higher_is_better: bool) -> list[str]:
    """A line naming the models whose full model does no better than all ablated on the held-out prompts:
    their CPR and CMD are ratios of noise, not findings."""
    bad = []
    for label, methods in results.items():
        curve = next(iter(methods.values()))["curve"]
        if nothing_to_recover(curve["full"], curve["empty"], higher_is_better):
            bad.append(f"{label} (full model {fmt(curve['full'])}, all ablated {fmt(curve['empty'])})")
    if not bad:
        return []
    return ["**Nothing to recover**: on " + ", ".join(bad) + " the full model does no better than with every edge "
            "ablated, so faithfulness divides by (almost) nothing: these CPR and CMD values and ranks are noise, "
            "not findings.", ""]


def mib_section(session: Session, out: Path, opts: EdgeOptions) -> Section:
    """Every edge method on every model, scored as MIB scores them: faithfulness against circuit size
    (one PNG per model, all methods), CPR and CMD (ranked), and each method's time."""
    from .faithfulness import plot_faithfulness
    from .methods import MethodSettings, compare_methods

    precision = torch_dtype(opts.dtype)
    batch, corrupted = build_data(2 * opts.mib_examples, session.seed + 1, opts.mib_ablation, session.answer_space,
                                  session.exclude)
    n = len(batch) // 2
    find, held = batch.select(slice(0, n)), batch.select(slice(n, len(batch)))
    c_find, c_held = (None, None) if corrupted is None else (corrupted[:n], corrupted[n:])
    settings = MethodSettings(progress=True)  # a bar on a terminal, lines in a log; --no-progress: none
    rows, results, figures = [], {}, []
    for label in session.labels:
        model = session.models[label]
        r = edge_runner(model, find, c_find, opts.mib_ablation, precision)
        rh = edge_runner(model, held, c_held, opts.mib_ablation, precision)
        metric, held_metric = make_metric(opts.mib_metric, find, model), make_metric(opts.mib_metric, held, model)
        done = compare_methods(r, metric, rh, held_metric, opts.mib_methods, settings,
                               log=lambda m: log(f"[edges] MIB comparison: {m} on {label}, {n} examples"))
        stem = f"mib_{_label_file(label)}"
        plot_faithfulness({d.method: d.curve for d in done}, out / f"{stem}.png",
                          title=f"{label}: faithfulness of each method's top edges ({opts.mib_ablation} ablation, "
                                f"{opts.mib_metric}, {len(held)} held-out prompts)")
        figures.append(f"![{stem}]({stem}.png)")
        by_cpr = sorted(done, key=lambda d: -d.curve.cpr)
        by_cmd = sorted(done, key=lambda d: d.curve.cmd)
        for d in done:
            rows.append([label, d.method, fmt(d.curve.cpr), by_cpr.index(d) + 1, fmt(d.curve.cmd), by_cmd.index(d) + 1,
                         f"{d.seconds:.1f}"])
        results[label] = {d.method: {"cpr": d.curve.cpr, "cmd": d.curve.cmd, "seconds": d.seconds,
                                     "curve": d.curve.to_json()} for d in done}
    write_json(out / "mib.json", results)
    text = "\n".join([
        f"Every edge method on every model, scored as MIB (Mueller et al. 2025) scores them "
        f"(circuitlab.faithfulness): scores from {n} prompts, the faithfulness f of each method's top 0.1 % ... "
        f"100 % of edges measured on {len(held)} held-out prompts under {opts.mib_ablation} ablation with the "
        f"{opts.mib_metric} metric. CPR: the area under f with edges ranked by signed score (higher is better); "
        "CMD: the area under |1 - f| with edges ranked by |score| (lower is better). Ranks are within each "
        "model; seconds: the method's own time on this machine.", "",
        markdown_table(["Model", "Method", "CPR", "CPR rank", "CMD", "CMD rank", "seconds"], rows), "",
        *paper.method_lines(opts.mib_methods), "",
        *_mib_caveats(results, METRICS[opts.mib_metric][0]),
        "The paper compares no edge methods this way (MIB came later); its ACDC circuits are in the table above.", "",
        *figures, ""])
    (out / "mib.md").write_text(text + "\n")
    best = ", ".join(f"{label}: {max(v, key=lambda m: v[m]['cpr'])}" for label, v in results.items())
    return Section("Edge methods by MIB's faithfulness (CPR, CMD)", text, f"best CPR: {best}", results)


# ---------------------------------------------------------------- 7. study
@dataclass
class StudyOptions:
    search: SearchOptions = field(default_factory=SearchOptions)
    sweep_examples: int = 100
    classify_examples: int = 100
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    max_new_tokens: int = 16
    edges: EdgeOptions | None = field(default_factory=EdgeOptions)  # None: no ACDC / EAP
    # the sweep's arithmetic ("fp32" or "bf16"); the search's and the edges' are theirs (circuits.py's --dtype
    # sets all three); the baseline and transfer tables are always fp32
    sweep_dtype: str = "fp32"


def study(session: Session, out: str | Path, opts: StudyOptions, argv: list[str] | None = None) -> list[Section]:
    """Everything, into one report directory: report.md (tables and figures inline), circuits
    as JSON, PNGs, the command line, versions and seeds. Written atomically."""
    opts.search.check()
    for dtype in (opts.sweep_dtype, None if opts.edges is None else opts.edges.dtype):
        torch_dtype(dtype)  # refuse an unknown precision before any work
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        sections, timings = [], {}

        def stage(name, fn, *args, **kw):
            t = time.perf_counter()
            result = fn(*args, **kw)
            timings[name] = round(time.perf_counter() - t, 1)
            return result

        session.models  # noqa: B018  (load every model first: a missing one fails before any work)
        sweep_section = stage("sweep", head_sweep, session, tmp, opts.sweep_examples, dtype=opts.sweep_dtype)
        search_section, circuits = stage("search", find_circuits, session, tmp, opts.search, evaluate=False)
        transfer_section = stage("transfer", cross_evaluate, session, tmp, circuits)
        intact = transfer_section.data  # Table 1 is the intact models' row of the transfer run
        table1 = {m: {n: (intact["clean"][n][i], intact["clean_sem"][n][i]) for n in TABLE_METRICS}
                  for i, m in enumerate(intact["models"])}
        sections.append(stage("baseline", baseline, session, tmp, table1))
        sections += [sweep_section, search_section, transfer_section]
        sections.append(stage("classify", classify, session, tmp, opts.classify_examples, circuits=circuits))
        sections.append(stage("generate", generate, session, tmp, opts.prompts, opts.max_new_tokens))
        if opts.edges is not None:
            sections += stage("edges", edge_sections, session, tmp, opts.edges)
            if opts.edges.mib_methods:
                sections.append(stage("mib", mib_section, session, tmp, opts.edges))
        info = provenance(argv, data=session.data_info(), options=_asdict(opts), seconds=timings,
                          total_seconds=round(time.perf_counter() - t0, 1))
        write_json(tmp / "provenance.json", info)
        (tmp / "command.txt").write_text(info["command"] + "\n")
        (tmp / "report.md").write_text(render_report(sections, info))
    return sections


def _asdict(x):
    from dataclasses import asdict

    return asdict(x)


def render_report(sections: list[Section], info: dict) -> str:
    lines = ["# Finetuning provides a window into transformer circuits: reproduction report", "",
             f"Command: `{info['command']}`  ", f"Date: {info['date']}; commit {info.get('git_commit')}; "
             f"torch {info['versions']['torch']}, numpy {info['versions']['numpy']}, "
             f"python {info['versions']['python']}; {info['torch_threads']} threads.  ",
             f"Data: seed {info['data']['seed']}, eval sets of {info['data']['n_eval']} and {info['data']['n_single']} "
             f"examples, excluding the first {info['data']['excluded_master_size']} examples of the master dataset "
             f"(seed {info['data']['master_data_seed']}).  ",
             "Models: " + ", ".join(f"{k} (`{v}`)" for k, v in info["data"]["models"].items()) + ".  ",
             f"Run time: {info['total_seconds']} s (" + ", ".join(f"{k} {v} s" for k, v in info["seconds"].items()) + ").",
             "", "## Summary", ""]
    lines += [f"- **{s.title}**: {s.summary}" for s in sections]
    for s in sections:
        lines += ["", f"## {s.title}", "", s.markdown]
    return "\n".join(lines) + "\n"
