"""LayerStack: decoder layers stored stacked on a leading `layers` axis (one stack per
segment of equal layers, for a heterogeneous model).

This is where `inject` enters the model: per-layer injected arrays travel as the scanned
inputs (`xs`) of `jax.lax.scan` (or as slices in the unrolled loop, or as the mapped axis
of `jax.vmap` in the layer-parallel mode) and never through the carry.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Key, PRNGKeyArray

from .._types import Float, Hidden, Int, LayerHidden, Segments
from ..parallel.sharding import gather_fsdp
from .attention import KVCache
from .config import BlockShape, TransformerConfig
from .layer import DecoderLayer, InjectAt, LayerStep, check_inject_at

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStates(eqx.Module):
    """Per-layer states of a forward pass, each `Float[Array, "layers seq dim"]`.

    - `attn_in`: what entered the q/k/v projections (the normed residual, or the
      injected array).
    - `attn_out`: the attention output after the o-projection, before the residual add.
    - `layer_in` / `layer_out`: the residual stream entering / leaving the layer.

    In a plain forward `layer_out[l] == layer_in[l + 1]`. Under `jit`, states nobody
    reads cost nothing (XLA removes them).

    **Example:**

    ```python
    states = model(tokens).states
    states.attn_in.shape  # (cfg.n_layers, seq, cfg.dim)
    ```
    """

    attn_in: LayerHidden
    attn_out: LayerHidden
    layer_in: LayerHidden
    layer_out: LayerHidden


def _states(step: LayerStep) -> LayerStates:
    return LayerStates(
        attn_in=step.attn_in,
        attn_out=step.attn_out,
        layer_in=step.layer_in,
        layer_out=step.layer_out,
    )


#: a stack's KV cache: one `KVCache` of `[layers, ...]` for a uniform stack; one per
#: segment for a heterogeneous one (`None` for a segment without attention)
StackCache = KVCache | tuple[KVCache | None, ...]


@eqx.filter_jit
def _stacked_layers(config: TransformerConfig, keys: Key[Array, " layers"], shape: BlockShape | None) -> DecoderLayer:
    """Decoder layers (one per key) built with `eqx.filter_vmap` over keys, compiled once per
    config (initialising eagerly costs seconds of small ops); each of `shape` when given."""
    return eqx.filter_vmap(lambda key: DecoderLayer(config, key=key, shape=shape))(keys)


def _concat(trees: list) -> object:
    """Per-segment outputs stacked on `layers`, joined into one stack over all layers."""
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *trees)


class LayerStack(eqx.Module):
    """`n_layers` decoder layers whose parameters are stacked on a leading axis.

    The stack is built with `eqx.filter_vmap` over split keys, so every array leaf of
    `layers` has shape `(n_layers, ...)`. `scan_layers=True` runs the stack with
    `jax.lax.scan` (compile time independent of depth); `False` runs a Python loop over
    slices of the same parameters (same outputs, longer compiles, sometimes faster
    steps). `remat` wraps each layer in `jax.checkpoint`.

    A heterogeneous config (`layer_shapes`) is stored compactly: `layers` is a tuple with
    one stacked [`blockdistill.DecoderLayer`][] per segment (a run of consecutive layers
    of one shape, `config.segments`), each built at that shape, so no layer stores or
    computes more than its own parameters. The segments run one after the other, each in
    its own scan (or loop, or `vmap` for `blockwise_outputs`), and their per-layer outputs
    are joined: everything the stack returns is stacked over all `n_layers` layers, as for
    a uniform stack, and `inject` is `[n_layers, ...]` too.

    **Call:** `stack(x, *, inject=None, inject_at="attention", segment_ids=None)
    -> (x_out, LayerStates)`. `inject[l]` is given to layer `l` (see
    [`blockdistill.DecoderLayer`][]); `segment_ids` (the documents of a packed row) are
    the same for every layer.

    **Example:**

    ```python
    stack = bd.LayerStack(cfg, key=jax.random.key(0))
    x_out, states = stack(jnp.ones((16, cfg.dim)))
    ```
    """

    layers: DecoderLayer | tuple[DecoderLayer, ...]
    n_layers: int = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    layer_config: TransformerConfig | None = eqx.field(static=True, default=None)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        keys = jax.random.split(key, config.n_layers)
        if config.layer_shapes is None:
            self.layers = _stacked_layers(config, keys, None)
        else:
            self.layers = tuple(
                _stacked_layers(config, keys[start:stop], shape) for start, stop, shape in config.segments
            )
        self.n_layers = config.n_layers
        self.scan_layers = config.scan_layers
        self.remat = config.remat
        # kept only when the layers differ: the segments are read from it
        self.layer_config = config if config.layer_shapes is not None else None

    @property
    def layer_shapes(self) -> tuple[BlockShape, ...] | None:
        return None if self.layer_config is None else self.layer_config.layer_shapes

    @property
    def segments(self) -> tuple[DecoderLayer, ...]:
        """The stacked layers of every segment (`(layers,)` for a uniform stack)."""
        return self.layers if isinstance(self.layers, tuple) else (self.layers,)

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """`(start, stop)` of every segment's layers."""
        if self.layer_config is None:
            return ((0, self.n_layers),)
        return tuple((start, stop) for start, stop, _ in self.layer_config.segments)

    def with_segments(self, segments: tuple | list) -> "LayerStack":
        """The stack with its segments' stacked layers replaced (same structure)."""
        layers = tuple(segments) if isinstance(self.layers, tuple) else segments[0]
        return eqx.tree_at(lambda s: s.layers, self, layers)

    def _split(self, per_layer):
        """Arrays stacked over all layers (or `None`), one slice per segment."""
        if per_layer is None or not isinstance(self.layers, tuple):
            return [per_layer] * len(self.segments)
        return [jax.tree.map(lambda p, a=a, b=b: p[a:b], per_layer) for a, b in self.bounds]

    def _layer_fn(self, segment: DecoderLayer, inject_at: InjectAt):
        static = eqx.filter(segment, eqx.is_array, inverse=True)

        def run(layer_params, layer_in, inject, segment_ids):
            layer = eqx.combine(gather_fsdp(layer_params), static)
            return layer(layer_in, inject=inject, inject_at=inject_at, segment_ids=segment_ids)

        if self.remat != "none":
            run = jax.checkpoint(run, policy=_REMAT_POLICIES[self.remat])
        return run

    def __call__(
        self,
        x: Hidden,
        *,
        inject: LayerHidden | None = None,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
    ) -> tuple[Hidden, LayerStates]:
        check_inject_at(inject_at)
        if inject is not None and inject.shape[0] != self.n_layers:
            raise ValueError(
                f"inject has {inject.shape[0]} layers but the stack has {self.n_layers}: "
                f"expected shape {(self.n_layers, *x.shape)}, got {tuple(inject.shape)}"
            )
        outputs = []
        for segment, (start, stop), segment_inject in zip(self.segments, self.bounds, self._split(inject)):
            x, steps = self._run_segment(segment, stop - start, x, segment_inject, inject_at, segment_ids)
            outputs.append(steps)
        return x, _states(_concat(outputs))

    def _run_segment(self, segment, length, x, inject, inject_at, segment_ids):
        params = eqx.filter(segment, eqx.is_array)
        run = self._layer_fn(segment, inject_at)
        if self.scan_layers:

            def body(carry, xs):
                layer_params, layer_inject = xs
                step = run(layer_params, carry, layer_inject, segment_ids)
                return step.layer_out, step

            return jax.lax.scan(body, x, (params, inject), length=length)
        steps = []
        for index in range(length):
            layer_params = jax.tree.map(lambda p: p[index], params)
            layer_inject = None if inject is None else inject[index]
            step = run(layer_params, x, layer_inject, segment_ids)
            steps.append(step)
            x = step.layer_out
        return x, jax.tree.map(lambda *rows: jnp.stack(rows), *steps)

    def _over_layers(self, step, x, per_segment: list):
        """Run `step(layer, x, layer_xs) -> (x, layer_ys)` over the layers of every segment
        in turn, in a scan (or the unrolled loop), with `per_segment[i]` (arrays stacked on
        the segment's layers, or `None`) as the scanned inputs of segment `i`; returns the
        last `x` and every segment's per-layer outputs."""
        outputs = []
        for segment, (start, stop), segment_xs in zip(self.segments, self.bounds, per_segment):
            params = eqx.filter(segment, eqx.is_array)
            static = eqx.filter(segment, eqx.is_array, inverse=True)

            def body(carry, xs, static=static):
                layer_params, layer_xs = xs
                layer = eqx.combine(gather_fsdp(layer_params), static)
                return step(layer, carry, layer_xs)

            if self.scan_layers:
                x, ys = jax.lax.scan(body, x, (params, segment_xs), length=stop - start)
            else:
                rows = []
                for index in range(stop - start):
                    x, layer_ys = body(x, jax.tree.map(lambda p: p[index], (params, segment_xs)))
                    rows.append(layer_ys)
                ys = jax.tree.map(lambda *r: jnp.stack(r), *rows)
            outputs.append(ys)
        return x, outputs

    def _cache(self, per_segment: list) -> StackCache:
        return tuple(per_segment) if isinstance(self.layers, tuple) else per_segment[0]

    def prefill(self, x: Hidden) -> tuple[Hidden, StackCache]:
        """The stack on a prompt (one document from position 0): the output, as
        `stack(x)[0]`, and every layer's keys and values of the prompt (a `KVCache`
        of `[layers, seq, n_kv_heads, head_dim]`), which come back as the scan's outputs.
        A heterogeneous stack's cache is a tuple with one `KVCache` per segment, at the
        segment's own KV heads (`None` for a segment without attention).

        **Example:**

        ```python
        stack = bd.LayerStack(cfg, key=jax.random.key(0))
        x_out, cache = stack.prefill(jnp.ones((16, cfg.dim)))
        cache.k.shape  # (cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
        ```
        """

        def step(layer, layer_in, _):
            return layer.prefill(layer_in)

        x_out, caches = self._over_layers(step, x, [None] * len(self.segments))
        return x_out, self._cache(caches)

    def decode(
        self, x: Float[Array, "1 dim"], cache: StackCache, position: Int[Array, ""]
    ) -> tuple[Float[Array, "1 dim"], StackCache]:
        """The stack at one new `position`: each layer attends to its own keys and values
        of the earlier positions in `cache` (`[layers, max_len, n_kv_heads, head_dim]`,
        or one per segment as `prefill` gives them, which travels through the scan as
        scanned inputs, one layer's slice per step). Returns the output and `cache` with
        every layer's keys and values of `position` written in (the layers' new rows come
        back as the scan's outputs).
        """

        def step(layer, layer_in, layer_cache):
            return layer.decode(layer_in, layer_cache, position)

        caches = list(cache) if isinstance(self.layers, tuple) else [cache]
        x_out, new_rows = self._over_layers(step, x, caches)
        at = (0, position, 0, 0)
        written = [
            None if old is None else KVCache(
                k=jax.lax.dynamic_update_slice(old.k, new.k.astype(old.k.dtype), at),
                v=jax.lax.dynamic_update_slice(old.v, new.v.astype(old.v.dtype), at),
            )
            for old, new in zip(caches, new_rows)
        ]
        return x_out, self._cache(written)

    def blockwise_outputs(
        self,
        inject: LayerHidden,
        *,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
    ) -> LayerHidden:
        """Every block's output on its own injected input, all layers at once.

        Injected blocks do not depend on each other: at `"attention"` level the output of
        layer `l`'s attention depends only on `inject[l]`, and at `"layer"` level layer
        `l`'s output depends only on `inject[l]`. So instead of a scan this runs one
        `jax.vmap` over the stacked layers (the layer-parallel mode; one per segment of a
        heterogeneous stack), returning `attn_out` (`"attention"`) or `layer_out`
        (`"layer"`) for every layer. The values equal those of `stack(x, inject=inject,
        inject_at=inject_at)`; the batched matmuls are often faster than a sequential
        scan, and the `layers` axis can be sharded.

        **Example:**

        ```python
        teacher_states = teacher(tokens).states   # a teacher of the stack's depth and width
        out = stack.blockwise_outputs(teacher_states.layer_in, inject_at="layer")
        out.shape  # (cfg.n_layers, seq, cfg.dim)
        ```
        """
        check_inject_at(inject_at)
        if inject.shape[0] != self.n_layers:
            raise ValueError(
                f"inject has {inject.shape[0]} layers but the stack has {self.n_layers}: "
                f"expected shape {(self.n_layers, *inject.shape[1:])}, got {tuple(inject.shape)}"
            )
        outputs = []
        for segment, segment_inject in zip(self.segments, self._split(inject)):
            params = eqx.filter(segment, eqx.is_array)
            static = eqx.filter(segment, eqx.is_array, inverse=True)

            def block(layer_params, layer_inject, static=static):
                layer = eqx.combine(layer_params, static)
                if inject_at == "attention":
                    return layer.attend(layer_inject, segment_ids=segment_ids)
                step = layer(layer_inject, inject=layer_inject, inject_at="layer", segment_ids=segment_ids)
                return step.layer_out

            if self.remat != "none":
                block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.remat])
            outputs.append(jax.vmap(block)(params, segment_inject))
        return _concat(outputs)
