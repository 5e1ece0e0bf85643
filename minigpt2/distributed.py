"""Circuit methods on many processes (GPUs, machines) through torch.distributed, with the numbers of one process.

The rule: every rank builds the same list of chunks of variants (the one-process run's chunks), takes
its share of whole chunks (:func:`shard`), computes them exactly as one process would, and the
per-variant outputs are gathered, byte for byte, into variant order on every rank (:func:`gather`).
No sum crosses ranks, so nothing depends on the number of ranks: every value, and so every circuit,
equals the one-process run's bit for bit (on the same kind of device; on CUDA the chunk size is the
smallest any rank's memory allows, so pin it with ``max_rows`` or MINIGPT2_MEMORY_BUDGET to compare
with a one-process run).

Which group a call runs on (``group=`` of run_with_head_masks, the sweep, HeadMaskRunner):

- a ``torch.distributed`` process group: that group (a notebook: ``group=dist.group.WORLD``);
- :data:`LOCAL`: this process alone, whatever is initialised;
- None, the default: the default group **only** once this process has opted in, by
  :func:`init_from_env` (what ``circuits.py`` does under torchrun) or :func:`use_default_group`;
  else this process alone. A process group initialised by someone else (the DDP training of
  finetune/, train.py) is never used unasked, so a circuit function called by one rank there, as
  training's evaluation on rank 0, runs alone and cannot wait for ranks that never come.

The engine core (:class:`minigpt2.engine.Core`) distributes only over a group it is given
(None: alone); the runners that gather their chunks (HeadMaskRunner) resolve the default above.

The edge methods take the same ``group=`` through their runner (circuitlab.graph.EdgeRunner, resolved as
above): its batched run (ACDC, MIB's faithfulness, circuit evaluations) splits its chunks of variants,
exact edge patching its jobs, and the attribution methods (circuitlab.eap, learned masks' EAP-IG start)
their gradient passes, a (gradient point, chunk of examples) each: :func:`in_order` computes them a round
of one per rank at a time and hands every rank all of them in the one-process order, so that each rank
adds them up as one process does. A sum over chunks never crosses ranks.

Faults: each rank's share of work runs in :func:`step`; a rank that raises still joins the next
collective carrying its error, and every rank raises one :class:`DistributedError` naming the
failing rank(s) and their error text. A rank that dies outright makes the others fail at their next
collective: at once where the backend sees the connection close (gloo), else within the group's
timeout (MINIGPT2_DIST_TIMEOUT, default 120 s). Only rank 0 writes (:func:`is_writer`) and shows
progress; each rank can log to its own file (:func:`log_to_file`, MINIGPT2_DIST_LOG_DIR).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import traceback
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "LOCAL", "check_group", "exchange", "gather", "in_order",
           "init_from_env", "is_writer", "launched", "leave", "log_to_file", "owners", "rank", "resolve_group", "shard",
           "share", "smallest", "step", "timeout", "use_default_group", "world_size"]

DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for the other ranks (MINIGPT2_DIST_TIMEOUT)
TIMEOUT_ENV, LOG_ENV = "MINIGPT2_DIST_TIMEOUT", "MINIGPT2_DIST_LOG_DIR"
LOCAL = "local"  # group=LOCAL: this process alone, even where a default group is in use
ALIGN = 16  # bytes: each gathered tensor starts at a multiple, so that any dtype can be viewed in place

log = logging.getLogger("minigpt2.distributed")
_use_default = False  # set by init_from_env / use_default_group: group=None means the default group
_control: dict = {}  # group -> a gloo group of the same ranks, for the status and metadata of an NCCL group


class DistributedError(RuntimeError):
    """A distributed call failed: ``failures`` maps each failing rank to its error text (a rank that died
    is named where it can be: the others see only that a collective failed)."""

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


# ---------------------------------------------------------------- the group
def available() -> bool:
    return dist.is_available() and dist.is_initialized()


def use_default_group(enabled: bool = True) -> None:
    """Make ``group=None`` mean torch.distributed's default group in this process (``enabled``), or this
    process alone again. :func:`init_from_env` calls it; a notebook that initialised its own group may too."""
    global _use_default
    _use_default = bool(enabled)


def check_group(group):
    """An explicit group as the engine uses it: None or :data:`LOCAL` or a group of one rank -> None (alone);
    a process group of several ranks -> itself; anything else a TypeError."""
    if group is None or (isinstance(group, str) and group == LOCAL):
        return None
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                        f"minigpt2.distributed.LOCAL or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("group= was given but torch.distributed is not initialised: call "
                           "dist.init_process_group (or minigpt2.distributed.init_from_env) first")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it was given")
    return group if dist.get_world_size(group) > 1 else None


def resolve_group(group=None):
    """The group a call runs on (see the module docstring): None unless it has several ranks."""
    if group is None:
        if not (_use_default and available()):
            return None
        group = dist.group.WORLD
    return check_group(group)


def rank(group=None) -> int:
    group = resolve_group(group)
    return 0 if group is None else dist.get_rank(group)


def world_size(group=None) -> int:
    group = resolve_group(group)
    return 1 if group is None else dist.get_world_size(group)


def is_writer(group=None) -> bool:
    """Whether this process writes results and shows progress: rank 0 of the group, or a process alone."""
    return rank(group) == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout() -> float:
    """Seconds a collective waits for the other ranks: MINIGPT2_DIST_TIMEOUT, else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the seconds a rank waits for the others, e.g. 120")
    return value


def init_from_env(device: str | torch.device | None = None, log_dir: str | Path | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and make
    it the default of every circuit call here (:func:`use_default_group`). Returns this rank's device.

    ``device``: "cpu" or "cuda" (an index is ignored: each rank takes cuda:LOCAL_RANK); None: cuda if
    available. Backend: NCCL on CUDA (with a gloo twin for the small status messages, so that a dead
    rank is seen at once), gloo on the CPU; the timeout: :func:`timeout`. ``log_dir`` (or
    MINIGPT2_DIST_LOG_DIR): each rank logs to ``log_dir/rank<R>.log``. With WORLD_SIZE 1 or unset,
    nothing is initialised and the device is returned.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if not launched():
        return dev
    seconds = timeout()
    backend = "nccl" if kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    if dist.get_backend() == "nccl" and dist.group.WORLD not in _control:
        _control[dist.group.WORLD] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
    use_default_group(True)
    log_dir = log_dir or os.environ.get(LOG_ENV)
    if log_dir:
        log_to_file(log_dir)
    log.info("rank %d of %d on %s (%s, timeout %g s)", dist.get_rank(), dist.get_world_size(), dev, backend,
             seconds)
    return dev


def leave(wait: bool = True) -> None:
    """End this process's part in the default group (the one :func:`init_from_env` joined): with ``wait``,
    first wait for every rank to get here (so that no rank tears its connections down while another still
    reads them: a gloo rank could abort at exit), then destroy every process group and go back to running
    alone. Without ``wait`` (after a failure, when a rank may be gone), destroy at once. Nothing when no
    group is initialised."""
    if not available():
        return
    if wait:
        try:
            exchange(None, None, dist.group.WORLD, "finishing")
        except DistributedError as e:  # a rank is gone: nothing left to wait for
            log.warning("rank %d: leaving without the others: %s", dist.get_rank(), e)
    _control.clear()
    use_default_group(False)
    dist.destroy_process_group()


def log_to_file(directory: str | Path, level: int = logging.INFO) -> Path:
    """Log minigpt2's messages (this module's included) to ``directory/rank<R>.log``, R this process's global
    rank (0 when not distributed). Returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r = dist.get_rank() if available() else 0
    path = directory / f"rank{r}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {r} %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("minigpt2")
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.level or level))
    return path


# ---------------------------------------------------------------- sharding
def shard(items: Sequence, group, costs: Sequence[float] | None = None) -> list:
    """This rank's share of ``items`` (e.g. chunks of variants): every world-th one from its rank on, so
    that shares differ by one item at most and each gets early and late items alike (the chunks come in
    the order the variants join the base run: early ones cost more). With ``costs`` (one estimate per
    item, where items differ widely: exact edge patching's chunks), the items go, dearest first, each to
    the rank with the least cost so far (the lowest rank on a tie), and every share keeps the items'
    order. Deterministic; all of them alone."""
    group = check_group(group)
    if group is None:
        return list(items)
    me, world = dist.get_rank(group), dist.get_world_size(group)
    if costs is None:
        return list(items[me::world])
    if len(costs) != len(items):
        raise ValueError(f"shard: {len(costs)} costs for {len(items)} items; pass one cost per item")
    return [item for item, r in zip(items, owners(costs, world)) if r == me]


def smallest(value: int, group, what: str = "the chunk size") -> int:
    """The smallest ``value`` of any rank (every rank gets it): the chunk size (rows, prompts per chunk) the
    ranks agree on, so that they build one work list, the smallest any rank's memory allows. Alone: ``value``."""
    group = check_group(group)
    return value if group is None else min(exchange(value, None, group, f"agreeing on {what}"))


def share(n: int, compute, group, what: str = "work", device=None, costs: Sequence[float] | None = None,
          wrap=None) -> dict:
    """``{i: compute(i)}`` for i = 0..n-1 on every rank, each item computed by one rank (:func:`shard`, by
    ``costs`` if given) inside :func:`step` and gathered byte for byte (:func:`gather`, onto ``device``).
    ``wrap``: applied to this rank's items (a progress bar). Alone: every item computed here."""
    items = shard(range(n), group, costs)
    outputs = {}
    with step(group, what):
        for i in (wrap(items) if wrap is not None else items):
            outputs[i] = compute(i)
    return gather(outputs, n, group, device, f"gathering {what}")


def owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each item in :func:`shard` by costs: dearest first, each to the least loaded rank so far
    (the lowest on a tie). Every rank's load is within the dearest item's cost of every other's."""
    load, owner = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


# ---------------------------------------------------------------- faults
def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    where = traceback.extract_tb(error.__traceback__)
    at = f" (at {Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
    return f"{type(error).__name__}: {error}{at}"


def exchange(obj, error: Exception | None, group, what: str = "work") -> list:
    """Every rank's ``obj``, in rank order, once every rank has finished ``what``; where a rank brings an
    ``error`` instead, every rank raises one :class:`DistributedError` naming the failing ranks and their
    errors. A rank that died or stopped answering makes the collective fail (a DistributedError too)."""
    me, control = dist.get_rank(group), _control.get(group, group)
    sent = (_describe(error), None if error is not None else obj)
    got: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(got, sent, group=control)
    except RuntimeError as e:  # gloo: connection closed by a dead peer, or the timeout; NCCL: DistBackendError
        log.error("rank %d: %s: the collective failed: %s", me, what, e)
        own = f" This rank's own error: {_describe(error)}." if error is not None else ""
        raise DistributedError(f"rank {me}: {what}: another rank died or stopped answering within the process "
                               f"group's timeout ({TIMEOUT_ENV} where init_from_env made it); see the other ranks' "
                               f"errors.{own} The collective's error: {e}") from error or e
    failures = {r: message for r, (message, _) in enumerate(got) if message is not None}
    if failures:
        text = "; ".join(f"rank {r}: {message}" for r, message in failures.items())
        log.error("rank %d: %s failed on rank(s) %s: %s", me, what, sorted(failures), text)
        raise DistributedError(f"{what} failed on {len(failures)} of {len(got)} ranks: {text}", failures) from error
    return [obj for _, obj in got]


@contextlib.contextmanager
def step(group, what: str = "work"):
    """Run a rank's share of ``what``; at its end every rank learns whether another failed (one collective).
    An exception inside is not raised alone: every rank raises one DistributedError naming it. Ctrl-C and
    SystemExit (a SIGTERM in circuits.py) leave at once: the process ends, and the others' next collective
    fails as for a rank that died. Alone: nothing."""
    group = check_group(group)
    if group is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (reported to every rank, then raised)
        error = e
    exchange(None, error, group, what)


# ---------------------------------------------------------------- gathering
def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)


def _pieces(outputs: dict[int, torch.Tensor], n: int) -> list[tuple[int, tuple, torch.dtype, int]]:
    """(variant, shape, dtype, bytes) of this rank's outputs, in variant order; refuses what cannot be gathered."""
    meta = []
    for v in sorted(outputs):
        t = outputs[v]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"variant {v}'s output is a {type(t).__name__}; gather takes one tensor per variant")
        if not 0 <= v < n:
            raise ValueError(f"variant {v} is outside 0..{n - 1}")
        if t.requires_grad:
            raise ValueError("a distributed run gathers values without their gradients: run it under "
                             "torch.no_grad(), or pass group=minigpt2.distributed.LOCAL to keep the autograd graph")
        meta.append((v, tuple(t.shape), t.dtype, t.numel() * t.element_size()))
    return meta


def gather(outputs: dict[int, torch.Tensor], n: int, group, device=None, what: str = "gathering") -> dict:
    """Every rank's per-variant outputs (``outputs``: variant -> tensor, this rank's share of 0..n-1) on
    every rank, as one dict of all n variants on ``device`` (default: the outputs' own). Exact: the bytes
    travel unchanged. Refuses (on every rank) a variant computed twice or by no rank. Alone: ``outputs``."""
    group = check_group(group)
    if group is None:
        return outputs
    error, meta = None, []
    try:
        meta = _pieces(outputs, n)
    except Exception as e:  # noqa: BLE001  (every rank raises it)
        error = e
    metas = exchange(meta, error, group, what)
    seen = sorted(v for m in metas for v, *_ in m)
    if seen != list(range(n)):
        missing, twice = sorted(set(range(n)) - set(seen)), sorted({v for v in seen if seen.count(v) > 1})
        raise DistributedError(f"{what}: the ranks' shares do not make the {n} variants once each (missing "
                               f"{missing[:5]}, twice {twice[:5]}): the ranks built different chunk lists")
    return _assemble(outputs, metas, group, device)


def _assemble(outputs: dict, metas: list, group, device) -> dict:
    """The byte buffers of every rank, gathered (one all_gather) and cut back into tensors."""
    me = dist.get_rank(group)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    if device is None:
        device = next(iter(outputs.values())).device if outputs else comm
    size = [sum(-(-b // ALIGN) * ALIGN for *_, b in m) for m in metas]
    mine = torch.zeros(max(size), dtype=torch.uint8, device=comm)
    offset = 0
    for v, _, _, b in metas[me]:
        mine[offset:offset + b] = _flat_bytes(outputs[v]).to(comm)
        offset += -(-b // ALIGN) * ALIGN
    buffers = [torch.empty_like(mine) for _ in metas]
    if max(size):
        try:
            dist.all_gather(buffers, mine, group=group)
        except RuntimeError as e:
            raise DistributedError(f"rank {me}: gathering the variants' outputs failed (a rank died?): {e}") from e
    result = {}
    for r, m in enumerate(metas):
        offset = 0
        for v, shape, dtype, b in m:
            piece = buffers[r][offset:offset + b]
            value = piece.to(torch.bool) if dtype == torch.bool else piece.view(dtype)
            result[v] = outputs[v] if r == me else value.view(shape).to(device)
            offset += -(-b // ALIGN) * ALIGN
    log.info("rank %d: gathered %d variants from %d ranks (%d bytes)", me, len(result), len(metas), sum(size))
    return result


def in_order(n: int, compute, group, what: str = "work", device=None):
    """Yield ``(i, compute(i))`` for i = 0..n-1, in that order, on every rank, with the items computed over the
    group's ranks: in rounds of one item per rank, each round's results gathered exactly (:func:`gather`).
    ``compute(i)``: a list of tensors (without grad). For sums that must equal one process's bit for bit (a
    gradient over chunks of examples): the caller adds the items as they come, in the one-process order, and
    no sum crosses ranks; a round holds one item per rank, so memory holds a round at a time (with the
    gather's buffers, about twice ``world`` items). Every rank must consume the whole generator (each
    round is a collective). ``device``: where the gathered tensors land (default: their own device).
    Alone: compute(i) item by item."""
    group = check_group(group)
    world = 1 if group is None else dist.get_world_size(group)
    for start in range(0, n, world):
        count = min(world, n - start)
        mine: dict[int, list] = {}
        with step(group, what):
            for j in shard(range(count), group):
                mine[j] = list(compute(start + j))
        for j, tensors in _ungather(mine, count, group, what, device):
            yield start + j, tensors


def _ungather(mine: dict[int, list], count: int, group, what: str, device):
    """(index, list of tensors) of a round's ``count`` items, gathered from the ranks that computed them."""
    if group is None:
        for j in range(count):
            yield j, mine[j]
        return
    sizes = exchange({j: len(v) for j, v in mine.items()}, None, group, what)
    length = {j: n for s in sizes for j, n in s.items()}
    if sorted(length) != list(range(count)):
        raise DistributedError(f"{what}: the ranks' shares do not make the round's {count} items once each")
    offsets = [sum(length[k] for k in range(j)) for j in range(count + 1)]
    flat = {offsets[j] + t: x for j, v in mine.items() for t, x in enumerate(v)}
    got = gather(flat, offsets[-1], group, device, what)
    for j in range(count):
        yield j, [got[k] for k in range(offsets[j], offsets[j + 1])]
