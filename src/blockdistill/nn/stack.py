"""LayerStack: decoder layers stored stacked on a leading `layers` axis.

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
from .layer import (
    BlockMasks,
    DecoderLayer,
    InjectAt,
    LayerStep,
    block_masks,
    check_inject_at,
    mask_padding,
)

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


@eqx.filter_jit
def _stacked_layers(config: TransformerConfig, keys: Key[Array, " layers"]) -> DecoderLayer:
    """`n_layers` decoder layers built with `eqx.filter_vmap` over keys, compiled once per
    config (initialising eagerly costs seconds of small ops); a heterogeneous config's
    padded weights are zero."""
    layers = eqx.filter_vmap(lambda key: DecoderLayer(config, key=key))(keys)
    masks = block_masks(config)
    return layers if masks is None else mask_padding(layers, masks)


class LayerStack(eqx.Module):
    """`n_layers` decoder layers whose parameters are stacked on a leading axis.

    The stack is built with `eqx.filter_vmap` over split keys, so every array leaf of
    `layers` has shape `(n_layers, ...)`. `scan_layers=True` runs the stack with
    `jax.lax.scan` (compile time independent of depth); `False` runs a Python loop over
    slices of the same parameters (same outputs, longer compiles, sometimes faster
    steps). `remat` wraps each layer in `jax.checkpoint`.

    A heterogeneous config (`layer_shapes`) keeps one stack: every layer is stored at the
    widest shape and runs as its own through constant [`block_masks`][blockdistill.block_masks]
    that travel with its parameters in the scan.

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

    layers: DecoderLayer
    n_layers: int = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    layer_config: TransformerConfig | None = eqx.field(static=True, default=None)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        self.layers = _stacked_layers(config, jax.random.split(key, config.n_layers))
        self.n_layers = config.n_layers
        self.scan_layers = config.scan_layers
        self.remat = config.remat
        # kept only when the layers differ: the masks are built from it
        self.layer_config = config if config.layer_shapes is not None else None

    @property
    def layer_shapes(self) -> tuple[BlockShape, ...] | None:
        return None if self.layer_config is None else self.layer_config.layer_shapes

    def masks(self) -> BlockMasks | None:
        """The stacked `BlockMasks` of a heterogeneous
        stack (constants of its config), `None` for a uniform one."""
        return None if self.layer_config is None else block_masks(self.layer_config)

    def _layer_fn(self, inject_at: InjectAt):
        static = eqx.filter(self.layers, eqx.is_array, inverse=True)

        def run(layer_params, layer_in, inject, segment_ids, masks):
            layer = eqx.combine(gather_fsdp(layer_params), static)
            return layer(layer_in, inject=inject, inject_at=inject_at, segment_ids=segment_ids, masks=masks)

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
        params = eqx.filter(self.layers, eqx.is_array)
        masks = self.masks()
        run = self._layer_fn(inject_at)
        if self.scan_layers:

            def body(carry, xs):
                layer_params, layer_inject, layer_masks = xs
                step = run(layer_params, carry, layer_inject, segment_ids, layer_masks)
                return step.layer_out, step

            x_out, steps = jax.lax.scan(body, x, (params, inject, masks))
            return x_out, _states(steps)
        steps = []
        for index in range(self.n_layers):
            layer_params, layer_masks = jax.tree.map(lambda p: p[index], (params, masks))
            layer_inject = None if inject is None else inject[index]
            step = run(layer_params, x, layer_inject, segment_ids, layer_masks)
            steps.append(step)
            x = step.layer_out
        stacked = jax.tree.map(lambda *rows: jnp.stack(rows), *steps)
        return x, _states(stacked)

    def _over_layers(self, step, x, per_layer):
        """Run `step(layer, x, layer_xs, masks) -> (x, layer_ys)` over the layers, in a
        scan (or the unrolled loop), with `per_layer` (arrays stacked on `layers`) as
        scanned inputs; returns the last `x` and the per-layer outputs stacked."""
        params = eqx.filter(self.layers, eqx.is_array)
        static = eqx.filter(self.layers, eqx.is_array, inverse=True)

        def body(carry, xs):
            layer_params, layer_xs, layer_masks = xs
            layer = eqx.combine(gather_fsdp(layer_params), static)
            return step(layer, carry, layer_xs, layer_masks)

        masks = self.masks()
        if self.scan_layers:
            return jax.lax.scan(body, x, (params, per_layer, masks))
        outputs = []
        for index in range(self.n_layers):
            x, layer_ys = body(x, jax.tree.map(lambda p: p[index], (params, per_layer, masks)))
            outputs.append(layer_ys)
        return x, jax.tree.map(lambda *rows: jnp.stack(rows), *outputs)

    def prefill(self, x: Hidden) -> tuple[Hidden, KVCache]:
        """The stack on a prompt (one document from position 0): the output, as
        `stack(x)[0]`, and every layer's keys and values of the prompt (a `KVCache`
        of `[layers, seq, n_kv_heads, head_dim]`), which come back as the scan's outputs.

        **Example:**

        ```python
        stack = bd.LayerStack(cfg, key=jax.random.key(0))
        x_out, cache = stack.prefill(jnp.ones((16, cfg.dim)))
        cache.k.shape  # (cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim)
        ```
        """

        def step(layer, layer_in, _, masks):
            return layer.prefill(layer_in, masks=masks)

        return self._over_layers(step, x, None)

    def decode(
        self, x: Float[Array, "1 dim"], cache: KVCache, position: Int[Array, ""]
    ) -> tuple[Float[Array, "1 dim"], KVCache]:
        """The stack at one new `position`: each layer attends to its own keys and values
        of the earlier positions in `cache` (`[layers, max_len, n_kv_heads, head_dim]`,
        which travels through the scan as scanned inputs, one layer's slice per step).
        Returns the output and `cache` with every layer's keys and values of `position`
        written in (the layers' new rows come back as the scan's outputs).
        """

        def step(layer, layer_in, layer_cache, masks):
            return layer.decode(layer_in, layer_cache, position, masks=masks)

        x_out, new = self._over_layers(step, x, cache)
        at = (0, position, 0, 0)
        return x_out, KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, new.k.astype(cache.k.dtype), at),
            v=jax.lax.dynamic_update_slice(cache.v, new.v.astype(cache.v.dtype), at),
        )

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
        `jax.vmap` over the stacked layers (the layer-parallel mode), returning `attn_out`
        (`"attention"`) or `layer_out` (`"layer"`) for every layer. The values equal those
        of `stack(x, inject=inject, inject_at=inject_at)`; the batched matmuls are often
        faster than a sequential scan, and the `layers` axis can be sharded.

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
        params = eqx.filter(self.layers, eqx.is_array)
        static = eqx.filter(self.layers, eqx.is_array, inverse=True)

        def block(layer_params, layer_inject, masks):
            layer = eqx.combine(layer_params, static)
            if inject_at == "attention":
                return layer.attend(layer_inject, segment_ids=segment_ids, masks=masks)
            step = layer(layer_inject, inject=layer_inject, inject_at="layer", segment_ids=segment_ids, masks=masks)
            return step.layer_out

        if self.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.remat])
        return jax.vmap(block)(params, inject, self.masks())
