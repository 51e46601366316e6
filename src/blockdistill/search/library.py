"""Block library search (NVIDIA Puzzle's idea, in one scan-free JAX program): many candidate
blocks per teacher layer trained at once on the teacher's own layer inputs, scored, and
assembled into the best heterogeneous student under a budget.

- [`candidate_shapes`][blockdistill.candidate_shapes] (in
  [`space`][blockdistill.search.space]) lists the candidates of a
  [`SearchSpace`][blockdistill.SearchSpace]: MLP widths, fewer KV heads, attention or MLP
  dropped, a linear map, the identity.
- [`BlockLibrary`][blockdistill.BlockLibrary] holds every trainable candidate for every
  layer, one stacked [`blockdistill.LayerStack`][] per candidate, initialised by pruning
  the teacher's layers; [`library_loss`][blockdistill.library_loss] trains all of them
  from one teacher forward (each candidate's layers in parallel with `jax.vmap`, like the
  layer-parallel blockwise pass).
- [`blockwise_scores`][blockdistill.blockwise_scores] and
  [`swap_scores`][blockdistill.swap_scores] score every candidate at every layer: its
  held-out block loss, and the end-to-end KL of the teacher with only that block swapped.
- [`assemble_student`][blockdistill.assemble_student] builds the student that
  [`blockdistill.choose_blocks`][] picks.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Float
from ..distill.losses import FeatureLoss, feature_loss, kl_divergence, next_token_cross_entropy
from ..distill.prune import _prune, mlp_channel_importance
from ..nn.config import BlockShape, TransformerConfig
from ..nn.hetero import compact_layers, place_stack, stack_weights
from ..nn.model import Transformer
from ..nn.stack import LayerStack
from ..nn.teacher import Teacher
from .space import (
    _FEATURE_LOSSES,
    SearchSpace,
    _candidate_config,
    _is_trained,
    candidate_shapes,
)


class BlockLibrary(eqx.Module):
    """Trainable candidate blocks for every layer of a teacher.

    `stacks[i]` is a [`blockdistill.LayerStack`][] of `teacher.n_layers` layers of shape
    `trained_shapes[i]` (the candidates of `shapes` that have weights; the identity has
    none), stored at that shape; layer `l` of a stack is that candidate for teacher layer
    `l`. Build it with
    [`init_library`][blockdistill.init_library].

    **Example:**

    ```python
    library = bd.init_library(teacher, bd.SearchSpace(mlp_ratios=(0.5,)), batch_tokens)
    len(library.shapes), len(library.stacks)
    ```
    """

    stacks: tuple[LayerStack, ...]
    shapes: tuple[BlockShape, ...] = eqx.field(static=True)
    config: TransformerConfig = eqx.field(static=True)

    @property
    def trained_shapes(self) -> tuple[BlockShape, ...]:
        return tuple(shape for shape in self.shapes if _is_trained(shape))

    def stack_of(self, candidate: int) -> LayerStack | None:
        """The stack of candidate `candidate` (an index into `shapes`), `None` for the identity."""
        if not _is_trained(self.shapes[candidate]):
            return None
        return self.stacks[sum(_is_trained(s) for s in self.shapes[:candidate])]


def _unwrap(teacher: Transformer | Teacher) -> Transformer:
    return teacher.model if isinstance(teacher, Teacher) else teacher


def init_library(
    teacher: Transformer | Teacher,
    space: SearchSpace,
    calibration_tokens: BatchTokens,
    *,
    calibration_mask: BatchMask | None = None,
) -> BlockLibrary:
    """Every candidate of `space` for every layer of `teacher`, initialised from the
    teacher's own layer the way [`blockdistill.make_student`][] prunes: the MLP channels
    with the largest mean activation on `calibration_tokens` survive, adjacent KV heads are
    averaged, a dropped part is zero; the linear map starts at zero (the identity) on the
    teacher layer's input norm.
    Deterministic: no candidate is random.

    **Example:**

    ```python
    library = bd.init_library(teacher, bd.SearchSpace(mlp_ratios=(1.0, 0.5)), batch_tokens)
    ```
    """
    model = _unwrap(teacher)
    config = model.config
    shapes = candidate_shapes(config, space)
    importance = mlp_channel_importance(model, calibration_tokens, calibration_mask)
    all_layers = tuple(range(config.n_layers))
    stacks = []
    for shape in (s for s in shapes if _is_trained(s)):
        own = _candidate_config(config, shape)
        skeleton = eqx.filter_eval_shape(LayerStack, own, key=jax.random.key(0))
        if shape.has_attention or shape.has_mlp:  # pruned at its width, the parts it lacks dropped
            layers = _prune(model, importance, all_layers, own.replace(layer_shapes=None)).layers.layers
            layers = compact_layers(layers, own)
        else:  # the linear map from zero, reading the teacher layer's own input norm
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), skeleton)
            norms = model.layers.layers.input_layernorm.weight
            layers = zeros.with_segments([
                # a copy: the library's buffers are donated, never the teacher's
                eqx.tree_at(lambda l: l.input_layernorm.weight, segment, jnp.copy(norms[start:stop]))
                for segment, (start, stop) in zip(zeros.segments, zeros.bounds)
            ]).layers
        stack = eqx.tree_at(lambda s: s.layers, skeleton, layers)
        stacks.append(stack)
    return BlockLibrary(stacks=tuple(stacks), shapes=shapes, config=config)


def _teacher_states(teacher: Transformer, tokens, segment_ids):
    teacher = jax.lax.stop_gradient(teacher)
    return jax.vmap(lambda t, seg: teacher(t, segment_ids=seg))(tokens, segment_ids)


def _candidate_outputs(stack: LayerStack, layer_in, segment_ids):
    """Every layer of one candidate on the teacher's input to that layer:
    `[batch, layers, seq, dim]`."""
    return jax.vmap(
        lambda x, seg: stack.blockwise_outputs(x, inject_at="layer", segment_ids=seg)
    )(layer_in, segment_ids)


def _per_layer(predicted, target, kind: FeatureLoss, mask) -> Float[Array, " layers"]:
    # [batch, layers, seq, dim] -> one loss per layer over all valid tokens of the batch
    return jax.vmap(lambda p, t: feature_loss(p, t, kind, mask), in_axes=1)(predicted, target)


def library_loss(
    library: BlockLibrary,
    teacher: Transformer | Teacher,
    tokens: BatchTokens,
    mask: BatchMask,
    *,
    segment_ids: BatchSegments | None = None,
    kind: FeatureLoss = "nmse",
) -> tuple[Float[Array, ""], Float[Array, "candidates layers"]]:
    """The training loss of the whole library on one batch: the teacher runs once, every
    trained candidate's every layer reads the teacher's input to that layer and is scored
    against the teacher's output of it (layer-level blockwise, `kind` feature loss).
    Returns the sum over candidates and layers (each block's gradient is its own loss's)
    and the `[trained candidates, layers]` losses. The candidate of the teacher's own
    shape is its layers, unpruned: it gets no gradient (Adam would turn the rounding noise
    of its zero loss into steps).

    **Example:**

    ```python
    total, per_block = bd.library_loss(library, teacher, batch_tokens, jnp.ones(batch_tokens.shape, bool))
    ```
    """
    if kind not in _FEATURE_LOSSES:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {_FEATURE_LOSSES}")
    model = _unwrap(teacher)
    layer_in, target = _layer_states(model, tokens, segment_ids)
    return _stacks_loss(library.stacks, _frozen_flags(library, model), layer_in, target, mask, segment_ids, kind)


def _layer_states(model: Transformer, tokens, segment_ids):
    """The teacher's input to and output of every layer, `[batch, layers, seq, dim]` each."""
    states = _teacher_states(model, tokens, segment_ids).states
    return jax.lax.stop_gradient((states.layer_in, states.layer_out))


def _frozen_flags(library: BlockLibrary, model: Transformer) -> tuple[bool, ...]:
    """Which trained candidates are the teacher's own layers (nothing to learn: kept exact)."""
    own = BlockShape(model.config.mlp_dim, model.config.n_kv_heads)
    return tuple(shape == own for shape in library.trained_shapes)


def _stacks_loss(stacks, frozen, layer_in, target, mask, segment_ids, kind):
    rows = []
    for stack, is_frozen in zip(stacks, frozen):
        if is_frozen:
            stack = jax.lax.stop_gradient(stack)
        rows.append(_per_layer(_candidate_outputs(stack, layer_in, segment_ids), target, kind, mask))
    losses = jnp.stack(rows)
    return jnp.sum(losses), losses


@eqx.filter_jit
def blockwise_scores(
    library: BlockLibrary,
    teacher: Transformer | Teacher,
    tokens: BatchTokens,
    mask: BatchMask,
    *,
    segment_ids: BatchSegments | None = None,
    kind: FeatureLoss = "nmse",
) -> Float[Array, "candidates layers"]:
    """Every candidate's (all of `library.shapes`, the identity included) block loss at
    every layer on one batch: what [`library_loss`][blockdistill.library_loss] trains.

    **Example:**

    ```python
    scores = bd.blockwise_scores(library, teacher, batch_tokens, jnp.ones(batch_tokens.shape, bool))
    scores.shape  # (len(library.shapes), cfg.n_layers)
    ```
    """
    states = _teacher_states(_unwrap(teacher), tokens, segment_ids).states
    rows = []
    for candidate in range(len(library.shapes)):
        stack = library.stack_of(candidate)
        out = states.layer_in if stack is None else _candidate_outputs(stack, states.layer_in, segment_ids)
        rows.append(_per_layer(out, states.layer_out, kind, mask))
    return jnp.stack(rows)


#: the scores of a block swapped into the teacher, each lower-is-better (see `replacement_scores`)
REPLACEMENT_SCORES = ("kl", "lm_loss", "top1")


@eqx.filter_jit
def replacement_scores(
    library: BlockLibrary,
    teacher: Transformer | Teacher,
    tokens: BatchTokens,
    mask: BatchMask,
    *,
    segment_ids: BatchSegments | None = None,
) -> dict[str, Float[Array, "candidates layers"]]:
    """Puzzle's replace-one-block scores: for every candidate `c` and layer `l`, the
    teacher with layer `l` replaced by `c` is scored three ways on the batch, each
    lower-is-better:

    - `"kl"`: `KL(teacher || teacher with the block swapped)` of the next-token
      distributions, averaged over the valid tokens;
    - `"lm_loss"`: the swapped model's next-token cross-entropy on the batch's own
      tokens (pairs within one document);
    - `"top1"`: how often the swapped model's most likely next token is not the
      teacher's (1 - top-1 agreement), over the valid tokens.

    The teacher's prefix is shared (its input to layer `l` is the candidate's input); the
    teacher layers after `l` then run on the candidate's output, for all candidates of one
    layer together (`jax.lax.map` over candidates, so one candidate's logits are alive at
    a time), and the three scores come from the same logits.

    **Example:**

    ```python
    scores = bd.replacement_scores(library, teacher, batch_tokens, jnp.ones(batch_tokens.shape, bool))
    scores["top1"].shape  # (len(library.shapes), cfg.n_layers)
    ```
    """
    model = jax.lax.stop_gradient(_unwrap(teacher))
    out = _teacher_states(model, tokens, segment_ids)
    states, teacher_logits = out.states, out.logits
    teacher_top1 = jnp.argmax(teacher_logits, axis=-1)
    valid = mask.astype(jnp.float32)
    outputs = jnp.stack([
        states.layer_in if (stack := library.stack_of(c)) is None
        else _candidate_outputs(stack, states.layer_in, segment_ids)
        for c in range(len(library.shapes))
    ])  # [candidates, batch, layers, seq, dim]
    params, static = eqx.partition(model.layers.layers, eqx.is_array)
    n_layers = model.config.n_layers
    columns = []
    for layer in range(n_layers):
        rest = jax.tree.map(lambda p: p[layer + 1:], params)

        def finish(hidden, rest=rest, count=n_layers - layer - 1):
            def one(h, seg):
                def body(x, layer_params):
                    step = eqx.combine(layer_params, static)(x, segment_ids=seg)
                    return step.layer_out, None

                if count:
                    h, _ = jax.lax.scan(body, h, rest)
                return model.head(h)

            logits = jax.vmap(one)(hidden, segment_ids)
            disagree = (jnp.argmax(logits, axis=-1) != teacher_top1).astype(jnp.float32)
            return (kl_divergence(logits, teacher_logits, mask),
                    next_token_cross_entropy(logits, tokens, mask, segment_ids),
                    jnp.sum(disagree * valid) / jnp.maximum(jnp.sum(valid), 1.0))

        columns.append(jax.lax.map(finish, outputs[:, :, layer]))
    return {name: jnp.stack([column[i] for column in columns], axis=1) for i, name in enumerate(REPLACEMENT_SCORES)}


def swap_scores(
    library: BlockLibrary,
    teacher: Transformer | Teacher,
    tokens: BatchTokens,
    mask: BatchMask,
    *,
    segment_ids: BatchSegments | None = None,
) -> Float[Array, "candidates layers"]:
    """Puzzle's replace-one-block score: for every candidate `c` and layer `l`, the KL
    divergence `KL(teacher || teacher with layer l replaced by c)` of the next-token
    distributions, averaged over the valid tokens of the batch (the `"kl"` score of
    [`replacement_scores`][blockdistill.replacement_scores], which gives the others from
    the same pass).

    **Example:**

    ```python
    kl = bd.swap_scores(library, teacher, batch_tokens, jnp.ones(batch_tokens.shape, bool))
    kl.shape  # (len(library.shapes), cfg.n_layers)
    ```
    """
    return replacement_scores(library, teacher, tokens, mask, segment_ids=segment_ids)["kl"]


def _update(tree, opt_state, optimizer, loss_fn):
    """One optax update of the float leaves of `tree` by the gradient of
    `loss_fn(tree) -> (total, losses)`; returns `(tree, opt_state, losses)`."""
    params, static = eqx.partition(tree, eqx.is_inexact_array)
    (_, losses), grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static)), has_aux=True)(params)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(tree, updates), opt_state, losses


def _library_step(frozen, library: BlockLibrary, opt_state, *, optimizer, kind: FeatureLoss):
    teacher, tokens, mask, segment_ids = frozen
    return _update(library, opt_state, optimizer,
                   lambda lib: library_loss(lib, teacher, tokens, mask, segment_ids=segment_ids, kind=kind))


_jitted_library_step = eqx.filter_jit(_library_step, donate="all-except-first")


def _group_step(frozen, stacks, opt_state, *, optimizer, kind: FeatureLoss, flags: tuple[bool, ...]):
    layer_in, target, mask, segment_ids = frozen
    return _update(stacks, opt_state, optimizer,
                   lambda group: _stacks_loss(group, flags, layer_in, target, mask, segment_ids, kind))


_jitted_group_step = eqx.filter_jit(_group_step, donate="all-except-first")
_jitted_layer_states = eqx.filter_jit(_layer_states)


class LibraryStep(eqx.Module):
    """One training step of a whole [`BlockLibrary`][blockdistill.BlockLibrary]:
    [`library_loss`][blockdistill.library_loss], its gradient and an optax update (the
    library and the optimizer state are donated). Every block's gradient is its own
    loss's, so with a per-parameter optimizer (Adam, no global-norm clipping: the
    default from `make_optimizer(..., clip_norm=None)`) the blocks train independently.

    - `group_size=None` (default): one compiled program, the teacher's forward included;
      it holds every candidate's activations at once.
    - `group_size=g`: the teacher's layer states are computed once, then the candidates
      train in groups of `g`, one compiled program per group reading the same states: the
      same numbers, with only one group's activations alive at a time.

    Build the optimizer state with `step.init(library)` (its structure follows the
    grouping).

    **Call:** `step(library, opt_state, teacher, tokens, mask, *, segment_ids=None)
    -> (library, opt_state, losses)` with `losses` the `[trained candidates, layers]`
    block losses of the batch (before the update).

    **Example:**

    ```python
    step = bd.LibraryStep(optimizer=bd.make_optimizer(1e-3, clip_norm=None), group_size=4)
    opt_state = step.init(library)
    library, opt_state, losses = step(library, opt_state, teacher, batch_tokens,
                                      jnp.ones(batch_tokens.shape, bool))
    ```
    """

    optimizer: Any = eqx.field(static=True)
    kind: str = eqx.field(static=True, default="nmse")
    group_size: int | None = eqx.field(static=True, default=None)

    def __post_init__(self):
        if self.kind not in _FEATURE_LOSSES:
            raise ValueError(f"LibraryStep.kind={self.kind!r} is invalid: must be one of {_FEATURE_LOSSES}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size <= 0):
            raise ValueError(f"LibraryStep.group_size={self.group_size!r} is invalid: must be a positive integer")

    def _groups(self, library: BlockLibrary) -> list[range]:
        count = len(library.stacks)
        return [range(start, min(start + self.group_size, count)) for start in range(0, count, self.group_size)]

    def init(self, library: BlockLibrary) -> Any:
        """The optimizer state for `library` under this step's grouping.

        **Example:**

        ```python
        opt_state = bd.LibraryStep(optimizer=bd.make_optimizer(1e-3, clip_norm=None)).init(library)
        ```
        """
        if self.group_size is None:
            return self.optimizer.init(eqx.filter(library, eqx.is_inexact_array))
        return tuple(
            self.optimizer.init(eqx.filter(tuple(library.stacks[i] for i in group), eqx.is_inexact_array))
            for group in self._groups(library)
        )

    def __call__(
        self,
        library: BlockLibrary,
        opt_state: Any,
        teacher: Transformer | Teacher,
        tokens: BatchTokens,
        mask: BatchMask,
        *,
        segment_ids: BatchSegments | None = None,
    ) -> tuple[BlockLibrary, Any, Float[Array, "candidates layers"]]:
        model = _unwrap(teacher)
        if self.group_size is None:
            frozen = (model, tokens, mask, segment_ids)
            return _jitted_library_step(frozen, library, opt_state, optimizer=self.optimizer, kind=self.kind)
        groups = self._groups(library)
        if not isinstance(opt_state, tuple) or len(opt_state) != len(groups):
            raise ValueError(f"opt_state does not match group_size={self.group_size}: build it with step.init(library)")
        layer_in, target = _jitted_layer_states(model, tokens, segment_ids)
        frozen = (layer_in, target, mask, segment_ids)
        flags = _frozen_flags(library, model)
        stacks, states, losses = [], [], []
        for group, state in zip(groups, opt_state):
            new, state, rows = _jitted_group_step(
                frozen, tuple(library.stacks[i] for i in group), state,
                optimizer=self.optimizer, kind=self.kind, flags=tuple(flags[i] for i in group),
            )
            stacks.extend(new)
            states.append(state)
            losses.append(rows)
        library = BlockLibrary(stacks=tuple(stacks), shapes=library.shapes, config=library.config)
        return library, tuple(states), jnp.concatenate(losses)


def assemble_student(
    teacher: Transformer | Teacher, library: BlockLibrary, indices: tuple[int, ...] | list[int]
) -> Transformer:
    """The heterogeneous student that takes candidate `indices[l]` for teacher layer `l`
    (indices into `library.shapes`, e.g. `choose_blocks(...).indices`), with its trained
    weights, and the teacher's embeddings, final norm and head. Removed layers (the
    identity) are left out, so the student has one layer per kept teacher layer. When every
    kept layer has the same full shape the student is a plain uniform
    [`blockdistill.Transformer`][]; otherwise its config has `layer_shapes` and it holds
    every layer at its own shape (compact segments, see
    [`blockdistill.LayerStack`][]).

    **Example:**

    ```python
    student = bd.assemble_student(teacher, library, [0] * cfg.n_layers)
    ```
    """
    model = _unwrap(teacher)
    config = model.config
    if len(indices) != config.n_layers:
        raise ValueError(f"indices has {len(indices)} entries for a teacher of n_layers={config.n_layers}")
    for layer, index in enumerate(indices):
        if not 0 <= int(index) < len(library.shapes):
            raise ValueError(f"indices[{layer}]={index} is not a candidate index (0..{len(library.shapes) - 1})")
    kept = [(layer, int(c)) for layer, c in enumerate(indices) if _is_trained(library.shapes[int(c)])]
    if not kept:
        raise ValueError("every layer is the identity: the student would have no layers")
    shapes = tuple(library.shapes[c] for _, c in kept)
    regular = len(set(shapes)) == 1 and shapes[0].has_attention and shapes[0].has_mlp and not shapes[0].linear
    student_config = config.replace(
        n_layers=len(kept),
        mlp_dim=max(1, max(s.mlp_dim for s in shapes)),
        n_kv_heads=max(1, max(s.n_kv_heads for s in shapes)),
        layer_shapes=None if regular else shapes,
    )
    skeleton = eqx.filter_eval_shape(Transformer, student_config, key=jax.random.key(0))
    rows = [stack_weights(library.stack_of(candidate), layer) for layer, candidate in kept]
    student = eqx.tree_at(lambda m: m.layers, skeleton, place_stack(skeleton.layers, rows))
    return eqx.tree_at(
        lambda m: (m.embed_tokens, m.norm, m.lm_head),
        student,
        (model.embed_tokens, model.norm, model.lm_head),
        is_leaf=lambda x: x is None,
    )
