"""circuitlab.circuitfile: every malformed circuit file is refused with a message naming the file,
the field and the fix; a good one comes back with both head lists."""

from __future__ import annotations

import json

import pytest

from circuitlab.circuitfile import check_circuit, load_circuit, load_circuits
from minigpt2 import GPT2Config

SHAPE = {"n_layer": 2, "n_head": 3}
GOOD = {"model": "weights/x", "config": SHAPE, "label": "Alpha", "threshold": 0.03,
        "ablated_heads": [[0, 1], [1, 2]], "kept_heads": [[0, 0], [0, 2], [1, 0], [1, 1]]}


def write(tmp_path, content, name="circuit_alpha.json"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def without(*keys):
    return {k: v for k, v in GOOD.items() if k not in keys}


BAD = [  # (file content, field named, words of the problem)
    ("{not json", None, "not valid JSON"),
    ("", None, "not valid JSON"),
    (b"\xff\xfe{}", None, "not UTF-8"),
    ([1, 2], None, "JSON list"),
    ("null", None, "JSON null"),
    ('"text"', None, "JSON string"),
    (without("model"), '"model"', "missing"),
    (GOOD | {"model": 5}, '"model"', "not the directory"),
    (without("config"), '"config"', "missing"),
    (GOOD | {"config": [2, 3]}, '"config"', "JSON list"),
    (GOOD | {"config": {"n_head": 3}}, '"config.n_layer"', "not an integer >= 1"),
    (GOOD | {"config": {"n_layer": "2", "n_head": 3}}, '"config.n_layer"', "not an integer >= 1"),
    (GOOD | {"config": {"n_layer": 2, "n_head": 0}}, '"config.n_head"', "not an integer >= 1"),
    (GOOD | {"config": {"n_layer": 2.0, "n_head": 3}}, '"config.n_layer"', "not an integer >= 1"),
    (without("ablated_heads", "kept_heads"), "ablated_heads", "lacks both"),
    (GOOD | {"ablated_heads": "0,1"}, '"ablated_heads"', "not a list of [layer, head] pairs"),
    (GOOD | {"ablated_heads": {"0": 1}}, '"ablated_heads"', "not a list"),
    (GOOD | {"ablated_heads": [5]}, '"ablated_heads[0]"', "not a [layer, head] pair"),
    (GOOD | {"ablated_heads": ["L0H1"]}, '"ablated_heads[0]"', "not a [layer, head] pair"),
    (GOOD | {"ablated_heads": [[0, 1], [0, 1.5]]}, '"ablated_heads[1]"', "whole numbers"),
    (GOOD | {"ablated_heads": [[0, "1"]]}, '"ablated_heads[0]"', "whole numbers"),
    (GOOD | {"ablated_heads": [[True, 0]]}, '"ablated_heads[0]"', "whole numbers"),
    (GOOD | {"ablated_heads": [[0, 1, 2]]}, '"ablated_heads[0]"', "3 numbers"),
    (GOOD | {"ablated_heads": [[0]]}, '"ablated_heads[0]"', "1 numbers"),
    (GOOD | {"ablated_heads": [[2, 0]]}, '"ablated_heads[0]"', "layer 2 is outside the config's 2 layers"),
    (GOOD | {"ablated_heads": [[-1, 0]]}, '"ablated_heads[0]"', "layer -1 is outside"),
    (GOOD | {"kept_heads": [[0, 99]]}, '"kept_heads[0]"', "head 99 is outside the config's 3 heads"),
    (GOOD | {"ablated_heads": [[0, 1], [0, 1]]}, '"ablated_heads[1]"', "already holds"),
    (GOOD | {"kept_heads": GOOD["kept_heads"] + [[0, 1]]}, '"kept_heads"', "ablated_heads holds too"),
    (GOOD | {"kept_heads": GOOD["kept_heads"][:-1]}, '"kept_heads"', "leave out [1, 1]"),
    (GOOD | {"label": 5}, '"label"', "not a model's name"),
    (GOOD | {"label": ""}, '"label"', "not a model's name"),
    (GOOD | {"threshold": "high"}, '"threshold"', "not a number or null"),
]


@pytest.mark.parametrize("content,field,problem", BAD, ids=[f"{i}:{c[2]}" for i, c in enumerate(BAD)])
def test_a_malformed_circuit_file_is_named_with_its_field_and_the_fix(tmp_path, content, field, problem):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as e:
        load_circuit(path)
    message = str(e.value)
    assert message.startswith(f"circuit file {path}:"), message
    assert problem in message and "Fix:" in message, message
    if field:
        assert f"field {field}" in message or field in message, message
    assert "unpack" not in message and "KeyError" not in message


def test_a_good_file_comes_back_with_both_head_lists(tmp_path):
    c = load_circuit(write(tmp_path, GOOD))
    assert c["source"].endswith("circuit_alpha.json") and c["kept_heads"] == GOOD["kept_heads"]
    only_ablated = load_circuit(write(tmp_path, without("kept_heads"), "a.json"))
    assert only_ablated["kept_heads"] == GOOD["kept_heads"]
    only_kept = load_circuit(write(tmp_path, without("ablated_heads"), "k.json"))
    assert only_kept["ablated_heads"] == GOOD["ablated_heads"]
    assert check_circuit(GOOD) == GOOD  # in memory too


def test_missing_file_folder_and_another_shape(tmp_path):
    with pytest.raises(FileNotFoundError, match="no circuit file at .*nowhere.json.*Fix: write one"):
        load_circuit(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="is a folder"):
        load_circuit(tmp_path)
    path = write(tmp_path, GOOD)
    with pytest.raises(ValueError, match=r"2 layers x 3 heads .*Beta has 12 x 12.*same shape"):
        load_circuit(path, GPT2Config(), "Beta")
    assert load_circuit(path, GPT2Config(n_layer=2, n_head=3, d_model=12), "Beta")["label"] == "Alpha"


def test_circuits_by_name_match_the_models(tmp_path):
    a = write(tmp_path, GOOD, "one.json")
    models = {"Alpha": GPT2Config(n_layer=2, n_head=3, d_model=12), "Beta": GPT2Config(n_layer=2, n_head=3, d_model=12)}
    assert list(load_circuits([a], models, own_model=True)) == ["Alpha"]
    with pytest.raises(ValueError, match="both named 'Alpha'"):
        load_circuits([a, write(tmp_path, GOOD, "two.json")])
    other = write(tmp_path, GOOD | {"label": "Gamma"}, "gamma.json")
    with pytest.raises(ValueError, match=r"gamma.json: its \"label\" 'Gamma' matches none of the models "
                                         r"\['Alpha', 'Beta'\]. Fix: .*model_specs as Gamma=DIR"):
        load_circuits([other], models, own_model=True)
    assert list(load_circuits([other], models)) == ["Gamma"]  # transfer: any circuit fits any model of its shape
    unlabelled = write(tmp_path, without("label"), "circuit_alpha.json")
    with pytest.raises(ValueError, match="name 'circuit_alpha' \\(it has no \"label\""):
        load_circuits([unlabelled], models, own_model=True)
    with pytest.raises(ValueError, match="Beta has 12 x 12"):
        load_circuits([a], {"Beta": GPT2Config()})
