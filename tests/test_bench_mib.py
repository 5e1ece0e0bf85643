"""bench/bench_mib_methods.py, the script behind BENCHMARKS.md's MIB table, runs and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mib_methods", ROOT / "bench" / "bench_mib_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_writes_one_row_per_method_and_model(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "mib"
    assert bench.main(["--models", str(ROOT / "weights" / "base"), str(ROOT / "weights" / "welterweight"),
                       "--methods", "eap", "information-flow", "--examples", "2", "--out", str(out)]) == 0
    results = json.loads((out / "mib.json").read_text())
    assert list(results) == ["GPT-2 base analog", "Welterweight"]
    for methods in results.values():
        assert set(methods) == {"eap", "information-flow"}
        for m in methods.values():
            assert 0 <= m["cmd"] and m["seconds"] >= 0 and len(m["curve"]["fractions"]) == 10
    printed = capsys.readouterr().out
    assert printed.count("| Welterweight ") == 2 and "best CPR" in printed


def test_the_bench_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown edge methods \\['acdcc'\\]"):
        load_bench().main(["--methods", "acdcc"])
