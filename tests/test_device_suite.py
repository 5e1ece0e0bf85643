"""bench/device_suite.py checks itself: the dry run (every step on the CPU at tiny sizes) gives a table
with every step and a status, and a failing or timed-out step is a row of it, not the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "device_suite.py"
sys.path.insert(0, str(SUITE.parent))
import device_suite as DS  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def table_rows(out: str) -> dict[tuple[str, str], str]:
    """(step, dtype) -> the rest of its table row, from the suite's printed table."""
    lines = out[out.rindex("== device suite:"):].splitlines()[3:]
    return {tuple(line.split()[:2]): line for line in lines if line.strip()}


def test_the_dry_run_reports_every_step_in_fp32_and_bf16(tmp_path):
    p = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--json", str(tmp_path / "suite.json")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table_rows(p.stdout)
    want = [("tests", "-")] + [(s, d) for s in DS.STEPS[1:] for d in DS.DTYPES]
    assert list(rows) == want, p.stdout[-3000:]
    for key, line in rows.items():
        assert line.split()[2] == "ok", line  # a status each, and every step ran
    assert "transformers" in rows[("sweep", "fp32")] and "TransformerLens" in rows[("sweep", "fp32")]
    assert "passed" in rows[("tests", "-")]
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["dry_run"] and [(r["step"], r["dtype"]) for r in saved["results"]] == want
    assert all(r["figure"] and r["status"] == "ok" for r in saved["results"])
    assert saved["results"][1]["figures"]["dtype"] == "fp32" and saved["results"][2]["figures"]["dtype"] == "bf16"


def test_a_failing_or_timed_out_step_is_a_row(capsys):
    failed = DS.Result("head_masks", "fp32")
    DS.run_bench(failed, "cpu", True, -1, 60, isolate=False)  # -1 prompts: the bench raises
    assert failed.status.startswith("failed: ") and not failed.figures
    late = DS.Result("search", "fp32")
    DS.run_bench(late, "cpu", True, None, 0.05, isolate=True)  # its subprocess is killed
    assert late.status == "timeout after 0.05 s"
    rows = [line.split() for line in DS.table([failed, late]).splitlines()[2:]]
    assert rows[0][:3] == ["head_masks", "fp32", "failed:"] and rows[1][:5] == ["search", "fp32", "timeout", "after",
                                                                               "0.05"]


def test_a_step_in_a_subprocess_hands_back_its_figures(tmp_path):
    """--isolate's child: it runs one bench's main() and writes its figures for the parent."""
    argv = DS.bench_argv("head_masks", "fp32", "cpu", dry=True, prompts=None)
    assert DS.main(["--child", "bench_head_masks", "--result", str(tmp_path / "f.json"), "--", *argv]) == 0
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["device"] == "cpu" and figures["variants"] == 5
    assert DS.key_figure("head_masks", figures).startswith("batched ")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_full_suite_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        DS.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--dry-run" in err[-1] and "no CUDA device" in err[-1]
