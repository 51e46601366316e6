"""Meshes and shardings: a `data` axis for the batch, a `layers` axis for stacked layers.

Everything here is a thin layer over JAX's own sharding: a `jax.sharding.Mesh` with the
axes `("data", "layers")`, `NamedSharding`s placed with `jax.device_put` (or, across
processes, `jax.make_array_from_callback`), and `jax.lax.with_sharding_constraint` inside
the jitted step. XLA's SPMD partitioner does the rest.

The rules:

- batches (`tokens`, `mask`, and every per-example array derived from them) are split
  over `data` on their leading `batch` axis;
- the stacked decoder-layer parameters of a student (every array under
  `Transformer.layers.layers` whose leading axis has the stack's depth) are split over
  `layers` on that axis, and so is every optimizer-state leaf that mirrors one of them
  (Adam's `mu` and `nu`: found by the same path and shape);
- per-layer teacher states fed to the student's blocks are split over `data` and
  `layers` (`[batch, layers, seq, dim]`): the replicated teacher computes them for its
  `data` slice on every `layers` device, and each device keeps (equal depths) or reads
  (with a layer map) only its own layers, a local slice;
- everything else (embeddings, final norm, head, step counts, the teacher's parameters
  by default) is replicated.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
LAYERS_AXIS = "layers"
MESH_AXES = (DATA_AXIS, LAYERS_AXIS)

_ITEM = re.compile(r"^\s*(?P<name>[^=\s]*)\s*=\s*(?P<size>[^=]*?)\s*$")


# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """Parse a mesh spec such as `"data=2,layers=4"` into `{"data": 2, "layers": 4}`.

    Axes left out have size 1 (`"layers=8"` is `{"data": 1, "layers": 8}`). Unknown axis
    names, repeated axes, sizes that are not positive integers and malformed items are a
    `ValueError` that names the culprit.

    **Example:**

    ```python
    bd.parse_mesh("data=2,layers=4")  # {"data": 2, "layers": 4}
    bd.parse_mesh("data=8")           # {"data": 8, "layers": 1}
    ```
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh={spec!r} is invalid: expected 'data=N,layers=M'")
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        match = _ITEM.match(item)
        if match is None or not match.group("name"):
            raise ValueError(
                f"mesh={spec!r} is invalid: {item.strip()!r} is not of the form AXIS=SIZE "
                "(e.g. 'data=2,layers=4')"
            )
        name, size_text = match.group("name"), match.group("size")
        if name not in MESH_AXES:
            raise ValueError(
                f"mesh={spec!r} is invalid: unknown axis {name!r}; the axes are {MESH_AXES}"
            )
        if name in sizes:
            raise ValueError(f"mesh={spec!r} is invalid: axis {name!r} is given twice")
        try:
            size = int(size_text)
        except ValueError:
            raise ValueError(
                f"mesh={spec!r} is invalid: {name}={size_text!r} is not an integer"
            ) from None
        if size <= 0:
            raise ValueError(f"mesh={spec!r} is invalid: {name}={size} must be positive")
        sizes[name] = size
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(
    spec: str | Mapping[str, int], *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `jax.sharding.Mesh` with the axes `("data", "layers")`.

    **Arguments:**

    - `spec`: `"data=2,layers=4"` (see [`blockdistill.parse_mesh`][]) or a mapping
      `{"data": 2, "layers": 4}`.
    - `devices`: the devices to use, default `jax.devices()` (all devices of all
      processes). The product of the axis sizes must equal their number.

    **Returns:** a mesh built by `jax.make_mesh` with `Auto` axis types (XLA propagates
    shardings from the ones blockdistill places and constrains).

    **Example:**

    ```python
    mesh = bd.make_mesh("data=2,layers=4")   # needs 8 devices
    mesh.shape                               # {"data": 2, "layers": 4}
    ```
    """
    if isinstance(spec, str):
        sizes = parse_mesh(spec)
        shown = spec
    else:
        shown = ",".join(f"{k}={v}" for k, v in spec.items())
        sizes = parse_mesh(shown) if spec else parse_mesh("")
    devices = list(jax.devices() if devices is None else devices)
    total = int(np.prod([sizes[axis] for axis in MESH_AXES]))
    if total != len(devices):
        raise ValueError(
            f"mesh={shown!r} has data={sizes[DATA_AXIS]} x layers={sizes[LAYERS_AXIS]} = "
            f"{total} devices, but {len(devices)} devices are available "
            f"({jax.devices()[0].platform}, {jax.process_count()} process(es))"
        )
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def check_mesh(mesh: Mesh, *, batch_size: int | None = None, n_layers: int | None = None) -> None:
    """Raise a `ValueError` naming both numbers when `mesh` does not divide the batch size
    (over `data`) or the student's depth (over `layers`).

    **Example:**

    ```python
    bd.check_mesh(mesh, batch_size=8, n_layers=4)   # fine on data=2,layers=4 and on data=4,layers=2
    ```
    """
    data, layers = mesh.shape[DATA_AXIS], mesh.shape[LAYERS_AXIS]
    if batch_size is not None and batch_size % data != 0:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the mesh's data={data} axis: "
            f"use a batch size that is a multiple of {data}"
        )
    if n_layers is not None and n_layers % layers != 0:
        raise ValueError(
            f"the student has n_layers={n_layers}, which the mesh's layers={layers} axis "
            f"does not divide: use a student depth that is a multiple of {layers} (or a "
            "smaller layers axis)"
        )


# ----------------------------------------------------------------------------- rules


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "name", getattr(entry, "key", entry))) for entry in path)


def _in_layer_stack(names: tuple[str, ...]) -> bool:
    """True for a path through `Transformer.layers.layers` (the stacked DecoderLayer)."""
    return any(names[i : i + 2] == ("layers", "layers") for i in range(len(names) - 1))


def _spec_for(names: tuple[str, ...], leaf: Any, n_layers: int, shard_layers: bool) -> PartitionSpec:
    stacked = (
        shard_layers
        and _in_layer_stack(names)
        and getattr(leaf, "ndim", 0) >= 1
        and leaf.shape[0] == n_layers
    )
    return PartitionSpec(LAYERS_AXIS) if stacked else PartitionSpec()


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

    def sharding(path, leaf):
        if not eqx.is_array(leaf):
            return None
        return NamedSharding(mesh, _spec_for(_path_names(path), leaf, n_layers, shard_layers))

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

    Stacked decoder-layer parameters are split over `layers` on their leading axis;
    everything else is replicated. `shard_layers=False` replicates everything (what the
    training loop does with the teacher: see the scaling guide for the trade-off).
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
    """The sharding of batch arrays: the leading axis over `data`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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


def constrain(x: jax.Array, *spec: str | None) -> jax.Array:
    """`with_sharding_constraint(x, P(*spec))` under a mesh set with `jax.set_mesh` that
    has all the named axes; otherwise `x` unchanged (single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(axis is not None and axis not in mesh.axis_names for axis in spec):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def constrain_tree(tree: Any, shardings: Any) -> Any:
    """`with_sharding_constraint` on every array leaf of `tree` (`shardings` from
    [`tree_shardings`][blockdistill._parallel.tree_shardings])."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    constrained = jax.tree.map(
        lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s),
        arrays, shardings, is_leaf=lambda x: x is None,
    )
    return eqx.combine(constrained, static)


# ----------------------------------------------------------------------------- inspection

_COLLECTIVES = ("all-gather", "all-to-all", "ragged-all-to-all", "collective-permute",
                "all-reduce", "reduce-scatter", "collective-broadcast")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(re.escape(c) for c in _COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[(?P<dims>[0-9,]*)\]")
_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
               "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
               "c64": 64, "c128": 128}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, as [`blockdistill.hlo_collectives`][] reads it.

    - `kind`: `"all-gather"`, `"all-to-all"`, `"collective-permute"`, `"all-reduce"`, ...
    - `name`: the HLO instruction's name.
    - `shapes`: the result shapes (one per operand of a combined collective).
    - `bytes`: the size of the result in bytes, per device.
    - `axes`: the mesh axes along which its device groups extend, i.e. those it moves
      data across, e.g. `("layers",)`.

    **Example:**

    ```python
    forward = jax.jit(lambda model: model(tokens).logits)
    text = forward.lower(bd.shard_model(student, mesh)).compile().as_text()
    gathers = [c for c in bd.hlo_collectives(text, mesh) if c.kind == "all-gather"]
    sum(c.bytes for c in gathers if "layers" in c.axes)  # bytes gathered across layers
    ```
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    bytes: int
    axes: tuple[str, ...]


def _iota_ids(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids if perm is None else ids.transpose(perm)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _groups(line: str, n_devices: int) -> list[list[int]]:
    """Device groups of one collective, from any of XLA's printed formats."""
    pairs = re.search(r"source_target_pairs=\{(?P<body>[0-9,{}\s]*)\}", line)
    if pairs:
        return [_ints(g) for g in re.findall(r"\{([0-9,\s]*)\}", pairs.group("body"))]
    mesh = re.search(
        r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\(\[(?P<dims>[0-9,]*)\]"
        r"(?:T\((?P<perm>[0-9,]*)\))?\))?\s*\{(?P<grouped>[^}]*)\}",
        line,
    )
    if mesh:
        axes = re.findall(r"'(?P<axis>[^']+)'=(?P<size>[0-9]+)", mesh.group("axes"))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        if mesh.group("dims"):
            dims = _ints(mesh.group("dims"))
            perm = _ints(mesh.group("perm")) if mesh.group("perm") else None
            ids = _iota_ids(dims, perm).reshape(sizes)
        else:
            ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        grouped_names = re.findall(r"'([^']+)'", mesh.group("grouped"))
        if re.search(r"[:()]", mesh.group("grouped")):
            raise ValueError(f"cannot read sub-axis device groups in: {line.strip()[:300]}")
        grouped = [names.index(g) for g in grouped_names]
        kept = [i for i in range(len(names)) if i not in grouped]
        moved = np.moveaxis(ids, kept + grouped, list(range(len(names))))
        size = int(np.prod([sizes[i] for i in grouped])) if grouped else 1
        return moved.reshape(-1, size).tolist()
    iota = re.search(
        r"replica_groups=\[(?P<shape>[0-9,]*)\]<=\[(?P<dims>[0-9,]*)\](?:T\((?P<perm>[0-9,]*)\))?",
        line,
    )
    if iota:
        shape = _ints(iota.group("shape"))
        perm = _ints(iota.group("perm")) if iota.group("perm") else None
        return _iota_ids(_ints(iota.group("dims")), perm).reshape(shape).tolist()
    explicit = re.search(r"replica_groups=\{(?P<body>[0-9,{}\s]*)\}", line)
    if explicit:
        groups = [_ints(g) for g in re.findall(r"\{([0-9,\s]*)\}", explicit.group("body"))]
        return groups or [list(range(n_devices))]
    raise ValueError(f"cannot read the device groups of: {line.strip()[:300]}")


def hlo_collectives(hlo_text: str, mesh: Mesh) -> list[Collective]:
    """Every cross-device collective of a compiled SPMD program, with the mesh axes it
    moves data across.

    Reads the text of a compiled executable (`jax.jit(f).lower(...).compile().as_text()`,
    after XLA's SPMD partitioning, so the collectives are the real ones) and, for each
    all-gather, all-to-all, collective-permute, all-reduce or reduce-scatter, turns its
    device groups (`replica_groups` in any of XLA's printed forms, or
    `source_target_pairs`) into mesh coordinates: partition `p` of a program jitted on
    `mesh` runs on `mesh.devices.flat[p]`, so a group extends along an axis when its
    members differ in that axis's coordinate.

    **Example:**

    ```python
    def f(model):
        return model(tokens).logits

    x = bd.shard_model(student, mesh)   # stacked layers split over "layers"
    text = jax.jit(f).lower(x).compile().as_text()
    moving = [c for c in bd.hlo_collectives(text, mesh)
              if c.kind == "all-gather" and "layers" in c.axes]   # the scan gathers them
    ```
    """
    coords = np.stack(np.unravel_index(np.arange(mesh.devices.size), mesh.devices.shape), axis=-1)
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        shapes, n_bytes = [], 0
        for array in _ARRAY_SHAPE.finditer(match.group("shape")):
            dims = tuple(_ints(array.group("dims")))
            shapes.append(dims)
            bits = _DTYPE_BITS.get(array.group("dtype"), 32)
            n_bytes += int(np.prod(dims, dtype=np.int64)) * bits // 8
        axes = set()
        for group in _groups(line, mesh.devices.size):
            members = coords[np.asarray(group, dtype=np.int64)]
            for index, axis in enumerate(mesh.axis_names):
                if len(set(members[:, index].tolist())) > 1:
                    axes.add(axis)
        found.append(Collective(
            kind=match.group("op"), name=match.group("name"), shapes=tuple(shapes),
            bytes=n_bytes, axes=tuple(a for a in mesh.axis_names if a in axes),
        ))
    return found
