"""The teacher cache on disk (alignment, resumption, refusals) and the commands that build
it and distill from it instead of running the teacher."""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd
from blockdistill.app.cli import main

VOCAB = 61
TEMPERATURES = (1.0, 2.0)


def logits_pair(seed=0, shape=(2, 7, VOCAB)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return 2.0 * jax.random.normal(k1, shape), 3.0 * jax.random.normal(k2, shape)


def mask_of(shape, seed=3):
    mask = jax.random.bernoulli(jax.random.key(seed), 0.8, shape[:-1])
    return mask.at[0, 0].set(True)


# ----------------------------------------------------------------------------- the cache on disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    cfg = bd.TransformerConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)
    path = tmp_path_factory.mktemp("teacher") / "model"
    model = bd.Transformer(cfg, key=jax.random.key(0))
    bd.save_model(model, path, tokenizer=bd.ByteTokenizer())
    data = bd.token_dataset(corpus, bd.ByteTokenizer(), seq_len=64, glob="*.txt",
                            cache=tmp_path_factory.mktemp("tokens"))
    return model, path, data


def test_cache_rows_are_the_teachers_top_k_of_each_row(tiny, tmp_path):
    model, _, data = tiny
    cache = bd.build_teacher_cache(model, data.train, tmp_path / "c", top_k=8, batch_size=3)
    assert cache.meta["complete"] and cache.num_rows == len(data.train) and cache.top_k == 8
    rows = [0, len(data.train) // 2, len(data.train) - 1]  # the last batch was padded
    ids, logprobs, log_tail = cache.take(rows)
    tokens, mask, segments = (jnp.asarray(a) for a in data.train.take(rows))
    expected = bd.top_k_logits(jax.vmap(lambda t, s: model(t, segment_ids=s).logits)(tokens, segments), 8)
    np.testing.assert_array_equal(ids, expected.ids)
    np.testing.assert_allclose(logprobs, expected.logprobs, rtol=2e-3, atol=2e-3)  # float16 on disk
    np.testing.assert_allclose(log_tail, expected.log_tail, rtol=1e-5, atol=1e-6)
    assert logprobs.dtype == np.float32 and ids.dtype == np.int32
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").glob("*.npy"))
    tokens_cached = cache.num_rows * cache.seq_len
    assert on_disk >= bd.bytes_per_token(8) * tokens_cached
    assert on_disk - bd.bytes_per_token(8) * tokens_cached < 4096  # the .npy headers
    assert 0.0 < cache.mean_tail_mass < 1.0


def test_interrupted_cache_resumes_to_the_same_bytes(tiny, tmp_path):
    model, _, data = tiny
    whole = bd.build_teacher_cache(model, data.train, tmp_path / "whole", top_k=4, batch_size=2)
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    partial = bd.build_teacher_cache(model, data.train, tmp_path / "part", top_k=4, batch_size=2, flush_every=1,
                                     should_stop=stop_after_three)
    assert not partial.meta["complete"] and partial.rows_done() == 6
    with pytest.raises(ValueError, match=r"incomplete \(6 of"):
        bd.TeacherCache(tmp_path / "part")
    resumed = bd.build_teacher_cache(model, data.train, tmp_path / "part", top_k=4, batch_size=2)
    for name in ("ids.npy", "logprobs.npy", "log_tail.npy"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert resumed.meta == whole.meta
    with pytest.raises(ValueError, match=r"other settings \(top_k: 4 -> 8\)"):
        bd.build_teacher_cache(model, data.train, tmp_path / "part", top_k=8, batch_size=2)


def test_cache_on_a_mesh_equals_one_device(tiny, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    model, _, data = tiny
    one = bd.build_teacher_cache(model, data.train, tmp_path / "one", top_k=4, batch_size=4)
    mesh = bd.make_mesh("data=8")
    eight = bd.build_teacher_cache(model, data.train, tmp_path / "eight", top_k=4, batch_size=8, mesh=mesh)
    (ids1, values1, tail1), (ids8, values8, tail8) = (c.take(np.arange(c.num_rows)) for c in (one, eight))
    np.testing.assert_allclose(values8, values1, atol=np.spacing(np.float16(8)))  # one float16 step
    # the same ids, except where two of them tie (another reduction order may swap them)
    swapped = ids8 != ids1
    assert swapped.mean() < 1e-3
    np.testing.assert_allclose(values8[swapped], values1[swapped], atol=np.spacing(np.float16(8)))
    np.testing.assert_allclose(tail8, tail1, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the commands


def _flags(**values):
    flat = []
    for key, value in values.items():
        if isinstance(value, bool):
            flat.append(f"--{key}" if value else f"--no-{key}")
        else:
            flat += [f"--{key}", str(value)]
    return flat


def _cache_args(out, teacher, corpus, **extra):
    return ["cache-teacher", *_flags(out=out, teacher=teacher, data=corpus, **{
        "seq-len": 64, "batch-size": 4, "eval-batches": 2, "top-k": 16, "progress": False, **extra})]


def _distill_args(out, teacher, corpus, **extra):
    return ["distill", *_flags(out=out, teacher=teacher, data=corpus, **{
        "steps": 6, "seq-len": 64, "batch-size": 4, "eval-every": 3, "eval-batches": 2, "checkpoint-every": 3,
        "log-every": 1, "seed": 3, "learning-rate": 3e-3, "warmup-steps": 2, "progress": False, "plots": False,
        **extra})]


def _metrics(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_caches_the_teacher_and_distills_from_the_cache(tiny, tmp_path, corpus, capsys, monkeypatch):
    _, teacher, _ = tiny
    cache = tmp_path / "cache"
    assert main(_cache_args(cache, teacher, corpus)) == 0
    out = capsys.readouterr().out
    assert "102 bytes per token" in out and "teacher held-out loss" in out
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["teacher"]["sha256"] == bd.model_digest(teacher) and meta["teacher_eval"]["rows"] == 8
    # the held-out tail mass at other k (those within the vocabulary, and this cache's own)
    tails = meta["teacher_eval"]["tail_mass_at"]
    assert sorted(map(int, tails)) == [16, 64, 256] and tails["256"] == pytest.approx(0.0, abs=1e-6)
    assert f"k=16: {tails['16']:.2e}" in out
    assert ("warning: the top 16 leave" in out) == (meta["mean_tail_mass"] > 0.01)

    assert main(_distill_args(tmp_path / "dense", teacher, corpus)) == 0
    capsys.readouterr()
    assert main(_distill_args(tmp_path / "cached", teacher, corpus, **{"teacher-cache": cache})) == 0
    printed = capsys.readouterr().out
    assert "teacher logits read from" in printed and "in 6 of 6 steps" in printed
    dense, cached = _metrics(tmp_path / "dense"), _metrics(tmp_path / "cached")
    assert [r["step"] for r in dense] == [r["step"] for r in cached]
    # the same teacher score, and a KD run close to the dense one (top 16 of 256, float16)
    evals = [(d, c) for d, c in zip(dense, cached) if "eval/student_loss" in d]
    assert evals[0][0]["eval/teacher_loss"] == pytest.approx(evals[0][1]["eval/teacher_loss"], rel=1e-6)
    assert evals[-1][1]["eval/student_loss"] == pytest.approx(evals[-1][0]["eval/student_loss"], rel=2e-2)
    # less work per step: the teacher's forward is gone from the FLOPs count
    assert cached[-1]["train_flops"] < dense[-1]["train_flops"]

    # a student folder and a cache: the teacher's weights are never read
    student = tmp_path / "dense" / "student"
    import blockdistill.interop.folders as io

    real = io.load_model

    def guarded(path, **kw):
        assert pathlib.Path(path) != pathlib.Path(teacher), "the teacher's weights were loaded"
        return real(path, **kw)

    monkeypatch.setattr(io, "load_model", guarded)
    assert main(_distill_args(tmp_path / "from-student", teacher, corpus, student=student,
                              **{"teacher-cache": cache})) == 0


def test_cli_refuses_a_cache_of_another_run(tiny, tmp_path, corpus, capsys):
    _, teacher, _ = tiny
    cache = tmp_path / "cache"
    assert main(_cache_args(cache, teacher, corpus, **{"top-k": 4})) == 0
    capsys.readouterr()
    cases = [
        ({"temperature": 2.0}, r"temperature: cache has 1\.0, this run has 2\.0"),
        ({"seq-len": 32}, r"data: cache has .*'seq_len': 64"),
        ({"blockwise-weight": 1.0}, "would never be read"),
    ]
    for extra, message in cases:
        code = main(_distill_args(tmp_path / "run", teacher, corpus, **{"teacher-cache": cache, **extra}))
        assert code == 1
        assert __import__("re").search(message, capsys.readouterr().err), extra
    other = tmp_path / "other"
    bd.save_model(bd.Transformer(bd.load_model(teacher).config, key=jax.random.key(9)), other,
                  tokenizer=bd.ByteTokenizer())
    assert main(_distill_args(tmp_path / "run", other, corpus, **{"teacher-cache": cache})) == 1
    assert "teacher: cache has {'sha256'" in capsys.readouterr().err
    assert main(_distill_args(tmp_path / "run", teacher, corpus, **{"teacher-cache": tmp_path / "nope"})) == 1
    assert "is not a teacher cache" in capsys.readouterr().err


def test_staged_run_reads_the_cache_only_after_its_switch(tiny, tmp_path, corpus, capsys):
    _, teacher, _ = tiny
    cache = tmp_path / "cache"
    assert main(_cache_args(cache, teacher, corpus)) == 0
    staged = {"blockwise-weight": 1.0, "blockwise-schedule": "staged", "blockwise-steps": 4, "inject-at": "layer"}
    assert main(_distill_args(tmp_path / "s", teacher, corpus, **{"teacher-cache": cache, **staged})) == 0
    assert "in 2 of 6 steps" in capsys.readouterr().out
    anneal = {"blockwise-weight": 1.0, "blockwise-schedule": "linear", "blockwise-steps": 3, "inject-at": "layer"}
    assert main(_distill_args(tmp_path / "a", teacher, corpus, **{"teacher-cache": cache, **anneal})) == 0
    assert "in 3 of 6 steps" in capsys.readouterr().out
    records = _metrics(tmp_path / "a")
    weights = {r["step"]: r["blockwise_weight"] for r in records if "blockwise_weight" in r}
    assert weights[2] > 0 and weights[4] == 0 and weights[6] == 0


def test_a_cache_of_a_runs_rows_serves_that_run_and_refuses_another(tiny, tmp_path, corpus, capsys):
    _, teacher, data = tiny
    rows = bd.run_rows(len(data.train), batch_size=4, steps=6, seeds=(3,))
    batches = bd.batch_iterator(data.train, batch_size=4, seed=3, prefetch=0)
    read = np.concatenate([next(batches).tokens for _ in range(6)])  # what the run reads
    np.testing.assert_array_equal(np.unique(read, axis=0), np.unique(data.train.take(rows).tokens, axis=0))
    cache = tmp_path / "cache"
    assert main(_cache_args(cache, teacher, corpus, steps=6, seeds="3")) == 0
    assert f"{len(rows)} of {len(data.train)} training rows" in capsys.readouterr().out
    opened = bd.TeacherCache(cache)
    assert opened.num_cached == len(rows) and opened.num_rows == len(data.train)
    with pytest.raises(KeyError, match="is not in teacher cache"):
        opened.take([int(np.setdiff1d(np.arange(len(data.train)), rows)[0])])
    assert main(_distill_args(tmp_path / "ok", teacher, corpus, **{"teacher-cache": cache})) == 0
    capsys.readouterr()
    assert main(_distill_args(tmp_path / "other-seed", teacher, corpus, seed=4, **{"teacher-cache": cache})) == 1
    assert "it holds only the rows of {'batch_size': 4, 'seeds': [3], 'steps': 6}" in capsys.readouterr().err


def _split_corpus(root: pathlib.Path) -> tuple[float, float]:
    """A corpus of 60 short documents and two `val_fraction`s that leave the same number of
    training rows (64 bytes) but not the same rows: one document moved between the splits."""
    root.mkdir()
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "abcdefghij"[i % 10] * (20 + i % 7) + "\n")
    cache = root.parent / "tokens"
    seen = {}
    for fraction in (x / 100 for x in range(1, 40)):
        data = bd.token_dataset(root, bd.ByteTokenizer(), seq_len=64, val_fraction=fraction, cache=cache)
        for other, (rows, digest) in seen.items():
            if rows == len(data.train) and digest != data.train.digest():
                return other, fraction
        seen[fraction] = (len(data.train), data.train.digest())
    raise AssertionError("no two splits with the same row count and other rows")


def test_a_cache_of_another_split_with_as_many_rows_is_refused(tiny, tmp_path, capsys):
    _, teacher, _ = tiny
    corpus = tmp_path / "docs"
    made_for, other = _split_corpus(corpus)
    cache = tmp_path / "cache"
    flags = {"val-fraction": made_for, "batch-size": 2, "eval-batches": 1}
    assert main(_cache_args(cache, teacher, corpus, **flags)) == 0
    capsys.readouterr()
    # the same split reads it; the other split (same row count, other rows) is refused by name
    assert main(_distill_args(tmp_path / "same", teacher, corpus, steps=2, **{**flags, "teacher-cache": cache})) == 0
    capsys.readouterr()
    code = main(_distill_args(tmp_path / "other", teacher, corpus, steps=2,
                              **{**flags, "val-fraction": other, "teacher-cache": cache}))
    err = capsys.readouterr().err
    assert code == 1 and "rows_sha256" in err and "was made for another run" in err


def test_the_cached_teacher_loss_is_read_only_for_the_same_held_out_rows(tiny, tmp_path, capsys, corpus):
    _, teacher, data = tiny
    cache_dir = tmp_path / "cache"
    assert main(_cache_args(cache_dir, teacher, corpus, **{"data-glob": "*.txt"})) == 0
    capsys.readouterr()
    cache = bd.TeacherCache(cache_dir)
    rows = cache.meta["teacher_eval"]["rows"]
    assert cache.meta["teacher_eval"]["val_sha256"] == data.val.digest()
    assert cache.teacher_eval_loss(rows, data.val.digest()) is not None
    other = bd.token_dataset(corpus, bd.ByteTokenizer(), seq_len=64, glob="*.txt", val_fraction=0.7,
                             cache=tmp_path / "tokens")  # three of the six documents held out, not one
    assert other.val.digest() != data.val.digest() and len(other.val) >= rows
    assert cache.teacher_eval_loss(rows, other.val.digest()) is None  # as many rows, other rows
