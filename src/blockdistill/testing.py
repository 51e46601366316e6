"""Helpers for tests and benchmarks (not part of the training API).

`hlo_collectives` reads the collectives of a compiled program's HLO text and says which
mesh axes each one moves data across: how the tests check what a sharded step sends over
the network.

**Example:**

```python
from blockdistill.testing import hlo_collectives

text = step.lower(student, opt_state, teacher, tokens, mask).compile().as_text()
for c in hlo_collectives(text, mesh):
    print(c.kind, c.axes, c.bytes)
```
"""

import dataclasses
import re

import numpy as np
from jax.sharding import Mesh

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


_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?(?P<names>[\w.\-, %]+)\}?")


_TRIPS = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(?P<n>[0-9]+)')


def _instructions(hlo_text: str):
    """`(computation, line)` for every line of HLO text that is not a computation's header."""
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None:
            computation = header.group("name")
            continue
        yield computation, line


def _loop_bodies(hlo_text: str) -> dict[str, int]:
    """The computations that run inside `while` loops (loop bodies and what they call),
    each with how many times it runs per call of the program (1 where a trip count is
    unknown)."""
    calls: dict[str, set[str]] = {}
    loops: dict[str, list[tuple[str, int]]] = {}  # computation -> the loops it starts
    for computation, line in _instructions(hlo_text):
        loop = _WHILE.search(line)
        if loop is not None:
            trips = _TRIPS.search(line)
            loops.setdefault(computation, []).append((loop.group("body"), int(trips.group("n")) if trips else 1))
        for called in _CALLS.finditer(line):
            calls.setdefault(computation, set()).update(
                name.strip().lstrip("%") for name in called.group("names").split(","))
    inside: dict[str, int] = {}

    def visit(name: str, trips: int) -> None:
        if inside.get(name, 0) >= trips:
            return
        inside[name] = trips
        for body, n in loops.get(name, ()):
            visit(body, trips * n)
        for callee in calls.get(name, ()):
            if callee not in {body for body, _ in loops.get(name, ())}:
                visit(callee, trips)

    for start, started in loops.items():
        for body, n in started:
            if start not in inside:
                visit(body, n)
    for name in list(inside):
        for body, n in loops.get(name, ()):
            visit(body, inside[name] * n)
    return inside


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, as [`blockdistill.testing.hlo_collectives`][] reads it.

    - `kind`: `"all-gather"`, `"all-to-all"`, `"collective-permute"`, `"all-reduce"`, ...
    - `name`: the HLO instruction's name.
    - `shapes`: the result shapes (one per operand of a combined collective).
    - `bytes`: the size of the result in bytes, per device.
    - `axes`: the mesh axes along which its device groups extend, i.e. those it moves
      data across, e.g. `("layers",)`.
    - `computation`: the HLO computation it belongs to; `in_loop`: whether that is the
      body of a `while` loop (a `lax.scan` over layers compiles to one), i.e. whether it
      runs once per iteration; `trips`: how many times it runs per call of the program
      (the product of the known trip counts of the loops around it), so that
      `sum(c.bytes * c.trips)` is what it moves per step.

    **Example:**

    ```python
    forward = jax.jit(lambda model: model(tokens).logits)
    text = forward.lower(bd.shard_model(student, mesh)).compile().as_text()
    gathers = [c for c in hlo_collectives(text, mesh) if c.kind == "all-gather"]
    sum(c.bytes for c in gathers if "layers" in c.axes)  # bytes gathered across layers
    ```
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    bytes: int
    axes: tuple[str, ...]
    computation: str = ""
    in_loop: bool = False
    trips: int = 1


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
    moving = [c for c in hlo_collectives(text, mesh)
              if c.kind == "all-gather" and "layers" in c.axes]   # the scan gathers them
    ```
    """
    coords = np.stack(np.unravel_index(np.arange(mesh.devices.size), mesh.devices.shape), axis=-1)
    bodies = _loop_bodies(hlo_text)
    found = []
    for computation, line in _instructions(hlo_text):
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
            computation=computation, in_loop=computation in bodies, trips=bodies.get(computation, 1),
        ))
    return found


__all__ = ["Collective", "hlo_collectives"]
