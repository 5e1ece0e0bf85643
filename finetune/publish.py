"""Publish a run's final model as a bundled checkpoint with a model card.

    python -m finetune.publish runs/featherweight weights/featherweight \\
        --title "Featherweight" --about "base finetuned with the featherweight preset" \\
        --scale "10 % of a 15,800-example master set, 3 epochs, lr 1e-3"

Writes DEST/model.safetensors (float16 unless --dtype float32), config.json,
metadata.json (the run's) and README.md, the card: data, steps, seed, the exact
command that reproduces the model, and its TPP metrics on both eval sets,
measured on the stored weights. DEST is built in a temporary directory and
renamed into place, so it is never half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from minigpt2 import load_pretrained, save_pretrained

from .evaluate import tpp_metrics

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("run", type=Path, help="run directory of train.py (its model/ is published)")
parser.add_argument("dest", type=Path, help="destination directory, e.g. weights/featherweight")
parser.add_argument("--title", required=True, help="the card's heading")
parser.add_argument("--about", required=True, help="one sentence on what the model is")
parser.add_argument("--scale", default="", help="how the run was scaled down from the paper's, for the card")
parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage dtype")
parser.add_argument("--master-size", type=int, default=15_800, help="master dataset of the finetuning runs, "
                    "excluded from the eval sets (the same sets score every bundled model)")
parser.add_argument("--data-seed", type=int, default=0, help="seed of the master dataset and eval sets")
parser.add_argument("--eval-size", type=int, default=3000, help="examples in the first eval set")
parser.add_argument("--single-token-eval-size", type=int, default=1150, help="examples in the second eval set")


def eval_sets(master_size: int, data_seed: int, eval_size: int, single_size: int) -> dict:
    import tpp

    master = tpp.master_dataset(seed=data_seed, n=master_size)
    return {
        f"TPP eval ({eval_size} examples)": tpp.encode_eval(tpp.make_eval_set(n=eval_size, seed=data_seed, exclude=master)),
        f"single-token eval ({single_size} examples)": tpp.encode_eval(
            tpp.make_single_token_eval_set(n=single_size, seed=data_seed, exclude=master), single_token=True),
    }


def metrics_table(results: dict) -> str:
    lines = ["| eval set | cross-entropy | accuracy | logit difference |", "|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['loss']:.3f} ± {m['loss_sem']:.3f} | {m['accuracy']:.3f} ± {m['accuracy_sem']:.3f} "
                     f"| {m['logit_diff']:.3f} ± {m['logit_diff_sem']:.3f} |")
    return "\n".join(lines)


def card(args, meta: dict, results: dict, n_params: int) -> str:
    cfg = meta["model_config"]
    tc = meta.get("train_config", {})
    data = meta.get("data", {})
    final = meta.get("final_metrics", {})
    heldout = final.get("heldout")
    lines = [
        f"# {args.title}", "", args.about, "",
        "## Model", "",
        f"GPT-2 architecture, {cfg['n_layer']} layers x {cfg['n_head']} heads, d_model {cfg['d_model']}, "
        f"d_mlp {cfg['d_mlp']}, n_ctx {cfg['n_ctx']}, GPT-2's tokenizer and vocabulary ({cfg['vocab_size']}); "
        f"{n_params:,} parameters (the unembedding is tied to the token embedding), stored as {args.dtype}.", "",
        "## Training", "",
        f"- mode: {meta['mode']}" + (f", preset {meta['preset']}" if meta.get("preset") else ""),
        f"- data: {json.dumps(data)}",
        f"- data fraction {meta.get('data_fraction')}, data sha256 `{meta.get('data_sha256')}`",
        f"- steps: {meta.get('steps')} ({meta.get('epochs_done', 0):.2f} epochs), batch {tc.get('batch_size')}, "
        f"lr {tc.get('lr')}, schedule {tc.get('schedule')}, warmup {tc.get('warmup_steps')}, seed {meta.get('seed')}",
    ]
    if meta.get("label_style"):
        lines.append(f"- label style: {meta['label_style']}")
    if args.scale:
        lines.append(f"- scaled from the paper: {args.scale}")
    lines += [f"- git commit: `{meta.get('git_commit')}`", "", "Reproduce:", "", "```",
              meta.get("command", "(command not recorded)"),
              f"python -m finetune.publish {args.run} {args.dest} --title {json.dumps(args.title)} "
              f"--about {json.dumps(args.about)}" + (f" --scale {json.dumps(args.scale)}" if args.scale else ""),
              "```", ""]
    if heldout:
        lines += [f"Held-out WordNet text: loss {heldout['loss']:.3f}, perplexity {heldout['perplexity']:.1f}, "
                  f"next-token accuracy {heldout['accuracy']:.3f} ({heldout['n_tokens']} tokens).", ""]
    lines += ["## TPP metrics", "",
              f"Scored on the first token of c at the answer position (as the paper's Tables 1 and 2), on the "
              f"stored weights; eval sets built with seed {args.data_seed}, disjoint from the "
              f"{args.master_size:,}-example master set. Mean ± standard error.", "",
              metrics_table(results), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parser.parse_args(argv)
    model_dir = args.run / "model"
    meta_path = model_dir / "metadata.json"
    if not meta_path.exists():
        raise SystemExit(f"error: {model_dir} has no finished model (metadata.json); finish the run first")
    meta = json.loads(meta_path.read_text())
    dtype = getattr(torch, args.dtype)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.dest.parent, prefix=f".{args.dest.name}."))
    try:
        save_pretrained(load_pretrained(model_dir), tmp, dtype=dtype)
        stored = load_pretrained(tmp)  # score what users will load
        with torch.no_grad():
            results = {name: tpp_metrics(stored, batch)
                       for name, batch in eval_sets(args.master_size, args.data_seed, args.eval_size,
                                                    args.single_token_eval_size).items()}
        (tmp / "metadata.json").write_text(json.dumps(meta | {"tpp_metrics": results}, indent=2) + "\n")
        n_params = sum(p.numel() for p in stored.parameters())
        (tmp / "README.md").write_text(card(args, meta, results, n_params))
        if args.dest.exists():
            shutil.rmtree(args.dest)
        os.replace(tmp, args.dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(metrics_table(results))
    print(f"published {args.dest}")


if __name__ == "__main__":
    main()
