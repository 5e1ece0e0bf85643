"""``transformer_lens.evals`` renamed, the evals that run offline: ``sanity_check``, ``induction_loss``,
``evaluate_on_dataset``, ``IOIDataset`` and ``ioi_eval``, with TransformerLens's semantics and numbers
(the same random tokens under the same ``torch.manual_seed``). The dataset loaders (wiki, owt, pile,
code, mmlu) download their data and are not here. Where TransformerLens defaults to ``device="cuda"``,
the default here is the model's device.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .utils import lm_cross_entropy_loss


def sanity_check(model) -> torch.Tensor:
    """The loss on the first paragraph of Circuits: Zoom In (< 5: probably fine; > 7: something is wrong)."""
    text = ("Many important transition points in the history of science have been moments when science 'zoomed in.' "
            "At these points, we develop a visualization or tool that allows us to see the world in a new level of "
            "detail, and a new field of science develops to study the world through this lens.")
    return model(text, return_type="loss")


def evaluate_on_dataset(model, data_loader, truncate: int = 100, device=None) -> float:
    """The mean loss over the batches (dicts with "tokens") of ``data_loader``, up to ``truncate`` + 1 of them."""
    device = model.cfg.device if device is None else device
    running_loss, total = 0.0, 0
    for batch in data_loader:
        running_loss += model(batch["tokens"].to(device), return_type="loss").mean().item()
        total += 1
        if total > truncate:
            break
    return running_loss / total


@torch.inference_mode()
def induction_loss(model, tokenizer=None, batch_size: int = 4, subseq_len: int = 384, prepend_bos=None,
                   device=None) -> torch.Tensor:
    """The loss on the second half of random tokens (ids 100 to 19999) repeated twice: low when the model has
    induction heads. The first token is BOS unless ``prepend_bos`` (default cfg.default_prepend_bos) is False."""
    device = model.cfg.device if device is None else device
    first_half = torch.randint(100, 20000, (batch_size, subseq_len)).to(device)
    repeated = first_half.repeat(1, 2)  # [batch, 2 * subseq_len]
    if model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos:
        repeated[:, 0] = (model.tokenizer if tokenizer is None else tokenizer).bos_token_id
    logits = model(repeated, return_type="logits")
    correct_log_probs = lm_cross_entropy_loss(logits, repeated, per_token=True)
    return correct_log_probs[:, subseq_len + 1:].mean()


class IOIDataset(Dataset):
    """Indirect object identification prompts (Wang et al., 2022), TransformerLens's: each item a dict of
    "prompt" (ids, BOS first unless ``prepend_bos=False``), "IO" and "S" (the answer's and the subject's ids).
    ``seed`` seeds Python's ``random`` (as TransformerLens does), so the same seed gives the same samples."""

    def __init__(self, tokenizer, templates: Optional[List[str]] = None, names: Optional[List[str]] = None,
                 nouns: Optional[Dict[str, List[str]]] = None, num_samples: int = 1000, symmetric: bool = False,
                 prepend_bos: bool = True, seed: Optional[int] = None):
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        if seed is not None:
            random.seed(seed)
        self.templates = templates if templates is not None else self.get_default_templates()
        self.names = names if names is not None else self.get_default_names()
        self.nouns = nouns if nouns is not None else self.get_default_nouns()
        self.samples: List[Dict[str, str]] = []
        for _ in range(num_samples // 2 if symmetric else num_samples):
            self.samples.extend(self.get_sample(symmetric=symmetric))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.samples[idx]
        prompt = self.tokenizer.encode(sample["text"])
        if self.prepend_bos:
            prompt = [self.tokenizer.bos_token_id] + prompt
        return {"prompt": torch.LongTensor(prompt), "IO": torch.LongTensor(self.tokenizer.encode(sample["IO"])),
                "S": torch.LongTensor(self.tokenizer.encode(sample["S"]))}

    def get_sample(self, symmetric: bool = False) -> List[Dict[str, str]]:
        template: str = random.choice(self.templates)
        for noun_type, noun_list in self.nouns.items():
            template = template.replace(f"[{noun_type}]", random.choice(noun_list))
        names = random.sample(self.names, 2)
        text = template.replace("[A]", names[0]).replace("[B]", names[1])
        samples = [{"text": text, "IO": " " + names[0], "S": " " + names[1]}]
        if symmetric:
            text = template.replace("[A]", names[1]).replace("[B]", names[0])
            samples.append({"text": text, "IO": " " + names[1], "S": " " + names[0]})
        return samples

    @staticmethod
    def get_default_names() -> List[str]:
        return ["John", "Mary"]

    @staticmethod
    def get_default_templates() -> List[str]:
        return ["[A] and [B] went to the [LOCATION] to buy [OBJECT]. [B] handed the [OBJECT] to [A]",
                "Then, [B] and [A] went to the [LOCATION]. [B] gave the [OBJECT] to [A]"]

    @staticmethod
    def get_default_nouns() -> Dict[str, List[str]]:
        return {"LOCATION": ["store", "market"], "OBJECT": ["milk", "eggs", "bread"]}


def _collate(samples):
    prompts = [sample["prompt"] for sample in samples]
    return {"prompt": torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True),  # right-padded with id 0
            "IO": [sample["IO"] for sample in samples], "S": [sample["S"] for sample in samples],
            "prompt_length": [p.shape[0] for p in prompts]}


@torch.inference_mode()
def ioi_eval(model, dataset=None, batch_size: int = 8, num_samples: int = 1000, tokenizer=None,
             symmetric: bool = False) -> Dict[str, float]:
    """{"Logit Difference": mean logit(IO) - logit(S) at the first token where they differ, "Accuracy": the
    share where it is positive}, over ``dataset`` (default: a fresh IOIDataset of ``num_samples``)."""
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    dataset = IOIDataset(tokenizer, num_samples=num_samples, symmetric=symmetric) if dataset is None else dataset
    total_correct, total_logit_diff = 0, 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=_collate):
        batch_logits = model(batch["prompt"], return_type="logits")
        for i in range(batch_logits.shape[0]):
            io, s = batch["IO"][i], batch["S"][i]
            prefix_length = batch["prompt_length"][i] - io.shape[0]
            n = min(io.shape[0], s.shape[0])
            start = torch.where(io[:n] != s[:n])[0][0]  # the first token where the names differ
            logits = batch_logits[i, prefix_length + start - 1]
            logit_diff = logits[io[start]] - logits[s[start]]
            total_correct += (logit_diff > 0).item()
            total_logit_diff += logit_diff.item()
    return {"Logit Difference": total_logit_diff / len(dataset), "Accuracy": total_correct / len(dataset)}


__all__ = ["IOIDataset", "evaluate_on_dataset", "induction_loss", "ioi_eval", "sanity_check"]
