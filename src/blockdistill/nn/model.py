"""The Transformer: embeddings, the scanned layer stack, final norm and head."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._types import Array, Float, Hidden, Int, LayerHidden, Logits, Segments, Tokens
from .attention import RMSNorm, apply_linear, init_linear
from .config import TransformerConfig
from .layer import InjectAt, check_inject_at
from .stack import LayerStack, LayerStates, StackCache


class ModelOutput(eqx.Module):
    """What a [`blockdistill.Transformer`][] returns.

    - `logits`: `Float[Array, "seq vocab"]`, always float32.
    - `states`: the per-layer [`blockdistill.LayerStates`][].
    - `hidden`: `Float[Array, "seq dim"]`, the residual stream after the last layer (what
      the final norm and the output head read): losses over the vocabulary computed in
      chunks start from it (see `DistillationObjective(logit_chunk=...)`).

    **Example:**

    ```python
    out = model(tokens)
    out.logits.shape, out.states.layer_out.shape
    ```
    """

    logits: Logits
    states: LayerStates
    hidden: Hidden


def _cast_floating(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree
    )


def in_compute_dtype(model: "Transformer") -> "Transformer":
    """The model with its floating parameters cast to the config's compute dtype (the
    model itself when that is float32)."""
    if model.config.dtype == "float32":
        return model
    return _cast_floating(model, model.config.compute_dtype)


class Transformer(eqx.Module):
    """A Llama-style decoder-only language model on one example (batch it with `jax.vmap`).

    **Arguments:**

    - `config`: a [`blockdistill.TransformerConfig`][].
    - `key`: a `jax.random` key for the initialisation.

    **Call:** `model(tokens, *, inject=None, inject_at="attention", segment_ids=None)
    -> ModelOutput`

    - `tokens`: `Int[Array, "seq"]`.
    - `inject`: optional `Float[Array, "layers seq dim"]`, typically a teacher's
      `states.attn_in` (with `inject_at="attention"`, the MaxText semantics: q, k and v
      of layer `l` read `inject[l]`, the residual stream stays the model's own) or
      `states.layer_in` (with `inject_at="layer"`: layer `l`'s whole input is
      `inject[l]`, so every layer is computed independently of the others).
    - `segment_ids`: optional `Int[Array, "seq"]` for a row that packs several
      documents: positions with equal ids form one document. Attention stays inside a
      document and rotary positions restart at each one, so every document gets the
      logits and states it would get on its own. `None`: the row is one document.

    **Returns:** a [`blockdistill.ModelOutput`][] with float32 logits and per-layer states.

    **Example:**

    ```python
    cfg = bd.TransformerConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, mlp_dim=128, max_seq_len=64)
    model = bd.Transformer(cfg, key=jax.random.key(0))
    tokens = jnp.arange(16)
    out = model(tokens)
    injected = model(tokens, inject=out.states.attn_in)            # attention level
    layered = model(tokens, inject=out.states.layer_in, inject_at="layer")
    batch = jax.vmap(model)(jnp.stack([tokens, tokens]))             # batched
    packed = model(tokens, segment_ids=jnp.array([1] * 10 + [2] * 6))  # two documents
    ```
    """

    embed_tokens: eqx.nn.Embedding
    layers: LayerStack
    norm: RMSNorm
    lm_head: eqx.nn.Linear | None
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ke, kl, kh = jax.random.split(key, 3)
        embed = eqx.nn.Embedding(config.vocab_size, config.dim, key=ke)
        weight = 0.02 * jax.random.normal(ke, (config.vocab_size, config.dim))
        self.embed_tokens = eqx.tree_at(lambda e: e.weight, embed, weight)
        self.layers = LayerStack(config, key=kl)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = init_linear(config.dim, config.vocab_size, use_bias=False, key=kh)
        self.config = config

    def check_inject(self, tokens_shape: tuple[int, ...], inject: Array) -> None:
        """Raise a `ValueError` naming expected and actual shapes of a wrong `inject`."""
        expected = (self.config.n_layers, tokens_shape[-1], self.config.dim)
        if tuple(inject.shape[-3:]) != expected or inject.ndim != 3:
            raise ValueError(
                f"inject has shape {tuple(inject.shape)}, expected {expected} "
                "(n_layers, seq, dim) for this model"
            )

    def embed(self, tokens: Tokens) -> Float[Array, "seq dim"]:
        """Look up token embeddings (in float32)."""
        return jnp.take(self.embed_tokens.weight, tokens, axis=0)

    def head(self, hidden: Float[Array, "seq dim"]) -> Logits:
        """Final norm and output projection, float32 logits."""
        normed = self.norm(hidden)
        if self.lm_head is None:
            logits = normed @ self.embed_tokens.weight.T
        else:
            logits = apply_linear(self.lm_head, normed)
        return logits.astype(jnp.float32)

    def _checked(self, tokens: Tokens, segment_ids: Segments | None) -> None:
        if tokens.shape[0] > self.config.max_seq_len:
            raise ValueError(
                f"tokens has length {tokens.shape[0]}, longer than "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(
                f"segment_ids has shape {tuple(segment_ids.shape)}, expected the shape of "
                f"tokens {tuple(tokens.shape)}"
            )

    def __call__(
        self,
        tokens: Tokens,
        *,
        inject: LayerHidden | None = None,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
    ) -> ModelOutput:
        check_inject_at(inject_at)
        self._checked(tokens, segment_ids)
        if inject is not None:
            self.check_inject(tokens.shape, inject)
        return _forward(self, tokens, inject, inject_at, segment_ids)

    def prefill(self, tokens: Tokens, max_len: int) -> tuple[Hidden, StackCache]:
        """Run a prompt (one document from position 0) and start a KV cache for
        generation.

        **Arguments:**

        - `tokens`: the prompt, `Int[Array, "seq"]`.
        - `max_len`: the positions the cache holds (at least `seq`, at most
          `max_seq_len`): the prompt and the tokens to come.

        **Returns:** `(hidden, cache)`: the residual stream after the last layer (as
        `ModelOutput.hidden`; `model.head(hidden)` gives the logits) and every layer's
        rotated keys and values of the prompt, `[layers, max_len, n_kv_heads, head_dim]`,
        zero past the prompt (for a heterogeneous model, a tuple of one such `KVCache`
        per segment of its layers, at the segment's own KV heads, `None` for a segment
        without attention). [`blockdistill.generate`][] builds on this and
        `decode_step`.

        **Example:**

        ```python
        hidden, cache = model.prefill(tokens, max_len=24)
        logits = model.head(hidden)  # equal to model(tokens).logits
        cache.k.shape  # (cfg.n_layers, 24, cfg.n_kv_heads, cfg.head_dim)
        ```
        """
        self._checked(tokens, None)
        if not tokens.shape[0] <= max_len <= self.config.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be at least the prompt's length {tokens.shape[0]} "
                f"and at most max_seq_len={self.config.max_seq_len}"
            )
        return _prefill(self, tokens, max_len)

    def decode_step(
        self, token: Int[Array, ""], cache: StackCache, position: Int[Array, ""]
    ) -> tuple[Float[Array, " vocab"], StackCache]:
        """One step of generation: the logits after `token`, placed at `position`, given
        the keys and values of every earlier position in `cache` (from `prefill` and the
        steps before); returns them and the cache with `position`'s keys and values
        written in. The same computation as row `position` of a full forward pass.

        **Example:**

        ```python
        hidden, cache = model.prefill(tokens[:8], max_len=16)
        logits, cache = model.decode_step(tokens[8], cache, jnp.asarray(8))
        # equal to model(tokens[:9]).logits[8]
        ```
        """
        return _decode_step(self, token, cache, position)

    def blockwise_outputs(
        self,
        tokens: Tokens,
        inject: LayerHidden,
        *,
        inject_at: InjectAt = "attention",
        segment_ids: Segments | None = None,
    ) -> LayerHidden:
        """Every block's output on its injected input, all layers at once (`jax.vmap`).

        Equals `model(tokens, inject=inject, inject_at=inject_at).states.attn_out` at
        `"attention"` level and `.layer_out` at `"layer"` level, but runs the layers in
        parallel (see [`blockdistill.LayerStack.blockwise_outputs`][]).

        **Example:**

        ```python
        out = model(tokens)
        parallel = model.blockwise_outputs(tokens, out.states.layer_in, inject_at="layer")
        ```
        """
        check_inject_at(inject_at)
        self._checked(tokens, segment_ids)
        self.check_inject(tokens.shape, inject)
        return _blockwise_outputs(self, inject, inject_at, segment_ids)


# The model's computations are compiled functions, so that calling a model outside `jit`
# (in a notebook, a test) compiles once per shape instead of re-tracing the layer scan on
# every call; inside a caller's `jit`, `vmap` or `grad` they are simply inlined.


@eqx.filter_jit
def _forward(
    model: Transformer,
    tokens: Tokens,
    inject: LayerHidden | None,
    inject_at: InjectAt,
    segment_ids: Segments | None,
) -> ModelOutput:
    model = in_compute_dtype(model)
    hidden = model.embed(tokens)
    hidden, states = model.layers(hidden, inject=inject, inject_at=inject_at, segment_ids=segment_ids)
    return ModelOutput(logits=model.head(hidden), states=states, hidden=hidden)


@eqx.filter_jit
def _prefill(model: Transformer, tokens: Tokens, max_len: int) -> tuple[Hidden, StackCache]:
    model = in_compute_dtype(model)
    hidden, kv = model.layers.prefill(model.embed(tokens))
    pad = [(0, 0), (0, max_len - tokens.shape[0]), (0, 0), (0, 0)]
    return hidden, jax.tree.map(lambda x: jnp.pad(x, pad), kv)


@eqx.filter_jit
def _decode_step(
    model: Transformer, token: Int[Array, ""], cache: StackCache, position: Int[Array, ""]
) -> tuple[Float[Array, " vocab"], StackCache]:
    model = in_compute_dtype(model)
    hidden = model.embed(token[None])
    hidden, cache = model.layers.decode(hidden, cache, position)
    return model.head(hidden)[0], cache


@eqx.filter_jit
def _blockwise_outputs(
    model: Transformer, inject: LayerHidden, inject_at: InjectAt, segment_ids: Segments | None
) -> LayerHidden:
    if model.config.dtype != "float32":
        model = _cast_floating(model, model.config.compute_dtype)
        inject = inject.astype(model.config.compute_dtype)
    return model.layers.blockwise_outputs(inject, inject_at=inject_at, segment_ids=segment_ids)
