"""A/B measurements of candidate library changes (findings of `run.py`), side by side.

    python benchmarks/candidates.py --quick          # quick shapes of run.py
    python benchmarks/candidates.py --torch          # medium shapes, batch 4, with torch

The candidates are applied by monkeypatching blockdistill's private functions in this
process only (nothing in `src/` changes), each variant is compiled ahead of time into its
own executable, and all executables are timed round-robin like `run.py`:

- `linear`: `apply_linear` as `x @ W.T (+ b)` instead of `jax.vmap(eqx.nn.Linear)`, whose
  dot puts the output features first and needs a transpose of every activation.
- `attn`: causal attention in a heads-first layout (`[kv_heads, group * seq, head_dim]`
  batched matmuls, no 6-D/7-D GQA tensors) with causal key-block skipping (query block
  `i` only multiplies keys `0 .. (i + 1) * block`, block 128), instead of
  `jax.nn.dot_product_attention`, which on CPU builds, masks and transposes the full
  `seq x seq` score tensor.
- `fused`: a blockwise step that runs teacher layer `l` and student block `l` in the same
  scan step and takes the gradient of block `l`'s loss inside that step (the blocks are
  independent), so no `[layers, batch, seq, dim]` teacher state and no per-layer
  activation outlives its scan step; compared for step time and for compiled temporary
  bytes by depth.

These are measurements for whoever changes the library; when a candidate is adopted,
its patch here becomes a no-op comparison and can be deleted.
"""

import argparse
import statistics
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

import blockdistill as bd
import blockdistill.nn.attention as attention_module
import blockdistill.nn.layer as layer_module
import blockdistill.nn.model as model_module

# ----------------------------------------------------------------------------- patches

ORIGINAL_LINEAR = attention_module.apply_linear
ORIGINAL_ATTENTION_CALL = attention_module.Attention.__call__
VARIANT = {"name": "orig"}


def linear_as_matmul(linear, x):
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def causal_attention(q, k, v, block: int = 128):
    """`q: [seq, heads, hd]`, `k, v: [seq, kv_heads, hd]` -> `[seq, heads, hd]`."""
    seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    block = min(block, seq_len)
    while seq_len % block:
        block //= 2
    q_heads = q.reshape(seq_len, n_kv, group, head_dim).transpose(1, 2, 0, 3)
    k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    scale = jnp.asarray(head_dim**-0.5, q.dtype)
    outputs = []
    for index in range(seq_len // block):
        keys = (index + 1) * block
        q_block = q_heads[:, :, index * block : (index + 1) * block].reshape(
            n_kv, group * block, head_dim
        )
        scores = jnp.einsum("kqd,ksd->kqs", q_block, k_heads[:, :keys]) * scale
        causal = (
            jnp.arange(index * block, (index + 1) * block)[:, None]
            >= jnp.arange(keys)[None, :]
        )
        scores = jnp.where(
            jnp.tile(causal, (group, 1))[None],
            scores,
            jnp.asarray(-jnp.inf, scores.dtype),
        )
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("kqs,ksd->kqd", probs, v_heads[:, :keys])
        outputs.append(out.reshape(n_kv, group, block, head_dim))
    return (
        jnp.concatenate(outputs, axis=2)
        .transpose(2, 0, 1, 3)
        .reshape(seq_len, n_heads, head_dim)
    )


def patched_linear(linear, x):
    return (linear_as_matmul if "linear" in VARIANT["name"] else ORIGINAL_LINEAR)(
        linear, x
    )


def patched_attention_call(self, x, *, inject=None, segment_ids=None):
    if "attn" not in VARIANT["name"] or segment_ids is not None:  # the candidate has no segments
        return ORIGINAL_ATTENTION_CALL(self, x, inject=inject, segment_ids=segment_ids)
    attn_in = x if inject is None else inject.astype(x.dtype)
    seq_len = attn_in.shape[0]
    q = patched_linear(self.q_proj, attn_in).reshape(
        seq_len, self.n_heads, self.head_dim
    )
    k = patched_linear(self.k_proj, attn_in).reshape(
        seq_len, self.n_kv_heads, self.head_dim
    )
    v = patched_linear(self.v_proj, attn_in).reshape(
        seq_len, self.n_kv_heads, self.head_dim
    )
    inv_freq = attention_module.rope_inverse_frequencies(
        self.head_dim, self.rope_theta, self.rope_scaling
    )
    q = attention_module.apply_rope(q, inv_freq)
    k = attention_module.apply_rope(k, inv_freq)
    heads = causal_attention(q, k, v)
    return patched_linear(
        self.o_proj, heads.reshape(seq_len, self.n_heads * self.head_dim)
    )


# installed once, before anything is traced: Python caches special-method lookups
for module in (attention_module, layer_module, model_module):
    module.apply_linear = patched_linear
attention_module.Attention.__call__ = patched_attention_call


def use_variant(name: str) -> None:
    VARIANT["name"] = name
    jax.clear_caches()  # traced scan bodies are cached per function: retrace under `name`


# ----------------------------------------------------------------------------- fused step


def fused_blockwise_step(frozen, student, opt_state, *, optimizer, level):
    """Blockwise step (equal depths) with teacher and student fused layer by layer."""
    teacher, tokens, mask = frozen
    teacher_params, teacher_static = eqx.partition(
        teacher.model.layers.layers, eqx.is_array
    )
    student_params, student_static = eqx.partition(student.layers.layers, eqx.is_array)
    n_layers = student.config.n_layers

    def body(hidden, layer_params):
        teacher_layer_params, student_layer_params = layer_params
        teacher_layer = eqx.combine(
            jax.lax.stop_gradient(teacher_layer_params), teacher_static
        )
        teacher_step = jax.vmap(teacher_layer)(hidden)

        def block_loss(params):
            block = eqx.combine(params, student_static)
            if level == "layer":
                predicted = jax.vmap(
                    lambda x: block(x, inject=x, inject_at="layer").layer_out
                )(hidden)
                target = teacher_step.layer_out
            else:
                predicted = jax.vmap(block.self_attn)(teacher_step.attn_in)
                target = teacher_step.attn_out
            return bd.feature_loss(predicted, target, "cosine", mask)

        loss, grads = jax.value_and_grad(block_loss)(student_layer_params)
        return teacher_step.layer_out, (loss, grads)

    hidden = jax.vmap(teacher.model.embed)(tokens)
    _, (losses, layer_grads) = jax.lax.scan(
        body, hidden, (teacher_params, student_params)
    )
    params = eqx.filter(student, eqx.is_array)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads = eqx.tree_at(
        lambda m: m.layers.layers,
        grads,
        jax.tree.map(lambda g: g / n_layers, layer_grads),
    )
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(student, updates), opt_state, jnp.mean(losses)


fused_jitted = eqx.filter_jit(fused_blockwise_step, donate="all-except-first")


# ----------------------------------------------------------------------------- runners


def fresh(student):
    return jax.tree.map(
        lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student
    )


class CompiledStep:
    """An AOT-compiled library step (its own executable, immune to later patches)."""

    def __init__(self, kind, student, teacher, tokens, mask):
        kwargs, fused = bench.STEPS[kind]
        self.objective = bd.DistillationObjective(**kwargs)
        self.optimizer = bd.make_optimizer(1e-3)
        self.student = fresh(student)
        self.opt_state = self.optimizer.init(eqx.filter(self.student, eqx.is_array))
        self.frozen = (teacher, tokens, mask)
        self.compiled = bd.DistillStep(self.objective, self.optimizer, fused=fused).lower(
            self.student, self.opt_state, teacher, tokens, mask, 0
        ).compile()
        self.index = 0

    def __call__(self):
        self.student, self.opt_state, metrics = self.compiled(
            (*self.frozen, jnp.int32(self.index), None, None), self.student, self.opt_state
        )
        self.loss = float(metrics["loss"].block_until_ready())
        self.index += 1


class FusedStep:
    def __init__(self, level, student, teacher, tokens, mask):
        self.level = level
        self.optimizer = bd.make_optimizer(1e-3)
        self.student = fresh(student)
        self.opt_state = self.optimizer.init(eqx.filter(self.student, eqx.is_array))
        self.frozen = (teacher, tokens, mask)
        self.compiled = fused_jitted.lower(
            self.frozen,
            self.student,
            self.opt_state,
            optimizer=self.optimizer,
            level=level,
        ).compile()

    def __call__(self):
        self.student, self.opt_state, loss = self.compiled(
            self.frozen,
            self.student,
            self.opt_state,
            optimizer=self.optimizer,
            level=self.level,
        )
        self.loss = float(loss.block_until_ready())


def fused_memory(sizes) -> list[tuple[str, int, int, int]]:
    rows = []
    for level, kind in (
        ("attention", bench.DEFAULT_BLOCKWISE),
        ("layer", bench.LAYER_BLOCKWISE),
    ):
        for depth in sizes.depths:
            teacher_cfg, student_cfg = bench.sweep_configs(sizes, depth)
            teacher = bd.Teacher(bd.Transformer(teacher_cfg, key=jax.random.key(0)))
            student = bd.Transformer(student_cfg, key=jax.random.key(2))
            tokens, mask = bench.synthetic_batch(
                sizes.vocab_size, sizes.sweep_batch, sizes.sweep_seq_len
            )
            fused = FusedStep(level, student, teacher, tokens, mask).compiled.compiled
            library = bench.compile_step(
                kind, teacher_cfg, student_cfg, sizes, run=False
            )
            rows.append(
                (
                    level,
                    depth,
                    library["temp_bytes"],
                    fused.memory_analysis().temp_size_in_bytes,
                )
            )
            bench.log(
                f"  {level} depth {depth}: library {rows[-1][2] / 2**20:.1f} MiB, fused {rows[-1][3] / 2**20:.1f} MiB"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--torch", action="store_true", help="time the PyTorch peer too"
    )
    args = parser.parse_args()
    sizes = (
        bench.QUICK if args.quick else bench.Sizes(**{**vars(bench.FULL), "batch": 4})
    )
    teacher_cfg, student_cfg = bench.teacher_config(sizes), bench.student_config(sizes)
    teacher = bd.Teacher(bd.Transformer(teacher_cfg, key=jax.random.key(0)))
    student = bd.Transformer(student_cfg, key=jax.random.key(2))
    tokens, mask = bench.synthetic_batch(sizes.vocab_size, sizes.batch, sizes.seq_len)
    kinds = (bench.DEFAULT_BLOCKWISE, bench.LAYER_BLOCKWISE, "kd")
    runners = {}
    for variant in ("orig", "linear", "attn", "linear+attn"):
        use_variant(variant)
        for kind in kinds:
            runners[(kind, variant)] = CompiledStep(
                kind, student, teacher, tokens, mask
            )
    use_variant("orig")
    runners[(bench.DEFAULT_BLOCKWISE, "fused")] = FusedStep(
        "attention", student, teacher, tokens, mask
    )
    runners[(bench.LAYER_BLOCKWISE, "fused")] = FusedStep(
        "layer", student, teacher, tokens, mask
    )
    use_variant("linear+attn")
    runners[(bench.DEFAULT_BLOCKWISE, "fused+linear+attn")] = FusedStep(
        "attention", student, teacher, tokens, mask
    )
    runners[(bench.LAYER_BLOCKWISE, "fused+linear+attn")] = FusedStep(
        "layer", student, teacher, tokens, mask
    )
    if args.torch:
        import os
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as folder:
            peer = bench.TorchBlockwisePeer(
                str(bd.to_hf(teacher.model, os.path.join(folder, "teacher"))),
                str(bd.to_hf(student, os.path.join(folder, "student"))),
                np.asarray(tokens),
                bench.cpu_threads(),
            )
        runners[(bench.LAYER_BLOCKWISE, "torch peer")] = peer
    for runner in runners.values():
        runner()
    wall, cpu = bench.round_robin(
        {f"{k}/{v}": r for (k, v), r in runners.items()}, args.rounds
    )

    print(
        f"A/B at batch {sizes.batch} x seq {sizes.seq_len}, teacher {teacher_cfg.n_layers} layers dim {teacher_cfg.dim}"
    )
    print()
    print(
        "| step | variant | best s | time / orig (paired) | (best) | (median CPU s) "
        "| loss at the last step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for (kind, variant), runner in runners.items():
        name, base = f"{kind}/{variant}", f"{kind}/orig"
        paired = statistics.median(a / b for a, b in zip(wall[name], wall[base]))
        best = min(wall[name]) / min(wall[base])
        by_cpu = statistics.median(cpu[name]) / statistics.median(cpu[base])
        loss = (
            runner.last_loss
            if isinstance(runner, bench.TorchBlockwisePeer)
            else runner.loss
        )
        print(
            f"| {kind} | {variant} | {min(wall[name]):.3f} | {paired:.3f} | {best:.3f} | "
            f"{by_cpu:.3f} | {loss:.5f} |"
        )

    print()
    print(
        "compiled temporary bytes by depth (sweep shapes of run.py), library vs fused:"
    )
    print()
    print("| level | depth | library MiB | fused MiB |")
    print("|---|---:|---:|---:|")
    use_variant("orig")
    for level, depth, library, fused in fused_memory(sizes):
        print(f"| {level} | {depth} | {library / 2**20:.1f} | {fused / 2**20:.1f} |")


if __name__ == "__main__":
    main()
