"""Sharded distillation on a `data` x `layers` mesh of 8 CPU devices (see conftest.py)."""

import json
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import blockdistill as bd
from blockdistill.testing import hlo_collectives
from blockdistill.parallel.mesh import check_mesh, make_mesh, parse_mesh
from blockdistill.parallel.sharding import host_arrays, shard_batch, shard_model, shard_opt_state
from blockdistill.app.trainer import TIMING_KEYS as TIMING
from blockdistill.app.cli import main

MOVING = ("all-gather", "all-to-all", "ragged-all-to-all", "collective-permute")
TINY = dict(vocab_size=256, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)


def test_eight_devices():
    assert jax.device_count() == 8, "conftest.py must set XLA_FLAGS before jax is imported"


# ------------------------------------------------------------------ meshes and rules


def test_parse_and_make_mesh():
    assert parse_mesh("data=2,layers=4") == {"data": 2, "fsdp": 1, "layers": 4}
    assert parse_mesh(" layers = 8 ") == {"data": 1, "fsdp": 1, "layers": 8}
    assert parse_mesh("fsdp=4,data=2") == {"data": 2, "fsdp": 4, "layers": 1}
    mesh = make_mesh("data=2,layers=4")
    assert mesh.axis_names == ("data", "fsdp", "layers")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "layers": 4}
    assert dict(make_mesh({"data": 8}).shape) == {"data": 8, "fsdp": 1, "layers": 1}
    one = make_mesh("data=1", devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("data=2,layers=3", ["data=2 x fsdp=1 x layers=3 = 6 devices", "8 devices"]),
        ("data=2,heads=4", ["unknown axis 'heads'", "('data', 'fsdp', 'layers')"]),
        ("data=0,layers=8", ["data=0", "positive"]),
        ("data=-2,layers=4", ["data=-2", "positive"]),
        ("data=two", ["data='two'", "not an integer"]),
        ("data=2,data=4", ["'data'", "twice"]),
        ("data2", ["'data2'", "AXIS=SIZE"]),
        ("", ["'data=N,layers=M'"]),
    ],
)
def test_bad_mesh_specs(spec, needles):
    with pytest.raises(ValueError) as info:
        make_mesh(spec)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_mesh_must_divide_batch_and_depth():
    mesh = make_mesh("data=2,layers=4")
    check_mesh(mesh, batch_size=8, n_layers=4)
    with pytest.raises(ValueError, match=r"batch_size=3 .* data=2"):
        check_mesh(mesh, batch_size=3)
    with pytest.raises(ValueError, match=r"n_layers=6, .* layers=4"):
        check_mesh(mesh, n_layers=6)
    model = bd.Transformer(bd.TransformerConfig(**{**TINY, "n_layers": 6}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"n_layers=6, .* layers=4"):
        shard_model(model, mesh)
    with pytest.raises(ValueError, match=r"batch_size=3 .* data=2"):
        shard_batch(mesh, np.zeros((3, 8), np.int32))


def test_sharding_rules():
    mesh = make_mesh("data=2,layers=4")
    student = bd.Transformer(bd.TransformerConfig(**TINY), key=jax.random.key(0))
    optimizer = bd.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    student = shard_model(student, mesh)
    opt_state = shard_opt_state(opt_state, student, mesh)
    layer_params = jax.tree.leaves(eqx.filter(student.layers.layers, eqx.is_array))
    assert layer_params and all(p.sharding.spec == P("layers") for p in layer_params)
    assert student.embed_tokens.weight.sharding.is_fully_replicated
    assert student.norm.weight.sharding.is_fully_replicated
    # Adam's mu and nu mirror the parameters: same placement, found by path and shape
    by_spec = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        by_spec.setdefault(leaf.sharding.spec, []).append(jax.tree_util.keystr(path))
    assert len(by_spec[P("layers")]) == 2 * len(layer_params)
    assert all(".layers.layers." in path for path in by_spec[P("layers")])
    assert all(".layers.layers." not in path for path in by_spec[P()])
    # each device holds one layer of every stacked parameter
    weight = student.layers.layers.mlp.gate_proj.weight
    assert {s.data.shape[0] for s in weight.addressable_shards} == {1}
    tokens, mask = shard_batch(mesh, np.zeros((4, 8), np.int32), np.ones((4, 8), bool))
    assert tokens.sharding.spec == P(("data", "fsdp")) and mask.shape == (4, 8)
    # host_arrays gathers whole arrays (what checkpoints store)
    host = host_arrays(student)
    assert isinstance(host.layers.layers.mlp.gate_proj.weight, np.ndarray)
    np.testing.assert_array_equal(host.layers.layers.mlp.gate_proj.weight, np.asarray(weight))


# ------------------------------------------------------------------ the compiled step


def test_hlo_collectives_reads_every_group_format():
    mesh = make_mesh("data=2,layers=4")  # partition p sits at (p // 4, p % 4)
    text = "\n".join([
        "  %ag = f32[4,8]{1,0} all-gather(f32[1,8]{1,0} %p), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
        "  %ar = (f32[], f32[2]{0}) all-reduce(f32[] %x, f32[2]{0} %y), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
        "  %cp = f32[8]{0} collective-permute(f32[8]{0} %x), source_target_pairs={{0,4},{4,0}}",
        "  %a2a = bf16[2,8]{1,0} all-to-all(bf16[2,8]{1,0} %x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
        (
            "  %ag2 = f32[4]{0} all-gather(f32[1]{0} %m), replica_groups=mesh['axis_0'=4,'axis_1'=2], "
            "device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}"
        ),
        "  ROOT %all = s32[] all-reduce(s32[] %z), replica_groups={}, to_apply=%add",
        "  %add.1 = f32[] add(f32[] %a, f32[] %b)",
    ])
    found = {c.name: c for c in hlo_collectives(text, mesh)}
    assert set(found) == {"ag", "ar", "cp", "a2a", "ag2", "all"}
    assert found["ag"].axes == ("layers",) and found["ag"].bytes == 128
    assert found["ar"].axes == ("data",) and found["ar"].shapes == ((), (2,)) and found["ar"].bytes == 12
    assert found["cp"].axes == ("data",)
    assert found["a2a"].axes == ("layers",) and found["a2a"].bytes == 32
    assert found["ag2"].axes == ("layers",) and found["ag2"].kind == "all-gather"
    assert found["all"].axes == ("data", "layers")


def _lowered_step(inject_at, injected_pass, mesh, teacher_layers=TINY["n_layers"]):
    cfg = bd.TransformerConfig(**TINY)
    teacher_model = bd.Transformer(cfg.replace(n_layers=teacher_layers), key=jax.random.key(0))
    teacher = shard_model(bd.Teacher(teacher_model), mesh, shard_layers=False)
    student = shard_model(bd.Transformer(cfg, key=jax.random.key(1)), mesh)
    optimizer = bd.make_optimizer(1e-3)
    opt_state = shard_opt_state(optimizer.init(eqx.filter(student, eqx.is_array)), student, mesh)
    objective = bd.DistillationObjective(blockwise_weight=1.0, inject_at=inject_at, injected_pass=injected_pass)
    rng = np.random.default_rng(0)
    tokens, mask = shard_batch(mesh, rng.integers(0, 256, (4, 32)).astype(np.int32), np.ones((4, 32), bool))
    step = bd.DistillStep(objective, optimizer, mesh=mesh)
    args = (student, opt_state, teacher, tokens, mask, 0)
    return step, args, step.lower(*args).compile().as_text()


def _moving_across_layers(collectives):
    return [c for c in collectives if c.kind in MOVING and "layers" in c.axes]


@pytest.mark.parametrize("inject_at, teacher_layers", [("layer", 4), ("attention", 4), ("layer", 8)])
def test_blockwise_step_moves_nothing_across_layers(inject_at, teacher_layers):
    """The compiled, partitioned blockwise step (vmap injected pass) has no collective
    that moves student parameters or injected states between `layers` devices.

    Method: `hlo_collectives` reads every collective of the compiled HLO and maps its
    device groups (replica_groups) to mesh coordinates. Allowed across `layers`:
    all-reduces of scalars (the loss, normalisers, the clipping norm) and gathering the
    `[layers]` vector of per-layer feature metrics. Parameters and states are
    `[1, ...]` or `[batch, 1, seq, dim]` shards, never of that size. With a deeper
    teacher (8 layers for 4: the default layer map), the states of each student layer's
    span are sliced locally too.
    """
    mesh = make_mesh("data=2,layers=4")
    n_layers = TINY["n_layers"]
    step, args, text = _lowered_step(inject_at, "vmap", mesh, teacher_layers)
    collectives = hlo_collectives(text, mesh)
    assert collectives, "a sharded step must reduce something"
    for c in _moving_across_layers(collectives):
        assert c.shapes == ((n_layers,),) and c.bytes == 4 * n_layers, c  # feature_per_layer
    for c in collectives:
        if "layers" in c.axes:
            assert all(int(np.prod(shape)) <= n_layers for shape in c.shapes), c
    # gradients of the stacked layers are summed over `data` only
    grads = [c for c in collectives if c.kind == "all-reduce" and any(len(s) == 3 for s in c.shapes)]
    assert grads and all(c.axes == ("data",) for c in grads)
    # and the step keeps the placement of what it was given (donated buffers)
    student, _, metrics = step(*args)
    assert student.layers.layers.mlp.down_proj.weight.sharding.spec == P("layers")
    assert metrics["feature_per_layer"].sharding.is_fully_replicated
    assert np.isfinite(float(metrics["loss"]))


def test_the_inspection_sees_gathered_parameters():
    """Positive control: the scan injected pass runs the layers one after the other, so
    XLA must gather the layer-sharded stack; the same inspection finds it."""
    mesh = make_mesh("data=2,layers=4")
    _, _, text = _lowered_step("layer", "scan", mesh)
    moving = _moving_across_layers(hlo_collectives(text, mesh))
    stacked_shape = (TINY["n_layers"], TINY["mlp_dim"], TINY["dim"])  # a whole MLP weight stack
    assert any(stacked_shape in c.shapes for c in moving), moving


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "model"
    bd.save_model(bd.Transformer(bd.TransformerConfig(**TINY), key=jax.random.key(0)), path)
    return path


def cli_args(out, teacher, corpus, mesh=None, **extra):
    # a random student keeps the losses away from 0, where 1e-4 relative is meaningful
    args = {
        "out": out, "teacher": teacher, "data": corpus, "steps": 6, "seq-len": 32, "batch-size": 4,
        "eval-every": 3, "eval-batches": 2, "checkpoint-every": 3, "log-every": 1, "seed": 3,
        "learning-rate": 3e-3, "warmup-steps": 2, "student-init": "random",
        # a schedule from blockwise into KD without labels: at first only the blockwise
        # pass runs, later both, and both are compared
        "blockwise-weight": 1, "blockwise-schedule": "linear", "label-weight": 0,
    }
    if mesh is not None:
        args["mesh"] = mesh
    args.update(extra)
    flat = ["distill", "--no-progress", "--no-plots"]
    for key, value in args.items():
        flat += [f"--{key}", str(value)]
    return flat


def read_metrics(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a, b, rtol=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = ra.keys() - TIMING
        assert keys == rb.keys() - TIMING
        for key in keys:
            np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=1e-6, err_msg=f"step {ra['step']} {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher, corpus):
    """The same 6-step run on one device, on a data=2,layers=4 mesh and on a fsdp=4,layers=2 mesh."""
    root = tmp_path_factory.mktemp("runs")
    for name, mesh in (("single", None), ("mesh", "data=2,layers=4"), ("fsdp", "fsdp=4,layers=2")):
        assert main(cli_args(root / name, teacher, corpus, mesh)) == 0
    return root


def test_mesh_run_equals_single_device_run(runs):
    single, sharded = read_metrics(runs / "single"), read_metrics(runs / "mesh")
    assert [r["step"] for r in sharded] == list(range(7))
    # the schedule mixes the blockwise and the KD pass: both are compared
    assert sharded[1]["kl"] == 0.0 and sharded[-1]["kl"] > 1e-3 and sharded[1]["feature"] > 0.01
    assert_same_losses(sharded, single)
    assert json.loads((runs / "mesh" / "config.json").read_text())["mesh"] == "data=2,layers=4"
    a, b = bd.load_model(runs / "single" / "student"), bd.load_model(runs / "mesh" / "student")
    tokens = jnp.arange(16)
    np.testing.assert_allclose(a(tokens).logits, b(tokens).logits, rtol=1e-4, atol=1e-4)


def test_fsdp_run_equals_single_device_run(runs):
    assert_same_losses(read_metrics(runs / "fsdp"), read_metrics(runs / "single"))


@pytest.mark.parametrize("source, mesh", [("mesh", "data=4,layers=2"), ("mesh", None), ("single", "data=2,layers=4"),
                                          ("fsdp", None), ("single", "fsdp=4,layers=2")])
def test_checkpoint_resumes_on_another_mesh(runs, tmp_path, teacher, corpus, capsys, source, mesh):
    """A checkpoint written on data=2,layers=4 resumes on another mesh and on one device,
    one written on one device resumes on 8, and the replayed steps give the losses of the
    uninterrupted run."""
    out = tmp_path / "resumed"
    shutil.copytree(runs / source, out)
    shutil.rmtree(out / "checkpoints" / "6")  # newest left: step 3
    assert main(cli_args(out, teacher, corpus, mesh)) == 0
    assert "resuming from" in capsys.readouterr().err
    assert_same_losses(read_metrics(out), read_metrics(runs / source))


def test_bad_meshes_from_the_cli(tmp_path, teacher, corpus, capsys):
    def error(*args, **extra):
        code = main(cli_args(tmp_path / "run", teacher, corpus, *args, **extra))
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and err.startswith("blockdistill: error:"), err
        assert not (tmp_path / "run").exists()
        return err

    assert "unknown axis 'model'" in error("data=2,model=4")
    assert "6 devices" in error("data=2,layers=3") and "8 devices" in error("data=2,layers=3")
    err = error("data=8", **{"batch-size": 4})
    assert "batch_size=4" in err and "data=8" in err
    err = error("layers=8")
    assert "n_layers=4" in err and "layers=8" in err
    config = tmp_path / "run.toml"
    config.write_text('[run]\nmesh = "data=2,layers=0"\n')
    assert "layers=0" in error(None, config=config)


# ------------------------------------------------------------------ several processes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, processes=2, devices=4):
    """Run `blockdistill ARGS` as `processes` processes of `devices` CPU devices each,
    joined by jax.distributed; returns their outputs (each must succeed)."""
    import os
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "blockdistill", *args, "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", str(processes), "--process-id", str(index)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(processes)
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs


@pytest.fixture(scope="module")
def two_processes(runs, teacher, corpus):
    """The `mesh` run (data=2,layers=4) again, as 2 processes of 4 devices each."""
    out = runs / "two-processes"
    launch(cli_args(out, teacher, corpus, "data=2,layers=4"))
    return out


def test_two_processes_equal_one_process(runs, two_processes):
    assert_same_losses(read_metrics(two_processes), read_metrics(runs / "mesh"))
    # process 0 writes the run; process 1 keeps its own metrics aside and writes nothing else
    assert (two_processes / "student").is_dir() and (two_processes / "summary.json").is_file()
    assert sorted(p.name for p in two_processes.iterdir() if p.name.startswith(".process")) == [".process-1"]
    a, b = bd.load_model(runs / "mesh" / "student"), bd.load_model(two_processes / "student")
    np.testing.assert_allclose(a(jnp.arange(16)).logits, b(jnp.arange(16)).logits, rtol=1e-5, atol=1e-5)


def test_checkpoints_move_between_one_and_two_processes(runs, two_processes, tmp_path, teacher, corpus, capsys):
    # written by 2 processes, resumed by 1 (this process's 8 devices)
    out = tmp_path / "to-one"
    shutil.copytree(two_processes, out)
    shutil.rmtree(out / "checkpoints" / "6")
    assert main(cli_args(out, teacher, corpus, "data=2,layers=4")) == 0
    assert "resuming from" in capsys.readouterr().err
    assert_same_losses(read_metrics(out), read_metrics(runs / "mesh"))
    # written by 1 process, resumed by 2
    out = tmp_path / "to-two"
    shutil.copytree(runs / "mesh", out)
    shutil.rmtree(out / "checkpoints" / "6")
    outputs = launch(cli_args(out, teacher, corpus, "data=2,layers=4"))
    assert all("resuming from" in output for output in outputs)
    assert_same_losses(read_metrics(out), read_metrics(runs / "mesh"))


def test_two_processes_cache_the_teacher_as_one(tmp_path, teacher, corpus):
    common = ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "32",
              "--batch-size", "8", "--steps", "3", "--top-k", "8", "--eval-batches", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one"), "--mesh", "data=8"]) == 0
    launch([*common, "--out", str(tmp_path / "two"), "--mesh", "data=8"])
    one, two = bd.TeacherCache(tmp_path / "one"), bd.TeacherCache(tmp_path / "two")
    assert one.num_cached == two.num_cached
    for a, b in zip(one.take(one.row_index), two.take(two.row_index)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=float(np.spacing(np.float16(8))))
