"""experiments/teacher.py: the convergence test and shipping of a pretrained teacher."""

import json
import pathlib

import jax
import pytest
from helpers import REPO_ROOT, loaded_script

import blockdistill as bd

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def tool():
    with loaded_script("teacher_tool", ROOT / "experiments" / "teacher.py") as module:
        yield module


def fake_run(folder: pathlib.Path, evals: dict[int, float], steps: int) -> pathlib.Path:
    """A pretraining run folder: a metrics line per step, evaluations at `evals`."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(0, max(evals) + 1):
        record = {"step": step}
        if step:
            record.update(loss=2.0, tokens_per_s=1000.0)
        if step in evals:
            record["eval/student_loss"] = evals[step]
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.json").write_text(json.dumps({"steps": steps, "batch_size": 2, "seq_len": 8}))
    cfg = bd.TransformerConfig(vocab_size=256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32, max_seq_len=8)
    bd.save_model(bd.Transformer(cfg, key=jax.random.key(0)), folder / "model", tokenizer=bd.ByteTokenizer())
    return folder


def test_convergence_over_the_last_fifth(tool):
    # at step 100 the loss is 2.0; the last fifth runs from step 80 (interpolated: 2.02)
    history = [(0, 5.0), (50, 2.2), (75, 2.05), (100, 2.0)]
    assert tool.loss_at(history, 80) == pytest.approx(2.04)
    assert tool.tail_gain(history) == pytest.approx((2.04 - 2.0) / 2.04)
    with pytest.raises(ValueError, match="outside"):
        tool.loss_at(history, 120)


def test_ship_only_a_finished_converged_run(tool, tmp_path):
    config = tmp_path / "teacher.toml"
    config.write_text("steps = 100\n")
    asset, curve = tmp_path / "asset", tmp_path / "curve.png"
    unfinished = fake_run(tmp_path / "a", {0: 5.0, 50: 2.2}, steps=100)
    with pytest.raises(SystemExit, match="step 50 of 100"):
        tool.ship(unfinished, config, asset, curve)
    still_falling = fake_run(tmp_path / "b", {0: 5.0, 50: 2.5, 100: 2.0}, steps=100)
    with pytest.raises(SystemExit, match="not converged"):
        tool.ship(still_falling, config, asset, curve)
    flat = fake_run(tmp_path / "c", {0: 5.0, 50: 2.02, 75: 2.005, 100: 2.0}, steps=100)
    info = tool.summary(flat)
    assert info["converged"] and info["tokens_per_s"] == 1000.0
    assert info["hours_total"] == pytest.approx(100 * 16 / 1000 / 3600)
    record = tool.ship(flat, config, asset, curve)
    assert sorted(p.name for p in asset.iterdir()) == ["config.json", "model.eqx", "pretrain.toml", "training.json"]
    assert json.loads((asset / "training.json").read_text()) == json.loads(json.dumps(record))
    assert record["eval_history"][-1] == {"step": 100, "eval_loss_nats_per_byte": 2.0}
    assert bd.load_model(asset).config.dim == 16 and curve.stat().st_size > 0
    assert not asset.with_name("asset.new").exists()
