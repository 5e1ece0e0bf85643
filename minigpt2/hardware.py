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
