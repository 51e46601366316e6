"""The search space of the block search: which candidate block shapes a layer may take
(MLP widths, fewer KV heads, attention or MLP dropped, a linear map, removal), and what
each candidate costs (parameters, KV bytes, FLOPs per token)."""

import dataclasses
from typing import Any

import numpy as np

from ..nn.config import BlockShape, TransformerConfig, checked_dict
from ..nn.costs import block_flops_per_token, block_parameters

_FEATURE_LOSSES = ("cosine", "l2", "nmse")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"SearchSpace.{field}={value!r} is invalid: {why}")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Which replacement blocks the search considers for every teacher layer.

    Candidates are every combination of an attention choice and an MLP choice, plus the
    whole-layer options:

    - `mlp_ratios`: MLP widths as fractions of the teacher's `mlp_dim` (`0 < r <= 1`).
    - `kv_heads`: KV head counts (each must divide the teacher's `n_heads` and be at most
      its `n_kv_heads`); `None`: the teacher's `n`, `n / 2` and `1`.
    - `drop_attention` / `drop_mlp`: also offer each MLP choice without attention, and each
      attention choice without an MLP.
    - `linear`: also offer the whole layer as a linear map of its normed input,
      `x + rmsnorm(x) W^T` (from `W = 0`; DeciLM's `replace_with_linear` attention).
    - `identity`: also offer removing the layer.

    **Example:**

    ```python
    space = bd.SearchSpace(mlp_ratios=(1.0, 0.5), kv_heads=(2, 1))
    shapes = bd.candidate_shapes(cfg, space)   # 2 x 2 + no-attention 2 + no-MLP 2 + linear + identity
    len(shapes)  # 10
    ```
    """

    mlp_ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    kv_heads: tuple[int, ...] | None = None
    drop_attention: bool = True
    drop_mlp: bool = True
    linear: bool = True
    identity: bool = True

    def __post_init__(self):
        ratios = self.mlp_ratios
        if not isinstance(ratios, tuple) or not ratios:
            _fail("mlp_ratios", ratios, "must be a non-empty tuple of numbers")
        for ratio in ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                _fail("mlp_ratios", ratios, f"has {ratio!r}: every ratio must satisfy 0 < r <= 1")
        if self.kv_heads is not None:
            if not isinstance(self.kv_heads, tuple) or not self.kv_heads:
                _fail("kv_heads", self.kv_heads, "must be None or a non-empty tuple of integers")
            for heads in self.kv_heads:
                if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
                    _fail("kv_heads", self.kv_heads, f"has {heads!r}: every count must be a positive integer")
        for field in ("drop_attention", "drop_mlp", "linear", "identity"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "must be a bool")

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form, for JSON files (inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        out["mlp_ratios"] = list(self.mlp_ratios)
        if self.kv_heads is None:
            del out["kv_heads"]
        else:
            out["kv_heads"] = list(self.kv_heads)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchSpace":
        """Build from a plain dict; unknown keys are a `ValueError` that names them.

        **Example:**

        ```python
        space = bd.SearchSpace.from_dict({"mlp_ratios": [1.0, 0.5], "linear": False})
        assert bd.SearchSpace.from_dict(space.to_dict()) == space
        ```
        """
        data = checked_dict(cls, data)
        for field in ("mlp_ratios", "kv_heads"):
            if isinstance(data.get(field), list):
                data[field] = tuple(data[field])
        return cls(**data)


def _kv_choices(config: TransformerConfig, space: SearchSpace) -> tuple[int, ...]:
    if space.kv_heads is None:
        heads = [config.n_kv_heads, config.n_kv_heads // 2, 1]
        return tuple(sorted({h for h in heads if h >= 1 and config.n_heads % h == 0}, reverse=True))
    for heads in space.kv_heads:
        if heads > config.n_kv_heads or config.n_heads % heads:
            _fail(
                "kv_heads", space.kv_heads,
                f"has {heads}: must divide the teacher's n_heads={config.n_heads} and be at most "
                f"its n_kv_heads={config.n_kv_heads}",
            )
    return tuple(sorted(set(space.kv_heads), reverse=True))


def candidate_shapes(config: TransformerConfig, space: SearchSpace) -> tuple[BlockShape, ...]:
    """Every candidate block of `space` for a teacher of `config`, widest first: each KV
    choice with each MLP width, then (if asked) the MLP widths without attention, the
    attention choices without an MLP, the linear map and the identity. Widths that round
    to the same channel count appear once.

    **Example:**

    ```python
    bd.candidate_shapes(cfg, bd.SearchSpace(mlp_ratios=(0.5,), kv_heads=(1,), drop_mlp=False,
                                            linear=False, identity=False))
    # (BlockShape(mlp_dim=64, n_kv_heads=1), BlockShape(mlp_dim=64, n_kv_heads=0))
    ```
    """
    if config.layer_shapes is not None:
        raise ValueError("the teacher of a block search must be uniform (its config has layer_shapes)")
    widths = sorted({max(1, int(r * config.mlp_dim + 0.5)) for r in space.mlp_ratios}, reverse=True)
    kv = _kv_choices(config, space)
    shapes = [BlockShape(width, heads) for heads in kv for width in widths]
    if space.drop_attention:
        shapes += [BlockShape(width, 0) for width in widths]
    if space.drop_mlp:
        shapes += [BlockShape(0, heads) for heads in kv]
    if space.linear:
        shapes.append(BlockShape(0, 0, linear=True))
    if space.identity:
        shapes.append(BlockShape(0, 0))
    return tuple(shapes)


def _is_trained(shape: BlockShape) -> bool:
    return shape.has_attention or shape.has_mlp or shape.linear


def _candidate_config(config: TransformerConfig, shape: BlockShape) -> TransformerConfig:
    """The config of one candidate's stack: its own width (at least 1), with `layer_shapes`
    where it lacks a part (which its compact layers then do not have)."""
    regular = shape.has_attention and shape.has_mlp and not shape.linear
    return config.replace(
        mlp_dim=max(1, shape.mlp_dim),
        n_kv_heads=max(1, shape.n_kv_heads),
        layer_shapes=None if regular else (shape,) * config.n_layers,
        scan_layers=True,
    )


def candidate_costs(
    config: TransformerConfig, shapes: tuple[BlockShape, ...], *, seq_len: int, kv_bytes_per_value: int = 2
) -> dict[str, np.ndarray]:
    """Each candidate's cost per layer under every budget kind, as `[candidates]` arrays:
    `params` (its own parameters), `kv_bytes` (KV-cache bytes per token), `flops`
    (forward FLOPs per token at `seq_len`).

    **Example:**

    ```python
    costs = bd.candidate_costs(cfg, bd.candidate_shapes(cfg, bd.SearchSpace()), seq_len=16)
    costs["params"][-1]  # 0: the identity
    ```
    """
    return {
        "params": np.array([block_parameters(config, s) for s in shapes], np.float64),
        "kv_bytes": np.array([2 * s.n_kv_heads * config.head_dim * kv_bytes_per_value for s in shapes], np.float64),
        "flops": np.array([block_flops_per_token(config, s, seq_len) for s in shapes], np.float64),
    }
