import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from blockdistill.distill.layer_map import default_layer_map
from blockdistill.distill.prune import StudentConfig, make_student, mlp_channel_importance

BASE = dict(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=16)
SEQ = 10
BASE_EPS = 1e-5  # TransformerConfig.norm_eps default


def make_teacher(seed=0, **kw):
    """A Transformer with random O(1)-scale weights (filled in numpy: no compilation)."""
    config = bd.TransformerConfig(**{**BASE, **kw})
    skeleton = eqx.filter_eval_shape(bd.Transformer, config, key=jax.random.key(0))
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in paths_leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "norm" in name:
            value = 1.0 + 0.1 * noise
        elif "bias" in name:
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = noise
        else:
            value = noise / np.sqrt(leaf.shape[-1])
        leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree.unflatten(treedef, leaves)


def calibration(seed=1, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, BASE["vocab_size"])


@eqx.filter_jit
def logits(model, tokens):
    return jax.vmap(model)(tokens).logits


def stacked(model):
    return model.layers.layers


def set_stacked(model, where, value):
    return eqx.tree_at(lambda m: where(m.layers.layers), model, value)


def with_identity_layers(model, indices):
    """Zero the o- and down-projections of `indices`: those layers pass x through."""
    layers = stacked(model)
    index = np.asarray(indices)
    o_proj = layers.self_attn.o_proj.weight.at[index].set(0.0)
    down = layers.mlp.down_proj.weight.at[index].set(0.0)
    model = set_stacked(model, lambda l: l.self_attn.o_proj.weight, o_proj)
    return set_stacked(model, lambda l: l.mlp.down_proj.weight, down)


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("extra", [{}, dict(qkv_bias=True, tie_embeddings=True)])
@pytest.mark.parametrize("with_calibration", [False, True])
def test_full_prune_equals_teacher(extra, with_calibration):
    teacher = make_teacher(**extra)
    tokens = calibration()
    student = make_student(
        teacher, StudentConfig(), tokens if with_calibration else None, key=jax.random.key(9)
    )
    assert student.config == teacher.config
    for s, t in zip(jax.tree.leaves(student), jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(s, t)
    np.testing.assert_array_equal(logits(student, tokens), logits(teacher, tokens))


# ----------------------------------------------------------------------------- MLP channels


def test_zero_channels_are_dropped_and_logits_unchanged():
    teacher = make_teacher()
    rng = np.random.default_rng(0)
    n_layers, mlp_dim = BASE["n_layers"], BASE["mlp_dim"]
    dead = np.stack([np.sort(rng.permutation(mlp_dim)[: mlp_dim // 2]) for _ in range(n_layers)])
    alive = np.stack([np.setdiff1d(np.arange(mlp_dim), row) for row in dead])
    rows = np.arange(n_layers)[:, None]
    for where in (lambda l: l.mlp.gate_proj.weight, lambda l: l.mlp.up_proj.weight):
        weight = where(stacked(teacher)).at[rows, dead].set(0.0)
        teacher = set_stacked(teacher, where, weight)
    tokens = calibration()

    importance = np.asarray(mlp_channel_importance(teacher, tokens))
    assert np.all(importance[rows, dead] == 0.0)
    assert np.all(importance[rows, alive] > 0.0)

    student = make_student(teacher, StudentConfig(mlp_ratio=0.5), tokens)
    assert student.config.mlp_dim == mlp_dim // 2
    t_mlp, s_mlp = stacked(teacher).mlp, stacked(student).mlp
    np.testing.assert_array_equal(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight[rows, alive])
    np.testing.assert_array_equal(s_mlp.up_proj.weight, t_mlp.up_proj.weight[rows, alive])
    np.testing.assert_array_equal(
        s_mlp.down_proj.weight, jnp.swapaxes(t_mlp.down_proj.weight, 1, 2)[rows, alive].swapaxes(1, 2)
    )
    np.testing.assert_allclose(logits(student, tokens), logits(teacher, tokens), atol=1e-5)


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight


def test_importance_matches_numpy_oracle_with_mask():
    teacher = make_teacher()
    tokens = calibration()
    mask = np.ones(tokens.shape, dtype=bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    states = jax.vmap(teacher)(tokens).states
    layers = stacked(teacher)
    expected = []
    for index in range(BASE["n_layers"]):
        hidden = np.asarray(states.layer_in[:, index] + states.attn_out[:, index], np.float64)
        normed = _rms_norm(
            hidden, np.asarray(layers.post_attention_layernorm.weight[index]), BASE_EPS
        )
        gate = normed @ np.asarray(layers.mlp.gate_proj.weight[index], np.float64).T
        up = normed @ np.asarray(layers.mlp.up_proj.weight[index], np.float64).T
        act = gate / (1.0 + np.exp(-gate)) * up
        # the oracle's activation is really what enters down_proj
        mlp_out = act @ np.asarray(layers.mlp.down_proj.weight[index], np.float64).T
        np.testing.assert_allclose(
            mlp_out, states.layer_out[:, index] - hidden, rtol=1e-4, atol=1e-4, err_msg=f"layer {index}"
        )
        expected.append(np.abs(act)[mask].mean(axis=0))
    importance = mlp_channel_importance(bd.Teacher(teacher), tokens, jnp.asarray(mask))
    assert importance.shape == (BASE["n_layers"], BASE["mlp_dim"])
    np.testing.assert_allclose(importance, np.stack(expected), rtol=1e-4, atol=1e-7)


def test_importance_ranking_keeps_the_loudest_channels():
    teacher = make_teacher()
    rng = np.random.default_rng(1)
    n_layers, mlp_dim, kept = BASE["n_layers"], BASE["mlp_dim"], BASE["mlp_dim"] // 4
    loud = np.stack([np.sort(rng.permutation(mlp_dim)[:kept]) for _ in range(n_layers)])
    rows = np.arange(n_layers)[:, None]
    up = stacked(teacher).mlp.up_proj.weight
    teacher = set_stacked(teacher, lambda l: l.mlp.up_proj.weight, up.at[rows, loud].multiply(100.0))
    tokens = calibration()

    importance = np.asarray(mlp_channel_importance(teacher, tokens))
    top = np.sort(np.argsort(-importance, axis=1)[:, :kept], axis=1)
    np.testing.assert_array_equal(top, loud)

    student = make_student(teacher, StudentConfig(mlp_ratio=0.25), tokens)
    assert student.config.mlp_dim == kept
    np.testing.assert_array_equal(
        stacked(student).mlp.gate_proj.weight, stacked(teacher).mlp.gate_proj.weight[rows, loud]
    )


# ----------------------------------------------------------------------------- depth


@pytest.mark.parametrize(
    "layers, n_layers, teacher_layers",
    [
        ("group", 2, [0, 2]),
        ("group", 1, [0]),
        ("group", 4, [0, 1, 2, 3]),
        ("every-k", 2, [1, 3]),
        ("every-k", 3, [0, 1, 3]),
        ("every-k", 1, [3]),
        ("all", None, [0, 1, 2, 3]),
    ],
)
def test_depth_reduction_keeps_documented_layers(layers, n_layers, teacher_layers):
    teacher = make_teacher()
    student = make_student(teacher, StudentConfig(layers=layers, n_layers=n_layers))
    assert student.config.n_layers == len(teacher_layers)
    index = np.asarray(teacher_layers)
    for s, t in zip(jax.tree.leaves(stacked(student)), jax.tree.leaves(stacked(teacher)), strict=True):
        np.testing.assert_array_equal(s, t[index])
    np.testing.assert_array_equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    np.testing.assert_array_equal(student.norm.weight, teacher.norm.weight)
    np.testing.assert_array_equal(student.lm_head.weight, teacher.lm_head.weight)


@pytest.mark.parametrize("layers, dropped", [("group", [1, 3]), ("every-k", [0, 2])])
def test_dropping_identity_layers_keeps_logits(layers, dropped):
    teacher = with_identity_layers(make_teacher(), dropped)
    tokens = calibration()
    student = make_student(teacher, StudentConfig(layers=layers, n_layers=2))
    expected = logits(teacher, tokens)
    np.testing.assert_allclose(logits(student, tokens), expected, rtol=1e-5, atol=1e-5)
    # the property is not vacuous: keeping the other layers changes the logits
    other = "every-k" if layers == "group" else "group"
    wrong = make_student(teacher, StudentConfig(layers=other, n_layers=2))
    assert not np.allclose(logits(wrong, tokens), expected, atol=1e-2)


def test_default_layer_map():
    assert default_layer_map(4, 2) == ((0, 2), (2, 4))
    assert default_layer_map(6, 3) == ((0, 2), (2, 4), (4, 6))
    assert default_layer_map(3, 3) == ((0, 1), (1, 2), (2, 3))
    assert default_layer_map(4, 1) == ((0, 4),)
    for teacher_layers, student_layers in [(4, 3), (2, 4)]:
        pattern = rf"teacher of {teacher_layers} layers into a student of {student_layers} layers"
        with pytest.raises(ValueError, match=pattern):
            default_layer_map(teacher_layers, student_layers)
    with pytest.raises(ValueError, match="student of 0 layers"):
        default_layer_map(4, 0)


# ----------------------------------------------------------------------------- KV heads


@pytest.mark.parametrize("n_kv_heads, ratio", [(4, 0.5), (2, 0.5), (4, 0.25)])
def test_merging_identical_kv_heads_keeps_logits(n_kv_heads, ratio):
    teacher = make_teacher(n_kv_heads=n_kv_heads, qkv_bias=True)
    head_dim = teacher.config.head_dim
    new_kv = int(n_kv_heads * ratio)
    group = n_kv_heads // new_kv
    # head h <- head (h // group) * group: every merged group holds copies of one head
    source = np.repeat(np.arange(0, n_kv_heads, group), group)
    rows = (source[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)
    for where in (
        lambda l: l.self_attn.k_proj.weight,
        lambda l: l.self_attn.v_proj.weight,
        lambda l: l.self_attn.k_proj.bias,
        lambda l: l.self_attn.v_proj.bias,
    ):
        param = where(stacked(teacher))
        param = param + 0.1 * jax.random.normal(jax.random.key(3), param.shape)  # nonzero biases
        teacher = set_stacked(teacher, where, param[:, rows])
    tokens = calibration()
    student = make_student(teacher, StudentConfig(kv_heads_ratio=ratio))
    assert student.config.n_kv_heads == new_kv and student.config.n_heads == BASE["n_heads"]
    s_attn, t_attn = stacked(student).self_attn, stacked(teacher).self_attn
    assert s_attn.k_proj.weight.shape == (BASE["n_layers"], new_kv * head_dim, BASE["dim"])
    np.testing.assert_array_equal(s_attn.q_proj.weight, t_attn.q_proj.weight)
    np.testing.assert_array_equal(s_attn.o_proj.weight, t_attn.o_proj.weight)
    np.testing.assert_allclose(logits(student, tokens), logits(teacher, tokens), atol=1e-5)


def test_kv_merge_averages_adjacent_heads():
    teacher = make_teacher(n_kv_heads=4, qkv_bias=True)
    bias = stacked(teacher).self_attn.k_proj.bias
    teacher = set_stacked(  # a nonzero bias, so that its average is checked too
        teacher, lambda l: l.self_attn.k_proj.bias, jax.random.normal(jax.random.key(4), bias.shape)
    )
    head_dim = teacher.config.head_dim
    student = make_student(teacher, StudentConfig(kv_heads_ratio=0.5))
    for name in ("k_proj", "v_proj"):
        for param in ("weight", "bias"):
            t = np.asarray(getattr(getattr(stacked(teacher).self_attn, name), param))
            s = np.asarray(getattr(getattr(stacked(student).self_attn, name), param))
            heads = t.reshape(BASE["n_layers"], 4, head_dim, *t.shape[2:])
            expected = (0.5 * (heads[:, 0::2] + heads[:, 1::2])).reshape(s.shape)
            np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- combined / random


def test_combined_reduction_is_a_valid_model():
    teacher = make_teacher()
    tokens = calibration()
    config = StudentConfig(mlp_ratio=0.5, layers="every-k", n_layers=2, kv_heads_ratio=0.5)
    student = make_student(bd.Teacher(teacher), config, tokens)
    assert (student.config.n_layers, student.config.mlp_dim, student.config.n_kv_heads) == (2, 24, 1)
    assert student.config == teacher.config.replace(n_layers=2, mlp_dim=24, n_kv_heads=1)
    # the channels of student layer j are ranked by the importance of its teacher layer
    kept_layers = np.asarray([1, 3])
    importance = np.asarray(mlp_channel_importance(teacher, tokens))[kept_layers]
    keep = np.sort(np.argsort(-importance, axis=1)[:, :24], axis=1)
    np.testing.assert_array_equal(
        stacked(student).mlp.up_proj.weight,
        stacked(teacher).mlp.up_proj.weight[kept_layers[:, None], keep],
    )
    out = logits(student, tokens)
    assert out.shape == (3, SEQ, BASE["vocab_size"]) and np.all(np.isfinite(out))


def test_random_init_has_reduced_shapes_and_differs_from_teacher():
    teacher = make_teacher()
    config = StudentConfig(init="random", mlp_ratio=0.5, layers="group", n_layers=2,
                           kv_heads_ratio=0.5, seed=5)
    student = make_student(teacher, config)  # no calibration needed
    cfg = student.config
    assert (cfg.n_layers, cfg.mlp_dim, cfg.n_kv_heads, cfg.n_heads) == (2, 24, 1, 4)
    reference = eqx.filter_eval_shape(bd.Transformer, cfg, key=jax.random.key(5))
    for s, r in zip(jax.tree.leaves(student), jax.tree.leaves(reference), strict=True):
        assert s.shape == r.shape and s.dtype == r.dtype
    layers = stacked(student)
    assert layers.mlp.down_proj.weight.shape == (2, BASE["dim"], 24)
    assert layers.self_attn.k_proj.weight.shape == (2, teacher.config.head_dim, BASE["dim"])
    assert not np.allclose(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert not np.allclose(layers.self_attn.q_proj.weight, stacked(teacher).self_attn.q_proj.weight[:2])
    # the seed decides the initialisation when no key is given
    again = make_student(teacher, config)
    np.testing.assert_array_equal(again.embed_tokens.weight, student.embed_tokens.weight)
    other = make_student(teacher, config.replace(seed=6))
    assert not np.allclose(other.embed_tokens.weight, student.embed_tokens.weight)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(init="copy"), "init"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(mlp_ratio=1.5), "mlp_ratio"),
        (dict(kv_heads_ratio=-0.5), "kv_heads_ratio"),
        (dict(layers="odd"), "layers"),
        (dict(layers="all", n_layers=2), "n_layers"),
        (dict(layers="group"), "n_layers"),
        (dict(layers="every-k", n_layers=0), "n_layers"),
    ],
)
def test_student_config_rejects_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"StudentConfig\.{field}="):
        StudentConfig(**changes)


def test_student_config_from_dict():
    config = StudentConfig(mlp_ratio=0.5, layers="group", n_layers=2, seed=3)
    assert StudentConfig.from_dict(config.to_dict()) == config
    assert StudentConfig.from_dict(StudentConfig().to_dict()) == StudentConfig()
    assert StudentConfig.from_dict({"mlp_ratio": 1, "kv_heads_ratio": 1}).mlp_ratio == 1.0
    with pytest.raises(ValueError, match=r"\['bogus', 'width'\]"):
        StudentConfig.from_dict({"width": 3, "bogus": 1, "init": "prune"})


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (dict(mlp_ratio=0.001), r"StudentConfig\.mlp_ratio=0\.001 .*mlp_dim=48"),
        (dict(layers="every-k", n_layers=5), r"StudentConfig\.n_layers=5 .*n_layers=4"),
        (dict(layers="group", n_layers=3), r"StudentConfig\.n_layers=3 .*n_layers=4 .*\[1, 2, 4\].*every-k"),
        (dict(kv_heads_ratio=0.75), r"StudentConfig\.kv_heads_ratio=0\.75 .*n_kv_heads=2"),
        (dict(kv_heads_ratio=0.3), r"StudentConfig\.kv_heads_ratio=0\.3 .*n_kv_heads=2"),
    ],
)
@pytest.mark.parametrize("init", ["prune", "random"])
def test_make_student_rejects_what_does_not_fit_the_teacher(changes, pattern, init):
    teacher = make_teacher()
    with pytest.raises(ValueError, match=pattern):
        make_student(teacher, StudentConfig(init=init, **changes), calibration())


def test_pruning_mlp_needs_calibration_tokens():
    with pytest.raises(ValueError, match="calibration_tokens"):
        make_student(make_teacher(), StudentConfig(mlp_ratio=0.5))
