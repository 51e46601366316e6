"""The sparse KL of a teacher's top-k logits against the dense one (values, gradients and
the documented bounds), and distillation steps that read such logits instead of running
the teacher."""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd
from blockdistill.app.cli import main

VOCAB = 61
TEMPERATURES = (1.0, 2.0)


def logits_pair(seed=0, shape=(2, 7, VOCAB)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return 2.0 * jax.random.normal(k1, shape), 3.0 * jax.random.normal(k2, shape)


def mask_of(shape, seed=3):
    mask = jax.random.bernoulli(jax.random.key(seed), 0.8, shape[:-1])
    return mask.at[0, 0].set(True)


# ----------------------------------------------------------------------------- the sparse KL


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", [True, False])
def test_full_vocabulary_cache_is_the_dense_kl(temperature, tail):
    student, teacher = logits_pair()
    mask = mask_of(student.shape)
    cached = bd.top_k_logits(teacher, VOCAB, temperature)
    assert bool(jnp.all(jnp.isneginf(cached.log_tail)))  # nothing left in the tail
    dense = lambda s: bd.kl_divergence(s, teacher, mask, temperature)  # noqa: E731
    sparse = lambda s: bd.cached_kl_divergence(s, cached, mask, temperature, tail=tail)  # noqa: E731
    np.testing.assert_allclose(sparse(student), dense(student), rtol=1e-5, atol=1e-6)
    g_dense, g_sparse = jax.grad(dense)(student), jax.grad(sparse)(student)
    assert bool(jnp.all(jnp.isfinite(g_sparse)))
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-6)


def _tail_conditionals(student, teacher, cached, temperature):
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    in_top = jnp.put_along_axis(jnp.zeros(log_p.shape, bool), cached.ids, True, axis=-1, inplace=False)
    p_tail, q_tail = (jnp.sum(jnp.where(in_top, 0.0, jnp.exp(x)), axis=-1) for x in (log_p, log_q))
    p_cond = jnp.where(in_top, 0.0, jnp.exp(log_p)) / p_tail[..., None]
    q_cond = jnp.where(in_top, 0.0, jnp.exp(log_q)) / q_tail[..., None]
    return in_top, p_tail, p_cond, q_cond


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_small_k_stays_within_the_documented_bounds(k, temperature):
    """KL_dense - KL_cached = p_tail KL(p|tail || q|tail) in [0, p_tail max log(p|tail / q|tail)];
    gradients equal on the top-k ids and differ by at most 2 T p_tail (L1) per position."""
    student, teacher = logits_pair(seed=k)
    mask = jnp.ones(student.shape[:-1], bool)
    n = mask.size
    cached = bd.top_k_logits(teacher, k, temperature)
    dense = lambda s: bd.kl_divergence(s, teacher, mask, temperature)  # noqa: E731
    sparse = lambda s: bd.cached_kl_divergence(s, cached, mask, temperature)  # noqa: E731
    in_top, p_tail, p_cond, q_cond = _tail_conditionals(student, teacher, cached, temperature)
    np.testing.assert_allclose(jnp.exp(cached.log_tail), p_tail, rtol=1e-5)
    safe = lambda x: jnp.where(in_top, 1.0, x)  # noqa: E731
    kl_cond = jnp.sum(jnp.where(in_top, 0.0, p_cond * (jnp.log(safe(p_cond)) - jnp.log(safe(q_cond)))), axis=-1)
    gap = float(dense(student) - sparse(student))
    per_token_gap = temperature**2 * p_tail * kl_cond
    np.testing.assert_allclose(gap, float(jnp.mean(per_token_gap)), rtol=1e-4, atol=1e-6)
    assert gap >= -1e-6
    ratio_max = jnp.max(jnp.where(in_top, -jnp.inf, jnp.log(safe(p_cond)) - jnp.log(safe(q_cond))), axis=-1)
    assert bool(jnp.all(per_token_gap <= temperature**2 * p_tail * ratio_max + 1e-6))
    difference = (jax.grad(dense)(student) - jax.grad(sparse)(student)) * n  # per position
    np.testing.assert_allclose(jnp.where(in_top, difference, 0.0), 0.0, atol=1e-5)
    l1 = jnp.sum(jnp.abs(difference), axis=-1)
    np.testing.assert_allclose(l1, temperature * p_tail * jnp.sum(jnp.abs(p_cond - q_cond), axis=-1), rtol=1e-3,
                               atol=1e-5)
    assert bool(jnp.all(l1 <= 2 * temperature * p_tail + 1e-5))


def test_renormalized_kl_is_the_kl_of_the_top_k_conditionals():
    student, teacher = logits_pair(seed=5)
    mask = jnp.ones(student.shape[:-1], bool)
    cached = bd.top_k_logits(teacher, 8)
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student, axis=-1)
    take = lambda x: jnp.take_along_axis(x, cached.ids, axis=-1)  # noqa: E731
    p, q = jax.nn.softmax(take(log_p), axis=-1), jax.nn.softmax(take(log_q), axis=-1)
    expected = jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1))
    np.testing.assert_allclose(bd.cached_kl_divergence(student, cached, mask, tail=False), expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tail_mass_at_is_the_mass_outside_the_top_k(temperature):
    logits, _ = logits_pair(seed=5)
    mask = mask_of(logits.shape)
    ks = (1, 8, 16, VOCAB)
    got = np.asarray(bd.tail_mass_at(logits, mask, ks, temperature))
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ranked = -np.sort(-p, axis=-1)
    m = np.asarray(mask)
    want = [(1.0 - ranked[..., :k].sum(-1))[m].mean() for k in ks]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(got) <= 0)
    # the top-k cache's own tail bucket holds the same mass
    sparse = bd.top_k_logits(logits, 8, temperature)
    np.testing.assert_allclose(np.asarray(jnp.exp(sparse.log_tail))[m].mean(), got[1], rtol=1e-5)
    with pytest.raises(ValueError, match=r"ks=\(0,\)"):
        bd.tail_mass_at(logits, mask, (0,))


def test_bad_sparse_inputs_name_the_value():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match=r"top_k=0 is invalid"):
        bd.top_k_logits(teacher, 0)
    with pytest.raises(ValueError, match=rf"top_k={VOCAB + 1} is invalid"):
        bd.top_k_logits(teacher, VOCAB + 1)
    cached = bd.top_k_logits(teacher[:1], 4)
    with pytest.raises(ValueError, match="do not match student logits"):
        bd.cached_kl_divergence(student, cached, jnp.ones(student.shape[:-1], bool))
    with pytest.raises(ValueError, match="cached_kl='dense' is invalid"):
        bd.DistillationObjective(blockwise_weight=0.0, cached_kl="dense")


def test_objective_with_a_blockwise_term_refuses_cached_logits():
    model = bd.Transformer(bd.TransformerConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                                mlp_dim=32, max_seq_len=16), key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, VOCAB)
    cached = bd.top_k_logits(jax.vmap(model)(tokens).logits, 4)
    with pytest.raises(ValueError, match="hold no teacher states"):
        bd.DistillationObjective(blockwise_weight=0.5)(model, cached, tokens)


# ----------------------------------------------------------------------------- distillation steps


def test_step_on_a_full_vocabulary_cache_equals_the_dense_kd_step():
    """One KD step reading cached logits (k = vocabulary, float32) equals the step that runs
    the teacher: same loss, metrics and updated student."""
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    teacher = bd.Teacher(bd.Transformer(bd.TransformerConfig(**cfg, mlp_dim=64), key=jax.random.key(0)))
    student = bd.Transformer(bd.TransformerConfig(**cfg, mlp_dim=32), key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 12), 0, VOCAB)
    mask = jnp.ones(tokens.shape, bool).at[1, 9:].set(False)
    segments = jnp.ones(tokens.shape, jnp.int32).at[2, 6:].set(2)
    objective = bd.DistillationObjective(blockwise_weight=0.0, temperature=2.0, label_weight=0.3)
    optimizer = optax.sgd(1e-1)  # updates proportional to gradients (Adam's first step is their sign)
    step = bd.DistillStep(objective, optimizer)
    logits = jax.vmap(lambda t, s: teacher(t, segment_ids=s).logits)(tokens, segments)
    cached = bd.top_k_logits(logits, VOCAB, 2.0)

    def run(**kw):
        model = jax.tree.map(jnp.copy, student)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        return step(model, opt_state, kw.pop("teacher"), tokens, mask, 3, segment_ids=segments, **kw)

    dense_model, _, dense_metrics = run(teacher=teacher)
    cached_model, _, cached_metrics = run(teacher=None, teacher_logits=cached)
    for key in ("loss", "kl", "ce", "grad_norm"):
        np.testing.assert_allclose(cached_metrics[key], dense_metrics[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(eqx.filter(cached_model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(dense_model, eqx.is_array))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hold no teacher states"):
        bd.DistillStep(bd.DistillationObjective(blockwise_weight=1.0, inject_at="layer"), optimizer)(
            student, optimizer.init(eqx.filter(student, eqx.is_array)), None, tokens, mask, 0, teacher_logits=cached)
