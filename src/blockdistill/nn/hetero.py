"""Heterogeneous layers: each layer's own weights out of its padded storage, by their Hugging
Face names, and placed back into it; names for layer shapes. What each shape costs is in
[`costs`][blockdistill.nn.costs]."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._types import Array
from .config import BlockShape, TransformerConfig
from .layer import DecoderLayer
from .model import Transformer


def own_weights(model: Transformer, layer: int) -> dict[str, Array]:
    """Layer `layer`'s own weights out of the padded stack, by their Hugging Face names
    (`"self_attn.q_proj.weight"`, `"mlp.gate_proj.weight"`, ...; a linear layer's map is
    `"linear.weight"`); parts the layer does not have are absent. For a uniform model
    these are the layer's arrays as stored.

    **Example:**

    ```python
    weights = bd.own_weights(model, 0)
    weights["mlp.gate_proj.weight"].shape  # (cfg.mlp_dim, cfg.dim)
    ```
    """
    return layer_weights(model.layers.layers, model.config, layer)


def layer_weights(stacked: DecoderLayer, config: TransformerConfig, layer: int) -> dict[str, Array]:
    """[`own_weights`][blockdistill.own_weights] of stacked layers built for `config`."""
    if not 0 <= layer < config.n_layers:
        raise ValueError(f"layer={layer} is out of range for a model of n_layers={config.n_layers}")
    shape = config.block_shapes[layer]
    out: dict[str, Array] = {}
    if shape.has_attention:
        attn, head_dim = stacked.self_attn, config.head_dim
        kv_width = shape.n_kv_heads * head_dim
        out["input_layernorm.weight"] = stacked.input_layernorm.weight[layer]
        out["self_attn.q_proj.weight"] = attn.q_proj.weight[layer]
        out["self_attn.k_proj.weight"] = attn.k_proj.weight[layer, :kv_width]
        out["self_attn.v_proj.weight"] = attn.v_proj.weight[layer, :kv_width]
        out["self_attn.o_proj.weight"] = attn.o_proj.weight[layer]
        if config.qkv_bias:
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
        out["linear.weight"] = stacked.linear.weight[layer]
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
    """The layers' shapes, one entry per run of equal layers, e.g.
    `"0-2: kv2 mlp384 | 3: mlp768 only"`."""
    runs: list[list[int]] = []
    shapes = config.block_shapes
    for index, shape in enumerate(shapes):
        if runs and shapes[runs[-1][0]] == shape:
            runs[-1].append(index)
        else:
            runs.append([index])
    parts = [
        (f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}") + ": " + shape_name(shapes[run[0]])
        for run in runs
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
    "linear.weight": lambda l: l.linear.weight,
}


def place_weights(stacked: DecoderLayer, rows: list[dict[str, Array]]) -> DecoderLayer:
    """Stacked layers with layer `j`'s own weights set from `rows[j]` (as `own_weights`
    names them), each written into the top-left corner of its padded array; every other
    entry of an array that some row sets becomes zero."""
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
