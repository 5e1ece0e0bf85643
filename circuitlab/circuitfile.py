"""Circuit files, the JSON that `circuits.py search` writes: read and checked here, in one place.

A circuit file is a JSON object with

    "model"          the directory of the model the circuit was found on (a string)
    "config"         that model's config, an object with "n_layer" and "n_head" (integers >= 1)
    "ablated_heads"  [[layer, head], ...]: the heads the search removed
    "kept_heads"     [[layer, head], ...]: the others, the circuit
    "label"          optional: the model's name in the tables, matched to --models by classify
    "threshold"      optional: the search's threshold (a number, or null)

and anything else (the checks, the evaluation), kept as it is. One of the two head lists may be
left out (it is the rest of the model's heads); given both, they must split the model's heads
between them. Heads are pairs of integers, layer in [0, n_layer) and head in [0, n_head).
Every error names the file, the field and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from minigpt2.fileio import FileError, load_json

HEAD_LISTS = ("ablated_heads", "kept_heads")
REGENERATE = "regenerate it with `circuits.py search --out DIR` (it writes DIR/circuit_<model>.json)"


def _error(where: str, field: str | None, problem: str, fix: str = REGENERATE) -> ValueError:
    at = f' field "{field}"' if field else ""
    return ValueError(f"circuit file {where}:{at} {problem}. Fix: {fix}")


def json_kind(x) -> str:
    """What a decoded JSON value is, in JSON's words: object, array (list), string, number, boolean, null."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else kinds.get(type(x), type(x).__name__)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(config) -> tuple[int, int]:
    """(n_layer, n_head) of a GPT2Config, a model (its .cfg) or a config dict."""
    config = getattr(config, "cfg", config)
    if isinstance(config, Mapping):
        return config["n_layer"], config["n_head"]
    return config.n_layer, config.n_head


def _heads(where: str, field: str, value, n_layer: int, n_head: int) -> list[list[int]]:
    if not isinstance(value, list):
        raise _error(where, field, f"is {json.dumps(value)[:40]}, not a list of [layer, head] pairs")
    seen, out = set(), []
    for i, pair in enumerate(value):
        at = f"{field}[{i}]"
        shown = json.dumps(pair)[:40]
        if not isinstance(pair, list):
            raise _error(where, at, f"is {shown}, not a [layer, head] pair")
        if len(pair) != 2:
            raise _error(where, at, f"is {shown}, {len(pair)} numbers; a head is two, [layer, head]")
        if not all(_int(x) for x in pair):
            raise _error(where, at, f"is {shown}; layer and head are whole numbers, as in [0, 1]")
        l, h = pair
        if not 0 <= l < n_layer:
            raise _error(where, at, f"is {shown}: layer {l} is outside the config's {n_layer} layers (0..{n_layer - 1})")
        if not 0 <= h < n_head:
            raise _error(where, at, f"is {shown}: head {h} is outside the config's {n_head} heads (0..{n_head - 1})")
        if (l, h) in seen:
            raise _error(where, at, f"is {shown}, which the list already holds; each head is listed once")
        seen.add((l, h))
        out.append([l, h])
    return out


def check_circuit(circuit, where: str = "(in memory)", model_cfg=None, model_name: str = "the model") -> dict:
    """A checked copy of a circuit (see the module docstring), with both head lists filled in.

    ``model_cfg`` (a GPT2Config, a model or a config dict): also refuse a circuit found on a model
    of another shape than this one, named ``model_name`` in the message.
    """
    if not isinstance(circuit, dict):
        raise _error(where, None, f"holds a JSON {json_kind(circuit)}, not an object with "
                                  f'"model", "config" and "{HEAD_LISTS[0]}"')
    model = circuit.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _error(where, "model", "is missing" if model is None else
                     f"is {json.dumps(model)[:40]}, not the directory of the model the circuit was found on")
    config = circuit.get("config")
    if not isinstance(config, dict):
        raise _error(where, "config", "is missing" if config is None else
                     f"is a JSON {json_kind(config)}, not an object with n_layer and n_head")
    for key in ("n_layer", "n_head"):
        if not _int(config.get(key)) or config[key] < 1:
            raise _error(where, f"config.{key}", f"is {json.dumps(config.get(key))}, not an integer >= 1")
    L, H = config["n_layer"], config["n_head"]
    label = circuit.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise _error(where, "label", f"is {json.dumps(label)[:40]}, not a model's name",
                     "set it to the model's label (model_specs: LABEL=DIR), or remove it")
    threshold = circuit.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise _error(where, "threshold", f"is {json.dumps(threshold)[:40]}, not a number or null")
    given = [k for k in HEAD_LISTS if k in circuit]
    if not given:
        raise _error(where, None, f'lacks both "{HEAD_LISTS[0]}" and "{HEAD_LISTS[1]}", the heads of the circuit')
    heads = {k: _heads(where, k, circuit[k], L, H) for k in given}
    if model_cfg is not None:
        check_fits({"config": config, "model": model}, model_cfg, model_name, where)
    every = [[l, h] for l in range(L) for h in range(H)]
    if len(given) == 1:
        listed = {tuple(x) for x in heads[given[0]]}
        other = HEAD_LISTS[1 - HEAD_LISTS.index(given[0])]
        heads[other] = [x for x in every if tuple(x) not in listed]
    else:
        ablated, kept = ({tuple(x) for x in heads[k]} for k in HEAD_LISTS)
        both = sorted(ablated & kept)
        if both:
            raise _error(where, "kept_heads", f"holds {list(both[0])}, which ablated_heads holds too; "
                                              "a head is either kept or ablated")
        neither = [x for x in every if tuple(x) not in ablated | kept]
        if neither:
            raise _error(where, "kept_heads", f"and ablated_heads together leave out {neither[0]} "
                                              f"({len(neither)} of the {L * H} heads)",
                         "list every head in one of them, or give only one of the two lists")
    return dict(circuit) | heads


def check_fits(circuit: dict, model_cfg, model_name: str = "the model", where: str | None = None) -> None:
    """Refuse a circuit found on a model of another shape (layers x heads) than ``model_cfg``'s."""
    L, H = _shape(model_cfg)
    cfg = circuit.get("config") or {}
    shape = (cfg.get("n_layer"), cfg.get("n_head"))
    if shape != (L, H):
        where = where or circuit.get("source", circuit.get("model", "(in memory)"))
        raise ValueError(f"circuit file {where} was found on a model with {shape[0]} layers x {shape[1]} heads "
                         f"({circuit.get('model')}), but {model_name} has {L} x {H}: a circuit transfers only "
                         "between models of the same shape. Fix: search again on a model of this shape.")


def load_circuit(path: str | Path, model_cfg=None, model_name: str = "the model") -> dict:
    """The circuit file at ``path``, checked (see :func:`check_circuit`); its "source" is the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"circuit file {path} is a folder. Fix: pass the circuit_<model>.json files in it")
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"no circuit file at {path}. Fix: write one with `circuits.py search --out DIR` "
                                "(it writes DIR/circuit_<model>.json)")
    try:  # a FIFO, a byte-order mark, 10^5 levels of nesting: each named
        data = load_json(path, "")
    except FileError as e:
        raise _error(str(path), None, str(e).removeprefix(str(path)).strip()) from None
    circuit = check_circuit(data, str(path), model_cfg, model_name)
    circuit.setdefault("source", str(path))
    return circuit


def circuit_name(circuit: dict) -> str:
    """A circuit's name in the tables: its "label", else its file's stem."""
    return circuit.get("label") or Path(circuit.get("source", "circuit")).stem


def load_circuits(paths: Iterable[str | Path], models: Mapping | None = None, own_model: bool = False
                  ) -> dict[str, dict]:
    """{name: circuit} of circuit files (named by :func:`circuit_name`; two of one name are refused).

    ``models`` ({label: config, model or config dict}): with ``own_model`` (classify) each circuit
    must be named after one of them and fit it (:func:`check_own_models`); without (transfer),
    it must fit every one of them.
    """
    circuits: dict[str, dict] = {}
    fit = {}  # a circuit of another shape is refused as such, before its heads are checked against its config
    if models and not own_model:
        label, cfg = next(iter(models.items()))
        fit = {"model_cfg": cfg, "model_name": label}
    for path in paths:
        c = load_circuit(path, **fit)
        name = circuit_name(c)
        if name in circuits:
            raise ValueError(f"circuit files {circuits[name]['source']} and {path} are both named {name!r}. "
                             "Fix: pass one circuit per model, or set their \"label\" fields apart")
        if models is not None and not own_model:
            for label, cfg in models.items():
                check_fits(c, cfg, label)
        circuits[name] = c
    if models is not None and own_model:
        check_own_models(circuits, models)
    return circuits


def check_own_models(circuits: Mapping[str, dict], models: Mapping) -> None:
    """Each circuit must be named after one of ``models`` ({label: config}) and fit that model."""
    for name, c in circuits.items():
        where = c.get("source", "(in memory)")
        if name not in models:
            field = (f'"label" {name!r}' if c.get("label") else
                     f'name {name!r} (it has no "label", so its file name stands for it)')
            raise ValueError(f"circuit file {where}: its {field} matches none of the models "
                             f"{list(models)}. Fix: set its \"label\" to one of them, or pass that model in "
                             f"model_specs as {name}=DIR")
        check_fits(c, models[name], name, where)
