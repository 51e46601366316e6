"""Heterogeneous layers: each layer's own weights by their Hugging Face names, out of a
model's (compact) segments and placed back into stacked layers; the padded form of a
heterogeneous model (every layer at the widest shape, with the masks that run it as its
own) and back; names for layer shapes. What each shape costs is in
[`costs`][blockdistill.nn.costs]."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array
from .config import BlockShape, TransformerConfig
from .layer import BlockMasks, DecoderLayer, block_masks
from .model import Transformer
from .stack import LayerStack


def own_weights(model: Transformer, layer: int) -> dict[str, Array]:
    """Layer `layer`'s own weights, by their Hugging Face names
    (`"self_attn.q_proj.weight"`, `"mlp.gate_proj.weight"`, ...; a linear layer has
    `"input_layernorm.weight"` and its map `"self_attn.linear_attn.weight"`, as the DeciLM
    format names a `replace_with_linear` attention); parts the layer does not have are absent. These are the layer's
    arrays as stored (a heterogeneous model stores every layer at its own shape).

    **Example:**

    ```python
    weights = bd.own_weights(model, 0)
    weights["mlp.gate_proj.weight"].shape  # (cfg.mlp_dim, cfg.dim)
    ```
    """
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"layer={layer} is out of range for a model of n_layers={model.config.n_layers}")
    return stack_weights(model.layers, layer)


def stack_weights(stack: LayerStack, layer: int) -> dict[str, Array]:
    """[`own_weights`][blockdistill.own_weights] of layer `layer` of a `LayerStack`."""
    for segment, (start, stop) in zip(stack.segments, stack.bounds):
        if start <= layer < stop:
            return layer_weights(segment, segment.block_shape, layer - start)
    raise ValueError(f"layer={layer} is out of range for a stack of n_layers={stack.n_layers}")


def layer_weights(stacked: DecoderLayer, shape: BlockShape, layer: int) -> dict[str, Array]:
    """The weights of a layer of `shape` at index `layer` of `stacked` layers, by their
    Hugging Face names: each in the top-left corner of its stored array (all of it when
    the layers are stored at `shape`; a padded layer's own part otherwise)."""
    out: dict[str, Array] = {}
    if shape.has_attention:
        attn = stacked.self_attn
        kv_width = shape.n_kv_heads * attn.head_dim
        out["input_layernorm.weight"] = stacked.input_layernorm.weight[layer]
        out["self_attn.q_proj.weight"] = attn.q_proj.weight[layer]
        out["self_attn.k_proj.weight"] = attn.k_proj.weight[layer, :kv_width]
        out["self_attn.v_proj.weight"] = attn.v_proj.weight[layer, :kv_width]
        out["self_attn.o_proj.weight"] = attn.o_proj.weight[layer]
        if attn.q_proj.bias is not None:
            out["self_attn.q_proj.bias"] = attn.q_proj.bias[layer]
            out["self_attn.k_proj.bias"] = attn.k_proj.bias[layer, :kv_width]
            out["self_attn.v_proj.bias"] = attn.v_proj.bias[layer, :kv_width]
    if shape.has_mlp:
        mlp, width = stacked.mlp, shape.mlp_dim
        out["post_attention_layernorm.weight"] = stacked.post_attention_layernorm.weight[layer]
        out["mlp.gate_proj.weight"] = mlp.gate_proj.weight[layer, :width]
        out["mlp.up_proj.weight"] = mlp.up_proj.weight[layer, :width]
        out["mlp.down_proj.weight"] = mlp.down_proj.weight[layer, :, :width]
    if shape.linear:
        out["input_layernorm.weight"] = stacked.input_layernorm.weight[layer]
        out["self_attn.linear_attn.weight"] = stacked.linear.weight[layer]
    return out


def shape_name(shape: BlockShape) -> str:
    """A short name of a layer shape, e.g. `"kv2 mlp384"`, `"mlp768 only"`, `"linear"`."""
    if shape.linear:
        return "linear"
    if not shape.has_attention and not shape.has_mlp:
        return "identity"
    if not shape.has_attention:
        return f"mlp{shape.mlp_dim} only"
    if not shape.has_mlp:
        return f"kv{shape.n_kv_heads} only"
    return f"kv{shape.n_kv_heads} mlp{shape.mlp_dim}"


def describe_shapes(config: TransformerConfig) -> str:
    """The layers' shapes, one entry per run of equal layers (a segment), e.g.
    `"0-2: kv2 mlp384 | 3: mlp768 only"`."""
    parts = [
        (f"{start}" if stop - start == 1 else f"{start}-{stop - 1}") + ": " + shape_name(shape)
        for start, stop, shape in config.segments
    ]
    return " | ".join(parts)


#: where each of `own_weights`' names lives in stacked layers
_PATHS = {
    "input_layernorm.weight": lambda l: l.input_layernorm.weight,
    "self_attn.q_proj.weight": lambda l: l.self_attn.q_proj.weight,
    "self_attn.k_proj.weight": lambda l: l.self_attn.k_proj.weight,
    "self_attn.v_proj.weight": lambda l: l.self_attn.v_proj.weight,
    "self_attn.o_proj.weight": lambda l: l.self_attn.o_proj.weight,
    "self_attn.q_proj.bias": lambda l: l.self_attn.q_proj.bias,
    "self_attn.k_proj.bias": lambda l: l.self_attn.k_proj.bias,
    "self_attn.v_proj.bias": lambda l: l.self_attn.v_proj.bias,
    "post_attention_layernorm.weight": lambda l: l.post_attention_layernorm.weight,
    "mlp.gate_proj.weight": lambda l: l.mlp.gate_proj.weight,
    "mlp.up_proj.weight": lambda l: l.mlp.up_proj.weight,
    "mlp.down_proj.weight": lambda l: l.mlp.down_proj.weight,
    "self_attn.linear_attn.weight": lambda l: l.linear.weight,
}


def place_weights(stacked: DecoderLayer, rows: list[dict[str, Array]]) -> DecoderLayer:
    """Stacked layers with layer `j`'s own weights set from `rows[j]` (as `own_weights`
    names them), each written into the top-left corner of its array (all of it, for
    layers stored at their own shape); every other entry of an array that some row sets
    becomes zero. `stacked` may be abstract (`jax.ShapeDtypeStruct` leaves, from
    `eqx.filter_eval_shape`): arrays no row sets stay as they are."""
    names = sorted({name for row in rows for name in row})
    for name in names:
        get = _PATHS[name]
        target = np.zeros(get(stacked).shape, np.float32)
        for index, row in enumerate(rows):
            if name in row:
                value = np.asarray(row[name], np.float32)
                target[(index, *(slice(0, n) for n in value.shape))] = value
        stacked = eqx.tree_at(get, stacked, jnp.asarray(target))
    return stacked


def place_stack(stack: LayerStack, rows: list[dict[str, Array]]) -> LayerStack:
    """A `LayerStack` with layer `j`'s own weights set from `rows[j]` (one entry per layer
    of the stack), segment by segment (see `place_weights`)."""
    return stack.with_segments([
        place_weights(segment, rows[start:stop]) for segment, (start, stop) in zip(stack.segments, stack.bounds)
    ])


def padded_skeleton(config: TransformerConfig) -> DecoderLayer:
    """The abstract (`jax.ShapeDtypeStruct`) padded stacked layers of `config`."""
    keys = jax.random.split(jax.random.key(0), config.n_layers)
    return eqx.filter_eval_shape(eqx.filter_vmap(lambda key: DecoderLayer(config, key=key)), keys)


def padded_layers(model: Transformer) -> tuple[DecoderLayer, BlockMasks | None]:
    """The padded form of a model's layers: every layer stored at the config's `mlp_dim`
    and `n_kv_heads` in one stacked [`blockdistill.DecoderLayer`][] (its own weights in
    the top-left corner of each array, zeros elsewhere; the input / post-attention norm
    of a layer without attention / MLP is ones), and the
    [`blockdistill.block_masks`][] that run each padded layer as its own shape. This is
    how heterogeneous models were stored before compact segments; it computes the same
    outputs at the widest layer's cost, and stays useful as a reference and for
    tools that want one stack. A uniform model's layers are returned as they are (masks
    `None`).

    **Example:**

    ```python
    padded, masks = bd.padded_layers(student)
    padded.mlp.up_proj.weight.shape  # (n_layers, cfg.mlp_dim, cfg.dim)
    ```
    """
    config = model.config
    if config.layer_shapes is None:
        return model.layers.layers, None
    rows = [own_weights(model, layer) for layer in range(config.n_layers)]
    dim = config.dim
    for row, shape in zip(rows, config.layer_shapes):
        if not shape.has_attention and not shape.linear:
            row["input_layernorm.weight"] = jnp.ones(dim)
        if not shape.has_mlp:
            row["post_attention_layernorm.weight"] = jnp.ones(dim)
    layers = place_weights(padded_skeleton(config), rows)
    layers = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, layers)
    return layers, block_masks(config)


def compact_layers(padded: DecoderLayer, config: TransformerConfig) -> DecoderLayer | tuple[DecoderLayer, ...]:
    """The inverse of [`padded_layers`][blockdistill.padded_layers]: stacked layers of
    `config`'s depth stored padded (each layer's own weights in the top-left corner of
    arrays at least as wide) as a `LayerStack` of `config` holds them (`.layers`): for a
    heterogeneous config, one stack per segment at the segment's own shape, the parts a
    layer lacks dropped. Works on gradients of padded layers too (their own corners).

    **Example:**

    ```python
    padded, masks = bd.padded_layers(student)
    segments = bd.compact_layers(padded, student.config)
    ```
    """
    skeleton = eqx.filter_eval_shape(LayerStack, config, key=jax.random.key(0))
    out = []
    for segment, (start, stop) in zip(skeleton.segments, skeleton.bounds):
        getters = [get for get in _PATHS.values() if _has(segment, get)]
        values = [_corner(get(padded)[start:stop], get(segment).shape) for get in getters]
        out.append(eqx.tree_at(lambda l: [get(l) for get in getters], segment, values))
    return skeleton.with_segments(out).layers


def _has(layers: DecoderLayer, get) -> bool:
    try:
        return get(layers) is not None
    except AttributeError:
        return False


def _corner(array: Array, shape: tuple[int, ...]) -> Array:
    return array[tuple(slice(0, n) for n in shape)]
