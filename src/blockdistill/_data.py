"""Tokenizers, corpora, train/validation splits, packing and batching.

Everything here is host-side numpy and the standard library: the training loop turns the
`(tokens, mask)` batches into device arrays itself.
"""

import dataclasses
import glob as globlib
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from ._tokenizers import Tokenizer

#: Folders of the standard library left out of the default corpus: installed packages,
#: test suites, the IDLE editor, build configuration, generated documentation topics and
#: the codec tables of `encodings` (large, repetitive tables of hexadecimal literals).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "__pycache__",
        "pydoc_data",
        "encodings",
    }
)
_GLOB_MAGIC = frozenset("*?[")


# --------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus.

    **Arguments:**

    - `name`: a stable identifier: the file's path relative to the corpus root (with `/`
      separators), or `"file.jsonl:LINE"` for line `LINE` (1-based) of a JSONL file. The
      train/validation split hashes it.
    - `text`: the document's text.

    **Example:**

    ```python
    doc = bd.Document(name="pkg/module.py", text="x = 1\\n")
    ```
    """

    name: str
    text: str


def _read_text(path: pathlib.Path) -> str:
    # Files that are not valid UTF-8 are decoded with replacement characters rather than
    # making the whole corpus fail.
    return path.read_bytes().decode("utf-8", errors="replace")


def _read_jsonl(path: pathlib.Path, name: str):
    """The documents of a JSONL file, one line at a time."""
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{lineno}: not a valid JSON line ({error.msg})"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with a string "
                    '"text" field'
                )
            yield Document(name=f"{name}:{lineno}", text=record["text"])


def _named(files: Sequence[pathlib.Path], root: pathlib.Path) -> tuple[tuple[str, pathlib.Path], ...]:
    return tuple(sorted((file.relative_to(root).as_posix(), file) for file in files))


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
    """The files of a corpus, resolved but not read: `files` are `(name, path)` pairs in
    the corpus order (sorted by name); `source` is what was asked for. Build it with
    [`blockdistill.corpus_files`][].

    **Example:**

    ```python
    corpus = bd.corpus_files("my_project/", glob="**/*.py")
    corpus.files[0]          # ("__init__.py", PosixPath("my_project/__init__.py"))
    corpus.fingerprint()     # names, sizes and modification times
    ```
    """

    source: str
    files: tuple[tuple[str, pathlib.Path], ...]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the corpus's content cheaply: every file's name, size and
        modification time (a changed file changes it)."""
        entries = []
        for name, path in self.files:
            stat = path.stat()
            entries.append([name, stat.st_size, stat.st_mtime_ns])
        return {"source": self.source, "files": entries}


def iter_documents(corpus: CorpusFiles):
    """The non-empty documents of `corpus`, one file (or JSONL line) at a time: a corpus
    larger than memory streams through."""
    for name, path in corpus.files:
        if path.suffix == ".jsonl":
            yield from (d for d in _read_jsonl(path, name) if d.text)
        else:
            text = _read_text(path)
            if text:
                yield Document(name=name, text=text)


def corpus_files(path: str | os.PathLike | None, glob: str | None = None) -> CorpusFiles:
    """Resolve a corpus path (see [`blockdistill.read_corpus`][]; `None`: the default
    corpus) to its files, without reading them. Raises like `read_corpus` when the path
    does not exist or matches no file.

    **Example:**

    ```python
    corpus = bd.corpus_files("my_project/", glob="**/*.py")   # resolved, not read
    documents = bd.read_corpus("my_project/", glob="**/*.py")  # the same files, read
    ```
    """
    if path is None:
        root = default_corpus_root()
        if not root.is_dir():
            raise FileNotFoundError(
                f"the standard library folder {str(root)!r} of this interpreter does not "
                "exist, so the default corpus is unavailable"
            )
        files = [file for file in root.rglob("*.py")
                 if _is_default_corpus_file(file.relative_to(root)) and file.is_file()]
        return CorpusFiles("default", _named(files, root))
    text_path = os.fspath(path)
    candidate = pathlib.Path(text_path)
    if candidate.is_file():
        return CorpusFiles(text_path, _named([candidate], candidate.parent))
    if candidate.is_dir():
        pattern = "**/*.txt" if glob is None else glob
        files = [file for file in candidate.glob(pattern) if file.is_file()]
        if not files:
            raise ValueError(
                f"corpus {text_path!r} is empty: no files match {pattern!r} in it"
            )
        return CorpusFiles(text_path, _named(files, candidate))
    parts = candidate.parts
    if any(_GLOB_MAGIC & set(part) for part in parts):
        fixed = []
        for part in parts:
            if _GLOB_MAGIC & set(part):
                break
            fixed.append(part)
        root = pathlib.Path(*fixed) if fixed else pathlib.Path(".")
        files = [
            pathlib.Path(file)
            for file in globlib.glob(text_path, recursive=True)
            if os.path.isfile(file)
        ]
        if not files:
            raise ValueError(
                f"corpus {text_path!r} is empty: the pattern matches no files"
            )
        return CorpusFiles(text_path, _named(files, root))
    raise FileNotFoundError(f"corpus path {text_path!r} does not exist")


def read_corpus(path: str | os.PathLike, glob: str | None = None) -> list[Document]:
    """Read a corpus of documents from disk.

    **Arguments:**

    - `path`: one of
        - a text file: one document, named by the file name;
        - a `.jsonl` file: one document per line, from the line's `"text"` field (blank
          lines are skipped);
        - a folder: every file under it that matches `glob` (recursively with `**`),
          each a document, or one document per line for `.jsonl` files;
        - a glob pattern such as `"data/**/*.py"` (when no such path exists).
    - `glob`: the pattern of files to take from a folder, relative to it; default
      `"**/*.txt"`. Use e.g. `"**/*.py"` for source code or `"**/*.jsonl"`. Ignored for
      a file or a pattern.

    Documents come in a deterministic order, sorted by name; names are paths relative to
    the folder (or to the pattern's fixed leading folders). Empty documents are dropped.
    Bytes that are not valid UTF-8 are decoded as U+FFFD instead of failing.

    **Returns:**

    A list of [`blockdistill.Document`][].

    **Raises:**

    - `FileNotFoundError` if `path` does not exist (and is not a pattern).
    - `ValueError` if no non-empty document is found, or if a JSONL line is not JSON or
      has no string `"text"` field (naming the file and line number).

    **Example:**

    ```python
    docs = bd.read_corpus("my_project/", glob="**/*.py")
    docs[0].name  # e.g. "__init__.py": names are relative to my_project/
    ```
    """
    corpus = corpus_files(path, glob)
    documents = list(iter_documents(corpus))
    if not documents:
        raise ValueError(f"corpus {corpus.source!r} is empty: no non-empty documents found")
    return documents


def default_corpus_root() -> pathlib.Path:
    """The folder of the default corpus: the running interpreter's standard library.

    **Returns:**

    `sysconfig.get_paths()["stdlib"]` as a path.

    **Example:**

    ```python
    bd.default_corpus_root()  # e.g. PosixPath('/usr/lib/python3.11')
    ```
    """
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_default_corpus_file(relative: pathlib.PurePath) -> bool:
    folders = relative.parts[:-1]
    if any(
        folder in _STDLIB_EXCLUDED_DIRS or folder.startswith("config-")
        for folder in folders
    ):
        return False
    # Machine-generated build variables, different on every installation.
    return not relative.name.startswith("_sysconfigdata")


def default_corpus() -> list[Document]:
    """The embedded default corpus: the Python standard library's own source code.

    The `.py` files of the running interpreter's standard library
    ([`blockdistill.default_corpus_root`][]), without installed packages
    (`site-packages`), test suites (`test`, `tests`, `idle_test`), `idlelib`, generated
    or tabular modules (`pydoc_data`, the `encodings` codec tables, `_sysconfigdata*`)
    and build configuration. Nothing is downloaded. The order is sorted by relative
    path, so the corpus is deterministic for a given Python version; CPython 3.11 gives
    about 550 files and 9 MB.

    **Returns:**

    A list of [`blockdistill.Document`][], named by path relative to the standard
    library.

    **Example:**

    ```python
    docs = bd.default_corpus()
    sum(len(doc.text) for doc in docs)  # about 9 million characters
    ```
    """
    corpus = corpus_files(None)
    documents = list(iter_documents(corpus))
    if not documents:
        raise ValueError(f"corpus {str(default_corpus_root())!r} is empty: no non-empty documents found")
    return documents


# --------------------------------------------------------------------------- splitting


def _unit_hash(name: str) -> float:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(
    documents: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation sets, deterministically.

    A document goes to validation when a hash (BLAKE2b, not Python's randomised `hash`)
    of its `name`, read as a number in `[0, 1)`, is below `val_fraction`. The split
    therefore never depends on the order of the documents, on a seed or on the process,
    and adding documents never moves existing ones. About `val_fraction` of the
    documents (not of the tokens) go to validation.

    **Arguments:**

    - `documents`: the documents, with unique names.
    - `val_fraction`: the expected fraction of documents held out, in `[0, 1)`.

    **Returns:**

    `(train, val)`, each a list in the order of `documents`.

    **Example:**

    ```python
    train, val = bd.split_documents(bd.default_corpus(), val_fraction=0.05)
    ```
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
    train, val = [], []
    for document in documents:
        (val if _unit_hash(document.name) < val_fraction else train).append(document)
    return train, val


# --------------------------------------------------------------------------- packing


def _check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive integer")


def pack_tokens(
    token_ids: Sequence[np.ndarray],
    seq_len: int,
    *,
    bos_id: int | None = None,
    pad_id: int = 0,
) -> "Split":
    """Pack token id arrays (one per document) into fixed-length rows with segment ids.

    Each document, preceded by `bos_id` when it is not `None`, is appended to one
    stream, and the stream is cut into consecutive, non-overlapping rows of `seq_len`
    tokens; the last, partial row is padded with `pad_id`. `segment_ids` number the
    documents of each row 1, 2, ... (a document cut at a row's end continues in the
    next row as that row's first segment) and are 0 on padding. The model keeps each
    segment to itself (attention within a segment, positions restarting at each one),
    so a document in a packed row is computed as it would be on its own.

    A next-token loss uses the pairs `(t, t + 1)` that lie in one segment: the last
    token of a document predicts nothing.

    **Arguments:**

    - `token_ids`: one 1-D integer array per document.
    - `seq_len`: the length of a row.
    - `bos_id`: the id that starts each document, or `None` for none.
    - `pad_id`: the id of padding.

    **Returns:**

    A [`blockdistill.Split`][] `(tokens, mask, segment_ids)`: `int32 [n, seq_len]`,
    `bool [n, seq_len]` (`False` on padding) and `int32 [n, seq_len]`. With an empty
    stream, `n` is 0.

    **Example:**

    ```python
    tokens, mask, segment_ids = bd.pack_tokens([np.array([5, 6, 7]), np.array([8])], 3, bos_id=1)
    # tokens      [[1, 5, 6], [7, 1, 8]]
    # mask        [[T, T, T], [T, T, T]]
    # segment_ids [[1, 1, 1], [1, 2, 2]]
    ```
    """
    _check_seq_len(seq_len)
    pieces, owners = [], []
    for ids in token_ids:
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if bos_id is not None:
            ids = np.concatenate([np.array([bos_id], np.int32), ids])
        if ids.size:  # documents are numbered consecutively, empty ones skipped
            pieces.append(ids)
            owners.append(np.full(ids.shape, len(owners) + 1, np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    owner = np.concatenate(owners) if owners else np.zeros((0,), np.int64)
    n_rows = -(-stream.size // seq_len)
    padding = n_rows * seq_len - stream.size
    tokens = np.concatenate([stream, np.full((padding,), pad_id, np.int32)]).reshape(n_rows, seq_len)
    mask = np.zeros((n_rows * seq_len,), dtype=bool)
    mask[: stream.size] = True
    mask = mask.reshape(n_rows, seq_len)
    owner = np.concatenate([owner, np.zeros((padding,), np.int64)]).reshape(n_rows, seq_len)
    # number the documents of each row from 1: documents are contiguous and in order
    segment_ids = np.where(mask, owner - owner[:, :1] + 1, 0).astype(np.int32)
    return Split(tokens, mask, segment_ids)


def pack_documents(
    documents: Sequence[Document], tokenizer: Tokenizer, seq_len: int
) -> "Split":
    """Tokenize documents and pack them into fixed-length rows, each document starting
    with the tokenizer's `bos_id` (when it has one).

    See [`blockdistill.pack_tokens`][] for the layout.

    **Arguments:**

    - `documents`: the documents, packed in this order.
    - `tokenizer`: a [`blockdistill.Tokenizer`][].
    - `seq_len`: the length of a row.

    **Returns:**

    A [`blockdistill.Split`][] `(tokens, mask, segment_ids)`.

    **Example:**

    ```python
    tokens, mask, segment_ids = bd.pack_documents(docs, bd.ByteTokenizer(), seq_len=256)
    ```
    """
    return pack_tokens(
        [tokenizer.encode(document.text) for document in documents],
        seq_len,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
    )


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


# --------------------------------------------------------------------------- datasets


class Split(NamedTuple):
    """Packed rows (of a split, or a batch); unpacks as
    `tokens, mask, segment_ids = split`.

    **Arguments:**

    - `tokens`: `int32 [n, seq_len]` token ids.
    - `mask`: `bool [n, seq_len]`, `False` on padding.
    - `segment_ids`: `int32 [n, seq_len]`, the documents of each row numbered from 1,
      0 on padding (see [`blockdistill.pack_tokens`][]).

    **Example:**

    ```python
    tokens, mask, segment_ids = dataset.train
    ```
    """

    tokens: Int[np.ndarray, "n seq"]
    mask: Bool[np.ndarray, "n seq"]
    segment_ids: Int[np.ndarray, "n seq"]


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
