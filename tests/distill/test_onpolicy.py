"""On-policy distillation: the rows the student writes, the step on them, and the command
that mixes them into its batches (resumably, its sampling timed apart from the update)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from blockdistill.app.cli import main

CONFIG = bd.TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32)


def _batch(rows=4, seq=16):
    tokens = jax.random.randint(jax.random.key(3), (rows, seq), 0, CONFIG.vocab_size)
    segments = jnp.concatenate([jnp.ones((rows, 10), jnp.int32), jnp.full((rows, seq - 10), 2, jnp.int32)], axis=1)
    return tokens, jnp.ones((rows, seq), bool), segments


def test_the_student_writes_its_rows_from_their_prompts():
    student = bd.Transformer(CONFIG, key=jax.random.key(0))
    tokens, mask, segments = _batch()
    policy = bd.OnPolicy(fraction=0.5, prompt_len=12, temperature=1.0)
    key = jax.random.key(5)
    mixed, mixed_mask, mixed_segments = policy.mix(student, tokens, mask, segments, step=7, key=key)
    # rows 2, 3 are the corpus's; rows 0, 1 keep their prompts and continue with the student's samples
    np.testing.assert_array_equal(mixed[2:], tokens[2:])
    np.testing.assert_array_equal(mixed_mask[2:], mask[2:])
    np.testing.assert_array_equal(mixed[:2, :12], tokens[:2, :12])
    expected = bd.generate(student, tokens[:2, :12], 4, key=jax.random.fold_in(key, 7), temperature=1.0).tokens
    np.testing.assert_array_equal(mixed[:2, 12:], expected)
    # only the predictions of sampled tokens count; the continuation is the prompt's last document's
    assert np.asarray(mixed_mask[:2]).tolist() == [[False] * 11 + [True] * 5] * 2
    np.testing.assert_array_equal(mixed_segments[:2, 12:], 2)
    # the same step and key write the same rows (a resumed run); another step other ones
    again = policy.mix(student, tokens, mask, segments, step=7, key=key)[0]
    np.testing.assert_array_equal(again, mixed)
    assert not np.array_equal(policy.mix(student, tokens, mask, segments, step=8, key=key)[0][:2, 12:], mixed[:2, 12:])


def test_greedy_rows_are_the_students_argmax_continuations():
    student = bd.Transformer(CONFIG, key=jax.random.key(0))
    tokens, mask, segments = _batch()
    mixed = bd.OnPolicy(fraction=1.0, prompt_len=8, temperature=0.0).mix(
        student, tokens, mask, segments, step=0, key=jax.random.key(0))[0]
    logits = jax.vmap(student)(mixed).logits
    np.testing.assert_array_equal(mixed[:, 8:], jnp.argmax(logits[:, 7:-1], axis=-1))


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"OnPolicy.fraction=1.5"):
        bd.OnPolicy(fraction=1.5, prompt_len=4)
    with pytest.raises(ValueError, match=r"prompt_len=16 is invalid for rows of 16"):
        bd.OnPolicy(fraction=0.5, prompt_len=16).check(16, 4)
    with pytest.raises(ValueError, match="is no row"):
        bd.OnPolicy(fraction=0.1, prompt_len=4).check(16, 4)


def _reference_scores(student, teacher, rows, prompt_len):
    """The sample scores in float64 numpy, from full forward passes."""
    rkl = fkl = t_nll = s_nll = 0.0
    for row in np.asarray(rows):
        ls = np.asarray(student(jnp.asarray(row)).logits, np.float64)[prompt_len - 1 : -1]
        lt = np.asarray(teacher(jnp.asarray(row)).logits, np.float64)[prompt_len - 1 : -1]
        ls = ls - np.log(np.exp(ls - ls.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ls.max(-1, keepdims=True)
        lt = lt - np.log(np.exp(lt - lt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lt.max(-1, keepdims=True)
        ps, pt = np.exp(ls), np.exp(lt)
        rkl += (ps * (ls - lt)).sum()
        fkl += (pt * (lt - ls)).sum()
        picked = row[prompt_len:]
        t_nll -= lt[np.arange(len(picked)), picked].sum()
        s_nll -= ls[np.arange(len(picked)), picked].sum()
    n = rows.shape[0] * (rows.shape[1] - prompt_len)
    return rkl / n, fkl / n, t_nll / n, s_nll / n


def test_sample_scores_are_the_divergences_on_the_students_own_continuations():
    student = bd.Transformer(CONFIG, key=jax.random.key(0))
    teacher = bd.Transformer(CONFIG, key=jax.random.key(1))
    tokens = _batch(rows=3)[0]
    key = jax.random.key(4)
    scores = bd.score_samples(student, teacher, tokens[:, :6], 10, key=key)
    written = bd.generate(student, tokens[:, :6], 10, key=key, temperature=1.0).tokens
    rows = jnp.concatenate([tokens[:, :6], written], axis=1)
    expected = _reference_scores(student, teacher, rows, 6)
    got = (scores.reverse_kl, scores.forward_kl, scores.teacher_nll, scores.student_nll)
    np.testing.assert_allclose([float(v) for v in got], expected, rtol=2e-5, atol=1e-6)
    assert int(scores.tokens) == 30
    # a student scored against itself: no divergence, and the two likelihoods agree
    own = bd.score_samples(student, student, tokens[:, :6], 10, key=key)
    assert abs(float(own.reverse_kl)) < 1e-6 and abs(float(own.forward_kl)) < 1e-6
    np.testing.assert_allclose(float(own.teacher_nll), float(own.student_nll), rtol=1e-6)


def test_sample_scores_refuse_another_vocabulary_by_name():
    student = bd.Transformer(CONFIG, key=jax.random.key(0))
    other = bd.Transformer(dataclasses.replace(CONFIG, vocab_size=32), key=jax.random.key(1))
    with pytest.raises(ValueError, match="vocab_size=64 differs from the teacher's vocab_size=32"):
        bd.score_samples(student, other, _batch()[0][:, :4], 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens=40"):
        bd.score_samples(student, student, _batch()[0][:, :4], 40, key=jax.random.key(0))


def _args(out, teacher, corpus, **extra):
    values = {"out": out, "teacher": teacher, "data": corpus, "steps": 4, "seq-len": 32, "batch-size": 4,
              "eval-every": 2, "eval-batches": 1, "checkpoint-every": 2, "log-every": 1, "seed": 1,
              "onpolicy-fraction": 0.5, "onpolicy-prompt-len": 16, "progress": False, "plots": False, **extra}
    flat = ["distill"]
    for key, value in values.items():
        flat += [f"--{key}"] if value is True else [f"--no-{key}"] if value is False else [f"--{key}", str(value)]
    return flat


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "model"
    bd.save_model(bd.Transformer(CONFIG.replace(vocab_size=256), key=jax.random.key(0)), path)
    return path


def test_a_run_mixes_in_the_students_rows_and_resumes_to_the_same_numbers(tmp_path, teacher, corpus, capsys):
    out = tmp_path / "run"
    assert main(_args(out, teacher, corpus, **{"onpolicy-start": 1, "divergence": "jsd"})) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if r["step"] > 0}
    assert "gen_seconds" not in steps[1]  # step index 0 is before onpolicy_start
    assert all(steps[s]["gen_seconds"] > 0 and steps[s]["gen_tokens_per_s"] > 0 for s in (2, 3, 4))
    # killed after the step-2 checkpoint: the resumed run samples the same rows, to the same numbers
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "student")
    assert main(_args(resumed, teacher, corpus, **{"onpolicy-start": 1, "divergence": "jsd"})) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, again):
        for key in ("loss", "kl", "eval/student_loss"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")


def test_on_policy_refuses_label_cross_entropy_and_a_teacher_cache(tmp_path, teacher, corpus, capsys):
    assert main(_args(tmp_path / "a", teacher, corpus, **{"label-weight": 0.5})) == 1
    assert "train the student on its own samples" in capsys.readouterr().err
    assert main(_args(tmp_path / "b", teacher, corpus, **{"teacher-cache": tmp_path})) == 1
    assert "must score the student's own sequences" in capsys.readouterr().err
    assert main(_args(tmp_path / "c", teacher, corpus, **{"onpolicy-prompt-len": 32})) == 1
    assert "OnPolicy.prompt_len=32 is invalid for rows of 32 tokens" in capsys.readouterr().err
