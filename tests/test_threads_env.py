"""OpenMP's wait policy is PASSIVE in every script and package of the project unless the user chose
one, and it is in the environment before torch loads libgomp (which reads it once); torch's thread
count stays within a container's CPU quota (minigpt2.threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minigpt2 import threads

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: records OMP_WAIT_POLICY at the moment torch starts to load, then loads TARGET.
PROBE = textwrap.dedent("""
    import importlib.abc, os, runpy, sys
    seen = []

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" and not seen:
                seen.append(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
            return None

    sys.meta_path.insert(0, Watch())
    target = sys.argv[1]
    if target == "torch-first":
        import torch, minigpt2
    elif target.endswith(".py"):
        runpy.run_path(target, run_name="imported")  # the script's module code, not its main()
    else:
        __import__(target)
    print(seen[0] if seen else "-", os.environ.get("OMP_WAIT_POLICY", "<unset>"))  # "-": torch not loaded
""")


def probe(target: str, policy: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", PROBE, target], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("target", ["minigpt2", "circuitlab", "tpp", "finetune.trainer", "circuits.py"])
def test_passive_is_set_before_torch_loads(target):
    assert probe(target) == ["PASSIVE", "PASSIVE"]


def test_train_py_sets_it_before_it_imports_anything():
    at_load, after = probe("train.py")  # "-": its module code did not load torch (flags are checked first)
    assert at_load in ("PASSIVE", "-") and after == "PASSIVE"


def test_a_policy_the_user_set_is_kept():
    assert probe("minigpt2", "ACTIVE") == ["ACTIVE", "ACTIVE"]


def test_after_torch_it_is_too_late_and_nothing_is_changed():
    # libgomp has read the environment already; setting it now would only mislead child processes
    assert probe("torch-first") == ["<unset>", "<unset>"]


def fake_cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> str:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return str(tmp_path)


def test_cpu_quota_of_cgroup_v2_and_v1(tmp_path):
    for d in "abcd":
        (tmp_path / d).mkdir()
    assert threads.cpu_quota(fake_cgroup(tmp_path / "a", "150000 100000")) == 1.5
    assert threads.cpu_quota(fake_cgroup(tmp_path / "b", "max 100000")) is None
    assert threads.cpu_quota(fake_cgroup(tmp_path / "c", v1=(50000, 100000))) == 0.5
    assert threads.cpu_quota(fake_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert threads.cpu_quota(str(tmp_path / "none")) is None


def test_available_cpus_is_the_affinity_within_the_quota(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert threads.available_cpus(str(tmp_path)) == cpus  # no quota
    assert threads.available_cpus(fake_cgroup(tmp_path, "50000 100000")) == 1  # half a CPU: one thread


def test_threads_are_lowered_to_the_quota_unless_the_user_chose(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    root = fake_cgroup(tmp_path, "100000 100000")  # one CPU
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.limit_threads(root) is None and torch.get_num_threads() == 2  # the user's count
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.limit_threads(root) == 1 and torch.get_num_threads() == 1
        assert threads.limit_threads(root) is None  # already within the quota
    finally:
        torch.set_num_threads(before)
