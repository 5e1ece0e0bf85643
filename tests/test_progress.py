"""Progress of long stages (minigpt2.progress): a log that is not a terminal gets dated lines, a terminal
gets tqdm's bar, --no-progress (or MINIGPT2_PROGRESS=0) gets nothing; and the edge commands use it."""

from __future__ import annotations

import io
import re
import time

import pytest

from minigpt2 import progress as P
from minigpt2.engine import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def follow_the_environment(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    P.set_enabled(None)
    yield
    P.set_enabled(None)


def slow_stage(n: int, stream, interval: float = 0.0, enabled: bool = True, pause: float = 0.01) -> list[int]:
    """A fake slow stage: n steps that each take a little while."""
    done = []
    for i in P.progress(range(n), "fake stage", "step", enabled=enabled, stream=stream, interval=interval):
        time.sleep(pause)
        done.append(i)
    return done


def test_a_log_gets_a_line_when_a_stage_starts_and_one_per_step_with_its_time():
    log = io.StringIO()
    assert slow_stage(3, log) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert lines[0] == "fake stage: started (3 steps)"
    assert len(lines) == 4
    for k, line in enumerate(lines[1:], 1):
        assert re.fullmatch(rf"fake stage: {k}/3 steps, \d+\.\d s elapsed(, ~\d+\.\d s left)?", line), line
    assert "left" in lines[1] and "left" not in lines[3]  # an estimate until the end


def test_a_log_of_many_fast_steps_stays_short():
    log = io.StringIO()
    slow_stage(200, log, interval=3600, pause=0)
    lines = log.getvalue().splitlines()
    # the start, the first step (how fast it goes) and the last: not 200 lines
    assert [line.split(",")[0] for line in lines] == ["fake stage: started (200 steps)", "fake stage: 1/200 steps",
                                                      "fake stage: 200/200 steps"]


def test_a_stage_that_stops_early_says_where_it_stopped():
    log = io.StringIO()
    for i in P.progress(range(10), "fake stage", "step", stream=log, interval=3600):
        if i == 4:
            break
    # four steps finished (the fifth broke off); the generator is closed when the loop is left
    assert log.getvalue().splitlines()[-1].startswith("fake stage: 4/10 steps")


def test_update_names_what_finished():
    log = io.StringIO()
    with P.progress(total=2, desc="build", unit="part", stream=log) as bar:
        bar.update(1, "train examples")
        bar.update(1, "eval set")
    lines = log.getvalue().splitlines()
    assert lines[1].startswith("build: 1/2 parts") and lines[1].endswith("[train examples]")
    assert lines[2].startswith("build: 2/2 parts") and lines[2].endswith("[eval set]")


def test_a_terminal_gets_a_tqdm_bar_not_log_lines():
    tty = Terminal()
    slow_stage(3, tty)
    out = tty.getvalue()
    assert "fake stage" in out and "3/3" in out and "\r" in out  # tqdm redraws its line
    assert "started" not in out and "elapsed" not in out


@pytest.mark.parametrize("how", ["argument", "no-progress", "environment"])
def test_turned_off_prints_nothing(how, monkeypatch):
    enabled = how != "argument"
    if how == "no-progress":
        P.set_enabled(False)
    elif how == "environment":
        monkeypatch.setenv(P.ENV, "0")
    log, tty = io.StringIO(), Terminal()
    assert slow_stage(3, log, enabled=enabled) == [0, 1, 2]
    slow_stage(3, tty, enabled=enabled)
    assert log.getvalue() == "" and tty.getvalue() == ""


def test_the_engine_bar_is_the_same_helper(capsys):
    assert list(progress_bar(range(4), "head-mask variants", "chunk", True)) == [0, 1, 2, 3]
    err = capsys.readouterr().err  # pytest's stderr is no terminal: log lines
    assert "head-mask variants: started (4 chunks)" in err and "head-mask variants: 4/4 chunks" in err
    assert list(progress_bar(range(4), "head-mask variants", "chunk", False)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from minigpt2 import GPT2, GPT2Config

    root = tmp_path_factory.mktemp("progress_model") / "tiny"
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64, vocab_size=50257)).save_pretrained(root)
    return str(root)


@pytest.mark.parametrize("argv,shown", [
    (["eap", "--method", "eap-ig", "--steps", "2", "--top-k", "10"],
     ["eap-ig gradients: started (2 passes)", "MIB faithfulness"]),
    (["acdc", "--threshold", "0.5"], ["ACDC steps: started", "MIB faithfulness"]),
])
def test_edge_commands_report_progress_in_a_log_and_not_with_no_progress(tiny_model, tmp_path, capsys, argv, shown):
    import circuits

    base = [*argv, "--model", tiny_model, "--examples", "3", "--ablation", "zero", "--metric", "logit_diff"]
    assert circuits.main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert all(s in err for s in shown), err
    assert circuits.main([*base, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not any(s.split(":")[0] in err for s in shown), err


def test_tpp_build_reports_its_parts(tmp_path, capsys):
    from tpp.__main__ import main

    argv = ["build", "--n", "30", "--eval-n", "5", "--single-n", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tpp build: started (5 parts)" and err[-1].startswith("tpp build: 5/5 parts")
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "a" / "eval.jsonl").read_text() == (tmp_path / "b" / "eval.jsonl").read_text()
