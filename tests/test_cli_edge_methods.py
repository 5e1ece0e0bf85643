"""`circuits.py eap --method NAME` runs every edge method the study ranks (circuitlab.methods) and
labels the run by that method's name everywhere: the printed summary, the plot's title, MIB's block.
`acdc` and `eap` say which model they run on before any work. On a tiny random GPT-2 (vocabulary
50257, for the GPT-2 tokenizer), so that each run takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import circuits
from circuitlab import edge_cli
from circuitlab.compare import not_a_finding
from circuitlab.methods import EDGE_METHODS, SCORING_METHODS
from minigpt2 import GPT2, GPT2Config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("edge") / "tiny"
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64)).save_pretrained(path)
    (path / "metadata.json").write_text(json.dumps({"answer_space": "answer"}))
    return path


def test_every_ranked_method_but_acdc_is_an_eap_method():
    assert set(SCORING_METHODS) == set(EDGE_METHODS) - {"acdc"}
    for method in SCORING_METHODS:
        assert circuits.parser.parse_args(["eap", "--method", method]).method == method


@pytest.mark.parametrize("method", ["information-flow", "eap-ig", "edge-patching"])
def test_a_run_is_labelled_by_its_method(method, tiny, tmp_path, capsys, monkeypatch):
    titles = {}
    draw = edge_cli.draw_circuit

    def drawn(circuit, path, title=""):
        titles["title"] = title
        return draw(circuit, path, title=title)

    monkeypatch.setattr(edge_cli, "draw_circuit", drawn)
    out = tmp_path / "out"
    rc = circuits.main(["eap", "--model", str(tiny), "--method", method, "--metric", "logit_diff", "--examples", "4",
                        "--top-k", "10", "--steps", "2", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith(f"{method}: "), captured.out
    assert titles["title"].startswith(f"{method} on tiny")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["mib"]["name"] == method
    assert f"[eap] model {tiny}," in captured.err
    # the study's rule flags a circuit that is no finding, in the summary and on the screen
    assert (summary["verdict"] is not None) == not_a_finding(summary["held_out"], higher_is_better=True)
    assert (summary["verdict"] or "") in captured.out


def test_acdc_says_which_model_it_runs_on(tiny, tmp_path, capsys, monkeypatch):
    """Bare `acdc` runs on weights/welterweight and says so before any work."""
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("minigpt2.load_pretrained", stop)
    monkeypatch.chdir(Path(circuits.__file__).parent)
    with pytest.raises(Stop):
        circuits.main(["acdc", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "[acdc] model weights/welterweight (the default --model" in err
    assert err.index("[acdc] model") == 0


def test_top_k_beyond_the_graph_is_refused_before_attribution_and_the_default_fits_it(tiny, tmp_path, capsys,
                                                                                       monkeypatch):
    """A 2-layer model has fewer than 100 edges: an explicit --top-k past them is one line (exit 2) before any
    attribution; the default 100 keeps every edge, and says so."""
    calls = []
    monkeypatch.setattr(edge_cli, "edge_circuit", lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(
        RuntimeError("stop after the top-k check")))
    common = ["eap", "--model", str(tiny), "--metric", "logit_diff", "--examples", "2", "--device", "cpu",
              "--out", str(tmp_path / "out")]
    assert circuits.main(common + ["--top-k", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--top-k 100000 is more than the" in err and "Fix: --top-k" in err and not calls
    with pytest.raises(RuntimeError, match="stop after"):
        circuits.main(common)
    n_edges = calls[0]["top_k"]
    assert 0 < n_edges < 100 and f"has {n_edges} edges: keeping all of them" in capsys.readouterr().err
