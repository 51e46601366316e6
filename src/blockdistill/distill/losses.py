"""The losses of distillation: the per-token feature losses between student and teacher
states (cosine, l2, Puzzle's normalized MSE), the temperature-scaled divergence of the
logits (forward KL, reverse KL, generalized Jensen-Shannon, skew KL, total variation),
next-token cross-entropy on labels, and both logit losses computed chunk by chunk over the
sequence so that no `[batch, seq, vocab]` array is ever held at once."""

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Bool, Float
from .sparse import TopKLogits, cached_kl_divergence, cached_kl_per_token

FeatureLoss = Literal["cosine", "l2", "nmse"]
FEATURE_LOSSES = ("cosine", "l2", "nmse")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "tvd")

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


def logit_divergence(
    student_logits: Float[Array, "batch seq vocab"],
    teacher_logits: Float[Array, "batch seq vocab"] | TopKLogits,
    mask: BatchMask,
    temperature: float | Float[Array, ""] = 1.0,
    kind: str = "kl",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    tail: bool = True,
) -> Float[Array, ""]:
    """`T^2 * D(teacher_T, student_T)`, per token, averaged over valid tokens, in float32:
    the logit term of distillation, with `D` one of a family of divergences between the
    teacher's distribution `p = softmax(teacher_logits / T)` and the student's
    `q = softmax(student_logits / T)` (from log-softmaxes; an id whose probability is 0
    in float32 adds nothing, with finite gradients):

    - `"kl"`: the forward KL, `KL(p || q) = sum p (log p - log q)` (mass-covering; the
      default, [`blockdistill.kl_divergence`][]),
    - `"reverse_kl"`: `KL(q || p)` (mode-seeking),
    - `"jsd"`: the generalized Jensen-Shannon divergence of GKD (arXiv 2306.13649, Eq. 1),
      with `m = beta p + (1 - beta) q`:
      `beta KL(p || m) + (1 - beta) KL(q || m)`. As in TRL's `generalized_jsd_loss`,
      `beta = 0` is the forward KL and `beta = 1` the reverse KL, taken as such (in
      between, the formula is not rescaled: it tends to 0 at both ends, and
      `JSD_beta / beta` tends to the forward KL as `beta -> 0`,
      `JSD_beta / (1 - beta)` to the reverse KL as `beta -> 1`),
    - `"skew_kl"`: DistiLLM's skew KL (arXiv 2402.03898), with `alpha = skew_alpha`:
      `KL(p || alpha p + (1 - alpha) q)` (`alpha = 0` is the forward KL, `alpha = 1`
      gives 0),
    - `"tvd"`: the total variation distance, `sum |p - q| / 2`, in [0, 1].

    Every one is multiplied by `T^2`, the KL's convention (and DistillKit's for all of
    its losses), so that a temperature changes the size of the gradients little.

    **Arguments:**

    - `student_logits`: `[batch, seq, vocab]`, any float dtype (computed in float32).
    - `teacher_logits`: the teacher's logits of the same shape, or its cached top-k
      ([`blockdistill.TopKLogits`][], log-probabilities at `temperature`). A top-k cache
      serves `"kl"` (see [`blockdistill.cached_kl_divergence`][], with `tail`); the other
      divergences need the teacher's probability of every id, so they take a cache only
      when `k` is the vocabulary (a `ValueError` that names the divergence otherwise).
    - `mask`: `[batch, seq]` bool, the positions that count.
    - `temperature`: `T`, a float or a scalar array.
    - `kind`: `"kl"`, `"reverse_kl"`, `"jsd"`, `"skew_kl"` or `"tvd"`.
    - `jsd_beta`: `beta` of `"jsd"`, in [0, 1].
    - `skew_alpha`: `alpha` of `"skew_kl"`, in [0, 1].
    - `tail`: with a cache and `"kl"`, the tail bucket (`True`) or the renormalised
      top-k (`False`).

    **Returns:** a float32 scalar.

    **Example:**

    ```python
    student = jax.random.normal(jax.random.key(0), (2, 8, 256))
    teacher = jax.random.normal(jax.random.key(1), (2, 8, 256))
    mask = jnp.ones((2, 8), bool)
    bd.logit_divergence(student, student, mask, kind="jsd")          # 0.0
    bd.logit_divergence(student, teacher, mask, 2.0, kind="tvd")     # T^2 * mean TVD at T = 2
    ```
    """
    if isinstance(teacher_logits, TopKLogits) and kind == "kl":
        return cached_kl_divergence(student_logits, teacher_logits, mask, temperature, tail=tail)
    t = jnp.asarray(temperature, jnp.float32)
    if isinstance(teacher_logits, TopKLogits):
        if teacher_logits.ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher ids of shape {tuple(teacher_logits.ids.shape)} do not match student logits of shape "
                f"{tuple(student_logits.shape)}"
            )
        per_token = cached_divergence_per_token(
            student_logits, teacher_logits, t, kind, jsd_beta=jsd_beta, skew_alpha=skew_alpha, tail=tail
        )
        return jnp.square(t) * masked_mean(per_token, mask)
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    per_token = divergence_per_token(log_student, log_teacher, kind, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    return jnp.square(t) * masked_mean(per_token, mask)


def kl_divergence(
    student_logits: Float[Array, "batch seq vocab"],
    teacher_logits: Float[Array, "batch seq vocab"],
    mask: BatchMask,
    temperature: float | Float[Array, ""] = 1.0,
) -> Float[Array, ""]:
    """`T^2 * KL(teacher_T || student_T)`, per token, averaged over valid tokens: the
    default of [`blockdistill.logit_divergence`][].

    **Example:**

    ```python
    logits = jax.random.normal(jax.random.key(0), (2, 8, 256))
    bd.kl_divergence(logits, logits, jnp.ones((2, 8), bool))  # 0.0
    ```
    """
    return logit_divergence(student_logits, teacher_logits, mask, temperature, "kl")


def check_divergence(kind: str, jsd_beta: float = 0.5, skew_alpha: float = 0.1, *, owner: str = "") -> None:
    """Raise a `ValueError` that names the field and the value when `kind`, `jsd_beta`
    or `skew_alpha` is not a valid divergence setting (`owner`, e.g.
    `"DistillationObjective."`, prefixes the field's name)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"{owner}divergence={kind!r} is invalid: must be one of {DIVERGENCES}")
    for name, value in (("jsd_beta", jsd_beta), ("skew_alpha", skew_alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}{name}={value!r} is invalid: must be a float in [0, 1]")


def cached_divergence_refusal(kind: str, k: int, vocab: int) -> str | None:
    """Why a teacher cache of the top `k` of `vocab` ids cannot serve the divergence
    `kind`, or `None` when it can: a top-k cache serves the forward KL at any `k` (within
    the bound of [`blockdistill.cached_kl_divergence`][]) and every divergence at
    `k = vocab`; the others need the teacher's probability of every id the student
    gives mass to."""
    if kind == "kl" or k == vocab:
        return None
    return (
        f"divergence={kind!r} cannot be computed from cached teacher logits that keep the top {k} of "
        f"{vocab} ids: it needs the teacher's probability of every id, which a top-k cache does not hold "
        f"(only divergence='kl' is served from a top-k cache); use a cache made with top_k={vocab} "
        "(the vocabulary), or the teacher itself"
    )


def divergence_per_token(
    log_student: Float[Array, "*tokens vocab"],
    log_teacher: Float[Array, "*tokens vocab"],
    kind: str = "kl",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Float[Array, "*tokens"]:
    """The divergence `kind` of each position between a teacher's and a student's
    distributions given as float32 log-probabilities (without the `T^2` factor): the
    per-token term of [`blockdistill.logit_divergence`][]."""
    if kind == "kl":  # optax's formula, as before the family: its numbers stay bit-identical
        return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
    if kind == "reverse_kl":
        return _kl_terms(log_student, log_teacher)
    if kind == "jsd":
        check_divergence(kind, jsd_beta=jsd_beta)
        if jsd_beta == 0:  # the two ends are the KLs themselves (GKD, TRL)
            return _kl_terms(log_teacher, log_student)
        if jsd_beta == 1:
            return _kl_terms(log_student, log_teacher)
        log_mixture = _log_mixture(log_teacher, log_student, jsd_beta)
        return jsd_beta * _kl_terms(log_teacher, log_mixture) + (1.0 - jsd_beta) * _kl_terms(log_student, log_mixture)
    if kind == "skew_kl":
        check_divergence(kind, skew_alpha=skew_alpha)
        return _kl_terms(log_teacher, _log_mixture(log_teacher, log_student, skew_alpha))
    if kind == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_teacher) - jnp.exp(log_student)), axis=-1)
    raise ValueError(f"divergence={kind!r} is invalid: must be one of {DIVERGENCES}")


def cached_divergence_per_token(
    student_logits: Float[Array, "*tokens vocab"],
    teacher: TopKLogits,
    temperature: Float[Array, ""],
    kind: str = "kl",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    tail: bool = True,
) -> Float[Array, "*tokens"]:
    """[`blockdistill.distill.losses.divergence_per_token`][] against a cached teacher:
    the forward KL of [`blockdistill.cached_kl_divergence`][] at any `k`; any other
    divergence only when the cache holds the whole vocabulary (a `ValueError` naming the
    divergence otherwise)."""
    if kind == "kl":
        return cached_kl_per_token(student_logits, teacher, temperature, tail=tail)
    refusal = cached_divergence_refusal(kind, teacher.k, student_logits.shape[-1])
    if refusal is not None:
        raise ValueError(refusal)
    # k = vocabulary: the ids are a permutation of the vocabulary, so the divergence can
    # be taken in the cache's order, with the student's log-probabilities gathered to it
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_student = jnp.take_along_axis(log_student, teacher.ids, axis=-1)
    log_teacher = teacher.logprobs.astype(jnp.float32)
    return divergence_per_token(log_student, log_teacher, kind, jsd_beta=jsd_beta, skew_alpha=skew_alpha)


def _kl_terms(log_p: Float[Array, "*tokens vocab"], log_q: Float[Array, "*tokens vocab"]) -> Float[Array, "*tokens"]:
    """`KL(p || q) = sum p (log p - log q)` over the last axis, where an id with `p = 0`
    in float32 (a `-inf` logit, or one so low that its probability underflows) adds 0
    and no gradient, even where `q = 0` too, so that neither is NaN."""
    present = jnp.exp(log_p) > 0
    safe_p = jnp.where(present, log_p, 0.0)
    safe_q = jnp.where(present, log_q, 0.0)
    return jnp.sum(jnp.where(present, jnp.exp(safe_p) * (safe_p - safe_q), 0.0), axis=-1)


def _log_mixture(
    log_p: Float[Array, "*tokens vocab"], log_q: Float[Array, "*tokens vocab"], weight: float
) -> Float[Array, "*tokens vocab"]:
    """`log(weight p + (1 - weight) q)` from log-probabilities (`-inf` where both are 0,
    with finite gradients)."""
    if weight == 0:
        return log_q
    if weight == 1:
        return log_p
    both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    safe_p = jnp.where(both_zero, 0.0, log_p)
    safe_q = jnp.where(both_zero, 0.0, log_q)
    mixture = jnp.logaddexp(math.log(weight) + safe_p, math.log1p(-weight) + safe_q)
    return jnp.where(both_zero, -jnp.inf, mixture)


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
    divergence: str = "kl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`(D, CE)` of a student against a teacher, computed `chunk` positions at a time:
    no `[batch, seq, vocab]` array of the student's (or, given `teacher_head` and
    `teacher_hidden`, the teacher's) logits exists at once, in the forward pass or the
    backward pass (each chunk's logits are recomputed for its gradient).

    The values are those of [`blockdistill.logit_divergence`][] (the divergence
    `divergence`, with `jsd_beta`, `skew_alpha`; by default the KL of
    [`blockdistill.kl_divergence`][], or, with `cached`, of
    [`blockdistill.cached_kl_divergence`][]) and
    [`blockdistill.next_token_cross_entropy`][] on the full logits. The teacher is one of
    `teacher_head` + `teacher_hidden` (its head applied per chunk), `teacher_logits`
    (sliced per chunk), `cached` top-k logits, or none (divergence 0).

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
    check_divergence(divergence, jsd_beta, skew_alpha)
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
            per_token = cached_divergence_per_token(
                logits, TopKLogits(ids, logprobs, log_tail), t, divergence,
                jsd_beta=jsd_beta, skew_alpha=skew_alpha, tail=tail,
            )
            kl_sum = kl_sum + jnp.sum(per_token * kl_w)
        elif teacher_chunk is not None:
            t_logits = jax.vmap(teacher_head)(teacher_chunk) if teacher_hidden is not None else teacher_chunk
            log_student = jax.nn.log_softmax(logits / t, axis=-1)
            log_teacher = jax.nn.log_softmax(t_logits.astype(jnp.float32) / t, axis=-1)
            per_token = divergence_per_token(
                log_student, log_teacher, divergence, jsd_beta=jsd_beta, skew_alpha=skew_alpha
            )
            kl_sum = kl_sum + jnp.sum(per_token * kl_w)
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (kl_sum, ce_sum + jnp.sum(ce * ce_w)), None

    zero = jnp.zeros((), jnp.float32)
    (kl_sum, ce_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    kl = jnp.square(t) * kl_sum / jnp.maximum(jnp.sum(kl_weights), 1.0)
    return kl, ce_sum / jnp.maximum(jnp.sum(ce_weights), 1.0)
