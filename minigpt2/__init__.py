"""minigpt2: a from-scratch GPT-2 for mechanistic interpretability.

    from minigpt2 import GPT2, GPT2Config, load_pretrained, get_tokenizer
    model = load_pretrained("weights/base")
    logits, cache = model.run_with_cache(tokens, names=["blocks.0.attn.hook_pattern"])
"""

from .config import PRESETS, GPT2Config
from .hooks import HookPoint
from .model import GPT2, KVCache
from .tokenizer import get_tokenizer
from .weights import load_pretrained, save_pretrained

__all__ = ["GPT2", "GPT2Config", "HookPoint", "KVCache", "PRESETS", "get_tokenizer", "load_pretrained", "save_pretrained"]
