"""circuits.py end to end on tiny models saved like the bundled ones; bad input leaves nothing behind."""

from __future__ import annotations

import json
import re

import pytest
import torch

import circuits
import tpp
from circuitlab.methods import EDGE_METHODS
from circuitlab.study import c_key_mask
from minigpt2 import GPT2, GPT2Config, get_tokenizer

from conftest import save_study_models

TINY = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64, vocab_size=50257)
SMALL = ["--examples", "40", "--single-examples", "20", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_study_models(tmp_path_factory.mktemp("models"), ["Alpha", "Beta"])


@pytest.fixture(scope="module")
def study(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "study"
    rc = circuits.main(["study", "--models", *models, "--out", str(out), *SMALL, "--search-examples", "12",
                        "--sweep-examples", "12", "--classify-examples", "12", "--max-new-tokens", "4",
                        "--metric", "logit_diff", "--edge-examples", "6", "--eap-top-k", "12",
                        "--mib-examples", "4", "--mib-methods", *EDGE_METHODS])
    assert rc == 0
    return out


def test_study_writes_a_complete_report(study, capsys):
    report = (study / "report.md").read_text()
    for heading in ("Table 1: the 40-example eval set", "Table 2: the 20-example single-token eval set",
                    "| Model | Cross-entropy", "Heads removed", "Constructed on Model", "First-token",
                    "Greedy continuation", "## Summary", "circuits.py study", "## Edge circuits",
                    "kl, threshold 0.7", "logit_diff, top 12 of"):
        assert heading in report, heading
    for image in ("sweep_accuracy.png", "circuits.png", "c_attention.png", "head_classes.png", "acdc_beta.png"):
        assert f"]({image})" in report and (study / image).stat().st_size > 1000
    assert "Alpha" in report and "Beta" in report
    continuations = json.loads((study / "generate.json").read_text())  # each with its English-word count
    assert continuations and all(0 <= c["english_words"] <= c["words"] for c in continuations)
    assert all(c["distinct_english_words"] <= c["english_words"] for c in continuations)
    # issue 24: distinct English words, repetition apart (" men men men" is one word, not three)
    assert re.search(r"\| Greedy continuation +\| Distinct English words +\| Repeated words +\|", report)
    acdc = json.loads((study / "acdc_beta.json").read_text())  # ACDC on the last model, EAP-IG on each
    assert acdc["method"] == "ACDC" and "held_out" in acdc and (study / "eap_ig_alpha.json").exists()
    info = json.loads((study / "provenance.json").read_text())
    assert info["data"]["seed"] == 1 and "torch" in info["versions"] and "study" in info["argv"]
    assert not [p for p in study.parent.iterdir() if p.name.startswith(".study")]  # no temporary leftovers


def test_study_compares_every_edge_method_by_mibs_faithfulness(study):
    """Section 5 of the edge issue: every method on every model, one PNG of curves per model, CPR / CMD
    ranked, each method's time."""
    report = (study / "report.md").read_text()
    assert "## Edge methods by MIB's faithfulness (CPR, CMD)" in report
    mib = json.loads((study / "mib.json").read_text())
    assert set(mib) == {"Alpha", "Beta"}
    for label, methods in mib.items():
        assert set(methods) == set(EDGE_METHODS)
        assert (study / f"mib_{label.lower()}.png").stat().st_size > 1000
        assert f"](mib_{label.lower()}.png)" in report
        for method, v in methods.items():
            curve = v["curve"]
            assert len(curve["cpr_faithfulness"]) == 10 and curve["fractions"][-1] == 1
            assert curve["cpr_faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)  # all edges: the full model
            assert v["seconds"] >= 0 and v["cpr"] == pytest.approx(curve["cpr"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in (study / "mib.md").read_text().splitlines()
            if line.startswith("| Alpha ") or line.startswith("| Beta ")]
    assert len(rows) == 2 * len(EDGE_METHODS)
    for label in ("Alpha", "Beta"):
        mine = [r for r in rows if r[0] == label]
        assert sorted(r[1] for r in mine) == sorted(EDGE_METHODS)
        for col in (3, 5):  # CPR rank, CMD rank: a ranking within each model
            assert sorted(int(r[col]) for r in mine) == list(range(1, len(EDGE_METHODS) + 1))
        best = min(mine, key=lambda r: int(r[3]))
        assert float(best[2]) == pytest.approx(max(v["cpr"] for v in mib[label].values()), abs=5e-4)


def test_study_circuits_follow_the_json_format(study):
    c = json.loads((study / "circuit_alpha.json").read_text())
    assert {"model", "config", "metric", "threshold", "ablated_heads", "kept_heads"} <= set(c)
    assert c["metric"] == "logit_diff" and c["threshold"] == 0.03 and c["config"]["n_head"] == 2
    heads = sorted(map(tuple, c["ablated_heads"] + c["kept_heads"]))
    assert heads == [(l, h) for l in range(2) for h in range(2)]
    table = json.loads((study / "transfer.json").read_text())
    assert table["models"] == ["Alpha", "Beta"] and table["circuits"] == ["Alpha", "Beta"]


def test_transfer_command_on_the_study_circuits(study, models, tmp_path, capsys):
    out = tmp_path / "transfer"
    rc = circuits.main(["transfer", "--models", *models, "--circuits", str(study / "circuit_alpha.json"),
                        "--out", str(out), "--examples", "40", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Constructed on Model" in printed and (out / "transfer.md").exists()


def test_transfer_refuses_a_circuit_of_another_shape(study, models, tmp_path, capsys):
    other = json.loads((study / "circuit_alpha.json").read_text())
    other["config"] |= {"n_layer": 12, "n_head": 12}
    path = tmp_path / "gpt2_circuit.json"
    path.write_text(json.dumps(other))
    out = tmp_path / "transfer"
    rc = circuits.main(["transfer", "--models", *models, "--circuits", str(path), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "12 layers x 12 heads" in err and "same shape" in err
    assert not out.exists() and not list(tmp_path.glob(".transfer*"))


def exit_status(argv) -> int:
    """circuits.main's status; a bad flag makes argparse exit (2) instead of returning."""
    try:
        return circuits.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args,message", [
    (["search", "--threshold", "1.5"], "out of range for a relative drop"),
    (["search", "--threshold", "-1", "--drop", "absolute"], "--threshold: -1.0 is out of range"),
    (["baseline", "--examples", "0"], "--examples: 0 is out of range"),
    (["classify", "--score-threshold", "2"], "--score-threshold"),
    (["transfer", "--circuits", "nowhere.json"], "no circuit file at nowhere.json"),
])
def test_bad_input_fails_cleanly_and_keeps_the_old_output(models, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "provenance.json").write_text("{}")  # an earlier report
    rc = exit_status([*args, "--models", *models, "--out", str(out), "--seed", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in out.iterdir()] == ["provenance.json"]  # untouched
    assert not list(tmp_path.glob(".out*"))


def test_an_out_directory_that_is_no_report_is_not_replaced(models, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert exit_status(["generate", "--models", *models, "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert "no provenance.json" in capsys.readouterr().err and (out / "thesis.tex").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert exit_status(["generate", "--models", *models, "--out", str(empty), "--max-new-tokens", "2"]) == 0
    assert (empty / "provenance.json").exists()


def test_classify_counts_a_models_own_circuit(study, models, tmp_path, capsys):
    """A circuit is counted for the model of its label; one labelled with no model is refused, not ignored."""
    out = tmp_path / "classify"
    rc = circuits.main(["classify", "--models", *models, "--circuits", str(study / "circuit_beta.json"),
                        "--examples", "8", "--out", str(out), "--seed", "1"])
    assert rc == 0
    table = json.loads((out / "classify.json").read_text())
    assert table["Alpha"]["circuit_kept_heads"] is None and table["Beta"]["circuit_kept_heads"] is not None
    nesting = json.loads((out / "c_attending_nesting.json").read_text())
    assert [(n["from"], n["to"]) for n in nesting] == [("Alpha", "Beta")]
    assert "paper (GPT-2 small's circuit)" in (out / "classify.md").read_text()
    assert "The same prompts with <|endoftext|> before each" in (out / "classify.md").read_text()
    for label in ("Alpha", "Beta"):  # TransformerLens's induction score, beside the classes
        ind = table[label]["induction_score"]
        scores = torch.tensor(ind["scores"])
        assert scores.shape == (2, 2) and ((scores >= 0) & (scores <= 1)).all()
        assert ind["heads"] == (scores > 0.4).nonzero().tolist() and ind["n_examples"] == 10
    rows = [line for line in (out / "classify.md").read_text().splitlines() if line.startswith("| Beta ")]
    assert rows and f"{torch.tensor(table['Beta']['induction_score']['scores']).max():.2f}" in rows[0]
    other = json.loads((study / "circuit_beta.json").read_text()) | {"label": "Gamma"}
    (tmp_path / "gamma.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert exit_status(["classify", "--models", *models, "--circuits", str(tmp_path / "gamma.json"),
                        "--out", str(tmp_path / "c2")]) == 2
    assert "'Gamma' matches none of the models ['Alpha', 'Beta']" in capsys.readouterr().err


def test_classify_scores_induction_on_the_bases_frequent_tokens_too(models, tmp_path, capsys):
    """A base pretrained here records its most frequent tokens; classify then scores induction on
    repeated random tokens drawn from them as well, for every model, beside TransformerLens's recipe."""
    import shutil

    from circuitlab.classify import induction_scores

    dirs = {}
    for spec in models:
        label, path = spec.split("=")
        dirs[label] = tmp_path / label
        shutil.copytree(path, dirs[label])
    pool = [11, 257, 318, 1000, 4999, 7, 42, 50000]
    (dirs["Alpha"] / "metadata.json").write_text(json.dumps({"mode": "pretrain", "frequent_tokens": pool}))
    out = tmp_path / "classify"
    argv = ["classify", "--models", *(f"{k}={v}" for k, v in dirs.items()), "--examples", "8", "--seed", "1"]
    assert circuits.main([*argv, "--out", str(out)]) == 0
    table = json.loads((out / "classify.json").read_text())
    md = (out / "classify.md").read_text()
    for label in ("Alpha", "Beta"):
        freq = table[label]["induction_score_frequent_tokens"]
        assert freq["pool_from"] == "Alpha" and freq["pool_size"] == len(pool)
        want = induction_scores(GPT2.from_pretrained_no_processing(dirs[label], device="cpu"), seq_len=31, n_examples=10, seed=1,
                                pool=torch.tensor(pool))
        torch.testing.assert_close(torch.tensor(freq["scores"]), want)
        assert freq["heads"] == (want > 0.4).nonzero().tolist()
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} "))
        assert f"{want.max():.2f}" in row
    assert "Induction (frequent tokens)" in md and "8 most frequent tokens of Alpha's pretraining data" in md
    from circuitlab.classify import head_census
    from circuitlab.study import Session

    batch = Session([f"{k}={v}" for k, v in dirs.items()], seed=1).eval_batch
    for label in ("Alpha", "Beta"):  # a model card's census counts what classify counts
        census = head_census(GPT2.from_pretrained_no_processing(dirs[label], device="cpu"), batch, n_examples=8, seed=1, pool=torch.tensor(pool))
        assert census["heads"] == table[label]["heads"]
        assert census["classes"] == {c: len(h) for c, h in table[label]["heads"].items()}
        assert census["heads_bos"] == table[label]["heads_bos"]  # and with <|endoftext|> first
        assert census["classes_bos"] == table[label]["classes_bos"]
        assert census["induction_random"]["heads"] == len(table[label]["induction_score"]["heads"])
        assert census["induction_frequent"]["heads"] == len(table[label]["induction_score_frequent_tokens"]["heads"])
        assert census["induction_frequent"]["max"] == pytest.approx(max(map(max, freq_scores(table, label))))
    header = next(line for line in md.splitlines() if line.startswith("| Model "))
    paper = next(line for line in md.splitlines() if line.startswith("| paper "))
    assert header.count("|") == paper.count("|")
    (dirs["Alpha"] / "metadata.json").write_text(json.dumps({"frequent_tokens": [1, -3]}))
    capsys.readouterr()
    assert exit_status([*argv, "--out", str(tmp_path / "bad")]) == 2
    assert "frequent_tokens must be a non-empty list of token ids in [0, 50257)" in capsys.readouterr().err


def freq_scores(table, label):
    return table[label]["induction_score_frequent_tokens"]["scores"]


def test_unknown_metric_and_missing_model_are_refused(models, tmp_path, capsys):
    assert exit_status(["search", "--metric", "bleu", "--models", *models]) == 2
    assert "circuits.py search: error: argument --metric: invalid choice: 'bleu'" in capsys.readouterr().err
    rc = circuits.main(["baseline", "--models", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "circuits.py baseline: error: no model at" in capsys.readouterr().err


def test_c_key_mask_marks_the_tokens_of_c():
    batch = tpp.encode_eval(tpp.make_eval_set(n=25, seed=3))
    keys = c_key_mask(batch)
    enc = get_tokenizer()
    for i, e in enumerate(batch.examples):
        marked = enc.decode(batch.tokens[i][keys[i]].tolist())
        assert marked.strip() == e.c, (e.prompt, marked)


def test_transfer_values_equal_direct_evaluation():
    """Each model with each circuit's heads ablated; duplicate circuits are run once but reported each."""
    from circuitlab.sweep import Metric, Prompts, evaluate_masks
    from circuitlab.transfer import transfer

    cfg = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=16, vocab_size=97)
    models = {}
    for i, name in enumerate(["one", "two"]):
        torch.manual_seed(i)
        models[name] = GPT2(cfg).eval()
    tokens = torch.randint(0, 97, (9, 6), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1))
    metric = Metric("logprob", lambda l, t: l.log_softmax(-1).gather(-1, t.expand(l.shape[:-1])[..., None])[..., 0],
                    True, {"t": target})
    shape = {"n_layer": 2, "n_head": 2}
    circuits = {"a": {"model": "x", "config": shape, "ablated_heads": [[0, 1], [1, 0]]},
                "b": {"model": "y", "config": shape, "ablated_heads": [[1, 1]]},
                "a again": {"model": "z", "config": shape, "ablated_heads": [[1, 0], [0, 1]]}}
    r = transfer(models, circuits, Prompts(tokens), [metric])
    assert r.values["logprob"].shape == (2, 3) and r.n_ablated == [2, 1, 2]
    for i, model in enumerate(models.values()):
        masks = torch.ones(4, 2, 2)
        masks[1, 0, 1] = masks[1, 1, 0] = 0
        masks[2, 1, 1] = 0
        masks[3] = masks[1]
        direct = evaluate_masks(model, Prompts(tokens), masks, [metric])[..., 0].mean(dim=1)
        torch.testing.assert_close(r.clean["logprob"][i], direct[0])
        torch.testing.assert_close(r.values["logprob"][i], direct[1:])
    assert not torch.allclose(r.values["logprob"][:, 0], r.values["logprob"][:, 1])  # the circuits differ


def test_the_eval_set_takes_the_models_answer_format(tmp_path):
    """Models finetuned with ' c' answers (train.py --answer-space answer) are scored in that format;
    models without a recorded format in the paper's; disagreeing models need --answer-space."""
    from circuitlab.study import Session, answer_space_of

    dirs = {}
    for name, meta in [("ft", {"answer_space": "answer"}), ("card", {"eval_data": {"answer_space": "answer"}}),
                       ("paper", {"answer_space": "prompt"}), ("bare", None)]:
        GPT2(TINY).save_pretrained(tmp_path / name)
        if meta is not None:
            (tmp_path / name / "metadata.json").write_text(json.dumps(meta))
        dirs[name] = str(tmp_path / name)
    assert answer_space_of([dirs["ft"], dirs["card"], dirs["bare"]]) == "answer"
    assert answer_space_of([dirs["bare"]]) == "prompt"
    assert answer_space_of([dirs["ft"], dirs["paper"]], override="prompt") == "prompt"
    with pytest.raises(ValueError, match="different answer formats.*pass answer_space='prompt' or 'answer'"):
        answer_space_of([dirs["ft"], dirs["paper"]])
    with pytest.raises(ValueError, match="answer_space='space': choose 'prompt'"):
        answer_space_of([dirs["ft"]], override="space")

    space = get_tokenizer().encode(" ")[0]
    for paths, moved in (([dirs["ft"], dirs["bare"]], True), ([dirs["bare"]], False)):
        batch = Session(paths, n_eval=8, n_single=4, master_size=0).eval_batch
        last = batch.tokens[torch.arange(len(batch)), batch.answer_pos]
        assert (last == space).tolist() == [not moved] * len(batch)  # the paper's prompts end with the space token
        assert [get_tokenizer().decode([int(t)])[0] == " " for t in batch.c_token] == [moved] * len(batch)


def test_edge_prompts_take_the_format_and_skip_the_training_data():
    """ACDC/EAP prompts (circuits.py acdc/eap and the study's edge section) are drawn like the eval
    set: in the models' answer format, none of them a prompt the models were finetuned on."""
    from circuitlab.edge_cli import build_data

    train = tpp.make_eval_set(20, seed=5)  # stands in for the master dataset
    batch, corrupted = build_data(20, 5, "resample", "answer", exclude=train)
    assert not {e.prompt for e in batch.examples} & {e.prompt for e in train}
    space = get_tokenizer().encode(" ")[0]
    assert not (batch.tokens[torch.arange(len(batch)), batch.answer_pos] == space).any()
    assert corrupted.shape == batch.tokens.shape
    same, _ = build_data(20, 5, "zero")
    assert {e.prompt for e in same.examples} == {e.prompt for e in train}  # nothing excluded: the same draw


def test_c_attending_nesting_counts_subsets_and_overlaps():
    from circuitlab.study import c_attending_nesting
    nested = c_attending_nesting({"feather": [(0, 1), (2, 3)], "light": [(0, 1), (2, 3), (4, 5)],
                                  "welter": [(0, 1), (9, 9)]})
    assert nested[0] == {"from": "feather", "to": "light", "n_from": 2, "n_to": 3, "shared": 2,
                         "subset_fraction": 1.0, "jaccard": 2 / 3, "is_subset": True}
    assert nested[1]["shared"] == 1 and nested[1]["subset_fraction"] == 1 / 3 and not nested[1]["is_subset"]
    assert nested[1]["jaccard"] == 1 / 4
    empty = c_attending_nesting({"a": [], "b": []})[0]
    assert empty["subset_fraction"] is None and empty["jaccard"] is None and empty["is_subset"]


# ---------------------------------------------------------------- circuitlab.task, --device, --dtype
def test_one_task_module_serves_the_study_and_the_edge_commands():
    """circuitlab.task holds the metrics, data and runner builder; study and edge_cli use the same objects."""
    from circuitlab import edge_cli, study, task
    from circuitlab.acdc import kl_metric
    from minigpt2.engine import Metric

    for name in ("METRICS", "make_metric", "build_data", "answer_space_of", "finetuning_master"):
        assert getattr(study, name) is getattr(task, name)
    for name in ("METRICS", "make_metric", "build_data", "corrupted_partners", "edge_runner"):
        assert getattr(edge_cli, name) is getattr(task, name)
    torch.manual_seed(0)
    model = GPT2(TINY).eval()
    batch = tpp.encode_eval(tpp.make_eval_set(n=6, seed=2))
    clean = task.clean_logits(model, batch)
    logits = clean + torch.randn(3, *clean.shape)  # [V, B, vocab]
    for name, (higher, _) in task.METRICS.items():
        m = task.make_metric(name, batch, model)
        assert isinstance(m, Metric) and m.higher_is_better == higher
        assert m(logits).shape == (3, 6) and m.mean(logits).shape == (3,)
    kl = task.make_metric("kl", batch, clean_logits=clean)
    torch.testing.assert_close(kl.mean(logits), kl_metric(clean)(logits))  # ACDC's KL, per example then averaged
    torch.testing.assert_close(kl(clean[None]), torch.zeros(1, 6), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pass the model or its clean logits"):
        task.make_metric("kl", batch)
    assert task.torch_dtype("fp32") is None and task.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype='fp16'"):
        task.torch_dtype("fp16")


class Reached(Exception):
    """Raised by a stand-in for the API: the command got that far."""


def recorder(got: dict, name: str):
    def stand_in(*args, **kwargs):
        got[name] = kwargs
        raise Reached(name)
    return stand_in


@pytest.mark.parametrize("dtype,want", [("fp32", None), ("bf16", torch.bfloat16)])
def test_dtype_reaches_the_sweep_the_search_the_evaluation_and_the_edge_runners(models, tmp_path, monkeypatch,
                                                                                 dtype, want):
    """--dtype's name becomes the API's dtype= (None for fp32: the API's own precision)."""
    from circuitlab import study as S

    got = {}
    ses = S.Session(models, n_eval=12, n_single=4, master_size=0, device="cpu")
    monkeypatch.setattr(S, "sweep", recorder(got, "sweep"))
    monkeypatch.setattr(S, "search", recorder(got, "search"))
    monkeypatch.setattr(S, "evaluate_masks", recorder(got, "evaluate_masks"))
    monkeypatch.setattr("circuitlab.graph.EdgeRunner", recorder(got, "EdgeRunner"))
    model = ses.models["Alpha"]
    for call in (lambda: S.head_sweep(ses, tmp_path, 4, ["accuracy"], dtype=dtype),
                 lambda: S.find_circuits(ses, tmp_path, S.SearchOptions(n_examples=4, dtype=dtype)),
                 lambda: S.evaluate_circuit(model, torch.ones(2, 2), ses.eval_batch, dtype=want),
                 lambda: S.edge_sections(ses, tmp_path, S.EdgeOptions(n_examples=3, dtype=dtype, ablation="resample"))):
        with pytest.raises(Reached):
            call()
    assert {k: v.get("dtype") for k, v in got.items()} == dict.fromkeys(
        ["sweep", "search", "evaluate_masks", "EdgeRunner"], want)
    assert got["EdgeRunner"]["corrupted"] is not None  # resample ablation: the runner gets the corrupted partners


@pytest.mark.parametrize("cmd", ["acdc", "eap"])
@pytest.mark.parametrize("dtype,want", [("fp32", None), ("bf16", torch.bfloat16)])
def test_dtype_and_device_reach_the_edge_commands_runner(models, tmp_path, monkeypatch, cmd, dtype, want):
    got = {}
    monkeypatch.setattr("circuitlab.graph.EdgeRunner", recorder(got, "EdgeRunner"))
    path = models[0].split("=", 1)[1]
    with pytest.raises(Reached):
        circuits.main([cmd, "--model", path, "--examples", "2", "--dtype", dtype, "--device", "cpu",
                       "--out", str(tmp_path / "out")])
    assert got["EdgeRunner"].get("dtype") == want


def test_sweep_runs_on_the_test_device(models, device, tmp_path, capsys):
    """circuits.py --device: the models are loaded there and the command runs (MINIGPT2_TEST_DEVICE=cuda on a GPU)."""
    from circuitlab import study as S

    assert S.Session(models, n_eval=4, n_single=4, device=str(device)).models["Beta"].device.type == device.type
    out = tmp_path / "sweep"
    assert circuits.main(["sweep", "--models", *models, "--examples", "6", "--metrics", "accuracy", "loss",
                          "--device", str(device), "--out", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "sweep.json").read_text())["Alpha"]["n_examples"] == 6


def test_every_method_of_the_edge_tables_is_explained_and_named_by_its_metric(study):
    """Issue 24: each method a table ranks gets one line saying what it is; each edge circuit names its own
    metric and shows the normalised faithfulness beside the raw values."""
    report = (study / "report.md").read_text()
    for method in (*EDGE_METHODS, "ACDC", "EAP-IG", "search"):
        assert re.search(rf"^- \*\*{re.escape(method)}\*\*: \S", report, re.M), method
    edges = (study / "edges.md").read_text()
    header = next(line for line in edges.splitlines() if line.startswith("| Model"))
    for col in ("Metric", "Full model", "Circuit alone", "All ablated", "Faithfulness (normalised)"):
        assert f"| {col} " in header, col
    acdc = next(line for line in edges.splitlines() if line.startswith("| Beta ") and "| ACDC " in line)
    eap = next(line for line in edges.splitlines() if line.startswith("| Beta ") and "| EAP-IG " in line)
    assert "KL to clean (lower is better)" in acdc and "Logit Diff (higher is better)" in eap
    from circuitlab.study import not_a_finding

    for stem, lower in (("acdc_beta", True), ("eap_ig_alpha", False), ("eap_ig_beta", False)):
        faith = json.loads((study / f"{stem}.json").read_text())["held_out"]
        line = next(line for line in edges.splitlines() if f"({stem}.png)" in line)
        # flagged exactly when it recovers nothing (or the model has nothing to recover)
        assert ("not drawn as a finding" in line) == not_a_finding(faith, higher_is_better=not lower), (stem, faith)
        assert ("not drawn as a finding" in line) == (f"![{stem}]" not in line)
        if faith["normalized"] < 0.1:
            assert "not drawn as a finding" in line
