"""finetune.publish: a card and fp16 weights that load; republishing replaces the old copy whole,
and a copy left aside by an interrupted publish is recovered rather than lost."""

from __future__ import annotations

import json

import torch

from finetune import publish
from minigpt2 import GPT2, GPT2Config, load_pretrained, save_pretrained


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
