"""Circuits evaluated across models (the paper's Table 3): each circuit's ablations applied
to each model, every metric on the same prompts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from minigpt2 import GPT2
from minigpt2.engine import check_metrics

from .circuitfile import check_circuit
from .sweep import Metric, Prompts, check_prompts, evaluate_masks


def circuit_mask(circuit: dict, model: GPT2, model_name: str = "the model") -> torch.Tensor:
    """[L, H] mask (0 = ablated) of ``circuit`` for ``model``; refuses a malformed circuit or one of another shape."""
    circuit = check_circuit(circuit, circuit.get("source", circuit.get("model", "(in memory)")), model, model_name)
    mask = torch.ones(model.cfg.n_layer, model.cfg.n_head)
    for l, h in circuit["ablated_heads"]:
        mask[l, h] = 0
    return mask


def check_same_shape(models: Mapping) -> None:
    """Refuse models ({name: model or GPT2Config}) of different shapes (layers x heads)."""
    shapes = {name: (getattr(m, "cfg", m).n_layer, getattr(m, "cfg", m).n_head) for name, m in models.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}: {l}x{h}" for n, (l, h) in shapes.items())
        raise ValueError(f"models of different shapes ({listed}): they are compared head by head (circuits "
                         "transfer only between models of the same layers x heads; the heatmaps share one grid). "
                         "Fix: pass models of one shape")


@dataclass
class TransferResult:
    """values[metric][i, j]: model i with circuit j's ablations (mean over prompts); clean[metric][i]: model i intact."""

    models: list[str]
    circuits: list[str]
    n_ablated: list[int]
    metrics: list[str]
    values: dict[str, torch.Tensor]
    sem: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]
    clean_sem: dict[str, torch.Tensor]
    n_examples: int

    def to_json(self) -> dict:
        return {"models": self.models, "circuits": self.circuits, "n_ablated": self.n_ablated,
                "metrics": self.metrics, "n_examples": self.n_examples,
                "values": {k: v.tolist() for k, v in self.values.items()},
                "sem": {k: v.tolist() for k, v in self.sem.items()},
                "clean": {k: v.tolist() for k, v in self.clean.items()},
                "clean_sem": {k: v.tolist() for k, v in self.clean_sem.items()}}


def _check_transfer_args(models, circuits, prompts) -> None:
    if not isinstance(models, Mapping) or not all(isinstance(m, GPT2) for m in models.values()):
        raise TypeError(f"transfer takes models as a dict name -> minigpt2 GPT2, got {type(models).__name__}"
                        + ("" if not isinstance(models, Mapping) else " holding "
                           + ", ".join(sorted({type(m).__name__ for m in models.values()}))))
    if not isinstance(circuits, Mapping) or not all(isinstance(c, Mapping) for c in circuits.values()):
        raise TypeError("transfer takes circuits as a dict name -> circuit (the dict of a circuit file, "
                        f"circuitlab.circuitfile), got {type(circuits).__name__}"
                        + ("" if not isinstance(circuits, Mapping) else " holding "
                           + ", ".join(sorted({type(c).__name__ for c in circuits.values()}))))
    check_prompts(prompts, "transfer")


def transfer(models: dict[str, GPT2], circuits: dict[str, dict], prompts: Prompts,
             metrics: list[Metric] | Callable[[GPT2], list[Metric]], max_rows: int | None = None,
             progress: bool = False) -> TransferResult:
    """Every circuit on every model, and each model intact, in one batched call per model.

    ``metrics`` may depend on the model (a KL to its clean run): pass ``fn(model) -> metrics``.
    """
    _check_transfer_args(models, circuits, prompts)
    if not models or not circuits:
        raise ValueError("transfer needs at least one model and one circuit")
    check_same_shape(models)
    names = list(models)
    per_model = []
    for name in names:
        model = models[name]
        masks = torch.stack([torch.ones(model.cfg.n_layer, model.cfg.n_head)] +
                            [circuit_mask(c, model, name) for c in circuits.values()])  # [1 + C, L, H]
        ms = check_metrics(metrics(model) if callable(metrics) else metrics, "transfer")
        unique, index = torch.unique(masks, dim=0, return_inverse=True)  # circuits that ablate the same heads run once
        with torch.no_grad():
            per_model.append(evaluate_masks(model, prompts, unique, ms, max_rows, progress)[index])  # [1 + C, B, M]
    metric_names = [m.name for m in (metrics(models[names[0]]) if callable(metrics) else metrics)]
    stacked = torch.stack(per_model)  # [n_models, 1 + C, B, M]
    mean = stacked.mean(dim=2)
    sem = stacked.std(dim=2) / stacked.shape[2] ** 0.5 if stacked.shape[2] > 1 else torch.full_like(mean, float("nan"))
    return TransferResult(
        models=names, circuits=list(circuits),
        n_ablated=[len(check_circuit(c)["ablated_heads"]) for c in circuits.values()],
        metrics=metric_names,
        values={n: mean[:, 1:, i] for i, n in enumerate(metric_names)},
        sem={n: sem[:, 1:, i] for i, n in enumerate(metric_names)},
        clean={n: mean[:, 0, i] for i, n in enumerate(metric_names)},
        clean_sem={n: sem[:, 0, i] for i, n in enumerate(metric_names)},
        n_examples=len(prompts),
    )
