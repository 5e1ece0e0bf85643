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

import numpy as np
import torch

from clikit import Range
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
            raise ValueError("the training data is empty: raise the fraction or use a larger corpus")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, rows) -> "TrainData":
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        return TrainData(self.input_ids[rows], self.labels[rows], mask, dict(self.info))

    def n_targets(self, rows) -> int:
        """How many labelled next-token predictions ``rows`` hold (the loss's denominator)."""
        return int((self.labels[rows, 1:] != IGNORE).sum())

    def check_fits(self, cfg, name: str) -> None:
        """Refuse a model (config ``cfg``, called ``name``) that cannot take these rows: a token id
        beyond its vocabulary, or rows longer than its n_ctx; the message names the model and why."""
        top, length = int(self.input_ids.max()), self.input_ids.shape[1]
        what = f"the training rows ({self.info.get('source', 'data')})"
        if cfg.vocab_size <= top:
            raise ValueError(f"{name} cannot read {what}: its vocabulary has {cfg.vocab_size} tokens, the data holds "
                             f"GPT-2 token ids up to {top}. Fix: use a model with GPT-2's vocabulary (vocab_size 50257)")
        if cfg.n_ctx < length:
            raise ValueError(f"{name} cannot read {what}: its n_ctx is {cfg.n_ctx}, the rows are up to {length} "
                             f"tokens long. Fix: use a model with n_ctx >= {length}")

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
    Range(0, 1, lo_open=True).check("fraction", fraction, why=f"the share of the {what} kept")
    if n < 1:
        raise ValueError(f"there are no {what} to take a fraction of")
    k = round(fraction * n)
    if k < 1:
        raise ValueError(f"fraction={fraction} of {n} {what} keeps none. Fix: a larger fraction")
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
def corpus_tokens(corpus: str, repeat: int = 1, shuffle_seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """A whole corpus as one stream of GPT-2 token ids, documents ended by <|endoftext|>; and its sources.

    corpus: a spec of finetune.corpora: "wordnet", "gcide", a UTF-8 .txt path, or several
    joined by "+" (their documents are then shuffled together with ``shuffle_seed``, so a
    held-out tail samples every source).
    repeat: each document is written this many times in a row. (Measured here: 1,347
    steps of 16 x 128 tokens (2.8 M) on WordNet with repeat=2 gave a 12 x 12, d_model 96
    model only a slight gain on a document's second copy (6.9 vs 7.3 nats) and no
    induction heads; repeated spans inside a block, ``pretrain_data(copy_spans=...)``,
    are the direct signal.)
    """
    from .corpora import sources

    Range(1, whole=True).check("repeat", repeat, why="how many times each document is read")
    parts = sources(corpus)
    docs = [doc for _, ds, _ in parts for doc in ds]
    if len(parts) > 1:
        docs = [docs[i] for i in np.random.default_rng(shuffle_seed).permutation(len(docs))]
    docs = [" ".join([doc] * repeat) for doc in docs]
    ids = get_tokenizer().encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    stream = np.fromiter((t for doc in ids for t in (*doc, EOT_TOKEN)), dtype=np.int64)
    return stream, [info for _, _, info in parts]


def frequent_tokens(blocks: np.ndarray, n: int, vocab_size: int = EOT_TOKEN) -> np.ndarray:
    """The ``n`` most frequent token ids of ``blocks`` below ``vocab_size`` (so never
    <|endoftext|>), most frequent first; ties by id."""
    counts = np.bincount(np.asarray(blocks).ravel(), minlength=vocab_size + 1)[:vocab_size]
    return np.argsort(-counts, kind="stable")[:n]


def add_repeats(blocks: np.ndarray, copy_spans: float, random_repeats: float, seed: int,
                vocab_size: int = EOT_TOKEN, repeat_vocab: int = 0, repeat_length: int = 0,
                recall: float = 0.0) -> dict:
    """Make some blocks predictable only by copying from context (in place); returns what was done.

    A ``copy_spans`` fraction of the blocks gets one span of its own text (8 to T/3 tokens)
    copied to a later place in the block; a ``random_repeats`` fraction is replaced by a
    sequence of uniformly random tokens (8 to T/2 of them, never <|endoftext|>) repeated to
    fill the block: the setting of the induction score. The standard recipe for induction heads.
    ``repeat_vocab`` N > 0 draws the random tokens from the N most frequent tokens of ``blocks``
    instead of the whole vocabulary, so that their embeddings are trained by the text as well.
    ``repeat_length`` L > 0 makes the random sequences 8 to L tokens long instead of 8 to T/2:
    shorter sequences repeat more often per block, a denser signal that forms induction heads sooner.

    A ``recall`` fraction holds associative recall: 4 to L/2 pairs of distinct random tokens
    (key, value), listed, then listed again in a new random order, round after round. A value
    follows from its key's earlier pair, while the token before the key changes every round:
    copying needs exactly the previous token at the value (a previous-token head), where a
    repeated sequence is also served by a smear over the last few tokens.
    """
    for name, v in (("copy_spans", copy_spans), ("random_repeats", random_repeats), ("recall", recall)):
        Range(0, 1).check(name, v, why="a fraction of the blocks")
    if copy_spans + random_repeats + recall > 1:
        raise ValueError(f"copy_spans={copy_spans} + random_repeats={random_repeats} + recall={recall} exceed 1: "
                         "they are fractions of the same blocks")
    Range(0, vocab_size, whole=True).check("repeat_vocab", repeat_vocab, why="0: the whole vocabulary")
    N, T = blocks.shape
    if Range(0, 0, whole=True).problem(repeat_length) is not None:  # not 0 (up to half a block)
        Range(8, T // 2, whole=True).check("repeat_length", repeat_length, why=f"or 0, up to half a block: half of "
                                           f"the block_size {T}, so that each sequence repeats")
    longest = repeat_length or max(8, T // 2)
    pool = frequent_tokens(blocks, repeat_vocab, vocab_size) if repeat_vocab else None
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    kind = rng.random(N)
    copied = np.nonzero(kind < copy_spans)[0]
    for i in copied:
        L = int(rng.integers(8, max(9, T // 3 + 1)))
        s = int(rng.integers(0, T - 2 * L + 1))
        d = int(rng.integers(s + L, T - L + 1))
        blocks[i, d:d + L] = blocks[i, s:s + L]
    randoms = np.nonzero((kind >= copy_spans) & (kind < copy_spans + random_repeats))[0]
    for i in randoms:
        n = int(rng.integers(8, longest + 1))
        seq = rng.integers(0, vocab_size, n) if pool is None else pool[rng.integers(0, len(pool), n)]
        blocks[i] = np.resize(seq, T)
    recalled = np.nonzero((kind >= copy_spans + random_repeats) & (kind < copy_spans + random_repeats + recall))[0]
    for i in recalled:
        blocks[i] = recall_block(rng, T, int(rng.integers(4, longest // 2 + 1)), vocab_size, pool)
    return {"copy_spans": copy_spans, "random_repeats": random_repeats, "repeat_vocab": int(repeat_vocab),
            **({"repeat_length": int(repeat_length)} if repeat_length else {}),
            "n_copy_span_blocks": len(copied),
            "n_random_repeat_blocks": len(randoms),
            **({"recall": recall, "n_recall_blocks": len(recalled)} if recall else {})}


def recall_block(rng: np.random.Generator, T: int, n_pairs: int, vocab_size: int = EOT_TOKEN,
                 pool: np.ndarray | None = None) -> np.ndarray:
    """[T] tokens: ``n_pairs`` (key, value) pairs of 2 * n_pairs distinct tokens, listed in a new
    random order each round until T tokens are written (the last round cut short)."""
    picks = rng.choice(vocab_size if pool is None else len(pool), size=2 * n_pairs, replace=False)
    pairs = (picks if pool is None else pool[picks]).reshape(n_pairs, 2)
    rounds = -(-T // (2 * n_pairs))
    return np.concatenate([pairs[rng.permutation(n_pairs)].ravel() for _ in range(rounds)])[:T]


def pretrain_data(corpus: str, block_size: int, fraction: float = 1.0, eval_blocks: int = 64, repeat: int = 1,
                  copy_spans: float = 0.0, random_repeats: float = 0.0, seed: int = 0, repeat_vocab: int = 0,
                  repeat_length: int = 0, recall: float = 0.0) -> tuple[TrainData, torch.Tensor]:
    """Training blocks and held-out blocks [eval_blocks, block_size] (the corpus's last ones).

    The stream is cut into consecutive non-overlapping blocks; the tail that does
    not fill a block is dropped. ``fraction`` keeps the first part of the training blocks;
    ``copy_spans`` / ``random_repeats`` / ``recall`` (see ``add_repeats``) change training blocks only, so
    the held-out loss is measured on plain text the model never saw.
    """
    Range(1, whole=True).check("block_size", block_size, why="tokens per block")
    Range(1, whole=True).check("eval_blocks", eval_blocks, why="held-out blocks")
    stream, source_info = corpus_tokens(corpus, repeat, shuffle_seed=seed)
    n_blocks = len(stream) // block_size
    if n_blocks < eval_blocks + 1:
        raise ValueError(f"corpus {corpus!r} has {len(stream)} tokens, {n_blocks} blocks of {block_size}: too few "
                         f"for {eval_blocks} held-out blocks plus training. Lower block_size or eval_blocks")
    blocks = stream[:n_blocks * block_size].reshape(n_blocks, block_size)
    train, held_out = blocks[:n_blocks - eval_blocks], blocks[n_blocks - eval_blocks:]
    train = train[:take_fraction(len(train), fraction, "blocks")].copy()
    info = {"source": corpus, "sources": source_info, "repeat_docs": repeat, "corpus_tokens": int(len(stream)),
            "block_size": block_size, "n_blocks": len(train), "eval_blocks": eval_blocks}
    if copy_spans or random_repeats or recall:
        info["repeats"] = add_repeats(train, copy_spans, random_repeats, seed, repeat_vocab=repeat_vocab,
                                       repeat_length=repeat_length, recall=recall)
    train = torch.from_numpy(train)
    return TrainData(train.clone(), train.clone(), None, info=info), torch.from_numpy(held_out.copy())
