"""A corpus tokenized once: an on-disk token store and packed rows read from it at random.

- [`blockdistill.token_store`][] tokenizes a corpus (in batches, streaming: a corpus
  larger than memory works) into a folder of the cache, `tokens.bin` (every document's
  ids, concatenated, in the smallest integer type the vocabulary fits) with the
  documents' offsets and split hashes; later runs on the same corpus files and tokenizer
  open it memory-mapped instead of tokenizing again. A changed file (size or modification
  time), another file list or another tokenizer is another store. The store records a
  digest of its content, and packed rows a digest of exactly what they hold, so a run can
  tell when what it reads back is not what it read.
- [`blockdistill.PackedRows`][] packs documents of a store into rows of `seq_len` tokens
  with segment ids, exactly as [`blockdistill.pack_tokens`][] does, but row by row on
  demand: nothing is materialised. The Grain pipeline over them is in
  [`pipeline`][blockdistill.data.pipeline].
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import numpy as np

from .corpus import CorpusFiles, _unit_hash, corpus_files, iter_documents
from .dataset import held_out_rows
from .packing import Split
from .tokenizers import Tokenizer

STORE_VERSION = 1
_TOKENS = "tokens.bin"
_OFFSETS = "offsets.npy"
_HASHES = "hashes.npy"
_META = "meta.json"


def cache_root() -> pathlib.Path:
    """Where token stores live: `$BLOCKDISTILL_CACHE`, else `$XDG_CACHE_HOME/blockdistill`,
    else `~/.cache/blockdistill`."""
    if os.environ.get("BLOCKDISTILL_CACHE"):
        return pathlib.Path(os.environ["BLOCKDISTILL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "blockdistill"


def _dtype_for(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit 32 bits")


class TokenStore:
    """A tokenized corpus on disk, memory-mapped. Build or open one with
    [`blockdistill.token_store`][].

    **Attributes:** `folder`, `tokens` (every document's ids, concatenated, read-only
    memory map), `offsets` (`int64 [num_documents + 1]`: document `i` is
    `tokens[offsets[i]:offsets[i + 1]]`), `hashes` (`float64 [num_documents]`, the split
    hash of each document's name, see [`blockdistill.split_documents`][]) and `meta` (the
    corpus, the tokenizer, the counts).

    **Example:**

    ```python
    store = bd.token_store(None, bd.ByteTokenizer())   # the default corpus
    store.num_documents, store.num_tokens
    ids = store.document(0)
    ```
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        meta_file = self.folder / _META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a token store: {_META} is missing")
        try:
            self.meta = json.loads(meta_file.read_text())
            self.offsets = np.load(self.folder / _OFFSETS)
            self.hashes = np.load(self.folder / _HASHES)
        except (ValueError, OSError) as error:
            raise ValueError(f"token store {self.folder} is corrupt ({type(error).__name__}: {error})") from None
        dtype = np.dtype(self.meta["dtype"])
        size = (self.folder / _TOKENS).stat().st_size
        if size != int(self.offsets[-1]) * dtype.itemsize:
            raise ValueError(f"token store {self.folder} is corrupt: {_TOKENS} has {size} bytes, "
                             f"expected {int(self.offsets[-1]) * dtype.itemsize}")
        self.tokens = (np.memmap(self.folder / _TOKENS, dtype=dtype, mode="r") if size
                       else np.zeros((0,), dtype))

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def content_sha256(self) -> str:
        """sha256 of what the store holds: every document's token ids, the document
        boundaries and the id type (not the files' names or times: a corpus rewritten
        with the same text is the same content). Recorded when the store is built; a
        store built before it was recorded is hashed once per process."""
        if "content_sha256" not in self.meta:
            digest = hashlib.sha256()
            for lo in range(0, self.num_tokens, 1 << 24):
                digest.update(np.asarray(self.tokens[lo : lo + (1 << 24)]).tobytes())
            self.meta["content_sha256"] = _content_digest(digest, self.offsets, self.tokens.dtype)
        return self.meta["content_sha256"]

    def document(self, index: int) -> np.ndarray:
        """The token ids of document `index` (a view of the memory map)."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """`(train, val)` document indices, split as [`blockdistill.split_documents`][]
        splits (by the hash of each name, in corpus order)."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        val = self.hashes < val_fraction
        indices = np.arange(self.num_documents)
        return indices[~val], indices[val]

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.folder)!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, source={self.meta['source']!r})")


def _content_digest(tokens: Any, offsets: np.ndarray, dtype: np.dtype) -> str:
    """The store's content digest from `tokens`, the running sha256 of its token bytes."""
    digest = hashlib.sha256(tokens.digest())
    digest.update(np.dtype(dtype).name.encode())
    digest.update(np.asarray(offsets, np.int64).tobytes())
    return digest.hexdigest()


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return list(encode_batch(texts))
    return [tokenizer.encode(text) for text in texts]


def _store_key(corpus: CorpusFiles, tokenizer: Tokenizer) -> tuple[str, dict[str, Any]]:
    from .tokenizers import tokenizer_record

    identity = {"version": STORE_VERSION, "corpus": corpus.fingerprint(), "tokenizer": tokenizer_record(tokenizer)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:32], identity


def token_store(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    *,
    glob: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
    batch_bytes: int = 1 << 22,
) -> TokenStore:
    """The token store of a corpus and a tokenizer: opened from the cache when it was
    built before, else built first (atomically: a crash leaves no half-built store).

    **Arguments:**

    - `path`: the corpus, as [`blockdistill.read_corpus`][] takes it; `None` for the
      default corpus.
    - `tokenizer`: a [`blockdistill.Tokenizer`][]; one with `encode_batch` (e.g.
      [`blockdistill.HFTokenizer`][]) gets documents in batches.
    - `glob`: the file pattern for a folder.
    - `cache`: the cache folder (default [`cache_root()`](#), `$BLOCKDISTILL_CACHE`).
    - `progress`: show a progress bar (over the corpus's bytes) while building.
    - `batch_bytes`: about how much text is tokenized at once.

    **Example:**

    ```python
    store = bd.token_store("my_project/", tokenizer, glob="**/*.py", progress=True)
    ```
    """
    corpus = corpus_files(path, glob)
    key, identity = _store_key(corpus, tokenizer)
    folder = pathlib.Path(cache or cache_root()) / "tokens" / key
    if (folder / _META).is_file():
        return TokenStore(folder)
    return _build(corpus, tokenizer, folder, identity, progress=progress, batch_bytes=batch_bytes)


def _build(corpus: CorpusFiles, tokenizer: Tokenizer, folder: pathlib.Path, identity: dict[str, Any], *,
           progress: bool, batch_bytes: int) -> TokenStore:
    dtype = _dtype_for(tokenizer.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    bar, file_sizes = None, {}
    if progress:
        from tqdm.auto import tqdm

        file_sizes = {name: path.stat().st_size for name, path in corpus.files}

        bar = tqdm(total=sum(file_sizes.values()), unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True)
    try:
        offsets, hashes = [0], []
        content = hashlib.sha256()
        with open(tmp / _TOKENS, "wb") as out:
            def flush(batch: list) -> None:
                for document, ids in zip(batch, _encode_batch(tokenizer, [d.text for d in batch])):
                    ids = np.asarray(ids).reshape(-1)
                    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        raise ValueError(f"the tokenizer gave ids outside [0, {tokenizer.vocab_size}) "
                                         f"for document {document.name!r}")
                    data = ids.astype(dtype).tobytes()
                    out.write(data)
                    content.update(data)
                    offsets.append(offsets[-1] + ids.size)
                    hashes.append(_unit_hash(document.name))

            batch, size, last_file = [], 0, None
            for document in iter_documents(corpus):
                batch.append(document)
                size += len(document.text)
                if size >= batch_bytes:
                    flush(batch)
                    batch, size = [], 0
                if bar is not None:
                    file = document.name.split(":")[0]
                    if file != last_file:
                        last_file = file
                        bar.update(file_sizes.get(file, 0))
            if batch:
                flush(batch)
        if len(offsets) == 1:
            raise ValueError(f"corpus {corpus.source!r} is empty: no non-empty documents found")
        np.save(tmp / _OFFSETS, np.asarray(offsets, np.int64))
        np.save(tmp / _HASHES, np.asarray(hashes, np.float64))
        meta = {**identity, "source": corpus.source, "dtype": dtype.name, "num_documents": len(hashes),
                "num_tokens": offsets[-1],
                "content_sha256": _content_digest(content, np.asarray(offsets, np.int64), dtype)}
        (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it meanwhile: use theirs
            if not (folder / _META).is_file():
                raise
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore(folder)


class PackedRows:
    """Documents of a [`blockdistill.TokenStore`][] packed into rows of `seq_len` tokens,
    read row by row (a random-access data source: `len()` and indexing).

    The layout is [`blockdistill.pack_tokens`][]'s: the documents, each preceded by
    `bos_id` (unless `None`), form one stream cut into consecutive rows, the last one
    padded with `pad_id`; segment ids number the documents of each row from 1 (0 on
    padding). `rows=(lo, hi)` keeps rows `lo .. hi - 1` of that packing.

    **Example:**

    ```python
    train, val = store.split(0.05)
    rows = bd.PackedRows(store, train, seq_len=256, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    tokens, mask, segment_ids = rows[0]          # one row, [256] each
    batch = rows.take([3, 1, 4])                 # a Split of [3, 256] arrays
    ```
    """

    def __init__(self, store: TokenStore, documents: np.ndarray, seq_len: int, *, bos_id: int | None,
                 pad_id: int, rows: tuple[int, int] | None = None):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive integer")
        self.store = store
        self.documents = np.asarray(documents, np.int64)
        self.seq_len = seq_len
        self.bos_id = bos_id
        self.pad_id = pad_id
        extra = 0 if bos_id is None else 1
        lengths = store.offsets[self.documents + 1] - store.offsets[self.documents] + extra
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(self._starts[-1])
        self.num_packed_rows = -(-total // seq_len)
        lo, hi = rows if rows is not None else (0, self.num_packed_rows)
        if not 0 <= lo <= hi <= self.num_packed_rows:
            raise ValueError(f"rows=({lo}, {hi}) is outside the {self.num_packed_rows} packed rows")
        self._lo, self._hi = lo, hi
        self._digest: str | None = None

    def __len__(self) -> int:
        return self._hi - self._lo

    def digest(self) -> str:
        """sha256 of exactly what these rows hold: the store's content, which documents
        (in order), the row length, the BOS and padding ids and which rows of the
        packing. Two row sets with the same digest read the same tokens row for row;
        another corpus, split (`val_fraction`), tokenizer or `seq_len` gives another."""
        if self._digest is None:
            record = {"store": self.store.content_sha256,
                      "documents": hashlib.sha256(self.documents.tobytes()).hexdigest(),
                      "seq_len": self.seq_len, "bos_id": self.bos_id, "pad_id": self.pad_id,
                      "rows": [self._lo, self._hi]}
            self._digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        return self._digest

    def rows(self, lo: int, hi: int) -> "PackedRows":
        """Rows `lo .. hi - 1` of these rows."""
        return PackedRows(self.store, self.documents, self.seq_len, bos_id=self.bos_id, pad_id=self.pad_id,
                          rows=(self._lo + lo, self._lo + hi))

    def _row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is outside the {len(self)} rows")
        first = (self._lo + index) * self.seq_len
        end = first + self.seq_len
        tokens = np.full((self.seq_len,), self.pad_id, np.int32)
        segments = np.zeros((self.seq_len,), np.int32)
        j = int(np.searchsorted(self._starts, first, side="right")) - 1
        segment = 0
        extra = 0 if self.bos_id is None else 1
        while j < len(self.documents) and self._starts[j] < end:
            start, stop = int(self._starts[j]), int(self._starts[j + 1])
            lo, hi = max(first, start), min(end, stop)
            if hi > lo:
                segment += 1
                ids = self.store.document(int(self.documents[j]))
                position = lo - start  # within the document's stream piece (BOS first)
                out = lo - first
                if extra and position == 0:
                    tokens[out] = self.bos_id
                    out += 1
                    position += 1
                count = hi - first - out
                if count > 0:
                    tokens[out : out + count] = ids[position - extra : position - extra + count]
                segments[lo - first : hi - first] = segment
            j += 1
        return tokens, segments

    def __getitem__(self, index: int) -> Split:
        tokens, segments = self._row(int(index))
        return Split(tokens, segments > 0, segments)

    def take(self, indices) -> Split:
        """The rows at `indices`, stacked: a [`blockdistill.Split`][] of `[k, seq_len]` arrays."""
        rows = [self._row(int(i)) for i in np.asarray(indices).reshape(-1)]
        tokens = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.seq_len), np.int32)
        segments = np.stack([r[1] for r in rows]) if rows else np.zeros((0, self.seq_len), np.int32)
        return Split(tokens, segments > 0, segments)

    def materialize(self, limit: int | None = None) -> Split:
        """The first `limit` rows (all by default) as in-memory arrays."""
        count = len(self) if limit is None else min(limit, len(self))
        return self.take(np.arange(count))

    def spread(self, limit: int) -> Split:
        """`limit` rows spread evenly over the whole split, in order (every row when it has
        no more): a sample of every part of the corpus, where the first rows would be its
        first few documents. Evaluation and pruning calibration read these."""
        count = min(limit, len(self))
        return self.take(np.arange(count, dtype=np.int64) * len(self) // max(count, 1))


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDataset:
    """A corpus in a token store with its packed train and validation rows. Build it with
    [`blockdistill.token_dataset`][]; the store-backed counterpart of
    [`blockdistill.Dataset`][] for corpora of any size.

    **Attributes:** `train`, `val` ([`blockdistill.PackedRows`][]), `tokenizer`,
    `seq_len`, `source`, `num_documents`, `num_val_documents`, `store`.

    **Example:**

    ```python
    data = bd.token_dataset(None, bd.ByteTokenizer(), seq_len=256)
    len(data.train), len(data.val)     # packed rows of each split
    ```
    """

    train: PackedRows
    val: PackedRows
    tokenizer: Tokenizer
    seq_len: int
    source: str
    num_documents: int
    num_val_documents: int
    store: TokenStore

    def identity(self) -> dict[str, Any]:
        """What a run read from this corpus, to compare later (a resumed run, a teacher
        cache): the source, the row length and the digests of the training and held-out
        rows ([`PackedRows.digest`][blockdistill.PackedRows.digest])."""
        return {"source": self.source, "seq_len": self.seq_len, "train_rows": len(self.train),
                "train_sha256": self.train.digest(), "val_rows": len(self.val), "val_sha256": self.val.digest()}


def token_dataset(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    seq_len: int,
    val_fraction: float = 0.05,
    glob: str | None = None,
    *,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> TokenDataset:
    """A corpus tokenized once into a [`blockdistill.TokenStore`][] (reused from the cache
    when it exists), split and packed as [`blockdistill.load_dataset`][] does, with the
    rows read on demand.

    The split and the packing are `load_dataset`'s: documents go to validation by the
    hash of their name, each side is packed on its own, and when the hashed split leaves a
    side empty (a corpus of one or a few documents) the last `ceil(val_fraction * n)` rows
    of the whole packed corpus become the validation rows. The rows equal `load_dataset`'s
    row for row.

    **Example:**

    ```python
    data = bd.token_dataset(None, bd.ByteTokenizer(), seq_len=256)
    batches = bd.batch_iterator(data.train, batch_size=8, seed=0)
    ```
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
    store = token_store(path, tokenizer, glob=glob, cache=cache, progress=progress)
    train_docs, val_docs = store.split(val_fraction)
    pack = dict(bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    source = store.meta["source"]
    if val_fraction > 0.0 and (len(train_docs) == 0 or len(val_docs) == 0):
        whole = PackedRows(store, np.arange(store.num_documents), seq_len, **pack)
        n_rows = len(whole)
        n_val = held_out_rows(n_rows, val_fraction, source, seq_len)
        train, val, num_val = whole.rows(0, n_rows - n_val), whole.rows(n_rows - n_val, n_rows), 0
    else:
        train = PackedRows(store, train_docs, seq_len, **pack)
        val = PackedRows(store, val_docs, seq_len, **pack)
        num_val = len(val_docs)
    return TokenDataset(train=train, val=val, tokenizer=tokenizer, seq_len=seq_len, source=source,
                        num_documents=store.num_documents, num_val_documents=num_val, store=store)
