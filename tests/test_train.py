"""train.py and the finetune package: the loop learns, resumes exactly, writes checkpoints that
transformers loads, agrees across DDP ranks, refuses to clobber a run, and its position-gathered
loss equals the full-logits loss."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune import IGNORE, NonFiniteLoss, Schedule, TrainConfig, TrainData, Trainer, full_lm_loss, lm_loss
from minigpt2 import GPT2, GPT2Config, load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script at the repository root)

WORDS = ("the of a to in is and that for as with by an on which or one from be at used something especially "
         "small person animal plant made having quality state act").split()


def tiny(vocab=99, n_ctx=16, seed=0) -> GPT2:
    model = GPT2(GPT2Config(n_layer=2, n_head=4, d_model=32, d_mlp=37, n_ctx=n_ctx, vocab_size=vocab))
    model.init_weights(seed=seed)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def pretrain_argv(corpus, out, *extra):
    return ["pretrain", "--corpus", str(corpus), "--out", str(out), "--n-layer", "2", "--n-head", "4",
            "--d-model", "32", "--d-mlp", "37", "--block-size", "12", "--batch-size", "6", "--eval-size", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "2", "--no-progress", "--device", "cpu",
            *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize("style", ["teacher-forced", "paper"])
def test_gathered_loss_equals_full_loss(style):
    torch.manual_seed(0)
    model = tiny()
    B, T = 13, 11
    ids = torch.randint(0, 99, (B, T))
    lengths = torch.randint(3, T - 3, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding
    labels = torch.full((B, T), IGNORE)
    for i, n in enumerate(lengths.tolist()):
        labels[i, n:n + 3] = ids[i, n:n + 3]  # three answer tokens right after the prompt
        if style == "teacher-forced":
            mask[i, n:n + 3] = 1
    full, n_full = full_lm_loss(model, ids, labels, mask)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    part, n_part = lm_loss(model, ids, labels, mask)
    g_part = torch.autograd.grad(part, list(model.parameters()))
    assert n_part == n_full == 3 * B
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the loop
def repeating_data(n=48, T=12, vocab=99) -> TrainData:
    """Rows counting up mod vocab from a random start: learnable in a few steps."""
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
    ids = (start + torch.arange(T)) % vocab
    return TrainData(ids, ids.clone())


def test_a_few_steps_lower_the_loss(tmp_path):
    data = repeating_data()
    cfg = TrainConfig(out=str(tmp_path), epochs=8, batch_size=16, lr=3e-3, schedule="constant", progress=False,
                      device="cpu")
    Trainer(tiny(), data, cfg).train()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 24
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    data = repeating_data()
    runs = {}
    for micro in (None, 5):  # 16 rows as one forward, or as 5 + 5 + 5 + 1
        cfg = TrainConfig(out=str(tmp_path / f"m{micro}"), epochs=1, batch_size=16, micro_batch_size=micro,
                          lr=3e-3, progress=False, device="cpu")
        t = Trainer(tiny(), data, cfg)
        t.train()
        runs[micro] = t.model.state_dict()
    for k in runs[None]:  # Adam turns float noise in a near-zero gradient into ~1e-6; a wrong weighting moves ~lr
        torch.testing.assert_close(runs[5][k], runs[None][k], rtol=1e-4, atol=2e-5)


def test_a_dropped_head_is_a_zero_ablated_head():
    """head_scale 0 on a head gives the loss of the model with that head's output zeroed
    (run_with_head_masks, the masking engine, is the oracle); 1 leaves the loss unchanged."""
    from finetune.loss import LossModule

    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 99, (3, 10))
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = ids[:, -1]  # one target per row: the last token, predicted at position 8
    keep = torch.ones(3, 2, 4)
    keep[0, 1, 2] = keep[1, 0, 0] = keep[2, 0, 3] = keep[2, 1, 1] = 0.0
    loss_module = LossModule(model)
    mine, n = loss_module(ids, labels, head_scale=keep)
    logits = torch.cat([model.run_with_head_masks(ids[i:i + 1], keep[i:i + 1], positions=torch.tensor([8]))[0]
                        for i in range(3)])  # [3, V]: row i with its own heads zeroed
    expected = torch.nn.functional.cross_entropy(logits, ids[:, -1], reduction="sum")
    assert n == 3
    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(mine, lm_loss(model, ids, labels)[0])
    torch.testing.assert_close(loss_module(ids, labels, head_scale=torch.ones(3, 2, 4))[0], lm_loss(model, ids, labels)[0])
    assert not any(hp.active for hp in model.hook_dict.values())  # the dropout hooks are gone afterwards


def test_head_dropout_draws_per_row_and_step_so_micro_batches_and_resume_agree(tmp_path, corpus):
    data = repeating_data()
    cfg = TrainConfig(out=str(tmp_path / "t"), batch_size=16, head_dropout=0.25, progress=False, device="cpu")
    t = Trainer(tiny(), data, cfg)
    rows = np.arange(16)
    whole = t.head_scale(rows)
    assert whole.shape == (16, 2, 4) and whole.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    torch.testing.assert_close(torch.cat([t.head_scale(rows[:5]), t.head_scale(rows[5:])]), whole)
    assert 0.1 < (whole == 0).float().mean() < 0.4
    t.step += 1
    assert not torch.equal(t.head_scale(rows), whole)  # a new draw each step
    # accumulation over micro-batches gives the whole batch's update, with dropout on
    runs = {}
    for micro in (None, 5):
        c = TrainConfig(out=str(tmp_path / f"m{micro}"), epochs=1, batch_size=16, micro_batch_size=micro, lr=3e-3,
                        head_dropout=0.25, progress=False, device="cpu")
        tr = Trainer(tiny(), data, c)
        tr.train()
        runs[micro] = tr.model.state_dict()
    for k in runs[None]:
        torch.testing.assert_close(runs[5][k], runs[None][k], rtol=1e-4, atol=2e-5)
    # resumed runs equal one run; runs saved before the flag existed resume with it off
    train.main(pretrain_argv(corpus, tmp_path / "whole", "--max-steps", "4", "--head-dropout", "0.3"))
    train.main(pretrain_argv(corpus, tmp_path / "split", "--max-steps", "2", "--head-dropout", "0.3"))
    train.main(pretrain_argv(corpus, tmp_path / "split", "--max-steps", "4", "--head-dropout", "0.3", "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train.main(pretrain_argv(corpus, tmp_path / "old", "--max-steps", "2"))
    args_json = tmp_path / "old" / "args.json"
    saved = json.loads(args_json.read_text())
    del saved["head_dropout"]
    args_json.write_text(json.dumps(saved))
    train.main(pretrain_argv(corpus, tmp_path / "old", "--max-steps", "3", "--resume"))
    with pytest.raises(SystemExit):
        train.main(pretrain_argv(corpus, tmp_path / "bad", "--head-dropout", "1"))


def test_schedule_warms_up_then_decays():
    s = Schedule(lr=1.0, total_steps=10, warmup_steps=2, kind="linear")
    assert [s(i) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert s(6) == pytest.approx(0.5) and s(10) == 0.0
    c = Schedule(lr=1.0, total_steps=10, warmup_steps=0, kind="cosine", min_lr_ratio=0.1)
    assert c(0) == 1.0 and c(10) == pytest.approx(0.1) and c(5) == pytest.approx(0.55)


# ---------------------------------------------------------------- checkpoints and resume
def test_resume_after_max_steps_equals_an_uninterrupted_run(tmp_path, corpus):
    train.main(pretrain_argv(corpus, tmp_path / "whole", "--max-steps", "6"))
    train.main(pretrain_argv(corpus, tmp_path / "split", "--max-steps", "3"))
    train.main(pretrain_argv(corpus, tmp_path / "split", "--max-steps", "6", "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log of the resumed run holds each step once
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, 7))
    # nothing pickled: every checkpoint file is safetensors or JSON
    ckpt = tmp_path / "split" / "checkpoints"
    assert {p.suffix for p in ckpt.rglob("*") if p.is_file()} == {".safetensors", ".json"}


def test_a_model_made_in_stages_is_rebuilt_by_its_cards_commands(tmp_path, corpus, monkeypatch):
    """Continued pretraining (--init from a copied checkpoint of a longer run, then a second run
    that is interrupted and resumed): the card's commands, run from scratch, give the same weights."""
    from finetune import publish

    made = tmp_path / "made"
    train.main(pretrain_argv(corpus, made / "first", "--max-steps", "8", "--keep-checkpoints", "4", "--seed", "1",
                             "--block-size", "16", "--n-ctx", "32"))
    os.rename(made / "first" / "checkpoints" / "step-00000004", made / "first_step4")
    second = pretrain_argv(corpus, made / "second", "--init", str(made / "first_step4"), "--max-steps", "9",
                           "--random-repeats", "0.5", "--repeat-length", "8", "--seed", "2", "--block-size", "16", "--n-ctx", "32")
    train.main(_with(second, "--max-steps", "3"))
    meta = train.main([*_with(second, "--max-steps", "5"), "--resume"])
    stages = publish.lineage(meta)
    assert [st["steps"] for st in stages] == [4, 5]
    commands = publish.reproducing_commands(meta)
    assert len(commands) == 2 and all("--resume" not in c for c in commands)
    assert "--init runs/first/model" in commands[1] and "--max-steps 4" in commands[0]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "train.py"]
        train.main(words[2:])
    a, b = weights(made / "second"), weights(tmp_path / "runs" / "second")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    table = publish.stages_table(stages)
    assert table.count("\n") == 3 and "random repeats 50% (all tokens, 8-8 long)" in table
    publish.main([str(made / "second"), str(tmp_path / "card"), "--title", "T", "--about", "staged", "--master-size",
                  "200", "--eval-size", "8", "--single-token-eval-size", "4"])
    card = (tmp_path / "card" / "README.md").read_text()
    assert "- stages: 2 runs, each continuing the last one's weights (--init); 9 steps" in card
    assert table in card and all(c in card for c in commands)


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def test_a_published_model_keeps_its_lineage_after_its_runs_are_gone(tmp_path, corpus):
    """publish records the stages in the model's metadata; a run continuing the published model
    gets all of them on its card after the earlier run directories are deleted."""
    import shutil

    from finetune import publish

    small = ("--block-size", "16", "--n-ctx", "32")
    train.main(pretrain_argv(corpus, tmp_path / "first", "--max-steps", "4", *small))
    meta = train.main(pretrain_argv(corpus, tmp_path / "second", "--init", str(tmp_path / "first" / "model"),
                                    "--max-steps", "3", "--seed", "2", *small))
    published = tmp_path / "weights"
    shutil.copytree(tmp_path / "second" / "model", published)
    recorded = [publish.stage_summary(st) for st in publish.lineage(meta)]  # what publish.main writes
    (published / "metadata.json").write_text(json.dumps(meta | {"lineage": recorded}))
    shutil.rmtree(tmp_path / "first")
    shutil.rmtree(tmp_path / "second")
    third = train.main(pretrain_argv(corpus, tmp_path / "third", "--init", str(published), "--max-steps", "2",
                                     "--head-dropout", "0.2", "--recall", "0.5", *small))
    stages = publish.lineage(third)
    assert [st["steps"] for st in stages] == [4, 3, 2]
    rows = publish.stages_table(stages).splitlines()[2:]
    assert ["recall 50%; head dropout 20%" in r for r in rows] == [False, False, True]
    assert stages[0]["final_metrics"]["heldout"] == json.loads(json.dumps(recorded[0]["final_metrics"]["heldout"]))
    commands = publish.reproducing_commands(third)
    assert "--init runs/first/model" in commands[1] and "--init runs/second/model" in commands[2]
    assert "--max-steps 4" in commands[0] and "--seed 2" in commands[1]


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, corpus):
    train.main(pretrain_argv(corpus, tmp_path / "whole", "--max-steps", "5"))

    def interrupt_at_3(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train.main(pretrain_argv(corpus, tmp_path / "cut", "--max-steps", "5"), on_step=interrupt_at_3)
    assert (tmp_path / "cut" / "checkpoints" / "step-00000003" / "optimizer.safetensors").exists()
    train.main(pretrain_argv(corpus, tmp_path / "cut", "--resume"))  # the saved args supply the rest
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    train.main(pretrain_argv(corpus, tmp_path / "run", "--max-steps", "2"))
    for path in (tmp_path / "run" / "model", tmp_path / "run" / "checkpoints" / "step-00000002"):
        hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        ours = load_pretrained(path)
        tokens = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / "run" / "model" / "metadata.json").read_text())
    assert meta["steps"] == 2 and meta["seed"] == 0 and len(meta["data_sha256"]) == 64
    assert "heldout" in meta["final_metrics"] and "git_commit" in meta
    copying = meta["final_metrics"]["copying"]  # the induction probe, at |s| = (n_ctx - 1) // 2
    assert copying["seq_len"] == 5 and copying["pool_size"] == train.COPYING_POOL
    assert 0 <= copying["induction_max"] <= 1 and len(copying["previous_top"]) == 3
    # the probe's tokens are recorded, most frequent first, for circuits.py classify
    from minigpt2 import get_tokenizer

    seen = set(get_tokenizer().encode(corpus.read_text()))
    assert len(meta["frequent_tokens"]) == train.COPYING_POOL and set(meta["frequent_tokens"][:20]) <= seen


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    def poison_after_4(trainer):
        if trainer.step == 4:
            with torch.no_grad():
                trainer.model.wte.weight[:] = float("nan")

    with pytest.raises(NonFiniteLoss, match=r"at step 5.*step-00000004, holds the very weights.*--overwrite"):
        train.main(pretrain_argv(corpus, tmp_path / "run", "--max-steps", "8"), on_step=poison_after_4)
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (tmp_path / "run" / "model").exists()


def test_resuming_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    train.main(pretrain_argv(corpus, out, "--max-steps", "2"))
    torch.save({"state": {}}, out / "checkpoints" / "step-00000002" / "optimizer.safetensors")  # a pickle
    assert train.cli(pretrain_argv(corpus, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "optimizer.safetensors" in err and "--overwrite" in err


def advised(err: str) -> list[list[str]]:
    """The train.py commands an error message advises, as argv lists for train.main."""
    commands = [shlex.split(line) for line in err.splitlines() if line.strip().startswith("python train.py")]
    assert commands and all(c[:2] == ["python", "train.py"] for c in commands), err
    return [c[2:] for c in commands]


def test_a_diverging_lr_stops_and_the_advised_command_runs(tmp_path, corpus, capsys):
    """--lr 1e30: step 1 saves finite (huge) weights whose loss at step 2 is nan. Resuming that
    checkpoint would recompute the same nan whatever --lr, so the advice is a fresh start."""
    out = tmp_path / "run"
    assert train.cli(pretrain_argv(corpus, out, "--lr", "1e30", "--save-every", "1", "--max-steps", "4")) == 3
    err = capsys.readouterr().err
    assert "loss is nan at step 2" in err and "Traceback" not in err
    [command] = advised(err)
    assert "--overwrite" in command and command[command.index("--lr") + 1] == "0.0006"
    assert train.cli(command) == 0
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4  # the run's own settings, kept


def test_non_finite_weights_are_never_saved_and_the_advised_resume_runs(tmp_path, corpus):
    """A NaN reaching the weights through the optimizer state (loss still finite) is caught before
    the save; the last checkpoint predates it, so the advice is --resume with a lower --lr, which
    --resume accepts after such a stop (and records)."""
    def poison_moments_at_3(trainer):
        if trainer.step == 3:
            for moments in trainer.optimizer.state.values():
                moments["exp_avg"].fill_(float("nan"))

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="not finite after step 4") as e:
        train.main(pretrain_argv(corpus, out, "--max-steps", "6"), on_step=poison_moments_at_3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    [command] = advised(str(e.value))
    assert command == ["pretrain", "--out", str(out), "--resume", "--lr", "0.0003"]
    meta = train.main(command)
    assert meta["steps"] == 6 and meta["changed_on_resume"] == [{"step": 2, "changed": {"lr": [3e-3, 3e-4]}}]
    assert json.loads((out / "args.json").read_text())["lr"] == 3e-4
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    with pytest.raises(ValueError, match="--lr: run has 0.0003, now 0.0001"):  # no NaN stop now: --lr is fixed
        train.main(["pretrain", "--out", str(out), "--resume", "--lr", "1e-4"])


# ---------------------------------------------------------------- bad input
def test_a_used_output_directory_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    train.main(pretrain_argv(corpus, out, "--max-steps", "1"))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train.main(pretrain_argv(corpus, out, "--max-steps", "1"))
    train.main(pretrain_argv(corpus, out, "--max-steps", "1", "--overwrite", "--seed", "3"))
    assert json.loads((out / "args.json").read_text())["seed"] == 3
    with pytest.raises(ValueError, match="--seed: run has 3, now 4"):
        train.main(pretrain_argv(corpus, out, "--max-steps", "2", "--resume", "--seed", "4"))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a run directory"):
        train.main(pretrain_argv(corpus, stranger, "--overwrite"))
    assert (stranger / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.main(pretrain_argv(corpus, tmp_path / "empty", "--resume"))


def test_missing_base_weights_say_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"openai-community/gpt2.*weights/gpt2/.*--base"):
        train.main(["finetune", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- finetuning on TPP
def test_finetune_runs_a_preset_at_small_scale(tmp_path):
    save_pretrained(tiny(vocab=50257, n_ctx=64), tmp_path / "base")
    meta = train.main(["finetune", "--preset", "lightweight", "--base", str(tmp_path / "base"), "--out",
                       str(tmp_path / "run"), "--master-size", "400", "--fraction", "0.05", "--batch-size", "8",
                       "--max-steps", "3", "--eval-size", "24", "--single-token-eval-size", "16",
                       "--no-progress", "--device", "cpu"])
    assert meta["preset"] == "lightweight" and meta["preset_overrides"] == {"fraction": 0.05, "batch_size": 8}
    assert meta["train_config"]["epochs"] == 3 and meta["train_config"]["lr"] == 5e-5
    assert meta["n_train_rows"] == 20 and meta["steps"] == 3
    for name in ("eval", "single_token_eval"):
        assert set(meta["final_metrics"][name]) >= {"loss", "accuracy", "logit_diff"}
    assert meta["final_metrics"]["single_token_eval"]["n"] == 16


# ---------------------------------------------------------------- beyond one machine
@pytest.mark.slow  # ~15-20 s on a busy two-core machine: three processes import torch
def test_two_gloo_processes_match_one_process(tmp_path, corpus):
    common = ["--max-steps", "3", "--batch-size", "7"]  # 7 rows: ranks take 4 and 3
    train.main(pretrain_argv(corpus, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *pretrain_argv(corpus, tmp_path / "two", *common, "--micro-batch-size", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:  # same tolerance as test_gradient_accumulation_matches_the_whole_batch
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)
    lines = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"] == [1, 2, 3]  # rank 0 only


def test_repeated_documents_are_written_back_to_back(tmp_path):
    from finetune.data import corpus_tokens
    from minigpt2 import get_tokenizer

    text = tmp_path / "doc.txt"
    text.write_text("a cat is a small animal.")
    (once, sources), (twice, _) = corpus_tokens(str(text)), corpus_tokens(str(text), repeat=2)
    assert len(sources) == 1
    enc = get_tokenizer()
    assert enc.decode(twice[:-1].tolist()) == "a cat is a small animal. a cat is a small animal."
    assert twice[-1] == once[-1] == enc.eot_token
    with pytest.raises(ValueError, match=r"repeat=0 must be a whole number >= 1"):  # the library's parameter
        corpus_tokens(str(text), repeat=0)
