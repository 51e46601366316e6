"""Heterogeneous students: layers of different shapes, each stored and run at its own shape."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd

BASE = bd.TransformerConfig(
    vocab_size=64, dim=32, n_layers=6, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32,
    attention_impl="xla",
)
SHAPES = (
    bd.BlockShape(48, 2),  # the widest layer
    bd.BlockShape(16, 1),  # narrower MLP, one KV head
    bd.BlockShape(32, 0),  # MLP only
    bd.BlockShape(0, 2),  # attention only
    bd.BlockShape(0, 0, linear=True),
    bd.BlockShape(0, 0),  # identity
)


#: stacks in which no layer has attention / an MLP: those parts are not computed at all
ATTENTION_FREE = (bd.BlockShape(32, 0), bd.BlockShape(0, 0, linear=True), bd.BlockShape(16, 0))
MLP_FREE = (bd.BlockShape(0, 2), bd.BlockShape(0, 1), bd.BlockShape(0, 0))


def _hetero(shapes=SHAPES, **changes):
    return BASE.replace(n_layers=len(shapes), layer_shapes=shapes, **changes)


def _randomised(model, key):
    """Every weight random (norms and linear maps too)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def _reference_layer(config, weights, shape, x):
    """Layer `x -> out` of `shape` computed from its own weights with real-sized modules."""
    if shape.linear:  # x + W rmsnorm(x), as DeciLM's replace_with_linear attention
        norm = eqx.tree_at(lambda n: n.weight, bd.RMSNorm(config.dim), weights["input_layernorm.weight"])
        return x + norm(x) @ weights["self_attn.linear_attn.weight"].T
    out = x
    if shape.has_attention:
        own = config.replace(n_kv_heads=shape.n_kv_heads, layer_shapes=None)
        attention = bd.Attention(own, key=jax.random.key(0))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attention = eqx.tree_at(lambda a: getattr(a, name).weight, attention, weights[f"self_attn.{name}.weight"])
        norm = eqx.tree_at(lambda n: n.weight, bd.RMSNorm(config.dim), weights["input_layernorm.weight"])
        out = out + attention(norm(out))
    if shape.has_mlp:
        norm = eqx.tree_at(lambda n: n.weight, bd.RMSNorm(config.dim), weights["post_attention_layernorm.weight"])
        hidden = norm(out)
        act = jax.nn.silu(hidden @ weights["mlp.gate_proj.weight"].T) * (hidden @ weights["mlp.up_proj.weight"].T)
        out = out + act @ weights["mlp.down_proj.weight"].T
    return out


@pytest.mark.parametrize(
    "shapes,scan_layers",
    [(SHAPES, True), (SHAPES, False), (ATTENTION_FREE, True), (MLP_FREE, True)],
    ids=["mixed-scan", "mixed-unrolled", "attention-free", "mlp-free"],
)
def test_stack_equals_the_layers_run_one_by_one(shapes, scan_layers):
    config = _hetero(shapes, scan_layers=scan_layers)
    model = _randomised(bd.Transformer(config, key=jax.random.key(0)), jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (20,), 0, config.vocab_size)
    out = model(tokens)
    x = model.embed(tokens)
    for layer, shape in enumerate(shapes):
        weights = bd.own_weights(model, layer)
        expected = _reference_layer(config, weights, shape, x)
        np.testing.assert_allclose(out.states.layer_in[layer], x, atol=1e-5)
        np.testing.assert_allclose(out.states.layer_out[layer], expected, atol=1e-5, rtol=1e-5)
        x = expected
    np.testing.assert_allclose(out.logits, model.head(x), atol=1e-5, rtol=1e-5)
    # the layer-parallel blockwise pass gives the same blocks
    parallel = model.blockwise_outputs(tokens, out.states.layer_in, inject_at="layer")
    np.testing.assert_allclose(parallel, out.states.layer_out, atol=1e-5, rtol=1e-5)


def test_uniform_shapes_equal_the_uniform_model():
    """A heterogeneous config whose every layer is the config's own shape is the model."""
    config = BASE.replace(n_layers=2)
    model = bd.Transformer(config, key=jax.random.key(0))
    hetero = config.replace(layer_shapes=(bd.BlockShape(48, 2),) * 2)
    twin = bd.Transformer(hetero, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(twin), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.arange(12)
    np.testing.assert_allclose(model(tokens).logits, twin(tokens).logits, atol=1e-6)


def test_layers_are_stored_at_their_own_shape_and_all_learn():
    """One stack per run of equal layers, each at its shape; every stored weight gets a
    gradient, and the identity stores nothing."""
    shapes = SHAPES[:2] + (SHAPES[1],) + SHAPES[2:]  # two equal layers share a segment
    config = _hetero(shapes)
    model = _randomised(bd.Transformer(config, key=jax.random.key(0)), jax.random.key(1))
    assert model.layers.bounds == ((0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7))
    assert [segment.block_shape for segment in model.layers.segments] == list(dict.fromkeys(shapes))
    narrow = model.layers.segments[1]
    assert narrow.mlp.gate_proj.weight.shape == (2, 16, config.dim)
    assert narrow.self_attn.k_proj.weight.shape == (2, config.head_dim, config.dim)
    mlp_only, attention_only, linear, identity = model.layers.segments[2:]
    assert mlp_only.self_attn is None and mlp_only.input_layernorm is None
    assert attention_only.mlp is None and attention_only.post_attention_layernorm is None
    assert linear.self_attn is None and linear.mlp is None and linear.linear.weight.shape == (1, 32, 32)
    assert jax.tree.leaves(eqx.filter(identity, eqx.is_array)) == []
    tokens = jnp.arange(16) % config.vocab_size

    def loss(model):
        return jnp.mean(jnp.square(model(tokens).logits))

    grads = eqx.filter_grad(loss)(model)
    for layer in range(config.n_layers):
        segment = next(i for i, (a, b) in enumerate(model.layers.bounds) if a <= layer < b)
        offset = layer - model.layers.bounds[segment][0]
        for grad in jax.tree.leaves(grads.layers.segments[segment]):
            assert np.any(np.asarray(grad[offset])), layer


def test_counts_follow_the_shapes():
    uniform = BASE
    model = bd.Transformer(uniform, key=jax.random.key(0))
    assert bd.parameter_count(uniform) == sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    config = _hetero()
    model = bd.Transformer(config, key=jax.random.key(0))
    own = sum(v.size for layer in range(config.n_layers) for v in bd.own_weights(model, layer).values())
    outer = model.embed_tokens.weight.size + model.lm_head.weight.size + model.norm.weight.size
    assert bd.parameter_count(config) == own + outer
    assert bd.kv_cache_bytes_per_token(config) == 2 * (2 + 1 + 2) * config.head_dim * 2
    per_layer = [bd.block_flops_per_token(config, s, 16) for s in SHAPES]
    assert per_layer[-1] == 0 and per_layer[4] == 2 * config.dim**2
    np.testing.assert_allclose(
        bd.flops_per_token(uniform, 16) * 16,
        uniform.n_layers * sum(bd.layer_flops(uniform, 16).values()) + 2 * 16 * uniform.dim * uniform.vocab_size,
    )


def test_config_round_trip_and_errors(tmp_path):
    config = _hetero()
    assert bd.TransformerConfig.from_dict(config.to_dict()) == config
    model = bd.Transformer(config, key=jax.random.key(3))
    bd.save_model(model, tmp_path / "m")
    loaded = bd.load_model(tmp_path / "m")
    assert loaded.config == config
    tokens = jnp.arange(10)
    np.testing.assert_allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"layer_shapes.*has 2 entries for n_layers=6"):
        BASE.replace(layer_shapes=SHAPES[:2])
    with pytest.raises(ValueError, match=r"layer_shapes\[0\].mlp_dim=64.*exceeds mlp_dim=48"):
        BASE.replace(layer_shapes=(bd.BlockShape(64, 2),) + SHAPES[1:])
    with pytest.raises(ValueError, match=r"layer_shapes\[1\].n_kv_heads=3"):
        BASE.replace(n_kv_heads=4, layer_shapes=(SHAPES[0], bd.BlockShape(16, 3)) + SHAPES[2:])
    with pytest.raises(ValueError, match="BlockShape.linear=True"):
        bd.BlockShape(16, 0, linear=True)
    with pytest.raises(ValueError, match="BlockShape.mlp_dim=-1"):
        bd.BlockShape(-1, 0)


def test_distill_step_trains_a_heterogeneous_student():
    """Fused and unfused steps run a heterogeneous student (one scan per segment) alike."""
    teacher_cfg = BASE.replace(n_layers=2)
    teacher = bd.Teacher(bd.Transformer(teacher_cfg, key=jax.random.key(0)))
    student_cfg = teacher_cfg.replace(layer_shapes=(bd.BlockShape(16, 1), bd.BlockShape(48, 0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, teacher_cfg.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    objective = bd.DistillationObjective(blockwise_weight=0.5, inject_at="layer")
    results = []
    for fused in (False, True):
        student = bd.Transformer(student_cfg, key=jax.random.key(2))
        optimizer = bd.make_optimizer(1e-2)
        opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
        step = bd.DistillStep(objective=objective, optimizer=optimizer, fused=fused)
        for index in range(2):
            student, opt_state, metrics = step(student, opt_state, teacher, tokens, mask, jnp.asarray(index))
        results.append((student, metrics))
        narrow, mlp_only = student.layers.segments
        assert narrow.mlp.gate_proj.weight.shape == (1, 16, teacher_cfg.dim) and mlp_only.self_attn is None
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
