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
--ref-heads K' does the same for the references alone (the loop, TransformerLens, transformers),
whose cost per head does not depend on the head; values are compared on the heads both ran.

--transformers adds a transformers hook loop: GPT2LMHeadModel loaded from the same checkpoint,
each head zeroed by a forward pre-hook on its layer's attn.c_proj (the merged heads' input),
one forward of the base model per head, the final hidden state read at each prompt's last token
and unembedded. --device runs every method there (TransformerLens's subprocess too); --dtype bf16
runs the batched pass with bf16 matmuls (minigpt2.engine) and adds its fp32 run, the reference
of bf16's error (the other methods stay fp32). --tiny swaps in a 2-layer model to check the
script. :func:`main` returns the figures (bench/device_suite.py reads them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

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

TINY = GPT2Config(n_layer=2, n_head=2, d_model=32, d_mlp=64, n_ctx=64)  # --tiny: checks the script, measures nothing
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tl-python", default=None, help="python of a virtualenv with transformer-lens<4 "
                    "(see above); without it the TransformerLens comparison is skipped")
parser.add_argument("--transformers", action="store_true", help="also time a transformers hook loop")
parser.add_argument("--prompts", type=int, default=100)
parser.add_argument("--uniform", action="store_true", help="random prompts of exactly --seq tokens instead of TPP's")
parser.add_argument("--seq", type=int, default=24, help="tokens per prompt with --uniform")
parser.add_argument("--heads", type=int, default=144, help="heads to ablate (K < 144: an even spread, times scaled)")
parser.add_argument("--ref-heads", type=int, default=None,
                    help="heads the references ablate (default: --heads), times scaled likewise")
parser.add_argument("--device", default="cpu", help="torch device of every method (cpu, cuda, cuda:N)")
parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the batched pass's matmuls")
parser.add_argument("--tiny", action="store_true", help="a 2-layer, 2-head, d_model 32 model (checks the script)")
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

ckpt, data_path, out_path, threads, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
data = torch.load(data_path)
hf = GPT2LMHeadModel.from_pretrained(ckpt).eval()
c = hf.config
cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
                              n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                              normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False,
                              original_architecture="GPT2LMHeadModel", positional_embedding_type="standard",
                              device=device)
model = HookedTransformer(cfg)
model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False)
model.eval()
tokens, c_tok, b_tok, heads, pos = (data[k] for k in ("tokens", "c", "b", "heads", "positions"))
tokens, c_tok, b_tok, pos = tokens.to(device), c_tok.to(device), b_tok.to(device), pos.to(device)
rows = torch.arange(len(tokens), device=device)

def sync():
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

def value(logits):  # right padding: the logits at each prompt's last token do not see the padding
    last = logits[rows, pos]
    return (last[rows, c_tok] - last[rows, b_tok]).double().mean().item()

values = []
with torch.no_grad():
    model(tokens[:8])  # warm-up
    sync()
    w, cpu = time.perf_counter(), time.process_time()
    values.append(value(model(tokens)))
    for l, h in heads:
        def hook(z, hook, h=h):
            z[:, :, h, :] = 0.0
            return z
        values.append(value(model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])))
    sync()
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def transformers_loop(ckpt: Path, tokens, c, b, positions, heads, device):
    """One forward of transformers' GPT-2 per head, the head zeroed by a pre-hook on attn.c_proj."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf = GPT2LMHeadModel.from_pretrained(ckpt).eval().to(device)
    d = hf.config.n_embd // hf.config.n_head
    rows = torch.arange(len(tokens), device=device)

    def value():
        hidden = hf.transformer(tokens).last_hidden_state[rows, positions]  # [B, D] at each last token
        logits = hf.lm_head(hidden)
        return (logits[rows, c] - logits[rows, b]).double().mean().item()

    values = []
    with torch.no_grad():
        hf.transformer(tokens[:8])  # warm-up
        sync(device)
        w, cpu = time.perf_counter(), time.process_time()
        values.append(value())
        for l, h in heads:
            def zero_head(module, args, h=h):
                x = args[0].clone()
                x[..., h * d:(h + 1) * d] = 0.0
                return (x,)
            handle = hf.transformer.h[l].attn.c_proj.register_forward_pre_hook(zero_head)
            try:
                values.append(value())
            finally:
                handle.remove()
        sync(device)
        w, cpu = time.perf_counter() - w, time.process_time() - cpu
    from importlib.metadata import version
    return torch.tensor(values, dtype=torch.float64), w, cpu, version("transformers")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    cfg = TINY if args.tiny else GPT2Config()  # GPT-2 small: 12 x 12, d_model 768, vocab 50257
    model = GPT2(cfg).eval()
    model.init_weights(seed=args.seed)
    model.to(dev)
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
    n_heads = cfg.n_layer * cfg.n_head
    heads = spread(cfg.n_layer, cfg.n_head, args.heads)
    ref_heads = spread(cfg.n_layer, cfg.n_head, args.ref_heads or args.heads)
    scale, ref_scale = n_heads / len(heads), n_heads / len(ref_heads)
    masks = single_head_masks(cfg.n_layer, cfg.n_head)[[0] + [1 + l * cfg.n_head + h for l, h in heads]]
    ref_masks = single_head_masks(cfg.n_layer, cfg.n_head)[[0] + [1 + l * cfg.n_head + h for l, h in ref_heads]]

    def pick(logits, t):
        return logits.gather(-1, t.expand(logits.shape[:-1])[..., None])[..., 0]
    metric = Metric("logit_diff", lambda logits, c, b: pick(logits, c) - pick(logits, b), True, {"c": c, "b": b})
    prompts = Prompts(tokens, positions=positions)
    print(f"GPT-2 {'tiny' if args.tiny else 'small'} shape (random weights), {what}, {len(heads)} heads "
          f"ablated + clean{f' (times scaled x{scale:g} to {n_heads})' if scale != 1 else ''}"
          f"{f'; references {len(ref_heads)} heads (x{ref_scale:g})' if ref_heads != heads else ''}; "
          f"torch {torch.__version__}, {args.threads} threads, {dev}, batched pass {args.dtype}")
    results, figures = {}, {"dtype": args.dtype, "device": str(dev), "prompts": args.prompts, "methods": {}}

    def report(name, values, wall, cpu, ran, k):
        results[name] = dict(zip([None, *ran], values.double().cpu().tolist()))  # head (None: clean) -> value
        figures["methods"][name] = {"wall_s": wall * k, "cpu_s": cpu * k, "heads_run": len(ran)}
        print(f"{name:44s} {wall * k:8.1f} s wall {cpu * k:8.1f} s CPU")

    def batched(precision):
        kw = {} if precision is None else {"dtype": precision}
        evaluate_masks(model, prompts.subset(range(min(8, len(prompts)))), masks[:2], [metric], **kw)  # warm-up
        sync(dev)
        w, cpu = time.perf_counter(), time.process_time()
        values = evaluate_masks(model, prompts, masks, [metric], **kw)[..., 0].mean(dim=1)  # [1 + K]
        sync(dev)
        return values, time.perf_counter() - w, time.process_time() - cpu

    ours = "minigpt2 batched masking (circuitlab.sweep)" + (", bf16" if dtype else "")
    with torch.no_grad():
        report(ours, *batched(dtype), heads, scale)
        if dtype is not None:
            report("minigpt2 batched masking, fp32", *batched(None), heads, scale)
        if not args.skip_loop:
            sync(dev)
            w, cpu = time.perf_counter(), time.process_time()
            loop = run_with_head_masks_loop(model, tokens.to(dev), ref_masks, positions=positions.to(dev),
                                            metric=metric).double().mean(dim=1)
            sync(dev)
            report("minigpt2 one forward per head (hooks)", loop, time.perf_counter() - w, time.process_time() - cpu,
                   ref_heads, ref_scale)

    if args.tl_python or args.transformers:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "ckpt")
            if args.transformers:
                values, w, cpu, version = transformers_loop(Path(tmp) / "ckpt", tokens.to(dev), c.to(dev), b.to(dev),
                                                            positions.to(dev), ref_heads, dev)
                report(f"transformers {version} GPT2LMHeadModel, pre-hooks", values, w, cpu, ref_heads, ref_scale)
            if args.tl_python:
                torch.save({"tokens": tokens, "c": c, "b": b, "heads": ref_heads, "positions": positions},
                           Path(tmp) / "data.pt")
                proc = subprocess.run([args.tl_python, "-W", "ignore", "-c", TL_SCRIPT, str(Path(tmp) / "ckpt"),
                                       str(Path(tmp) / "data.pt"), str(Path(tmp) / "out.json"), str(args.threads),
                                       str(dev)], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"the TransformerLens run failed:\n{proc.stderr[-3000:]}")
                tl = json.loads((Path(tmp) / "out.json").read_text())
                report(f"TransformerLens {tl['version']} HookedTransformer, hooks",
                       torch.tensor(tl["values"], dtype=torch.float64), tl["wall"], tl["cpu"], ref_heads, ref_scale)

    base = results["minigpt2 batched masking, fp32" if dtype is not None else ours]
    size = max(1.0, max(abs(v) for v in base.values()))
    for name, values in results.items():
        common = [k for k in values if k in base]
        diff = max(abs(values[k] - base[k]) for k in common)
        figures["methods"][name]["max_abs_diff"] = diff
        print(f"max |difference| from the batched fp32 pass, {name}: {diff:.2e} (on {len(common)} values)")
        tolerance = (5e-2 if name == ours and dtype is not None else 1e-3) * size  # bf16: its rounding
        if diff > tolerance:
            sys.exit(f"{name} disagrees with the batched pass ({diff:.2e} > {tolerance:.1e})")
    mine = figures["methods"][ours]["wall_s"]
    for name, m in figures["methods"].items():
        m["speedup_vs_batched"] = m["wall_s"] / mine  # how many times slower than our batched pass
    return figures


if __name__ == "__main__":
    main()
