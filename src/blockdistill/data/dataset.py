"""A corpus held in memory: train / held-out rows packed at once, the batches of a
shuffled, resumable `Batcher`, and the fixed evaluation batches. Simple, for small
corpora and notebooks; the token store and its Grain pipeline serve corpora of any size
with the same rows.

Everything here is host-side numpy and the standard library: the training loop turns the
`(tokens, mask)` batches into device arrays itself.
"""

import dataclasses
import os
from typing import Any

import numpy as np
from jaxtyping import Bool, Int

from .corpus import default_corpus, read_corpus, split_documents
from .packing import Split, _check_seq_len, pack_documents
from .tokenizers import Tokenizer

# --------------------------------------------------------------------------- batching


class Batcher:
    """An endless, deterministic, resumable stream of shuffled training batches.

    Every epoch visits the sequences in a fresh order, a permutation drawn from
    `np.random.default_rng([seed, epoch])`; an epoch has `len(tokens) // batch_size`
    batches (the few sequences left over differ from epoch to epoch). Epochs follow each
    other forever. The position in the stream is [`blockdistill.Batcher.state_dict`][],
    a small JSON-able dict: a batcher restored from it yields exactly the batches an
    uninterrupted one would have yielded.

    **Arguments:**

    - `tokens`: `int [n, seq_len]` sequences, e.g. `dataset.train.tokens`.
    - `mask`: `bool [n, seq_len]` validity mask.
    - `segment_ids`: `int [n, seq_len]` document ids of packed rows (see
      [`blockdistill.pack_tokens`][]); `None`: each row is one document (its valid
      positions segment 1, padding 0).
    - `batch_size`: rows per batch, at most `n` (keyword).
    - `seed`: a non-negative integer that selects the permutations.

    Each batch is a [`blockdistill.Split`][] `(tokens, mask, segment_ids)`.

    **Example:**

    ```python
    batcher = bd.Batcher(*dataset.train, batch_size=16, seed=0)
    tokens, mask, segment_ids = next(batcher)   # [16, seq_len] each
    state = batcher.state_dict()                # {"epoch": 0, "index": 1, "seed": 0}
    resumed = bd.Batcher(*dataset.train, batch_size=16)
    resumed.load_state_dict(state)              # continues with the same next batch
    ```
    """

    def __init__(
        self,
        tokens: Int[np.ndarray, "n seq"],
        mask: Bool[np.ndarray, "n seq"],
        segment_ids: Int[np.ndarray, "n seq"] | None = None,
        *,
        batch_size: int,
        seed: int = 0,
    ):
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(
                f"tokens {tokens.shape} and mask {mask.shape} must be [n, seq_len] "
                "arrays of the same shape"
            )
        segment_ids = _segments_or_default(segment_ids, mask)
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} is invalid: must be positive")
        if batch_size > tokens.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset "
                f"({tokens.shape[0]} sequences)"
            )
        if seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: must be non-negative")
        self.tokens = tokens
        self.mask = mask
        self.segment_ids = segment_ids
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.zeros((0,), dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch: `len(tokens) // batch_size`."""
        return self.tokens.shape[0] // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.tokens.shape[0])
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> "Batcher":
        return self

    def __next__(self) -> "Split":
        order = self._permutation(self.epoch)
        start = self.index * self.batch_size
        rows = order[start : start + self.batch_size]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        return Split(self.tokens[rows], self.mask[rows], self.segment_ids[rows])

    def state_dict(self) -> dict[str, int]:
        """The position in the stream of batches.

        **Returns:**

        `{"epoch": ..., "index": ..., "seed": ...}`: the current epoch, the number of
        batches already taken from it, and the seed; plain integers, JSON-able.

        **Example:**

        ```python
        json.dumps(batcher.state_dict())  # e.g. '{"epoch": 2, "index": 7, "seed": 0}'
        ```
        """
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to a position saved by [`blockdistill.Batcher.state_dict`][].

        The seed is restored too. The batcher must hold the same sequences and batch
        size as the one that saved the state for the batches to match.

        **Arguments:**

        - `state`: a dict with integer `"epoch"`, `"index"` and `"seed"`.

        **Example:**

        ```python
        batcher.load_state_dict({"epoch": 2, "index": 7, "seed": 0})
        ```
        """
        for key in ("epoch", "index", "seed"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"Batcher state {key}={value!r} is invalid: must be a non-negative "
                    "integer"
                )
        if state["index"] >= self.batches_per_epoch:
            raise ValueError(
                f"Batcher state index={state['index']!r} is invalid: an epoch has only "
                f"{self.batches_per_epoch} batches of {self.batch_size}"
            )
        self.epoch = state["epoch"]
        self.index = state["index"]
        if state["seed"] != self.seed:
            self.seed = state["seed"]
            self._order_epoch = -1


def _segments_or_default(
    segment_ids: Int[np.ndarray, "n seq"] | None, mask: Bool[np.ndarray, "n seq"]
) -> Int[np.ndarray, "n seq"]:
    """`segment_ids` checked against `mask`, or one document per row when `None`."""
    if segment_ids is None:
        return mask.astype(np.int32)
    if segment_ids.shape != mask.shape:
        raise ValueError(
            f"segment_ids {segment_ids.shape} must have the shape of mask {mask.shape}"
        )
    return segment_ids


def eval_batches(
    tokens: Int[np.ndarray, "n seq"],
    mask: Bool[np.ndarray, "n seq"],
    segment_ids: Int[np.ndarray, "n seq"] | None = None,
    *,
    batch_size: int,
    max_batches: int | None = None,
    pad_id: int = 0,
) -> list["Split"]:
    """A fixed evaluation set: the first sequences, in order, in equal-sized batches.

    No shuffling: the same arrays give the same batches every time. All batches have
    exactly `batch_size` rows (so a jitted evaluation step compiles once); the last one
    is filled up with rows of `pad_id` whose mask is all `False` (segment 0), so every
    sequence is evaluated and the filler counts for nothing in a masked mean.

    **Arguments:**

    - `tokens`, `mask`, `segment_ids`: `[n, seq_len]` rows, e.g. `*dataset.val`
      (`segment_ids=None`: one document per row).
    - `batch_size`: rows per batch.
    - `max_batches`: keep only the first this many batches; `None` for all.
    - `pad_id`: the token id of filler rows.

    **Returns:**

    A list of [`blockdistill.Split`][] `(tokens, mask, segment_ids)`, empty when `n` is 0.

    **Example:**

    ```python
    for tokens, mask, segment_ids in bd.eval_batches(*dataset.val, batch_size=32, max_batches=8):
        ...
    ```
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be positive")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches={max_batches!r} is invalid: must be positive")
    segment_ids = _segments_or_default(segment_ids, mask)
    n_rows, seq_len = tokens.shape
    n_batches = -(-n_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for index in range(n_batches):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        batch = Split(tokens[rows], mask[rows], segment_ids[rows])
        missing = batch_size - batch.tokens.shape[0]
        if missing:
            batch = Split(
                np.concatenate([batch.tokens, np.full((missing, seq_len), pad_id, batch.tokens.dtype)]),
                np.concatenate([batch.mask, np.zeros((missing, seq_len), bool)]),
                np.concatenate([batch.segment_ids, np.zeros((missing, seq_len), batch.segment_ids.dtype)]),
            )
        batches.append(batch)
    return batches


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A tokenized, packed corpus with its train and validation splits.

    Build it with [`blockdistill.load_dataset`][].

    **Arguments:**

    - `train`, `val`: [`blockdistill.Split`][] `(tokens, mask, segment_ids)` rows.
    - `tokenizer`: the tokenizer used.
    - `seq_len`: the row length.
    - `source`: where the documents came from (a path, or `"default"`).
    - `num_documents`: documents in the corpus.
    - `num_val_documents`: documents held out for validation (0 when the split fell
      back to holding out the end of the token stream, see `load_dataset`).

    **Example:**

    ```python
    dataset = bd.load_dataset(None, bd.ByteTokenizer(), seq_len=256)
    dataset.train.tokens.shape  # (n_train, 256)
    ```
    """

    train: Split
    val: Split
    tokenizer: Tokenizer
    seq_len: int
    source: str
    num_documents: int
    num_val_documents: int


def held_out_rows(n_rows: int, val_fraction: float, source: str, seq_len: int) -> int:
    """How many of the last rows of a packed corpus are held out when the hashed split
    leaves a side empty (a corpus of one or a few documents): `ceil(val_fraction * n)`,
    leaving at least one training row (else a `ValueError` naming the corpus)."""
    n_val = int(np.ceil(val_fraction * n_rows))
    if n_rows - n_val < 1:
        raise ValueError(f"corpus {source!r} is too small to split: {n_rows} sequence(s) of seq_len={seq_len}")
    return n_val


def load_dataset(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    seq_len: int,
    val_fraction: float = 0.05,
    glob: str | None = None,
) -> Dataset:
    """Read, split, tokenize and pack a corpus.

    The documents (from [`blockdistill.read_corpus`][], or
    [`blockdistill.default_corpus`][] when `path` is `None`) are split by
    [`blockdistill.split_documents`][], and each split is packed separately by
    [`blockdistill.pack_documents`][], so no sequence mixes train and validation text.
    When the hashed split leaves a side empty although `0 < val_fraction` (a corpus of
    one or a few documents), the whole corpus is packed and its last
    `ceil(val_fraction * n)` sequences become the validation set instead. Nothing is
    cached on disk; the default corpus loads in about a second.

    **Arguments:**

    - `path`: a file, folder, JSONL file or glob pattern, or `None` for the default
      corpus.
    - `tokenizer`: a [`blockdistill.Tokenizer`][], e.g.
      [`blockdistill.ByteTokenizer`][].
    - `seq_len`: the row length.
    - `val_fraction`: the fraction held out for validation, in `[0, 1)`; `0.0` gives an
      empty validation split.
    - `glob`: the file pattern for a folder (see `read_corpus`).

    **Returns:**

    A [`blockdistill.Dataset`][].

    **Example:**

    ```python
    dataset = bd.load_dataset(None, bd.ByteTokenizer(), seq_len=256)
    batcher = bd.Batcher(*dataset.train, batch_size=16, seed=0)
    ```
    """
    _check_seq_len(seq_len)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
    if path is None:
        documents, source = default_corpus(), "default"
    else:
        documents, source = read_corpus(path, glob=glob), os.fspath(path)
    train_docs, val_docs = split_documents(documents, val_fraction)
    if val_fraction > 0.0 and (not train_docs or not val_docs):
        packed = pack_documents(documents, tokenizer, seq_len)
        n_val = held_out_rows(packed.tokens.shape[0], val_fraction, source, seq_len)
        train = Split(*(array[:-n_val] for array in packed))
        val = Split(*(array[-n_val:] for array in packed))
        num_val_documents = 0
    else:
        train = pack_documents(train_docs, tokenizer, seq_len)
        val = pack_documents(val_docs, tokenizer, seq_len)
        num_val_documents = len(val_docs)
    return Dataset(
        train=train,
        val=val,
        tokenizer=tokenizer,
        seq_len=seq_len,
        source=source,
        num_documents=len(documents),
        num_val_documents=num_val_documents,
    )
