"""Students built from a teacher: pruned MLP channels, fewer layers, merged KV heads."""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Float, Int
from ..nn.attention import apply_linear
from ..nn.config import TransformerConfig, checked_dict
from ..nn.layer import DecoderLayer
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from .layer_map import default_layer_map

_INITS = ("prune", "random")
_LAYER_SELECTIONS = ("all", "every-k", "group")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"StudentConfig.{field}={value!r} is invalid: {why}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """How to derive a smaller student from a teacher (see [`blockdistill.make_student`][]).

    **Arguments:**

    - `init`: `"prune"` copies (a subset of) the teacher's weights; `"random"` builds a
      freshly initialised [`blockdistill.Transformer`][] of the reduced shape.
    - `mlp_ratio`: fraction of the MLP hidden channels kept in every layer,
      `0 < mlp_ratio <= 1`. The student has `round(mlp_ratio * teacher.mlp_dim)` channels;
      when pruning, the channels with the largest mean absolute activation on the
      calibration batch (see [`blockdistill.mlp_channel_importance`][]) survive, in their
      original order.
    - `layers`: how to reduce depth to `n_layers` (teacher depth `L`, student depth `n`):
        - `"all"`: keep every teacher layer (`n_layers` must be `None`).
        - `"group"`: split the teacher into `n` contiguous groups of `g = L / n` layers
          (`n` must divide `L`); student layer `j` stands for teacher layers
          `j*g .. (j+1)*g - 1` (the spans of [`blockdistill.default_layer_map`][]) and is
          initialised from the **first** layer of its group, teacher layer `j*g`: the one
          whose input is exactly the `layer_in[j*g]` a layer-level blockwise student gets.
        - `"every-k"`: keep every `k`-th teacher layer, `k = L / n`, counting from one,
          i.e. teacher layers `k-1, 2k-1, ..., L-1` (the last layer always survives).
          When `n` does not divide `L` the kept layers are `((j+1) * L) // n - 1`.
    - `n_layers`: the student's depth, required unless `layers="all"`.
    - `kv_heads_ratio`: fraction of key/value heads kept, `0 < kv_heads_ratio <= 1`.
      Groups of `m = 1 / kv_heads_ratio` adjacent KV heads are merged into one by
      averaging their k and v projections; every query head is kept and follows its KV
      head into the merged group, so `n_kv_heads` shrinks while `n_heads` stays.
      `teacher.n_kv_heads * kv_heads_ratio` must be an integer that divides the
      teacher's `n_kv_heads`.
    - `seed`: seed of the key used when `make_student` is given no `key`.

    **Example:**

    ```python
    student_cfg = bd.StudentConfig(init="prune", mlp_ratio=0.5, layers="group",
                                   n_layers=2, kv_heads_ratio=0.5)
    student_cfg2 = bd.StudentConfig.from_dict({"mlp_ratio": 0.5})
    ```
    """

    init: str = "prune"
    mlp_ratio: float = 1.0
    layers: str = "all"
    n_layers: int | None = None
    kv_heads_ratio: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.init not in _INITS:
            _fail("init", self.init, f"must be one of {_INITS}")
        for field in ("mlp_ratio", "kv_heads_ratio"):
            value = getattr(self, field)
            if not _is_real(value) or not 0 < value <= 1:
                _fail(field, value, "must be a number with 0 < value <= 1")
        if self.layers not in _LAYER_SELECTIONS:
            _fail("layers", self.layers, f"must be one of {_LAYER_SELECTIONS}")
        if self.n_layers is not None and (
            isinstance(self.n_layers, bool)
            or not isinstance(self.n_layers, int)
            or self.n_layers <= 0
        ):
            _fail("n_layers", self.n_layers, "must be a positive integer or None")
        if self.layers == "all" and self.n_layers is not None:
            _fail(
                "n_layers",
                self.n_layers,
                'must be None with layers="all" (choose layers="group" or "every-k")',
            )
        if self.layers != "all" and self.n_layers is None:
            _fail("n_layers", self.n_layers, f"is required with layers={self.layers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "must be an integer")

    def replace(self, **changes: Any) -> "StudentConfig":
        """A copy with some fields changed (validated again).

        **Example:**

        ```python
        random_cfg = student_cfg.replace(init="random")
        ```
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form, for JSON/TOML files (inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        if self.n_layers is None:
            del out["n_layers"]  # TOML has no null
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudentConfig":
        """Build from a plain dict; unknown keys are a `ValueError` that names them.

        **Example:**

        ```python
        cfg = bd.StudentConfig.from_dict({"init": "prune", "mlp_ratio": 0.5})
        assert bd.StudentConfig.from_dict(cfg.to_dict()) == cfg
        ```
        """
        return cls(**checked_dict(cls, data, ("mlp_ratio", "kv_heads_ratio")))


def _unwrap(teacher: Transformer | Teacher) -> Transformer:
    return teacher.model if isinstance(teacher, Teacher) else teacher


def _check_uniform(model: Transformer) -> None:
    """Pruning reads one stack of equal layers: a heterogeneous teacher is a `ValueError`."""
    if model.config.layer_shapes is not None:
        raise ValueError("the teacher's layers differ (its config has layer_shapes): pruning needs a uniform teacher")


@eqx.filter_jit
def _importance(
    model: Transformer, tokens: BatchTokens, mask: BatchMask, segment_ids: BatchSegments | None
) -> Float[Array, "layers mlp"]:
    # every array: [batch, layers, seq, dim]
    states = jax.vmap(lambda t, seg: model(t, segment_ids=seg))(tokens, segment_ids).states
    hidden = (states.layer_in + states.attn_out).astype(jnp.float32)
    hidden = jnp.moveaxis(hidden, 1, 0)  # [layers, batch, seq, dim]
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), jnp.float32(1.0))
    params, static = eqx.partition(model.layers.layers, eqx.is_array)

    def per_layer(layer_params, layer_hidden: Float[Array, "batch seq dim"]):
        layer: DecoderLayer = eqx.combine(layer_params, static)

        def per_example(h: Float[Array, "seq dim"]) -> Float[Array, "seq mlp"]:
            normed = layer.post_attention_layernorm(h)
            gate = jax.nn.silu(apply_linear(layer.mlp.gate_proj, normed))
            return jnp.abs(gate * apply_linear(layer.mlp.up_proj, normed))

        activation = jax.vmap(per_example)(layer_hidden)  # [batch, seq, mlp]
        return jnp.sum(activation * weights[:, :, None], axis=(0, 1)) / count

    return jax.vmap(per_layer)(params, hidden)


def mlp_channel_importance(
    teacher: Transformer | Teacher,
    tokens_batch: Int[Array, "batch seq"],
    mask: BatchMask | None = None,
    segment_ids: BatchSegments | None = None,
) -> Float[Array, "layers mlp"]:
    """Mean absolute activation of every MLP hidden channel, per layer.

    The activation of a channel is its entry of `silu(gate(x)) * up(x)` (the input of
    `down_proj`), with `x` the post-attention normed residual of the teacher's own forward
    pass. All layers are computed at once (`jax.vmap` over the stacked parameters), from
    the recorded `layer_in + attn_out` of each layer; the result is in float32.

    **Arguments:**

    - `teacher`: a [`blockdistill.Transformer`][] or [`blockdistill.Teacher`][].
    - `tokens_batch`: the calibration batch, `Int[Array, "batch seq"]`.
    - `mask`: optional `Bool[Array, "batch seq"]`; only `True` positions are averaged.
    - `segment_ids`: optional `Int[Array, "batch seq"]` document ids of packed rows.

    **Returns:** `Float[Array, "layers mlp"]`, the mean of `|activation|` over valid tokens.

    **Example:**

    ```python
    importance = bd.mlp_channel_importance(teacher, batch_tokens)
    importance.shape  # (cfg.n_layers, cfg.mlp_dim)
    ```
    """
    model = _unwrap(teacher)
    _check_uniform(model)
    if mask is None:
        mask = jnp.ones(tokens_batch.shape, dtype=bool)
    elif mask.shape != tokens_batch.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but tokens_batch has "
            f"{tuple(tokens_batch.shape)}"
        )
    if segment_ids is not None and segment_ids.shape != tokens_batch.shape:
        raise ValueError(
            f"segment_ids has shape {tuple(segment_ids.shape)} but tokens_batch has "
            f"{tuple(tokens_batch.shape)}"
        )
    return _importance(model, tokens_batch, mask, segment_ids)


def _student_depth(config: StudentConfig, teacher_layers: int) -> tuple[int, ...]:
    """The teacher layers that survive, in order (student layer `j` <- entry `j`)."""
    if config.layers == "all":
        return tuple(range(teacher_layers))
    n = config.n_layers
    assert n is not None  # checked by StudentConfig
    if n > teacher_layers:
        _fail("n_layers", n, f"is larger than the teacher's n_layers={teacher_layers}")
    if config.layers == "group":
        if teacher_layers % n != 0:
            _fail(
                "n_layers",
                n,
                f'must divide the teacher\'s n_layers={teacher_layers} with layers="group" (depths that do: '
                f"{[d for d in range(1, teacher_layers + 1) if teacher_layers % d == 0]}); "
                'layers="every-k" takes any depth',
            )
        return tuple(start for start, _ in default_layer_map(teacher_layers, n))
    return tuple(((j + 1) * teacher_layers) // n - 1 for j in range(n))


def _student_mlp_dim(config: StudentConfig, teacher_mlp_dim: int) -> int:
    kept = int(config.mlp_ratio * teacher_mlp_dim + 0.5)
    if kept < 1:
        _fail(
            "mlp_ratio",
            config.mlp_ratio,
            f"keeps no channel of the teacher's mlp_dim={teacher_mlp_dim}",
        )
    return kept


def _student_kv_heads(config: StudentConfig, teacher: TransformerConfig) -> int:
    exact = config.kv_heads_ratio * teacher.n_kv_heads
    kept = int(round(exact))
    if kept < 1 or abs(exact - kept) > 1e-6 or teacher.n_kv_heads % kept != 0:
        _fail(
            "kv_heads_ratio",
            config.kv_heads_ratio,
            f"gives {exact:g} KV heads, not an integer divisor of the teacher's "
            f"n_kv_heads={teacher.n_kv_heads} (n_heads={teacher.n_heads})",
        )
    return kept


def student_config_for(
    teacher_config: TransformerConfig, student_config: StudentConfig
) -> TransformerConfig:
    """The [`blockdistill.TransformerConfig`][] of the student `make_student` builds.

    Only `n_layers`, `mlp_dim` and `n_kv_heads` change; a `StudentConfig` that does not
    fit the teacher is a `ValueError` naming the field, its value and the teacher's
    dimension.

    **Example:**

    ```python
    small = bd.student_config_for(cfg, bd.StudentConfig(mlp_ratio=0.5))
    small.mlp_dim == cfg.mlp_dim // 2  # True
    ```
    """
    return teacher_config.replace(
        n_layers=len(_student_depth(student_config, teacher_config.n_layers)),
        mlp_dim=_student_mlp_dim(student_config, teacher_config.mlp_dim),
        n_kv_heads=_student_kv_heads(student_config, teacher_config),
    )


def _merge_heads(
    param: Float[Array, "layers kv_out *rest"], n_groups: int, group: int, head_dim: int
) -> Float[Array, "layers new_out *rest"]:
    """Average groups of `group` adjacent heads along axis 1."""
    layers, _, *rest = param.shape
    grouped = param.reshape(layers, n_groups, group, head_dim, *rest)
    return jnp.mean(grouped, axis=2).reshape(layers, n_groups * head_dim, *rest)


def _transplant(skeleton: Any, source: Transformer) -> Transformer:
    """`skeleton` (a Transformer of `jax.ShapeDtypeStruct`s) with the array leaves of
    `source`: the same module tree with other static fields (the student's config)."""
    skeleton_leaves, treedef = jax.tree.flatten(skeleton)
    source_leaves = jax.tree.leaves(source)
    assert len(skeleton_leaves) == len(source_leaves)
    for new, old in zip(source_leaves, skeleton_leaves):
        assert new.shape == old.shape and new.dtype == old.dtype, (new.shape, old.shape)
    return jax.tree.unflatten(treedef, source_leaves)


def make_student(
    teacher_model: Transformer | Teacher,
    student_config: StudentConfig,
    calibration_tokens: Int[Array, "batch seq"] | None = None,
    *,
    calibration_mask: BatchMask | None = None,
    calibration_segment_ids: BatchSegments | None = None,
    key: PRNGKeyArray | None = None,
) -> Transformer:
    """A smaller [`blockdistill.Transformer`][] derived from a teacher.

    The student's config is the teacher's with `n_layers`, `mlp_dim` and `n_kv_heads`
    reduced as `student_config` says (everything else, including `scan_layers`, `dtype`
    and tied embeddings, is kept).

    - `init="random"`: a fresh model of that shape, initialised from `key`.
    - `init="prune"`: the teacher's weights, reduced in three steps:
        1. **depth**: the layers chosen by `student_config.layers` survive (with
           `"group"`, student layer `j` is teacher layer `j * L / n`, the first of the
           group `default_layer_map(L, n)[j]` it stands for);
        2. **MLP width**: per layer, the `mlp_dim` channels with the largest
           [`blockdistill.mlp_channel_importance`][] on `calibration_tokens` are kept, in
           their original order (rows of `gate_proj` and `up_proj`, columns of
           `down_proj`);
        3. **KV heads**: groups of adjacent KV heads are averaged (k and v projections,
           and their biases); query and output projections are kept.

      Embeddings, the output head and all norms are copied unchanged. With
      `mlp_ratio=1`, `layers="all"` and `kv_heads_ratio=1` the student equals the
      teacher.

    **Arguments:**

    - `teacher_model`: a [`blockdistill.Transformer`][] or [`blockdistill.Teacher`][].
    - `student_config`: a [`blockdistill.StudentConfig`][].
    - `calibration_tokens`: `Int[Array, "batch seq"]`, needed to prune MLP channels
      (`init="prune"` with `mlp_ratio < 1`).
    - `calibration_mask`: optional `Bool[Array, "batch seq"]` of valid calibration tokens.
    - `calibration_segment_ids`: optional `Int[Array, "batch seq"]` document ids of the
      calibration rows (packed documents).
    - `key`: a `jax.random` key; defaults to `jax.random.key(student_config.seed)`.

    **Returns:** a [`blockdistill.Transformer`][] with the reduced config.

    **Example:**

    ```python
    student = bd.make_student(teacher,   # a 2-layer teacher with mlp_dim=128
                              bd.StudentConfig(mlp_ratio=0.5, layers="group", n_layers=1),
                              batch_tokens, key=jax.random.key(1))   # calibration batch
    student.config.mlp_dim, student.config.n_layers  # (64, 1)
    ```
    """
    teacher = _unwrap(teacher_model)
    if key is None:
        key = jax.random.key(student_config.seed)
    kept_layers = _student_depth(student_config, teacher.config.n_layers)
    new_cfg = student_config_for(teacher.config, student_config)
    if student_config.init == "random":
        return _init_random(new_cfg, key)
    _check_uniform(teacher)
    importance = None
    if new_cfg.mlp_dim < teacher.config.mlp_dim:
        if calibration_tokens is None:
            raise ValueError(
                f"calibration_tokens=None is invalid with init='prune' and mlp_ratio="
                f"{student_config.mlp_ratio}: MLP channels are ranked by their activations "
                "on a calibration batch"
            )
        importance = mlp_channel_importance(
            teacher, calibration_tokens, calibration_mask, calibration_segment_ids
        )
    return _prune(teacher, importance, kept_layers, new_cfg)


@eqx.filter_jit
def _init_random(config: TransformerConfig, key: PRNGKeyArray) -> Transformer:
    # One compiled initialisation instead of many small eager ops; same values.
    return Transformer(config, key=key)


@eqx.filter_jit
def _prune(
    teacher: Transformer,
    importance: Float[Array, "teacher_layers mlp"] | None,
    kept_layers: tuple[int, ...],
    new_cfg: TransformerConfig,
) -> Transformer:
    """The weight surgery of `make_student(init="prune")`, as one compiled function."""
    teacher_cfg = teacher.config
    params, static = eqx.partition(teacher.layers.layers, eqx.is_array)
    index = np.asarray(kept_layers)
    params = jax.tree.map(lambda p: p[index], params)
    layers = eqx.combine(params, static)

    if new_cfg.mlp_dim < teacher_cfg.mlp_dim:
        assert importance is not None
        _, top = jax.lax.top_k(importance[index], new_cfg.mlp_dim)
        keep = jnp.sort(top, axis=-1)  # [layers, mlp_dim], original channel order
        rows = jax.vmap(lambda w, idx: w[idx])
        columns = jax.vmap(lambda w, idx: w[:, idx])
        layers = eqx.tree_at(
            lambda l: (l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight),
            layers,
            (
                rows(layers.mlp.gate_proj.weight, keep),
                rows(layers.mlp.up_proj.weight, keep),
                columns(layers.mlp.down_proj.weight, keep),
            ),
        )

    if new_cfg.n_kv_heads < teacher_cfg.n_kv_heads:
        group = teacher_cfg.n_kv_heads // new_cfg.n_kv_heads

        def kv_params(l: DecoderLayer) -> list:
            out = [l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]
            if teacher_cfg.qkv_bias:
                out += [l.self_attn.k_proj.bias, l.self_attn.v_proj.bias]
            return out

        merged = [
            _merge_heads(p, new_cfg.n_kv_heads, group, teacher_cfg.head_dim)
            for p in kv_params(layers)
        ]
        layers = eqx.tree_at(kv_params, layers, merged)

    source = eqx.tree_at(lambda m: m.layers.layers, teacher, layers)
    skeleton = eqx.filter_eval_shape(Transformer, new_cfg, key=jax.random.key(0))
    return _transplant(skeleton, source)
