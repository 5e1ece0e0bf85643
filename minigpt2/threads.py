"""OpenMP's defaults for a CPU that other work shares (no torch import here: this runs before torch loads).

Wait policy. torch's CPU kernels run on OpenMP (libgomp) threads; between two parallel regions an
idle thread busy-waits ("spins") for a while before it sleeps. On a machine of its own that saves
a wake-up; on a shared one the spinning threads take the cores the working thread needs. With one
other CPU-bound process beside it, ``circuits.py sweep --examples 40`` took 3x longer under
libgomp's default policy than with ``OMP_WAIT_POLICY=PASSIVE`` (BENCHMARKS.md, "Shared CPU"); alone,
both take the same time. So the scripts (circuits.py, train.py, python -m tpp, bench/) and the
packages (minigpt2, circuitlab, tpp, finetune) set ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment already names a policy. libgomp reads the variable once, when ``import torch`` loads
it: a process that imported torch before minigpt2 keeps the policy it started with, and this
module then changes nothing (no warning: the policy matters only where other work competes for the
cores; set OMP_WAIT_POLICY=PASSIVE before starting Python, or import minigpt2 first).

Thread count. torch starts as many threads as the CPUs the process may run on
(``os.sched_getaffinity``; ``torch.get_num_threads()``), but a container limited by a CPU quota
(cgroup ``cpu.max``, ``docker --cpus``) still sees every CPU of the host, and more threads than
the quota allows only queue behind one another. :func:`limit_threads` (run when minigpt2 is imported)
lowers torch's count to the quota, rounded up, unless OMP_NUM_THREADS is set; ``--threads`` of the
scripts and ``torch.set_num_threads`` still choose any count afterwards.
"""

from __future__ import annotations

import math
import os
import sys

DEFAULT_POLICY = "PASSIVE"


def set_wait_policy() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless set; only before torch is imported (libgomp reads it then).
    Returns whether the policy in force is the environment's (False: torch was loaded before)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_POLICY)
    return True


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup CPU quota allows (e.g. 2.5), or None without a quota."""
    try:  # cgroup v2: "max 100000" or "250000 100000"
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(open(os.path.join(root, "cpu", "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(root, "cpu", "cpu.cfs_period_us")).read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity mask, bounded by a cgroup quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(n, math.ceil(quota))) if quota is not None else n


def limit_threads(root: str = "/sys/fs/cgroup") -> int | None:
    """Lower torch's intra-op threads to :func:`available_cpus` when OMP_NUM_THREADS is unset and
    torch chose more; returns the new count, or None when nothing changed."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    n, cpus = torch.get_num_threads(), available_cpus(root)
    if n <= cpus:
        return None
    torch.set_num_threads(cpus)
    return cpus
