"""RMSNorm, rotary position embeddings and grouped-query causal attention."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._types import Array, Float, Hidden, Int, Segments
from .config import RopeScaling, TransformerConfig


def init_linear(
    in_features: int, out_features: int, *, use_bias: bool, key: PRNGKeyArray
) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` with the Llama initialisation: normal(0, 0.02), zero bias."""
    linear = eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)
    weight = 0.02 * jax.random.normal(key, (out_features, in_features))
    linear = eqx.tree_at(lambda m: m.weight, linear, weight)
    if use_bias:
        linear = eqx.tree_at(lambda m: m.bias, linear, jnp.zeros(out_features))
    return linear


def apply_linear(linear: eqx.nn.Linear, x: Float[Array, "seq d_in"]) -> Float[Array, "seq d_out"]:
    """Apply an `eqx.nn.Linear` to every position of a sequence (one matmul).

    Written as `x @ W.T` rather than `jax.vmap(linear)(x)`: the vmapped form lowers to a
    `[out, tokens]` product whose result XLA then transposes, which measured 7-12% slower
    per training step on CPU (see BENCHMARKS.md).
    """
    out = x @ linear.weight.T
    if linear.bias is not None:
        out = out + linear.bias[None, :]
    return out


class RMSNorm(eqx.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32.

    **Arguments:**

    - `dim`: width of the normalised axis.
    - `eps`: added to the mean square before the square root.

    **Example:**

    ```python
    norm = bd.RMSNorm(64, eps=1e-5)
    y = norm(jnp.ones((8, 64)))  # Float[Array, "8 64"]
    ```
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.weight = jnp.ones(dim)
        self.eps = eps

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        scale = self.weight.astype(jnp.float32)[None, :]
        return (normed * scale).astype(x.dtype)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> Float[Array, " half"]:
    """Inverse frequencies of rotary embeddings, with optional Llama-3 scaling."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def segment_positions(segment_ids: Segments) -> Int[Array, " seq"]:
    """Each token's position inside its own document segment (0 at every segment start).

    A segment starts wherever `segment_ids` changes value (and at position 0), so the
    positions of a packed row restart at every document, as they would if each document
    were run on its own.

    **Example:**

    ```python
    bd.segment_positions(jnp.array([1, 1, 1, 2, 2, 0]))  # [0, 1, 2, 0, 1, 0]
    ```
    """
    index = jnp.arange(segment_ids.shape[0], dtype=jnp.int32)
    previous = jnp.concatenate([segment_ids[:1] - 1, segment_ids[:-1]])
    starts = jnp.where(segment_ids != previous, index, 0)
    return index - jax.lax.cummax(starts)



#: query rows per block of the blocked kernel (measured on CPU in benchmarks/candidates.py)
ATTENTION_BLOCK = 128


def resolve_attention_impl(impl: str, dtype: Any) -> str:
    """The kernel `impl` stands for on the current backend: `"auto"` is `"blocked"` on
    CPU, `"cudnn"` on an NVIDIA GPU with bfloat16/float16, and `"xla"` elsewhere."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "cpu":
        return "blocked"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def blocked_attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "seq kv_heads head_dim"],
    v: Float[Array, "seq kv_heads head_dim"],
    segment_ids: Segments | None = None,
    *,
    block: int = ATTENTION_BLOCK,
) -> Float[Array, "seq heads head_dim"]:
    """Causal grouped-query attention computed heads-first, one block of queries at a
    time, each against only the keys up to its own end (causal key-block skipping).

    The same numbers as `jax.nn.dot_product_attention(q, k, v, is_causal=True)` (with a
    same-segment mask when `segment_ids` is given): scores in the input dtype, softmax in
    float32. On CPU it avoids the `[heads, seq, seq]` scores that XLA's kernel builds,
    masks and transposes whole, and about halves the work of long sequences.
    """
    seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    # [kv_heads, group, seq, head_dim] and [kv_heads, seq, head_dim]
    q_heads = q.reshape(seq_len, n_kv, group, head_dim).transpose(1, 2, 0, 3)
    k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    scale = jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    outputs = []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        rows = end - start
        q_block = q_heads[:, :, start:end].reshape(n_kv, group * rows, head_dim)
        scores = jnp.einsum("kqd,ksd->kqs", q_block, k_heads[:, :end]) * scale
        allowed = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[start:end, None] == segment_ids[None, :end])
        allowed = jnp.tile(allowed, (group, 1))[None]
        scores = jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("kqs,ksd->kqd", probs, v_heads[:, :end])
        outputs.append(out.reshape(n_kv, group, rows, head_dim))
    heads = jnp.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]
    return heads.transpose(2, 0, 1, 3).reshape(seq_len, n_heads, head_dim)


class KVCache(eqx.Module):
    """Keys and values of attention, for generation with a KV cache: rotated keys `k`
    and values `v` of every stored KV head, `[*layers, len, n_kv_heads, head_dim]`.

    A model's cache holds every layer's (stacked on a leading `layers` axis, as the
    parameters are) for `max_len` positions; one layer's step returns those of its new
    positions alone (`len` 1 when decoding). See `Transformer.prefill` and
    [`blockdistill.generate`][].
    """

    k: Float[Array, "*layers len kv_heads head_dim"]
    v: Float[Array, "*layers len kv_heads head_dim"]


def apply_rope(
    x: Float[Array, "seq heads head_dim"],
    inv_freq: Float[Array, " half"],
    positions: Int[Array, " seq"] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Rotate query/key heads by their position (the "rotate half" convention of HF).

    `positions` defaults to `0, 1, ..., seq - 1`.
    """
    if positions is None:
        positions = jnp.arange(x.shape[0], dtype=jnp.int32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(eqx.Module):
    """Causal grouped-query self-attention with rotary embeddings.

    The kernel is the config's `attention_impl` (see
    [`blockdistill.TransformerConfig`][]): `jax.nn.dot_product_attention` (`"xla"`, or
    `"cudnn"` on NVIDIA GPUs in bf16/fp16) or the heads-first blocked kernel
    (`"blocked"`, the CPU default); all compute the same attention. `inject`, when
    given, replaces `x` as the input of the q, k and v projections: this is how a
    student block consumes the teacher's attention input.

    `segment_ids`, when given, says which document each position belongs to (a packed
    row holds several): a position attends only to earlier positions of its own
    segment, and rotary positions restart at 0 where each segment starts, so every
    document of a packed row gets exactly the output it would get on its own.

    **Arguments:**

    - `config`: a [`blockdistill.TransformerConfig`][].
    - `key`: a `jax.random` key.

    **Call:** `attention(x, *, inject=None, segment_ids=None, kv_slot=None) -> Float[Array,
    "seq dim"]`, the output after the o-projection (before the residual add). `kv_slot`
    (`Int[Array, "heads"]`, a heterogeneous student's layer) names the stored KV head each
    query head reads, instead of the even grouping over `n_kv_heads`.

    **Example:**

    ```python
    attn = bd.Attention(cfg, key=jax.random.key(0))
    x = jnp.ones((16, cfg.dim))
    y = attn(x)                      # uses x for q, k, v
    y2 = attn(x, inject=2 * x)       # uses the injected array instead
    y3 = attn(x, segment_ids=jnp.array([1] * 8 + [2] * 8))  # two documents
    ```
    """

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    rope_scaling: RopeScaling | None = eqx.field(static=True)
    attention_impl: str = eqx.field(static=True, default="auto")

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        hd = config.head_dim
        bias = config.qkv_bias
        self.q_proj = init_linear(config.dim, config.n_heads * hd, use_bias=bias, key=kq)
        self.k_proj = init_linear(config.dim, config.n_kv_heads * hd, use_bias=bias, key=kk)
        self.v_proj = init_linear(config.dim, config.n_kv_heads * hd, use_bias=bias, key=kv)
        self.o_proj = init_linear(config.n_heads * hd, config.dim, use_bias=False, key=ko)
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = hd
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling
        self.attention_impl = config.attention_impl

    def project(
        self, attn_in: Hidden, positions: Int[Array, " seq"] | None = None
    ) -> tuple[Float[Array, "seq heads head_dim"], KVCache]:
        """The rotated queries, and the rotated keys and values (all stored KV heads), of
        `attn_in` at rotary `positions` (default `0, 1, ..., seq - 1`): the projections
        that the full forward and the cached decode share."""
        seq_len = attn_in.shape[0]
        q = apply_linear(self.q_proj, attn_in).reshape(seq_len, self.n_heads, self.head_dim)
        k = apply_linear(self.k_proj, attn_in).reshape(seq_len, self.n_kv_heads, self.head_dim)
        v = apply_linear(self.v_proj, attn_in).reshape(seq_len, self.n_kv_heads, self.head_dim)
        inv_freq = rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
        q = apply_rope(q, inv_freq, positions)
        k = apply_rope(k, inv_freq, positions)
        return q, KVCache(k=k, v=v)

    def __call__(
        self,
        x: Hidden,
        *,
        inject: Hidden | None = None,
        segment_ids: Segments | None = None,
        kv_slot: Int[Array, " heads"] | None = None,
    ) -> Hidden:
        attn_in = x if inject is None else inject.astype(x.dtype)
        positions = None if segment_ids is None else segment_positions(segment_ids)
        q, kv = self.project(attn_in, positions)
        return self._attend(q, kv, segment_ids, kv_slot)

    def prefill(self, x: Hidden, *, kv_slot: Int[Array, " heads"] | None = None) -> tuple[Hidden, KVCache]:
        """The attention output on a prompt `x` (one document from position 0), as
        `attention(x, kv_slot=kv_slot)` computes it, and the prompt's keys and values
        (`[seq, n_kv_heads, head_dim]`, rotated) for a KV cache."""
        q, kv = self.project(x)
        return self._attend(q, kv, None, kv_slot), kv

    def decode(
        self,
        x: Float[Array, "1 dim"],
        cache: KVCache,
        position: Int[Array, ""],
        *,
        kv_slot: Int[Array, " heads"] | None = None,
    ) -> tuple[Float[Array, "1 dim"], KVCache]:
        """The attention output at one new `position`, given the keys and values of
        every earlier position in `cache` (`[max_len, n_kv_heads, head_dim]`; entries at
        `position` and later are ignored).

        **Returns:** the output (`[1, dim]`) and the new position's own keys and values
        (a `KVCache` of length 1), which the caller writes into its cache at `position`.
        The same projections, rotary embedding and softmax (float32) as the full forward,
        so the output equals row `position` of `attention(x_all)` up to float round-off.
        """
        q, new = self.project(x, position[None])
        scale = jnp.asarray(1.0 / math.sqrt(self.head_dim), q.dtype)
        # scores against the cached positions before `position`, and against the new one
        before = jnp.arange(cache.k.shape[0]) < position
        if kv_slot is None:  # query head h reads KV head h // group
            group = self.n_heads // self.n_kv_heads
            q_groups = q.reshape(self.n_kv_heads, group, self.head_dim)
            cached = jnp.einsum("kgd,skd->kgs", q_groups, cache.k).reshape(self.n_heads, -1)
            own = jnp.einsum("kgd,kd->kg", q_groups, new.k[0]).reshape(self.n_heads, 1)
        else:  # query head h reads stored KV head kv_slot[h]: select it with a one-hot
            pick = jax.nn.one_hot(kv_slot, self.n_kv_heads, dtype=q.dtype)  # [heads, kv]
            q_slots = q[0][None, :, :] * pick.T[:, :, None]  # [kv, heads, head_dim], zero off the slot
            cached = jnp.einsum("khd,skd->hs", q_slots, cache.k)
            own = jnp.einsum("khd,kd->h", q_slots, new.k[0])[:, None]
        scores = jnp.concatenate([cached, own], axis=1) * scale
        allowed = jnp.concatenate([before, jnp.ones(1, bool)])[None, :]
        scores = jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(cache.v.dtype)
        cached_probs, own_prob = probs[:, :-1], probs[:, -1]
        if kv_slot is None:
            group = self.n_heads // self.n_kv_heads
            heads = jnp.einsum("kgs,skd->kgd", cached_probs.reshape(self.n_kv_heads, group, -1), cache.v)
            heads = heads.reshape(self.n_heads, self.head_dim)
            heads = heads + own_prob[:, None] * jnp.repeat(new.v[0], group, axis=0)
        else:
            per_slot = jnp.einsum("hs,skd->hkd", cached_probs, cache.v)  # every head against every slot
            heads = jnp.einsum("hkd,hk->hd", per_slot, pick) + own_prob[:, None] * jnp.take(new.v[0], kv_slot, axis=0)
        out = apply_linear(self.o_proj, heads.reshape(1, self.n_heads * self.head_dim))
        return out, new

    def _attend(
        self,
        q: Float[Array, "seq heads head_dim"],
        kv: KVCache,
        segment_ids: Segments | None,
        kv_slot: Int[Array, " heads"] | None,
    ) -> Hidden:
        """Causal attention of every position of `q` over `kv` with the config's kernel,
        then the o-projection."""
        seq_len = q.shape[0]
        k, v = kv.k, kv.v
        if kv_slot is not None:  # a padded layer with its own KV heads: one per query head
            k, v = jnp.take(k, kv_slot, axis=1), jnp.take(v, kv_slot, axis=1)
        impl = resolve_attention_impl(self.attention_impl, q.dtype)
        if impl == "blocked":
            heads = blocked_attention(q, k, v, segment_ids)
        else:
            same_segment = None
            if segment_ids is not None:
                same_segment = (segment_ids[:, None] == segment_ids[None, :])[None]
            heads = jax.nn.dot_product_attention(
                q, k, v, mask=same_segment, is_causal=True, implementation=impl
            )
        return apply_linear(self.o_proj, heads.reshape(seq_len, self.n_heads * self.head_dim))
