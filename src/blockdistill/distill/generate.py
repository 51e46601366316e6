"""Generation with a KV cache: greedy decoding and sampling (temperature, top-k, top-p)
from a [`Transformer`][blockdistill.Transformer], for one prompt or a batch of
right-padded prompts of their own lengths, stopping rows at an end-of-sequence id.

The prompt runs once ([`Transformer.prefill`][blockdistill.Transformer.prefill]: every
layer's keys and values of the prompt go into the cache), then each new token is one
[`Transformer.decode_step`][blockdistill.Transformer.decode_step] inside a
`jax.lax.while_loop`: the layers run on that one position against the cached keys and
values of the earlier ones, and write their own into the cache.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._types import Array, Float, Int
from ..nn.model import Transformer, in_compute_dtype


class Generation(eqx.Module):
    """What [`blockdistill.generate`][] returns.

    - `tokens`: the new token ids, `Int[Array, "new"]` for one prompt or
      `Int[Array, "batch new"]` for a batch; after a row's end-of-sequence token, the row
      holds `eos_id`.
    - `lengths`: how many new tokens each row produced (its end-of-sequence token
      included): `max_new_tokens` for a row that did not stop.
    - `logits`: with `return_logits=True`, the float32 logits each new token was chosen
      from (before temperature, top-k or top-p), `[*batch, new, vocab]`; meaningful up to
      `lengths`. `None` otherwise.

    **Example:**

    ```python
    out = bd.generate(model, tokens[:4], 6, return_logits=True)
    out.tokens.shape, out.lengths, out.logits.shape  # (6,), 6, (6, 256)
    ```
    """

    tokens: Int[Array, "*batch new"]
    lengths: Int[Array, "*batch"]
    logits: Float[Array, "*batch new vocab"] | None = None


def sample_tokens(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Array, " batch"]:
    """One token per row from `logits`: the most likely at `temperature=0` (greedy), else
    a draw from `softmax(logits / temperature)` restricted to the `top_k` most likely
    tokens and then to the smallest set of most likely tokens whose probability reaches
    `top_p` (nucleus sampling; the most likely token is always kept). The rows are drawn
    independently with one `key`."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p is not None and top_p < 1.0:
        ranked = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # the mass of the tokens ranked higher
        cutoff = jnp.min(jnp.where(above < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _check(model, prompt, max_new_tokens, key, temperature, top_k, top_p, eos_id, prompt_lengths) -> None:
    def fail(name, value, why):
        raise ValueError(f"generate: {name}={value!r} is invalid: {why}")

    if not isinstance(model, Transformer):
        raise ValueError(f"generate needs a blockdistill Transformer, got a {type(model).__name__}")
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        fail("prompt", tuple(prompt.shape), "must be [seq] or [batch, seq] token ids with seq > 0")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        fail("max_new_tokens", max_new_tokens, "must be a positive integer")
    needed = prompt.shape[-1] + max_new_tokens
    if needed > model.config.max_seq_len:
        fail("max_new_tokens", max_new_tokens,
             f"the prompt's {prompt.shape[-1]} positions and the new tokens exceed max_seq_len="
             f"{model.config.max_seq_len}")
    if not temperature >= 0.0:
        fail("temperature", temperature, "must be >= 0 (0 is greedy)")
    if temperature > 0.0 and key is None:
        fail("key", key, f"sampling at temperature={temperature} needs a jax.random key")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        fail("top_k", top_k, "must be a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        fail("top_p", top_p, "must be in (0, 1] or None")
    if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:
        fail("eos_id", eos_id, f"must be a token id below vocab_size={model.config.vocab_size}")
    if prompt_lengths is None:
        return
    if prompt.ndim == 1:
        fail("prompt_lengths", prompt_lengths, "is for a batch of prompts ([batch, seq]); one prompt is its own length")
    if prompt_lengths.shape != prompt.shape[:1]:
        fail("prompt_lengths", tuple(prompt_lengths.shape), f"must have one length per row: ({prompt.shape[0]},)")
    try:
        values = np.asarray(prompt_lengths)
    except jax.errors.TracerArrayConversionError:  # inside a caller's jit: not checkable here
        return
    if values.min() < 1 or values.max() > prompt.shape[1]:
        fail("prompt_lengths", values.tolist(), f"each must be in [1, {prompt.shape[1]}]")


def generate(
    model: Transformer,
    prompt: Int[Array, " seq"] | Int[Array, "batch seq"],
    max_new_tokens: int,
    *,
    key: PRNGKeyArray | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    prompt_lengths: Int[Array, " batch"] | None = None,
    return_logits: bool = False,
) -> Generation:
    """Continue a prompt (or a batch of prompts) with a KV cache.

    The prompt runs once through the model (prefill), filling a cache of every layer's
    keys and values; then each new token is one step of the layers on a single position
    against that cache, inside one compiled `jax.lax.while_loop` that stops when
    `max_new_tokens` are made or every row has produced `eos_id`. The logits of each step
    equal those of a full forward pass on the generated sequence (tested to 1e-5), for
    uniform and heterogeneous models alike, and greedy decoding of an imported
    checkpoint equals `transformers`' `generate(do_sample=False)`.

    **Arguments:**

    - `model`: a [`blockdistill.Transformer`][] (its parameters may be sharded on a mesh,
      [`blockdistill.shard_model`][]; so may a batch of prompts).
    - `prompt`: token ids, `[seq]` or `[batch, seq]`. A batch holds prompts of different
      lengths right-padded to `seq` (the padding's ids do not matter); give their
      lengths in `prompt_lengths`.
    - `max_new_tokens`: how many tokens to generate (static: one compilation per value);
      `seq + max_new_tokens` must not exceed the model's `max_seq_len`.
    - `key`: a `jax.random` key, needed when `temperature > 0`; the same key gives the
      same tokens.
    - `temperature`: `0` (default) is greedy decoding (the most likely token, whatever
      `top_k` and `top_p` say); above 0 tokens are drawn from `softmax(logits / T)`.
    - `top_k`: keep only the `k` most likely tokens when sampling.
    - `top_p`: then keep only the smallest set of most likely tokens whose probability
      reaches `top_p` (nucleus sampling).
    - `eos_id`: the end-of-sequence id: a row stops after producing it, and its later
      tokens are `eos_id`.
    - `prompt_lengths`: `Int[Array, "batch"]`, each row's prompt length (default: `seq`
      for every row); each row continues from its own end.
    - `return_logits`: also return the logits of every step (`[*batch, new, vocab]`).

    **Returns:** a [`blockdistill.Generation`][]: the new `tokens` (`[max_new_tokens]` or
    `[batch, max_new_tokens]`), the `lengths` each row produced and, if asked, `logits`.

    **Example:**

    ```python
    tokenizer = bd.ByteTokenizer()
    prompt = jnp.asarray(tokenizer.encode("def add(a, b):"))
    greedy = bd.generate(model, prompt, 8)
    print(tokenizer.decode(greedy.tokens))

    # a batch of two prompts of different lengths, sampled, stopping at newlines
    batch = jnp.stack([prompt, jnp.pad(prompt[:6], (0, prompt.shape[0] - 6))])
    out = bd.generate(model, batch, 8, key=jax.random.key(0), temperature=0.8, top_p=0.9,
                      eos_id=10, prompt_lengths=jnp.array([prompt.shape[0], 6]))
    out.tokens.shape, out.lengths  # (2, 8), the new tokens of each row up to its newline
    ```
    """
    _check(model, prompt, max_new_tokens, key, temperature, top_k, top_p, eos_id, prompt_lengths)
    single = prompt.ndim == 1
    prompts = prompt[None] if single else prompt
    if prompt_lengths is None:
        prompt_lengths = jnp.full(prompts.shape[:1], prompts.shape[1], jnp.int32)
    out = _generate(
        model, prompts.astype(jnp.int32), prompt_lengths.astype(jnp.int32), key,
        max_new_tokens, float(temperature), top_k, None if top_p is None else float(top_p), eos_id, return_logits,
    )
    if single:
        out = jax.tree.map(lambda x: x[0], out)
    return out


@eqx.filter_jit
def _generate(
    model: Transformer,
    prompts: Int[Array, "batch seq"],
    prompt_lengths: Int[Array, " batch"],
    key: PRNGKeyArray | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    return_logits: bool,
) -> Generation:
    model = in_compute_dtype(model)  # once, not in every step
    batch, seq = prompts.shape
    vocab = model.config.vocab_size
    # the cache holds the prompt and every new token but the last (which is never fed)
    hidden, cache = jax.vmap(lambda row: model.prefill(row, seq + max_new_tokens - 1), out_axes=(0, 1))(prompts)
    # the cache is [layers, batch, max_len, kv_heads, head_dim]: batch after the scanned layers axis
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)  # [batch, 1, dim]
    first_logits = jax.vmap(model.head)(last)[:, 0]
    keys = None if temperature == 0.0 else jax.random.split(key, max_new_tokens)

    def choose(logits, index, done):
        step_key = None if keys is None else keys[index]
        token = sample_tokens(logits, step_key, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_id is None:
            return token, done
        token = jnp.where(done, eos_id, token)
        return token, done | (token == eos_id)

    fill = 0 if eos_id is None else eos_id
    tokens = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    all_logits = jnp.zeros((batch, max_new_tokens, vocab), jnp.float32) if return_logits else None
    token, done = choose(first_logits, 0, jnp.zeros(batch, bool))
    tokens = tokens.at[:, 0].set(token)
    if return_logits:
        all_logits = all_logits.at[:, 0].set(first_logits)
    decode = jax.vmap(model.decode_step, in_axes=(0, 1, 0), out_axes=(0, 1))

    def cond(state):
        index, _, _, done, _, _ = state
        return (index < max_new_tokens) & ~jnp.all(done)

    def body(state):
        index, tokens, all_logits, done, token, cache = state
        # feed token `index - 1`, at its position after each row's own prompt
        logits, cache = decode(token, cache, prompt_lengths + index - 1)
        token, done = choose(logits, index, done)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
        if all_logits is not None:
            all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None, :], (0, index, 0))
        return index + 1, tokens, all_logits, done, token, cache

    state = (jnp.asarray(1, jnp.int32), tokens, all_logits, done, token, cache)
    _, tokens, all_logits, _, _, _ = jax.lax.while_loop(cond, body, state)
    if eos_id is None:
        lengths = jnp.full(batch, max_new_tokens, jnp.int32)
    else:
        is_eos = tokens == eos_id
        first = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
        lengths = jnp.where(jnp.any(is_eos, axis=1), first + 1, max_new_tokens).astype(jnp.int32)
    return Generation(tokens=tokens, lengths=lengths, logits=all_logits)

