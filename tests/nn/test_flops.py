"""The analytic FLOP count (`bd.step_flops`, `bd.pretrain_flops`) behind MFU and the
cost-matched quality study."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import blockdistill as bd

TEACHER = bd.TransformerConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=16)
STUDENT = TEACHER.replace(mlp_dim=32, n_kv_heads=1)
SEQ, BATCH = 16, 3


def forward(cfg, parts=("qkv", "o", "core", "mlp")):
    """One layer's forward FLOPs on one sequence, written out by hand."""
    head_dim = cfg.dim // cfg.n_heads
    counts = {
        "qkv": 2 * SEQ * cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * head_dim,
        "o": 2 * SEQ * cfg.n_heads * head_dim * cfg.dim,
        "core": 4 * (SEQ * (SEQ + 1) // 2) * cfg.n_heads * head_dim,
        "mlp": 6 * SEQ * cfg.dim * cfg.mlp_dim,
    }
    return sum(counts[p] for p in parts)


def head(cfg):
    return 2 * SEQ * cfg.dim * cfg.vocab_size


def flops(**objective):
    return bd.step_flops(bd.DistillationObjective(**objective), TEACHER, STUDENT, seq_len=SEQ, batch=BATCH)


def test_layer_parts():
    assert sum(bd.layer_flops(TEACHER, SEQ).values()) == forward(TEACHER)


def test_each_recipe_counts_its_passes():
    t_layers = TEACHER.n_layers * forward(TEACHER)
    s_free = STUDENT.n_layers * forward(STUDENT) + head(STUDENT)
    kd = t_layers + head(TEACHER) + 3 * s_free
    assert flops(blockwise_weight=0.0) == BATCH * kd
    assert flops(blockwise_weight=0.0, label_weight=0.5) == BATCH * kd  # CE reuses the logits
    layer_blocks = 3 * STUDENT.n_layers * forward(STUDENT)
    assert flops(blockwise_weight=1.0, inject_at="layer") == BATCH * (t_layers + layer_blocks)
    assert flops(blockwise_weight=0.5, inject_at="layer") == BATCH * (kd + layer_blocks)
    # attention level: the teacher stops after the last layer's attention, and the
    # student's q/k/v projections read a constant input (weight gradient only)
    teacher_attention = (TEACHER.n_layers - 1) * forward(TEACHER) + forward(TEACHER, ("qkv", "o", "core"))
    attention_blocks = STUDENT.n_layers * (
        forward(STUDENT, ("qkv", "o", "core")) + forward(STUDENT, ("qkv",)) + 2 * forward(STUDENT, ("o", "core"))
    )
    assert flops(blockwise_weight=1.0) == BATCH * (teacher_attention + attention_blocks)
    # labels alone: the student's own training step, no teacher at all
    labels = flops(blockwise_weight=1.0, label_weight=1.0, teacher_weight=0.0)
    assert labels == BATCH * 3 * s_free == bd.pretrain_flops(STUDENT, seq_len=SEQ, batch=BATCH)


def test_a_heterogeneous_student_counts_each_layer_at_its_own_shape():
    """Each layer at its own shape: a narrower MLP, fewer KV heads, no attention, no MLP, a
    linear map (its dim x dim matmul), the identity (nothing)."""
    shapes = (bd.BlockShape(64, 2), bd.BlockShape(16, 1), bd.BlockShape(32, 0), bd.BlockShape(0, 2),
              bd.BlockShape(0, 0, linear=True), bd.BlockShape(0, 0))
    hetero = TEACHER.replace(n_layers=len(shapes), layer_shapes=shapes)
    own = [TEACHER.replace(mlp_dim=max(1, s.mlp_dim), n_kv_heads=max(1, s.n_kv_heads)) for s in shapes]
    attention = [forward(c, ("qkv", "o", "core")) if s.has_attention else 0 for c, s in zip(own, shapes)]
    mlp = [forward(c, ("mlp",)) if s.has_mlp else 0 for c, s in zip(own, shapes)]
    linear = 2 * SEQ * TEACHER.dim * TEACHER.dim
    layers = sum(attention) + sum(mlp) + linear
    assert bd.flops_per_token(hetero, SEQ) * SEQ == layers + head(hetero)
    assert bd.pretrain_flops(hetero, seq_len=SEQ, batch=BATCH) == BATCH * 3 * (layers + head(hetero))
    kd = bd.step_flops(bd.DistillationObjective(blockwise_weight=0.0), TEACHER, hetero, seq_len=SEQ, batch=BATCH)
    assert kd == BATCH * (TEACHER.n_layers * forward(TEACHER) + head(TEACHER) + 3 * (layers + head(hetero)))
    # layer level: every block forward and backward; attention level: the attention parts only
    t_layers = TEACHER.n_layers * forward(TEACHER)
    block = bd.step_flops(bd.DistillationObjective(inject_at="layer"), TEACHER, hetero, seq_len=SEQ, batch=BATCH)
    assert block == BATCH * (t_layers + 3 * layers)
    qkv = [forward(c, ("qkv",)) if s.has_attention else 0 for c, s in zip(own, shapes)]
    attn = bd.step_flops(bd.DistillationObjective(), TEACHER, hetero, seq_len=SEQ, batch=BATCH)
    teacher_attention = (TEACHER.n_layers - 1) * forward(TEACHER) + forward(TEACHER, ("qkv", "o", "core"))
    assert attn == BATCH * (teacher_attention + sum(attention) + sum(qkv) + 2 * (sum(attention) - sum(qkv)))


def test_a_schedule_counts_the_passes_active_at_the_step():
    objective = bd.DistillationObjective(blockwise_weight=optax.linear_schedule(1.0, 0.0, 4), inject_at="layer")
    count = [bd.step_flops(objective, TEACHER, STUDENT, seq_len=SEQ, batch=BATCH, step=s) for s in (0, 2, 4)]
    assert count == [flops(blockwise_weight=1.0, inject_at="layer"), flops(blockwise_weight=0.5, inject_at="layer"),
                     flops(blockwise_weight=0.0)]


def test_pretrain_count_against_xla():
    """XLA's own count of an unrolled training step: the same matmuls, plus elementwise
    work and the masked half of the attention scores, which the analytic count leaves out."""
    cfg = TEACHER.replace(scan_layers=False, attention_impl="xla")
    model = bd.Transformer(cfg, key=jax.random.key(0))
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)

    params, static = eqx.partition(model, eqx.is_array)

    def loss(params):
        model = eqx.combine(params, static)
        logits = jax.vmap(lambda t: model(t).logits)(tokens)
        return bd.next_token_cross_entropy(logits, tokens, jnp.ones(tokens.shape, bool))

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / bd.pretrain_flops(cfg, seq_len=SEQ, batch=BATCH)
    assert 1.0 <= ratio <= 1.3, ratio
