"""train.py refuses impossible flag values before doing any work: exit status 2 and one line,
``train.py: error: --flag ...``, naming the flag, without a traceback. The table covers every
numeric flag of both subcommands; the CLI runs in-process (milliseconds a case), and one real
subprocess checks the same from the shell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script at the repository root)

# (extra flags, the flag the error must name)
COMMON = [
    (["--micro-batch-size", "-1"], "--micro-batch-size"), (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--batch-size", "-8"], "--batch-size"), (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "eight"], "--batch-size"),
    (["--max-steps", "-5"], "--max-steps"), (["--max-steps", "0"], "--max-steps"),
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
    (["--grad-clip", "nan"], "--grad-clip"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--lr", "0"], "--lr"), (["--lr", "-1e-4"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--head-dropout", "1"], "--head-dropout"), (["--head-dropout", "-0.1"], "--head-dropout"),
    (["--head-dropout", "nan"], "--head-dropout"),
    (["--min-lr-ratio", "-0.1"], "--min-lr-ratio"), (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio"),
    (["--save-every", "-1"], "--save-every"), (["--eval-every", "-1"], "--eval-every"),
    (["--log-every", "-1"], "--log-every"), (["--log-every", "0"], "--log-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--fraction", "0"], "--fraction"), (["--fraction", "-0.5"], "--fraction"), (["--fraction", "1.5"], "--fraction"),
    (["--fraction", "nan"], "--fraction"),
    (["--eval-size", "-1"], "--eval-size"), (["--eval-size", "0"], "--eval-size"),
    (["--seed", "-1"], "--seed"),
    (["--device", "gpu"], "--device"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
    (["--schedule", "exponential"], "--schedule"),
]
FINETUNE = [
    (["--master-size", "0"], "--master-size"), (["--master-size", "-3"], "--master-size"),
    (["--data-seed", "-1"], "--data-seed"), (["--single-token-eval-size", "0"], "--single-token-eval-size"),
    (["--master-size", "100", "--fraction", "0.001"], "--fraction"),
    (["--preset", "heavyweight"], "--preset"),
]
PRETRAIN = [
    (["--block-size", "0"], "--block-size"), (["--block-size", "-1"], "--block-size"),
    (["--block-size", "1"], "--block-size"),
    (["--n-layer", "0"], "--n-layer"), (["--n-head", "0"], "--n-head"), (["--n-head", "-2"], "--n-head"),
    (["--d-model", "0"], "--d-model"), (["--d-model", "-96"], "--d-model"), (["--d-mlp", "-1"], "--d-mlp"),
    (["--n-ctx", "-1"], "--n-ctx"), (["--repeat-docs", "0"], "--repeat-docs"),
    (["--copy-spans", "1.5"], "--copy-spans"), (["--copy-spans", "-0.1"], "--copy-spans"),
    (["--copy-spans", "nan"], "--copy-spans"),
    (["--random-repeats", "2"], "--random-repeats"), (["--random-repeats", "nan"], "--random-repeats"),
    (["--copy-spans", "0.6", "--random-repeats", "0.6"], "--copy-spans"),
    (["--recall", "1.5"], "--recall"), (["--recall", "nan"], "--recall"),
    (["--copy-spans", "0.3", "--random-repeats", "0.3", "--recall", "0.5"], "--recall"),
    (["--d-model", "100"], "--d-model"),  # not a multiple of the 12 heads
    (["--block-size", "256", "--n-ctx", "128"], "--block-size"),
    (["--repeat-length", "-1"], "--repeat-length"), (["--repeat-length", "7"], "--repeat-length"),
    (["--repeat-length", "40", "--block-size", "64"], "--repeat-length"),  # more than half a block
]
CASES = ([("finetune", *c) for c in COMMON + FINETUNE] + [("pretrain", *c) for c in COMMON + PRETRAIN])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("train.py: error: "), err
    return lines[0]


@pytest.mark.parametrize("mode, extra, named", CASES, ids=[f"{m} {' '.join(e)}" for m, e, _ in CASES])
def test_an_impossible_flag_is_refused_at_parse_time(tmp_path, capsys, monkeypatch, mode, extra, named):
    def no_work(*a, **k):
        raise AssertionError("data was built or a model loaded before the flags were checked")

    monkeypatch.setattr(train, "build", no_work)
    out = tmp_path / "run"
    assert train.cli([mode, "--out", str(out), *extra]) == 2
    assert named in one_error_line(capsys)
    assert not out.exists()


def test_master_size_zero_is_not_blamed_on_fraction(capsys, tmp_path):
    assert train.cli(["finetune", "--out", str(tmp_path / "run"), "--master-size", "0"]) == 2
    assert "--fraction" not in one_error_line(capsys)


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_out_on_a_regular_file_is_named(tmp_path, capsys, mode):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        assert train.cli([mode, "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert "--out" in line and "is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_missing_subcommand_is_one_line(capsys):
    assert train.cli([]) == 2
    one_error_line(capsys)


@pytest.mark.parametrize("content, says", [("{", "not valid JSON"), ("[1, 2]", "not an object"),
                                           ('{"lr": -1}', "--lr -1: must be a number > 0")])
def test_a_damaged_args_json_on_resume_names_the_file_and_the_fix(tmp_path, capsys, content, says):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "args.json").write_text(content)
    assert train.cli(["pretrain", "--out", str(out), "--resume"]) == 2
    line = one_error_line(capsys)
    assert says in line and str(out / "args.json") in line and "repair it" in line


def test_a_resume_without_args_json_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    assert train.cli(["pretrain", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "args.json is missing" in err and "Traceback" not in err


def test_the_same_from_the_shell_without_importing_torch(tmp_path):
    """python train.py, as a script: the same one line, and no torch import (so it is instant)."""
    script = ("import runpy, sys\n"
              "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
              "except SystemExit as e:\n    print('torch imported:', 'torch' in sys.modules)\n    raise\n")
    proc = subprocess.run([sys.executable, "-c", script, "pretrain", "--out", str(tmp_path / "run"), "--batch-size",
                           "-8"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["train.py: error: --batch-size -8: must be a whole number >= 1"]
    assert proc.stdout.strip() == "torch imported: False"
    assert not (tmp_path / "run").exists()


def test_valid_flags_pass(tmp_path):
    """The table's limits are not too tight: edge values that make sense are accepted."""
    args = train.parse(["pretrain", "--out", str(tmp_path / "run"), "--lr", "1e-9", "--weight-decay", "0",
                        "--grad-clip", "0", "--warmup-steps", "0", "--min-lr-ratio", "1", "--fraction", "1",
                        "--copy-spans", "0.5", "--random-repeats", "0.5", "--save-every", "0", "--eval-every", "0",
                        "--seed", "0", "--block-size", "2", "--n-head", "1", "--d-model", "1"])
    assert args.block_size == 2 and args.n_ctx == 2
    saved = json.dumps(vars(args))  # what args.json will hold
    assert json.loads(saved)["min_lr_ratio"] == 1.0


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_every_train_config_field_has_one_default_shared_by_its_flag(tmp_path, mode):
    """Each TrainConfig setting is a flag of the same name whose default, per mode, is the field's
    (finetune: the preset's where the preset sets it; pretrain: the field's ``pretrain`` value where it
    differs), and the TrainConfig that train.py builds from no flags holds the same values."""
    from dataclasses import fields

    from finetune.config import TrainConfig, mode_default
    from finetune.presets import PRESETS

    args = train.parse([mode, "--out", str(tmp_path / "run")])
    preset = PRESETS["featherweight"].to_dict() if mode == "finetune" else {}
    built = train.train_config(args)
    flags = {a.dest for a in train.build_parser().modes[mode]._actions}
    for f in fields(TrainConfig):
        if f.name == "out":
            continue
        expected = preset.get(f.name, mode_default(f, mode))
        if f.metadata.get("flag") is not False or f.name == "dtype":
            assert f.name in flags, f"TrainConfig.{f.name} has no flag"
            assert getattr(args, f.name) == expected, (f.name, getattr(args, f.name), expected)
        assert getattr(built, f.name) == expected, f.name
    assert PRESETS["featherweight"].lr == TrainConfig.lr and PRESETS["featherweight"].batch_size == TrainConfig.batch_size
    if mode == "pretrain":  # the per-mode defaults train.py has always had
        assert (args.lr, args.epochs, args.weight_decay, args.warmup_steps, args.schedule) == (6e-4, 1, 0.1, 100,
                                                                                                "cosine")
    assert args.min_lr_ratio == TrainConfig.min_lr_ratio == 0.1


def test_train_config_refuses_a_setting_out_of_its_flags_range():
    """The library class checks the same ranges as the flags, naming the parameter (not the flag)."""
    from finetune.config import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig: lr=0 \(must be a number > 0\); keep_checkpoints=0"):
        TrainConfig(out="x", lr=0, keep_checkpoints=0)
    with pytest.raises(ValueError, match="schedule='exp' .choose linear, cosine, constant"):
        TrainConfig(out="x", schedule="exp")
