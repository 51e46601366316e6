"""Shardings on a mesh (see [`mesh`][blockdistill.parallel.mesh]): a `data` axis for the batch, an `fsdp` axis that splits the
batch and every parameter, a `layers` axis for stacked layers.

Everything here is a thin layer over JAX's own sharding: a `jax.sharding.Mesh` with the
axes `("data", "fsdp", "layers")`, `NamedSharding`s placed with `jax.device_put` (or, across
processes, `jax.make_array_from_callback`), and `jax.lax.with_sharding_constraint` inside
the jitted step. XLA's SPMD partitioner does the rest.

The rules:

- batches (`tokens`, `mask`, and every per-example array derived from them) are split
  over `data` and `fsdp` together on their leading `batch` axis;
- with an `fsdp` axis, every parameter of the student and the teacher, and every
  optimizer-state leaf that mirrors one, is split over `fsdp` on its largest dimension
  that `fsdp` divides (never a stack's leading `layers` axis); inside the scan over
  layers each layer's weights are gathered whole just before use
  ([`gather_fsdp`][blockdistill.parallel.sharding.gather_fsdp]), so only one layer's weights are
  ever whole on a device (fully sharded data parallelism);
- the stacked decoder-layer parameters of a student (every array under
  `Transformer.layers.layers` whose leading axis has the stack's depth) are split over
  `layers` on that axis, and so is every optimizer-state leaf that mirrors one of them
  (Adam's `mu` and `nu`: found by the same path and shape); a heterogeneous student's
  segments (`Transformer.layers.layers[i]`) are split so where `layers` divides the
  segment's depth, and kept whole on `layers` otherwise;
- per-layer teacher states fed to the student's blocks are split over `data` and
  `layers` (`[batch, layers, seq, dim]`): the replicated teacher computes them for its
  `data` slice on every `layers` device, and each device keeps (equal depths) or reads
  (with a layer map) only its own layers, a local slice;
- everything else (step counts; without `fsdp`, embeddings, final norm, head and the
  teacher's parameters) is replicated.
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .mesh import BATCH_AXES, FSDP_AXIS, LAYERS_AXIS, check_mesh

# ----------------------------------------------------------------------------- rules


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "name", getattr(entry, "key", entry))) for entry in path)


def _in_layer_stack(names: tuple[str, ...]) -> bool:
    """True for a path through `Transformer.layers.layers` (the stacked DecoderLayer)."""
    return any(names[i : i + 2] == ("layers", "layers") for i in range(len(names) - 1))


def _in_segment(names: tuple[str, ...]) -> bool:
    """True for a path through one segment of a heterogeneous stack, `layers.layers[i]`."""
    return any(names[i : i + 2] == ("layers", "layers") and names[i + 2].startswith("[")
               for i in range(len(names) - 2))


def _spec_for(
    names: tuple[str, ...], leaf: Any, n_layers: int, shard_layers: bool, fsdp: int = 1, layers: int = 1
) -> PartitionSpec:
    ndim = len(getattr(leaf, "shape", ()))
    segment = _in_segment(names) and ndim >= 1
    in_stack = segment or (_in_layer_stack(names) and ndim >= 1 and leaf.shape[0] == n_layers)
    spec: list[str | None] = [None] * ndim
    if in_stack and shard_layers and (not segment or leaf.shape[0] % layers == 0):
        spec[0] = LAYERS_AXIS
    if fsdp > 1:
        # the largest dimension fsdp divides (never the stacked layers axis) is split over it
        candidates = [d for d in range(1 if in_stack else 0, ndim) if leaf.shape[d] % fsdp == 0]
        if candidates:
            spec[max(candidates, key=lambda d: (leaf.shape[d], -d))] = FSDP_AXIS
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _depth(model: eqx.Module) -> int:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "n_layers"):
        raise ValueError(
            f"cannot find the depth of a {type(model).__name__}: expected a Transformer or a "
            "Teacher (something with .config.n_layers)"
        )
    return int(config.n_layers)


def tree_shardings(tree: Any, mesh: Mesh, *, n_layers: int, shard_layers: bool = True) -> Any:
    """The `NamedSharding` of every array leaf of `tree` (`None` elsewhere).

    A leaf whose path passes through a `LayerStack`'s stacked `layers.layers` and whose
    leading axis has length `n_layers` is split over `layers` on that axis (unless
    `shard_layers=False`); every other array is replicated. The rule reads paths, so it
    applies equally to a model, its gradients and an optimizer state whose leaves mirror
    the model's (optax's `mu` / `nu`).
    """

    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    layers = mesh.shape.get(LAYERS_AXIS, 1)

    def sharding(path, leaf):
        if not eqx.is_array(leaf):
            return None
        return NamedSharding(mesh, _spec_for(_path_names(path), leaf, n_layers, shard_layers, fsdp, layers))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Put one array onto `sharding` (also across processes, from a host copy)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _shard_tree(tree: Any, shardings: Any) -> Any:
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.tree.map(
        lambda x, s: x if s is None else _place(x, s), arrays, shardings, is_leaf=lambda x: x is None
    )
    return eqx.combine(placed, static)


def shard_model(model: eqx.Module, mesh: Mesh, *, shard_layers: bool = True) -> eqx.Module:
    """Place a [`blockdistill.Transformer`][] (or a [`blockdistill.Teacher`][]) on `mesh`.

    Stacked decoder-layer parameters are split over `layers` on their leading axis (unless
    `shard_layers=False`, what the training loop does with the teacher: see the scaling
    guide for the trade-off); on a mesh with an `fsdp` axis every parameter is also split
    over `fsdp` on its largest dimension that `fsdp` divides; the rest is replicated.
    Raises a `ValueError` naming both numbers when `layers` does not divide the depth.

    **Example:**

    ```python
    mesh = bd.make_mesh("data=4,layers=2")   # 8 devices; layers=2 divides the depth
    student = bd.shard_model(student, mesh)
    teacher = bd.shard_model(teacher, mesh, shard_layers=False)   # replicated
    ```
    """
    n_layers = _depth(model)
    if shard_layers:
        check_mesh(mesh, n_layers=n_layers)
    shardings = tree_shardings(
        eqx.filter(model, eqx.is_array), mesh, n_layers=n_layers, shard_layers=shard_layers
    )
    return _shard_tree(model, shardings)


def shard_opt_state(opt_state: Any, model: eqx.Module, mesh: Mesh) -> Any:
    """Place an optax state of `model` on `mesh` like the parameters it mirrors.

    Leaves that mirror a stacked layer parameter (same path below the optimizer's own
    containers, same shape, e.g. Adam's `mu` and `nu`) are split over `layers`; step
    counts and everything else are replicated.

    **Example:**

    ```python
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    opt_state = bd.shard_opt_state(opt_state, student, mesh)
    ```
    """
    n_layers = _depth(model)
    return _shard_tree(opt_state, tree_shardings(opt_state, mesh, n_layers=n_layers))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batch arrays: the leading axis over `data` and `fsdp`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """Global batch arrays split over `data` on their leading axis.

    Every process passes the same global batch (blockdistill's `Batcher` is
    deterministic, so all processes draw the same one); each process materialises only
    the rows of its own devices (`jax.make_array_from_callback`), so nothing but those
    rows reaches its accelerators.

    **Example:**

    ```python
    tokens_np, mask_np = np.asarray(batch_tokens), np.asarray(mask)   # a global host batch
    segments_np = mask_np.astype(np.int32)                             # one document a row
    tokens, mask, segment_ids = bd.shard_batch(mesh, tokens_np, mask_np, segments_np)  # over "data"
    ```
    """
    sharding = batch_sharding(mesh)
    placed = []
    for array in arrays:
        host = np.asarray(array)
        check_mesh(mesh, batch_size=host.shape[0])
        placed.append(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))
    return tuple(placed)


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch of `batch_size` that this process's devices hold when
    the batch is split over `data` (all of them with one process): the only rows this
    process needs to read. A `ValueError` when they are not one contiguous range.

    **Example:**

    ```python
    share = bd.process_rows(mesh, batch_size=32)   # e.g. slice(16, 32) on process 1 of 2
    ```
    """
    check_mesh(mesh, batch_size=batch_size)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({i for index in index_map.values() for i in range(*index[0].indices(batch_size))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"the devices of process {jax.process_index()} hold rows {rows} of each batch of "
                         f"{batch_size} on mesh {dict(mesh.shape)}: not one range; order the mesh's devices "
                         "by process")
    return slice(rows[0], rows[-1] + 1)


def shard_local_batch(mesh: Mesh, batch_size: int, *arrays: Any) -> tuple[jax.Array, ...]:
    """Global batch arrays over `data` built from this process's rows only
    (`process_rows(mesh, batch_size)` of each global batch, as a
    [`blockdistill.batch_iterator`][] with that `share` reads them).

    **Example:**

    ```python
    batches = bd.batch_iterator(rows, batch_size=32, share=bd.process_rows(mesh, 32))
    tokens, mask, segment_ids = bd.shard_local_batch(mesh, 32, *next(batches))
    ```
    """
    sharding = batch_sharding(mesh)
    share = process_rows(mesh, batch_size)
    placed = []
    for array in arrays:
        local = np.asarray(array)
        expected = share.stop - share.start
        if local.shape[0] != expected:
            raise ValueError(f"this process's share of a batch of {batch_size} has {expected} rows, "
                             f"got an array of {local.shape[0]}")
        global_shape = (batch_size, *local.shape[1:])
        placed.append(jax.make_array_from_process_local_data(sharding, local, global_shape))
    return tuple(placed)


def host_arrays(tree: Any) -> Any:
    """Every `jax.Array` leaf of `tree` gathered into one host `numpy` array.

    Used to write checkpoints that do not depend on the mesh they came from. Arrays
    that span several processes are gathered with
    `jax.experimental.multihost_utils.process_allgather` (every process must call this).

    **Example:**

    ```python
    host_student = bd.host_arrays(student)   # numpy leaves, same tree
    ```
    """

    def gather(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(gather, tree)


# ----------------------------------------------------------------------------- in the step


def constrain(x: jax.Array, *spec: str | tuple[str, ...] | None) -> jax.Array:
    """`with_sharding_constraint(x, P(*spec))` under a mesh set with `jax.set_mesh` that
    has all the named axes; otherwise `x` unchanged (single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    named = [a for axis in spec if axis is not None for a in ((axis,) if isinstance(axis, str) else axis)]
    if mesh.empty or any(axis not in mesh.axis_names for axis in named):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def gather_fsdp(tree: Any) -> Any:
    """One layer's parameters gathered whole before use, under a mesh with an `fsdp` axis
    (identity otherwise): called inside the scan over layers, it makes XLA all-gather only
    that layer's weights there (and, under `remat`, again in the backward pass instead of
    keeping them), while the activations stay split over the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or FSDP_AXIS not in mesh.axis_names or dict(mesh.shape)[FSDP_AXIS] == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), tree)


def constrain_tree(tree: Any, shardings: Any) -> Any:
    """`with_sharding_constraint` on every array leaf of `tree` (`shardings` from
    [`tree_shardings`][blockdistill.parallel.sharding.tree_shardings])."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    constrained = jax.tree.map(
        lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s),
        arrays, shardings, is_leaf=lambda x: x is None,
    )
    return eqx.combine(constrained, static)
