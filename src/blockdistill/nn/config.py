"""Frozen, validated configuration dataclasses."""

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = {"none", "full", "dots"}
_ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn")


def checked_dict(cls: type, data: dict[str, Any], float_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of `data` for `cls(**...)`: unknown keys are a `ValueError` that names them,
    and integers in `float_fields` become floats (TOML and JSON write 1 for 1.0)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
    data = dict(data)
    for field in float_fields:
        if isinstance(data.get(field), int) and not isinstance(data[field], bool):
            data[field] = float(data[field])
    return data


def _fail(owner: str, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{owner}.{field}={value!r} is invalid: {why}")


def check_execution(remat: str | bool, dtype: str, attention_impl: str, owner: str = "TransformerConfig") -> str:
    """Check how a model runs (`remat`, `dtype`, `attention_impl`, see
    `TransformerConfig`); returns `remat` as a name (a bool becomes "full" / "none")."""
    name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in _REMAT:
        _fail(owner, "remat", remat, f"must be one of {sorted(_REMAT)} or a bool")
    if dtype not in _DTYPES:
        _fail(owner, "dtype", dtype, f"must be one of {sorted(_DTYPES)}")
    if attention_impl not in _ATTENTION_IMPLS:
        _fail(owner, "attention_impl", attention_impl, f"must be one of {_ATTENTION_IMPLS}")
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: "llama3"`` in HF).

    **Arguments:**

    - `factor`: how much longer the context is than the original one.
    - `low_freq_factor`, `high_freq_factor`: wavelengths above
      `original_max_position_embeddings / low_freq_factor` are divided by `factor`, those
      below `original_max_position_embeddings / high_freq_factor` are kept, and those in
      between are interpolated smoothly.
    - `original_max_position_embeddings`: the context length the model was trained on.

    **Example:**

    ```python
    scaling = bd.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)
    ```
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not self.factor >= 1.0:
            _fail("RopeScaling", "factor", self.factor, "must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            _fail(
                "RopeScaling",
                "low_freq_factor",
                self.low_freq_factor,
                f"must be positive and below high_freq_factor={self.high_freq_factor}",
            )
        if self.original_max_position_embeddings <= 0:
            _fail(
                "RopeScaling",
                "original_max_position_embeddings",
                self.original_max_position_embeddings,
                "must be positive",
            )

@dataclasses.dataclass(frozen=True)
class BlockShape:
    """The shape of one decoder layer of a heterogeneous student (see
    `TransformerConfig.layer_shapes`).

    **Arguments:**

    - `mlp_dim`: the layer's own MLP width; `0` means the layer has no MLP.
    - `n_kv_heads`: the layer's own number of key/value heads; `0` means the layer has no
      attention. Query heads are always the config's `n_heads` (when the layer has
      attention), grouped evenly over its KV heads.
    - `linear`: the whole layer is the linear map of its normed input,
      `x + rmsnorm(x) W^T` (`W` of `dim x dim`, initialised at zero: the identity; the
      norm has its own learned scale, `input_layernorm`), as the DeciLM / Puzzle format's
      `replace_with_linear` attention is; needs `mlp_dim=0` and `n_kv_heads=0`.

    A layer with `mlp_dim=0`, `n_kv_heads=0` and `linear=False` is the identity.

    **Example:**

    ```python
    narrow = bd.BlockShape(mlp_dim=64, n_kv_heads=1)
    mlp_only = bd.BlockShape(mlp_dim=128, n_kv_heads=0)
    ```
    """

    mlp_dim: int
    n_kv_heads: int
    linear: bool = False

    def __post_init__(self):
        for field in ("mlp_dim", "n_kv_heads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail("BlockShape", field, value, "must be a non-negative integer")
        if not isinstance(self.linear, bool):
            _fail("BlockShape", "linear", self.linear, "must be a bool")
        if self.linear and (self.mlp_dim or self.n_kv_heads):
            _fail("BlockShape", "linear", self.linear, "needs mlp_dim=0 and n_kv_heads=0 (the linear map is the whole layer)")

    @property
    def has_attention(self) -> bool:
        return self.n_kv_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.mlp_dim > 0


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and execution options of a Llama-style decoder-only transformer.

    **Arguments:**

    - `vocab_size`: number of token ids.
    - `dim`: width of the residual stream.
    - `n_layers`: number of decoder layers (stacked on a leading `layers` axis).
    - `n_heads`: number of query heads.
    - `n_kv_heads`: number of key/value heads (grouped-query attention); must divide
      `n_heads`. Defaults to `n_heads`.
    - `mlp_dim`: hidden width of the SwiGLU MLP.
    - `max_seq_len`: longest sequence the model accepts.
    - `head_dim`: width of one head; defaults to `dim // n_heads`.
    - `rope_theta`: base of the rotary frequencies.
    - `rope_scaling`: optional [`blockdistill.RopeScaling`][] (Llama 3).
    - `norm_eps`: epsilon of the RMSNorms.
    - `qkv_bias`: whether the q, k and v projections have a bias (Qwen2).
    - `tie_embeddings`: share the embedding matrix with the output head.
    - `scan_layers`: run the layer stack with `jax.lax.scan` (fast to compile, the
      default) or with an unrolled Python loop over slices of the same stacked
      parameters. Both give the same outputs.
    - `remat`: `"none"`, `"full"` (recompute each layer in the backward pass) or
      `"dots"` (keep matmul outputs, recompute the rest). `True`/`False` mean
      `"full"`/`"none"`.
    - `dtype`: compute dtype, `"float32"` (default) or `"bfloat16"`/`"float16"`.
      Parameters always stay in float32; with a low-precision dtype they are cast for
      the matmuls, and logits are returned in float32.
    - `attention_impl`: the attention kernel, all computing the same attention (causal,
      GQA, document segments): `"xla"` (`jax.nn.dot_product_attention`), `"blocked"`
      (heads-first, one block of 128 queries at a time against only the keys up to its
      end: no `[heads, seq, seq]` tensor and about half the work of long sequences;
      measured faster on CPU), `"cudnn"` (`jax.nn.dot_product_attention(implementation=
      "cudnn")`, NVIDIA GPUs, bfloat16/float16), or `"auto"` (default): `"blocked"` on
      CPU, `"cudnn"` on a GPU in bfloat16/float16, `"xla"` otherwise.
    - `layer_shapes`: `None` (every layer has `mlp_dim` channels and `n_kv_heads` heads)
      or one [`blockdistill.BlockShape`][] per layer, for a heterogeneous student (what
      [`blockdistill.assemble_student`][] builds). The config's `mlp_dim` and
      `n_kv_heads` must be at least every layer's own. Every layer is stored and run at
      its own shape: each run of consecutive layers of one shape (a segment, see
      `segments`) is one stack of its own, run by its own scan, and the segments run one
      after the other; a layer's missing parts (attention, MLP) have no parameters and
      cost nothing.

    **Example:**

    ```python
    cfg = bd.TransformerConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, mlp_dim=128, max_seq_len=64)
    cfg.head_dim  # 16
    ```
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    mlp_dim: int | None = None
    max_seq_len: int = 2048
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    scan_layers: bool = True
    remat: str | bool = "none"
    dtype: str = "float32"
    attention_impl: str = "auto"
    layer_shapes: tuple[BlockShape, ...] | None = None

    def __post_init__(self):
        name = "TransformerConfig"
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, field, value, "must be a positive integer")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.dim)
        for field in ("n_kv_heads", "mlp_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, field, value, "must be a positive integer")
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                _fail(
                    name, "dim", self.dim, f"must be divisible by n_heads={self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        elif (
            isinstance(self.head_dim, bool)
            or not isinstance(self.head_dim, int)
            or self.head_dim <= 0
        ):
            _fail(name, "head_dim", self.head_dim, "must be a positive integer")
        if self.head_dim % 2 != 0:
            _fail(name, "head_dim", self.head_dim, "must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            _fail(
                name,
                "n_heads",
                self.n_heads,
                f"must be a multiple of n_kv_heads={self.n_kv_heads}",
            )
        if not self.rope_theta > 0:
            _fail(name, "rope_theta", self.rope_theta, "must be positive")
        if not self.norm_eps > 0:
            _fail(name, "norm_eps", self.norm_eps, "must be positive")
        if self.rope_scaling is not None and not isinstance(
            self.rope_scaling, RopeScaling
        ):
            _fail(name, "rope_scaling", self.rope_scaling, "must be a RopeScaling")
        object.__setattr__(self, "remat", check_execution(self.remat, self.dtype, self.attention_impl, name))
        for field in ("qkv_bias", "tie_embeddings", "scan_layers"):
            if not isinstance(getattr(self, field), bool):
                _fail(name, field, getattr(self, field), "must be a bool")
        if self.layer_shapes is not None:
            self._check_layer_shapes()

    def _check_layer_shapes(self) -> None:
        name, shapes = "TransformerConfig", self.layer_shapes
        if not isinstance(shapes, tuple) or not all(isinstance(s, BlockShape) for s in shapes):
            _fail(name, "layer_shapes", shapes, "must be None or a tuple of BlockShape")
        if len(shapes) != self.n_layers:
            _fail(name, "layer_shapes", shapes, f"has {len(shapes)} entries for n_layers={self.n_layers}")
        for index, shape in enumerate(shapes):
            if shape.mlp_dim > self.mlp_dim:
                _fail(name, f"layer_shapes[{index}].mlp_dim", shape.mlp_dim, f"exceeds mlp_dim={self.mlp_dim}")
            if shape.n_kv_heads > self.n_kv_heads:
                _fail(name, f"layer_shapes[{index}].n_kv_heads", shape.n_kv_heads, f"exceeds n_kv_heads={self.n_kv_heads}")
            if shape.n_kv_heads and self.n_heads % shape.n_kv_heads:
                _fail(
                    name, f"layer_shapes[{index}].n_kv_heads", shape.n_kv_heads,
                    f"must divide n_heads={self.n_heads}",
                )

    @property
    def block_shapes(self) -> tuple[BlockShape, ...]:
        """Every layer's [`blockdistill.BlockShape`][]: `layer_shapes`, or the uniform
        shape of the config repeated `n_layers` times.

        **Example:**

        ```python
        cfg.block_shapes[0]  # BlockShape(mlp_dim=128, n_kv_heads=2, linear=False)
        ```
        """
        if self.layer_shapes is not None:
            return self.layer_shapes
        return (BlockShape(self.mlp_dim, self.n_kv_heads),) * self.n_layers

    @property
    def segments(self) -> tuple[tuple[int, int, BlockShape], ...]:
        """`(start, stop, shape)` of every run of consecutive layers of one shape: the
        segments a heterogeneous model stores and runs one after the other (one segment,
        `(0, n_layers, shape)`, for a uniform config).

        **Example:**

        ```python
        hetero = cfg.replace(layer_shapes=(bd.BlockShape(64, 1),) * 2)
        hetero.segments  # ((0, 2, BlockShape(mlp_dim=64, n_kv_heads=1, linear=False)),)
        ```
        """
        runs: list[tuple[int, int, BlockShape]] = []
        for index, shape in enumerate(self.block_shapes):
            if runs and runs[-1][2] == shape:
                runs[-1] = (runs[-1][0], index + 1, shape)
            else:
                runs.append((index, index + 1, shape))
        return tuple(runs)

    @property
    def has_linear_layers(self) -> bool:
        """Whether any layer is a linear map (the stack then stores a `dim x dim` matrix per layer)."""
        return self.layer_shapes is not None and any(s.linear for s in self.layer_shapes)

    @property
    def compute_dtype(self):
        """The jnp dtype that matmuls run in."""
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> "TransformerConfig":
        """A copy with some fields changed (validated again).

        **Example:**

        ```python
        unrolled = cfg.replace(scan_layers=False)
        ```
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form, for JSON/TOML files (inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        if self.rope_scaling is None:
            del out["rope_scaling"]
        if self.layer_shapes is None:
            del out["layer_shapes"]
        else:
            out["layer_shapes"] = [dataclasses.asdict(s) for s in self.layer_shapes]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        """Build from a plain dict; unknown keys are a `ValueError` that names them.

        **Example:**

        ```python
        cfg2 = bd.TransformerConfig.from_dict(cfg.to_dict())
        assert cfg2 == cfg
        ```
        """
        data = checked_dict(cls, data, ("rope_theta", "norm_eps"))
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if isinstance(data.get("layer_shapes"), (list, tuple)):
            data["layer_shapes"] = tuple(
                BlockShape(**checked_dict(BlockShape, s)) if isinstance(s, dict) else s
                for s in data["layer_shapes"]
            )
        return cls(**data)
