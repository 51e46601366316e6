"""The `blockdistill` command end to end on a tiny teacher and corpus."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from blockdistill.app.checkpoint import list_checkpoints, load_checkpoint_model
from blockdistill.app.trainer import TIMING_KEYS as TIMING
from blockdistill.app.cli import main
from helpers import REPO_ROOT



@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cfg = bd.TransformerConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)
    path = tmp_path_factory.mktemp("teacher") / "model"
    bd.save_model(bd.Transformer(cfg, key=jax.random.key(0)), path)
    return path


def base_args(out, teacher, corpus, **extra):
    args = {
        "out": out, "teacher": teacher, "data": corpus, "steps": 12, "seq-len": 64, "batch-size": 4,
        "eval-every": 6, "eval-batches": 2, "checkpoint-every": 4, "log-every": 1, "seed": 3,
        "learning-rate": 3e-3, "warmup-steps": 2,
    }
    args.update(extra)
    flat = ["distill", "--no-progress", "--no-plots"]
    for key, value in args.items():
        if isinstance(value, bool):  # a switch: --key / --no-key
            flat.append(f"--{key}" if value else f"--no-{key}")
        else:
            flat += [f"--{key}", str(value)]
    return flat


def read_metrics(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_metrics_close(a, b, rtol=1e-5):
    a, b = without_timing(a), without_timing(b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra.keys(), rb.keys())
        for key in ra:
            np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=1e-7, err_msg=f"step {ra['step']} {key}")


def snapshot(folder):
    folder = pathlib.Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def run_main(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_distill_writes_everything(tmp_path, teacher, corpus, capsys):
    out = tmp_path / "run"
    # a recipe with both terms, so that every metric and plot is written
    args = [a for a in base_args(out, teacher, corpus, **{"blockwise-weight": 0.5}) if a != "--no-plots"]
    code, stdout, _ = run_main(args, capsys)
    assert code == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(13))
    evals = [r for r in records if "eval/student_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in records[1:]:
        assert {"loss", "kl", "feature", "feature_per_layer"} <= r.keys()
    assert all("tokens_per_s" in r for r in records[2:])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12", "4", "8"]
    assert (out / "loss.png").stat().st_size > 0 and (out / "feature_per_layer.png").stat().st_size > 0
    student = bd.load_model(out / "student")
    assert student.config.mlp_dim == 32  # pruned to half by default
    assert "closed" in stdout and "teacher" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(evals[-1]["eval/student_loss"])


def test_same_seed_gives_identical_metrics(tmp_path, teacher, corpus, capsys):
    for name in ("a", "b"):
        assert run_main(base_args(tmp_path / name, teacher, corpus, steps=6, **{"eval-every": 3}), capsys)[0] == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert without_timing(a) == without_timing(b)
    c_args = base_args(tmp_path / "c", teacher, corpus, steps=6, seed=4, **{"eval-every": 3})
    assert run_main(c_args, capsys)[0] == 0
    assert without_timing(read_metrics(tmp_path / "c")) != without_timing(a)


def test_staged_and_label_only_runs(tmp_path, teacher, corpus, capsys):
    """`staged` runs blockwise alone, then KD + CE, never both in one step; labels alone
    (`teacher_weight=0`) never reads the teacher; `train_flops` counts what ran."""
    out = tmp_path / "staged"
    args = base_args(out, teacher, corpus, steps=6, **{
        "eval-every": 3, "blockwise-schedule": "staged", "blockwise-weight": 1.0, "blockwise-steps": 3,
        "inject-at": "layer", "label-weight": 0.5,
    })
    assert run_main(args, capsys)[0] == 0
    records = read_metrics(out)[1:]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records[:3]:
        assert r["blockwise_weight"] == 1.0 and r["kl"] == r["ce"] == 0.0 and r["feature"] > 0
    for r in records[3:]:
        assert r["blockwise_weight"] == 0.0 and r["feature"] == 0.0 and r["kl"] > 0 and r["ce"] > 0
    teacher_cfg = bd.load_model(teacher).config
    student_cfg = bd.load_model(out / "student").config
    shapes = dict(seq_len=64, batch=4)
    block = bd.step_flops(bd.DistillationObjective(inject_at="layer"), teacher_cfg, student_cfg, **shapes)
    kdce = bd.step_flops(bd.DistillationObjective(blockwise_weight=0.0, label_weight=0.5), teacher_cfg, student_cfg, **shapes)
    expected = [block, 2 * block, 3 * block, 3 * block + kdce, 3 * block + 2 * kdce, 3 * block + 3 * kdce]
    np.testing.assert_allclose([r["train_flops"] for r in records], expected, rtol=1e-12)

    out = tmp_path / "labels"
    args = base_args(out, teacher, corpus, steps=3, **{"eval-every": 3, "teacher-weight": 0.0, "label-weight": 1.0})
    assert run_main(args, capsys)[0] == 0
    records = read_metrics(out)[1:]
    assert all(r["kl"] == r["feature"] == 0.0 and r["ce"] > 0 for r in records)
    step = bd.pretrain_flops(student_cfg, **shapes)  # the student's own training step
    np.testing.assert_allclose([r["train_flops"] for r in records], [step, 2 * step, 3 * step], rtol=1e-12)
    code, _, err = run_main(base_args(tmp_path / "nothing", teacher, corpus, **{"teacher-weight": 0.0, "label-weight": 0.0}), capsys)
    assert_one_line_error(code, err, "teacher_weight=0", "label_weight")


def _cli_subprocess(args):
    code = (
        "import sys\n"
        "from jaxtyping import install_import_hook\n"
        "with install_import_hook('blockdistill', 'beartype.beartype'):\n"
        "    from blockdistill.app.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, teacher, corpus, capsys):
    steps = 60
    extra = {"steps": steps, "checkpoint-every": 5, "eval-every": 20}
    reference = tmp_path / "reference"
    assert run_main(base_args(reference, teacher, corpus, **extra), capsys)[0] == 0

    killed = tmp_path / "killed"
    args = base_args(killed, teacher, corpus, **extra)
    process = _cli_subprocess(args)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "5").is_dir():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = read_metrics(killed)[-1]["step"]
    assert interrupted_at < steps, "the run finished before it could be killed"

    code, _, err = run_main(args, capsys)
    assert code == 0
    assert "resuming from" in err
    assert_metrics_close(read_metrics(killed), read_metrics(reference))


def test_sigkill_during_an_asynchronous_save_loses_nothing(tmp_path, teacher, corpus, capsys):
    """Checkpoints are written in the background while training goes on: a run killed
    while one is being written (its temporary folder on disk) resumes from the newest
    complete one and equals an uninterrupted run."""
    steps = 40
    extra = {"steps": steps, "checkpoint-every": 1, "eval-every": 20, "keep-checkpoints": 2}
    reference = tmp_path / "reference"
    assert run_main(base_args(reference, teacher, corpus, **extra), capsys)[0] == 0
    for attempt in range(3):  # the save must be caught in flight; it takes tens of milliseconds
        killed = tmp_path / f"killed{attempt}"
        process = _cli_subprocess(base_args(killed, teacher, corpus, **extra))
        deadline = time.time() + 120
        # a complete checkpoint first, then a save in flight
        while not (list_checkpoints(killed) and list((killed / "checkpoints").glob("*.orbax-checkpoint-tmp*"))):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no checkpoint was started"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if list((killed / "checkpoints").glob("*.orbax-checkpoint-tmp*")):
            break
    else:
        pytest.fail("the kill never landed during a save")
    code, _, err = run_main(base_args(killed, teacher, corpus, **extra), capsys)
    assert code == 0, err
    assert "resuming from" in err
    assert not list((killed / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # cleaned up
    assert_metrics_close(read_metrics(killed), read_metrics(reference))


def test_ctrl_c_writes_a_checkpoint_and_resumes(tmp_path, teacher, corpus, capsys):
    out = tmp_path / "run"
    args = base_args(out, teacher, corpus, steps=400, **{"checkpoint-every": 1000, "eval-every": 1000})
    process = _cli_subprocess(args)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 4:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    step = read_metrics(out)[-1]["step"]
    assert (out / "checkpoints" / str(step)).is_dir(), err
    assert f"interrupted at step {step}" in err.decode()


def test_resume_with_other_steps_is_refused_and_extend_keeps_the_schedules(tmp_path, teacher, corpus, capsys):
    out = tmp_path / "run"
    extra = {"blockwise-schedule": "linear", "label-weight": 0.5, "checkpoint-every": 4, "eval-every": 4}
    assert run_main(base_args(out, teacher, corpus, steps=8, **extra), capsys)[0] == 0
    before = snapshot(out)
    # more steps or fewer: either would rebuild the schedules of the steps already run
    for steps in (12, 4):
        code, _, err = run_main(base_args(out, teacher, corpus, steps=steps, **extra), capsys)
        assert code == 1, err
        assert f"steps: 8 -> {steps}" in err and "learning-rate schedule" in err and "--extend" in err
        assert snapshot(out) == before  # nothing written
    # --extend trains on with the saved schedules: equal to a run whose schedules were
    # built for 8 steps from the start
    code, _, err = run_main(base_args(out, teacher, corpus, steps=12, extend=True, **extra), capsys)
    assert code == 0, err
    assert "resuming from" in err
    reference = tmp_path / "reference"
    args = base_args(reference, teacher, corpus, steps=12, **{"schedule-steps": 8}, **extra)
    assert run_main(args, capsys)[0] == 0
    extended, expected = read_metrics(out), read_metrics(reference)
    assert_metrics_close(extended, expected)
    weights = [r["blockwise_weight"] for r in extended if r["step"] > 0]
    assert weights[8:] == [0.0] * 4  # the linear schedule reached 0 at index 8 and stays there
    # extending to fewer steps than were run is refused
    code, _, err = run_main(base_args(out, teacher, corpus, steps=6, extend=True, **extra), capsys)
    assert code == 1 and "already at step 12" in err


def test_tokens_per_s_covers_the_training_time(tmp_path, teacher, corpus, capsys, monkeypatch):
    """The reported rate covers the training steps of a window and nothing else: on a fake
    clock where a step takes 1 s and every metrics write 1000 s, a window of 8 steps
    reports 8 steps' tokens over 8 s (a timed assertion on the real clock would be noise)."""
    from blockdistill.app import trainer as _trainer

    now = [0.0]
    monkeypatch.setattr(_trainer, "clock", lambda: now[0])
    write = _trainer.MetricsHook.write

    def slow_write(self, records):
        write(self, records)
        now[0] += 1000.0  # the hooks' time is outside the windows

    monkeypatch.setattr(_trainer.MetricsHook, "write", slow_write)
    init = _trainer.Trainer.__init__

    def one_second_steps(self, step_fn, *args, **kwargs):
        def step(*a, **k):
            now[0] += 1.0
            return step_fn(*a, **k)

        init(self, step, *args, **kwargs)

    monkeypatch.setattr(_trainer.Trainer, "__init__", one_second_steps)
    out = tmp_path / "run"
    extra = {"steps": 17, "log-every": 8, "eval-every": 1000, "checkpoint-every": 1000, "batch-size": 8}
    assert run_main(base_args(out, teacher, corpus, **extra), capsys)[0] == 0
    records = {r["step"]: r for r in read_metrics(out)}
    assert records[1]["compile_s"] == 1.0 and "tokens_per_s" not in records[1]
    assert records[8]["tokens_per_s"] == 7 * 8 * 64 / 7.0  # steps 2-8 (the first compiled)
    assert records[16]["tokens_per_s"] == 8 * 8 * 64 / 8.0  # a whole window of 8 training steps
    assert records[17]["tokens_per_s"] == 8 * 64 / 1.0  # the last window: one step


def _tensorboard_scalars(folder):
    """{tag: {step: value}} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder))
    events.Reload()
    out = {}
    for tag in events.Tags()["tensors"]:
        assert events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
        out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
    return out


def test_tensorboard_and_wandb_get_the_metrics(tmp_path, teacher, corpus, capsys, monkeypatch):
    """--tensorboard writes every series of metrics.jsonl as TensorBoard scalars (per-layer
    lists one series per layer), including the learning rate and the blockwise weight;
    --wandb (offline here) logs the same series to a W&B run whose id survives a resume."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = base_args(out, teacher, corpus, steps=6, tensorboard=True, wandb=True, **{"wandb-mode": "offline"})
    assert run_main(args, capsys)[0] == 0
    records = read_metrics(out)
    scalars = _tensorboard_scalars(out / "tensorboard")
    for key in ("loss", "kl", "feature", "ce", "learning_rate", "blockwise_weight", "tokens_per_s",
                "eval/student_loss", "eval/teacher_loss", "feature_per_layer/layer_0", "feature_per_layer/layer_1"):
        assert key in scalars, (key, sorted(scalars))
    for record in records:
        for key, value in record.items():
            if key == "step":
                continue
            values = value if isinstance(value, list) else [value]
            tags = [f"{key}/layer_{i}" for i in range(len(values))] if isinstance(value, list) else [key]
            for tag, v in zip(tags, values):
                assert scalars[tag][record["step"]] == pytest.approx(v, rel=1e-6), (tag, record["step"])
    # the learning rate follows the schedule: warm-up over 2 steps to 3e-3, then decay
    lr = scalars["learning_rate"]
    assert lr[1] == pytest.approx(0.0, abs=1e-12) and lr[3] == pytest.approx(3e-3) and lr[6] < lr[3]

    (run_file,) = (out / "wandb").rglob("*.wandb")
    content = run_file.read_bytes()
    for key in (b"eval/student_loss", b"feature_per_layer/layer_1", b"learning_rate"):
        assert key in content, key
    run_id = (out / "wandb-id").read_text().strip()
    assert run_id in run_file.name
    # resumed (extended) runs continue the same W&B run
    assert run_main(base_args(out, teacher, corpus, steps=8, extend=True, wandb=True,
                              **{"wandb-mode": "offline"}), capsys)[0] == 0
    assert {p.name for p in (out / "wandb").rglob("*.wandb")} >= {run_file.name}
    assert all(run_id in p.name for p in (out / "wandb").rglob("*.wandb"))


# ------------------------------------------------------------------ bad inputs


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("blockdistill: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_corpus(tmp_path, teacher, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(base_args(out, teacher, tmp_path / "nowhere"), capsys)
    assert_one_line_error(code, err, "nowhere", "does not exist")
    assert not out.exists()


def test_empty_corpus(tmp_path, teacher, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    out = tmp_path / "run"
    code, _, err = run_main(base_args(out, teacher, empty), capsys)
    assert_one_line_error(code, err, "empty")
    assert not out.exists()


@pytest.mark.parametrize(
    "toml, needles",
    [
        ("[optimizer]\nlerning_rate = 0.1\n", ["lerning_rate", "learning_rate", "[optimizer]"]),
        ("[run]\nsteps = 'ten'\n", ["steps", "integer"]),
        ("[objective]\nfeature_loss = 'kl'\n", ["feature_loss", "'kl'", "--feature-loss"]),
        ("[run]\nsteps = \n", ["not valid TOML"]),
        # a key in another section than its own, or in none, names the right one
        ("[run]\nlearning_rate = 0.1\n", ["'learning_rate' belongs in section [optimizer], not [run]"]),
        ("seq_len = 64\n", ["'seq_len' must be in section [data]"]),
        ("[student]\nstudent_init = 'random'\n", ["'student_init'", "[student]"]),
        ("[model]\nlr = 1\n[junk]\nx = 1\n", ["unknown key 'lr' in [model]"]),
        ("[junk]\nx = 1\n", ["unknown section [junk]"]),
        # repeated keys are TOML errors; library types check values (and say which option)
        ("[run]\nsteps = 1\nsteps = 2\n", ["not valid TOML"]),
        ("[student]\ninit = 'x'\n", ["StudentConfig.init='x'", "--student-init"]),
    ],
)
def test_bad_config_file(tmp_path, teacher, corpus, capsys, toml, needles):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    out = tmp_path / "run"
    code, _, err = run_main(base_args(out, teacher, corpus) + ["--config", str(config)], capsys)
    assert_one_line_error(code, err, str(config) if "TOML" in needles[0] else needles[0], *needles)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "state"])
def test_corrupt_checkpoint(tmp_path, teacher, corpus, capsys, damage):
    out = tmp_path / "run"
    args = base_args(out, teacher, corpus, steps=4, **{"checkpoint-every": 2})
    assert run_main(args, capsys)[0] == 0
    newest = out / "checkpoints" / "4"
    if damage == "truncate":  # the biggest array data file, cut in half
        victim = max((p for p in (newest / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        needle = str(newest)
    elif damage == "garbage":  # the arrays' index overwritten
        victims = [p for p in (newest / "arrays").rglob("manifest.ocdbt")]
        for victim in victims:
            victim.write_bytes(b"junk" * 64)
        needle = str(newest)
    else:
        victim = newest / "state" / "metadata"
        victim.write_text(victim.read_text()[:20])
        needle = str(victim)
    before = snapshot(out)
    code, _, err = run_main(args, capsys)  # the same command resumes (and reads the checkpoint)
    assert_one_line_error(code, err, needle, "corrupt or truncated")
    assert snapshot(out) == before


@pytest.mark.parametrize("change, needles", [(dict(dim=48, n_heads=4), ["dim=32", "dim=48"]),
                                              (dict(vocab_size=300), ["vocab_size=256", "vocab_size=300"])])
def test_mismatched_student(tmp_path, teacher, corpus, capsys, change, needles):
    base = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)
    student = tmp_path / "student"
    bd.save_model(bd.Transformer(bd.TransformerConfig(**{**base, **change}), key=jax.random.key(1)), student)
    out = tmp_path / "run"
    code, _, err = run_main(base_args(out, teacher, corpus, student=student), capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, teacher, corpus, capsys):
    out = tmp_path / "run"
    args = base_args(out, teacher, corpus, steps=30, **{"learning-rate": 1e9, "warmup-steps": 0,
                                                           "checkpoint-every": 1, "clip-norm": 1e9})
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, "non-finite", "at step")
    bad_step = int(err.split("at step ")[1].split(";")[0])
    records = read_metrics(out)
    # a huge step overflows the gradient first: the stop comes at the first non-finite loss or gradient
    assert records[-1]["step"] == bad_step
    assert not (np.isfinite(records[-1]["loss"]) and np.isfinite(records[-1]["grad_norm"]))
    checkpoints = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert checkpoints and max(checkpoints) < bad_step
    assert f"checkpoints/{max(checkpoints)}" in err
    assert not list((out / "checkpoints").glob(".*"))


def test_eval_and_export_commands(tmp_path, teacher, corpus, capsys):
    code, stdout, _ = run_main(["eval", str(teacher), "--data", str(corpus), "--seq-len", "64", "--eval-batches", "2"], capsys)
    assert code == 0 and "nats/token" in stdout and "bits/byte" in stdout
    out = tmp_path / "run"
    assert run_main(base_args(out, teacher, corpus, steps=2, **{"checkpoint-every": 1}), capsys)[0] == 0
    code, stdout, _ = run_main(["export-hf", str(out), str(tmp_path / "hf")], capsys)
    assert code == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    exported = bd.from_hf(tmp_path / "hf")
    student = bd.load_model(out / "student")
    tokens = jax.numpy.arange(16)
    np.testing.assert_allclose(exported(tokens).logits, student(tokens).logits, atol=1e-5)
    # --teacher: the student scored on its own samples; the teacher against itself has no divergence
    samples = ["--teacher", str(teacher), "--data", str(corpus), "--seq-len", "32", "--sample-rows", "2",
               "--sample-tokens", "8", "--eval-batches", "1"]
    code, stdout, _ = run_main(["eval", str(out / "student"), *samples], capsys)
    assert code == 0 and "on its own samples (2 rows, 16-token prompts, 8 tokens at temperature 1)" in stdout
    code, stdout, _ = run_main(["eval", str(teacher), *samples], capsys)
    line = stdout.splitlines()[-1]
    assert code == 0 and "reverse KL to the teacher 0.0000, forward KL 0.0000" in line
    nll, own = (float(x) for x in re.findall(r"teacher NLL (\S+) nats/token \(of its own samples: (\S+)\)", line)[0])
    assert nll == own > 0
    code, _, err = run_main(["eval", str(teacher), *samples[:-4], "--sample-rows", "0"], capsys)
    assert code != 0 and "sample_rows" in err


def test_every_option_is_documented():
    import dataclasses

    from blockdistill.app.modelconfig import EvalConfig, GenerateConfig
    from blockdistill.app.runconfig import DistillConfig, PretrainConfig

    page = (REPO_ROOT / "docs" / "cli.md").read_text()
    for cls in (DistillConfig, PretrainConfig, EvalConfig, GenerateConfig):
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in page, f"{cls.__name__}.{field.name} is not in docs/cli.md"


def test_every_flag_says_what_it_means_as_the_docs_do():
    """Each option's help is its meaning, default and TOML place; the tables of
    docs/cli.md give the same meanings (one text, kept equal by this test)."""
    import pathlib
    import re

    from blockdistill.app.options import HELP
    from blockdistill.app.runconfig import CacheConfig
    from blockdistill.app.search import SearchConfig
    from blockdistill.app.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if a.choices and "distill" in a.choices).choices
    own = {"cache-teacher": CacheConfig.HELP_CHANGES, "search": SearchConfig.HELP_CHANGES}
    for command in ("distill", "pretrain", "eval", "cache-teacher", "search"):
        changes = own.get(command, {})
        for action in subparsers[command]._actions:
            if action.dest in ("help", "config", "model"):
                continue
            meaning = changes.get(action.dest, HELP[action.dest])
            assert action.help and meaning in action.help.replace("%%", "%"), (command, action.dest)
    distill = subparsers["distill"].format_help()
    assert re.search(r"--label-weight FLOAT\s+weight of next-token", distill)
    assert "[objective] label_weight" in " ".join(distill.split())
    # the default recipe, and the evidence for it, are in the help (as in the README)
    from blockdistill.app.runconfig import DistillConfig

    defaults = DistillConfig()
    assert defaults.blockwise_weight == 0 and defaults.label_weight == 0.5 and defaults.mlp_ratio == 0.5
    assert "default recipe: logit KD plus 0.5 label cross-entropy (--blockwise-weight 0; --label-weight" in distill
    assert "docs/quality.md" in distill and "docs/real.md" in distill
    docs = REPO_ROOT / "docs" / "cli.md"
    rows = dict(re.findall(r"^\| `(\w+)` \| .*? \| (.*) \|$", docs.read_text(), re.MULTILINE))
    assert rows == {k: v for k, v in HELP.items() if k not in ("model", "tokenizer")}


# ----------------------------------------------------------------------------- what a resumed run reads back


def _copy_corpus(corpus, to):
    to.mkdir()
    for file in pathlib.Path(corpus).iterdir():
        (to / file.name).write_text(file.read_text())
    return to


def test_resume_refuses_a_changed_corpus_teacher_or_eval_set(tmp_path, teacher, corpus, capsys):
    data = _copy_corpus(corpus, tmp_path / "data")
    own_teacher = tmp_path / "teacher"
    bd.save_model(bd.load_model(teacher), own_teacher)
    out = tmp_path / "run"
    extra = {"checkpoint-every": 4, "eval-every": 4}
    assert run_main(base_args(out, own_teacher, data, steps=4, **extra), capsys)[0] == 0
    more = dict(extra, steps=8, extend=True)

    # the held-out set of the step-0 evaluation is kept
    code, _, err = run_main(base_args(out, own_teacher, data, **{**more, "eval-batches": 1}), capsys)
    assert_one_line_error(code, err, "eval_batches: 2 -> 1", "held-out batches")

    # the corpus's files were edited: the store is rebuilt, the saved position must not be applied to it
    first = sorted(data.iterdir())[0]
    first.write_text(first.read_text() + "\n# one more line moves every row after it\n" * 3)
    before = snapshot(out)
    code, _, err = run_main(base_args(out, own_teacher, data, **more), capsys)
    assert_one_line_error(code, err, "cannot resume", f"the corpus '{data}'", "training rows changed")
    assert snapshot(out) == before

    # the corpus back as it was, the teacher's folder overwritten with other weights
    first.write_text((pathlib.Path(corpus) / first.name).read_text())
    bd.save_model(bd.Transformer(bd.load_model(own_teacher).config, key=jax.random.key(7)), own_teacher)
    code, _, err = run_main(base_args(out, own_teacher, data, **more), capsys)
    assert_one_line_error(code, err, "cannot resume", "holds other weights")

    bd.save_model(bd.load_model(teacher), own_teacher)  # restored: it resumes
    code, _, err = run_main(base_args(out, own_teacher, data, **more), capsys)
    assert code == 0 and "resuming from" in err


class _Poisoned(bd.DistillationObjective):
    """The objective with a NaN gradient (and a finite loss) in the update that makes step 4 only."""

    def __call__(self, student, teacher_out, tokens, mask=None, step=0, **kwargs):
        loss, metrics = super().__call__(student, teacher_out, tokens, mask, step, **kwargs)
        return _nan_gradient_at(loss, jnp.asarray(step) == 3), metrics  # the update of step 4


@jax.custom_vjp
def _nan_gradient_at(x, when):
    return x


def _nan_fwd(x, when):
    return x, when


def _nan_bwd(when, g):
    return jnp.where(when, jnp.nan, g), None


_nan_gradient_at.defvjp(_nan_fwd, _nan_bwd)


def _nan_updates_at_step_4():
    """An optax transformation that makes the update of step 4 NaN (a finite gradient)."""
    import optax

    def update(updates, state, params=None):
        poison = jnp.where(state == 4 - 1, jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + poison, updates), state + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.parametrize("where", ["gradient", "update"])
def test_a_finite_loss_with_non_finite_weights_is_never_saved(tmp_path, teacher, corpus, capsys, monkeypatch, where):
    import optax

    from blockdistill.app import runconfig as _runconfig

    if where == "gradient":
        real = _runconfig.make_objective
        monkeypatch.setattr(_runconfig, "make_objective",
                            lambda cfg, stage=0: _Poisoned(**{f: getattr(real(cfg, stage), f) for f in
                                                               bd.DistillationObjective.__dataclass_fields__}))
    else:
        real_optimizer = _runconfig.make_optimizer
        monkeypatch.setattr(_runconfig, "make_optimizer",
                            lambda *a, **k: optax.chain(real_optimizer(*a, **k), _nan_updates_at_step_4()))
    out = tmp_path / "run"
    code, _, err = run_main(base_args(out, teacher, corpus, steps=8, **{"checkpoint-every": 2}), capsys)
    records = read_metrics(out)
    step4 = next(r for r in records if r["step"] == 4)
    assert np.isfinite(step4["loss"])  # the loss is computed before the update
    expected = "gradient norm became non-finite" if where == "gradient" else "the weights became non-finite"
    assert_one_line_error(code, err, expected, "at step 4", "checkpoints/2")
    assert [int(p.name) for p in list_checkpoints(out)] == [2]


def test_export_takes_checkpoints_newer_than_the_student(tmp_path, teacher, corpus, capsys, monkeypatch):
    from blockdistill.app import distill as _distill

    out = tmp_path / "run"
    extra = {"checkpoint-every": 2, "eval-every": 2}
    assert run_main(base_args(out, teacher, corpus, steps=4, **extra), capsys)[0] == 0
    before = bd.load_model(out / "student")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the student was written")

    monkeypatch.setattr(_distill, "save_model", crash)  # an --extend that dies after its last checkpoint
    code, _, _ = run_main(base_args(out, teacher, corpus, steps=8, extend=True, **extra), capsys)
    assert code == 130 and [int(p.name) for p in list_checkpoints(out)][-1] == 8
    monkeypatch.undo()
    code, stdout, _ = run_main(["export-hf", str(out), str(tmp_path / "hf")], capsys)
    assert code == 0 and "exporting checkpoint" in stdout and "(step 8)" in stdout and "(step 4)" in stdout
    exported = bd.from_hf(tmp_path / "hf")
    tokens = jnp.arange(16)
    newest = load_checkpoint_model(out / "checkpoints" / "8", before)
    assert not np.allclose(exported(tokens).logits, before(tokens).logits, atol=1e-6)  # not the step-4 student
    np.testing.assert_allclose(exported(tokens).logits, newest(tokens).logits, atol=1e-5)


def test_a_run_that_gives_no_label_weight_gets_the_one_its_recipe_was_measured_with():
    """Label CE rides along with logit KD by default (the real-teacher study); recipes that
    were measured without it, or where it would be wrong, keep 0; labels alone get 1; a
    weight that is given is kept, and on-policy rows still refuse one that is not 0."""
    from blockdistill.app.runconfig import DEFAULT_LABEL_WEIGHT, ConfigError, DistillConfig, make_objective

    assert DEFAULT_LABEL_WEIGHT == 0.5
    kd = DistillConfig()
    assert kd.label_weight == DEFAULT_LABEL_WEIGHT and make_objective(kd).label_weight == DEFAULT_LABEL_WEIGHT
    staged = DistillConfig(blockwise_weight=1.0, blockwise_weight_end=0.0, blockwise_schedule="staged", blockwise_steps=10)
    assert staged.label_weight == DEFAULT_LABEL_WEIGHT
    assert make_objective(staged, 0).label_weight == 0.0 and make_objective(staged, 1).label_weight == DEFAULT_LABEL_WEIGHT
    assert DistillConfig(blockwise_weight=1.0, blockwise_weight_end=0.0, blockwise_schedule="linear").label_weight == 0.5
    assert DistillConfig(blockwise_weight=0.5).label_weight == DEFAULT_LABEL_WEIGHT
    assert DistillConfig(blockwise_weight=1.0).label_weight == 0.0  # blockwise alone: no free-running pass
    assert DistillConfig(onpolicy_fraction=0.25).label_weight == 0.0
    assert DistillConfig(divergence="jsd").label_weight == 0.0
    assert DistillConfig(teacher_weight=0.0).label_weight == 1.0
    assert DistillConfig(label_weight=0.0).label_weight == 0.0
    assert DistillConfig(blockwise_weight=1.0, label_weight=0.2).label_weight == 0.2
    with pytest.raises(ConfigError, match="label_weight=0.5"):
        DistillConfig(onpolicy_fraction=0.25, label_weight=0.5)


def test_a_large_teacher_at_the_default_learning_rate_gets_a_note():
    """The default peak learning rate was chosen on the shipped teacher; a run of a teacher
    of real size that keeps it is told what the real-teacher study found, and a run that
    chose its own rate, or a small teacher, is told nothing."""
    from blockdistill.app.distill import LARGE_TEACHER_PARAMS, learning_rate_note
    from blockdistill.app.runconfig import DistillConfig

    default = DistillConfig()
    note = learning_rate_note(default, 134_515_008)
    assert note is not None and "135M parameters" in note and "--learning-rate 3e-4" in note
    assert "docs/real.md" in note
    assert learning_rate_note(default, LARGE_TEACHER_PARAMS - 1) is None
    assert learning_rate_note(DistillConfig(learning_rate=3e-4), 134_515_008) is None
    # layer-level blockwise alone preferred 1e-3 on that teacher: no note for it, but one
    # for a recipe that ends in KD
    blockwise = DistillConfig(blockwise_weight=1.0, blockwise_schedule="constant")
    assert learning_rate_note(blockwise, 134_515_008) is None
    staged = DistillConfig(blockwise_weight=1.0, blockwise_weight_end=0.0, blockwise_schedule="staged",
                           blockwise_steps=10)
    assert learning_rate_note(staged, 134_515_008) is not None
