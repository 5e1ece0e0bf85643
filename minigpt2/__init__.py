"""minigpt2: a from-scratch GPT-2 for mechanistic interpretability.

    from minigpt2 import GPT2, GPT2Config, load_pretrained, get_tokenizer
    model = load_pretrained("weights/base")
    logits, cache = model.run_with_cache(tokens, names=["blocks.0.attn.hook_pattern"])
"""

from . import patching, utils
from .cache import ActivationCache
from .config import PRESETS, ConfigError, GPT2Config
from .hooks import HookPoint
from .model import GPT2, KVCache
from .factored import FactoredMatrix
from .tokenizer import get_tokenizer
from .weights import CheckpointError, load_pretrained, save_pretrained

__all__ = ["ActivationCache", "CheckpointError", "ConfigError", "FactoredMatrix", "GPT2", "GPT2Config", "HookPoint", "KVCache", "PRESETS", "get_tokenizer", "load_pretrained", "save_pretrained"]
