"""The teacher cache on disk: a teacher's top-k next-token log-probabilities, computed once
over a corpus's training rows and read back by distillation instead of running the
teacher.

- [`blockdistill.build_teacher_cache`][] runs a teacher over packed rows once (resumable,
  sharded over a mesh's `data` axis) and writes a [`blockdistill.TeacherCache`][], row for
  row aligned with the rows it read, with what it was made from (teacher, tokenizer, the
  digest of the rows) in its `meta.json`.
- [`blockdistill.TeacherCache`][] opens one memory-mapped and hands out the cached rows of
  a batch; the cache records each position's tail mass, and `mean_tail_mass` is its mean.

The math of such sparse logits (the top-k plus one tail bucket, the KL of a student
against them and what the tail bucket costs) is the method's, in
[`sparse`][blockdistill.distill.sparse].
"""

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._files import write_json
from ..distill.sparse import top_k_logits

CACHE_FORMAT = "blockdistill-teacher-cache"
CACHE_VERSION = 1
VALUE_DTYPES = ("float16", "bfloat16")
_META = "meta.json"
_IDS = "ids.npy"
_VALUES = "logprobs.npy"
_TAIL = "log_tail.npy"
_TAIL_MASS = "tail_mass.npy"
_ROWS = "rows.npy"


# ----------------------------------------------------------------------------- the cache


def _values_dtype(name: str) -> np.dtype:
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"values dtype {name!r} is invalid: must be one of {VALUE_DTYPES}")


def bytes_per_token(top_k: int, values_dtype: str = "float16") -> int:
    """Disk bytes of one cached position: `k` int32 ids, `k` 16-bit log-probabilities, the
    float32 log tail mass and the float16 tail mass (kept for statistics).

    **Example:**

    ```python
    bd.bytes_per_token(64)   # 390: a million cached tokens take 390 MB
    ```
    """
    _values_dtype(values_dtype)
    return top_k * (4 + 2) + 4 + 2


class TeacherCache:
    """A teacher cache on disk, memory-mapped: for every packed training row the top-k
    ids (`int32 [rows, seq, k]`), their log-probabilities (`float16` or `bfloat16`) and
    the log tail mass (`float32 [rows, seq]`), with what it was made from in `meta`.
    Build one with [`blockdistill.build_teacher_cache`][] (or `blockdistill
    cache-teacher`).

    **Attributes:** `folder`, `meta`, `top_k`, `temperature`, `num_rows`, `seq_len`,
    `values_dtype`.

    **Example:**

    ```python
    bd.build_teacher_cache(model, rows, "runs/cache", top_k=8, row_index=range(16))
    cache = bd.TeacherCache("runs/cache")
    ids, logprobs, log_tail = cache.take([0, 5, 7])   # numpy, [3, seq, k] / [3, seq]
    ```
    """

    def __init__(self, folder: str | os.PathLike, *, complete: bool = True):
        self.folder = pathlib.Path(folder)
        path = self.folder / _META
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a teacher cache (no {_META}); "
                                    "build one with `blockdistill cache-teacher`")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.folder} is not a teacher cache of version {CACHE_VERSION} "
                             f"(format {self.meta.get('format')!r}, version {self.meta.get('version')!r})")
        if complete and not self.meta.get("complete"):
            done = self.rows_done()
            raise ValueError(f"teacher cache {self.folder} is incomplete ({done} of {self.meta['cached_rows']} rows): "
                             "rerun the same `blockdistill cache-teacher` command to finish it")
        self.top_k = int(self.meta["top_k"])
        self.temperature = float(self.meta["temperature"])
        self.num_rows = int(self.meta["rows"])
        self.num_cached = int(self.meta["cached_rows"])
        #: the rows cached, sorted (`None`: all `num_rows`, in order)
        self.row_index = np.load(self.folder / _ROWS) if (self.folder / _ROWS).is_file() else None
        self.seq_len = int(self.meta["seq_len"])
        self.values_dtype = self.meta["values_dtype"]
        mode = "r" if complete else "r+"
        self.ids = np.load(self.folder / _IDS, mmap_mode=mode)
        self.values = np.load(self.folder / _VALUES, mmap_mode=mode)
        self.log_tail = np.load(self.folder / _TAIL, mmap_mode=mode)
        self.tail_mass = np.load(self.folder / _TAIL_MASS, mmap_mode=mode)

    def rows_done(self) -> int:
        """Rows written so far (all of them once complete)."""
        progress = self.folder / "progress.json"
        if self.meta.get("complete"):
            return int(self.meta["cached_rows"])
        return int(json.loads(progress.read_text())["rows_done"]) if progress.is_file() else 0

    def positions(self, indices) -> np.ndarray:
        """Where rows `indices` (of the packed rows the cache was made from) lie in the
        cache; a `KeyError` naming the first row it does not hold."""
        index = np.asarray(indices, np.int64).reshape(-1)
        if self.row_index is None:
            return index
        found = np.searchsorted(self.row_index, index).clip(0, len(self.row_index) - 1)
        missing = index[self.row_index[found] != index]
        if missing.size:
            raise KeyError(
                f"row {int(missing[0])} is not in teacher cache {self.folder}: it holds only the rows of "
                f"{self.meta['selection']}; rebuild it for the run's steps and seeds"
            )
        return found

    def take(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cached rows at `indices` (row numbers of the packed rows the cache was made
        from): ids (`int32`), log-probabilities (`float32`) and log tail mass (`float32`),
        stacked on a leading axis."""
        index = self.positions(indices)
        values = self.values[index].view(_values_dtype(self.values_dtype)).astype(np.float32)
        return np.asarray(self.ids[index]), values, np.asarray(self.log_tail[index])

    @property
    def mean_tail_mass(self) -> float:
        """The teacher's mean probability mass outside its top-k, over the positions that
        count (a bound on what the tail bucket leaves out: see the module docs)."""
        return float(self.meta["mean_tail_mass"])

    def teacher_eval_loss(self, rows: int, val_sha256: str) -> float | None:
        """The teacher's held-out loss over `rows` held-out rows spread over the split whose
        digest is `val_sha256` ([`PackedRows.digest`][blockdistill.PackedRows.digest]), if
        the cache measured it on those rows (`None` otherwise: another count or other
        held-out rows)."""
        record = self.meta.get("teacher_eval")
        if record and int(record["rows"]) == rows and record.get("val_sha256") == val_sha256:
            return float(record["loss"])
        return None

    def check(self, expected: dict[str, Any]) -> None:
        """A `ValueError` naming each of `expected`'s keys (`teacher`, `tokenizer`, `data`,
        `temperature`, ...) whose recorded value differs."""
        changes = [key for key, value in expected.items() if self.meta.get(key) != value]
        if changes:
            detail = "; ".join(f"{key}: cache has {self.meta.get(key)!r}, this run has {expected[key]!r}"
                               for key in changes)
            raise ValueError(f"teacher cache {self.folder} was made for another run ({detail}): "
                             "build a cache for this one with `blockdistill cache-teacher`")

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.folder)!r}, rows={self.num_cached} of {self.num_rows}, seq_len={self.seq_len}, "
                f"top_k={self.top_k}, temperature={self.temperature})")


def _write_meta(folder: pathlib.Path, meta: dict[str, Any]) -> None:
    write_json(folder / _META, meta)


def build_teacher_cache(
    teacher,
    rows,
    out: str | os.PathLike,
    *,
    top_k: int = 64,
    temperature: float = 1.0,
    values_dtype: str = "float16",
    batch_size: int = 8,
    identity: dict[str, Any] | None = None,
    mesh=None,
    progress: bool = False,
    flush_every: int = 16,
    should_stop: Callable[[], bool] | None = None,
    row_index=None,
    selection: dict[str, Any] | str = "all",
) -> TeacherCache:
    """Run `teacher` once over every row of `rows` and write its top-k log-probabilities
    to `out`: resumable (rerun to continue after a crash or an interrupt; the rows written
    are recorded after their data is flushed), complete when `meta["complete"]` is true.

    **Arguments:**

    - `teacher`: a [`blockdistill.Transformer`][] or [`blockdistill.Teacher`][].
    - `rows`: the [`blockdistill.PackedRows`][] to cache (distillation reads the cache at
      the same row indices: build it from the run's training rows).
    - `out`: the cache folder.
    - `top_k`, `temperature`: ids kept per position; the temperature of the stored
      log-probabilities (distillation must use the same).
    - `values_dtype`: `"float16"` (default; log-probabilities to about 3 decimal
      digits) or `"bfloat16"`.
    - `batch_size`: rows per teacher forward (on a mesh, a multiple of the `data` axis).
    - `identity`: what the cache was made from (teacher digest, tokenizer, data), kept in
      `meta` and compared by [`TeacherCache.check`][blockdistill.TeacherCache.check].
    - `mesh`: optional mesh: the rows of each forward are split over its `data` axis, and
      each process computes and writes only its own rows.
    - `progress`: show a progress bar; `should_stop`: polled between batches (an
      interrupt stops cleanly, resumable).
    - `row_index`: cache only these rows of `rows` (default: all of them), e.g. the rows
      a run reads ([`blockdistill.run_rows`][]); `selection` says which, in `meta` (a
      run that reads another row gets a `KeyError` naming it).

    **Example:**

    ```python
    # the rows that a run of 10 steps at batch size 8 (seed 0) reads, for a tiny model
    needed = bd.run_rows(len(data.train), batch_size=8, steps=10)
    cache = bd.build_teacher_cache(model, data.train, "runs/cache", top_k=64, row_index=needed)
    cache.mean_tail_mass   # the teacher's mean probability outside its top 64
    ```
    """
    from ..nn.model import Transformer
    from ..nn.teacher import Teacher
    from ..parallel.sharding import process_rows, shard_local_batch, shard_model

    model = teacher.model if isinstance(teacher, Teacher) else teacher
    if not isinstance(model, Transformer):
        raise TypeError(f"teacher must be a Transformer or a Teacher, got {type(teacher).__name__}")
    vocab = model.config.vocab_size
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k={top_k!r} is invalid: must be in [1, {vocab}] (the teacher's vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be positive")
    value_type = _values_dtype(values_dtype)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be positive")
    out = pathlib.Path(out)
    n, seq_len = len(rows), rows.seq_len
    if n == 0:
        raise ValueError("rows is empty: nothing to cache")
    if row_index is not None:
        row_index = np.unique(np.asarray(row_index, np.int64))
        if row_index.size == 0 or row_index[0] < 0 or row_index[-1] >= n:
            raise ValueError(f"row_index must hold rows in [0, {n}), got {row_index.size} rows "
                             f"from {row_index.min(initial=0)} to {row_index.max(initial=-1)}")
    m = n if row_index is None else len(row_index)
    meta = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "rows": n, "cached_rows": m, "selection": selection,
        "seq_len": seq_len, "top_k": top_k, "temperature": float(temperature), "values_dtype": values_dtype,
        "vocab_size": vocab, **(identity or {}),
    }
    writer = jax.process_index() == 0
    if (out / _META).is_file():
        old = json.loads((out / _META).read_text())
        changed = sorted(k for k in meta if old.get(k) != meta[k])
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in changed)
            raise ValueError(f"{out} holds a teacher cache of other settings ({detail}); use another --out")
        if old.get("complete"):
            return TeacherCache(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if writer:
            np.lib.format.open_memmap(out / _IDS, "w+", np.int32, (m, seq_len, top_k))
            np.lib.format.open_memmap(out / _VALUES, "w+", np.uint16, (m, seq_len, top_k))
            np.lib.format.open_memmap(out / _TAIL, "w+", np.float32, (m, seq_len))
            np.lib.format.open_memmap(out / _TAIL_MASS, "w+", np.float16, (m, seq_len))
            if row_index is not None:
                np.save(out / _ROWS, row_index)
            _write_meta(out, {**meta, "complete": False})
    _barrier("blockdistill-cache-created")  # process 0 made the files; the others open them
    cache = TeacherCache(out, complete=False)
    progress_files = [out / ("progress.json" if jax.process_count() == 1 else f"progress-{index}.json")
                      for index in range(jax.process_count())]
    progress_file = progress_files[jax.process_index()]
    # every process computes its rows of the same batches: all resume where the slowest stopped
    start = min(_rows_done(f) for f in progress_files)
    start -= start % batch_size
    global_rows = np.arange(n) if row_index is None else row_index

    if mesh is not None:
        model = shard_model(model, mesh, shard_layers=False)
        share = process_rows(mesh, batch_size)
    else:
        share = slice(0, batch_size)

    @jax.jit
    def forward(model, tokens, segment_ids):
        logits = jax.vmap(lambda t, seg: model(t, segment_ids=seg).logits)(tokens, segment_ids)
        sparse = top_k_logits(logits, top_k, temperature)
        return sparse.ids, sparse.logprobs.astype(value_type), sparse.log_tail, jnp.exp(sparse.log_tail)

    bar = None
    if progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=m, initial=start, unit="row", desc="caching the teacher", dynamic_ncols=True)
    try:
        since_flush = 0
        for lo in range(start, m, batch_size):
            if should_stop is not None and _any_process(should_stop()):
                break
            # positions in the cache; the last batch padded with its last row, written once
            position = np.minimum(np.arange(lo, lo + batch_size), m - 1)
            mine = position[share]
            tokens, _, segment_ids = rows.take(global_rows[mine])
            if mesh is None:
                outputs = forward(model, jnp.asarray(tokens), jnp.asarray(segment_ids))
                where, arrays = mine, [np.asarray(o) for o in outputs]
            else:
                with jax.set_mesh(mesh):
                    outputs = forward(model, *shard_local_batch(mesh, batch_size, tokens, segment_ids))
                where, arrays = _local_rows(outputs, position)
            keep = np.ones(len(where), bool)
            keep[1:] = where[1:] != where[:-1]
            target = where[keep]
            ids, values, log_tail, tail_mass = (a[keep] for a in arrays)
            cache.ids[target] = ids
            cache.values[target] = values.view(np.uint16)
            cache.log_tail[target] = log_tail
            cache.tail_mass[target] = tail_mass.astype(np.float16)
            done = min(lo + batch_size, m)
            since_flush += 1
            if since_flush >= flush_every or done == m:
                _flush(cache, progress_file, done)
                since_flush = 0
            if bar is not None:
                bar.update(done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    _barrier("blockdistill-cache-written")
    if min(_rows_done(f) for f in progress_files) < m:
        return cache
    if writer:
        weights = _valid_positions(rows, global_rows)
        tail = np.asarray(cache.tail_mass, np.float32)
        mean_tail = float(np.sum(tail * weights) / max(np.sum(weights), 1.0))
        _write_meta(out, {**meta, "complete": True, "mean_tail_mass": mean_tail})
    _barrier("blockdistill-cache-complete")
    return TeacherCache(out)


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds in any process (every process gets the same answer, so all stop
    at the same batch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _barrier(name: str) -> None:
    """Wait for every process (a no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _local_rows(outputs, index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """This process's rows of sharded outputs (split over their leading axis): the row
    indices (from `index`, the batch's row numbers) and each output's rows, in order."""
    first = outputs[0].addressable_shards
    starts = sorted({shard.index[0].indices(len(index))[0]: i for i, shard in enumerate(first)}.items())
    order = [i for _, i in starts]
    rows = np.concatenate([index[first[i].index[0]] for i in order])
    arrays = [np.concatenate([np.asarray(o.addressable_shards[i].data) for i in order]) for o in outputs]
    return rows, arrays


def _valid_positions(rows, global_rows: np.ndarray) -> np.ndarray:
    """`[len(global_rows), seq]` float weights: 1 where a position of those rows holds a
    token (not padding)."""
    weights = np.zeros((len(global_rows), rows.seq_len), np.float32)
    for lo in range(0, len(global_rows), 256):
        _, mask, _ = rows.take(global_rows[lo : lo + 256])
        weights[lo : lo + len(mask)] = mask
    return weights


def _rows_done(progress_file: pathlib.Path) -> int:
    return int(json.loads(progress_file.read_text())["rows_done"]) if progress_file.is_file() else 0


def _flush(cache: TeacherCache, progress_file: pathlib.Path, done: int) -> None:
    """Data first, then the count of rows it holds (atomically): a crash never records rows
    that were not written."""
    for array in (cache.ids, cache.values, cache.log_tail, cache.tail_mass):
        array.flush()
    write_json(progress_file, {"rows_done": done})
