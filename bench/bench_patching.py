"""Benchmark: activation patching with minigpt2.patching against TransformerLens 3.x's own
transformer_lens.patching, on the same model and inputs.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/bench_patching.py --threads 1
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/bench_patching.py --threads 1 --corrupt suffix

The model is GPT-2 small's shape (12 layers x 12 heads, d_model 768, vocabulary 50257) with random
weights (GPT-2's initialisation), written by save_pretrained; TransformerLens gets the same weights
as in bench_sweep.py: transformers' GPT2LMHeadModel loads the checkpoint, convert_gpt2_weights turns
it into a HookedTransformer (config built by hand, nothing fetched), no weight processing. The prompts
are --prompts random sequences of --seq tokens; the corrupted ones are other random sequences
(``--corrupt random``: every token differs) or the clean ones with the tokens from --from-pos on
replaced (``--corrupt suffix``: a shared prefix, as in minimal pairs). The metric is the logit
difference of two random answer tokens at the last position, averaged over the prompts, read from
the full logits [B, T, V] as TransformerLens's contract gives them.

Functions: get_act_patch_resid_pre ([12, T] patches), get_act_patch_attn_head_out_all_pos ([12, 12])
and get_act_patch_attn_head_out_by_pos ([12, T, 12]). TransformerLens's cost per patch does not depend
on the patch (one full forward each), so it runs --tl-patches patches spread over the index grid, one
call of its generic_activation_patch each (the function its named functions are partials of), and its
time is the median per patch times the grid's size; our one-forward-per-patch loop (hooks on
minigpt2's model, TransformerLens's algorithm) is timed the same way. minigpt2 runs the whole grid in
one call, except for attn_head_out_by_pos, where it runs one head per (layer, position) (rotating,
T x 12 patches, through index_df) and its time is scaled by 12 (--by-pos-heads all: the whole grid).
minigpt2 also runs with ``logit_positions=[-1]`` (the metric reads the last position only, so the
values are the same). Every row checks that the values equal TransformerLens's on the patches both ran.
Figures and the setting are printed, and written as JSON with --json PATH.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (minigpt2/threads.py)

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2 import patching as mp  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompts", type=int, default=8)
parser.add_argument("--seq", type=int, default=16)
parser.add_argument("--corrupt", choices=("random", "suffix"), default="random")
parser.add_argument("--from-pos", type=int, default=None, help="--corrupt suffix: first replaced position (default seq/2)")
parser.add_argument("--functions", default="resid_pre,attn_head_out_all_pos,attn_head_out_by_pos")
parser.add_argument("--tl-patches", type=int, default=8, help="patches TransformerLens (and our loop) run per function")
parser.add_argument("--by-pos-heads", choices=("one", "all"), default="one",
                    help="attn_head_out_by_pos: one head per (layer, position), time scaled x n_head; or all")
parser.add_argument("--repeats", type=int, default=1, help="timings of each minigpt2 call; the median is reported")
parser.add_argument("--skip-loop", action="store_true", help="skip our one-forward-per-patch loop")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
parser.add_argument("--device", default="cpu", help="torch device of both models and the prompts (cpu, cuda, cuda:N)")

FUNCTIONS = {  # name -> (setter, activation, axes)
    "resid_pre": (mp.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
    "attn_head_out_all_pos": (mp.layer_head_vector_patch_setter, "z", ("layer", "head")),
    "attn_head_out_by_pos": (mp.layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head")),
}


def tl_twin(model: GPT2, device: str = "cpu"):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "ckpt")
        hf = GPT2LMHeadModel.from_pretrained(Path(tmp) / "ckpt").eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, default_prepend_bos=False, original_architecture="GPT2LMHeadModel",
        positional_embedding_type="standard", device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval()


def timed(fn):
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # --device cuda: time the kernels too
    if cuda:
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - w, time.process_time() - c


def spread(items: list, k: int) -> list:
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[0]]


def one_forward_per_patch(model, corrupted, cache, metric, setter, act, index):
    name = mp.get_act_name(act, layer=index[0])

    def hook(x, hook):
        return setter(x.clone(), index, cache[name])
    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).item()


def main() -> None:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import pandas as pd
    import transformer_lens.patching as tl_patching
    from importlib.metadata import version

    tl_patching.tqdm = lambda it, *a, **k: it  # no progress bar in the timings
    cfg = GPT2Config()
    model = GPT2(cfg).eval()
    model.init_weights(seed=args.seed)
    tl = tl_twin(model, args.device)
    model.to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    B, T = args.prompts, args.seq
    clean = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    corrupted = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    if args.corrupt == "suffix":
        start = T // 2 if args.from_pos is None else args.from_pos
        corrupted[:, :start] = clean[:, :start]
    answers = torch.randint(0, cfg.vocab_size, (2, B), generator=gen)
    clean, corrupted, answers = clean.to(args.device), corrupted.to(args.device), answers.to(args.device)
    rows = torch.arange(B, device=args.device)

    def metric(logits):  # [B, T, V] -> scalar
        return (logits[rows, -1, answers[0]] - logits[rows, -1, answers[1]]).mean()

    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
        _, tl_cache = tl.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
        model(corrupted), tl(corrupted)  # warm-up
    what = (f"{B} prompts x {T} tokens, corrupted: "
            + ("other random prompts" if args.corrupt == "random" else f"tokens {start}.. replaced"))
    print(f"GPT-2 small shape (random weights), {what}; torch {torch.__version__}, {args.threads} thread(s), "
          f"TransformerLens {version('transformer-lens')}")
    L, H = cfg.n_layer, cfg.n_head
    figures = {"setting": what, "threads": args.threads, "device": args.device, "torch": torch.__version__,
               "transformer_lens": version("transformer-lens"), "functions": {}}
    for fname in args.functions.split(","):
        setter, act, axes = FUNCTIONS[fname]
        ranges = {"layer": L, "pos": T, "head": H}
        grid = [list(ix) for ix in itertools.product(*[range(ranges[a]) for a in axes])]
        if fname == "attn_head_out_by_pos" and args.by_pos_heads == "one":
            ours_set = [[l, p, (l + p) % H] for l in range(L) for p in range(T)]
        else:
            ours_set = grid
        scale = len(grid) / len(ours_set)
        named = getattr(mp, f"get_act_patch_{fname}")

        def ours_call(**kw):
            if ours_set is grid:
                return named(model, corrupted, cache, metric, **kw).reshape(-1)
            return mp.generic_activation_patch(model, corrupted, cache, metric, setter, act,
                                               index_df=pd.DataFrame(ours_set, columns=list(axes)), **kw)

        res = {}
        for label, kw in [("minigpt2", {}), ("minigpt2, logit_positions=[-1]", {"logit_positions": [-1]})]:
            runs = [timed(lambda: ours_call(**kw)) for _ in range(args.repeats)]
            values = runs[0][0]
            wall = statistics.median(r[1] for r in runs) * scale
            cpu = statistics.median(r[2] for r in runs) * scale
            res[label] = {"values": values, "wall": wall, "cpu": cpu}
        subset = spread(list(range(len(ours_set))), args.tl_patches)
        tl_vals, tl_w, tl_c = [], [], []
        for j in subset:
            v, w, c = timed(lambda: tl_patching.generic_activation_patch(
                tl, corrupted, tl_cache, metric, setter, act, None, pd.DataFrame([ours_set[j]], columns=list(axes))))
            tl_vals.append(v.item())
            tl_w.append(w)
            tl_c.append(c)
        res["TransformerLens"] = {"values": torch.tensor(tl_vals), "wall": statistics.median(tl_w) * len(grid),
                                  "cpu": statistics.median(tl_c) * len(grid)}
        if not args.skip_loop:
            lw, lc, lv = [], [], []
            with torch.no_grad():
                for j in subset:
                    v, w, c = timed(lambda: one_forward_per_patch(model, corrupted, cache, metric, setter, act,
                                                                  ours_set[j]))
                    lv.append(v)
                    lw.append(w)
                    lc.append(c)
            res["minigpt2, one forward per patch"] = {"values": torch.tensor(lv), "wall": statistics.median(lw) * len(grid),
                                                      "cpu": statistics.median(lc) * len(grid)}
        ours = res["minigpt2"]["values"]
        diff_tl = (ours[subset] - res["TransformerLens"]["values"]).abs().max().item()
        diff_lp = (res["minigpt2, logit_positions=[-1]"]["values"] - ours).abs().max().item()
        diff_loop = ((ours[subset] - res["minigpt2, one forward per patch"]["values"]).abs().max().item()
                     if not args.skip_loop else None)
        tl_t = res["TransformerLens"]
        print(f"\n{fname}: {len(grid)} patches (minigpt2 ran {len(ours_set)}{f', x{scale:g}' if scale != 1 else ''}; "
              f"TransformerLens and the loop {len(subset)}, median x {len(grid)})")
        for label, r in res.items():
            print(f"  {label:34s} {r['wall']:8.1f} s wall {r['cpu']:8.1f} s CPU   TransformerLens / this: "
                  f"{tl_t['wall'] / r['wall']:5.2f}x wall {tl_t['cpu'] / r['cpu']:5.2f}x CPU")
        print(f"  max |minigpt2 - TransformerLens| {diff_tl:.1e}; logit_positions vs full logits {diff_lp:.1e}"
              + (f"; vs the loop {diff_loop:.1e}" if diff_loop is not None else "")
              + f"; metric range [{ours.min():.3f}, {ours.max():.3f}]")
        figures["functions"][fname] = {
            "patches": len(grid), "minigpt2_ran": len(ours_set), "reference_ran": len(subset),
            "max_abs_diff_tl": diff_tl, "max_abs_diff_logit_positions": diff_lp, "max_abs_diff_loop": diff_loop,
            **{label: {"wall_s": r["wall"], "cpu_s": r["cpu"], "speedup_wall": tl_t["wall"] / r["wall"],
                       "speedup_cpu": tl_t["cpu"] / r["cpu"]} for label, r in res.items()}}
        if diff_tl > 1e-4 or diff_lp > 1e-4:
            sys.exit(f"{fname}: minigpt2 disagrees with TransformerLens ({diff_tl:.2e}) or with itself ({diff_lp:.2e})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
