"""The losses of distillation: the per-token feature losses between student and teacher
states (cosine, l2, Puzzle's normalized MSE), the temperature-scaled KL of the logits,
next-token cross-entropy on labels, and both logit losses computed chunk by chunk over the
sequence so that no `[batch, seq, vocab]` array is ever held at once."""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Bool, Float
from .sparse import TopKLogits, cached_kl_per_token

FeatureLoss = Literal["cosine", "l2", "nmse"]
FEATURE_LOSSES = ("cosine", "l2", "nmse")

_COSINE_EPS = 1e-6
_NMSE_EPS = 1e-12


def feature_loss(
    student: Float[Array, "*tokens dim"],
    teacher: Float[Array, "*tokens dim"],
    kind: FeatureLoss = "cosine",
    mask: Bool[Array, "*tokens"] | None = None,
) -> Float[Array, ""]:
    """Feature loss between student and teacher features over the valid tokens, in float32.

    - `"cosine"`: the mean over valid tokens of `1 - cos(s, t)` (squared norms clipped
      at 1e-6),
    - `"l2"`: the mean over valid tokens of the mean over `dim` of `(s - t)^2`,
    - `"nmse"`: NVIDIA Puzzle's normalized MSE, a ratio of sums over the valid tokens,
      `sum |s - t|^2 / sum |t|^2`, i.e. `MSE(s, t) / MSE(0, t)`: tokens with a small
      teacher norm weigh little instead of blowing up.

    The objective applies it to each layer separately (all valid tokens of the batch at
    once) and averages over layers.

    **Arguments:**

    - `student`, `teacher`: features of the same shape, `dim` last (any leading token
      axes, e.g. `batch seq dim`).
    - `kind`: `"cosine"`, `"l2"` or `"nmse"`.
    - `mask`: optional `Bool` over the token axes; only `True` tokens count. Default:
      every token.

    **Example:**

    ```python
    s, t = jnp.ones((4, 8)), 2 * jnp.ones((4, 8))
    bd.feature_loss(s, t, "cosine")  # about 0: same direction
    bd.feature_loss(s, t, "nmse")    # 0.25 = sum |s - t|^2 / sum |t|^2
    ```
    """
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(s.shape[:-1], dtype=bool)
    if kind == "cosine":
        return masked_mean(optax.losses.cosine_distance(s, t, epsilon=_COSINE_EPS), mask)
    if kind == "l2":
        return masked_mean(jnp.mean(optax.losses.squared_error(s, t), axis=-1), mask)
    if kind == "nmse":
        weights = mask.astype(jnp.float32)
        error = jnp.sum(jnp.sum(optax.losses.squared_error(s, t), axis=-1) * weights)
        scale = jnp.sum(jnp.sum(jnp.square(t), axis=-1) * weights)
        return error / (scale + _NMSE_EPS)
    raise ValueError(f"feature_loss={kind!r} is invalid: must be one of {FEATURE_LOSSES}")


def masked_mean(values: Float[Array, "*shape"], mask: Bool[Array, "*shape"]) -> Float[Array, ""]:
    """Mean of `values` where `mask` is true (0 when nothing is valid)."""
    weights = mask.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_divergence(
    student_logits: Float[Array, "batch seq vocab"],
    teacher_logits: Float[Array, "batch seq vocab"],
    mask: BatchMask,
    temperature: float | Float[Array, ""] = 1.0,
) -> Float[Array, ""]:
    """`T^2 * KL(teacher_T || student_T)`, per token, averaged over valid tokens.

    **Example:**

    ```python
    logits = jax.random.normal(jax.random.key(0), (2, 8, 256))
    bd.kl_divergence(logits, logits, jnp.ones((2, 8), bool))  # 0.0
    ```
    """
    t = jnp.asarray(temperature, jnp.float32)
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    per_token = optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
    return jnp.square(t) * masked_mean(per_token, mask)


def next_token_pairs(mask: BatchMask, segment_ids: BatchSegments | None = None) -> Bool[Array, "batch seq-1"]:
    """Which `(t, t + 1)` pairs are next-token targets: both positions valid and, with
    `segment_ids`, in the same document (a document's last token does not predict the
    next document's first)."""
    pairs = mask[:, :-1] & mask[:, 1:]
    if segment_ids is not None:
        pairs = pairs & (segment_ids[:, :-1] == segment_ids[:, 1:])
    return pairs


def next_token_cross_entropy(
    logits: Float[Array, "batch seq vocab"],
    tokens: BatchTokens,
    mask: BatchMask,
    segment_ids: BatchSegments | None = None,
) -> Float[Array, ""]:
    """Cross-entropy of predicting `tokens[:, t + 1]` at position `t`, over valid pairs.

    A pair counts when both positions are valid (`mask`) and, given `segment_ids`,
    belong to the same document.

    **Example:**

    ```python
    logits = jax.vmap(model)(batch_tokens).logits
    ce = bd.next_token_cross_entropy(logits, batch_tokens, mask)
    ```
    """
    per_token = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    )
    return masked_mean(per_token, next_token_pairs(mask, segment_ids))


def chunked_logit_losses(
    student_head: Callable[[Array], Array],
    student_hidden: Float[Array, "batch seq dim"],
    tokens: BatchTokens,
    mask: BatchMask,
    segment_ids: BatchSegments | None = None,
    *,
    chunk: int,
    temperature: float | Float[Array, ""] = 1.0,
    teacher_head: Callable[[Array], Array] | None = None,
    teacher_hidden: Float[Array, "batch seq tdim"] | None = None,
    teacher_logits: Float[Array, "batch seq vocab"] | None = None,
    cached: TopKLogits | None = None,
    tail: bool = True,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`(KL, CE)` of a student against a teacher, computed `chunk` positions at a time:
    no `[batch, seq, vocab]` array of the student's (or, given `teacher_head` and
    `teacher_hidden`, the teacher's) logits exists at once, in the forward pass or the
    backward pass (each chunk's logits are recomputed for its gradient).

    The values are those of [`blockdistill.kl_divergence`][] (or, with `cached`, of
    [`blockdistill.cached_kl_divergence`][]) and
    [`blockdistill.next_token_cross_entropy`][] on the full logits. The teacher is one of
    `teacher_head` + `teacher_hidden` (its head applied per chunk), `teacher_logits`
    (sliced per chunk), `cached` top-k logits, or none (KL 0).

    **Example:**

    ```python
    out = jax.vmap(student)(batch_tokens)
    teacher_out = jax.vmap(teacher)(batch_tokens)
    kl, ce = bd.chunked_logit_losses(student.head, out.hidden, batch_tokens, mask, chunk=4,
                                     teacher_head=teacher.model.head, teacher_hidden=teacher_out.hidden)
    ```
    """
    if not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"chunk={chunk!r} is invalid: must be a positive integer")
    given = [teacher_hidden is not None, teacher_logits is not None, cached is not None]
    if sum(given) > 1 or (teacher_hidden is not None) != (teacher_head is not None):
        raise ValueError("give one teacher: teacher_head with teacher_hidden, teacher_logits, or cached")
    batch, seq = tokens.shape
    chunks = -(-seq // chunk)
    pad = chunks * chunk - seq
    t = jnp.asarray(temperature, jnp.float32)
    kl_weights = mask.astype(jnp.float32)
    # position p predicts tokens[p + 1]; the last position (and padding) predicts nothing
    next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch, 1), tokens.dtype)], axis=1)
    pairs = next_token_pairs(mask, segment_ids).astype(jnp.float32)
    ce_weights = jnp.concatenate([pairs, jnp.zeros((batch, 1), jnp.float32)], axis=1)

    def split(x):  # [batch, seq, ...] -> [chunks, batch, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, chunks, chunk, *x.shape[2:]), 1, 0)

    teacher_part = None
    if teacher_hidden is not None:
        teacher_part = split(teacher_hidden)
    elif teacher_logits is not None:
        teacher_part = split(teacher_logits)
    elif cached is not None:
        teacher_part = (split(cached.ids), split(cached.logprobs), split(cached.log_tail))
    xs = (split(student_hidden), split(next_tokens), split(kl_weights), split(ce_weights), teacher_part)

    @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of storing them all
    def body(carry, xs):
        hidden, targets, kl_w, ce_w, teacher_chunk = xs
        logits = jax.vmap(student_head)(hidden).astype(jnp.float32)
        kl_sum, ce_sum = carry
        if cached is not None:
            ids, logprobs, log_tail = teacher_chunk
            per_token = cached_kl_per_token(logits, TopKLogits(ids, logprobs, log_tail), t, tail=tail)
            kl_sum = kl_sum + jnp.sum(per_token * kl_w)
        elif teacher_chunk is not None:
            t_logits = jax.vmap(teacher_head)(teacher_chunk) if teacher_hidden is not None else teacher_chunk
            log_student = jax.nn.log_softmax(logits / t, axis=-1)
            log_teacher = jax.nn.log_softmax(t_logits.astype(jnp.float32) / t, axis=-1)
            per_token = optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
            kl_sum = kl_sum + jnp.sum(per_token * kl_w)
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (kl_sum, ce_sum + jnp.sum(ce * ce_w)), None

    zero = jnp.zeros((), jnp.float32)
    (kl_sum, ce_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    kl = jnp.square(t) * kl_sum / jnp.maximum(jnp.sum(kl_weights), 1.0)
    return kl, ce_sum / jnp.maximum(jnp.sum(ce_weights), 1.0)
