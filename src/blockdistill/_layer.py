"""SwiGLU MLP and the pre-norm decoder layer with its `inject` entry points."""

from typing import Literal

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ._attention import Attention, RMSNorm, apply_linear, init_linear
from ._config import TransformerConfig
from ._types import Hidden, Segments

InjectAt = Literal["attention", "layer"]
INJECT_LEVELS = ("attention", "layer")


def check_inject_at(inject_at: str) -> None:
    """Raise a `ValueError` naming `inject_at` unless it is a known injection level."""
    if inject_at not in INJECT_LEVELS:
        raise ValueError(f"inject_at={inject_at!r} is invalid: must be one of {INJECT_LEVELS}")


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

    def __call__(self, x: Hidden) -> Hidden:
        hidden = jax.nn.silu(apply_linear(self.gate_proj, x)) * apply_linear(self.up_proj, x)
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

    **Call:** `layer(layer_in, *, inject=None, inject_at="attention", segment_ids=None)
    -> LayerStep`.

    **Example:**

    ```python
    layer = bd.DecoderLayer(cfg, key=jax.random.key(0))
    step = layer(jnp.ones((16, cfg.dim)))
    step.attn_out.shape  # (16, cfg.dim)
    ```
    """

    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: MLP

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        self.input_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.self_attn = Attention(config, key=ka)
        self.post_attention_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config, key=km)

    def __call__(
        self,
        layer_in: Hidden,
        *,
        inject: Hidden | None = None,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
    ) -> LayerStep:
        if inject is not None and inject_at == "layer":
            layer_in = inject.astype(layer_in.dtype)
            inject = None
        normed = self.input_layernorm(layer_in)
        attn_in = normed if inject is None else inject.astype(layer_in.dtype)
        attn_out = self.self_attn(normed, inject=inject, segment_ids=segment_ids)
        hidden = layer_in + attn_out
        layer_out = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return LayerStep(attn_in=attn_in, attn_out=attn_out, layer_in=layer_in, layer_out=layer_out)
