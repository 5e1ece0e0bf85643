"""Hugging Face GPT-2 checkpoints in and out: the one boundary foreign weights cross.

Two layouts are met in the wild and both load:
  * the hub's openai-community/gpt2 file: keys without prefix (``h.0.attn.c_attn.weight``),
    with ``attn.bias`` / ``attn.masked_bias`` causal-mask buffers, which are skipped;
  * what transformers' ``save_pretrained`` writes: keys under ``transformer.``, with
    ``lm_head.weight`` present or left out as tied to ``wte.weight``.

The Conv1D rule: GPT-2 stores the weights of c_attn, c_proj and c_fc as [in, out];
minigpt2 uses nn.Linear, [out, in], so these (and only these) are transposed.

Only safetensors are read: a pickle (.bin, .pt) can run code when loaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GPT2Config
from .model import GPT2

CONV1D = re.compile(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
SKIPPED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights


def hf_to_ours(key: str) -> str | None:
    """The key table: a Hugging Face GPT-2 key -> minigpt2's, or None for a skipped buffer."""
    key = key.removeprefix("transformer.")
    if SKIPPED.search(key) or key == "lm_head.weight":
        return None
    key = re.sub(r"^h\.(\d+)\.", r"blocks.\1.", key)
    return "ln_final." + key[len("ln_f."):] if key.startswith("ln_f.") else key


def ours_to_hf(key: str) -> str:
    key = re.sub(r"^blocks\.(\d+)\.", r"h.\1.", key)
    key = "ln_f." + key[len("ln_final."):] if key.startswith("ln_final.") else key
    return "transformer." + key


PICKLE_HINT = (
    "minigpt2 reads safetensors only: unpickling a checkpoint can run arbitrary code. "
    "Convert it once, where you trust the file: "
    "python -c \"import torch; from safetensors.torch import save_file; "
    "sd = torch.load('pytorch_model.bin', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\""
)


RESTORE_HINT = "Restore it (git checkout weights/ for the bundled models) or download it again."


def _check_safetensors(path: Path) -> None:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise ValueError(f"{path} looks like a PyTorch pickle. {PICKLE_HINT}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ValueError(f"{path} is a pickle (torch.save), not safetensors. {PICKLE_HINT}")
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{path} is not a safetensors file (truncated or corrupt). {RESTORE_HINT}")


def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """The safetensors file(s) of a checkpoint and its config.json, if any."""
    if path.is_file():
        config = path.with_name("config.json")
        return [path], config if config.exists() else None
    if not path.is_dir():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with model.safetensors and config.json, "
            "or a .safetensors file"
        )
    config = path / "config.json"
    config = config if config.exists() else None
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return files, config
    single = path / "model.safetensors"
    if single.exists():
        return [single], config
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise ValueError(f"{path} holds only {pickles}. {PICKLE_HINT}")
    raise FileNotFoundError(
        f"{path} has no model.safetensors (nor model.safetensors.index.json). For GPT-2 itself, place "
        "openai-community/gpt2's model.safetensors and config.json there; for the bundled models, "
        "restore them with git checkout weights/"
    )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path | None]:
    """All tensors of a checkpoint, under minigpt2's names and layout, plus its config path."""
    files, config = _weight_files(Path(path))
    ours: dict[str, torch.Tensor] = {}
    lm_head = None
    for file in files:
        _check_safetensors(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.removeprefix("transformer.") == "lm_head.weight" or key == "lm_head.weight":
                        lm_head = f.get_tensor(key)
                        continue
                    name = hf_to_ours(key)
                    if name is None:
                        continue
                    t = f.get_tensor(key)
                    ours[name] = t.T.contiguous() if CONV1D.search(name) else t
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt: {e}). {RESTORE_HINT}") from e
    if lm_head is not None and "wte.weight" in ours and not (
        lm_head.shape == ours["wte.weight"].shape and torch.equal(lm_head, ours["wte.weight"])
    ):
        raise ValueError(
            f"{path}: lm_head.weight differs from wte.weight; minigpt2's GPT-2 ties its unembedding to the "
            "token embedding, so an untied head cannot be loaded"
        )
    return ours, config


def infer_config(sd: dict[str, torch.Tensor], n_head: int | None = None) -> GPT2Config:
    """A config from tensor shapes. n_head is not visible in shapes: GPT-2 uses d_head = 64."""
    for key in ("wte.weight", "wpe.weight", "blocks.0.mlp.c_fc.weight"):
        if key not in sd:
            raise ValueError(f"cannot infer a config: tensor {ours_to_hf(key)} is missing")
    vocab, d_model = sd["wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if n_head is None:
        if d_model % 64:
            raise ValueError(f"cannot infer n_head for d_model={d_model}; pass n_head= or add a config.json")
        n_head = d_model // 64
    return GPT2Config(n_layer=n_layer, n_head=n_head, d_model=d_model, d_mlp=sd["blocks.0.mlp.c_fc.weight"].shape[0],
                      n_ctx=sd["wpe.weight"].shape[0], vocab_size=vocab)


def load_state_dict_strict(model: GPT2, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``sd`` into ``model``; every missing, unexpected or mis-shaped tensor is named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    problems = []
    if missing:
        problems.append(f"missing tensors: {[ours_to_hf(k) for k in missing[:8]]}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {[ours_to_hf(k) for k in unexpected[:8]]}")
    for k in sorted(set(own) & set(sd)):
        want = own[k].shape
        got = sd[k].shape
        if got != want:
            hf_got = tuple(got[::-1]) if CONV1D.search(k) else tuple(got)
            hf_want = tuple(want[::-1]) if CONV1D.search(k) else tuple(want)
            problems.append(f"{ours_to_hf(k)} has shape {hf_got} in the file, the config needs {hf_want}")
    if problems:
        raise ValueError(f"{source} does not match the model config ({model.cfg}):\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None,
                    n_head: int | None = None) -> GPT2:
    """Load a GPT-2 from a Hugging Face directory or a single .safetensors file.

    The config comes from config.json beside the weights when there is one, else it
    is inferred from the tensor shapes (``n_head`` then defaults to d_model / 64).
    ``dtype`` defaults to float32, whatever the file stores.
    """
    sd, config_path = read_state_dict(path)
    cfg = GPT2Config.from_json(config_path) if config_path else infer_config(sd, n_head)
    with torch.device("meta"):  # no random init of weights that the checkpoint overwrites
        model = GPT2(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, source=str(path))
    model = model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: GPT2, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write model.safetensors + config.json that transformers' GPT2LMHeadModel loads as they are.

    Keys are written as transformers writes them (``transformer.`` prefix, Conv1D
    layout, lm_head left out as tied). Each file is written to a temporary name
    and renamed, so a crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", dtype=dtype or v.dtype)
        tensors[ours_to_hf(k)] = (v.T if CONV1D.search(k) else v).contiguous()
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = json.dumps(model.cfg.to_hf_dict(), indent=2) + "\n"
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(config))
