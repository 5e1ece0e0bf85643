"""finetune.publish: a card and fp16 weights that load; republishing replaces the old copy whole,
and a copy left aside by an interrupted publish is recovered rather than lost. circuitlab.census:
the card's head census, measured on the stored weights after publishing (finetune does not import
circuitlab)."""

from __future__ import annotations

import json

import torch

from circuitlab import census as recensus
from finetune import publish
from minigpt2 import GPT2, GPT2Config, fileio, load_pretrained, save_pretrained


def run_dir(tmp_path, seed: int):
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=8, d_mlp=16, n_ctx=64, vocab_size=50257))
    model.init_weights(seed=seed)
    run = tmp_path / f"run{seed}"
    save_pretrained(model, run / "model")
    meta = {"command": "python train.py pretrain --out x", "mode": "pretrain", "preset": None, "label_style": None,
            "model_config": model.cfg.to_dict(), "seed": seed, "steps": 1}
    (run / "model" / "metadata.json").write_text(json.dumps(meta))
    return run, model


def args(run, dest):
    return [str(run), str(dest), "--title", "T", "--about", "a test model", "--master-size", "200",
            "--eval-size", "8", "--single-token-eval-size", "4"]


def test_republishing_replaces_the_copy_whole_and_recovers_an_interrupted_one(tmp_path):
    dest = tmp_path / "weights" / "m"
    run1, m1 = run_dir(tmp_path, 1)
    publish.main(args(run1, dest))
    assert (dest / "README.md").read_text().startswith("# T")
    torch.testing.assert_close(load_pretrained(dest).wte.weight, m1.wte.weight.half().float())
    run2, m2 = run_dir(tmp_path, 2)
    publish.main(args(run2, dest))
    torch.testing.assert_close(load_pretrained(dest).wte.weight, m2.wte.weight.half().float())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]  # no temporary or old copy left
    # a kill between "old copy aside" and "new copy in" leaves dest missing, the old copy hidden
    dest.rename(dest.parent / ".m.old-12345")
    publish.main(args(run1, dest))
    torch.testing.assert_close(load_pretrained(dest).wte.weight, m1.wte.weight.half().float())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]


def test_a_pretraining_card_reports_held_out_loss_and_copying(tmp_path):
    run, _ = run_dir(tmp_path, 3)
    meta = json.loads((run / "model" / "metadata.json").read_text())
    meta |= {"corpus": "wordnet+gcide", "frequent_tokens": [262, 286, 257, 284], "final_metrics": {
        "heldout": {"loss": 5.181, "perplexity": 177.9, "accuracy": 0.21, "n_tokens": 8128},
        "copying": {"loss_first": 8.78, "loss_second": 1.25, "induction_max": 0.83, "induction_heads": 3,
                    "induction_top": ["5.1", "6.0", "4.7"], "previous_max": 0.91, "previous_heads": 2,
                    "previous_top": ["1.3", "2.0", "0.4"], "pool_size": 4000, "seq_len": 50, "n_examples": 10,
                    "threshold": 0.4}}}
    (run / "model" / "metadata.json").write_text(json.dumps(meta))
    publish.main(args(run, tmp_path / "m"))
    assert "## Head classes" not in (tmp_path / "m" / "README.md").read_text()
    recensus.main([str(tmp_path / "m")])  # the census, added to the card just published
    text = (tmp_path / "m" / "README.md").read_text()
    assert text.index("## Head classes") < text.index("## TPP metrics")
    assert "Held-out text (wordnet+gcide, never trained on): loss 5.181, perplexity 177.9" in text
    assert ("from the 4,000 most frequent training tokens: loss 8.78 on the first copy, 1.25 on the second; "
            "3 heads with an induction score > 0.4 (largest 0.83, head L5H1), 2 with a previous-token score > 0.4 "
            "(largest 0.91, head L1H3)") in text  # an older log's "5.1", shown by its label
    # the head classes of circuits.py classify, measured on the stored weights, on the card and in metadata.json
    published = json.loads((tmp_path / "m" / "metadata.json").read_text())
    census = published["head_census"]
    assert census["n_examples"] == 8 and census["seed"] == 0  # all of the 8-example eval set here
    assert census["induction_frequent"]["pool_size"] == 4 and "induction_random" in census
    counts = census["classes"]
    assert (f"{counts['first']} first-token, {counts['self']} self, {counts['previous']} previous-token, "
            f"{counts['induction']} induction heads (the paper, in GPT-2 small's circuit: 29 first-token, 1 self, "
            "4 previous-token, 3 induction)") in text
    assert (f"random tokens from the 4 most frequent pretraining tokens: {census['induction_frequent']['heads']} heads "
            f"> 0.4 (largest {census['induction_frequent']['max']:.2f})") in text
    # a finetuned model compared to that base is probed on the base's tokens
    run2, _ = run_dir(tmp_path, 4)
    publish.main([*args(run2, tmp_path / "m2"), "--compare-to", str(tmp_path / "m")])
    recensus.main([str(tmp_path / "m2")])  # probed on the tokens of the base it was published against
    census2 = json.loads((tmp_path / "m2" / "metadata.json").read_text())["head_census"]
    assert census2["induction_frequent"]["pool_size"] == 4


def test_a_census_refreshed_in_place_adds_the_new_measurement_and_changes_nothing_else(tmp_path):
    """circuitlab.census: a card published before the census measured classes with <|endoftext|> first
    gets them, in metadata.json and in the card's head-classes section; everything else stays as it was."""
    run, _ = run_dir(tmp_path, 5)
    dest = tmp_path / "weights" / "m"
    publish.main(args(run, dest))
    recensus.main([str(dest)])
    meta = json.loads((dest / "metadata.json").read_text())
    fresh = meta["head_census"]
    old = {k: v for k, v in fresh.items() if not k.endswith("_bos")}  # as published before this measurement
    (dest / "metadata.json").write_text(json.dumps(meta | {"head_census": old}, indent=2) + "\n")
    card = (dest / "README.md").read_text()
    old_card = card.replace(next(line for line in card.split("\n") if "<|endoftext|> before each" in line) + "\n\n", "")
    (dest / "README.md").write_text(old_card)
    weights = (dest / "model.safetensors").read_bytes()

    recensus.main([str(dest)])
    assert json.loads((dest / "metadata.json").read_text()) == meta
    assert (dest / "README.md").read_text() == card
    assert (dest / "model.safetensors").read_bytes() == weights
    assert "with <|endoftext|> before each" in card and fresh["classes_bos"].keys() == fresh["classes"].keys()
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "complete.json", "config.json", "metadata.json",
                                                      "model.safetensors"]
    assert fileio.checksum_problems(dest) == []  # the checksums follow the refreshed files


def test_a_census_refresh_refuses_a_card_without_its_section(tmp_path):
    import pytest

    run, _ = run_dir(tmp_path, 6)
    publish.main(args(run, tmp_path / "m"))
    recensus.main([str(tmp_path / "m")])
    card = (tmp_path / "m" / "README.md").read_text()
    (tmp_path / "m" / "README.md").write_text(card.replace("## Head classes", "## Heads"))
    with pytest.raises(ValueError, match="no '## Head classes' section.*finetune.publish"):
        recensus.main([str(tmp_path / "m")])
    assert json.loads((tmp_path / "m" / "metadata.json").read_text())["head_census"]  # left as it was


def test_finetune_imports_nothing_of_circuitlab():
    """The training library stands below the circuit analysis: no module of finetune imports circuitlab,
    not even inside a function (the census and the copying probe are circuitlab's)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "finetune"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "circuitlab"]
    assert found == []
