"""Compact heterogeneous execution: each layer stored and run at its own shape, one stack
and one scan per segment of equal layers; the same numbers as the padded form (every layer
at the widest shape, run as its own through masks), at the own layers' cost."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd
from blockdistill.app.checkpoint import Checkpointer

BASE = bd.TransformerConfig(
    vocab_size=64, dim=32, n_layers=8, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32,
    attention_impl="xla",
)
#: a mixed student: full, fewer KV heads with a narrower MLP (twice: one segment), MLP
#: only, attention only, a linear layer, an identity, and the full shape again
MIXED = (
    bd.BlockShape(48, 2),
    bd.BlockShape(16, 1),
    bd.BlockShape(16, 1),
    bd.BlockShape(32, 0),
    bd.BlockShape(0, 2),
    bd.BlockShape(0, 0, linear=True),
    bd.BlockShape(0, 0),
    bd.BlockShape(48, 2),
)


def _config(**changes):
    return BASE.replace(layer_shapes=MIXED, **changes)


def _random(config, seed=0):
    model = bd.Transformer(config, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + 0.15 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def _padded_forward(model, padded, masks, tokens, unroll=False):
    """The padded form's forward pass: one scan over every layer at the widest shape,
    each run as its own through its masks."""
    hidden = model.embed(tokens)
    params, static = eqx.partition(padded, eqx.is_array)

    def body(x, xs):
        layer_params, layer_masks = xs
        step = eqx.combine(layer_params, static)(x, masks=layer_masks)
        return step.layer_out, step

    hidden, steps = jax.lax.scan(body, hidden, (params, masks), unroll=unroll)
    return model.head(hidden), steps


def _loss(logits, layer_out):
    return jnp.mean(jnp.square(logits)) + 0.1 * jnp.mean(jnp.square(layer_out))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_compact_equals_the_padded_form(scan_layers):
    config = _config(scan_layers=scan_layers)
    model = _random(config)
    padded, masks = bd.padded_layers(model)
    assert padded.mlp.up_proj.weight.shape == (config.n_layers, config.mlp_dim, config.dim)
    tokens = jax.random.randint(jax.random.key(5), (20,), 0, config.vocab_size)

    out = model(tokens)
    logits, steps = jax.jit(_padded_forward)(model, padded, masks, tokens)
    np.testing.assert_allclose(out.logits, logits, atol=1e-5, rtol=1e-5)
    for name in ("attn_in", "attn_out", "layer_in", "layer_out"):
        np.testing.assert_allclose(getattr(out.states, name), getattr(steps, name), atol=1e-5, rtol=1e-5)

    def compact_loss(model):
        out = model(tokens)
        return _loss(out.logits, out.states.layer_out)

    def padded_loss(padded, model):
        logits, steps = _padded_forward(model, padded, masks, tokens)
        return _loss(logits, steps.layer_out)

    grads = eqx.filter_grad(compact_loss)(model)
    padded_grads, outer_grads = jax.grad(padded_loss, argnums=(0, 1))(padded, model)
    # the padded gradients' own corners, in the compact layout
    own_grads = bd.compact_layers(padded_grads, config)
    got = jax.tree.leaves(grads.layers.layers)
    want = jax.tree.leaves(own_grads)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for get in (lambda m: m.embed_tokens.weight, lambda m: m.norm.weight, lambda m: m.lm_head.weight):
        np.testing.assert_allclose(get(grads), get(outer_grads), atol=1e-5, rtol=1e-5)
    # the padded form back to compact is the model's own layers
    assert eqx.tree_equal(bd.compact_layers(padded, config), model.layers.layers)


def test_stores_and_computes_only_its_own_layers():
    config = _config()
    model = bd.Transformer(config, key=jax.random.key(0))
    padded, _ = bd.padded_layers(model)
    compact = _count(model)
    outer = _count(model) - _count(model.layers)
    own = sum(v.size for layer in range(config.n_layers) for v in bd.own_weights(model, layer).values())
    assert compact == bd.parameter_count(config) == outer + own
    assert compact == outer + sum(bd.block_parameters(config, s) for s in MIXED)
    assert outer + _count(padded) > compact  # the padded form stores more
    # one stack per segment: the two narrow layers share one
    assert len(model.layers.segments) == len(MIXED) - 1
    # the compiled forward (unrolled, so that XLA counts every layer) costs less than the
    # padded one, and an identity layer nothing
    tokens = jnp.arange(16)

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    padded_flops = flops(lambda m, p, mk: _padded_forward(m, p, mk, tokens, unroll=True)[0],
                         model, padded, bd.block_masks(config))
    model = eqx.tree_at(lambda m: m.layers, model, bd.Transformer(config.replace(scan_layers=False),
                                                                   key=jax.random.key(0)).layers)
    compact_flops = flops(lambda m: m(tokens).logits, model)
    assert compact_flops < 0.8 * padded_flops
    without_identity = tuple(s for s in MIXED if s != bd.BlockShape(0, 0))
    shorter = bd.Transformer(
        config.replace(n_layers=len(without_identity), layer_shapes=without_identity, scan_layers=False),
        key=jax.random.key(0))
    np.testing.assert_allclose(flops(lambda m: m(tokens).logits, shorter), compact_flops, rtol=0.01)


def test_uniform_model_is_one_plain_stack():
    model = bd.Transformer(BASE, key=jax.random.key(0))
    assert isinstance(model.layers.layers, bd.DecoderLayer)
    assert model.layers.segments == (model.layers.layers,) and model.layers.bounds == ((0, BASE.n_layers),)
    assert model.layers.layers.mlp.up_proj.weight.shape == (BASE.n_layers, BASE.mlp_dim, BASE.dim)
    padded, masks = bd.padded_layers(model)
    assert padded is model.layers.layers and masks is None


def test_saves_and_loads(tmp_path):
    model = _random(_config())
    tokens = jnp.arange(12)
    bd.save_model(model, tmp_path / "model")
    loaded = bd.load_model(tmp_path / "model")
    assert eqx.tree_equal(loaded, model)
    np.testing.assert_array_equal(loaded(tokens).logits, model(tokens).logits)
    # a folder saved before compact segments (every layer padded) loads into the compact form
    padded, _ = bd.padded_layers(model)
    eqx.tree_serialise_leaves(tmp_path / "model" / "model.eqx", eqx.tree_at(lambda m: m.layers.layers, model, padded))
    assert eqx.tree_equal(bd.load_model(tmp_path / "model"), model)
    # Orbax checkpoints of the model and its optimizer state
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    checkpointer = Checkpointer(tmp_path / "run", asynchronous=False)
    checkpointer.save(1, model, opt_state, {})
    checkpointer.close()
    like = bd.Transformer(model.config, key=jax.random.key(9))
    restored, restored_opt, _ = Checkpointer(tmp_path / "run").restore(
        1, like, optimizer.init(eqx.filter(like, eqx.is_array)))
    assert eqx.tree_equal(eqx.filter(restored, eqx.is_array), eqx.filter(model, eqx.is_array))
    assert eqx.tree_equal(restored_opt, opt_state)


@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_distill_step_trains_it_fused_and_unfused_alike(inject_at):
    teacher_config = BASE.replace(n_layers=len(MIXED))
    teacher = bd.Teacher(_random(teacher_config, seed=3))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, BASE.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    objective = bd.DistillationObjective(blockwise_weight=0.5, inject_at=inject_at)
    students, losses = [], []
    for fused in (False, True):
        student = _random(_config(), seed=4)
        optimizer = bd.make_optimizer(1e-2)
        opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
        step = bd.DistillStep(objective=objective, optimizer=optimizer, fused=fused)
        assert step.uses_fusion(teacher, student) is fused
        run = []
        for index in range(3):
            student, opt_state, metrics = step(student, opt_state, teacher, tokens, mask, jnp.asarray(index))
            run.append(float(metrics["loss"]))
        students.append(student)
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(students[0]), jax.tree.leaves(students[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert _count(students[0]) == bd.parameter_count(_config())


def test_generate_equals_the_full_forward():
    model = _random(_config())
    prompt = jax.random.randint(jax.random.key(2), (5,), 0, BASE.vocab_size)
    _, cache = model.prefill(prompt, max_len=12)
    assert isinstance(cache, tuple) and len(cache) == len(model.layers.segments)
    assert cache[1].k.shape == (2, 12, 1, BASE.head_dim) and cache[2] is None  # own KV heads; no attention
    generated = bd.generate(model, prompt, 6)
    sequence = jnp.concatenate([prompt, generated.tokens])
    logits = model(sequence).logits
    np.testing.assert_array_equal(generated.tokens, jnp.argmax(logits[len(prompt) - 1:-1], axis=-1))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_sharded_step_equals_one_device(fused):
    """Segments shard over `fsdp` (never their layers axis) and over `layers` where it
    divides their depth; a step on the mesh gives the one-device numbers (the fused step
    refuses a `layers` axis: it runs on `fsdp`)."""
    from jax.sharding import PartitionSpec as P

    shapes = (bd.BlockShape(16, 1), bd.BlockShape(16, 1), bd.BlockShape(32, 0), bd.BlockShape(48, 2))
    config = BASE.replace(n_layers=4, layer_shapes=shapes)
    teacher = bd.Teacher(_random(BASE.replace(n_layers=4), seed=3))
    student = _random(config, seed=4)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, BASE.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    mesh = bd.make_mesh("data=2,fsdp=2,layers=2")
    sharded = bd.shard_model(student, mesh)
    pair, mlp_only, _ = sharded.layers.segments
    assert pair.mlp.up_proj.weight.sharding.spec == P("layers", None, "fsdp")  # [2, 16, 32]
    assert mlp_only.mlp.up_proj.weight.sharding.spec == P(None, "fsdp")  # [1, 32, 32]
    mesh = bd.make_mesh("data=2,fsdp=4") if fused else mesh
    objective = bd.DistillationObjective(blockwise_weight=0.5, inject_at="layer")
    results = []
    for on_mesh in (False, True):
        optimizer = optax.sgd(0.1)
        step = bd.DistillStep(objective, optimizer, mesh=mesh if on_mesh else None, fused=fused)
        model, frozen, batch = jax.tree.map(jnp.copy, student), teacher, (tokens, mask)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        if on_mesh:
            model = bd.shard_model(model, mesh)
            opt_state = bd.shard_opt_state(opt_state, model, mesh)
            frozen = bd.shard_model(teacher, mesh, shard_layers=False)
            batch = bd.shard_batch(mesh, tokens, mask)
        results.append(step(model, opt_state, frozen, *batch, 0))
    (one, _, metrics_one), (many, _, metrics_many) = results
    np.testing.assert_allclose(metrics_one["loss"], metrics_many["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-5)
