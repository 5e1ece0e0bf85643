"""Training data as three tensors, and the order in which training visits it.

A ``TrainData`` holds N rows of ``input_ids`` / ``labels`` [N, T] in Hugging Face's
label convention (row i's loss is CE(logits[i, :-1], labels[i, 1:]), -100 ignored)
and an optional ``attention_mask`` [N, T]. Two sources make one:

* ``finetune_data``: the first ``fraction`` of the TPP master dataset, encoded by
  ``tpp.encode_for_training`` (the paper's featherweight / lightweight /
  welterweight sets are its first 10 %, 30 % and 50 %);
* ``pretrain_data``: a text corpus (WordNet's glosses and example sentences, or a
  text file) tokenized with GPT-2's BPE, documents joined by <|endoftext|> and
  packed into blocks of ``block_size`` tokens.

``batch_order`` gives the examples of each optimizer step: a permutation fixed by
(seed, epoch), so a resumed run needs only the step number to continue.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minigpt2.tokenizer import EOT_TOKEN, get_tokenizer

IGNORE = -100  # label of a position without loss (Hugging Face / torch CE convention)


@dataclass
class TrainData:
    input_ids: torch.Tensor  # [N, T] int64
    labels: torch.Tensor  # [N, T] int64, IGNORE where no loss
    attention_mask: torch.Tensor | None = None  # [N, T], 1 = real token; None: no padding
    info: dict = field(default_factory=dict)  # what the rows are: source, sizes, ... (goes to metadata)

    def __post_init__(self):
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 2:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)} "
                             "must be the same [N, T] shape")
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} must match input_ids "
                             f"{tuple(self.input_ids.shape)}")
        if len(self) == 0:
            raise ValueError("the training data is empty: raise --fraction or use a larger corpus")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, rows) -> "TrainData":
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        return TrainData(self.input_ids[rows], self.labels[rows], mask, dict(self.info))

    def n_targets(self, rows) -> int:
        """How many labelled next-token predictions ``rows`` hold (the loss's denominator)."""
        return int((self.labels[rows, 1:] != IGNORE).sum())

    def sha256(self) -> str:
        """A digest of exactly what training sees: ids, labels, mask."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.attention_mask):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The row indices of every batch of one epoch: a permutation fixed by (seed, epoch).

    The last batch is smaller when batch_size does not divide n.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,)))
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def shard(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of a global batch: contiguous, sizes differing by at most one."""
    return np.array_split(rows, world)[rank]


def take_fraction(n: int, fraction: float, what: str = "examples") -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    k = round(fraction * n)
    if k < 1:
        raise ValueError(f"--fraction {fraction} of {n} {what} keeps none: raise --fraction")
    return k


# ---------------------------------------------------------------- finetuning: the TPP task
def finetune_data(fraction: float, label_style: str = "paper", master_size: int = 158_000,
                  data_seed: int = 0, space: str = "prompt") -> tuple[TrainData, list]:
    """The first ``fraction`` of the master dataset, encoded for training; also the master set
    itself (so evaluation sets can exclude every prompt any preset trains on)."""
    import tpp

    master = tpp.master_dataset(seed=data_seed, n=master_size)
    examples = master[:take_fraction(len(master), fraction)]
    enc = tpp.encode_for_training(examples, label_style=label_style, tokenizer=get_tokenizer(), space=space)
    as_long = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int64)  # noqa: E731
    data = TrainData(as_long(enc["input_ids"]), as_long(enc["labels"]), as_long(enc["attention_mask"]),
                     info={"source": "tpp.master_dataset", "master_size": len(master), "data_seed": data_seed,
                           "label_style": label_style, "space": space, "n_examples": len(examples)})
    return data, master


# ---------------------------------------------------------------- pretraining: packed text
def wordnet_documents() -> list[str]:
    """WordNet 3.0's glosses and example sentences, one document per synset, in nltk's order."""
    try:
        from nltk.corpus import wordnet as wn

        synsets = list(wn.all_synsets())
    except LookupError as e:
        raise FileNotFoundError(
            "WordNet was not found by nltk. Point NLTK_DATA at a folder holding corpora/wordnet "
            "(here: NLTK_DATA=/work/shared/nltk_data), or run python -m nltk.downloader wordnet; "
            "or train on a text file with --corpus path/to/file.txt"
        ) from e
    return [" ".join([s.definition().strip() + "."] + [x.strip() for x in s.examples()]) for s in synsets]


def corpus_tokens(corpus: str, repeat: int = 1) -> np.ndarray:
    """A whole corpus as one stream of GPT-2 token ids, documents ended by <|endoftext|>.

    corpus: "wordnet", or the path of a UTF-8 text file (read as one document).
    repeat: each document is written this many times in a row. A repeat is
    predictable only by copying from context, a direct training signal for
    induction (copying) heads. (Measured here: 1,347 steps of 16 x 128 tokens
    (2.8 M) on WordNet with repeat=2 gave a 12 x 12, d_model 96 model only a
    slight gain on a document's second copy (6.9 vs 7.3 nats) and no induction
    heads; they take a larger budget.)
    """
    if repeat < 1:
        raise ValueError(f"--repeat-docs must be at least 1, got {repeat}")
    enc = get_tokenizer()
    if corpus == "wordnet":
        docs = wordnet_documents()
    else:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"--corpus {corpus}: no such file; pass a UTF-8 text file or 'wordnet'")
        docs = [path.read_text(encoding="utf-8")]
    docs = [" ".join([doc] * repeat) for doc in docs]
    ids = enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    return np.fromiter((t for doc in ids for t in (*doc, EOT_TOKEN)), dtype=np.int64)


def pretrain_data(corpus: str, block_size: int, fraction: float = 1.0,
                  eval_blocks: int = 64, repeat: int = 1) -> tuple[TrainData, torch.Tensor]:
    """Training blocks and held-out blocks [eval_blocks, block_size] (the corpus's last ones).

    The stream is cut into consecutive non-overlapping blocks; the tail that does
    not fill a block is dropped. ``fraction`` keeps the first part of the training blocks.
    """
    stream = corpus_tokens(corpus, repeat)
    n_blocks = len(stream) // block_size
    if n_blocks < eval_blocks + 1:
        raise ValueError(f"corpus {corpus!r} has {len(stream)} tokens, {n_blocks} blocks of {block_size}: too few "
                         f"for {eval_blocks} held-out blocks plus training. Lower --block-size or --eval-size")
    blocks = torch.from_numpy(stream[:n_blocks * block_size].reshape(n_blocks, block_size))
    train, held_out = blocks[:n_blocks - eval_blocks], blocks[n_blocks - eval_blocks:]
    train = train[:take_fraction(len(train), fraction, "blocks")]
    data = TrainData(train.clone(), train.clone(), None,
                     info={"source": corpus, "repeat_docs": repeat, "corpus_tokens": int(len(stream)), "block_size": block_size,
                           "n_blocks": len(train), "eval_blocks": eval_blocks})
    return data, held_out.clone()
