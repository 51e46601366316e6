"""Device meshes: the `data`, `fsdp` and `layers` axes, a mesh from a spec such as
`"data=2,fsdp=4"`, the checks a run's batch and depth must pass on it, and which rows of
a global batch each process reads. The placement of arrays on a mesh is in
[`sharding`][blockdistill.parallel.sharding]."""

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
LAYERS_AXIS = "layers"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, LAYERS_AXIS)
#: the axes a batch is split over: `data` and `fsdp` (fully sharded data parallelism)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

_ITEM = re.compile(r"^\s*(?P<name>[^=\s]*)\s*=\s*(?P<size>[^=]*?)\s*$")


# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """Parse a mesh spec such as `"data=2,layers=4"` into `{"data": 2, "fsdp": 1, "layers": 4}`.

    Axes left out have size 1 (`"layers=8"` is `{"data": 1, "fsdp": 1, "layers": 8}`). Unknown axis
    names, repeated axes, sizes that are not positive integers and malformed items are a
    `ValueError` that names the culprit.

    **Example:**

    ```python
    bd.parse_mesh("data=2,layers=4")  # {"data": 2, "fsdp": 1, "layers": 4}
    bd.parse_mesh("data=2,fsdp=4")    # {"data": 2, "fsdp": 4, "layers": 1}
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
    """A `jax.sharding.Mesh` with the axes `("data", "fsdp", "layers")`.

    **Arguments:**

    - `spec`: `"data=2,layers=4"`, `"data=2,fsdp=4"` (see [`blockdistill.parse_mesh`][])
      or a mapping `{"data": 2, "layers": 4}`.
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
            f"mesh={shown!r} has data={sizes[DATA_AXIS]} x fsdp={sizes[FSDP_AXIS]} x layers={sizes[LAYERS_AXIS]} = "
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
    (over `data` x `fsdp`) or the student's depth (over `layers`).

    **Example:**

    ```python
    bd.check_mesh(mesh, batch_size=8, n_layers=4)   # fine on data=2,layers=4 and on data=4,layers=2
    ```
    """
    data, layers = mesh.shape[DATA_AXIS], mesh.shape[LAYERS_AXIS]
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    if batch_size is not None and batch_size % (data * fsdp) != 0:
        axes = f"data={data}" if fsdp == 1 else f"data={data} x fsdp={fsdp} axes"
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the mesh's {axes}"
            f"{' axis' if fsdp == 1 else ''}: use a batch size that is a multiple of {data * fsdp}"
        )
    if n_layers is not None and n_layers % layers != 0:
        raise ValueError(
            f"the student has n_layers={n_layers}, which the mesh's layers={layers} axis "
            f"does not divide: use a student depth that is a multiple of {layers} (or a "
            "smaller layers axis)"
        )
