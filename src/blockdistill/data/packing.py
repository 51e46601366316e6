"""Packing: documents (token ids) concatenated into fixed-length rows with segment ids,
and the `Split` of tokens, mask and segment ids every batch is made of."""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from .corpus import Document
from .tokenizers import Tokenizer

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
