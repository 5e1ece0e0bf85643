"""The forgetting probe (the paper's section 6.1): greedy continuations of the same
prompts by several models, side by side."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from minigpt2 import GPT2, get_tokenizer
from minigpt2.tokenizer import EOT_TOKEN

DEFAULT_PROMPT = "if all men are humans and humans are alive then all men are"


@dataclass
class Continuation:
    model: str
    prompt: str
    continuation: str  # the generated text only
    tokens: list[int]  # the generated ids
    stopped: bool  # True if the model emitted <|endoftext|> (the paper's "chose to end the sequence")

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def continuations(models: dict[str, GPT2], prompts: list[str], max_new_tokens: int = 16) -> list[Continuation]:
    """Greedy continuation of every prompt by every model (stopping at <|endoftext|>)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [p for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty prompt to continue")
    enc = get_tokenizer()
    out = []
    for prompt in prompts:
        ids = enc.encode_ordinary(prompt)
        for name, model in models.items():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens)[0, len(ids):].tolist()
            stopped = EOT_TOKEN in tokens
            new = tokens[:tokens.index(EOT_TOKEN)] if stopped else tokens
            out.append(Continuation(name, prompt, enc.decode(new), new, stopped))
    return out
