"""The math of a teacher kept sparse: its top-k next-token log-probabilities plus one
tail bucket, and the KL of a student against it. The cache's files (where such logits
are stored and read back) are the application's, in
[`teacher_cache`][blockdistill.app.teacher_cache].

Write `p`, `q` for the teacher's and student's distributions at temperature `T`, `K` for
the teacher's top-k ids and `p_tail`, `q_tail` for the mass outside `K`. The cached KL
(`tail=True`) is exactly the dense KL of the two distributions coarse-grained to the
buckets `K ∪ {tail}`, and

`KL(p || q) - KL_cached = p_tail * KL(p(.|tail) || q(.|tail))`,

so it is never larger than the dense KL, and the difference is at most
`p_tail * max_{j in tail} log(p(j|tail) / q(j|tail))`. Its gradient with respect to the
student's logits equals the dense one on the top-k ids; on the tail the two differ by
`T * p_tail * (p(j|tail) - q(j|tail))`, at most `2 T p_tail` in L1 norm per position.
Both vanish with the tail: with `k` equal to the vocabulary the cached KL is the dense KL.

The other divergences of [`blockdistill.logit_divergence`][] (reverse KL, Jensen-Shannon,
skew KL, total variation) weigh or compare the teacher's probability of every id the
student gives mass to, which a top-k cache does not hold; they are served only from a
cache of the whole vocabulary, and refused by name otherwise."""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, BatchMask, Float, Int


class TopKLogits(eqx.Module):
    """A teacher's next-token distribution kept sparse: per position the `k` most likely
    ids, their log-probabilities and the log of the probability mass of all other ids
    (`-inf` when there is none, e.g. `k` equal to the vocabulary).

    **Fields:** `ids` (`Int[Array, "batch seq k"]`), `logprobs`
    (`Float[Array, "batch seq k"]`, at the temperature the cache was made at) and
    `log_tail` (`Float[Array, "batch seq"]`).

    **Example:**

    ```python
    sparse = bd.top_k_logits(jax.vmap(teacher)(batch_tokens).logits, k=64)
    sparse.ids.shape                          # (batch, seq, 64)
    student_logits = jax.vmap(student)(batch_tokens).logits
    kl = bd.cached_kl_divergence(student_logits, sparse, mask)
    ```
    """

    ids: Int[Array, "batch seq k"]
    logprobs: Float[Array, "batch seq k"]
    log_tail: Float[Array, "batch seq"]

    @property
    def k(self) -> int:
        """Ids kept per position."""
        return self.ids.shape[-1]


def _top_k_mask(shape: tuple[int, ...], ids: Int[Array, "*tokens k"]) -> Array:
    """`True` at the ids of each position (a `[*tokens, vocab]` bool array)."""
    return jnp.put_along_axis(jnp.zeros(shape, bool), ids, True, axis=-1, inplace=False)


def top_k_logits(
    logits: Float[Array, "batch seq vocab"], k: int, temperature: float = 1.0
) -> TopKLogits:
    """The top-`k` log-probabilities of `logits / temperature` and the log of their tail
    mass, in float32.

    **Example:**

    ```python
    teacher_logits = jax.vmap(teacher)(batch_tokens).logits
    sparse = bd.top_k_logits(teacher_logits, k=64)   # sparse.ids: [batch, seq, 64]
    ```
    """
    vocab = logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"top_k={k!r} is invalid: must be in [1, {vocab}] (the vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be positive")
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    values, ids = jax.lax.top_k(logprobs, k)
    rest = jnp.where(_top_k_mask(logprobs.shape, ids), -jnp.inf, logprobs)
    return TopKLogits(ids=ids.astype(jnp.int32), logprobs=values, log_tail=jax.nn.logsumexp(rest, axis=-1))


def tail_mass_at(
    logits: Float[Array, "batch seq vocab"], mask: BatchMask, ks: tuple[int, ...], temperature: float = 1.0
) -> Float[Array, " ks"]:
    """The mean, over the positions of `mask`, of the probability mass of
    `softmax(logits / temperature)` outside its top `k`, for each `k` of `ks` (each at most
    the vocabulary): what a top-`k` teacher cache would leave in its tail bucket.

    **Example:**

    ```python
    teacher_logits = jax.vmap(teacher)(batch_tokens).logits
    mask = jnp.ones(batch_tokens.shape, bool)
    bd.tail_mass_at(teacher_logits, mask, (16, 64))   # mass outside the top 16 and 64
    ```
    """
    vocab = logits.shape[-1]
    if not ks or any(not 0 < k <= vocab for k in ks):
        raise ValueError(f"ks={ks!r} is invalid: each k must be in [1, {vocab}] (the vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be positive")
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    top = jnp.cumsum(jnp.exp(jax.lax.top_k(logprobs, max(ks))[0]), axis=-1)  # mass of the top 1, 2, ...
    tails = jnp.clip(1.0 - top[..., jnp.asarray(ks) - 1], 0.0, 1.0)  # [batch, seq, ks]
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(tails * weights, axis=(0, 1)) / jnp.maximum(jnp.sum(weights, axis=(0, 1)), 1.0)


def cached_kl_divergence(
    student_logits: Float[Array, "batch seq vocab"],
    teacher: TopKLogits,
    mask: BatchMask,
    temperature: float | Float[Array, ""] = 1.0,
    *,
    tail: bool = True,
) -> Float[Array, ""]:
    """`T^2 * KL(teacher_T || student_T)` against a sparse teacher, per token, averaged
    over valid tokens.

    With `tail=True` (default) the teacher is its top-k plus one tail bucket holding the
    rest of its mass, and the student's full-vocabulary log-probabilities are gathered
    into the same buckets: the KL of the two coarse-grained distributions, never above
    the dense KL and equal to it when the tail is empty (the bound is in the module's
    docs, [Teacher cache](../teacher_cache.md)). With `tail=False` both are renormalised
    over the top-k ids (DistillKit's "sparse" KL): the KL of the two distributions
    conditioned on the top-k.

    `teacher.logprobs` must be at `temperature` (a cache records the temperature it was
    made at; distillation refuses another).

    **Example:**

    ```python
    teacher_logits = jax.vmap(teacher)(batch_tokens).logits
    student_logits = jax.vmap(student)(batch_tokens).logits
    kl = bd.cached_kl_divergence(student_logits, bd.top_k_logits(teacher_logits, 16), mask)
    dense = bd.kl_divergence(student_logits, teacher_logits, mask)   # kl <= dense
    ```
    """
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher ids of shape {tuple(teacher.ids.shape)} do not match student logits of shape "
            f"{tuple(student_logits.shape)}"
        )
    t = jnp.asarray(temperature, jnp.float32)
    per_token = cached_kl_per_token(student_logits, teacher, t, tail=tail)
    weights = mask.astype(jnp.float32)
    return jnp.square(t) * jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cached_kl_per_token(
    student_logits: Float[Array, "*tokens vocab"],
    teacher: TopKLogits,
    temperature: Float[Array, ""],
    *,
    tail: bool = True,
) -> Float[Array, "*tokens"]:
    """`KL(teacher_T || student_T)` of each position against a sparse teacher (without the
    `T^2` factor): the per-token term of [`blockdistill.cached_kl_divergence`][]."""
    t = temperature
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_q = jnp.take_along_axis(log_student, teacher.ids, axis=-1)
    log_p = teacher.logprobs.astype(jnp.float32)
    if tail:
        low = jnp.finfo(jnp.float32).min  # finite: an empty tail keeps finite gradients
        outside = jnp.where(_top_k_mask(log_student.shape, teacher.ids), low, log_student)
        log_q_tail = jax.nn.logsumexp(outside, axis=-1)
        log_p_tail = teacher.log_tail.astype(jnp.float32)
        has_tail = jnp.isfinite(log_p_tail)
        safe = jnp.where(has_tail, log_p_tail, 0.0)
        tail_term = jnp.where(has_tail, jnp.exp(safe) * (safe - log_q_tail), 0.0)
        per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) + tail_term
    else:
        log_p = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
        per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return per_token
