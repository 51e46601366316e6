"""The Grain pipeline over packed rows: the row indices shuffled anew every epoch, grouped
into global batches, each process reading only its own rows of each batch (and, with a
teacher cache, the cached teacher logits of the same rows). Its state is small JSON; a
restored iterator yields exactly the batches an uninterrupted one would have."""

import numpy as np

from .store import PackedRows


class _ReadShare:
    """Grain map: a global batch's row indices -> this process's rows of it, read (with
    their cached teacher logits, given a teacher cache)."""

    def __init__(self, rows: PackedRows, share: slice, teacher_cache=None):
        self.rows, self.share, self.teacher_cache = rows, share, teacher_cache

    def __call__(self, indices: np.ndarray):
        mine = np.asarray(indices)[self.share]
        if self.teacher_cache is None:
            return self.rows.take(mine)
        return self.rows.take(mine), self.teacher_cache.take(mine)


def _index_batches(n: int, batch_size: int, seed: int):
    """The row indices of every global batch, endlessly (a Grain `MapDataset`): the rows
    shuffled anew each epoch, cut into batches, the rest of each epoch skipped."""
    import grain

    indices = grain.MapDataset.range(n).shuffle(seed=seed)
    return indices.batch(batch_size, drop_remainder=True).repeat(None)


def run_rows(num_rows: int, *, batch_size: int, steps: int, seeds=(0,)) -> np.ndarray:
    """The rows that runs of `steps` steps read from [`blockdistill.batch_iterator`][]
    over `num_rows` rows, for each of `seeds` (sorted, each once): what a teacher cache
    for those runs must hold.

    **Example:**

    ```python
    rows = bd.run_rows(len(data.train), batch_size=8, steps=15, seeds=(0, 1, 2))
    cache = bd.build_teacher_cache(teacher, data.train, "runs/cache", top_k=16, row_index=rows)
    ```
    """
    if batch_size <= 0 or steps <= 0:
        raise ValueError(f"batch_size={batch_size} and steps={steps} must be positive")
    if batch_size > num_rows:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({num_rows} sequences)")
    read = [np.asarray(_index_batches(num_rows, batch_size, seed)[step]) for seed in seeds for step in range(steps)]
    return np.unique(np.concatenate(read)).astype(np.int64)


def batch_iterator(
    rows: PackedRows,
    *,
    batch_size: int,
    seed: int = 0,
    share: slice | None = None,
    prefetch: int = 2,
    teacher_cache=None,
):
    """The Grain pipeline of training batches: an endless, resumable iterator of
    [`blockdistill.Split`][] batches.

    Each epoch shuffles the row indices anew (Grain's index shuffle, seeded by `seed` and
    the epoch) and cuts them into global batches of `batch_size` (the rows left over at an
    epoch's end are skipped that epoch); a process reads only the rows `share` of each
    global batch (default all), so with several processes nobody reads another's rows.
    Batches are prepared `prefetch` ahead in a background thread. With `teacher_cache`
    (a [`blockdistill.TeacherCache`][] built from these rows) each item is a pair: the
    batch and its rows' cached `(ids, logprobs, log_tail)`.

    The iterator's `get_state()` is a small JSON-able dict, and `set_state(state)` on a
    fresh iterator over the same rows continues with exactly the batches an uninterrupted
    one would have given.

    **Example:**

    ```python
    batches = bd.batch_iterator(data.train, batch_size=8, seed=0)
    tokens, mask, segment_ids = next(batches)
    state = batches.get_state()
    ```
    """
    import grain

    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be positive")
    if batch_size > len(rows):
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({len(rows)} sequences)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid: must be in [0, 2**32)")
    if teacher_cache is not None and (teacher_cache.num_rows, teacher_cache.seq_len) != (len(rows), rows.seq_len):
        raise ValueError(f"{teacher_cache} does not fit these rows ({len(rows)} rows of {rows.seq_len} tokens)")
    batches = _index_batches(len(rows), batch_size, seed)
    batches = batches.map(_ReadShare(rows, share or slice(None), teacher_cache))
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(batches.to_iter_dataset(options))
