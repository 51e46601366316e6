import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import blockdistill as bd

BASE = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32)
SEQ = 12


def make(scan_layers=True, seed=0, **kw):
    cfg = bd.TransformerConfig(**{**BASE, **kw, "scan_layers": scan_layers})
    return bd.Transformer(cfg, key=jax.random.key(seed))


def tokens(seed=1, seq=SEQ):
    return jax.random.randint(jax.random.key(seed), (seq,), 0, BASE["vocab_size"])


def perturb_layer(model, index, scale=0.5, seed=7):
    """Add noise to every parameter of stacked layer `index` only."""
    params, static = eqx.partition(model.layers.layers, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [p.at[index].add(scale * jax.random.normal(k, p.shape[1:])) for p, k in zip(leaves, keys)]
    layers = eqx.combine(jax.tree.unflatten(treedef, new), static)
    return eqx.tree_at(lambda m: m.layers.layers, model, layers)


def assert_states_close(a, b, atol=1e-5):
    for name in ("attn_in", "attn_out", "layer_in", "layer_out"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(dim=30), "dim"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(mlp_dim=-1), "mlp_dim"),
        (dict(dtype="float64x"), "dtype"),
        (dict(remat="sometimes"), "remat"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_config_rejects_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}="):
        bd.TransformerConfig(**{**BASE, **changes})


def test_config_roundtrip_and_unknown_keys():
    cfg = bd.TransformerConfig(**BASE, rope_scaling=bd.RopeScaling(factor=8.0))
    assert bd.TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_layer"):
        bd.TransformerConfig.from_dict({**BASE, "n_layer": 3})


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_scan_equals_unrolled(inject_at):
    scanned, unrolled = make(scan_layers=True), make(scan_layers=False)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled)):
        np.testing.assert_array_equal(a, b)
    toks = tokens()
    out_s, out_u = scanned(toks), unrolled(toks)
    np.testing.assert_allclose(out_s.logits, out_u.logits, atol=1e-5)
    assert_states_close(out_s.states, out_u.states)
    inject = jax.random.normal(jax.random.key(3), (BASE["n_layers"], SEQ, BASE["dim"]))
    inj_s = scanned(toks, inject=inject, inject_at=inject_at)
    inj_u = unrolled(toks, inject=inject, inject_at=inject_at)
    np.testing.assert_allclose(inj_s.logits, inj_u.logits, atol=1e-5)
    assert_states_close(inj_s.states, inj_u.states)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_plain_forward_chains_layers(scan_layers):
    model = make(scan_layers)
    states = model(tokens()).states
    np.testing.assert_allclose(states.layer_out[:-1], states.layer_in[1:], atol=1e-6)
    np.testing.assert_allclose(states.layer_in[0], model.embed(tokens()), atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_own_states_reproduce_own_outputs(scan_layers):
    model = make(scan_layers)
    toks = tokens()
    plain = model(toks).states
    at_attn = model(toks, inject=plain.attn_in).states
    np.testing.assert_allclose(at_attn.attn_out, plain.attn_out, atol=1e-5)
    np.testing.assert_allclose(at_attn.layer_out, plain.layer_out, atol=1e-5)
    at_layer = model(toks, inject=plain.layer_in, inject_at="layer").states
    np.testing.assert_allclose(at_layer.layer_out, plain.layer_out, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_inject_is_the_block_input(scan_layers, inject_at):
    model = make(scan_layers)
    inject = jax.random.normal(jax.random.key(5), (BASE["n_layers"], SEQ, BASE["dim"]))
    states = model(tokens(), inject=inject, inject_at=inject_at).states
    seen = states.attn_in if inject_at == "attention" else states.layer_in
    np.testing.assert_array_equal(seen, inject)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_injected_blocks_are_independent(scan_layers, inject_at):
    model = make(scan_layers)
    toks = tokens()
    inject = jax.random.normal(jax.random.key(5), (BASE["n_layers"], SEQ, BASE["dim"]))
    name = "attn_out" if inject_at == "attention" else "layer_out"
    before = getattr(model(toks, inject=inject, inject_at=inject_at).states, name)
    for k in range(BASE["n_layers"]):
        after = getattr(perturb_layer(model, k)(toks, inject=inject, inject_at=inject_at).states, name)
        changed = np.abs(np.asarray(after - before)).max(axis=(1, 2)) > 1e-4
        assert changed.tolist() == [layer == k for layer in range(BASE["n_layers"])], (k, changed)


@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_layer_parallel_vmap_equals_scan(inject_at):
    model = make(True)
    toks = tokens()
    inject = jax.random.normal(jax.random.key(5), (BASE["n_layers"], SEQ, BASE["dim"]))
    name = "attn_out" if inject_at == "attention" else "layer_out"
    scanned = getattr(model(toks, inject=inject, inject_at=inject_at).states, name)
    parallel = model.blockwise_outputs(toks, inject, inject_at=inject_at)
    np.testing.assert_allclose(parallel, scanned, atol=1e-5)


def test_gqa_and_causality():
    model = make()
    toks = tokens()
    changed = toks.at[-1].set((toks[-1] + 1) % BASE["vocab_size"])
    a, b = model(toks).logits, model(changed).logits
    np.testing.assert_allclose(a[:-1], b[:-1], atol=1e-6)  # the future does not leak
    assert np.abs(np.asarray(a[-1] - b[-1])).max() > 1e-4


# ----------------------------------------------------------------------------- packed rows

DOCS = (7, 1, 5)  # document lengths (BOS included) of a packed row, then 3 padding slots


def packed_row():
    rows = bd.pack_tokens(
        [np.asarray(tokens(seed, n - 1)) for seed, n in enumerate(DOCS, start=11)], SEQ + 4, bos_id=0
    )
    return jnp.asarray(rows.tokens[0]), jnp.asarray(rows.segment_ids[0])


def test_segment_positions():
    positions = bd.segment_positions(jnp.array([1, 1, 1, 2, 3, 3, 0, 0]))
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_packed_row_equals_each_document(scan_layers):
    """Every document of a packed row gets the logits and states it gets on its own."""
    model = make(scan_layers)
    row, segments = packed_row()
    packed = model(row, segment_ids=segments)
    mixed = model(row)  # without segment ids, documents see each other
    start = 0
    for n in DOCS:
        own = model(row[start : start + n])
        np.testing.assert_allclose(packed.logits[start : start + n], own.logits, atol=1e-5)
        for name in ("attn_in", "attn_out", "layer_in", "layer_out"):
            np.testing.assert_allclose(
                getattr(packed.states, name)[:, start : start + n], getattr(own.states, name), atol=1e-5
            )
        start += n
    assert np.abs(np.asarray(mixed.logits[DOCS[0]:start] - packed.logits[DOCS[0]:start])).max() > 1e-3


@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_packed_injected_passes_equal_each_document(inject_at):
    """The injected passes (scan and layer-parallel vmap) keep to each document too."""
    teacher, student = make(seed=0), make(seed=3, mlp_dim=24)
    row, segments = packed_row()
    teacher_states = teacher(row, segment_ids=segments).states
    inject = teacher_states.attn_in if inject_at == "attention" else teacher_states.layer_in
    name = "attn_out" if inject_at == "attention" else "layer_out"
    scanned = getattr(student(row, inject=inject, inject_at=inject_at, segment_ids=segments).states, name)
    parallel = student.blockwise_outputs(row, inject, inject_at=inject_at, segment_ids=segments)
    np.testing.assert_allclose(parallel, scanned, atol=1e-5)
    start = 0
    for n in DOCS:
        doc = row[start : start + n]
        own_inject = getattr(teacher(doc).states, "attn_in" if inject_at == "attention" else "layer_in")
        own = getattr(student(doc, inject=own_inject, inject_at=inject_at).states, name)
        np.testing.assert_allclose(scanned[:, start : start + n], own, atol=1e-5)
        start += n


def test_segment_ids_must_match_tokens():
    model = make()
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        model(tokens(), segment_ids=jnp.ones((SEQ + 1,), jnp.int32))


# ----------------------------------------------------------------------------- attention kernels


@pytest.mark.parametrize("seq_len", [5, 128, 200])  # below, at and across the 128-row block
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_attention_equals_xla(seq_len, packed):
    from blockdistill.nn.attention import blocked_attention

    kq, kk, kv = jax.random.split(jax.random.key(seq_len), 3)
    q = jax.random.normal(kq, (seq_len, 8, 16))
    k, v = jax.random.normal(kk, (seq_len, 2, 16)), jax.random.normal(kv, (seq_len, 2, 16))  # GQA
    segments = jnp.asarray(np.arange(seq_len) * 3 // seq_len + 1) if packed else None
    mask = None if segments is None else (segments[:, None] == segments[None, :])[None]

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

    def blocked(q, k, v):
        return blocked_attention(q, k, v, segments)

    np.testing.assert_allclose(blocked(q, k, v), xla(q, k, v), atol=1e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v) for f in (xla, blocked)]
    for reference, ours in zip(*grads):
        np.testing.assert_allclose(ours, reference, atol=1e-5 * float(jnp.max(jnp.abs(reference))))


@pytest.mark.parametrize("inject_at", ["attention", "layer"])
def test_models_agree_across_attention_kernels(inject_at):
    xla, blocked = make(attention_impl="xla"), make(attention_impl="blocked")
    row, segments = packed_row()
    out_x, out_b = xla(row, segment_ids=segments), blocked(row, segment_ids=segments)
    np.testing.assert_allclose(out_b.logits, out_x.logits, atol=1e-5)
    inject = out_x.states.attn_in if inject_at == "attention" else out_x.states.layer_in

    def loss(model):
        out = model(row, inject=inject, inject_at=inject_at, segment_ids=segments)
        return jnp.mean(out.states.layer_out**2) + jnp.mean(jax.nn.log_softmax(out.logits))

    g_x, g_b = eqx.filter_grad(loss)(xla), eqx.filter_grad(loss)(blocked)
    for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_auto_attention_is_blocked_on_cpu():
    from blockdistill.nn.attention import resolve_attention_impl

    assert jax.default_backend() == "cpu"
    assert resolve_attention_impl("auto", jnp.float32) == "blocked"
    assert resolve_attention_impl("auto", jnp.bfloat16) == "blocked"
    assert resolve_attention_impl("xla", jnp.float32) == "xla"


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_values_and_grads(remat):
    plain, rematted = make(), make(remat=remat)
    toks = tokens()

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(toks).logits))

    (l1, g1), (l2, g2) = (eqx.filter_value_and_grad(loss)(m) for m in (plain, rematted))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_tied_embeddings_and_batching():
    model = make(tie_embeddings=True)
    assert model.lm_head is None
    batch = jnp.stack([tokens(1), tokens(2)])
    out = jax.vmap(model)(batch)
    assert out.logits.shape == (2, SEQ, BASE["vocab_size"])
    assert out.states.attn_out.shape == (2, BASE["n_layers"], SEQ, BASE["dim"])
    np.testing.assert_allclose(out.logits[1], model(tokens(2)).logits, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
    fp32, bf16 = make(), make(dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(eqx.filter(bf16, eqx.is_inexact_array)))
    # jax.nn.dot_product_attention itself promotes bf16 with float32 internally, which
    # the suite's strict promotion forbids; our own code is strict-clean.
    with jax.numpy_dtype_promotion("standard"):
        out32, out16 = fp32(tokens()), bf16(tokens())
    assert out16.logits.dtype == jnp.float32
    assert out16.states.attn_out.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(out32.logits)).max()
    np.testing.assert_allclose(out16.logits, out32.logits, atol=0.05 * scale)


def test_rope_scaling_changes_only_long_wavelengths():
    from blockdistill.nn.attention import rope_inverse_frequencies

    plain = rope_inverse_frequencies(64, 500000.0)
    scaled = rope_inverse_frequencies(64, 500000.0, bd.RopeScaling(factor=8.0, original_max_position_embeddings=64))
    np.testing.assert_allclose(scaled[:2], plain[:2])  # high frequencies kept
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # low ones divided


# ----------------------------------------------------------------------------- teacher


def test_teacher_outputs_and_zero_gradient():
    model = make()
    teacher = bd.Teacher(model)
    toks = tokens()
    out_t, out_m = teacher(toks), model(toks)
    np.testing.assert_array_equal(out_t.logits, out_m.logits)
    assert_states_close(out_t.states, out_m.states, atol=0)

    def through_teacher(teacher):
        out = teacher(toks)
        return jnp.sum(out.logits**2) + jnp.sum(out.states.attn_out**2)

    grads = eqx.filter_grad(through_teacher)(teacher)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    # wrapping the model in a Teacher inside the loss still blocks every gradient ...
    bare = eqx.filter_grad(lambda m: through_teacher(bd.Teacher(m)))(model)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(bare))
    # ... while the same kind of loss on the bare model does have gradients
    direct = eqx.filter_grad(lambda m: jnp.sum(m(toks).logits ** 2))(model)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(direct))


# ----------------------------------------------------------------------------- bad input


def test_wrong_shapes_fail_the_runtime_shape_check():
    model = make()
    with pytest.raises(jaxtyping.TypeCheckError):
        model(jnp.stack([tokens(), tokens()]))  # a batch given to a single-example model
    with pytest.raises(jaxtyping.TypeCheckError):
        model(tokens(), inject=jnp.zeros((BASE["n_layers"], SEQ + 1, BASE["dim"])))  # seq
    with pytest.raises(jaxtyping.TypeCheckError):
        model(tokens().astype(jnp.float32))  # not token ids


@pytest.mark.parametrize("shape", [(2, SEQ, 32), (3, SEQ, 16)])
def test_wrong_layers_or_width_is_value_error(shape):
    model = make()
    with pytest.raises(ValueError, match=r"expected \(3, 12, 32\)"):
        model(tokens(), inject=jnp.zeros(shape))


def test_value_error_without_runtime_type_checking():
    """Outside the test suite (no jaxtyping hook) the same mistakes name both shapes."""
    code = """
import jax, jax.numpy as jnp, blockdistill as bd
cfg = bd.TransformerConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48)
model = bd.Transformer(cfg, key=jax.random.key(0))
for shape in [(2, 12, 32), (3, 12, 16)]:
    try:
        model(jnp.arange(12), inject=jnp.zeros(shape))
    except ValueError as e:
        print("ValueError:", e)
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.count("ValueError:") == 2, out.stdout + out.stderr
    assert "(2, 12, 32)" in out.stdout and "(3, 12, 16)" in out.stdout
    assert out.stdout.count("expected (3, 12, 32)") == 2
