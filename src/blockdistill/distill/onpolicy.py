"""On-policy distillation (GKD, arXiv 2306.13649): a fraction of each batch's sequences are
continuations the current student samples from prompts of the corpus, so that the
student learns where its own generations take it, not only on the corpus's text.

[`OnPolicy`][blockdistill.OnPolicy] turns a batch into a mixed one before the step: the
first `round(fraction * batch)` rows keep their first `prompt_len` tokens and continue
them with the student's own samples (KV-cache sampling,
[`blockdistill.generate`][]) up to the row's length. The step then runs as usual on the
mixed batch, so the teacher's logits (and, with a blockwise term, its layer states) are
computed on the student's own tokens; on a sampled row only the positions that predict
sampled tokens count (the prompt's do not), so the divergence is the student's on its
own continuations. The sampler's key is `fold_in(key, step)`: a resumed run samples the
same continuations.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._types import Array, BatchMask, BatchSegments, BatchTokens, Bool, Float, Int
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from .generate import generate
from .losses import divergence_per_token


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """How many of a batch's sequences the student writes itself, and how it samples.

    **Arguments:**

    - `fraction`: `lambda`, the fraction of each batch's rows replaced by the student's
      continuations (GKD's student-data fraction), in `[0, 1]`.
    - `prompt_len`: how many of the row's first tokens are kept as the prompt; the student
      writes the rest of the row.
    - `temperature`, `top_k`, `top_p`: how the student samples (see
      [`blockdistill.generate`][]); GKD samples at temperature 1.
    - `start`: the first step that samples (e.g. a staged recipe's switch: blockwise first,
      then on-policy KD); before it the batches are the corpus's.

    **Example:**

    ```python
    policy = bd.OnPolicy(fraction=0.5, prompt_len=8)
    tokens, mask, segments = policy.mix(student, batch_tokens, mask, None, step=0, key=jax.random.key(0))
    tokens.shape  # (4, 16): rows 0 and 1 are the student's continuations of their first 8 tokens
    ```
    """

    fraction: float
    prompt_len: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    start: int = 0

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"OnPolicy.fraction={self.fraction!r} is invalid: must be in [0, 1]")
        if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise ValueError(f"OnPolicy.prompt_len={self.prompt_len!r} is invalid: must be a positive integer")
        if not self.temperature >= 0:
            raise ValueError(f"OnPolicy.temperature={self.temperature!r} is invalid: must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"OnPolicy.top_k={self.top_k!r} is invalid: must be positive")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"OnPolicy.top_p={self.top_p!r} is invalid: must be in (0, 1]")
        if self.start < 0:
            raise ValueError(f"OnPolicy.start={self.start!r} is invalid: must be >= 0")

    def rows(self, batch_size: int) -> int:
        """How many rows of a batch of `batch_size` the student writes."""
        return int(round(self.fraction * batch_size))

    def active(self, step: int) -> bool:
        """Whether step `step` (0-based) samples."""
        return self.fraction > 0 and step >= self.start

    def check(self, seq_len: int, batch_size: int) -> None:
        """A `ValueError` naming the values when the rows cannot hold a prompt and a
        continuation."""
        if not 0 < self.prompt_len < seq_len:
            raise ValueError(f"OnPolicy.prompt_len={self.prompt_len} is invalid for rows of {seq_len} tokens: "
                             "the student must write at least one token after the prompt")
        if self.fraction > 0 and self.rows(batch_size) == 0:
            raise ValueError(f"OnPolicy.fraction={self.fraction} of a batch of {batch_size} rows is no row: "
                             f"raise it to at least {1 / batch_size:.3g}")

    def mix(
        self,
        student: Transformer,
        tokens: BatchTokens,
        mask: BatchMask,
        segment_ids: BatchSegments | None,
        *,
        step: int,
        key: PRNGKeyArray,
    ) -> tuple[BatchTokens, BatchMask, BatchSegments]:
        """The batch with its first `rows(batch)` rows written by `student`: each keeps its
        first `prompt_len` tokens and continues them with the student's samples (key
        `fold_in(key, step)`); on those rows the mask keeps only the positions that
        predict a sampled token, and the continuation belongs to the prompt's last
        document."""
        if segment_ids is None:
            segment_ids = jnp.where(mask, 1, 0).astype(jnp.int32)
        self.check(tokens.shape[1], tokens.shape[0])
        return _mix(student, tokens, mask, segment_ids, jax.random.fold_in(key, step), self.rows(tokens.shape[0]),
                    self.prompt_len, self.temperature, self.top_k, self.top_p)


@eqx.filter_jit
def _mix(student, tokens, mask, segment_ids, key, rows: int, prompt_len: int, temperature: float,
         top_k: int | None, top_p: float | None):
    seq_len = tokens.shape[1]
    prompts = tokens[:rows, :prompt_len]
    written = generate(student, prompts, seq_len - prompt_len, key=key, temperature=temperature, top_k=top_k,
                       top_p=top_p).tokens
    sampled_tokens = jnp.concatenate([prompts, written], axis=1).astype(tokens.dtype)
    # position t predicts token t + 1: the predictions of sampled tokens are t >= prompt_len - 1
    predicts_sample: Bool[Array, " seq"] = jnp.arange(seq_len) >= prompt_len - 1
    sampled_mask = jnp.broadcast_to(predicts_sample, (rows, seq_len))
    last = segment_ids[:rows, prompt_len - 1 : prompt_len]
    sampled_segments = jnp.where(jnp.arange(seq_len) < prompt_len, segment_ids[:rows], jnp.maximum(last, 1))
    return (jnp.concatenate([sampled_tokens, tokens[rows:]]), jnp.concatenate([sampled_mask, mask[rows:]]),
            jnp.concatenate([sampled_segments.astype(segment_ids.dtype), segment_ids[rows:]]))


class SampleScores(eqx.Module):
    """What [`blockdistill.score_samples`][] returns: per-token means over the student's
    own continuations (every sampled token of every row), in nats, float32 scalars.

    - `reverse_kl`: `KL(student || teacher)` of the next-token distributions at each
      position that predicts a sampled token: the quantity on-policy distillation with
      `divergence="reverse_kl"` minimises, and the per-token gap that compounds when the
      student writes on its own.
    - `forward_kl`: `KL(teacher || student)` at the same positions (what KD minimises, but
      on the student's text instead of the corpus's).
    - `teacher_nll`: the teacher's negative log-likelihood of the sampled tokens: how
      likely the teacher finds what the student wrote (lower is better).
    - `student_nll`: the student's own negative log-likelihood of them (a sample estimate
      of its entropy at the sampling temperature 1).
    - `tokens`: how many sampled tokens the means are over.

    **Example:**

    ```python
    scores = bd.score_samples(student, teacher, batch_tokens[:2, :8], 8, key=jax.random.key(0))
    int(scores.tokens), float(scores.reverse_kl) >= 0  # 16, True
    ```
    """

    reverse_kl: Float[Array, ""]
    forward_kl: Float[Array, ""]
    teacher_nll: Float[Array, ""]
    student_nll: Float[Array, ""]
    tokens: Int[Array, ""]


def score_samples(
    student: Transformer,
    teacher: Transformer | Teacher,
    prompts: BatchTokens,
    max_new_tokens: int,
    *,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> SampleScores:
    """The teacher's judgement of the student's own continuations: the evaluation that
    matches on-policy distillation.

    A held-out loss on corpus text measures the student where off-policy KD trains it.
    Once it writes, its own tokens take it elsewhere (exposure bias); this scores it
    there. The student continues each prompt by `max_new_tokens` sampled tokens
    ([`blockdistill.generate`][] with `key`, `temperature`, `top_k`, `top_p`); then the
    teacher and the student each run once over prompt and continuation, and at every
    position that predicts a sampled token the two next-token distributions are compared
    (full vocabulary, float32). Rows run one at a time, so memory holds one row's logits.

    **Arguments:**

    - `student`, `teacher`: [`blockdistill.Transformer`][]s with the same vocabulary (the
      teacher may also be a [`blockdistill.Teacher`][]).
    - `prompts`: `[batch, seq]` token ids (e.g. the first tokens of held-out rows).
    - `max_new_tokens`: tokens the student writes after each prompt.
    - `key`: the sampling key (the same key, the same continuations).
    - `temperature`, `top_k`, `top_p`: how the student samples (default: temperature 1,
      the distribution it would be distilled on).

    **Returns:** a [`blockdistill.SampleScores`][].

    **Example:**

    ```python
    scores = bd.score_samples(student, teacher, batch_tokens[:, :8], 8, key=jax.random.key(0))
    float(scores.reverse_kl), float(scores.teacher_nll), int(scores.tokens)  # ..., ..., 32
    ```
    """
    if isinstance(teacher, Teacher):
        teacher = teacher.model
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"score_samples: the student's vocab_size={student.config.vocab_size} differs from the "
                         f"teacher's vocab_size={teacher.config.vocab_size}")
    needed = prompts.shape[1] + max_new_tokens
    if needed > teacher.config.max_seq_len:
        raise ValueError(f"score_samples: max_new_tokens={max_new_tokens} after prompts of {prompts.shape[1]} tokens "
                         f"exceeds the teacher's max_seq_len={teacher.config.max_seq_len}")
    written = generate(student, prompts, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                       top_p=top_p).tokens
    sums = _sample_sums(student, teacher, jnp.concatenate([prompts, written], axis=1).astype(jnp.int32),
                        prompts.shape[1])
    count = written.size
    return SampleScores(*(s / count for s in sums), jnp.asarray(count, jnp.int32))


@eqx.filter_jit
def _sample_sums(student, teacher, rows, prompt_len: int):
    def row(tokens):
        predicts = slice(prompt_len - 1, tokens.shape[0] - 1)
        log_s = jax.nn.log_softmax(student(tokens).logits.astype(jnp.float32)[predicts], axis=-1)
        log_t = jax.nn.log_softmax(teacher(tokens).logits.astype(jnp.float32)[predicts], axis=-1)
        sampled = tokens[prompt_len:, None]
        return jnp.stack([
            divergence_per_token(log_s, log_t, "reverse_kl").sum(),
            divergence_per_token(log_s, log_t, "kl").sum(),
            -jnp.take_along_axis(log_t, sampled, axis=-1).sum(),
            -jnp.take_along_axis(log_s, sampled, axis=-1).sum(),
        ])

    return tuple(jnp.sum(jax.lax.map(row, rows), axis=0))
