"""The fused step (teacher and student layer by layer in one scan) equals the unfused one."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd

BASE = dict(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32)
TEACHER = bd.TransformerConfig(**BASE)
BATCH, SEQ = 2, 10


@pytest.fixture(scope="module")
def batch():
    teacher = bd.Teacher(bd.Transformer(TEACHER, key=jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, BASE["vocab_size"])
    mask = jnp.ones(tokens.shape, bool).at[0, -3:].set(False)
    segment_ids = jnp.array([[1] * 4 + [2] * 6, [1] * SEQ])  # the first row packs two documents
    return teacher, tokens, mask, segment_ids


def run(objective, student_cfg, batch, fused, *, steps=2, trainable="all", remat="none"):
    """Metrics and updates of a few steps with plain SGD, so that an update is the
    gradient itself (Adam would amplify round-off in near-zero gradients)."""
    teacher, tokens, mask, segment_ids = batch
    student = bd.Transformer(student_cfg.replace(remat=remat), key=jax.random.key(3))
    optimizer = optax.sgd(0.5)  # updates large next to the parameters: no cancellation in after - before
    if trainable != "all":
        optimizer = optax.multi_transform(
            {"train": optimizer, "freeze": optax.set_to_zero()},
            lambda params: bd.trainable_labels(params, trainable),
        )
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    step = bd.DistillStep(objective, optimizer, fused=fused, trainable=trainable)
    records, updates = [], []
    for index in range(steps):
        before = jax.tree.map(np.asarray, eqx.filter(student, eqx.is_array))
        student, opt_state, metrics = step(student, opt_state, teacher, tokens, mask, index, segment_ids=segment_ids)
        after = jax.tree.map(np.asarray, eqx.filter(student, eqx.is_array))
        records.append(jax.tree.map(np.asarray, metrics))
        updates.append((jax.tree.map(lambda a, b: a - b, after, before), before))
    return records, updates


def assert_same(unfused, fused):
    (records_a, updates_a), (records_b, updates_b) = unfused, fused
    for record_a, record_b in zip(records_a, records_b, strict=True):
        assert record_a.keys() == record_b.keys()
        for key in record_a:
            np.testing.assert_allclose(record_b[key], record_a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for (update_a, params), (update_b, _) in zip(updates_a, updates_b, strict=True):
        leaves_a, leaves_b = jax.tree.leaves(update_a), jax.tree.leaves(update_b)
        scale = max(float(np.max(np.abs(leaf))) for leaf in leaves_a)
        for a, b, param in zip(leaves_a, leaves_b, jax.tree.leaves(params), strict=True):
            # 1e-5 of the largest update, plus the float32 rounding of `after - before`
            rounding = 4 * np.finfo(np.float32).eps * np.abs(param)
            np.testing.assert_array_less(np.abs(b - a), 1e-5 * scale + rounding + 1e-30)


HALF_MLP = TEACHER.replace(mlp_dim=24)
HALF_KV = TEACHER.replace(n_kv_heads=1)
HALF_DEPTH = TEACHER.replace(n_layers=2)

RECIPES = {
    "layer-cosine": (dict(blockwise_weight=1.0, inject_at="layer"), HALF_MLP),
    "layer-l2": (dict(blockwise_weight=1.0, inject_at="layer", feature_loss="l2"), HALF_MLP),
    "layer-nmse+ce": (dict(blockwise_weight=1.0, inject_at="layer", feature_loss="nmse", label_weight=0.5), HALF_MLP),
    "attention": (dict(blockwise_weight=1.0, inject_at="attention"), HALF_KV),
    "attention-mix": (dict(blockwise_weight=0.5, inject_at="attention", temperature=2.0), HALF_KV),
    "mix+ce": (dict(blockwise_weight=0.5, inject_at="layer", label_weight=0.5), HALF_MLP),
    "selected-layers": (dict(blockwise_weight=0.7, inject_at="layer", layer_indices=(0, 2)), HALF_MLP),
    "kd": (dict(blockwise_weight=0.0, temperature=2.0), HALF_MLP),
    "grouped": (dict(blockwise_weight=1.0, inject_at="layer"), HALF_DEPTH),
    "grouped-mix+ce": (dict(blockwise_weight=0.5, inject_at="layer", label_weight=0.3, feature_loss="nmse"), HALF_DEPTH),
    "half-teacher-mix+ce": (dict(blockwise_weight=0.5, inject_at="layer", label_weight=0.5, teacher_weight=0.5), HALF_MLP),
    "unrolled-mix+ce": (dict(blockwise_weight=0.5, inject_at="layer", label_weight=0.5), HALF_MLP.replace(scan_layers=False)),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_fused_equals_unfused(batch, recipe):
    fields, student_cfg = RECIPES[recipe]
    objective = bd.DistillationObjective(**fields)
    assert_same(run(objective, student_cfg, batch, False), run(objective, student_cfg, batch, True))


@pytest.mark.parametrize(
    "schedule",
    [
        optax.linear_schedule(1.0, 0.0, 2),  # w: 1 (KD skipped), 0.5, then 0 (blockwise skipped)
        optax.linear_schedule(0.0, 1.0, 2),
    ],
)
def test_fused_equals_unfused_under_schedules(batch, schedule):
    objective = bd.DistillationObjective(blockwise_weight=schedule, inject_at="layer", label_weight=0.0)
    unfused = run(objective, HALF_MLP, batch, False, steps=3)
    fused = run(objective, HALF_MLP, batch, True, steps=3)
    assert_same(unfused, fused)
    weights = [float(record["blockwise_weight"]) for record in fused[0]]
    assert weights == [schedule(0), schedule(1), schedule(2)]


def test_a_scheduled_pass_is_skipped_at_run_time(batch):
    """Under a schedule the fused step branches (`lax.cond`) around the blocks, the free
    layers and the heads, so a pass whose weight is 0 at a step costs nothing then; with
    constant weights nothing branches."""
    teacher, tokens, mask, _ = batch
    student = bd.Transformer(HALF_MLP, key=jax.random.key(3))
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))

    def branches(weight):
        objective = bd.DistillationObjective(blockwise_weight=weight, inject_at="layer")
        step = bd.DistillStep(objective, optimizer, fused=True)
        return step.lower(student, opt_state, teacher, tokens, mask, 0).as_text().count("stablehlo.case")

    assert branches(optax.linear_schedule(1.0, 0.0, 4)) >= 3
    assert branches(0.5) == 0


def test_fused_with_frozen_groups_and_remat(batch):
    objective = bd.DistillationObjective(blockwise_weight=0.5, inject_at="layer", label_weight=0.5)
    unfused = run(objective, HALF_MLP, batch, False, trainable="attention")
    fused = run(objective, HALF_MLP, batch, True, trainable="attention", remat="full")
    assert_same(unfused, fused)
    mlp_update = fused[1][0][0].layers.layers.mlp.up_proj.weight  # (update, params) of step 0
    assert np.all(mlp_update == 0)  # frozen


def test_auto_fuses_where_it_applies(batch):
    teacher, *_ = batch
    student = bd.Transformer(HALF_MLP, key=jax.random.key(3))
    optimizer = bd.make_optimizer(1e-3)
    blockwise = bd.DistillationObjective(blockwise_weight=1.0, inject_at="layer")
    assert bd.DistillStep(blockwise, optimizer).uses_fusion(teacher, student)
    assert not bd.DistillStep(blockwise, optimizer, fused=False).uses_fusion(teacher, student)
    kd = bd.DistillationObjective(blockwise_weight=0.0)
    assert not bd.DistillStep(kd, optimizer).uses_fusion(teacher, student)
    # an uneven layer map: auto falls back, fused=True says why
    uneven = bd.DistillationObjective(blockwise_weight=1.0, inject_at="layer", layer_map=((0, 1), (1, 4)))
    shallow = bd.Transformer(HALF_DEPTH, key=jax.random.key(3))
    assert not bd.DistillStep(uneven, optimizer).uses_fusion(teacher, shallow)
    with pytest.raises(ValueError, match=r"fused=True.*not equal contiguous spans"):
        bd.DistillStep(uneven, optimizer, fused=True).uses_fusion(teacher, shallow)
    # a mesh that shards the layers keeps each block on its own device: unfused
    mesh = bd.make_mesh("data=4,layers=2")
    assert not bd.DistillStep(blockwise, optimizer, mesh=mesh).uses_fusion(teacher, student)
    with pytest.raises(ValueError, match="shards the layers"):
        bd.DistillStep(blockwise, optimizer, mesh=mesh, fused=True).uses_fusion(teacher, student)
    with pytest.raises(ValueError, match="DistillStep.fused='yes' is invalid"):
        bd.DistillStep(blockwise, optimizer, fused="yes")
