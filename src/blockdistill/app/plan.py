"""The memory planner: compile the real distillation step ahead of time on abstract
shapes (no weights exist) and read what each device must hold."""

import math
import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ..distill.objective import DistillationObjective
from ..distill.sparse import TopKLogits
from ..nn.config import TransformerConfig
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from ..parallel.mesh import FSDP_AXIS, LAYERS_AXIS
from ..parallel.sharding import _path_names, _spec_for, batch_sharding

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """`"80GB"`, `"141 GiB"`, `"16e9"` -> bytes (a `ValueError` naming the text otherwise)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"device memory {text!r} is invalid: give a number with an optional unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GB")
    try:
        return int(float(match.group(1)) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"device memory {text!r} is invalid: {match.group(1)!r} is not a number") from None


def _is_abstract(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _abstract(tree: Any, mesh: Mesh | None, *, n_layers: int, shard_layers: bool) -> Any:
    """`tree` with every array leaf an abstract `ShapeDtypeStruct` placed as the training
    loop places it (stacked layers over `layers` unless `shard_layers=False`)."""

    def leaf(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if mesh is None:
            return x
        spec = _spec_for(_path_names(path), x, n_layers, shard_layers, mesh.shape.get(FSDP_AXIS, 1),
                         mesh.shape.get(LAYERS_AXIS, 1))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s abstract arrays that one device holds (its shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
            total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def plan_memory(
    teacher: TransformerConfig,
    student: TransformerConfig,
    objective: DistillationObjective,
    *,
    batch_size: int,
    seq_len: int,
    mesh: Mesh | None = None,
    optimizer=None,
    trainable: str = "all",
    fused: str | bool = "auto",
    device_memory: int | None = None,
    hlo: bool = False,
    teacher_top_k: int | None = None,
) -> dict[str, Any]:
    """Per-device bytes of one training step of `objective` for these model shapes, from
    the step compiled ahead of time on abstract arrays: no weights are created or read.

    **Returns** a dict: `teacher_params`, `student_params`, `opt_state`, `batch` (what each
    device holds of them, placed as `blockdistill distill` places them), `temporaries` (the
    compiled step's scratch memory), `total` (arguments + temporaries; the updated student
    and optimizer state reuse their donated buffers) and, given `device_memory`, `fits`.
    The compile is for this process's backend: on a CPU the temporaries estimate what an
    accelerator's compiler needs (it fuses differently); the other numbers are exact.

    With `teacher_top_k`, the step is the one that reads the teacher's top-k logits of
    each batch from a teacher cache (an objective without a blockwise term): the teacher
    is not on the device, the batch holds the cached ids, log-probabilities and tail mass.

    **Example:**

    ```python
    plan = bd.plan_memory(cfg, cfg.replace(mlp_dim=64), bd.DistillationObjective(blockwise_weight=0.0),
                          batch_size=4, seq_len=16)
    plan["total"] > plan["student_params"]   # True
    ```
    """
    from ..distill.step import DistillStep, make_optimizer

    optimizer = optimizer if optimizer is not None else make_optimizer(1e-3, trainable=trainable)
    teacher_model = eqx.filter_eval_shape(Transformer, teacher, key=jax.random.key(0))
    student_model = eqx.filter_eval_shape(Transformer, student, key=jax.random.key(1))
    opt_state = jax.eval_shape(optimizer.init, eqx.filter(student_model, _is_abstract))
    teacher_model = _abstract(teacher_model, mesh, n_layers=teacher.n_layers, shard_layers=False)
    student_model = _abstract(student_model, mesh, n_layers=student.n_layers, shard_layers=True)
    opt_state = _abstract(opt_state, mesh, n_layers=student.n_layers, shard_layers=True)
    batch = {"sharding": None if mesh is None else batch_sharding(mesh)}
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, **batch)
    mask = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_, **batch)
    segments = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, **batch)
    step = DistillStep(objective, optimizer, mesh=mesh, trainable=trainable, fused=fused)
    cached = None
    if teacher_top_k is not None:
        if not objective.uses_teacher or objective.passes(0)[1]:
            raise ValueError("teacher_top_k: a teacher cache serves only objectives that use the teacher's logits "
                             "alone (no blockwise term, a teacher weight above 0)")
        shape = (batch_size, seq_len, teacher_top_k)
        cached = jax.eval_shape(lambda: TopKLogits(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
                                                   jnp.zeros(shape[:2], jnp.float32)))
        cached = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, **batch), cached)
    # the step's own entry point, without the runtime checks of concrete arguments
    frozen_teacher = Teacher(teacher_model) if objective.uses_teacher and cached is None else None
    lowered = step._run(True, student_model, opt_state, frozen_teacher, tokens, mask, 0, segments, cached)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    result = {
        "teacher_params": _device_bytes(teacher_model) if frozen_teacher is not None else 0,
        "student_params": _device_bytes(student_model),
        "opt_state": _device_bytes(opt_state),
        "batch": _device_bytes((tokens, mask, segments, cached)),
        "arguments": int(memory.argument_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
        "outputs_not_aliased": max(int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes), 0),
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "backend": jax.default_backend(),
    }
    result["total"] = result["arguments"] + result["temporaries"] + result["outputs_not_aliased"]
    if hlo:
        result["hlo"] = compiled.as_text()
    if device_memory is not None:
        result["device_memory"] = device_memory
        result["fits"] = result["total"] <= device_memory
    return result


def format_count(n: int | float) -> str:
    """A parameter count in the unit that fits (`"4.85M"`, `"135M"`, `"1.24B"`)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: int | float) -> str:
    """`n` bytes in binary units (`"1.50 GiB"`)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
