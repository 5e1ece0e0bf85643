"""The paper's three finetuning runs (section 4): GPT-2 small, AdamW, lr 5e-5, batch 64,
on the first 10 %, 30 % or 50 % of the 158,000-example master dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import default


@dataclass(frozen=True)
class Preset:
    fraction: float  # of the master dataset
    epochs: int
    lr: float = default("lr")  # TrainConfig's (5e-5)
    batch_size: int = default("batch_size")  # TrainConfig's (64)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "featherweight": Preset(fraction=0.10, epochs=3),  # 15,800 examples
    "lightweight": Preset(fraction=0.30, epochs=3),  # 47,400 examples
    "welterweight": Preset(fraction=0.50, epochs=20),  # 79,000 examples
}
