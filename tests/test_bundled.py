"""The bundled checkpoints in weights/: they load, have the study's 144 heads, and the
finetuned ones beat the base by the margins their cards claim (on the card's fixed subset)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from minigpt2 import load_pretrained

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
BUNDLED = ["base", "featherweight", "lightweight", "welterweight"]
FINETUNED = BUNDLED[1:]


@pytest.fixture(scope="module")
def eval_sets():
    from finetune.publish import eval_sets as build

    data = json.loads((WEIGHTS / "featherweight" / "metadata.json").read_text())["eval_data"]
    return build(data["master_size"], data["data_seed"], data["eval_size"], data["single_token_eval_size"],
                 data.get("answer_space", "prompt"))


def test_every_card_is_scored_on_the_same_eval_sets():
    """Cards compare models, so all are scored alike: same master set excluded, sizes and answer format."""
    data = {name: json.loads((WEIGHTS / name / "metadata.json").read_text())["eval_data"] for name in BUNDLED}
    assert all(d == data["base"] for d in data.values()), data


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_with_144_heads_and_a_card(name):
    model = load_pretrained(WEIGHTS / name)
    assert (model.cfg.n_layer, model.cfg.n_head) == (12, 12)
    assert model.cfg.vocab_size == 50257
    card = (WEIGHTS / name / "README.md").read_text()
    assert "Reproduce:" in card and "python train.py" in card and "## TPP metrics" in card
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(tokens)).all()


@pytest.mark.parametrize("name", FINETUNED)
def test_finetuned_model_beats_the_base_by_its_claimed_margins(name, eval_sets):
    from finetune.publish import subset_edges

    claims = json.loads((WEIGHTS / name / "metadata.json").read_text())["claims"]
    assert Path(claims["compare_to"]).name == "base"
    model, base = load_pretrained(WEIGHTS / name), load_pretrained(WEIGHTS / "base")
    with torch.no_grad():
        edges = subset_edges(model, base, eval_sets, claims["subset"])
    assert set(claims["margins"]) == set(edges)
    assert any(claims["margins"].values()), f"{name}'s card claims no margin over the base"
    for set_name, margins in claims["margins"].items():
        for metric, margin in margins.items():
            assert margin > 0
            assert edges[set_name][metric] >= margin, (name, set_name, metric, edges[set_name][metric], margin)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_has_the_head_classes_its_card_claims(name, eval_sets):
    """The card's head census (circuits.py classify's counts) holds on the stored weights."""
    from circuitlab.classify import head_census
    from finetune.publish import frequent_tokens_of

    meta = json.loads((WEIGHTS / name / "metadata.json").read_text())
    claimed = meta["head_census"]
    pool = frequent_tokens_of(meta, WEIGHTS / "base")
    census = head_census(load_pretrained(WEIGHTS / name), next(iter(eval_sets.values())), claimed["n_examples"],
                         claimed["seed"], pool)
    assert census["classes"] == claimed["classes"] and census["heads"] == claimed["heads"]
    assert census["classes_bos"] == claimed["classes_bos"] and census["heads_bos"] == claimed["heads_bos"]
    for key in ("induction_random", "induction_frequent"):
        assert census[key]["heads"] == claimed[key]["heads"]
        assert census[key]["max"] == pytest.approx(claimed[key]["max"], abs=1e-4)
    card = (WEIGHTS / name / "README.md").read_text()
    assert "## Head classes" in card and f"{claimed['classes']['first']} first-token" in card


def test_the_base_has_attention_sink_heads_on_endoftext():
    """weights/README.md's claim: the base's first-token heads attend to <|endoftext|>, which sets the
    pretraining documents apart; with it before each TPP prompt (TransformerLens's default input) at least 10
    heads are first-token heads by the paper's rule, against 4 on the prompts as they are."""
    census = json.loads((WEIGHTS / "base" / "metadata.json").read_text())["head_census"]
    assert census["classes_bos"]["first"] >= 10 > census["classes"]["first"]


def test_the_base_has_previous_token_heads_as_gpt2_does():
    """The issue's target (GPT-2 small's circuit has 4): at least 2 previous-token heads by the paper's
    rule, on the TPP prompts as they are and with <|endoftext|> before each; the card's census is
    checked against the weights by test_bundled_model_has_the_head_classes_its_card_claims."""
    census = json.loads((WEIGHTS / "base" / "metadata.json").read_text())["head_census"]
    assert census["classes"]["previous"] >= 2 and census["classes_bos"]["previous"] >= 2, census["classes"]


def test_the_base_copies_with_induction_heads():
    """Unlike the first base, which never learned to copy from context: on repeated random
    tokens (of those it was trained on) the second copy is predicted, by induction heads."""
    from circuitlab.copying import copying_evaluator

    meta = json.loads((WEIGHTS / "base" / "metadata.json").read_text())
    pool = torch.tensor(meta["frequent_tokens"])
    probe = copying_evaluator(pool, seq_len=50)(load_pretrained(WEIGHTS / "base"))["copying"]
    assert probe["loss_second"] < probe["loss_first"] - 3, probe
    assert probe["induction_heads"] >= 2, probe


def test_a_corrupt_bundled_file_names_itself_and_the_fix(tmp_path):
    broken = tmp_path / "featherweight"
    shutil.copytree(WEIGHTS / "featherweight", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*git checkout weights/"):
        load_pretrained(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*git checkout weights/"):
        load_pretrained(broken)
