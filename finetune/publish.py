"""Publish a run's final model as a bundled checkpoint with a model card.

    python -m finetune.publish runs/featherweight weights/featherweight \\
        --title "Featherweight" --about "base finetuned with the featherweight preset" \\
        --scale "10 % of a 15,800-example master set, 3 epochs, lr 1e-3"

Writes DEST/model.safetensors (float16 unless --dtype float32), config.json,
metadata.json (the run's) and README.md, the card: data, steps, seed, the exact
command that reproduces the model, and its TPP metrics on both eval sets,
measured on the stored weights. DEST is built in a temporary directory and
renamed into place, so it is never half-written. The card's head census (circuits.py classify's
head classes) is circuitlab's: ``python -m circuitlab.census DEST`` measures it on the stored
weights and adds it to the card (finetune, the training library, does not depend on circuitlab).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import torch

from minigpt2 import load_pretrained, save_pretrained
from minigpt2.fileio import load_json, seal, umask
from minigpt2.heads import Head
from tpp.encoding import SPACES
from clikit import Parser, integer, run

from .checkpoint import swap_in, recover_dir
from .evaluate import tpp_eval_sets, tpp_metrics

parser = Parser(prog="python -m finetune.publish", description=__doc__)
parser.add_argument("run", type=Path, help="run directory of train.py (its model/ is published)")
parser.add_argument("dest", type=Path, help="destination directory, e.g. weights/featherweight")
parser.add_argument("--title", required=True, help="the card's heading")
parser.add_argument("--about", required=True, help="one sentence on what the model is")
parser.add_argument("--scale", default="", help="how the run was scaled down from the paper's, for the card (default: none)")
parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage dtype")
parser.add_argument("--master-size", type=integer(1), default=158_000, help="master dataset of the finetuning runs, "
                    "excluded from the eval sets (the same sets score every bundled model)")
parser.add_argument("--data-seed", type=integer(0), default=0, help="seed of the master dataset and eval sets")
parser.add_argument("--eval-size", type=integer(1), default=3000, help="examples in the first eval set")
parser.add_argument("--single-token-eval-size", type=integer(1), default=1150, help="examples in the second eval set")
parser.add_argument("--answer-space", choices=SPACES, default=None,
                    help="format of the first eval set: prompt (the paper's: trailing space, c on its own) or answer "
                         "(' c'); default: the run's finetuning format, else prompt. Pass the finetunes' format "
                         "when publishing their base, so that every card is scored alike")
parser.add_argument("--compare-to", type=Path, default=None,
                    help="a published base model: the card then claims margins over it on a fixed subset "
                         "(the first --subset examples of each eval set), which tests/test_bundled.py checks; "
                         "default: none, no claims")
parser.add_argument("--subset", type=integer(1), default=200, help="examples of each eval set in the claimed comparison")



def eval_sets(master_size: int, data_seed: int, eval_size: int, single_size: int, answer_space: str = "prompt") -> dict:
    """Both eval sets, as train.py's evaluator builds them, under the card's names."""
    import tpp

    master = tpp.master_dataset(seed=data_seed, n=master_size)
    sets = tpp_eval_sets(master, eval_size, single_size, data_seed, answer_space)
    return {f"TPP eval ({eval_size} examples)": sets["eval"],
            f"single-token eval ({single_size} examples)": sets["single_token_eval"]}


FORMATS = {"prompt": "the paper's: the prompt ends with a space, c follows on its own",
           "answer": "the prompt without its trailing space, the answer ' c'"}


def _head_label(name: str) -> str:
    """A logged head as the card shows it: "L3H1", also from older logs' "3.1"."""
    return Head.parse(name).label


def metrics_table(results: dict) -> str:
    lines = ["| eval set | cross-entropy | accuracy | logit difference |", "|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['loss']:.3f} ± {m['loss_sem']:.3f} | {m['accuracy']:.3f} ± {m['accuracy_sem']:.3f} "
                     f"| {m['logit_diff']:.3f} ± {m['logit_diff_sem']:.3f} |")
    return "\n".join(lines)


# What a published model keeps of each stage that made it (its metadata's "lineage"), so that a later
# run continuing it (--init weights/...) can still say how it was made after the run directories are gone
STAGE_KEYS = ("command", "mode", "corpus", "init", "steps", "tokens_seen", "data", "data_sha256", "data_changes",
              "seed")


def stage_summary(stage: dict) -> dict:
    """The part of a stage's metadata that the card's stages table and commands use."""
    metrics = {k: v for k, v in stage.get("final_metrics", {}).items() if k in ("heldout", "copying")}
    dropout = head_dropout_of(stage)
    return ({k: stage[k] for k in STAGE_KEYS if k in stage} | {"final_metrics": metrics}
            | ({"train_config": {"head_dropout": dropout}} if dropout else {}))


def head_dropout_of(stage: dict) -> float:
    return stage.get("train_config", {}).get("head_dropout", 0.0)


def lineage(meta: dict, limit: int = 64) -> list[dict]:
    """The runs that made a model, oldest first: the model's own run and, before it, the run of
    every ``--init`` checkpoint it continued (continued pretraining), read from each checkpoint's
    metadata.json, which records its run's command and step. A published model's metadata holds
    its own lineage, which is used as it stands (its run directories may be gone)."""
    stages = [meta]
    while True:
        if stages[-1].get("lineage"):
            stages[-1:] = stages[-1]["lineage"][::-1]  # newest first here; the recorded one is oldest first
            break
        if not stages[-1].get("init"):
            break
        init = Path(stages[-1]["init"])
        if not (init / "metadata.json").exists():
            raise FileNotFoundError(f"--init {init} of the run {stages[-1].get('command', '?')!r} has no metadata.json, "
                                    "so the card cannot say how it was made: publish on the machine that holds it")
        stages.append(load_json(init / "metadata.json", "metadata", kind=dict))
        if len(stages) > limit:
            raise ValueError(f"more than {limit} --init stages from {meta.get('command')!r}: a cycle?")
    return stages[::-1]


def _set_flag(words: list[str], flag: str, value: str) -> list[str]:
    """words with ``flag value`` set: any earlier value dropped, the new one appended."""
    out, i = [], 0
    while i < len(words):
        if words[i] == flag:
            i += 2
            continue
        if words[i].startswith(flag + "="):
            i += 1
            continue
        out.append(words[i])
        i += 1
    return [*out, flag, value]


def reproducing_commands(meta: dict) -> list[str]:
    """Commands that make the model again, one per stage of its ``lineage``. A resumed run
    equals an uninterrupted one, so --resume is dropped. Every stage stops at the step its model
    or checkpoint was taken (--max-steps, which leaves the schedule as it was) and writes
    runs/<name>; the next stage starts from that run's final model (--init runs/<name>/model)."""
    commands, previous = [], None
    for stage in lineage(meta):
        words = [w for w in shlex.split(stage.get("command", "")) if w != "--resume"] or ["(command not recorded)"]
        if "--out" in words[:-1]:
            out = f"runs/{Path(words[words.index('--out') + 1]).name}"
            words = _set_flag(words, "--out", out)
        else:
            out = None
        if previous is not None:
            words = _set_flag(words, "--init", f"{previous}/model")
        if stage.get("steps") and words[:2] == ["python", "train.py"]:
            words = _set_flag(words, "--max-steps", str(stage["steps"]))
        corpus = stage.get("corpus") or ""
        env = "NLTK_DATA=../shared/nltk_data " if "wordnet" in corpus.split("+") else ""
        commands.append(env + shlex.join(words))
        previous = out
    return commands


def stages_table(stages: list[dict]) -> str:
    """Markdown: what each pretraining stage trained on, for how long, and where it ended."""
    rows = ["| stage | steps | tokens | data | data sha256 | held-out loss (last eval) | copying: 2nd-copy loss, "
            "induction max |", "|---|---|---|---|---|---|---|"]
    for i, st in enumerate(stages, 1):
        data = st.get("data", {})
        rep = data.get("repeats", {})
        mix = (f"{st.get('corpus')}, block {data.get('block_size')}; random repeats {rep.get('random_repeats', 0):.0%}"
               + (f" (top {rep['repeat_vocab']:,} tokens" if rep.get("repeat_vocab") else " (all tokens")
               + (f", 8-{rep['repeat_length']} long)" if rep.get("repeat_length") else ")")
               + f", copied spans {rep.get('copy_spans', 0):.0%}"
               + (f", recall {rep['recall']:.0%}" if rep.get("recall") else "")
               + (f"; head dropout {head_dropout_of(st):.0%}" if head_dropout_of(st) else ""))
        m = st.get("final_metrics", {})
        held = f"{m['heldout']['loss']:.3f}" if "heldout" in m else "-"
        cp = m.get("copying")
        copy = f"{cp['loss_second']:.2f}, {cp['induction_max']:.2f}" if cp else "-"
        sha = f"`{st['data_sha256'][:12]}…`" if st.get("data_sha256") else "-"
        rows.append(f"| {i} | {st.get('steps'):,} | {st.get('tokens_seen', 0):,} | {mix} | {sha} | {held} | {copy} |")
    return "\n".join(rows)


def subset_edges(model, base, sets: dict, n: int) -> dict:
    """Per eval set, the model's edge over ``base`` on its first ``n`` examples, signed so that
    positive is better: {"loss": base minus model, "logit_diff": model minus base}."""
    edges = {}
    for name, batch in sets.items():
        sub = batch.select(torch.arange(min(n, len(batch))))
        ours, theirs = tpp_metrics(model, sub), tpp_metrics(base, sub)
        edges[name] = {"loss": theirs["loss"] - ours["loss"], "logit_diff": ours["logit_diff"] - theirs["logit_diff"]}
    return edges


def subset_margins(model, base, sets: dict, n: int) -> dict:
    """The claims of a card: half of each positive edge (see subset_edges), rounded down to 3 decimals."""
    return {name: {k: math.floor(v / 2 * 1000) / 1000 for k, v in edge.items() if v > 0}
            for name, edge in subset_edges(model, base, sets, n).items()}


def frequent_tokens_of(meta: dict, compare_to: Path | None) -> torch.Tensor | None:
    """The most frequent pretraining tokens: the run's own (a pretraining run records them), else
    those of the base it is compared to; None when neither has them."""
    ids = meta.get("frequent_tokens")
    if ids is None and compare_to is not None and (compare_to / "metadata.json").exists():
        ids = load_json(compare_to / "metadata.json", "metadata", kind=dict).get("frequent_tokens")
    return None if ids is None else torch.tensor(ids, dtype=torch.long)


def publishing_commands(args) -> list[str]:
    """This publish, then the head census that circuitlab adds to the card."""
    return [f"python -m finetune.publish {args.run} {args.dest} --title {json.dumps(args.title)} "
            f"--about {json.dumps(args.about)}" + (f" --scale {json.dumps(args.scale)}" if args.scale else "")
            + (f" --answer-space {args.answer_space}" if args.answer_space else "")
            + (f" --master-size {args.master_size}" if args.master_size != 158_000 else "")
            + (f" --compare-to {args.compare_to}" if args.compare_to else ""),
            f"python -m circuitlab.census {args.dest}"]


def card(args, meta: dict, results: dict, n_params: int, claims: dict | None = None,
         answer_space: str = "prompt") -> str:
    """The model card; circuitlab.census adds its "## Head classes" section before "## TPP metrics"."""
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
    stages = lineage(meta)
    if len(stages) > 1:
        lines += [f"- stages: {len(stages)} runs, each continuing the last one's weights (--init); "
                  f"{sum(st.get('steps', 0) for st in stages):,} steps, "
                  f"{sum(st.get('tokens_seen', 0) for st in stages):,} tokens in all", "", stages_table(stages), ""]
    lines += [f"- git commit: `{meta.get('git_commit')}`", "", "Reproduce:", "", "```",
              *reproducing_commands(meta), *publishing_commands(args), "```", ""]
    if heldout:
        lines += [f"Held-out text ({meta.get('corpus') or 'the corpus'}, never trained on): loss {heldout['loss']:.3f}, perplexity {heldout['perplexity']:.1f}, "
                  f"next-token accuracy {heldout['accuracy']:.3f} ({heldout['n_tokens']} tokens).", ""]
    copying = final.get("copying")
    if copying:
        lines += [f"Copying, on {copying['n_examples']} repeated random sequences of {copying['seq_len']} tokens "
                  f"from the {copying['pool_size']:,} most frequent training tokens: loss {copying['loss_first']:.2f} "
                  f"on the first copy, {copying['loss_second']:.2f} on the second; "
                  f"{copying['induction_heads']} heads with an induction score > {copying['threshold']} "
                  f"(largest {copying['induction_max']:.2f}, head {_head_label(copying['induction_top'][0])}), "
                  f"{copying['previous_heads']} with a previous-token score > {copying['threshold']} "
                  f"(largest {copying['previous_max']:.2f}, head {_head_label(copying['previous_top'][0])}).", ""]
    lines += ["## TPP metrics", "",
              f"Scored on the first token of c at the answer position (as the paper's Tables 1 and 2), on the "
              f"stored weights; eval sets built with seed {args.data_seed}, disjoint from the "
              f"{args.master_size:,}-example master set; the first set's answer format: {answer_space!r} "
              f"({FORMATS[answer_space]}). Mean ± standard error.", "",
              metrics_table(results), ""]
    if claims:
        lines += [f"Claimed margins over `{args.compare_to}` on the first {args.subset} examples of each eval set "
                  "(half of the observed edge; checked by tests/test_bundled.py):", ""]
        for name, margins in claims.items():
            text = ", ".join(f"{'cross-entropy lower' if k == 'loss' else 'logit difference higher'} by at least {v}"
                             for k, v in margins.items()) or "none"
            lines.append(f"- {name}: {text}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parser.parse_args(argv)
    model_dir = args.run / "model"
    meta_path = model_dir / "metadata.json"
    if not meta_path.exists():
        raise SystemExit(f"error: {model_dir} has no finished model (metadata.json); finish the run first")
    meta = load_json(meta_path, "metadata", kind=dict)
    dtype = getattr(torch, args.dtype)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(args.dest.parent, args.dest.name)  # a copy left aside by an interrupted publish comes back
    tmp = Path(tempfile.mkdtemp(dir=args.dest.parent, prefix=f".{args.dest.name}.partial-{os.getpid()}-"))  # as atomic_dir
    try:
        save_pretrained(load_pretrained(model_dir), tmp, dtype=dtype)
        stored = load_pretrained(tmp)  # score what users will load
        answer_space = args.answer_space or meta.get("answer_space") or "prompt"
        sets = eval_sets(args.master_size, args.data_seed, args.eval_size, args.single_token_eval_size, answer_space)
        with torch.no_grad():
            results = {name: tpp_metrics(stored, batch) for name, batch in sets.items()}
            claims = (subset_margins(stored, load_pretrained(args.compare_to), sets, args.subset)
                      if args.compare_to else None)
        extra = {"tpp_metrics": results, "eval_data": {"master_size": args.master_size, "data_seed": args.data_seed,
                                                       "eval_size": args.eval_size,
                                                       "single_token_eval_size": args.single_token_eval_size,
                                                       "answer_space": answer_space}}
        stages = lineage(meta)
        if len(stages) > 1:
            extra["lineage"] = [stage_summary(st) for st in stages]
        if claims:
            extra["claims"] = {"compare_to": str(args.compare_to), "subset": args.subset, "margins": claims}
        (tmp / "metadata.json").write_text(json.dumps(meta | extra, indent=2) + "\n")
        n_params = sum(p.numel() for p in stored.parameters())
        (tmp / "README.md").write_text(card(args, meta, results, n_params, claims, answer_space))
        seal(tmp)  # complete.json: each file's size and sha256, verified by load_pretrained
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would make the directory private
        swap_in(tmp, args.dest)  # the old copy is moved aside, never deleted before the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(metrics_table(results))
    print(f"published {args.dest}")


def cli(argv=None) -> int:
    """The command line: 0, or one line ``python -m finetune.publish: error: ...`` and status 2 (130 on Ctrl-C)."""
    return run("python -m finetune.publish", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
