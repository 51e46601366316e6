"""Checkpoints on Orbax: round trips, asynchronous saves, the earlier format, bad input."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd
from blockdistill.app.checkpoint import Checkpointer, is_checkpoint, list_checkpoints, load_checkpoint_model


def _model(seed=0, **changes):
    cfg = bd.TransformerConfig(**{**dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=32,
                                        max_seq_len=16), **changes})
    return bd.Transformer(cfg, key=jax.random.key(seed))


def _state(seed=0, **changes):
    model = _model(seed, **changes)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    # one update so that the moments are not zeros
    grads = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_array))
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_keep(tmp_path):
    model, opt_state = _state()
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, model, opt_state, {"data": {"epoch": step}})
    checkpointer.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["2", "3"]  # the newest two
    assert is_checkpoint(tmp_path / "checkpoints" / "3")
    like_model, like_opt = _state(seed=1)
    restored_model, restored_opt, state = Checkpointer(tmp_path).restore(3, like_model, like_opt)
    assert state["step"] == 3 and state["data"] == {"epoch": 3}
    _assert_trees_equal(restored_model, model)
    _assert_trees_equal(restored_opt, opt_state)
    # the export path reads the student alone
    _assert_trees_equal(load_checkpoint_model(tmp_path / "checkpoints" / "3", like_model), model)


def test_save_returns_before_the_buffers_are_reused(tmp_path):
    """`save` copies the arrays off the devices before it returns: a step that donates
    (deletes) the buffers right after does not change what is written."""
    model, opt_state = _state()
    expected = jax.tree.map(np.asarray, eqx.filter(model, eqx.is_array))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model, opt_state, {})
    donate = eqx.filter_jit(lambda m: jax.tree.map(lambda x: x * 2, m), donate="all")
    model = donate(model)  # the saved buffers are gone
    checkpointer.close()
    restored, _, _ = Checkpointer(tmp_path).restore(1, *_state(seed=2))
    _assert_trees_equal(restored, expected)


def test_another_structure_is_refused(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, *_state(), {})
    checkpointer.close()
    with pytest.raises(ValueError, match=r"checkpoints/1 holds another student .*resume with the settings"):
        Checkpointer(tmp_path).restore(1, *_state(tie_embeddings=True))
    with pytest.raises(ValueError, match=r"student array \S*input_layernorm\S* is float32\[2, 16\], the run builds float32\[3, 16\]"):
        Checkpointer(tmp_path).restore(1, *_state(n_layers=3))
    with pytest.raises(ValueError, match=r"student array \S*mlp\S* is float32\[2, \d+, \d+\], the run builds float32\[2, \d+, \d+\]"):
        Checkpointer(tmp_path).restore(1, *_state(mlp_dim=48))


def test_checkpoints_of_the_earlier_format_still_load(tmp_path):
    """One folder per step with student.eqx, opt_state.eqx and state.json."""
    model, opt_state = _state()
    folder = tmp_path / "checkpoints" / "7"
    folder.mkdir(parents=True)
    eqx.tree_serialise_leaves(folder / "student.eqx", model)
    eqx.tree_serialise_leaves(folder / "opt_state.eqx", opt_state)
    (folder / "state.json").write_text(json.dumps({"step": 7, "data": {"epoch": 0}}))
    assert is_checkpoint(folder)
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest() == 7
    restored_model, restored_opt, state = checkpointer.restore(7, *_state(seed=3))
    assert state["step"] == 7
    _assert_trees_equal(restored_model, model)
    _assert_trees_equal(restored_opt, opt_state)
    # a new save goes in the new format beside it
    checkpointer.save(8, restored_model, restored_opt, {})
    checkpointer.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["7", "8"]
    assert (tmp_path / "checkpoints" / "8" / "arrays").is_dir()
    # damage in the earlier format is named too
    (folder / "opt_state.eqx").write_bytes((folder / "opt_state.eqx").read_bytes() + b"junk")
    with pytest.raises(ValueError, match=r"opt_state.eqx is corrupt or truncated"):
        Checkpointer(tmp_path).restore(7, *_state(seed=3))
