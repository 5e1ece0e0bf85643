"""bench/bench_distributed.py and device_suite.py --distributed check themselves on the CPU: two gloo ranks give the
one-process values bit for bit, the projection's cost model adds up, and the suite's rank mode runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_distributed as BD  # noqa: E402
import device_suite as DS  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
           MINIGPT2_DIST_TIMEOUT="60")


def test_two_ranks_equal_one_process_and_project(tmp_path, capsys):
    """1 process x 1 thread against 2 ranks x 1 thread: the sweep's and edge patching's values are equal."""
    out = BD.main(["--tiny", "--threads", "1", "--sweep-prompts", "3", "--seq", "6", "--edges", "30",
                   "--json", str(tmp_path / "d.json"), "--project", "--gpus", "1,8"])
    assert out["sweep"]["equal"] and out["edges"]["equal"], out
    assert out["many"]["ranks"] == 2 and out["one"]["ranks"] == 1
    assert out["one"]["sweep"]["variants"] == 1 + 2 * 3 and out["one"]["edges"]["edges"] == 30
    assert set(out["projection"]["seconds"]) == {"CPU here (1 process x 1 threads)", "1 GPU", "8 GPUs"}
    printed = capsys.readouterr().out
    assert "values equal (torch.equal) with the 1x1 run: True" in printed and "2,235,025 edges" in printed
    again = BD.main(["--project", "--from", str(tmp_path / "d.json")])  # the saved measurements, no new runs
    assert again["projection"]["seconds"]["1 GPU"] == pytest.approx(out["projection"]["seconds"]["1 GPU"])


def test_the_engine_path_splits_the_chunks():
    """--max-rows: run_with_head_masks in chunks of 6 rows (2 variants x 3 prompts): 4 chunks, 2 a rank, equal."""
    out = BD.main(["--tiny", "--threads", "1", "--sweep-prompts", "3", "--seq", "6", "--edges", "0",
                   "--max-rows", "6"])
    assert out["sweep"]["equal"] and out["one"]["sweep"]["path"] == "run_with_head_masks(max_rows=6)", out


def test_the_cost_model_adds_up():
    from circuitlab.graph import Graph

    g = Graph(12, 12)
    whole = BD.edge_flops(BD.GPT2_SMALL, 16)
    assert BD.edge_flops(BD.GPT2_SMALL, 16, g.valid) == whole
    half = BD.chosen_edges(g, g.n_edges // 2)
    assert BD.edge_flops(BD.GPT2_SMALL, 16, half) + BD.edge_flops(BD.GPT2_SMALL, 16, g.valid & ~half) \
        == pytest.approx(whole)
    assert int(BD.chosen_edges(g, 100).sum()) == 100 and Graph(48, 25).n_edges == 2_235_025
    # the sweep shares clean prefixes: fewer blocks than 145 full forwards, more than one
    forward = 12 * BD.block_flops(BD.GPT2_SMALL, 25)
    assert forward < BD.sweep_flops(BD.GPT2_SMALL, 25) < 145 * forward + 145 * 2 * 50257 * 768


def test_the_suite_refuses_distributed_without_torchrun(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        DS.main(["--dry-run", "--distributed", "--steps", "head_masks"])
    assert e.value.code == 2 and "torchrun" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        DS.main(["--dry-run", "--distributed", "--isolate"])
    assert "a subprocess is not a rank" in capsys.readouterr().err


def test_the_suite_on_two_ranks(tmp_path):
    """torchrun --nproc-per-node 2 device_suite.py --distributed --dry-run: rank 0 alone prints the table and
    writes the JSON; the head-mask bench splits its variants over the two ranks."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "bench" / "device_suite.py"), "--distributed", "--dry-run", "--steps",
                        "tests,head_masks", "--dtypes", "fp32", "--json", str(tmp_path / "s.json")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("== device suite: cpu x 2 ranks") == 1, log
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["ranks"] == 2 and [r["status"] for r in saved["results"]] == ["ok", "ok"], saved["results"]
    assert saved["results"][0]["figure"].endswith("on rank 0's device"), saved["results"][0]
