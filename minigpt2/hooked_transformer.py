"""``from minigpt2 import HookedTransformer``: TransformerLens's model class, for GPT-2.

``transformer_lens.HookedTransformer`` -> ``minigpt2.HookedTransformer`` is a word-for-word rename:
``HookedTransformer(HookedTransformerConfig(n_layers=..., d_model=..., ...))`` builds a model with
TransformerLens's hook names, switches (``set_use_attn_result`` ...), model API (``to_tokens``,
``run_with_cache``, ``W_Q`` ...) and numbers.
"""

from __future__ import annotations

from .model import GPT2


class HookedTransformer(GPT2):
    """A GPT-2 under TransformerLens's name: everything :class:`minigpt2.GPT2` is (a model loaded with
    ``load_pretrained`` is a GPT2 and behaves the same), built from a :class:`GPT2Config` or from
    ``HookedTransformerConfig(...)`` (TransformerLens's field names)."""

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """TransformerLens's layout (embed.W_E, blocks.0.attn.W_Q, ...), as HookedTransformer's, so that
        ``other.load_state_dict(model.state_dict())`` works as in TransformerLens (ARENA's idiom);
        ``GPT2.state_dict(model)`` is minigpt2's own (Hugging Face's names, as saved)."""
        return self.tl_state_dict(destination, prefix, keep_vars)


__all__ = ["HookedTransformer"]
