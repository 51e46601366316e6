"""The `fsdp` mesh axis: parameters, optimizer state and the teacher split over it, the
batch over `data` x `fsdp`, one layer's weights gathered at a time inside the scan, and the
same numbers as one device."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import blockdistill as bd
from blockdistill.testing import hlo_collectives

# three layers: no activation or batch dimension of the test has that length
TEACHER = bd.TransformerConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=64,
                               max_seq_len=32)
STUDENT = TEACHER.replace(mlp_dim=32)
RECIPES = {
    "kd": (dict(blockwise_weight=0.0, label_weight=0.5), False),
    "attention": (dict(blockwise_weight=0.5, inject_at="attention"), False),
    "attention-fused": (dict(blockwise_weight=0.5, inject_at="attention"), True),
    "layer": (dict(blockwise_weight=1.0, inject_at="layer"), False),
    "layer-fused": (dict(blockwise_weight=0.5, inject_at="layer"), True),
}


def _models(depth):
    teacher = bd.Teacher(bd.Transformer(TEACHER.replace(n_layers=depth), key=jax.random.key(0)))
    student = bd.Transformer(STUDENT.replace(n_layers=depth), key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, TEACHER.vocab_size)
    mask = jnp.ones(tokens.shape, bool).at[3, 12:].set(False)
    return teacher, student, tokens, mask


@pytest.fixture(scope="module")
def models():
    return _models(TEACHER.n_layers)


@pytest.fixture(scope="module")
def models4():  # a depth that a layers=2 axis divides
    return _models(4)


def _step(models, recipe, fused, mesh, *, lower=False):
    teacher, student, tokens, mask = models
    optimizer = optax.sgd(0.1)  # updates proportional to gradients
    step = bd.DistillStep(bd.DistillationObjective(**recipe), optimizer, mesh=mesh, fused=fused)
    model = jax.tree.map(jnp.copy, student)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model = bd.shard_model(model, mesh)
        opt_state = bd.shard_opt_state(opt_state, model, mesh)
        teacher = bd.shard_model(teacher, mesh, shard_layers=False)
        tokens, mask = bd.shard_batch(mesh, tokens, mask)
    if lower:
        return step.lower(model, opt_state, teacher, tokens, mask, 0).compile().as_text()
    return step(model, opt_state, teacher, tokens, mask, 0)


def test_fsdp_splits_every_parameter_and_the_batch():
    mesh = bd.make_mesh("data=2,fsdp=4")
    student = bd.shard_model(bd.Transformer(STUDENT, key=jax.random.key(0)), mesh)
    teacher = bd.shard_model(bd.Teacher(bd.Transformer(TEACHER, key=jax.random.key(0))), mesh, shard_layers=False)
    # the largest dimension fsdp divides, never the stacked layers axis
    assert student.layers.layers.mlp.up_proj.weight.sharding.spec == P("layers", "fsdp")  # [layers, 32, 32]
    assert teacher.model.layers.layers.mlp.up_proj.weight.sharding.spec == P(None, "fsdp")  # [layers, 64, 32]
    assert student.embed_tokens.weight.sharding.spec == P("fsdp")  # [96, 32]
    for model in (student, teacher):
        for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
            assert "fsdp" in leaf.sharding.spec, leaf.shape
    optimizer = bd.make_optimizer(1e-3)
    opt_state = bd.shard_opt_state(optimizer.init(eqx.filter(student, eqx.is_array)), student, mesh)
    mirrored = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0]
    assert mirrored and all("fsdp" in leaf.sharding.spec for leaf in mirrored)
    tokens, = bd.shard_batch(mesh, np.zeros((8, 16), np.int32))
    assert tokens.sharding.spec == P(("data", "fsdp")) and {s.data.shape for s in tokens.addressable_shards} == {(1, 16)}
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the mesh's data=2 x fsdp=4 axes"):
        bd.check_mesh(mesh, batch_size=4)


@pytest.mark.parametrize("name, spec", [
    ("kd", "data=2,fsdp=4"), ("kd", "data=2,fsdp=2,layers=2"), ("attention", "fsdp=8"),
    ("attention-fused", "data=2,fsdp=4"), ("layer", "data=2,fsdp=2,layers=2"), ("layer-fused", "fsdp=8"),
])
def test_fsdp_step_equals_one_device(models, models4, name, spec):
    """Every recipe kind, fused and unfused, on a mesh with fsdp (the fused step never runs
    on a layers axis)."""
    recipe, fused = RECIPES[name]
    if "layers" in spec:
        models = models4
    reference, _, ref_metrics = _step(models, recipe, fused, None)
    sharded, _, metrics = _step(models, recipe, fused, bd.make_mesh(spec))
    for key in ("loss", "kl", "ce", "feature", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(eqx.filter(sharded, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(reference, eqx.is_array))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kd", "layer", "layer-fused"])
def test_the_scan_gathers_one_layer_at_a_time(models, name):
    """Every all-gather over `fsdp` of a stacked layer weight sits in a loop body and moves
    one layer of it; none gathers a whole stack."""
    recipe, fused = RECIPES[name]
    mesh = bd.make_mesh("data=2,fsdp=4")
    text = _step(models, recipe, fused, mesh, lower=True)
    _, student, _, _ = models
    stacked = {tuple(x.shape[1:]) for x in jax.tree.leaves(eqx.filter(student.layers.layers, eqx.is_array))}
    stacked |= {tuple(x.shape[1:]) for x in jax.tree.leaves(eqx.filter(models[0].model.layers.layers, eqx.is_array))}
    gathers = [c for c in hlo_collectives(text, mesh) if c.kind == "all-gather" and "fsdp" in c.axes]
    whole = [c for c in gathers for shape in c.shapes if shape[:1] == (TEACHER.n_layers,) and shape[1:] in stacked]
    assert not whole, whole
    per_layer = [c for c in gathers if any(shape[:1] == (1,) and shape[1:] in stacked for shape in c.shapes)]
    assert per_layer and all(c.in_loop and c.trips == TEACHER.n_layers for c in per_layer)
