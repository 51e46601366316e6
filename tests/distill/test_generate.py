"""Generation with a KV cache: its logits equal a full forward pass, greedy decoding equals
`transformers`', the sampler follows its distribution, EOS stops a row, and it runs on a mesh."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from blockdistill.distill.generate import sample_tokens

BASE = bd.TransformerConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32
)
#: a heterogeneous stack with every kind of layer, and one in which no layer has attention
MIXED = (
    bd.BlockShape(48, 2),
    bd.BlockShape(16, 1),  # one KV head for all four query heads
    bd.BlockShape(32, 0),  # MLP only
    bd.BlockShape(0, 2),  # attention only
    bd.BlockShape(0, 0, linear=True),
    bd.BlockShape(0, 0),  # identity
)
NO_ATTENTION = (bd.BlockShape(32, 0), bd.BlockShape(0, 0, linear=True))
CONFIGS = {
    "uniform": BASE,
    "hetero": BASE.replace(n_layers=len(MIXED), layer_shapes=MIXED),
    "no-attention": BASE.replace(n_layers=len(NO_ATTENTION), layer_shapes=NO_ATTENTION),
}
PROMPT_LEN, NEW = 7, 6
LENGTHS = (7, 2, 5)  # right-padded prompts of their own lengths


@functools.cache
def random_model(config, seed=0):
    """A model with every own weight random and large enough that errors show (norms
    too; a heterogeneous model stores only its layers' own weights)."""
    model = bd.Transformer(config, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + 0.15 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def prompts_of(config, seed=3):
    tokens = jax.random.randint(jax.random.key(seed), (len(LENGTHS), PROMPT_LEN), 0, config.vocab_size)
    return tokens, jnp.asarray(LENGTHS, jnp.int32)


@pytest.mark.parametrize(
    "kind, scan_layers",
    [("uniform", True), ("uniform", False), ("hetero", True), ("hetero", False), ("no-attention", True)],
)
def test_logits_equal_a_full_forward_pass(kind, scan_layers):
    config = CONFIGS[kind].replace(scan_layers=scan_layers)
    model = random_model(config)
    prompts, lengths = prompts_of(config)
    out = bd.generate(model, prompts, NEW, prompt_lengths=lengths, return_logits=True)
    assert out.tokens.shape == (len(LENGTHS), NEW) and out.logits.shape == (len(LENGTHS), NEW, config.vocab_size)
    np.testing.assert_array_equal(out.lengths, NEW)
    # each row's prompt and continuation, right-padded to one length: the padding comes
    # after every position compared, so a causal forward pass does not see it
    sequences = np.zeros((len(LENGTHS), PROMPT_LEN + NEW), np.int32)
    for row, length in enumerate(LENGTHS):
        sequences[row, : length + NEW] = np.concatenate([prompts[row, :length], out.tokens[row]])
    full = jax.vmap(model)(jnp.asarray(sequences)).logits
    for row, length in enumerate(LENGTHS):
        expected = full[row, length - 1 : length - 1 + NEW]
        np.testing.assert_allclose(out.logits[row], expected, atol=1e-5, rtol=0)
        # greedy: each token is the most likely one after the sequence before it
        np.testing.assert_array_equal(out.tokens[row], np.argmax(expected, axis=-1))


def test_prefill_and_decode_step_equal_the_forward_pass():
    model = random_model(CONFIGS["hetero"])
    tokens = jax.random.randint(jax.random.key(0), (12,), 0, BASE.vocab_size)
    full = model(tokens).logits
    hidden, cache = model.prefill(tokens[:5], max_len=12)
    # one cache per segment of equal layers, at its own KV heads; none without attention
    shapes = [None if c is None else c.k.shape for c in cache]
    assert shapes == [(1, 12, 2, BASE.head_dim), (1, 12, 1, BASE.head_dim), None, (1, 12, 2, BASE.head_dim), None, None]
    np.testing.assert_allclose(model.head(hidden), full[:5], atol=1e-5, rtol=0)
    for k in jax.tree.leaves(cache):
        np.testing.assert_array_equal(k[:, 5:], 0.0)
    for position in range(5, 12):
        logits, cache = model.decode_step(tokens[position], cache, jnp.asarray(position))
        np.testing.assert_allclose(logits, full[position], atol=1e-5, rtol=0)
    # the cache now holds what a prefill of the whole sequence computes
    _, whole = model.prefill(tokens, max_len=12)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_one_prompt_equals_its_row_of_a_batch():
    model = random_model(BASE)
    prompts, lengths = prompts_of(BASE)
    batch = bd.generate(model, prompts, NEW, prompt_lengths=lengths)
    row = 1
    alone = bd.generate(model, prompts[row, : LENGTHS[row]], NEW)
    assert alone.tokens.shape == (NEW,) and int(alone.lengths) == NEW
    np.testing.assert_array_equal(alone.tokens, batch.tokens[row])


# ----------------------------------------------------------------------------- sampling


def test_sampling_options_reduce_to_greedy_and_are_reproducible():
    model = random_model(BASE)
    prompts, lengths = prompts_of(BASE)
    greedy = bd.generate(model, prompts, NEW, prompt_lengths=lengths).tokens

    def sampled(key, **options):
        return bd.generate(model, prompts, NEW, prompt_lengths=lengths, key=key, temperature=1.0, **options).tokens

    key = jax.random.key(7)
    np.testing.assert_array_equal(sampled(key, top_k=1), greedy)
    np.testing.assert_array_equal(sampled(key, top_p=1e-6), greedy)
    first, second = sampled(key), sampled(jax.random.key(8))
    np.testing.assert_array_equal(first, sampled(key))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, greedy)


ROWS = 4000


def frequencies(logits, **options):
    tiled = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (ROWS, 1))
    tokens = np.asarray(sample_tokens(tiled, jax.random.key(0), **options))
    return np.bincount(tokens, minlength=len(logits)) / ROWS


def test_the_sampler_follows_its_distribution():
    # two tokens at 0.3 / 0.7; the others impossible
    logits = np.log(np.array([0.3, 0.7, 1e-30, 1e-30]))
    np.testing.assert_allclose(frequencies(logits, temperature=1.0), [0.3, 0.7, 0, 0], atol=0.03)
    # temperature 2 flattens to sqrt: 0.3^0.5 : 0.7^0.5
    flat = np.sqrt([0.3, 0.7])
    np.testing.assert_allclose(frequencies(logits, temperature=2.0)[:2], flat / flat.sum(), atol=0.03)
    # top-k and top-p cut the tail and renormalise
    four = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(frequencies(four, temperature=1.0, top_k=2), [0, 0, 3 / 7, 4 / 7], atol=0.03)
    # the smallest most likely set reaching 0.6 is {0.4, 0.3}
    np.testing.assert_allclose(frequencies(four, temperature=1.0, top_p=0.6), [0, 0, 3 / 7, 4 / 7], atol=0.03)
    np.testing.assert_allclose(frequencies(four, temperature=1.0, top_p=0.75), [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9], atol=0.03)
    np.testing.assert_array_equal(frequencies(four, temperature=1.0, top_p=0.3), [0, 0, 0, 1])
    np.testing.assert_array_equal(frequencies(four), [0, 0, 0, 1])  # greedy


# ----------------------------------------------------------------------------- EOS


def test_eos_stops_a_row():
    model = random_model(BASE)
    prompts, lengths = prompts_of(BASE)
    free = np.asarray(bd.generate(model, prompts, NEW, prompt_lengths=lengths).tokens)
    eos = int(free[1, 2])  # row 1 makes it third (perhaps earlier too)
    out = bd.generate(model, prompts, NEW, prompt_lengths=lengths, eos_id=eos)
    for row in range(len(LENGTHS)):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if hits.size else NEW
        assert int(out.lengths[row]) == stop
        np.testing.assert_array_equal(out.tokens[row, :stop], free[row, :stop])
        np.testing.assert_array_equal(out.tokens[row, stop:], eos)
    assert int(out.lengths[1]) <= 3
    # every row stopping at once ends the loop early: the rest is eos
    every = bd.generate(model, prompts[1, :2], NEW, eos_id=int(free[1, 0]))
    assert int(every.lengths) == 1
    np.testing.assert_array_equal(every.tokens, int(free[1, 0]))


# ----------------------------------------------------------------------------- a mesh


@pytest.mark.parametrize("spec", ["data=4,layers=2", "data=2,fsdp=4"])
def test_on_a_mesh(spec):
    model = random_model(CONFIGS["uniform"])
    prompts = jax.random.randint(jax.random.key(5), (8, PROMPT_LEN), 0, BASE.vocab_size)
    lengths = jnp.asarray([7, 3, 5, 6, 1, 2, 7, 4], jnp.int32)
    expected = bd.generate(model, prompts, NEW, prompt_lengths=lengths, return_logits=True)
    mesh = bd.make_mesh(spec)
    sharded = bd.shard_model(model, mesh)
    prompts_s, lengths_s = bd.shard_batch(mesh, np.asarray(prompts), np.asarray(lengths))
    out = bd.generate(sharded, prompts_s, NEW, prompt_lengths=lengths_s, return_logits=True)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logits, expected.logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "options, pattern",
    [
        (dict(temperature=1.0), "key"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(eos_id=BASE.vocab_size), "eos_id"),
        (dict(max_new_tokens=BASE.max_seq_len), "max_seq_len"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_lengths=jnp.asarray([8, 2, 2])), r"prompt_lengths.*\[1, 7\]"),
        (dict(prompt_lengths=jnp.asarray([0, 2, 2])), "prompt_lengths"),
    ],
)
def test_bad_options_are_errors(options, pattern):
    model = random_model(BASE)
    prompts, _ = prompts_of(BASE)
    options = {"max_new_tokens": NEW, **options}
    with pytest.raises(ValueError, match=pattern):
        bd.generate(model, prompts, options.pop("max_new_tokens"), **options)


# ----------------------------------------------------------------------------- transformers


HF_SMALL = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
)
#: Llama 3's frequency-dependent scaling, with a short original context so that it matters
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2"])
def test_greedy_equals_transformers_generate(tmp_path, kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    changes = {"rope_scaling": LLAMA3_ROPE} if kind == "llama3-rope" else {}
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**HF_SMALL, **changes)).eval()
    with torch.no_grad():  # weights large enough that the greedy choices are clear
        for name, param in hf_model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(param))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = bd.from_hf(tmp_path)
    if kind == "llama3-rope":
        assert model.config.rope_scaling is not None
    prompts = np.random.default_rng(0).integers(0, HF_SMALL["vocab_size"], (2, 9)).astype(np.int32)
    lengths = (9, 4)
    ours = bd.generate(model, jnp.asarray(prompts), 12, prompt_lengths=jnp.asarray(lengths))
    for row, length in enumerate(lengths):
        with torch.no_grad():
            theirs = hf_model.generate(
                torch.as_tensor(prompts[row : row + 1, :length], dtype=torch.long),
                attention_mask=torch.ones((1, length), dtype=torch.long),
                do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
            )[0, length:].numpy()
        np.testing.assert_array_equal(np.asarray(ours.tokens[row]), theirs)
