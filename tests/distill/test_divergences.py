"""The divergence family of the logit term (forward KL, reverse KL, generalized
Jensen-Shannon, skew KL, total variation): values and gradients against independent
float64 references, the conventions' limits, TRL's formula, the chunked, fused and cached
paths, and the command line."""

import itertools
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

KINDS = ("kl", "reverse_kl", "jsd", "skew_kl", "tvd")
NEW_KINDS = KINDS[1:]  # the KL's chunked, fused and cached paths are tested in test_chunked, test_fused, test_sparse
VOCAB = 11
TEMPERATURES = (1.0, 2.0)


def logits_pair(seed=0, shape=(2, 3, VOCAB)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return 2.0 * jax.random.normal(k1, shape), 3.0 * jax.random.normal(k2, shape)


def mask_of(shape):
    return jnp.ones(shape[:2], bool).at[1, 2].set(False)


# ----------------------------------------------------------------------------- float64 references


def _log_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _kl(p, q):
    """sum p log(p / q), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def reference(student, teacher, mask, temperature, kind, beta=0.5, alpha=0.1):
    """`T^2` times the masked mean of the divergence, from the formulas, in float64 numpy."""
    student, teacher, mask = (np.asarray(x, np.float64) for x in (student, teacher, mask))
    q = np.exp(_log_softmax(student / temperature))
    p = np.exp(_log_softmax(teacher / temperature))
    if kind == "kl":
        per_token = _kl(p, q)
    elif kind == "reverse_kl":
        per_token = _kl(q, p)
    elif kind == "jsd":  # GKD's Eq. 1; the ends are the KLs themselves (TRL's convention)
        if beta == 0:
            per_token = _kl(p, q)
        elif beta == 1:
            per_token = _kl(q, p)
        else:
            m = beta * p + (1 - beta) * q
            per_token = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    elif kind == "skew_kl":  # DistiLLM's skew KL
        per_token = _kl(p, alpha * p + (1 - alpha) * q)
    else:
        per_token = 0.5 * np.sum(np.abs(p - q), axis=-1)
    return temperature**2 * np.sum(per_token * mask) / max(np.sum(mask), 1.0)


def finite_difference_grad(fn, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


OPTIONS = {"kl": {}, "reverse_kl": {}, "jsd": {"jsd_beta": 0.3}, "skew_kl": {"skew_alpha": 0.2}, "tvd": {}}


def _ref_options(kind):
    options = OPTIONS[kind]
    return {"beta": options.get("jsd_beta", 0.5), "alpha": options.get("skew_alpha", 0.1)}


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_gradients_equal_the_float64_reference(kind, temperature):
    student, teacher = logits_pair()
    mask = mask_of(student.shape)
    ours = lambda s: bd.logit_divergence(s, teacher, mask, temperature, kind, **OPTIONS[kind])
    ref = lambda s: reference(s, teacher, mask, temperature, kind, **_ref_options(kind))
    value = ours(student)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, ref(student), rtol=1e-5, atol=1e-7)
    grad = jax.grad(ours)(student)
    expected = finite_difference_grad(ref, student)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6 * np.max(np.abs(expected)))
    # a masked position counts for nothing
    assert float(jnp.max(jnp.abs(grad[1, 2]))) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_logits_are_computed_in_float32(kind):
    student, teacher = logits_pair()
    mask = mask_of(student.shape)
    low = student.astype(jnp.bfloat16)
    value = bd.logit_divergence(low, teacher.astype(jnp.bfloat16), mask, 2.0, kind)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(
        value, reference(low.astype(jnp.float32), teacher.astype(jnp.bfloat16).astype(jnp.float32), mask, 2.0, kind),
        rtol=1e-5,
    )


def test_the_forward_kl_keeps_its_numbers():
    """`"kl"` computes what `kl_divergence` computed before the family existed, bit for bit."""
    student, teacher = logits_pair()
    mask = mask_of(student.shape)
    t = jnp.float32(2.0)
    log_q = jax.nn.log_softmax(student / t, axis=-1)
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    weights = mask.astype(jnp.float32)
    per_token = optax.losses.kl_divergence_with_log_targets(log_q, log_p)
    before = jnp.square(t) * (jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0))
    assert bd.logit_divergence(student, teacher, mask, 2.0) == before
    assert bd.kl_divergence(student, teacher, mask, 2.0) == before


# ----------------------------------------------------------------------------- the conventions


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_jsd_ends_are_the_two_kls(temperature):
    """GKD / TRL: beta = 0 is the forward KL(teacher || student), beta = 1 the reverse KL;
    in between, JSD / beta and JSD / (1 - beta) tend to them (the formula itself tends to 0)."""
    student, teacher = logits_pair(seed=1)
    mask = mask_of(student.shape)

    def div(kind, **kw):
        return float(bd.logit_divergence(student, teacher, mask, temperature, kind, **kw))

    forward, reverse = div("kl"), div("reverse_kl")
    np.testing.assert_allclose(div("jsd", jsd_beta=0.0), forward, rtol=1e-6)
    np.testing.assert_allclose(div("jsd", jsd_beta=1.0), reverse, rtol=1e-6)
    # the scaled limits (slow where one distribution has next to no mass: |error| shrinks
    # with eps, to a few percent at 1e-4 for these peaked logits)
    errors = [(abs(div("jsd", jsd_beta=eps) / eps / forward - 1), abs(div("jsd", jsd_beta=1 - eps) / eps / reverse - 1))
              for eps in (1e-2, 1e-3, 1e-4)]
    assert all(x > y for a, b in itertools.pairwise(errors) for x, y in zip(a, b, strict=True))
    assert max(errors[-1]) < 0.1
    assert div("jsd", jsd_beta=1e-3) < 1e-2 * forward  # unscaled, near 0 at the ends
    # symmetric at beta = 0.5, and never above the smaller of the two ends' KLs scaled
    swapped = float(bd.logit_divergence(teacher, student, mask, temperature, "jsd", jsd_beta=0.5))
    np.testing.assert_allclose(div("jsd", jsd_beta=0.5), swapped, rtol=1e-5)
    assert 0 < div("jsd", jsd_beta=0.5) <= temperature**2 * np.log(2)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_skew_kl_limits(temperature):
    """alpha = 0 is the forward KL; alpha = 1 compares the teacher with itself (0); in
    between it lies below the forward KL (the mixture is closer to the teacher)."""
    student, teacher = logits_pair(seed=2)
    mask = mask_of(student.shape)

    def skew(alpha):
        return float(bd.logit_divergence(student, teacher, mask, temperature, "skew_kl", skew_alpha=alpha))

    forward = float(bd.logit_divergence(student, teacher, mask, temperature, "kl"))
    np.testing.assert_allclose(skew(0.0), forward, rtol=1e-6)
    assert skew(1.0) == 0.0
    values = [skew(alpha) for alpha in (0.0, 0.1, 0.5, 0.9)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind):
    student, _ = logits_pair()
    mask = mask_of(student.shape)
    for temperature in TEMPERATURES:
        value = bd.logit_divergence(student, student, mask, temperature, kind, **OPTIONS[kind])
        assert abs(float(value)) < 1e-6
        grad = jax.grad(lambda s, t=temperature: bd.logit_divergence(s, student, mask, t, kind, **OPTIONS[kind]))(student)
        assert float(jnp.max(jnp.abs(grad))) < 1e-5


def test_tvd_is_half_the_l1_distance_in_zero_one():
    student, teacher = logits_pair(seed=4)
    mask = jnp.ones(student.shape[:2], bool)
    per_position = bd.logit_divergence(student, teacher, mask, 1.0, "tvd")
    assert 0.0 < float(per_position) <= 1.0
    # disjoint supports: 1; the same: 0
    far = jnp.zeros((1, 1, VOCAB)).at[..., 0].set(1e4)
    near = jnp.zeros((1, 1, VOCAB)).at[..., 1].set(1e4)
    one = jnp.ones((1, 1), bool)
    np.testing.assert_allclose(bd.logit_divergence(far, near, one, 1.0, "tvd"), 1.0, rtol=1e-6)
    # T^2 applies to every divergence, tvd included: at T = 2 the value is 4 TVD(p_2, q_2)
    at_two = float(bd.logit_divergence(student, teacher, mask, 2.0, "tvd"))
    np.testing.assert_allclose(at_two, reference(student, teacher, mask, 2.0, "tvd"), rtol=1e-5)
    assert 0.0 < at_two / 4 <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_zero_probabilities_give_no_nan(kind):
    """Probabilities that underflow to 0 in float32 (logit gaps of hundreds) keep values
    and gradients finite; the new divergences also take `-inf` teacher logits."""
    student, teacher = logits_pair()
    mask = mask_of(student.shape)
    student = student.at[0, :, 0].set(300.0)  # the student's other ids underflow at row 0
    teacher = teacher.at[1, :, 3].set(-300.0)  # the teacher gives id 3 no mass at row 1
    fn = lambda s: bd.logit_divergence(s, teacher, mask, 1.0, kind, **OPTIONS[kind])
    value, grad = fn(student), jax.grad(fn)(student)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(value, reference(student, teacher, mask, 1.0, kind, **_ref_options(kind)), rtol=1e-5)
    if kind in ("kl", "reverse_kl"):
        return  # "kl" keeps optax's formula (finite logits); a teacher's 0 makes the reverse KL infinite
    teacher = teacher.at[1, :, 3].set(-jnp.inf)
    fn = lambda s: bd.logit_divergence(s, teacher, mask, 1.0, kind, **OPTIONS[kind])
    value, grad = fn(student), jax.grad(fn)(student)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(value, reference(student, teacher, mask, 1.0, kind, **_ref_options(kind)), rtol=1e-5)


def test_trl_generalized_jsd_formula():
    """TRL's `generalized_jsd_loss`, as its documentation states it
    (https://huggingface.co/docs/trl/gkd_trainer: `beta` interpolates the generalized JSD,
    `beta=0` the forward KL, `beta=1` the reverse KL; the loss is Eq. 1 of GKD,
    https://huggingface.co/papers/2306.13649, on log-softmaxes at `temperature`, averaged
    over the tokens whose label is not -100, with no `T^2` factor): ours divided by `T^2`.
    The mixture is taken here as TRL's documentation writes it, in log space,
    `log m = logsumexp(log q + log(1 - beta), log p + log beta)`."""
    student, teacher = (np.asarray(x, np.float64) for x in logits_pair(seed=5, shape=(2, 4, VOCAB)))
    labels = np.array([[1, 2, -100, 4], [-100, 5, 6, 7]])
    for temperature in TEMPERATURES:
        log_q, log_p = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
        for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
            if beta == 0:
                jsd = np.exp(log_p) * (log_p - log_q)
            elif beta == 1:
                jsd = np.exp(log_q) * (log_q - log_p)
            else:
                with np.errstate(divide="ignore"):
                    log_m = np.logaddexp(log_q + np.log1p(-beta), log_p + np.log(beta))
                jsd = beta * np.exp(log_p) * (log_p - log_m) + (1 - beta) * np.exp(log_q) * (log_q - log_m)
            keep = labels != -100
            trl = jsd[keep].sum() / keep.sum()
            ours = bd.logit_divergence(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                       jnp.asarray(keep), temperature, "jsd", jsd_beta=beta)
            np.testing.assert_allclose(float(ours) / temperature**2, trl, rtol=1e-5, err_msg=f"T={temperature} beta={beta}")


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"DistillationObjective.divergence='js' is invalid"):
        bd.DistillationObjective(divergence="js")
    with pytest.raises(ValueError, match=r"DistillationObjective.jsd_beta=1.5 is invalid: must be a float in \[0, 1\]"):
        bd.DistillationObjective(divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match=r"DistillationObjective.skew_alpha=-0.1 is invalid"):
        bd.DistillationObjective(skew_alpha=-0.1)
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match=r"divergence='hellinger' is invalid"):
        bd.logit_divergence(student, teacher, mask_of(student.shape), kind="hellinger")


def test_the_run_config_passes_the_divergence():
    from blockdistill.app.runconfig import DistillConfig, make_objective

    objective = make_objective(DistillConfig(divergence="jsd", jsd_beta=0.25, skew_alpha=0.3))
    assert (objective.divergence, objective.jsd_beta, objective.skew_alpha) == ("jsd", 0.25, 0.3)
    assert make_objective(DistillConfig()).divergence == "kl"
    with pytest.raises(ValueError, match=r"divergence='js' is invalid.*\(--divergence / \[objective\] divergence\)"):
        DistillConfig(divergence="js")


# ----------------------------------------------------------------------------- chunked, fused and cached

BASE = dict(vocab_size=29, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
BATCH, SEQ = 2, 7


@pytest.fixture(scope="module")
def models():
    # one shape for both (one compiled initialisation); the keys make them differ
    teacher = bd.Transformer(bd.TransformerConfig(**BASE, mlp_dim=32), key=jax.random.key(0))
    student = bd.Transformer(bd.TransformerConfig(**BASE, mlp_dim=32), key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, BASE["vocab_size"])
    mask = jnp.ones(tokens.shape, bool).at[0, 5:].set(False)
    segments = jnp.ones(tokens.shape, jnp.int32).at[1, 3:].set(2).at[0, 5:].set(0)
    return teacher, student, tokens, mask, segments


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_chunked_and_cached_equal_the_full_logits(models, kind):
    """`chunked_logit_losses` (teacher head per chunk) and a cache of the whole vocabulary
    (dense or chunked) give the full logits' divergence, values and gradients."""
    teacher, student, tokens, mask, segments = models
    t_out = jax.vmap(lambda t, s: teacher(t, segment_ids=s))(tokens, segments)
    cached = bd.top_k_logits(t_out.logits, BASE["vocab_size"], 2.0)
    options = OPTIONS[kind]
    params, static = eqx.partition(student, eqx.is_array)

    def logits_of(p):
        return jax.vmap(lambda t, s: eqx.combine(p, static)(t, segment_ids=s).logits)(tokens, segments)

    def hidden_of(p):
        return jax.vmap(lambda t, s: eqx.combine(p, static)(t, segment_ids=s).hidden)(tokens, segments)

    def chunked(p, **teacher_kw):
        return bd.chunked_logit_losses(eqx.combine(p, static).head, hidden_of(p), tokens, mask, segments, chunk=3,
                                       temperature=2.0, divergence=kind, **options, **teacher_kw)[0]

    losses = {
        "full": lambda p: bd.logit_divergence(logits_of(p), t_out.logits, mask, 2.0, kind, **options),
        "chunked": lambda p: chunked(p, teacher_head=teacher.head, teacher_hidden=t_out.hidden),
        "cached": lambda p: bd.logit_divergence(logits_of(p), cached, mask, 2.0, kind, **options),
        "chunked-cached": lambda p: chunked(p, cached=cached),
    }
    values = jax.jit(lambda p: {name: jax.value_and_grad(fn)(p) for name, fn in losses.items()})(params)
    for name in ("chunked", "cached", "chunked-cached"):
        _close(values[name], values["full"])


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_the_fused_chunked_step_equals_the_plain_step(models, kind):
    """One step with a blockwise term and the divergence, unfused on the full logits and
    fused with `logit_chunk`: the same metrics and updated student (plain SGD: updates are
    gradients). The unfused chunked path is the cached step's, below."""
    teacher, student, tokens, mask, segments = models
    optimizer = optax.sgd(0.5)
    recipe = {"blockwise_weight": 0.4, "inject_at": "layer", "temperature": 2.0, "divergence": kind, **OPTIONS[kind]}

    def run(fused, **chunk):
        step = bd.DistillStep(bd.DistillationObjective(**recipe, **chunk), optimizer, fused=fused)
        model = jax.tree.map(jnp.copy, student)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        model, _, metrics = step(model, opt_state, bd.Teacher(teacher), tokens, mask, 0, segment_ids=segments)
        return eqx.filter(model, eqx.is_array), metrics

    plain_model, plain = run(False)
    assert float(plain["kl"]) > 0
    model, metrics = run(True, logit_chunk=3)
    for key in ("loss", "kl", "feature", "ce", "grad_norm"):
        np.testing.assert_allclose(metrics[key], plain[key], rtol=1e-5, atol=1e-7, err_msg=key)
    _close(model, plain_model)


def test_a_top_k_cache_refuses_the_divergences_it_cannot_serve(models):
    teacher, student, tokens, mask, segments = models
    logits = jax.vmap(lambda t, s: teacher(t, segment_ids=s).logits)(tokens, segments)
    student_logits = jax.vmap(student)(tokens).logits
    small = bd.top_k_logits(logits, 8)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    for kind in ("reverse_kl", "jsd", "skew_kl", "tvd"):
        objective = bd.DistillationObjective(blockwise_weight=0.0, divergence=kind)
        needle = rf"divergence='{kind}' cannot be computed from cached teacher logits that keep the top 8 of 29 ids"
        with pytest.raises(ValueError, match=needle):
            objective(student, small, tokens, mask)
        with pytest.raises(ValueError, match=needle):  # the step refuses before tracing
            bd.DistillStep(objective, optimizer)(student, opt_state, None, tokens, mask, 0, teacher_logits=small)
        with pytest.raises(ValueError, match=needle):
            bd.logit_divergence(student_logits, small, mask, kind=kind)
    # the forward KL is served from the same cache (within its documented bound)
    cached_kl = bd.logit_divergence(student_logits, small, mask)
    assert 0 < float(cached_kl) <= float(bd.logit_divergence(student_logits, logits, mask)) + 1e-6


def test_a_full_vocabulary_cache_step_equals_the_dense_step(models):
    teacher, student, tokens, mask, segments = models
    optimizer = optax.sgd(0.5)
    recipe = {"blockwise_weight": 0.0, "temperature": 2.0, "divergence": "jsd", "jsd_beta": 0.3, "label_weight": 0.2}
    objective = bd.DistillationObjective(**recipe)
    # read from the cache, chunked: the unfused chunked path passes the divergence too
    chunked_objective = bd.DistillationObjective(**recipe, logit_chunk=3)
    logits = jax.vmap(lambda t, s: teacher(t, segment_ids=s).logits)(tokens, segments)
    cached = bd.top_k_logits(logits, BASE["vocab_size"], 2.0)

    def run(teacher_, objective=objective, **kw):
        step = bd.DistillStep(objective, optimizer)
        model = jax.tree.map(jnp.copy, student)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        model, _, metrics = step(model, opt_state, teacher_, tokens, mask, 0, segment_ids=segments, **kw)
        return eqx.filter(model, eqx.is_array), metrics

    dense_model, dense = run(bd.Teacher(teacher))
    cached_model, from_cache = run(None, teacher_logits=cached, objective=chunked_objective)
    for key in ("loss", "kl", "ce", "grad_norm"):
        np.testing.assert_allclose(from_cache[key], dense[key], rtol=1e-5, err_msg=key)
    _close(cached_model, dense_model)


# ----------------------------------------------------------------------------- the command line


def test_cli_distills_with_jsd_and_refuses_to_resume_with_another_divergence(tmp_path, corpus, capsys):
    cfg = bd.TransformerConfig(vocab_size=256, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=32, max_seq_len=32)
    teacher = tmp_path / "teacher"
    bd.save_model(bd.Transformer(cfg, key=jax.random.key(0)), teacher)
    out = tmp_path / "run"

    def args(*extra):
        return ["distill", "--no-progress", "--no-plots", "--out", str(out), "--teacher", str(teacher),
                "--data", str(corpus), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2",
                "--eval-batches", "1", "--checkpoint-every", "2", "--log-every", "1", "--warmup-steps", "1", *extra]

    assert main(args("--divergence", "jsd", "--jsd-beta", "0.3")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "kl" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(np.isfinite(r["kl"]) and 0 < r["kl"] < np.log(2) and np.isfinite(r["loss"]) for r in trained)
    capsys.readouterr()
    code = main(args("--divergence", "tvd", "--steps", "4", "--extend"))
    err = capsys.readouterr().err
    assert code != 0 and "divergence: 'jsd' -> 'tvd'" in err, err
    assert pathlib.Path(out / "student").exists()
