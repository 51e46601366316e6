"""`DistillationObjective`: one loss that mixes the logit KL (and label cross-entropy) of the
student's own pass with the blockwise feature loss of its injected pass, each weight a
float or a schedule. The losses it mixes are in [`losses`][blockdistill.distill.losses]."""

from collections.abc import Callable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Float
from ..nn.config import TransformerConfig
from ..nn.layer import InjectAt, check_inject_at
from ..nn.model import ModelOutput, Transformer
from .layer_map import _validate_layer_map, resolve_layer_map
from .losses import (
    FEATURE_LOSSES,
    FeatureLoss,
    cached_divergence_refusal,
    check_divergence,
    chunked_logit_losses,
    feature_loss,
    logit_divergence,
    next_token_cross_entropy,
)
from .sparse import TopKLogits

InjectedPass = Literal["auto", "vmap", "scan"]
CACHED_KL = ("tail", "renormalized")
Schedule = float | Callable[[Array | int], Array | float]
Metrics = dict[str, Array]


def _evaluate(value: Schedule, step: Array | int) -> Array | float:
    return value(step) if callable(value) else value


def _check_weight(name: str, value: Schedule) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"DistillationObjective.{name}={value!r} is invalid: must be a float or a schedule")


class DistillationObjective(eqx.Module):
    """KL distillation mixed with the blockwise feature loss by one weight.

    `loss = teacher_weight * ((1 - w) * T^2 * KL(teacher_T || student_T) + w * F)
    + label_weight * CE`

    with `w = blockwise_weight` (and `teacher_weight` 1 unless changed). KL and CE use the student's own (free-running) forward
    pass; `F` uses the injected pass, where every student block consumes the teacher's
    input to that block (`attn_in` at `"attention"` level, `layer_in` at `"layer"`
    level) and is compared with the teacher's output of that block (`attn_out` /
    `layer_out`). `F` is the mean over the selected layers of each layer's
    [`blockdistill.feature_loss`][] over the batch's valid tokens (for `"nmse"` a ratio
    of sums per layer, Puzzle's definition).

    A pass whose weight is the constant 0 is not computed at all; with a schedule, a
    pass whose weight is 0 at the current step is skipped at run time (`lax.cond`).

    **Arguments:**

    - `blockwise_weight`: `w`, a float in [0, 1] or an optax schedule `step -> w`.
    - `temperature`: `T` of the KL term, a float or a schedule.
    - `divergence`, `jsd_beta`, `skew_alpha`: the KL's replacement: `"kl"` (default),
      `"reverse_kl"`, `"jsd"` (with `jsd_beta` in [0, 1], default 0.5), `"skew_kl"` (with
      `skew_alpha` in [0, 1], default 0.1) or `"tvd"`, times `T^2` (the `kl` metric; see
      [`blockdistill.logit_divergence`][]); a top-k cache serves only `"kl"`.
    - `feature_loss`: `"cosine"`, `"l2"` or `"nmse"`.
    - `inject_at`: `"attention"` (MaxText semantics: only the attention of each block
      is trained by `F`) or `"layer"` (whole blocks, NVIDIA Puzzle's semantics).
    - `label_weight`: weight of next-token cross-entropy (float or schedule).
    - `teacher_weight`: a float >= 0 scaling both teacher terms (default 1). `0` with a
      positive `label_weight` trains on the labels alone, the no-teacher control: no
      teacher pass runs then (pass `teacher_out=None`; `kl` and `feature` read 0).
    - `layer_indices`: the student layers that count in `F` (default: all).
    - `layer_map`: for a student with fewer layers than the teacher (`"layer"` level),
      spans `((a_0, b_0), ...)`: student layer `j` takes the teacher's `layer_in[a_j]`
      and is compared with the teacher's `layer_out[b_j - 1]`. Default: equal contiguous
      groups (see [`blockdistill.default_layer_map`][]).
    - `injected_pass`: how the injected pass runs: `"vmap"` (one `jax.vmap` over the
      stacked layers, computing only the compared part of each block: the layer-parallel
      mode), `"scan"` (the student's own scanned stack with `inject` as scanned inputs),
      or `"auto"` (default): `"scan"`. Measured side by side (BENCHMARKS.md, dim 512,
      8 layers, batch 8 x 512, CPU), the scan was 1.08x faster at layer level and 1.11x
      at attention level, and only the scan honours `remat` (a checkpoint inside a vmap
      over all layers saves nothing: 1118 MiB vs 165 MiB at depth 48). At small shapes
      vmap won by up to 10%. On a mesh with a `layers` axis, choose `"vmap"`: each device
      then computes its own blocks (the CLI does this for `auto`). Both give the same
      losses and gradients.
    - `cached_kl`: the KL against a cached, sparse teacher ([`blockdistill.TopKLogits`][]
      as `teacher_out`): `"tail"` (default; top-k plus one tail bucket, never above the
      dense KL) or `"renormalized"` (both renormalised over the top-k); see
      [`blockdistill.cached_kl_divergence`][].
    - `logit_chunk`: compute the head, log-softmax, KL and CE over this many sequence
      positions at a time ([`blockdistill.chunked_logit_losses`][]): no
      `[batch, seq, vocab]` float32 array of the student's logits exists in the step, nor
      of the teacher's when the call is given `teacher_head=` (the step gives it). Same
      values and gradients; `None` (default): all positions at once.

    **Call:** `objective(student, teacher_out, tokens, mask=None, step=0, *,
    segment_ids=None) -> (loss, metrics)` on a batch: `tokens` is
    `Int[Array, "batch seq"]`, `teacher_out` the batched [`blockdistill.ModelOutput`][]
    of the teacher on `tokens` (with `teacher_head=`, the teacher model, a chunked loss
    applies the teacher's head to `teacher_out.hidden` chunk by chunk), or its cached top-k logits ([`blockdistill.TopKLogits`][],
    for an objective without a blockwise term: the KL is then
    [`blockdistill.cached_kl_divergence`][]) (with the same `segment_ids`, for rows that pack several
    documents: the student's passes then keep to each document too, and CE pairs do not
    cross documents). `metrics` holds `loss`,
    `kl`, `feature`, `ce`, `blockwise_weight`, `temperature` (scalars) and
    `feature_per_layer` (`Float[Array, "layers"]`, every student layer).

    **Example:**

    ```python
    objective = bd.DistillationObjective(blockwise_weight=0.5, temperature=2.0,
                                         feature_loss="cosine", inject_at="layer")
    teacher_out = jax.vmap(teacher)(batch_tokens)
    loss, metrics = objective(student, teacher_out, batch_tokens)
    ```
    """

    blockwise_weight: Schedule = eqx.field(static=True, default=1.0)
    temperature: Schedule = eqx.field(static=True, default=1.0)
    feature_loss: FeatureLoss = eqx.field(static=True, default="cosine")
    inject_at: InjectAt = eqx.field(static=True, default="attention")
    label_weight: Schedule = eqx.field(static=True, default=0.0)
    layer_indices: tuple[int, ...] | None = eqx.field(static=True, default=None)
    layer_map: tuple[tuple[int, int], ...] | None = eqx.field(static=True, default=None)
    injected_pass: InjectedPass = eqx.field(static=True, default="auto")
    teacher_weight: float = eqx.field(static=True, default=1.0)
    cached_kl: str = eqx.field(static=True, default="tail")
    logit_chunk: int | None = eqx.field(static=True, default=None)
    divergence: str = eqx.field(static=True, default="kl")
    jsd_beta: float = eqx.field(static=True, default=0.5)
    skew_alpha: float = eqx.field(static=True, default=0.1)

    def __check_init__(self):
        _check_weight("blockwise_weight", self.blockwise_weight)
        _check_weight("temperature", self.temperature)
        _check_weight("label_weight", self.label_weight)
        if not callable(self.blockwise_weight) and not 0.0 <= self.blockwise_weight <= 1.0:
            raise ValueError(
                f"DistillationObjective.blockwise_weight={self.blockwise_weight!r} is invalid: "
                "must be in [0, 1]"
            )
        if not callable(self.label_weight) and not self.label_weight >= 0:
            raise ValueError(
                f"DistillationObjective.label_weight={self.label_weight!r} is invalid: must be >= 0"
            )
        if not callable(self.temperature) and not self.temperature > 0:
            raise ValueError(
                f"DistillationObjective.temperature={self.temperature!r} is invalid: must be positive"
            )
        if callable(self.teacher_weight) or isinstance(self.teacher_weight, bool) or not (
            isinstance(self.teacher_weight, (int, float)) and self.teacher_weight >= 0
        ):
            raise ValueError(
                f"DistillationObjective.teacher_weight={self.teacher_weight!r} is invalid: "
                "must be a float >= 0"
            )
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(
                f"DistillationObjective.feature_loss={self.feature_loss!r} is invalid: "
                f"must be one of {FEATURE_LOSSES}"
            )
        check_inject_at(self.inject_at)
        if self.logit_chunk is not None and (
            isinstance(self.logit_chunk, bool) or not isinstance(self.logit_chunk, int) or self.logit_chunk <= 0
        ):
            raise ValueError(
                f"DistillationObjective.logit_chunk={self.logit_chunk!r} is invalid: must be a positive integer "
                "(sequence positions per chunk) or None"
            )
        check_divergence(self.divergence, self.jsd_beta, self.skew_alpha, owner="DistillationObjective.")
        if self.cached_kl not in CACHED_KL:
            raise ValueError(
                f"DistillationObjective.cached_kl={self.cached_kl!r} is invalid: must be one of {CACHED_KL}"
            )
        if self.injected_pass not in ("auto", "vmap", "scan"):
            raise ValueError(
                f"DistillationObjective.injected_pass={self.injected_pass!r} is invalid: "
                "must be 'auto', 'vmap' or 'scan'"
            )
        if self.layer_indices is not None and (
            not self.layer_indices or any(i < 0 for i in self.layer_indices)
        ):
            raise ValueError(
                f"DistillationObjective.layer_indices={self.layer_indices!r} is invalid: "
                "must be a non-empty tuple of non-negative layer indices"
            )
        if self.layer_map is not None:
            _validate_layer_map(self.layer_map)
            if self.inject_at != "layer":
                raise ValueError(
                    "DistillationObjective.layer_map is only used with inject_at='layer' "
                    f"(got inject_at={self.inject_at!r})"
                )

    def __init__(
        self,
        blockwise_weight: Schedule = 1.0,
        temperature: Schedule = 1.0,
        feature_loss: str = "cosine",
        inject_at: str = "attention",
        label_weight: Schedule = 0.0,
        layer_indices: Sequence[int] | None = None,
        layer_map: Sequence[Sequence[int]] | None = None,
        injected_pass: str = "auto",
        teacher_weight: float = 1.0,
        cached_kl: str = "tail",
        logit_chunk: int | None = None,
        divergence: str = "kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1,
    ):
        # names are plain `str` here (not Literal) so that a wrong one is the ValueError
        # of __check_init__, which names the field, in and out of the type-checked tests
        self.blockwise_weight = blockwise_weight
        self.temperature = temperature
        self.feature_loss = feature_loss
        self.inject_at = inject_at
        self.label_weight = label_weight
        self.layer_indices = None if layer_indices is None else tuple(int(i) for i in layer_indices)
        self.layer_map = None if layer_map is None else _validate_layer_map(layer_map)
        self.injected_pass = injected_pass
        self.teacher_weight = teacher_weight
        self.cached_kl = cached_kl
        self.logit_chunk = logit_chunk
        self.divergence, self.jsd_beta, self.skew_alpha = divergence, jsd_beta, skew_alpha

    # ------------------------------------------------------------------ helpers

    def resolve_layer_map(self, teacher_layers: int, student_layers: int) -> tuple[tuple[int, int], ...]:
        """The spans used for a teacher/student depth pair (identity when equal).

        Raises a `ValueError` that names both depths when they cannot be mapped.
        """
        return resolve_layer_map(self.layer_map, self.inject_at, teacher_layers, student_layers)

    def check_pair(self, student: Transformer, teacher_out: ModelOutput, tokens: Array) -> None:
        """Raise a `ValueError` naming both values when student and teacher do not fit."""
        if teacher_out.logits.shape[:-1] != tokens.shape:
            raise ValueError(
                f"teacher_out.logits has shape {tuple(teacher_out.logits.shape)}, which does not "
                f"match tokens of shape {tuple(tokens.shape)}"
            )
        self.check_shapes(
            student.config,
            teacher_dim=teacher_out.states.layer_in.shape[-1],
            teacher_vocab=teacher_out.logits.shape[-1],
            teacher_layers=teacher_out.states.layer_in.shape[1],
            layer_map=self.passes(0)[1],  # the logit terms need no map: a student of any depth fits them
        )

    def check_cached(self, teacher_out: TopKLogits, tokens: Array | jax.ShapeDtypeStruct, vocab: int = 0) -> None:
        """Raise a `ValueError` when cached teacher logits cannot serve this objective: a
        blockwise term needs the teacher's states, which a cache does not hold, the cached
        rows do not match `tokens` (an array, or its abstract shape when planning), or
        the divergence is not `"kl"` and the cache keeps fewer ids than the `vocab`."""
        if self.passes(0)[1]:
            raise ValueError(
                "cached teacher logits (TopKLogits) hold no teacher states: an objective with a "
                f"blockwise term (blockwise_weight={self.blockwise_weight!r}) needs the teacher itself"
            )
        if teacher_out.ids.shape[:-1] != tokens.shape:
            raise ValueError(
                f"cached teacher ids have shape {tuple(teacher_out.ids.shape)}, which does not "
                f"match tokens of shape {tuple(tokens.shape)}"
            )
        if vocab and (refusal := cached_divergence_refusal(self.divergence, teacher_out.k, vocab)):
            raise ValueError(f"DistillationObjective.{refusal}")

    def check_shapes(
        self, student: TransformerConfig, *, teacher_dim: int, teacher_vocab: int, teacher_layers: int,
        layer_map: bool = True,
    ) -> tuple[tuple[int, int], ...]:
        """Check that a student fits a teacher of these sizes (a `ValueError` naming both
        values otherwise); returns the layer map's spans (none with `layer_map=False`: the
        logit terms alone need no map, so a student of any depth fits them)."""
        if teacher_dim != student.dim:
            raise ValueError(
                f"teacher width {teacher_dim} != student width {student.dim}: "
                "blockwise distillation needs equal dim"
            )
        if teacher_vocab != student.vocab_size:
            raise ValueError(
                f"teacher vocab_size {teacher_vocab} != student vocab_size "
                f"{student.vocab_size}: KL distillation needs the same vocabulary"
            )
        if self.layer_indices is not None and max(self.layer_indices) >= student.n_layers:
            raise ValueError(
                f"DistillationObjective.layer_indices={self.layer_indices} is invalid for a "
                f"student of {student.n_layers} layers"
            )
        if not layer_map:
            return ()
        return self.resolve_layer_map(teacher_layers, student.n_layers)

    def _feature_terms(
        self,
        student: Transformer,
        teacher_out: ModelOutput,
        tokens: BatchTokens,
        mask: BatchMask,
        segment_ids: BatchSegments | None,
    ) -> tuple[Float[Array, ""], Float[Array, " layers"]]:
        spans = self.resolve_layer_map(teacher_out.states.layer_in.shape[1], student.config.n_layers)
        starts = jnp.array([a for a, _ in spans])
        ends = jnp.array([b - 1 for _, b in spans])
        if self.inject_at == "attention":
            inject = teacher_out.states.attn_in[:, starts]
            target = teacher_out.states.attn_out[:, ends]
        else:
            inject = teacher_out.states.layer_in[:, starts]
            target = teacher_out.states.layer_out[:, ends]
        injected_pass = self.injected_pass
        if injected_pass == "auto":
            injected_pass = "scan"
        if injected_pass == "vmap":
            predicted = jax.vmap(
                lambda t, inj, seg: student.blockwise_outputs(
                    t, inj, inject_at=self.inject_at, segment_ids=seg
                )
            )(tokens, inject, segment_ids)
        else:
            states = jax.vmap(
                lambda t, inj, seg: student(
                    t, inject=inj, inject_at=self.inject_at, segment_ids=seg
                ).states
            )(tokens, inject, segment_ids)
            predicted = states.attn_out if self.inject_at == "attention" else states.layer_out
        # predicted, target: batch layers seq dim; one loss per layer over the valid tokens
        per_layer = jax.vmap(
            lambda s, t: feature_loss(s, t, self.feature_loss, mask), in_axes=(1, 1)
        )(predicted, target)
        return self.selected_mean(per_layer), per_layer

    # ------------------------------------------------------------------ the loss

    def __call__(
        self,
        student: Transformer,
        teacher_out: ModelOutput | TopKLogits | None,
        tokens: BatchTokens,
        mask: BatchMask | None = None,
        step: int | Array = 0,
        *,
        segment_ids: BatchSegments | None = None,
        teacher_head: Transformer | None = None,
    ) -> tuple[Float[Array, ""], Metrics]:
        if teacher_out is None:
            if self.uses_teacher:
                raise ValueError(
                    f"teacher_out=None needs teacher_weight=0 (got teacher_weight={self.teacher_weight!r})"
                )
        elif isinstance(teacher_out, TopKLogits):
            self.check_cached(teacher_out, tokens, student.config.vocab_size)
        else:
            self.check_pair(student, teacher_out, tokens)
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(
                f"segment_ids has shape {tuple(segment_ids.shape)}, expected the shape of "
                f"tokens {tuple(tokens.shape)}"
            )
        if mask is None:
            mask = jnp.ones(tokens.shape, dtype=bool)
        n_layers = student.config.n_layers
        _, temperature, _ = self.weights(step)
        need_free, need_block, free_active, block_active = self.passes(step)
        zero = jnp.zeros((), jnp.float32)

        def free_pass(student):
            if self.logit_chunk is not None:
                hidden = jax.vmap(lambda t, seg: student(t, segment_ids=seg).hidden)(tokens, segment_ids)
                teacher = {}
                if isinstance(teacher_out, TopKLogits):
                    teacher = {"cached": teacher_out}
                elif teacher_out is not None and teacher_head is not None:
                    teacher = {"teacher_head": teacher_head.head, "teacher_hidden": teacher_out.hidden}
                elif teacher_out is not None:
                    teacher = {"teacher_logits": teacher_out.logits}
                return chunked_logit_losses(
                    student.head, hidden, tokens, mask, segment_ids, chunk=self.logit_chunk,
                    temperature=temperature, tail=self.cached_kl == "tail", divergence=self.divergence,
                    jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha, **teacher,
                )
            logits = jax.vmap(lambda t, seg: student(t, segment_ids=seg).logits)(tokens, segment_ids)
            if teacher_out is None:
                kl = zero
            else:
                kl = logit_divergence(
                    logits, teacher_out if isinstance(teacher_out, TopKLogits) else teacher_out.logits, mask,
                    temperature, self.divergence, jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha,
                    tail=self.cached_kl == "tail",
                )
            ce = next_token_cross_entropy(logits, tokens, mask, segment_ids)
            return kl, ce

        def feature_pass(student):
            return self._feature_terms(student, teacher_out, tokens, mask, segment_ids)

        # a pass whose weight is statically zero is not traced; one whose scheduled
        # weight is zero at this step is skipped at run time
        if not need_free:
            kl, ce = zero, zero
        elif isinstance(free_active, bool):
            kl, ce = free_pass(student)
        else:
            kl, ce = jax.lax.cond(free_active, free_pass, lambda _: (zero, zero), student)

        if not need_block:
            feature, per_layer = zero, jnp.zeros((n_layers,), jnp.float32)
        elif isinstance(block_active, bool):
            feature, per_layer = feature_pass(student)
        else:
            feature, per_layer = jax.lax.cond(
                block_active,
                feature_pass,
                lambda _: (zero, jnp.zeros((n_layers,), jnp.float32)),
                student,
            )

        return self.mix(kl, ce, feature, per_layer, step)

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads the teacher at all (`teacher_weight` is not 0)."""
        return self.teacher_weight != 0

    def weights(self, step: int | Array) -> tuple[Array | float, Array | float, Array | float]:
        """`(w, T, label_weight)` at `step` (floats, or arrays for schedules)."""
        return (
            _evaluate(self.blockwise_weight, step),
            _evaluate(self.temperature, step),
            _evaluate(self.label_weight, step),
        )

    def selected_mean(self, per_layer: Float[Array, " layers"]) -> Float[Array, ""]:
        """`F`: the mean of the per-layer feature losses over the selected layers."""
        if self.layer_indices is None:
            return jnp.mean(per_layer)
        return jnp.mean(per_layer[jnp.array(self.layer_indices)])

    def mix(
        self,
        kl: Float[Array, ""],
        ce: Float[Array, ""],
        feature: Float[Array, ""],
        per_layer: Float[Array, " layers"],
        step: int | Array,
    ) -> tuple[Float[Array, ""], Metrics]:
        """The loss `teacher_weight ((1 - w) KL + w F) + label_weight CE` at `step`, and
        the metrics."""
        w, temperature, label_weight = self.weights(step)
        loss = self.teacher_weight * ((1.0 - w) * kl + w * feature) + label_weight * ce
        loss = jnp.asarray(loss, jnp.float32)
        metrics = {
            "loss": loss,
            "kl": kl,
            "feature": feature,
            "ce": ce,
            "blockwise_weight": jnp.asarray(w if self.uses_teacher else 0.0, jnp.float32),
            "temperature": jnp.asarray(temperature, jnp.float32),
            "feature_per_layer": per_layer,
        }
        return loss, metrics

    def passes(self, step: int | Array) -> tuple[bool, bool, Array | bool, Array | bool]:
        """Which passes a step needs: `(free, blockwise)` as static bools (False only when
        the weight is statically zero) and, for each, whether it counts at `step` (an
        array under a schedule, else the same bool)."""
        w, _, label_weight = self.weights(step)
        if not self.uses_teacher:
            w = kl_weight = 0.0
        else:
            kl_weight = 1.0 - w
        need_free = _maybe_nonzero(kl_weight) or _maybe_nonzero(label_weight)
        need_block = _maybe_nonzero(w)
        free_active: Array | bool = need_free
        if need_free and (callable(self.blockwise_weight) or callable(self.label_weight)):
            free_active = (jnp.asarray(kl_weight) != 0) | (jnp.asarray(label_weight) != 0)
        block_active: Array | bool = need_block
        if need_block and callable(self.blockwise_weight) and self.uses_teacher:
            block_active = jnp.asarray(w) != 0
        return need_free, need_block, free_active, block_active


def _maybe_nonzero(value: Array | float) -> bool:
    """False only for a weight known (statically) to be zero."""
    if isinstance(value, (int, float)):
        return value != 0
    return True
