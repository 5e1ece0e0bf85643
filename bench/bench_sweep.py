"""Benchmark: the single-head ablation sweep (all 144 heads of a GPT-2-small-size model) in
one batched pass of minigpt2's head masking, against our own one-forward-per-head loop and
against TransformerLens doing the same ablations with its hooks, one at a time.

Setup of TransformerLens, in a virtualenv of its own (never a project dependency;
TransformerLens 4 dropped HookedTransformer, so take the 3.x line):

    python3 -m venv /tmp/tl3venv
    /tmp/tl3venv/bin/pip install -c constraints.txt torch==2.13.0 "transformer-lens<4"

Then:

    python bench/bench_sweep.py --tl-python /tmp/tl3venv/bin/python            # all 144 heads
    python bench/bench_sweep.py --tl-python /tmp/tl3venv/bin/python --heads 12  # 1 head a layer, scaled x12
    python bench/bench_sweep.py --tl-python /tmp/tl3venv/bin/python --uniform   # random 24-token prompts

The model is GPT-2 small's shape (12 layers x 12 heads, d_model 768, vocabulary 50257)
with random weights, written by save_pretrained to a temporary directory; the
TransformerLens side loads that same checkpoint through transformers' GPT2LMHeadModel,
converts it with transformer_lens' convert_gpt2_weights into a HookedTransformer whose
config is built by hand (nothing is fetched from the hub) and loads it without weight
processing (no layer-norm folding or centering), so both compute the same function.
The prompts are 100 TPP prompts of the first eval set (13 to 41 tokens, 24.7 on average),
right-padded; each method reads the logits at each prompt's last token. Our batched pass
groups prompts of similar length, so it computes little padding; TransformerLens and
the loop run the padded batch as it is. With --uniform they are instead random prompts
of exactly --seq tokens, where no padding exists. The metric is the TPP logit difference
(c's first token against b's) per prompt, averaged; the script checks that all three
give the same values.

With --heads K < 144, K heads spread evenly over the layers are ablated (plus the clean
run) by every method and the times are scaled by 144 / K; the prefix sharing of the
batched pass depends on the layer of each head, so an even spread keeps the scaling fair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuitlab.sweep import Metric, Prompts, evaluate_masks  # noqa: E402
from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2.masking import run_with_head_masks_loop, single_head_masks  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tl-python", default=None, help="python of a virtualenv with transformer-lens<4 "
                    "(see above); without it the TransformerLens comparison is skipped")
parser.add_argument("--prompts", type=int, default=100)
parser.add_argument("--uniform", action="store_true", help="random prompts of exactly --seq tokens instead of TPP's")
parser.add_argument("--seq", type=int, default=24, help="tokens per prompt with --uniform")
parser.add_argument("--heads", type=int, default=144, help="heads to ablate (K < 144: an even spread, times scaled)")
parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
parser.add_argument("--skip-loop", action="store_true", help="skip our one-at-a-time loop")
parser.add_argument("--seed", type=int, default=0)

TL_SCRIPT = r'''
import json, sys, time
import torch
from transformers import GPT2LMHeadModel
import transformer_lens
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

ckpt, data_path, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
data = torch.load(data_path)
hf = GPT2LMHeadModel.from_pretrained(ckpt).eval()
c = hf.config
cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
                              n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                              normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False,
                              original_architecture="GPT2LMHeadModel", positional_embedding_type="standard")
model = HookedTransformer(cfg)
model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False)
model.eval()
tokens, c_tok, b_tok, heads, pos = data["tokens"], data["c"], data["b"], data["heads"], data["positions"]
rows = torch.arange(len(tokens))

def value(logits):  # right padding: the logits at each prompt's last token do not see the padding
    last = logits[rows, pos]
    return (last[rows, c_tok] - last[rows, b_tok]).double().mean().item()

values = []
with torch.no_grad():
    value(model(tokens))  # warm-up
    w, cpu = time.perf_counter(), time.process_time()
    values.append(value(model(tokens)))
    for l, h in heads:
        def hook(z, hook, h=h):
            z[:, :, h, :] = 0.0
            return z
        values.append(value(model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])))
    w, cpu = time.perf_counter() - w, time.process_time() - cpu
from importlib.metadata import version
json.dump({"values": values, "wall": w, "cpu": cpu, "version": version("transformer-lens"),
           "class": "transformer_lens.HookedTransformer"}, open(out_path, "w"))
'''


def spread(L: int, H: int, k: int) -> list[tuple[int, int]]:
    """k heads spread evenly over the layers (all L*H when k >= L*H)."""
    every = [(l, h) for l in range(L) for h in range(H)]
    if k >= len(every):
        return every
    return [every[round(i * (len(every) - 1) / (k - 1))] if k > 1 else every[0] for i in range(k)]


def main() -> None:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GPT2Config()  # GPT-2 small: 12 x 12, d_model 768, vocab 50257
    model = GPT2(cfg).eval()
    model.init_weights(seed=args.seed)
    if args.uniform:
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, cfg.vocab_size, (args.prompts, args.seq), generator=gen)
        c, b = torch.randint(0, cfg.vocab_size, (2, args.prompts), generator=gen)
        positions = torch.full((args.prompts,), args.seq - 1)
        what = f"{args.prompts} random prompts x {args.seq} tokens"
    else:
        import tpp

        batch = tpp.encode_eval(tpp.make_eval_set(n=args.prompts, seed=args.seed))
        tokens, c, b, positions = batch.tokens, batch.c_token, batch.b_token, batch.answer_pos
        what = (f"{args.prompts} TPP prompts of {int(positions.min()) + 1}-{tokens.shape[1]} tokens "
                f"(mean {float(positions.float().mean()) + 1:.1f})")
    heads = spread(cfg.n_layer, cfg.n_head, args.heads)
    scale = cfg.n_layer * cfg.n_head / len(heads)
    masks = single_head_masks(cfg.n_layer, cfg.n_head)[[0] + [1 + l * cfg.n_head + h for l, h in heads]]

    def pick(logits, t):
        return logits.gather(-1, t.expand(logits.shape[:-1])[..., None])[..., 0]
    metric = Metric("logit_diff", lambda logits, c, b: pick(logits, c) - pick(logits, b), True, {"c": c, "b": b})
    prompts = Prompts(tokens, positions=positions)
    print(f"GPT-2 small shape (random weights), {what}, {len(heads)} heads "
          f"ablated + clean{f' (times scaled x{scale:g} to 144)' if scale != 1 else ''}; torch {torch.__version__}, "
          f"{args.threads} threads")
    results = {}

    def report(name, values, wall, cpu):
        results[name] = values
        print(f"{name:44s} {wall * scale:8.1f} s wall {cpu * scale:8.1f} s CPU")

    with torch.no_grad():
        model(tokens[:8])  # warm-up
        w, cpu = time.perf_counter(), time.process_time()
        ours = evaluate_masks(model, prompts, masks, [metric])[..., 0].mean(dim=1)  # [1 + K]
        report("minigpt2 batched masking (circuitlab.sweep)", ours, time.perf_counter() - w, time.process_time() - cpu)
        if not args.skip_loop:
            w, cpu = time.perf_counter(), time.process_time()
            loop = run_with_head_masks_loop(model, tokens, masks, positions=positions, metric=metric).double().mean(dim=1)
            report("minigpt2 one forward per head (hooks)", loop, time.perf_counter() - w, time.process_time() - cpu)

    if args.tl_python:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "ckpt")
            torch.save({"tokens": tokens, "c": c, "b": b, "heads": heads, "positions": positions}, Path(tmp) / "data.pt")
            proc = subprocess.run([args.tl_python, "-c", TL_SCRIPT, str(Path(tmp) / "ckpt"), str(Path(tmp) / "data.pt"),
                                   str(Path(tmp) / "out.json"), str(args.threads)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the TransformerLens run failed:\n{proc.stderr[-3000:]}")
            tl = json.loads((Path(tmp) / "out.json").read_text())
        report(f"TransformerLens {tl['version']} HookedTransformer, hooks", torch.tensor(tl["values"], dtype=torch.float64),
               tl["wall"], tl["cpu"])

    base = results["minigpt2 batched masking (circuitlab.sweep)"].double()
    for name, values in results.items():
        diff = (values.double() - base).abs().max().item()
        print(f"max |difference| from the batched pass, {name}: {diff:.2e}")
        if diff > 1e-3 * max(1.0, base.abs().max().item()):
            sys.exit(f"{name} disagrees with the batched pass")


if __name__ == "__main__":
    main()
