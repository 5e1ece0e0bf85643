"""Where and in what precision a model runs: the one device resolver and the one dtype parser.

The scripts' ``--device`` and ``--dtype`` (train.py, circuits.py, ``python -m tpp``), the trainer
and the batched engine all call these, so that "cuda", "auto", "bf16" and "bfloat16" mean the
same everywhere.

Precision names: "fp32" and "bf16" are the canonical spellings (:data:`DTYPE_NAMES`); torch's
"float32" and "bfloat16" are accepted alike. bf16 here means bf16 matmuls with fp32 accumulation
under autocast, the residual stream and metrics staying fp32 (minigpt2.engine).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}  # the canonical spelling of each precision
AUTO = "auto"  # bf16 on a CUDA device that has it, else fp32 (dtype); cuda, else mps, else cpu (device)


def parse_dtype(value, device=None) -> torch.dtype | None:
    """The precision asked for: None (the model's own), torch.float32 or torch.bfloat16.

    ``value``: None, torch.float32 / torch.bfloat16, a name ("fp32" or "float32", "bf16" or
    "bfloat16", any case), or "auto": bf16 on a CUDA ``device`` that supports it, else None.
    Anything else is a ValueError naming the choices.
    """
    if value is None or isinstance(value, torch.dtype) and value in DTYPE_NAMES:
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in DTYPES:
            return DTYPES[key]
        if key == AUTO:
            on_cuda = device is not None and torch.device(device).type == "cuda"
            return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"dtype {value!r} is not supported: use torch.float32 (fp32, float32) or torch.bfloat16 "
                     "(bf16, bfloat16: bf16 matmuls, fp32 residual stream and metrics), or 'auto'")


def autocast_dtype(value, device=None) -> torch.dtype | None:
    """:func:`parse_dtype`, with fp32 as None: the dtype to autocast to, or None for plain fp32."""
    dtype = parse_dtype(value, device)
    return None if dtype == torch.float32 else dtype


def dtype_name(dtype) -> str:
    """The canonical name of a precision: "fp32" (also for None, the model's own fp32) or "bf16"."""
    dtype = parse_dtype(dtype)
    return "fp32" if dtype is None else DTYPE_NAMES[dtype]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name=None, unset: str = "(or leave the device out: cuda if available, else cpu)") -> torch.device:
    """The torch device to run on, checked against this machine.

    ``name``: None (cuda if this machine has it, else cpu: TransformerLens's choice), "auto" (cuda,
    else mps, else cpu), or a device ("cpu", "cuda", "cuda:1", "mps", a torch.device). Refused with
    a ValueError saying what to pass: a string that is no torch device, a kind other than cpu / cuda
    / mps, cuda on a machine without CUDA (or an index past its GPUs), mps without MPS. ``unset``:
    how the caller gets the default, appended where that is the way out (a CLI says its flag).
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, str) and name.strip().lower() == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    text = name.strip() if isinstance(name, str) else name
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name!r} is not a torch device; pass cpu, cuda or cuda:N {unset}") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{device}: this machine has no CUDA device; pass cpu {unset}")
        if device.index is not None and device.index >= n:
            raise ValueError(f"{device}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); pass one of them")
    elif device.type == "mps":
        if not _mps_available():
            raise ValueError(f"{device}: this machine has no MPS device; pass cpu")
    elif device.type != "cpu":
        raise ValueError(f"{device}: a {device.type} device cannot run the model here; pass cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------- will bf16 pay? (issue 27)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # /proc/cpuinfo's x86 flags (AMX, AVX-512 BF16); aarch64's bf16
# Below this d_model a bf16 matmul is no faster than fp32 on a CPU: measured on an AMD EPYC with avx512_bf16 (no
# AMX), torch 2.13, one thread, F.linear [64 rows, d] x [d, 4d] (BENCHMARKS.md, "bf16 on this CPU (issue 27)"):
# 0.25x at d 16, 0.46x at 32, 0.76x at 48, 1.0x at 64, 1.35x at 96, 1.4-2.4x at 144.
BF16_MIN_D_MODEL = 64


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's feature flags, read from ``cpuinfo`` (the text of /proc/cpuinfo; default: that file), or None
    where they cannot be read (no /proc/cpuinfo: macOS, Windows). x86's "flags" and aarch64's "Features" lines."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags) if flags else None


def _cpu_name(cpuinfo: str | None) -> str:
    text = cpuinfo
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return "this CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name" and value.strip():
            return f"this CPU ({value.strip()})"
    return "this CPU"


def _d_model(model) -> int:
    """d_model of a model (a GPT2), a config (GPT2Config) or a width."""
    if isinstance(model, int):
        return model
    cfg = getattr(model, "cfg", model)
    d = getattr(cfg, "d_model", None)
    if not isinstance(d, int):
        raise TypeError(f"bf16_outlook: pass a model, its config or its d_model, got {type(model).__name__}")
    return d


def bf16_outlook(model, device=None, *, metric_step: float = 0.0, cpuinfo: str | None = None,
                 cuda_bf16: bool | None = None) -> str | None:
    """Why bf16 cannot be faster than fp32 for ``model`` on ``device``, or None where it can: what a command
    taking ``--dtype bf16`` prints before any work (advice: the run goes on, and its results stay exact).

    ``model``: a GPT2, its config or its d_model. ``device``: where it runs (default: the model's, else the
    CPU). The reasons: a CPU without bf16 units (neither amx_bf16 nor avx512_bf16 in ``cpuinfo``, default
    /proc/cpuinfo; an unreadable one says nothing), where torch emulates bf16 matmuls; a GPU without bf16
    (``cuda_bf16``, default torch.cuda.is_bf16_supported()); on a CPU, a d_model below
    :data:`BF16_MIN_D_MODEL`; a right-or-wrong metric (``metric_step`` > 0, accuracy), whose bf16 error
    margin is at least a few examples, so that most decisions of a search are re-checked in fp32.
    """
    device = torch.device(device if device is not None else getattr(model, "device", "cpu"))
    d_model, reasons = _d_model(model), []
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if not supported:
            reasons.append(f"this GPU has no bf16 arithmetic (torch.cuda.is_bf16_supported() is False), so bf16 "
                           "is emulated and slower than fp32")
    elif device.type == "cpu":
        flags = cpu_flags(cpuinfo)
        if flags is not None and not flags.intersection(BF16_CPU_FLAGS):
            reasons.append(f"{_cpu_name(cpuinfo)} has neither amx_bf16 nor avx512_bf16, so torch emulates bf16 "
                           "matmuls: about 6x slower than fp32 on an AVX2 CPU (BENCHMARKS.md)")
        if d_model < BF16_MIN_D_MODEL:
            reasons.append(f"the model is too small: at d_model {d_model} (below {BF16_MIN_D_MODEL}) a bf16 matmul "
                           "is no faster than fp32 on a CPU, and bf16 adds casts")
    if metric_step > 0:
        reasons.append("a right-or-wrong metric (accuracy) moves in whole examples, so bf16's error margin covers "
                       "most of a search's decisions and they are re-checked in fp32: bf16 then costs more than "
                       "fp32; use a smooth metric (logit_diff, loss, kl)")
    if not reasons:
        return None
    return "bf16 will not be faster than fp32 here: " + "; ".join(reasons) + ". Results stay exact; --dtype fp32 " \
           "is the faster choice."
