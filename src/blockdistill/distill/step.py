"""The jitted distillation step and optimizer helpers."""

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from .._types import Array, BatchMask, BatchSegments, BatchTokens
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from ..parallel.mesh import BATCH_AXES, LAYERS_AXIS, check_mesh
from ..parallel.sharding import constrain, constrain_tree, tree_shardings
from .fused import fused_value_and_grad, fusion_blocker
from .objective import DistillationObjective, Metrics
from .sparse import TopKLogits

Trainable = Literal["all", "attention", "mlp", "attention+mlp"]
TRAINABLE = ("all", "attention", "mlp", "attention+mlp")

_GROUP_KEYS = {
    "attention": ("self_attn",),
    "mlp": ("mlp",),
    "attention+mlp": ("self_attn", "mlp"),
}


def _path_names(path) -> list[str]:
    return [str(getattr(entry, "name", getattr(entry, "key", entry))) for entry in path]


def trainable_labels(params: Any, trainable: Trainable | Callable[[list[str]], bool]) -> Any:
    """A pytree of `"train"` / `"freeze"` labels for `params` (for `optax.multi_transform`).

    `trainable` is a group name (`"all"`, `"attention"`, `"mlp"`, `"attention+mlp"`) or a
    predicate on a leaf's attribute path (e.g. `["layers", "layers", "self_attn",
    "q_proj", "weight"]`).

    **Example:**

    ```python
    labels = bd.trainable_labels(eqx.filter(student, eqx.is_array), "attention")
    ```
    """
    if callable(trainable):
        keep = trainable
    elif trainable == "all":
        return jax.tree.map(lambda _: "train", params)
    elif trainable in _GROUP_KEYS:
        keys = _GROUP_KEYS[trainable]

        def keep(names: list[str]) -> bool:
            return any(key in names for key in keys)

    else:
        raise ValueError(f"trainable={trainable!r} is invalid: must be one of {TRAINABLE} or a callable")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if keep(_path_names(path)) else "freeze", params
    )


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    trainable: Trainable | Callable[[list[str]], bool] = "all",
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, restricted to the `trainable` parameter groups.

    Frozen groups get exactly zero updates (`optax.set_to_zero`) and no optimizer state.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule, e.g.
      `optax.warmup_cosine_decay_schedule(...)`.
    - `weight_decay`: decoupled weight decay of AdamW.
    - `clip_norm`: clip gradients to this global norm (`None`: no clipping).
    - `b1`, `b2`: Adam's moment decay rates.
    - `trainable`: which parameters learn (see [`blockdistill.trainable_labels`][]).

    **Example:**

    ```python
    optimizer = bd.make_optimizer(3e-3, trainable="attention")
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    ```
    """
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
    inner = optax.chain(*parts)
    if not callable(trainable) and trainable == "all":
        return inner
    return optax.multi_transform(
        {"train": inner, "freeze": optax.set_to_zero()},
        lambda params: trainable_labels(params, trainable),
    )


def trainable_filter(student: eqx.Module, trainable: Trainable | Callable[[list[str]], bool]) -> Any:
    """A pytree of bools over `student`'s leaves: `True` for the arrays that train."""
    labels = trainable_labels(student, trainable)
    return jax.tree.map(lambda leaf, label: eqx.is_array(leaf) and label == "train", student, labels)


def _distill_step(
    frozen: tuple[Teacher | None, BatchTokens, BatchMask, Array, BatchSegments | None, TopKLogits | None],
    student: Transformer,
    opt_state: optax.OptState,
    *,
    objective: DistillationObjective,
    optimizer: optax.GradientTransformation,
    trainable: Trainable | Callable[[list[str]], bool] = "all",
    mesh: Mesh | None = None,
    fused: bool = False,
) -> tuple[Transformer, optax.OptState, Metrics]:
    teacher, tokens, mask, step, segment_ids, teacher_logits = frozen
    tokens, mask = constrain(tokens, BATCH_AXES), constrain(mask, BATCH_AXES)
    if segment_ids is not None:
        segment_ids = constrain(segment_ids, BATCH_AXES)
    if teacher_logits is not None:
        teacher_logits = jax.tree.map(lambda x: constrain(x, BATCH_AXES), teacher_logits)
    spec = trainable_filter(student, trainable)
    if fused:
        (_, metrics), train_grads = fused_value_and_grad(
            objective, student, teacher.model, tokens, mask, step, segment_ids, spec
        )
        rest = eqx.filter(student, spec, inverse=True)
    else:
        if teacher_logits is not None:  # the teacher's cached logits: the teacher does not run
            teacher_out = teacher_logits
        elif objective.uses_teacher:
            teacher_out = jax.vmap(lambda t, seg: teacher(t, segment_ids=seg))(tokens, segment_ids)
        else:  # labels alone (teacher_weight=0): the teacher does not run
            teacher_out = None
        layer_parallel = mesh is not None and teacher is not None and teacher_logits is None
        if layer_parallel and teacher_out is not None and teacher.config.n_layers == student.config.n_layers:
            # one teacher layer per student layer: every device keeps only its own layers
            # of the teacher's states (a local slice of the replicated teacher's output).
            # With a layer map, the objective's selection slices them locally instead.
            states = jax.tree.map(lambda x: constrain(x, BATCH_AXES, LAYERS_AXIS), teacher_out.states)
            teacher_out = eqx.tree_at(lambda out: out.states, teacher_out, states)
        # differentiate only the groups that train: frozen ones get zero updates anyway,
        # so their gradients would be wasted work and would inflate the reported grad_norm
        train_params, rest = eqx.partition(student, spec)

        def loss_fn(train_params):
            model = eqx.combine(train_params, rest)
            # a chunked loss applies the teacher's head per chunk (its full logits then go unused)
            head = teacher.model if teacher is not None and teacher_logits is None else None
            return objective(model, teacher_out, tokens, mask, step, segment_ids=segment_ids, teacher_head=head)

        (_, metrics), train_grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(train_params)
    grad_norm = optax.tree.norm(train_grads)
    zeros = jax.tree.map(jnp.zeros_like, eqx.filter(rest, eqx.is_array))
    grads = eqx.combine(train_grads, zeros)
    params = eqx.filter(student, eqx.is_array)
    # optax mixes int32 step counts with float32 internally; keep our own code under
    # whatever promotion the caller set, but let the optimizer use the standard rules
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
    student = eqx.apply_updates(student, updates)
    metrics = {**metrics, "grad_norm": grad_norm}
    if mesh is not None:
        # outputs keep the sharding of the donated inputs; metrics are replicated
        n_layers = student.config.n_layers
        student = constrain_tree(student, tree_shardings(student, mesh, n_layers=n_layers))
        opt_state = constrain_tree(opt_state, tree_shardings(opt_state, mesh, n_layers=n_layers))
        metrics = jax.tree.map(lambda x: constrain(x), metrics)
    return student, opt_state, metrics


class DistillStep(eqx.Module):
    """One jitted distillation step: teacher forward, objective, gradient, optax update.

    The teacher runs once per step inside the same compiled program as the student's
    passes; gradients are taken with respect to the student only; the student and the
    optimizer state are donated (their old buffers are reused for the new ones, so do
    not use the arguments after the call). Compiled once per shape.

    **Arguments:**

    - `objective`: a [`blockdistill.DistillationObjective`][].
    - `optimizer`: an optax transformation, e.g. from [`blockdistill.make_optimizer`][].
    - `mesh`: optional `jax.sharding.Mesh` from [`blockdistill.make_mesh`][]: the step is
      then traced under `jax.set_mesh(mesh)`, the batch is split over `data`, and the
      updated student and optimizer state keep the placement of
      [`blockdistill.shard_model`][] / [`blockdistill.shard_opt_state`][] (stacked layers
      over `layers`); metrics come back replicated. Place the arguments with those
      functions first. `None` (default): one device.
    - `trainable`: the parameter groups that train, the same value as given to
      [`blockdistill.make_optimizer`][] (`"all"`, `"attention"`, `"mlp"`,
      `"attention+mlp"` or a predicate, see [`blockdistill.trainable_labels`][]): only
      their gradients are computed, and the `grad_norm` metric is theirs.

    - `fused`: `"auto"` (default), `True` or `False`. The fused step runs teacher and
      student layer by layer in one `lax.scan`: each scan step computes the teacher's
      layer (or span of layers, for a grouped student), the student's block on the
      teacher's input with its feature loss and that block's gradient, and, when KD or
      label CE is not statically zero, the student's own layer on its own residual
      stream; the heads, KL and CE run once after the scan. No `[layers, batch, seq,
      dim]` teacher state outlives its scan step, so memory stays flat in depth (only
      the free pass keeps per-layer activations; `remat` applies to them). It gives the
      same losses, metrics and updates as the unfused path (`objective(student,
      teacher_out, ...)`), which runs the teacher's whole forward first. `"auto"` fuses
      wherever it applies and helps: not for a recipe without a blockwise term (plain
      KD: the unfused teacher forward keeps no states then, and fusing measured no
      faster), not for a layer map of unequal or partial spans, and not on a
      mesh with a `layers` axis (a scan would gather every layer to every device, where
      the unfused layer-parallel pass keeps each block on its own device). `True` where
      fusion cannot run is a `ValueError` that says why.

    **Call:** `step(student, opt_state, teacher, tokens, mask, step_index, *,
    segment_ids=None, teacher_logits=None) -> (student, opt_state, metrics)` (`teacher` may be `None` for an
    objective without the teacher, `teacher_weight=0`: plain language-model training) with `tokens`
    `Int[Array, "batch seq"]`, `mask` `Bool[Array, "batch seq"]` (the positions that
    count in the losses), `step_index` an int32 scalar (the schedules' step) and
    `segment_ids` optional `Int[Array, "batch seq"]` document ids of packed rows (see
    [`blockdistill.Transformer`][]); teacher and student both keep to each document.
    `teacher_logits=` a [`blockdistill.TopKLogits`][] of the batch (read from a
    [`blockdistill.TeacherCache`][]) replaces the teacher for an objective without a
    blockwise term: the teacher does not run (pass `teacher=None`), and the KL is
    [`blockdistill.cached_kl_divergence`][] (another `divergence` needs a cache of the
    whole vocabulary and is refused by name otherwise).

    **Example:**

    ```python
    optimizer = bd.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    distill = bd.DistillStep(objective, optimizer)
    student, opt_state, metrics = distill(student, opt_state, teacher, batch_tokens, mask, 0)
    ```
    """

    objective: DistillationObjective = eqx.field(static=True)
    optimizer: optax.GradientTransformation = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True, default=None)
    trainable: Trainable | Callable[[list[str]], bool] = eqx.field(static=True, default="all", kw_only=True)
    # `str | bool`, not Literal: a wrong value is the ValueError of __check_init__, naming the field
    fused: str | bool = eqx.field(static=True, default="auto", kw_only=True)

    def __check_init__(self):
        if self.fused not in ("auto", True, False):
            raise ValueError(f"DistillStep.fused={self.fused!r} is invalid: must be 'auto', True or False")

    def uses_fusion(self, teacher: Teacher | None, student: Transformer) -> bool:
        """Whether this step runs fused for this teacher and student (see `fused`);
        `fused=True` where fusion cannot run is a `ValueError` that says why."""
        if self.fused is False or teacher is None:
            return False
        if self.fused == "auto" and not self.objective.passes(0)[1]:
            return False  # no blockwise term (w statically 0): nothing to fuse
        blocker = fusion_blocker(self.objective, teacher.model, student)
        if blocker is None and self.mesh is not None and self.mesh.shape.get(LAYERS_AXIS, 1) > 1:
            blocker = (
                "the mesh shards the layers: a scan over layers would gather every layer "
                "to every device, while the unfused layer-parallel pass keeps each block on "
                "its own device"
            )
        if blocker is not None and self.fused is True:
            raise ValueError(f"DistillStep(fused=True) cannot fuse this step: {blocker}")
        return blocker is None

    def _run(self, lower, student, opt_state, teacher, tokens, mask, step, segment_ids, teacher_logits=None):
        if teacher_logits is not None:
            self.objective.check_cached(teacher_logits, tokens, student.config.vocab_size)
            teacher = None  # the cache stands in for it
        elif teacher is None and self.objective.uses_teacher:
            raise ValueError(
                f"DistillStep: teacher=None needs an objective without the teacher (teacher_weight=0, "
                f"got teacher_weight={self.objective.teacher_weight!r})"
            )
        step = jnp.asarray(step, jnp.int32)
        frozen = (teacher, tokens, mask, step, segment_ids, teacher_logits)
        compiled = compiled_step(
            _distill_step, objective=self.objective, optimizer=self.optimizer,
            trainable=self.trainable, mesh=self.mesh, fused=self.uses_fusion(teacher, student),
        )
        how = compiled.lower if lower else compiled
        if self.mesh is None:
            return how(frozen, student, opt_state)
        check_mesh(self.mesh, batch_size=tokens.shape[0], n_layers=student.config.n_layers)
        with jax.set_mesh(self.mesh):
            return how(frozen, student, opt_state)

    def __call__(
        self,
        student: Transformer,
        opt_state: optax.OptState,
        teacher: Teacher | None,
        tokens: BatchTokens,
        mask: BatchMask,
        step: int | Array = 0,
        *,
        segment_ids: BatchSegments | None = None,
        teacher_logits: TopKLogits | None = None,
    ) -> tuple[Transformer, optax.OptState, Metrics]:
        return self._run(False, student, opt_state, teacher, tokens, mask, step, segment_ids, teacher_logits)

    def lower(
        self,
        student: Transformer,
        opt_state: optax.OptState,
        teacher: Teacher | None,
        tokens: BatchTokens,
        mask: BatchMask,
        step: int | Array = 0,
        *,
        segment_ids: BatchSegments | None = None,
        teacher_logits: TopKLogits | None = None,
    ) -> jax.stages.Lowered:
        """The step lowered for these arguments, without running it: `.as_text()` is
        its StableHLO, `.compile().as_text()` the optimized, partitioned HLO (on a mesh,
        with the collectives XLA inserted; see [`blockdistill.testing.hlo_collectives`][])."""
        return self._run(True, student, opt_state, teacher, tokens, mask, step, segment_ids, teacher_logits)


class _AsyncStep:
    """`step(frozen, model, opt_state)` compiled with `jax.jit`, the model and optimizer
    state donated.

    Not `eqx.filter_jit`: it waits for every call to finish on the device (to surface
    runtime errors), which would make each training step a host sync; a step dispatched
    with `jax.jit` returns at once, so the host prepares the next batch while the device
    computes. Every leaf of the arguments is an array (Equinox keeps the rest in the
    pytree structure, which `jax.jit` treats as static).
    """

    def __init__(self, fn: Callable, options: dict[str, Any]):
        self._jitted = jax.jit(functools.partial(fn, **options), donate_argnums=(1, 2))

    def __call__(self, frozen, model, opt_state):
        with warnings.catch_warnings():
            # buffers of a different shape or dtype (e.g. the optimizer's step count) cannot
            # be reused; that is expected, and the others are
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return self._jitted(frozen, model, opt_state)

    def lower(self, frozen, model, opt_state) -> jax.stages.Lowered:
        return self._jitted.lower(frozen, model, opt_state)


@functools.lru_cache(maxsize=64)
def _cached_step(fn: Callable, options: tuple[tuple[str, Any], ...]) -> _AsyncStep:
    return _AsyncStep(fn, dict(options))


def compiled_step(fn: Callable, **options: Any) -> _AsyncStep:
    """The asynchronous compiled form of a training step `fn(frozen, model, opt_state,
    **options)`, one per `fn` and (hashable) options, so that repeated calls reuse the
    compilation."""
    return _cached_step(fn, tuple(sorted(options.items())))
