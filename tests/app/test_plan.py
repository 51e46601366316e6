"""The memory planner: its abstract compile is the real step's (same temporaries), and
its per-device bytes are what the placed arrays of a real run hold."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import blockdistill as bd
from blockdistill.app.plan import parse_bytes, plan_memory
from blockdistill.app.cli import main

TEACHER = bd.TransformerConfig(vocab_size=128, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=64,
                               max_seq_len=32)
STUDENT = TEACHER.replace(mlp_dim=32, n_kv_heads=1)
RECIPES = [dict(blockwise_weight=0.0), dict(blockwise_weight=1.0, inject_at="layer", label_weight=0.5)]


def _placed_bytes(tree) -> int:
    """Bytes of one device's shards of the arrays of `tree`."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mesh_spec", [None, "data=2,layers=4"])
def test_the_plan_is_what_a_real_step_holds(recipe, mesh_spec):
    if mesh_spec is not None and len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = None if mesh_spec is None else bd.make_mesh(mesh_spec)
    objective = bd.DistillationObjective(**recipe)
    optimizer = bd.make_optimizer(1e-3)
    plan = plan_memory(TEACHER, STUDENT, objective, batch_size=8, seq_len=16, mesh=mesh, optimizer=optimizer,
                       device_memory=parse_bytes("1 GiB"))

    teacher = bd.Teacher(bd.Transformer(TEACHER, key=jax.random.key(0)))
    student = bd.Transformer(STUDENT, key=jax.random.key(1))
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    tokens = jnp.zeros((8, 16), jnp.int32)
    mask, segments = jnp.ones((8, 16), bool), jnp.ones((8, 16), jnp.int32)
    if mesh is not None:
        student = bd.shard_model(student, mesh)
        opt_state = bd.shard_opt_state(opt_state, student, mesh)
        teacher = bd.shard_model(teacher, mesh, shard_layers=False)
        tokens, mask, segments = bd.shard_batch(mesh, tokens, mask, segments)
    assert plan["student_params"] == _placed_bytes(student)
    assert plan["opt_state"] == _placed_bytes(opt_state)
    assert plan["teacher_params"] == _placed_bytes(teacher)
    assert plan["batch"] == _placed_bytes((tokens, mask, segments))
    compiled = bd.DistillStep(objective, optimizer, mesh=mesh).lower(
        student, opt_state, teacher, tokens, mask, 0, segment_ids=segments).compile()
    memory = compiled.memory_analysis()
    assert plan["temporaries"] == memory.temp_size_in_bytes
    assert plan["arguments"] == memory.argument_size_in_bytes
    assert plan["total"] >= plan["arguments"] + plan["temporaries"]
    assert plan["fits"] is True and plan["devices"] == (1 if mesh is None else 8)


def test_bad_device_memory_names_the_text():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("2 GiB") == 2 * 2**30 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="device memory '80 GX' is invalid"):
        parse_bytes("80 GX")


def test_cli_plans_a_hugging_face_shape_without_weights(tmp_path, capsys):
    config = tmp_path / "config.json"
    bd.to_hf(bd.Transformer(TEACHER, key=jax.random.key(0)), tmp_path / "hf")
    config.write_text((tmp_path / "hf" / "config.json").read_text())  # the config alone, no weights
    args = ["plan", "--teacher", str(config), "--batch-size", "4", "--seq-len", "16", "--device-memory", "1KB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teacher parameters" in out and "DOES NOT FIT" in out
    assert main(["plan", "--teacher", str(tmp_path / "nope.json")]) == 1
    assert "nope.json" in capsys.readouterr().err


def test_a_mesh_larger_than_this_process_is_planned_in_a_child_with_as_many_cpu_devices(tmp_path, capfd):
    bd.to_hf(bd.Transformer(TEACHER, key=jax.random.key(0)), tmp_path / "hf")
    devices = 2 * len(jax.devices())
    args = ["plan", "--teacher", str(tmp_path / "hf" / "config.json"), "--batch-size", str(devices),
            "--seq-len", "16", "--mesh", f"data={devices}"]
    assert main(args) == 0
    assert f"mesh data={devices}" in capfd.readouterr().out


def test_a_run_from_a_teacher_cache_is_planned_without_the_teacher(tmp_path, corpus, capsys):
    teacher_cfg = TEACHER.replace(vocab_size=256)
    model = bd.Transformer(teacher_cfg, key=jax.random.key(0))
    bd.to_hf(model, tmp_path / "hf")
    data = bd.token_dataset(corpus, bd.ByteTokenizer(), seq_len=16, cache=tmp_path / "tokens")
    cache = bd.build_teacher_cache(model, data.train, tmp_path / "cache", top_k=8, row_index=range(8))
    objective = bd.DistillationObjective(blockwise_weight=0.0)
    optimizer = bd.make_optimizer(1e-3)
    plan = plan_memory(teacher_cfg, STUDENT.replace(vocab_size=256), objective, batch_size=4, seq_len=16,
                       optimizer=optimizer, teacher_top_k=8)
    # what the real step from the cache holds: no teacher, the batch's top-k arrays
    student = bd.Transformer(STUDENT.replace(vocab_size=256), key=jax.random.key(1))
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    tokens, mask, segments = (jnp.asarray(a) for a in data.train.take(range(4)))
    cached = bd.TopKLogits(*(jnp.asarray(a) for a in cache.take(range(4))))
    compiled = bd.DistillStep(objective, optimizer).lower(
        student, opt_state, None, tokens, mask, 0, segment_ids=segments, teacher_logits=cached).compile()
    assert plan["teacher_params"] == 0
    assert plan["batch"] == _placed_bytes((tokens, mask, segments, cached))
    assert plan["temporaries"] == compiled.memory_analysis().temp_size_in_bytes

    # the command plans that step when given the cache, and says so; counts in a unit that fits
    args = ["plan", "--teacher", str(tmp_path / "hf" / "config.json"), "--batch-size", "4", "--seq-len", "16",
            "--teacher-cache", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher logits from" in printed and "(top 8)" in printed
    teacher_line = next(x for x in printed.splitlines() if x.strip().startswith("teacher parameters"))
    assert teacher_line.split()[-2:] == ["0", "B"]
    assert "0.00B" not in printed and "K parameters)" in printed  # 4 layers x 32 wide: thousands of parameters
    assert main([*args, "--seq-len", "8"]) == 1
    assert "was made for seq_len=16, this run has 8" in capsys.readouterr().err
