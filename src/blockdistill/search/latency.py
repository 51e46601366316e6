"""Measured latency of candidate blocks: each block shape's forward timed on this
machine's default device, so that a search can budget what a student costs to run, not
only what its formulas count.

A block's latency depends on its shape alone (not on its layer or its weights), so every
candidate shape is timed once: one layer of that shape on `[batch, seq, dim]`, compiled
first, then timed in rounds that visit every shape in turn (every other round in reverse
order, so that drift of the machine falls on all shapes alike); the median of the rounds
is kept. The part every student shares (embeddings, final norm and output head) is timed
the same way. Results are kept in the cache folder, keyed by everything that sets them
(the shapes, the widths, batch and sequence, dtype, backend and device kind, jax
version): a second search on the same machine reads them back in no time.
"""

import hashlib
import json
import os
import pathlib
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._files import write_json
from ..data.store import cache_root
from ..nn.config import BlockShape, TransformerConfig
from ..nn.model import Transformer

#: 2: each block timed at its own shape (compact layers; 1 timed them padded to the teacher's widths)
LATENCY_VERSION = 2


def _one_layer(config: TransformerConfig, shape: BlockShape) -> Transformer:
    """A model of one layer of `shape`, stored and run at that shape (the identity has no
    parameters)."""
    return Transformer(config.replace(n_layers=1, layer_shapes=(shape,)), key=jax.random.key(0))


def _timers(config: TransformerConfig, shapes: tuple[BlockShape, ...], batch_size: int, seq_len: int):
    """One compiled program per shape (its layer on the hidden states) and one for the
    shared part (embeddings, final norm, head), each a function of no arguments."""
    hidden = jax.random.normal(jax.random.key(1), (batch_size, seq_len, config.dim), jnp.float32)
    tokens = jax.random.randint(jax.random.key(2), (batch_size, seq_len), 0, config.vocab_size)

    def timer(fn, *args):
        compiled = eqx.filter_jit(fn).lower(*args).compile()
        return lambda: jax.block_until_ready(compiled(*args))

    def layer_forward(stack, x):
        return jax.vmap(lambda h: stack(h)[0])(x)

    programs = []
    for shape in shapes:
        if not (shape.has_attention or shape.has_mlp or shape.linear):  # the identity runs nothing
            programs.append(None)
            continue
        programs.append(timer(layer_forward, _one_layer(config, shape).layers, hidden))
    shared = _one_layer(config, BlockShape(0, 0))  # no layer: the embeddings, final norm and head
    programs.append(timer(lambda model, t: jax.vmap(lambda row: model(row).logits)(t), shared, tokens))
    return programs


def block_latencies(
    config: TransformerConfig,
    shapes: tuple[BlockShape, ...],
    *,
    batch_size: int,
    seq_len: int,
    rounds: int = 7,
    cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Seconds of one forward of each block shape in `shapes` on `batch_size` rows of
    `seq_len` tokens at the widths of `config` (0 for the identity), and of the part every
    student shares (embeddings, final norm, head), timed on this process's default device.

    **Arguments:**

    - `config`: the teacher's config (its widths, vocabulary, dtype and attention kernel).
    - `shapes`: the block shapes to time, e.g. a library's `shapes`.
    - `batch_size`, `seq_len`: the batch each forward runs on.
    - `rounds`: timed rounds (the median is kept); every shape runs once per round.
    - `cache`: where measurements are kept (default: the token stores' cache folder,
      `$BLOCKDISTILL_CACHE`); a measurement with the same key is read back.

    **Returns** a dict: `blocks` (seconds per shape, in the order of `shapes`), `shared`
    (seconds), `device`, `key` and `cached` (whether it was read back).

    **Example:**

    ```python
    timed = bd.block_latencies(cfg, (bd.BlockShape(cfg.mlp_dim, cfg.n_kv_heads), bd.BlockShape(0, 0)),
                               batch_size=2, seq_len=16, rounds=3)
    timed["blocks"][1]   # 0.0: the identity runs nothing
    ```
    """
    device = jax.devices()[0]
    identity = {
        "version": LATENCY_VERSION, "config": config.replace(n_layers=1, layer_shapes=None).to_dict(),
        "shapes": [[s.mlp_dim, s.n_kv_heads, s.linear] for s in shapes], "batch_size": batch_size,
        "seq_len": seq_len, "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__, "rounds": rounds,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    path = pathlib.Path(cache or cache_root()) / "latency" / f"{key}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        return {**kept, "cached": True}
    programs = _timers(config, tuple(shapes), batch_size, seq_len)
    live = [i for i, program in enumerate(programs) if program is not None]
    for i in live:  # each program once more before timing (the first call of an executable warms it)
        programs[i]()
    times: dict[int, list[float]] = {i: [] for i in live}
    for r in range(rounds):
        for i in (live if r % 2 == 0 else live[::-1]):
            start = time.perf_counter()
            programs[i]()
            times[i].append(time.perf_counter() - start)
    median = {i: float(np.median(values)) for i, values in times.items()}
    result = {"blocks": [median.get(i, 0.0) for i in range(len(shapes))], "shared": median[len(shapes)],
              "device": identity["device"], "backend": identity["backend"], "key": key,
              "batch_size": batch_size, "seq_len": seq_len}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return {**result, "cached": False}
