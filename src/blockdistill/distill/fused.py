"""The fused distillation step: teacher and student layer by layer in one `lax.scan`.

Each scan step runs the teacher's layer (or span of layers, for a grouped student), the
student's block on the teacher's input to it, with that block's feature loss and its
gradient taken right there (the blocks are independent, so nothing later needs them),
and, when the recipe needs the student's free-running pass, the student's own layer on
its own residual stream (the carry). No `[layers, batch, seq, dim]` teacher state
outlives its scan step: the teacher's states are consumed where they are made. The
heads, the logit divergence (the objective's, KL by default) and cross-entropy run once
after the scan; the free pass is differentiated by ordinary reverse-mode autodiff
through the scan (its activations are the only per-layer residuals, and `remat` applies
to them).
"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Float
from ..nn.model import Transformer, _cast_floating, in_compute_dtype
from ..nn.stack import _REMAT_POLICIES
from ..parallel.sharding import gather_fsdp
from .losses import (
    chunked_logit_losses,
    feature_loss,
    logit_divergence,
    next_token_cross_entropy,
)
from .objective import DistillationObjective, Metrics


def fusion_blocker(objective: DistillationObjective, teacher: Transformer, student: Transformer) -> str | None:
    """Why the fused step cannot run this pair, or `None` when it can.

    Fusion needs every scan step to hold the same amount of work: one student layer per
    teacher layer, or a layer map of equal contiguous spans that covers the whole teacher
    (the default grouping).
    """
    if not objective.uses_teacher:
        return "the objective does not read the teacher (teacher_weight=0): there is nothing to fuse"
    if teacher.config.layer_shapes is not None:
        return "the teacher's layers differ (layer_shapes): the fused scan reads one teacher layer at a time by index"
    spans = objective.check_shapes(
        student.config,
        teacher_dim=teacher.config.dim,
        teacher_vocab=teacher.config.vocab_size,
        teacher_layers=teacher.config.n_layers,
    )
    teacher_layers, student_layers = teacher.config.n_layers, student.config.n_layers
    group = teacher_layers // student_layers
    if spans != tuple((j * group, (j + 1) * group) for j in range(student_layers)):
        return f"the layer map {spans} is not equal contiguous spans covering the teacher's {teacher_layers} layers"
    return None


def when(active: Array | bool, run: Any, skip: Any, *args: Any) -> Any:
    """`run(*args)`, or `skip(*args)` where a scheduled pass is off at this step: a
    `lax.cond` (only the chosen branch executes), or a plain call for a static `active`."""
    if isinstance(active, bool):
        return run(*args)
    return jax.lax.cond(active, run, skip, *args)


def _stack_params(model: Transformer) -> tuple[Any, Any]:
    return eqx.partition(model.layers.layers, eqx.is_array)


def fused_value_and_grad(
    objective: DistillationObjective,
    student: Transformer,
    teacher: Transformer,
    tokens: BatchTokens,
    mask: BatchMask,
    step: Array,
    segment_ids: BatchSegments | None,
    trainable: Any,
) -> tuple[tuple[Float[Array, ""], Metrics], Any]:
    """`((loss, metrics), grads)` of `objective` for `student`, equal to differentiating
    `objective(student, teacher_out, ...)` with respect to the arrays that `trainable`
    (a bool pytree over `student`) marks; the other leaves of `grads` are zeros. A
    heterogeneous student runs one scan per segment of its layers, one after the other."""
    blocker = fusion_blocker(objective, teacher, student)
    if blocker is not None:
        raise ValueError(f"the fused step cannot run this teacher and student: {blocker}")
    n_layers = student.config.n_layers
    group = teacher.config.n_layers // n_layers
    w, temperature, label_weight = objective.weights(step)
    need_free, need_block, free_active, block_active = objective.passes(step)
    layer_level = objective.inject_at == "layer"

    # the teacher, frozen, its stacked layers grouped into one span per student layer
    teacher = in_compute_dtype(jax.lax.stop_gradient(teacher))
    # read by index inside the scan, not regrouped into [n_layers, group, ...]: XLA laid a
    # regrouped stack out anew, a copy of the teacher's weights that grew with depth
    teacher_params, teacher_static = _stack_params(teacher)

    train, rest = eqx.partition(student, trainable)
    bounds = student.layers.bounds
    # the blocks' own copies of the student's layers, per segment (their gradients are
    # taken inside the scan, not by the outer autodiff): trainable leaves and the rest
    blocks = [
        eqx.partition(eqx.filter(segment, eqx.is_array), spec)
        for segment, spec in zip(student.layers.segments, trainable.layers.segments)
    ]
    statics = [eqx.filter(segment, eqx.is_array, inverse=True) for segment in student.layers.segments]
    compute_dtype = student.config.compute_dtype

    def block_loss(train_params, rest_params, block_in, target, *, static):
        params = gather_fsdp(eqx.combine(train_params, rest_params))
        if student.config.dtype != "float32":
            params = _cast_floating(params, compute_dtype)
        layer = eqx.combine(params, static)
        if layer_level:
            predicted = jax.vmap(
                lambda x, seg: layer(x, inject=x, inject_at="layer", segment_ids=seg).layer_out
            )(block_in, segment_ids)
        else:
            predicted = jax.vmap(lambda x, seg: layer.attend(x, segment_ids=seg))(block_in, segment_ids)
        return feature_loss(predicted, target, objective.feature_loss, mask)

    def teacher_layer(hidden, layer_params):
        layer = eqx.combine(gather_fsdp(layer_params), teacher_static)
        out = jax.vmap(lambda x, seg: layer(x, segment_ids=seg))(hidden, segment_ids)
        return out.layer_out, out

    def run(train: Any) -> tuple[Float[Array, ""], tuple]:
        model = in_compute_dtype(eqx.combine(train, rest))

        def segment_body(own_static, block_static):
            def own_layer(hidden, layer_params):
                layer = eqx.combine(gather_fsdp(layer_params), own_static)
                return jax.vmap(lambda x, seg: layer(x, segment_ids=seg).layer_out)(hidden, segment_ids)

            if model.config.remat != "none":
                own_layer = jax.checkpoint(own_layer, policy=_REMAT_POLICIES[model.config.remat])

            def body(carry, xs):
                teacher_hidden, own_hidden = carry
                index, own_layer_params, block_train_params, block_rest_params = xs
                span_in = teacher_hidden
                for offset in range(group):  # the student layer's span of teacher layers
                    layer_params = jax.tree.map(
                        lambda p: jax.lax.dynamic_index_in_dim(p, index * group + offset, keepdims=False),
                        teacher_params,
                    )
                    teacher_hidden, out = teacher_layer(teacher_hidden, layer_params)
                    if offset == 0:
                        first = out
                if need_block:
                    if layer_level:
                        block_in, target = span_in, teacher_hidden
                    else:  # one teacher layer per student layer
                        block_in, target = first.attn_in, first.attn_out
                    layer_loss, layer_grads = when(
                        block_active,
                        jax.value_and_grad(functools.partial(block_loss, static=block_static)),
                        lambda train, *_: (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, train)),
                        block_train_params, block_rest_params, block_in, target,
                    )
                else:
                    layer_loss, layer_grads = jnp.zeros((), jnp.float32), None
                if need_free:
                    own_hidden = when(free_active, own_layer, lambda hidden, *_: hidden, own_hidden, own_layer_params)
                return (teacher_hidden, own_hidden), (layer_loss, layer_grads)

            return body

        teacher_hidden = jax.vmap(teacher.embed)(tokens)
        own_hidden = jax.vmap(model.embed)(tokens) if need_free else None
        carry = (teacher_hidden, own_hidden)
        per_layer, layer_grads = [], []
        for segment, (start, stop), block, static in zip(model.layers.segments, bounds, blocks, statics):
            own_params, own_static = eqx.partition(segment, eqx.is_array)
            carry, (segment_losses, segment_grads) = jax.lax.scan(
                segment_body(own_static, static),
                carry,
                (jnp.arange(start, stop), own_params if need_free else None, *jax.lax.stop_gradient(block)),
                unroll=not student.config.scan_layers,  # scan_layers=False: the loop unrolled
            )
            per_layer.append(segment_losses)
            layer_grads.append(segment_grads)
        teacher_hidden, own_hidden = carry
        per_layer = per_layer[0] if len(per_layer) == 1 else jnp.concatenate(per_layer)
        if need_free:  # KL is computed even at weight 0, as the unfused path logs it
            def heads(model, own_hidden, teacher_hidden):
                if objective.logit_chunk is not None:
                    return chunked_logit_losses(
                        model.head, own_hidden, tokens, mask, segment_ids, chunk=objective.logit_chunk,
                        temperature=temperature, teacher_head=teacher.head, teacher_hidden=teacher_hidden,
                        divergence=objective.divergence, jsd_beta=objective.jsd_beta, skew_alpha=objective.skew_alpha,
                    )
                logits = jax.vmap(model.head)(own_hidden)
                teacher_logits = jax.vmap(teacher.head)(teacher_hidden)
                kl = logit_divergence(  # the objective's divergence (the KL by default)
                    logits, teacher_logits, mask, temperature, objective.divergence,
                    jsd_beta=objective.jsd_beta, skew_alpha=objective.skew_alpha,
                )
                return kl, next_token_cross_entropy(logits, tokens, mask, segment_ids)

            zero = jnp.zeros((), jnp.float32)
            kl, ce = when(free_active, heads, lambda *_: (zero, zero), model, own_hidden, teacher_hidden)
        else:
            kl = ce = jnp.zeros((), jnp.float32)
        free_loss = objective.teacher_weight * (1.0 - w) * kl + label_weight * ce
        return jnp.asarray(free_loss, jnp.float32), (kl, ce, per_layer, layer_grads)

    if need_free:
        (_, (kl, ce, per_layer, layer_grads)), grads = jax.value_and_grad(run, has_aux=True)(train)
    else:
        _, (kl, ce, per_layer, layer_grads) = run(train)
        grads = jax.tree.map(jnp.zeros_like, train)
    if need_block:
        # F is the mean of the selected layers' losses: layer l's gradient is its own
        # block's, times w / (number of selected layers) when l is selected
        selected = jnp.zeros((n_layers,), jnp.float32)
        indices = jnp.arange(n_layers) if objective.layer_indices is None else jnp.array(objective.layer_indices)
        selected = selected.at[indices].set(1.0 / indices.shape[0])
        # (a block pass skipped at this step returned zero gradients and losses)
        scale = jnp.asarray(objective.teacher_weight * w, jnp.float32) * selected
        summed = [
            jax.tree.map(
                lambda own, g, a=start, b=stop: own + g * scale[a:b].reshape((b - a,) + (1,) * (g.ndim - 1)),
                own_grads, segment_grads,
            )
            for own_grads, segment_grads, (start, stop) in zip(grads.layers.segments, layer_grads, bounds)
        ]
        grads = eqx.tree_at(lambda g: g.layers, grads, grads.layers.with_segments(summed))
        feature = objective.selected_mean(per_layer)
    else:
        per_layer = jnp.zeros((n_layers,), jnp.float32)
        feature = jnp.zeros((), jnp.float32)
    loss, metrics = objective.mix(kl, ce, feature, per_layer, step)
    return (loss, metrics), grads
