"""Vocabulary losses over chunks of the sequence: the same KL and CE (values and
gradients) as on the full logits, in the objective, the unfused and the fused steps, and
less compiled memory at a large vocabulary."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
BATCH, SEQ = 3, 13  # a sequence that no chunk size used here divides


@pytest.fixture(scope="module")
def setup():
    teacher = bd.Transformer(bd.TransformerConfig(**BASE, mlp_dim=64), key=jax.random.key(0))
    student = bd.Transformer(bd.TransformerConfig(**BASE, mlp_dim=32), key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, BASE["vocab_size"])
    mask = jnp.ones(tokens.shape, bool).at[1, 10:].set(False)
    segments = jnp.ones(tokens.shape, jnp.int32).at[2, 5:].set(2).at[1, 10:].set(0)
    return teacher, student, tokens, mask, segments


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, **kw)


@pytest.mark.parametrize("chunk", [1, 4, 5, SEQ, 64])
@pytest.mark.parametrize("source", ["head", "logits", "cached"])
def test_chunked_losses_equal_the_full_logits(setup, chunk, source):
    teacher, student, tokens, mask, segments = setup
    t_out = jax.vmap(lambda t, s: teacher(t, segment_ids=s))(tokens, segments)
    cached = bd.top_k_logits(t_out.logits, 8, 2.0)
    teacher_kw = {"head": {"teacher_head": teacher.head, "teacher_hidden": t_out.hidden},
                  "logits": {"teacher_logits": t_out.logits}, "cached": {"cached": cached}}[source]

    def full(model):
        logits = jax.vmap(lambda t, s: model(t, segment_ids=s).logits)(tokens, segments)
        if source == "cached":
            kl = bd.cached_kl_divergence(logits, cached, mask, 2.0)
        else:
            kl = bd.kl_divergence(logits, t_out.logits, mask, 2.0)
        return kl, bd.next_token_cross_entropy(logits, tokens, mask, segments)

    def chunked(model):
        hidden = jax.vmap(lambda t, s: model(t, segment_ids=s).hidden)(tokens, segments)
        return bd.chunked_logit_losses(model.head, hidden, tokens, mask, segments, chunk=chunk,
                                       temperature=2.0, **teacher_kw)

    params, static = eqx.partition(student, eqx.is_array)
    _close(chunked(student), full(student))
    for index in (0, 1):  # d KL / d params and d CE / d params
        grad = lambda fn: jax.grad(lambda p: fn(eqx.combine(p, static))[index])(params)  # noqa: E731
        _close(grad(chunked), grad(full))


def test_the_last_hidden_state_is_what_the_head_reads(setup):
    teacher, _, tokens, _, _ = setup
    out = teacher(tokens[0])
    np.testing.assert_allclose(teacher.head(out.hidden), out.logits, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out.hidden, out.states.layer_out[-1])


@pytest.mark.parametrize("recipe", [
    {"blockwise_weight": 0.0, "label_weight": 0.5, "temperature": 2.0},
    {"blockwise_weight": 0.5, "inject_at": "layer"},
])
@pytest.mark.parametrize("fused", [False, True])
def test_steps_with_chunked_losses_equal_the_full_steps(setup, recipe, fused):
    teacher, student, tokens, mask, segments = setup
    if fused and recipe["blockwise_weight"] == 0.0:
        pytest.skip("a step without a blockwise term does not fuse")
    optimizer = optax.sgd(0.1)  # updates proportional to gradients

    def run(**chunk):
        step = bd.DistillStep(bd.DistillationObjective(**recipe, **chunk), optimizer, fused=fused)
        model = jax.tree.map(jnp.copy, student)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        return step(model, opt_state, bd.Teacher(teacher), tokens, mask, 0, segment_ids=segments)

    full_model, _, full_metrics = run()
    chunked_model, _, chunked_metrics = run(logit_chunk=4)
    for key in ("loss", "kl", "ce", "feature", "grad_norm"):
        np.testing.assert_allclose(chunked_metrics[key], full_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    _close(eqx.filter(chunked_model, eqx.is_array), eqx.filter(full_model, eqx.is_array))


def test_bad_chunk_names_the_value():
    with pytest.raises(ValueError, match="logit_chunk=0 is invalid"):
        bd.DistillationObjective(logit_chunk=0)
    with pytest.raises(ValueError, match="chunk=-2 is invalid"):
        bd.chunked_logit_losses(lambda h: h, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32),
                                jnp.ones((1, 4), bool), chunk=-2)


def test_chunked_kd_step_compiles_to_less_memory_at_a_large_vocabulary():
    """At a 128k vocabulary the full KD step holds several [batch, seq, vocab] float32
    arrays; chunked over 64 positions, its compiled temporaries shrink to a fraction."""
    cfg = dict(vocab_size=131072, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32, max_seq_len=512)
    teacher = bd.Teacher(eqx.filter_eval_shape(bd.Transformer, bd.TransformerConfig(**cfg), key=jax.random.key(0)))
    student = eqx.filter_eval_shape(bd.Transformer, bd.TransformerConfig(**cfg), key=jax.random.key(1))
    tokens, mask = jnp.zeros((2, 512), jnp.int32), jnp.ones((2, 512), bool)  # models stay abstract
    optimizer = optax.sgd(0.1)
    opt_state = jax.eval_shape(optimizer.init, eqx.filter(student, eqx.is_array))
    logits_bytes = 2 * 512 * cfg["vocab_size"] * 4  # one [batch, seq, vocab] float32 array: 512 MiB

    def temp_bytes(**chunk):
        step = bd.DistillStep(bd.DistillationObjective(blockwise_weight=0.0, **chunk), optimizer)
        lowered = step.lower(student, opt_state, teacher, tokens, mask, 0)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(), temp_bytes(logit_chunk=64)
    assert full >= 2 * logits_bytes
    assert chunked < full / 4


def test_the_run_config_passes_the_chunk():
    from blockdistill.app.runconfig import DistillConfig, make_objective

    assert make_objective(DistillConfig(logit_chunk=32)).logit_chunk == 32
    with pytest.raises(ValueError, match=r"logit_chunk=0 is invalid.*\(--logit-chunk / \[objective\] logit_chunk\)"):
        DistillConfig(logit_chunk=0)
