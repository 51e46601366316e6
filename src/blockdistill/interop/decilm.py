"""NVIDIA Puzzle's DeciLM / Nemotron-NAS checkpoint format: a Llama whose layers each
have their own shape, as a heterogeneous [`blockdistill.Transformer`][] has.

`config.json` has `architectures: ["DeciLMForCausalLM"]`, `model_type: "nemotron-nas"`
and a `block_configs` list with one entry per layer, `{"attention": {...}, "ffn": {...}}`:

- `attention`: `no_op: true` (the layer has no attention and no `input_layernorm`), or
  `n_heads_in_group: g`: grouped-query attention with `num_attention_heads // g` KV heads
  (query head `h` reads KV head `h // g`). Newer ModelOpt configs give
  `num_key_value_heads` instead, which is read too.
- `ffn`: `no_op: true` (no MLP and no `post_attention_layernorm`), or a SwiGLU MLP whose
  width is either `ffn_mult`, turned into a width by the loaders' rounding
  ([`ffn_mult_to_intermediate_size`][blockdistill.interop.decilm.ffn_mult_to_intermediate_size]),
  or the exact `intermediate_size` (vLLM's loader reads it when there is no `ffn_mult`;
  NVIDIA ModelOpt's Puzzletron writes it).
- `replace_with_linear: true` (either section) is a `hidden_size x hidden_size` map of the
  section's *normed* input (`x + W rmsnorm(x)`, weights `self_attn.linear_attn.weight` with
  `input_layernorm.weight`, or `mlp.linear_mlp.weight` with
  `post_attention_layernorm.weight`). blockdistill's linear layer is that map as the whole
  layer: it is written as a linear attention with an FFN `no_op`, and read from either
  section when the other is a `no_op` (the two compute the same function). A linear
  section beside a real one (e.g. a linear attention and an MLP) has no blockdistill
  equivalent and is refused, naming the layer. vLLM's Nemotron-NAS loader builds an
  attention for every block that is not a `no_op` and does not implement
  `replace_with_linear`, so a student with linear layers loads in `transformers` (and
  NVIDIA's own modeling code) but not in vLLM.

Per-layer tensors keep the Llama names (`model.layers.{i}.self_attn.k_proj.weight`, ...),
each at the layer's own shape; a part a layer lacks has no tensors at all.

Learned from vLLM's `vllm/model_executor/models/nemotron_nas.py` (the loader, its
`_ffn_mult_to_intermediate_size`), NVIDIA ModelOpt's
`modelopt/torch/puzzletron/decilm/deci_lm_hf_code/` and mlx-lm's `nemotron_nas.py`.
"""

from typing import Any

from ..nn.config import BlockShape, TransformerConfig
from ..nn.hetero import shape_name

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
#: the loaders round an `ffn_mult` width up to a multiple of this
FFN_ROUNDING = 256
#: settings of a block that blockdistill has no equivalent for (refused when set)
_UNSUPPORTED = {
    "attention": ("sparsify", "window_length", "num_sink_tokens", "llama4", "mamba",
                  "unshifted_sink", "use_prefill_window_in_sink_attention"),
    "ffn": ("sparsify", "moe"),
}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width that the DeciLM loaders give an `ffn_mult`: `int(2 * ffn_mult *
    hidden_size / 3)` (truncated), rounded up to a multiple of 256 — the same expression,
    evaluated in the same order, as vLLM's `_ffn_mult_to_intermediate_size`.

    **Example:**

    ```python
    from blockdistill.interop.decilm import ffn_mult_to_intermediate_size
    ffn_mult_to_intermediate_size(5.25, 8192)  # 28672
    ffn_mult_to_intermediate_size(1.0, 8192)   # 5632 (5461, rounded up)
    ```
    """
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % FFN_ROUNDING == 0 else width + FFN_ROUNDING - width % FFN_ROUNDING


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """An `ffn_mult` (6 decimals, as mlx-lm rounds it) that every loader turns into exactly
    `width`, or `None` when there is none: exactly the positive multiples of 256.

    **Example:**

    ```python
    from blockdistill.interop.decilm import ffn_mult_for
    ffn_mult_for(768, 256), ffn_mult_for(384, 256)  # (4.5, None)
    ```
    """
    if width <= 0 or width % FFN_ROUNDING:
        return None
    mult = round(3 * width / (2 * hidden_size), 6)
    return mult if ffn_mult_to_intermediate_size(mult, hidden_size) == width else None


def block_configs_of(config: TransformerConfig, *, ffn_mult_only: bool = False) -> list[dict[str, Any]]:
    """The `block_configs` of a model of `config` (heterogeneous or uniform).

    An MLP width that is a multiple of 256 is written as `ffn_mult` (what every DeciLM
    loader reads); any other as the exact `intermediate_size`, or, with `ffn_mult_only`,
    refused. A linear layer is a linear attention (`replace_with_linear`) with an FFN
    `no_op`. Raises a `ValueError` naming the layer."""
    if config.qkv_bias:
        raise ValueError("the model has q/k/v biases (qkv_bias=True), which the DeciLM format does not hold")
    blocks = []
    for index, shape in enumerate(config.block_shapes):
        attention: dict[str, Any] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        if shape.linear:
            attention.update(no_op=False, replace_with_linear=True)
        elif shape.has_attention:
            attention.update(no_op=False, n_heads_in_group=config.n_heads // shape.n_kv_heads)
        ffn: dict[str, Any] = {"no_op": True, "replace_with_linear": False}
        if shape.has_mlp:
            mult = ffn_mult_for(shape.mlp_dim, config.dim)
            if mult is not None:
                ffn.update(no_op=False, ffn_mult=mult)
            elif ffn_mult_only:
                low = shape.mlp_dim // FFN_ROUNDING * FFN_ROUNDING
                nearest = [w for w in (low, low + FFN_ROUNDING) if w > 0]
                raise ValueError(
                    f"layer {index} ({shape_name(shape)}) has an MLP of width {shape.mlp_dim}, which no ffn_mult "
                    f"gives (the loaders round to multiples of {FFN_ROUNDING}; nearest: {nearest}); "
                    "write it as intermediate_size instead (ffn_mult_only=False)"
                )
            else:
                ffn.update(no_op=False, intermediate_size=shape.mlp_dim)
        blocks.append({"attention": attention, "ffn": ffn})
    return blocks


def _section_value(section: dict[str, Any], key: str) -> Any:
    value = section.get(key)
    return None if value in (None, False, [], {}) else value


def block_shapes_of(hf: dict[str, Any], source: Any) -> tuple[BlockShape, ...]:
    """The layers' shapes of a DeciLM `config.json` (its `block_configs`), checked:
    anything blockdistill cannot run the same way is a `ValueError` naming the layer."""
    blocks = hf.get("block_configs")
    n_layers, n_heads, dim = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"]), int(hf["hidden_size"])
    if not isinstance(blocks, list) or len(blocks) != n_layers:
        raise ValueError(f"{source}: a DeciLM config needs one block_configs entry per layer ({n_layers})")
    shapes = []
    for index, block in enumerate(blocks):
        where = f"{source}: block_configs[{index}]"
        if _section_value(block, "parallel_blocks") is not None:
            raise ValueError(f"{where} has parallel_blocks, which blockdistill does not support")
        attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
        for name, section in (("attention", attention), ("ffn", ffn)):
            used = [key for key in _UNSUPPORTED[name] if _section_value(section, key) is not None]
            if used:
                raise ValueError(f"{where}.{name} sets {used}, which blockdistill does not support")
        linear_attention = not attention.get("no_op", False) and bool(attention.get("replace_with_linear"))
        linear_ffn = not ffn.get("no_op", False) and bool(ffn.get("replace_with_linear"))
        if linear_attention or linear_ffn:
            if linear_attention and not ffn.get("no_op", False) or linear_ffn and not attention.get("no_op", False):
                raise ValueError(
                    f"{where} has a linear {'attention' if linear_attention else 'ffn'} (replace_with_linear) beside "
                    "a real section; blockdistill's linear layer is the whole layer (the other section a no_op)"
                )
            shapes.append(BlockShape(mlp_dim=0, n_kv_heads=0, linear=True))
            continue
        n_kv_heads = 0
        if not attention.get("no_op", False):
            if attention.get("num_key_value_heads") is not None:
                n_kv_heads = int(attention["num_key_value_heads"])
            elif attention.get("n_heads_in_group"):
                group = int(attention["n_heads_in_group"])
                if n_heads % group:
                    raise ValueError(f"{where}: n_heads_in_group={group} does not divide num_attention_heads={n_heads}")
                n_kv_heads = n_heads // group
            else:
                raise ValueError(f"{where}.attention has neither no_op nor n_heads_in_group")
        mlp_dim = 0
        if not ffn.get("no_op", False):
            if ffn.get("hidden_act", "silu") not in (None, "silu") or ffn.get("gated", True) is False:
                raise ValueError(f"{where}.ffn is not a SwiGLU (silu, gated) MLP")
            if ffn.get("ffn_mult") is not None:  # vLLM's precedence: ffn_mult first
                mlp_dim = ffn_mult_to_intermediate_size(float(ffn["ffn_mult"]), dim)
            elif ffn.get("intermediate_size") is not None:
                mlp_dim = int(ffn["intermediate_size"])
            else:
                raise ValueError(f"{where}.ffn has neither no_op, ffn_mult nor intermediate_size")
        shapes.append(BlockShape(mlp_dim=mlp_dim, n_kv_heads=n_kv_heads))
    return tuple(shapes)


def linear_ffn_aliases(hf: dict[str, Any]) -> dict[str, str]:
    """Tensor names of a DeciLM checkpoint whose linear layers are written in the FFN
    section (`ffn.replace_with_linear` beside an attention `no_op`): blockdistill's name
    (the attention section's, as `to_hf` writes them) -> the checkpoint's."""
    aliases = {}
    for index, block in enumerate(hf.get("block_configs") or []):
        attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
        if attention.get("no_op", False) and not ffn.get("no_op", False) and ffn.get("replace_with_linear"):
            prefix = f"model.layers.{index}."
            aliases[prefix + "input_layernorm.weight"] = prefix + "post_attention_layernorm.weight"
            aliases[prefix + "self_attn.linear_attn.weight"] = prefix + "mlp.linear_mlp.weight"
    return aliases


def shape_fields(shapes: tuple[BlockShape, ...]) -> dict[str, Any]:
    """`TransformerConfig` fields for layers of these shapes: a plain uniform config when
    every layer has the same full shape, else `layer_shapes` (the config's widths the
    widest layer's; each layer is stored at its own)."""
    if len(set(shapes)) == 1 and shapes[0].has_attention and shapes[0].has_mlp:
        return dict(mlp_dim=shapes[0].mlp_dim, n_kv_heads=shapes[0].n_kv_heads, layer_shapes=None)
    return dict(
        mlp_dim=max(1, max(s.mlp_dim for s in shapes)),
        n_kv_heads=max(1, max(s.n_kv_heads for s in shapes)),
        layer_shapes=shapes,
    )
