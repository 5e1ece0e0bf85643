"""The report as researchers paste it into a paper (issue 24, part 2): the paper's figures beside ours in
every table, one colour for harm on every map, legible figures, distinct words in the forgetting probe,
each method explained, a circuit that recovers nothing flagged, and each head count with its uncertainty."""

from __future__ import annotations

import json

import pytest
import torch

import circuits
from circuitlab import paper, plots
from circuitlab.classify import (CLASSES, bootstrap_weights, classify_heads, count_interval, resampled_assignment,
                                 resampled_attending)
from circuitlab.methods import EDGE_METHODS
from circuitlab.probe import count_words, english_words, is_english
from circuitlab.study import Session, _edge_row, c_attending_nesting, recovers_nothing
from minigpt2 import GPT2, GPT2Config

from conftest import save_study_models

TINY = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64, vocab_size=50257)


@pytest.fixture(scope="module")
def paper_models(tmp_path_factory):
    """Tiny models under the paper's names, so that every table has the paper's row for them."""
    return save_study_models(tmp_path_factory.mktemp("paper_models"), ["Featherweight", "Welterweight"])


@pytest.fixture(scope="module")
def report(paper_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_report") / "study"
    rc = circuits.main(["study", "--models", *paper_models, "--out", str(out), "--examples", "30",
                        "--single-examples", "12", "--search-examples", "8", "--sweep-examples", "8",
                        "--classify-examples", "10", "--max-new-tokens", "4", "--no-edges", "--seed", "0"])
    assert rc == 0
    return out


def _row(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.split("|")[1:-1]]


def _header(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if title in line)
    return [c.strip() for c in next(line for line in lines[i:] if line.startswith("| Model")).split("|")[1:-1]]


# ---------------------------------------------------------------- the paper's figures beside ours
def test_tables_1_and_2_have_the_papers_numbers_beside_ours(report):
    md = (report / "baseline.md").read_text()
    table1, table2 = md.split("Table 2")
    header = _header(table1, "Table 1")
    assert header == ["Model", "Cross-entropy", "Cross-entropy (paper)", "Frac Correct", "Frac Correct (paper)",
                      "Logit Diff", "Logit Diff (paper)"]
    for name, theirs in (("Featherweight", (0.859, 0.819, 18.155)), ("Welterweight", (0.892, 0.911, 41.054))):
        row = _row(table1, f"| {name} ")
        assert [float(row[i]) for i in (2, 4, 6)] == list(theirs), row
        assert "±" in row[1] and "±" in row[3]  # ours: mean ± s.e.m.
    assert [float(x) for x in _row(table2, "| Welterweight ")[2::2]] == [0.559, 0.857, 43.315]
    for table, n in ((table1, 3000), (table2, 1150)):  # one line on where the setups differ
        assert "*Paper columns*: GPT-2 small (124 M parameters" in table and f"the paper's {n}" in table
    assert "d_model 16" in table1 and "answer format" in table1


def test_table_3_and_the_search_have_the_papers_heads_removed_and_accuracy(report):
    md = (report / "transfer.md").read_text()
    header = _header(md, "Accuracy on")
    assert "Heads Removed (paper)" in header and "Accuracy (paper)" in header
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines()
            if line.startswith("| Featherweight ") or line.startswith("| Welterweight ")]
    got = {(r[0], r[1]): (int(r[header.index("Heads Removed (paper)")]), float(r[header.index("Accuracy (paper)")]))
           for r in rows}
    assert got == {k: v for k, v in paper.TABLE3.items() if "Lightweight" not in k}
    search = (report / "search.md").read_text()
    assert _row(search, "| Welterweight ")[_header(search, "Layer-by-layer").index("Heads removed (paper)")] == "75"
    assert "- **search**: the paper's search" in search


def test_head_counts_nesting_and_continuations_have_the_papers(report):
    md = (report / "classify.md").read_text()
    assert _row(md, "| paper (GPT-2 small's circuit) ")[2:6] == ["29", "1", "4", "3"]
    assert _row(md, "| paper (GPT-2 small's circuit) ")[-1] == "6"
    assert _row(md, "| Featherweight ⊆ Welterweight ")[-1] == "–"  # the paper's pairs are consecutive ones
    gen = (report / "generate.md").read_text()
    assert paper.CONTINUATIONS["Welterweight"] in _row(gen, "| Welterweight ")[-1]
    assert _header(gen, "Prompt")[2:4] == ["Distinct English words", "Repeated words"]


def test_the_nesting_table_gives_the_papers_verdict_for_its_pairs():
    from circuitlab.study import nesting_markdown

    nested = c_attending_nesting({"Featherweight": [(0, 1)], "Lightweight": [(0, 1), (1, 1)]})
    md = "\n".join(nesting_markdown(nested, [paper.C_ATTENDING_NESTED[("Featherweight", "Lightweight")]]))
    assert _row(md, "| Featherweight ⊆ Lightweight ")[-1] == "yes"


def test_the_papers_names_are_found_from_labels_and_directories():
    assert paper.paper_model("GPT-2 base analog") == "GPT2"
    assert paper.paper_model("mine", "weights/lightweight") == "Lightweight"
    assert paper.paper_model("mine", "runs/x") is None


# ---------------------------------------------------------------- colour: harm is red on every map
@pytest.mark.parametrize("metric, higher_is_better, harmful", [("accuracy", True, -0.3), ("logit_diff", True, -2.0),
                                                             ("loss", False, 0.3), ("kl", False, 0.1)])
def test_harm_is_red_on_every_effect_map(metric, higher_is_better, harmful):
    r, g, b, _ = plots.effect_colour(harmful, higher_is_better, bound=abs(harmful))
    assert r > 0.3 > b, (metric, r, g, b)  # a harmful ablation: red, whichever way the metric points
    r, g, b, _ = plots.effect_colour(-harmful, higher_is_better, bound=abs(harmful))
    assert b > 0.3 > r  # a helpful one: blue
    assert "red: ablation hurts" in plots.harm_label(metric, higher_is_better)


def test_the_sweep_maps_say_harm_is_red(report):
    md = (report / "sweep.md").read_text()
    assert "**red = the ablation hurts**" in md and "blue: the metric rises" not in md


# ---------------------------------------------------------------- figures legible at 100 %
def test_circuit_maps_have_a_kept_ablated_legend_and_no_colour_bar(tmp_path):
    masks = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.ones(2, 2)}
    fig = plots.circuit_figure(masks, "t")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kept in the circuit", "ablated"]
    assert len(fig.axes) == 2  # no colour bar axis
    assert fig.axes[0].get_title() == "a: 2 of 4 kept"


def test_marks_are_large_and_contrast_with_their_cell(tmp_path):
    assert plots._text_colour((0.05, 0.1, 0.3, 1)) == "white" and plots._text_colour((0.95, 0.95, 1, 1)) == "black"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots._draw(ax, torch.tensor([[0.0, 1.0]]), "x", "Blues", 0, 1, {(0, 0): "F", (0, 1): "SP"}, mark_size=10)
    texts = {t.get_text(): t for t in ax.texts}
    assert texts["F"].get_fontsize() >= 8 and texts["F"].get_color() == "black"  # light cell
    assert texts["SP"].get_color() == "white"  # dark cell
    plt.close(fig)


# ---------------------------------------------------------------- the forgetting probe
def test_distinct_words_do_not_reward_repetition():
    n = count_words(" men" * 16)
    assert (n.words, n.distinct_english, n.repeated, n.longest_run) == (16, 1, 15, 16)
    n = count_words(" alive alive or dead. Those men will contain a.")
    assert n.distinct_english == 8 and n.repeated == 1 and n.longest_run == 2


def test_letters_of_wordnet_are_no_words():
    assert not is_english("ys") and not is_english("y") and english_words("ys are alive") == (2, 3)
    assert is_english("a") and is_english("I") and is_english("ox")  # closed-class and two-letter lemmas stay


def test_the_probe_stays_greedy(monkeypatch):
    from circuitlab.probe import continuations

    seen = {}
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=16, d_mlp=16, n_ctx=32)).eval()
    original = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(model, "generate", spy)
    continuations({"m": model}, ["the cat"], max_new_tokens=3)
    assert seen.get("do_sample") is False


# ---------------------------------------------------------------- methods explained, empty circuits flagged
def test_every_method_a_table_names_has_one_line():
    lines = paper.method_lines([*EDGE_METHODS, "ACDC", "EAP-IG", "search", "eap"])
    assert len(lines) == len(EDGE_METHODS) + 3
    assert any(line.startswith("- **information-flow**: information-flow routes") for line in lines)
    with pytest.raises(KeyError, match="add one to circuitlab.paper.METHODS"):
        paper.method_lines(["new-method"])


def test_a_circuit_that_recovers_nothing_is_flagged_not_drawn():
    faith = {"full": 3.2, "value": -0.1, "empty": -0.15, "normalized": 0.05 / 3.35}
    assert recovers_nothing(faith) and recovers_nothing(faith | {"normalized": float("nan")})
    assert not recovers_nothing(faith | {"normalized": 0.7})
    counts = {"edges": 100, "acdc_nodes": 40, "heads": 12}
    row = _edge_row("W", "EAP-IG", "logit_diff", "logit_diff, top 100", counts, None, faith, 1.0, "eap_ig_w")
    assert row[2] == "Logit Diff (higher is better)" and row[11] == "0.0149"
    assert row[-1].startswith("recovers nothing") and "![" not in row[-1]
    kl = {"full": 0.0, "value": 12.2, "empty": 27.05, "normalized": 0.549}  # KL: lower is better
    good = _edge_row("W", "ACDC", "kl", "kl, threshold 0.7", counts, 11, kl, 1.0, "acdc_w")
    assert good[2] == "KL to clean (lower is better)" and good[6] == "11" and good[-1] == "![acdc_w](acdc_w.png)"


# ---------------------------------------------------------------- counts with their uncertainty
def _synthetic(n: int, shares: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shown = torch.rand(n, 1, len(shares), generator=g) < torch.tensor(shares)
    return shown, torch.ones_like(shown)


def test_the_bootstrap_interval_holds_the_count_and_narrows_with_more_examples():
    shares = [0.3, 0.6, 0.7, 0.74, 0.86, 0.9, 0.95, 1.0, 0.77, 0.84]
    widths = []
    for n in (40, 2000):
        shown, defined = _synthetic(n, shares)
        point = int((shown.float().mean(dim=0) >= 0.8).sum())
        lo, hi = count_interval(resampled_assignment(shown, defined, bootstrap_weights(n), 0.8))
        assert lo <= point <= hi, (n, point, lo, hi)
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_bootstrap_weights_resample_every_example_count():
    w = bootstrap_weights(7, n_resamples=50, seed=3)
    assert w.shape == (50, 7) and (w.sum(dim=1) == 7).all() and torch.equal(w, bootstrap_weights(7, 50, seed=3))
    per_example = torch.tensor([[[0.9]], [[0.1]]])  # [B=2, L=1, H=1]: mean 0.5
    att = resampled_attending(per_example, 0.4, torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))
    assert att.flatten().tolist() == [True, True, False]


def test_classify_heads_gives_intervals_and_standard_errors():
    torch.manual_seed(0)
    model = GPT2(TINY).eval()
    tokens = torch.randint(0, 1000, (12, 9))
    hc = classify_heads(model, tokens, score_threshold=0.2, min_fraction=0.5)
    for c in CLASSES:
        lo, hi = hc.interval(c)
        assert lo <= len(hc.heads[c]) <= hi
        f = hc.fraction[c]
        assert torch.allclose(hc.sem[c], (f * (1 - f) / 12).sqrt(), atol=1e-6) or c == "induction"
    j = hc.to_json()
    assert set(j["count_interval"]) == set(CLASSES) and j["interval_level"] == 0.95


def test_nesting_reports_how_often_the_subset_holds():
    a = torch.tensor([[[True, False]], [[True, True]], [[False, False]], [[True, False]]])  # [R=4, L=1, H=2]
    b = torch.tensor([[[True, True]], [[True, False]], [[True, True]], [[False, True]]])
    nested = c_attending_nesting({"a": [(0, 0)], "b": [(0, 0), (0, 1)]}, {"a": a, "b": b})
    assert nested[0]["is_subset"] and nested[0]["subset_share"] == 0.5


def test_the_study_classifies_the_examples_classify_and_the_cards_draw(paper_models):
    """The demo's eval set is smaller than classify's; the head classes are drawn from the same 3000 anyway."""
    small = Session(paper_models, n_eval=30).census_sample(10)
    full = Session(paper_models).sample(10, "--examples")
    assert torch.equal(small.tokens, full.tokens)


def test_the_class_table_gives_each_count_its_interval(report):
    md = (report / "classify.md").read_text()
    row = _row(md, "| Welterweight ")
    header = _header(md, "Classes over")
    for col in ("First-token", "Self", "Previous-token", "Induction", "c-attending"):
        point, interval = row[header.index(col)].split(" (")[0].split(" ", 1)  # the circuit's count [interval]
        lo, hi = map(int, interval.strip("[]").split("–"))
        assert lo <= int(point) <= hi
    data = json.loads((report / "classify.json").read_text())["Welterweight"]
    assert set(data["count_interval"]) == set(CLASSES) and len(data["c_attending_interval"]) == 2
    assert "Subset in resamples" in md and "within 2 standard errors" in md
    assert "`circuits.py classify --seed 0 --examples 10`" in md


def test_a_cards_census_carries_the_interval_and_says_so():
    import tpp
    from circuitlab.classify import head_census
    from circuitlab.census import census_lines

    torch.manual_seed(0)
    batch = tpp.encode_eval(tpp.make_eval_set(n=20, seed=0))
    census = head_census(GPT2(TINY).eval(), batch, n_examples=10)
    for c in CLASSES:
        lo, hi = census["classes_interval"][c]
        assert lo <= census["classes"][c] <= hi
    text = "\n".join(census_lines(census | {"classes": dict(census["classes"], first=4),
                                            "classes_interval": dict(census["classes_interval"], first=[3, 5])}))
    assert "4 first-token" in text and "95% bootstrap interval" in text and "first-token 3–5" in text
    assert "4 first-token" in "\n".join(census_lines({k: v for k, v in census.items() if k != "classes_interval"}
                                                     | {"classes": dict(census["classes"], first=4)}))


def test_a_model_with_nothing_to_recover_gets_no_faithfulness_ratio():
    from circuitlab.study import _mib_caveats, nothing_to_recover

    assert nothing_to_recover(-0.27, -0.06, True) and not nothing_to_recover(22.2, -1.2, True)
    assert not nothing_to_recover(0.0, 27.0, False) and nothing_to_recover(0.0, 0.0, False)  # KL: lower is better
    counts = {"edges": 100, "acdc_nodes": 40, "heads": 12}
    base = {"full": -0.97, "value": 0.58, "empty": -1.17, "normalized": 9.06}
    row = _edge_row("base", "EAP-IG", "logit_diff", "s", counts, None, base, 1.0, "x")
    assert row[11].startswith("9.06 (unstable")
    row = _edge_row("base", "EAP-IG", "logit_diff", "s", counts, None, base | {"full": -1.3}, 1.0, "x")
    assert row[11].startswith("– (the full model does no better")
    assert row[-1].startswith("nothing to recover; not drawn as a finding") and "![" not in row[-1]
    results = {"base": {"eap": {"curve": {"full": -0.27, "empty": -0.06}}},
               "welter": {"eap": {"curve": {"full": 22.0, "empty": -1.0}}}}
    text = "\n".join(_mib_caveats(results, True))
    assert "Nothing to recover" in text and "base (full model -0.27" in text and "welter" not in text


def test_figure_2_numbers_fit_their_cells():
    from circuitlab.study import _two_digits

    assert [_two_digits(x) for x in (0.5801, 0.999, 0.41, 1.0)] == [".58", "1.0", ".41", "1.0"]
