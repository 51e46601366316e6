"""What a model costs, per layer and in all, from its config alone: parameters, KV-cache
bytes and forward matmul FLOPs per token (every layer at its own shape, for a
heterogeneous model), and the training FLOPs of a pretraining step.

Matmul FLOPs only (2 per multiply-add): the attention projections, the causal attention
matmuls, the SwiGLU projections and the output head; norms, RoPE, softmax and other
elementwise work are not counted (model FLOPs, not hardware FLOPs)."""


from .config import BlockShape, TransformerConfig


def block_parameters(config: TransformerConfig, shape: BlockShape) -> int:
    """Parameters of one layer of shape `shape` in a model of `config` (its own weights,
    as a heterogeneous model stores them): attention with its input norm, the MLP with its norm, or the
    linear map with its input norm.

    **Example:**

    ```python
    bd.block_parameters(cfg, bd.BlockShape(mlp_dim=64, n_kv_heads=1))
    ```
    """
    dim, head_dim = config.dim, config.head_dim
    total = 0
    if shape.has_attention:
        q_width, kv_width = config.n_heads * head_dim, shape.n_kv_heads * head_dim
        total += dim + dim * (q_width + 2 * kv_width) + q_width * dim
        if config.qkv_bias:
            total += q_width + 2 * kv_width
    if shape.has_mlp:
        total += dim + 3 * dim * shape.mlp_dim
    if shape.linear:  # its input norm and the map
        total += dim + dim * dim
    return total


def parameter_count(config: TransformerConfig) -> int:
    """The model's own parameters: embeddings, every layer's own weights, the final norm
    and the output head: the number of entries of the model's arrays (a heterogeneous
    model stores every layer at its own shape).

    **Example:**

    ```python
    bd.parameter_count(cfg) == sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    ```
    """
    outer = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.dim
    return outer + sum(block_parameters(config, shape) for shape in config.block_shapes)


def kv_cache_bytes_per_token(config: TransformerConfig, *, bytes_per_value: int = 2) -> int:
    """Bytes of KV cache one token takes at inference: keys and values of every layer's
    own KV heads (layers without attention keep none), `bytes_per_value` each (2: bf16).

    **Example:**

    ```python
    bd.kv_cache_bytes_per_token(cfg)  # 2 layers x 2 (k, v) x 2 heads x 16 x 2 bytes = 256
    ```
    """
    heads = sum(shape.n_kv_heads for shape in config.block_shapes)
    return 2 * heads * config.head_dim * bytes_per_value


def block_flops_per_token(config: TransformerConfig, shape: BlockShape, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one layer of shape `shape` on sequences of
    `seq_len` tokens (the attention core averaged over the causal positions), counted as
    [`blockdistill.layer_flops`][] counts them.

    **Example:**

    ```python
    bd.block_flops_per_token(cfg, bd.BlockShape(mlp_dim=64, n_kv_heads=1), seq_len=16)
    ```
    """
    return sum(_block_parts(config, shape, seq_len).values()) / seq_len


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of the whole model (every layer's own shape, and the
    output head) on sequences of `seq_len` tokens.

    **Example:**

    ```python
    bd.flops_per_token(cfg, seq_len=16)
    ```
    """
    head = 2.0 * config.dim * config.vocab_size
    return head + sum(block_flops_per_token(config, shape, seq_len) for shape in config.block_shapes)


def layer_flops(config: TransformerConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of one decoder layer on one sequence of `seq_len` tokens, by part.

    `qkv` and `o` are the attention projections, `core` the two attention matmuls
    (`q k^T` and `p v`) over the causal pairs only (`seq (seq + 1) / 2`), `mlp` the three
    SwiGLU projections.

    **Example:**

    ```python
    parts = bd.layer_flops(cfg, seq_len=16)
    sum(parts.values())  # forward FLOPs of one layer on one sequence
    ```
    """
    q_width = config.n_heads * config.head_dim
    kv_width = config.n_kv_heads * config.head_dim
    causal_pairs = seq_len * (seq_len + 1) / 2
    return {
        "qkv": 2.0 * seq_len * config.dim * (q_width + 2 * kv_width),
        "o": 2.0 * seq_len * q_width * config.dim,
        "core": 2.0 * 2.0 * causal_pairs * config.n_heads * config.head_dim,
        "mlp": 2.0 * 3 * seq_len * config.dim * config.mlp_dim,
    }


def _block_parts(config: TransformerConfig, shape: BlockShape, seq_len: int) -> dict[str, float]:
    """[`layer_flops`][blockdistill.layer_flops] of one layer of shape `shape` (a part the
    layer lacks is zero; a linear layer's map is `linear`)."""
    uniform = config.replace(layer_shapes=None)
    parts = {"qkv": 0.0, "o": 0.0, "core": 0.0, "mlp": 0.0, "linear": 0.0}
    if shape.has_attention:
        attention = layer_flops(uniform.replace(n_kv_heads=shape.n_kv_heads), seq_len)
        parts.update(qkv=attention["qkv"], o=attention["o"], core=attention["core"])
    if shape.has_mlp:
        parts["mlp"] = layer_flops(uniform.replace(mlp_dim=shape.mlp_dim), seq_len)["mlp"]
    if shape.linear:
        parts["linear"] = 2.0 * seq_len * config.dim * config.dim
    return parts


def _layer_parts(config: TransformerConfig, seq_len: int) -> list[dict[str, float]]:
    """`_block_parts` of every layer, each at its own shape."""
    return [_block_parts(config, shape, seq_len) for shape in config.block_shapes]


def _head_flops(config: TransformerConfig, seq_len: int) -> float:
    return 2.0 * seq_len * config.dim * config.vocab_size


def pretrain_flops(config: TransformerConfig, *, seq_len: int, batch: int) -> float:
    """Training FLOPs of one cross-entropy step of `config` on `batch` rows of `seq_len`:
    forward and backward (twice the forward) of every layer (each at its own shape) and
    the head.

    **Example:**

    ```python
    flops = bd.pretrain_flops(cfg, seq_len=16, batch=8)
    ```
    """
    forward = sum(sum(p.values()) for p in _layer_parts(config, seq_len)) + _head_flops(config, seq_len)
    return 3.0 * batch * forward
