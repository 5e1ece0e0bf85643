"""minigpt2: a from-scratch GPT-2 for mechanistic interpretability.

    from minigpt2 import GPT2, GPT2Config, load_pretrained, get_tokenizer
    model = load_pretrained("weights/base")
    tokens = model.to_tokens("if all kings are rulers and rulers are tyrants then all kings are")
    logits, cache = model.run_with_cache(tokens, names=["blocks.0.attn.hook_pattern"])
"""

from . import threads as _threads

_threads.set_wait_policy()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads (minigpt2/threads.py)

from . import patching, utils  # noqa: E402  (the imports after the policy load torch)
from .cache import ActivationCache
from .config import PRESETS, ConfigError, GPT2Config, HookedTransformerConfig
from .hooks import HookError, HookPoint
from .model import GPT2, KVCache
from .factored import FactoredMatrix
# TransformerLens's names: `transformer_lens` -> `minigpt2` word for word (README, "TransformerLens notebooks")
from . import evals, head_detector, hook_points  # noqa: E402
from .hook_points import HookedRootModule
from .hooked_transformer import HookedTransformer
from .model_bridge import TransformerBridge  # TransformerLens 4's (`from transformer_lens import TransformerBridge`)
from .tokenizer import get_tokenizer
from .weights import CheckpointError, save_pretrained

load_pretrained = GPT2.load_pretrained  # weights.py builds the class it is called on; it never imports the model

_threads.limit_threads()  # no more threads than a container's CPU quota allows

__all__ = ["ActivationCache", "CheckpointError", "ConfigError", "FactoredMatrix", "GPT2", "GPT2Config", "HookPoint", "KVCache", "PRESETS", "get_tokenizer", "load_pretrained", "save_pretrained",
           "HookError", "HookedRootModule", "HookedTransformer", "HookedTransformerConfig", "evals", "head_detector",
           "hook_points", "patching", "utils"]
