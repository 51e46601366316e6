"""SwiGLU MLP and the pre-norm decoder layer with its `inject` entry points."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int, PRNGKeyArray

from .._types import Array, Hidden, Segments
from .attention import Attention, KVCache, RMSNorm, apply_linear, init_linear
from .config import BlockShape, TransformerConfig

InjectAt = Literal["attention", "layer"]
INJECT_LEVELS = ("attention", "layer")


def check_inject_at(inject_at: str) -> None:
    """Raise a `ValueError` naming `inject_at` unless it is a known injection level."""
    if inject_at not in INJECT_LEVELS:
        raise ValueError(f"inject_at={inject_at!r} is invalid: must be one of {INJECT_LEVELS}")


class BlockMasks(eqx.Module):
    """Which parts of a padded decoder layer are the layer's own, for the padded form of a
    heterogeneous student (`TransformerConfig.layer_shapes`; see
    [`blockdistill.padded_layers`][]: a model itself stores every layer at its own shape
    and needs no masks).

    Built from the static config by [`blockdistill.block_masks`][] (they are constants,
    not parameters), stacked on a leading `layers` axis, and handed to each padded layer
    with its parameters.

    - `mlp_channels`: the MLP hidden channels the layer has (its first `mlp_dim`).
    - `kv_slot`: for every query head, the stored KV head it reads (the layer's own KV
      heads are the first `n_kv_heads` stored ones; query heads are grouped evenly).
    - `attention`: whether the layer has attention (its output is zero otherwise).
    - `linear`: whether the layer is the linear map `x + rmsnorm(x) W^T`.
    - `any_attention`, `any_mlp` (static): whether any layer of the stack has attention /
      an MLP; when none has, the part is not computed at all.
    """

    mlp_channels: Bool[Array, "*layers mlp"]
    kv_slot: Int[Array, "*layers heads"]
    attention: Bool[Array, "*layers"]
    linear: Bool[Array, "*layers"]
    any_attention: bool = eqx.field(static=True, default=True)
    any_mlp: bool = eqx.field(static=True, default=True)


def block_masks(config: TransformerConfig) -> BlockMasks | None:
    """The stacked `BlockMasks` that run the padded form of a heterogeneous config (every
    layer stored at the widest shape, see [`blockdistill.padded_layers`][]) as each
    layer's own shape; `None` for a uniform config (no masking at all).

    **Example:**

    ```python
    hetero = cfg.replace(layer_shapes=(bd.BlockShape(64, 1), bd.BlockShape(128, 0)))
    masks = bd.block_masks(hetero)
    masks.mlp_channels.shape, masks.kv_slot[0]  # (2, 128), all query heads read KV head 0
    ```
    """
    if config.layer_shapes is None:
        return None
    channels = np.arange(config.mlp_dim)[None, :] < np.array([s.mlp_dim for s in config.layer_shapes])[:, None]
    heads = np.arange(config.n_heads)
    kv_slot = np.stack([
        heads // (config.n_heads // s.n_kv_heads) if s.n_kv_heads else np.zeros_like(heads)
        for s in config.layer_shapes
    ]).astype(np.int32)
    return BlockMasks(
        mlp_channels=jnp.asarray(channels),
        kv_slot=jnp.asarray(kv_slot),
        attention=jnp.asarray([s.n_kv_heads > 0 for s in config.layer_shapes]),
        linear=jnp.asarray([s.linear for s in config.layer_shapes]),
        any_attention=any(s.has_attention for s in config.layer_shapes),
        any_mlp=any(s.has_mlp for s in config.layer_shapes),
    )


class MLP(eqx.Module):
    """SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

    **Example:**

    ```python
    mlp = bd.MLP(cfg, key=jax.random.key(0))
    y = mlp(jnp.ones((16, cfg.dim)))
    ```
    """

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        self.gate_proj = init_linear(config.dim, config.mlp_dim, use_bias=False, key=kg)
        self.up_proj = init_linear(config.dim, config.mlp_dim, use_bias=False, key=ku)
        self.down_proj = init_linear(config.mlp_dim, config.dim, use_bias=False, key=kd)

    def __call__(self, x: Hidden, *, channels: Bool[Array, " mlp"] | None = None) -> Hidden:
        """`channels`, when given, keeps only those hidden channels (a padded layer of a
        heterogeneous student): the others contribute nothing and get no gradient."""
        hidden = jax.nn.silu(apply_linear(self.gate_proj, x)) * apply_linear(self.up_proj, x)
        if channels is not None:
            hidden = jnp.where(channels[None, :], hidden, jnp.zeros_like(hidden))
        return apply_linear(self.down_proj, hidden)


class LayerStep(eqx.Module):
    """What one decoder layer records about itself (one row of `LayerStates`)."""

    attn_in: Hidden
    attn_out: Hidden
    layer_in: Hidden
    layer_out: Hidden


class DecoderLayer(eqx.Module):
    """A pre-norm Llama decoder layer: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.

    `inject` replaces either the normed attention input (`inject_at="attention"`: q, k
    and v read the injected array while the residual stream stays the layer's own) or the
    layer's whole input (`inject_at="layer"`).

    `segment_ids` marks the documents of a packed row (see [`blockdistill.Attention`][]).

    Built with `shape` (a [`blockdistill.BlockShape`][]), the layer has exactly that
    shape's parts, at its own width: a layer without attention has no `self_attn`
    (`None`) and, unless it is a linear layer, no `input_layernorm`; one without an MLP no
    `post_attention_layernorm` and no `mlp`; and `linear` is there only for a linear
    layer: the `dim x dim` map of the normed input, `x + input_layernorm(x) W^T`
    (initialised at zero, so the layer starts as the identity), which is the DeciLM /
    Puzzle format's `replace_with_linear` attention. This is how a heterogeneous model stores each of its layers.
    Without `shape`, the layer has the config's full shape (and, when the config has linear
    layers, a `linear` map too): the uniform layer, or the padded storage of a
    heterogeneous config's widest layer, which `masks` (one layer's `BlockMasks`) runs as
    a narrower layer's shape (see [`blockdistill.padded_layers`][]).

    A layer without attention records the normed input (its `input_layernorm`, for a
    linear layer; the unit-scale RMS norm otherwise) as `attn_in` and zero as `attn_out`.

    **Call:** `layer(layer_in, *, inject=None, inject_at="attention", segment_ids=None,
    masks=None) -> LayerStep`.

    **Example:**

    ```python
    layer = bd.DecoderLayer(cfg, key=jax.random.key(0))
    step = layer(jnp.ones((16, cfg.dim)))
    step.attn_out.shape  # (16, cfg.dim)
    ```
    """

    input_layernorm: RMSNorm | None
    self_attn: Attention | None
    post_attention_layernorm: RMSNorm | None
    mlp: MLP | None
    linear: eqx.nn.Linear | None
    norm_eps: float = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray, shape: BlockShape | None = None):
        ka, km = jax.random.split(key)
        full = config.replace(layer_shapes=None)
        has_attention = shape is None or shape.has_attention
        has_mlp = shape is None or shape.has_mlp
        has_linear = config.has_linear_layers if shape is None else shape.linear
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = self.linear = None
        if has_attention or has_linear:  # the linear map reads the normed input too
            self.input_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        if has_attention:
            own = full if shape is None else full.replace(n_kv_heads=shape.n_kv_heads)
            self.self_attn = Attention(own, key=ka)
        if has_mlp:
            own = full if shape is None else full.replace(mlp_dim=shape.mlp_dim)
            self.post_attention_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
            self.mlp = MLP(own, key=km)
        if has_linear:  # zero: the linear layers start as the identity
            linear = eqx.nn.Linear(config.dim, config.dim, use_bias=False, key=km)
            self.linear = eqx.tree_at(lambda m: m.weight, linear, jnp.zeros((config.dim, config.dim)))
        self.norm_eps = config.norm_eps

    @property
    def block_shape(self) -> BlockShape:
        """The shape the layer is stored at (for a padded layer: the padded storage's)."""
        return BlockShape(
            mlp_dim=0 if self.mlp is None else self.mlp.down_proj.in_features,
            n_kv_heads=0 if self.self_attn is None else self.self_attn.n_kv_heads,
            linear=self.linear is not None and self.self_attn is None and self.mlp is None,
        )

    def _normed(self, layer_in: Hidden) -> Hidden:
        """What the attention (or a linear layer's map) reads: the input norm of
        `layer_in` (its unit-scale RMS norm for a layer without either)."""
        if self.input_layernorm is not None:
            return self.input_layernorm(layer_in)
        x32 = layer_in.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.norm_eps)
        return normed.astype(layer_in.dtype)

    def attend(
        self, x: Hidden, *, inject: Hidden | None = None, segment_ids: Segments | None = None,
        masks: BlockMasks | None = None,
    ) -> Hidden:
        """The layer's attention output on `x` (its normed input; q, k and v read `inject`
        when given): zero for a layer without attention."""
        if self.self_attn is None:
            return jnp.zeros_like(x)
        if masks is None:
            return self.self_attn(x, inject=inject, segment_ids=segment_ids)
        if not masks.any_attention:  # no layer of the stack has attention: nothing to compute
            return jnp.zeros_like(x)
        out = self.self_attn(x, inject=inject, segment_ids=segment_ids, kv_slot=masks.kv_slot)
        return jnp.where(masks.attention, out, jnp.zeros_like(out))

    def _rest(self, layer_in: Hidden, attn_out: Hidden, masks: BlockMasks | None) -> Hidden:
        """The layer's output given its input and its attention output: the residual
        add, the MLP and (for a linear layer) the linear map of the normed input."""
        hidden = layer_in + attn_out if self.self_attn is not None else layer_in
        if self.mlp is None or self.post_attention_layernorm is None or (masks is not None and not masks.any_mlp):
            layer_out = hidden  # no MLP (in no layer of a padded stack)
        else:
            channels = None if masks is None else masks.mlp_channels
            layer_out = hidden + self.mlp(self.post_attention_layernorm(hidden), channels=channels)
        if self.linear is not None:
            mapped = apply_linear(self.linear, self._normed(layer_in))
            if masks is not None:
                mapped = jnp.where(masks.linear, mapped, jnp.zeros_like(mapped))
            layer_out = layer_out + mapped
        return layer_out

    def prefill(self, layer_in: Hidden, *, masks: BlockMasks | None = None) -> tuple[Hidden, KVCache | None]:
        """The layer on a prompt (one document from position 0): its output, as
        `layer(layer_in, masks=masks).layer_out`, and the prompt's keys and values
        (`[seq, n_kv_heads, head_dim]`; zero for a padded layer without attention, `None`
        for a layer that has none)."""
        if self.self_attn is None:
            return self._rest(layer_in, jnp.zeros_like(layer_in), masks), None
        normed = self._normed(layer_in)
        if masks is not None and not masks.any_attention:
            attn_out = jnp.zeros_like(normed)
            kv = self._no_kv(layer_in.shape[0], normed.dtype)
        else:
            attn_out, kv = self.self_attn.prefill(normed, kv_slot=None if masks is None else masks.kv_slot)
            if masks is not None:
                attn_out = jnp.where(masks.attention, attn_out, jnp.zeros_like(attn_out))
        return self._rest(layer_in, attn_out, masks), kv

    def decode(
        self,
        layer_in: Float[Array, "1 dim"],
        cache: KVCache | None,
        position: Int[Array, ""],
        *,
        masks: BlockMasks | None = None,
    ) -> tuple[Float[Array, "1 dim"], KVCache | None]:
        """The layer at one new `position`, attending to the earlier positions' keys and
        values in `cache` (this layer's, `[max_len, n_kv_heads, head_dim]`): its output
        and the new position's keys and values (length 1), for the caller to store (see
        [`blockdistill.Attention`][]'s `decode`); a layer without attention has no cache
        (`None`)."""
        if self.self_attn is None or cache is None:
            return self._rest(layer_in, jnp.zeros_like(layer_in), masks), None
        normed = self._normed(layer_in)
        if masks is not None and not masks.any_attention:
            attn_out = jnp.zeros_like(normed)
            kv = self._no_kv(1, normed.dtype)
        else:
            kv_slot = None if masks is None else masks.kv_slot
            attn_out, kv = self.self_attn.decode(normed, cache, position, kv_slot=kv_slot)
            if masks is not None:
                attn_out = jnp.where(masks.attention, attn_out, jnp.zeros_like(attn_out))
        return self._rest(layer_in, attn_out, masks), kv

    def _no_kv(self, length: int, dtype) -> KVCache:
        attn = self.self_attn
        zeros = jnp.zeros((length, attn.n_kv_heads, attn.head_dim), dtype)
        return KVCache(k=zeros, v=zeros)

    def __call__(
        self,
        layer_in: Hidden,
        *,
        inject: Hidden | None = None,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
        masks: BlockMasks | None = None,
    ) -> LayerStep:
        if inject is not None and inject_at == "layer":
            layer_in = inject.astype(layer_in.dtype)
            inject = None
        normed = self._normed(layer_in)
        attn_in = normed if inject is None else inject.astype(layer_in.dtype)
        attn_out = self.attend(normed, inject=inject, segment_ids=segment_ids, masks=masks)
        layer_out = self._rest(layer_in, attn_out, masks)
        return LayerStep(attn_in=attn_in, attn_out=attn_out, layer_in=layer_in, layer_out=layer_out)


def mask_padding(layers: DecoderLayer, masks: BlockMasks) -> DecoderLayer:
    """Stacked layers with every padded weight set to zero (the channels, KV heads,
    attention and linear maps that `masks` says a layer does not have), so that a padded
    layer's parameter arrays hold exactly its own weights and zeros."""
    channels = masks.mlp_channels
    attention = masks.attention[:, None]
    n_kv, head_dim = layers.self_attn.n_kv_heads, layers.self_attn.head_dim
    slots = jnp.arange(n_kv)
    used = jnp.any(masks.kv_slot[:, :, None] == slots[None, None, :], axis=1) & attention  # [layers, kv]
    kv_rows = jnp.repeat(used, head_dim, axis=1)
    attn = layers.self_attn
    rows = lambda w, keep: w * keep[:, :, None].astype(w.dtype)  # noqa: E731
    where = [
        (lambda l: l.mlp.gate_proj.weight, rows(layers.mlp.gate_proj.weight, channels)),
        (lambda l: l.mlp.up_proj.weight, rows(layers.mlp.up_proj.weight, channels)),
        (lambda l: l.mlp.down_proj.weight, layers.mlp.down_proj.weight * channels[:, None, :].astype(jnp.float32)),
        (lambda l: l.self_attn.q_proj.weight, rows(attn.q_proj.weight, jnp.broadcast_to(attention, attn.q_proj.weight.shape[:2]))),
        (lambda l: l.self_attn.k_proj.weight, rows(attn.k_proj.weight, kv_rows)),
        (lambda l: l.self_attn.v_proj.weight, rows(attn.v_proj.weight, kv_rows)),
        (lambda l: l.self_attn.o_proj.weight, rows(attn.o_proj.weight, jnp.broadcast_to(attention, attn.o_proj.weight.shape[:2]))),
    ]
    if attn.q_proj.bias is not None:
        where += [
            (lambda l: l.self_attn.q_proj.bias, attn.q_proj.bias * attention.astype(jnp.float32)),
            (lambda l: l.self_attn.k_proj.bias, attn.k_proj.bias * kv_rows.astype(jnp.float32)),
            (lambda l: l.self_attn.v_proj.bias, attn.v_proj.bias * kv_rows.astype(jnp.float32)),
        ]
    if layers.linear is not None:
        where.append((lambda l: l.linear.weight, layers.linear.weight * masks.linear[:, None, None].astype(jnp.float32)))
    for get, value in where:
        layers = eqx.tree_at(get, layers, value)
    return layers
