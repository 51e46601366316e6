"""The token store, packed rows read on demand, and the Grain batch pipeline."""

import os

import numpy as np
import pytest

import blockdistill as bd
from blockdistill.data.dataset import load_dataset
from blockdistill.data.corpus import read_corpus
from blockdistill.data.tokenizers import ByteTokenizer, HFTokenizer
from helpers import make_tokenizer_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("BLOCKDISTILL_CACHE", str(folder))
    return folder


def _corpus(folder, n=40, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["def", "return", "x", "+", "1", "hello", "world", "ü", "\n", "    ", "class", "(", ")", ":"]
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 120))))
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


def _assert_split_equal(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["byte", "hf-bos"])
@pytest.mark.parametrize("seq_len", [7, 64])
def test_rows_equal_the_in_memory_packing(tmp_path, cache, kind, seq_len):
    """Row by row, the store's packing is `load_dataset`'s (train and validation, with and
    without a BOS id, rows cut through documents)."""
    corpus = _corpus(tmp_path / "corpus")
    tokenizer = ByteTokenizer() if kind == "byte" else HFTokenizer(make_tokenizer_dir(tmp_path / "tok"), bos_id=1)
    data = bd.token_dataset(corpus, tokenizer, seq_len, val_fraction=0.2)
    reference = load_dataset(corpus, tokenizer, seq_len, val_fraction=0.2)
    assert data.num_documents == reference.num_documents == 40
    assert data.num_val_documents == reference.num_val_documents > 0
    for rows, split in ((data.train, reference.train), (data.val, reference.val)):
        assert len(rows) == split.tokens.shape[0]
        _assert_split_equal(rows.materialize(), split)
        picked = [len(rows) - 1, 0, len(rows) // 2]
        _assert_split_equal(rows.take(picked), [a[picked] for a in split])
        _assert_split_equal(rows[1], [a[1] for a in split])
        # a spread sample: evenly spaced over the whole split, in order, never past its end
        n = len(rows)
        spread = [i * n // 3 for i in range(3)]
        assert spread[-1] > n // 2
        _assert_split_equal(rows.spread(3), [a[spread] for a in split])
        _assert_split_equal(rows.spread(n + 5), split)


def test_a_tiny_corpus_holds_out_its_last_rows(tmp_path, cache):
    (tmp_path / "one.txt").write_text("x = 1\n" * 200)
    data = bd.token_dataset(tmp_path / "one.txt", ByteTokenizer(), 32, val_fraction=0.1)
    reference = load_dataset(tmp_path / "one.txt", ByteTokenizer(), 32, val_fraction=0.1)
    _assert_split_equal(data.train.materialize(), reference.train)
    _assert_split_equal(data.val.materialize(), reference.val)
    assert data.num_val_documents == 0


def test_a_corpus_is_tokenized_once_and_rebuilt_when_it_changes(tmp_path, cache):
    corpus = _corpus(tmp_path / "corpus", n=5)
    store = bd.token_store(corpus, ByteTokenizer())
    built = (store.folder / "tokens.bin").stat().st_mtime_ns
    again = bd.token_store(corpus, ByteTokenizer())
    assert again.folder == store.folder and (again.folder / "tokens.bin").stat().st_mtime_ns == built  # reused
    assert store.num_documents == 5 and store.num_tokens == sum(len(d.text.encode()) for d in read_corpus(corpus))
    assert store.tokens.dtype == np.uint8  # 256 ids fit a byte
    # a changed file, another file list or another tokenizer is another store
    (corpus / "doc001.txt").write_text("changed")
    changed = bd.token_store(corpus, ByteTokenizer())
    assert changed.folder != store.folder
    np.testing.assert_array_equal(changed.document(1), np.frombuffer(b"changed", np.uint8))
    (corpus / "extra.txt").write_text("more")
    assert bd.token_store(corpus, ByteTokenizer()).folder not in (store.folder, changed.folder)
    hf = bd.token_store(corpus, HFTokenizer(make_tokenizer_dir(tmp_path / "tok")))
    assert hf.folder not in (store.folder, changed.folder) and hf.tokens.dtype == np.uint16
    assert sorted(p.name for p in (cache / "tokens").iterdir() if p.name.startswith(".")) == []  # no leftovers


def test_a_corpus_streams_through(tmp_path, cache, monkeypatch):
    """Documents are tokenized a batch at a time: the builder never holds the corpus."""
    corpus = _corpus(tmp_path / "corpus", n=30)
    seen = []
    tokenizer = ByteTokenizer()

    class Counting:
        vocab_size, bos_id, pad_id = tokenizer.vocab_size, tokenizer.bos_id, tokenizer.pad_id

        def encode(self, text):
            seen.append(len(text))
            return tokenizer.encode(text)

        def decode(self, ids):
            return tokenizer.decode(ids)

    from blockdistill.data import store as _store

    monkeypatch.setattr(_store, "_store_key", lambda corpus, tok: ("counting", {}))
    store = bd.token_store(corpus, Counting(), batch_bytes=200)
    assert len(seen) == 30 and store.num_documents == 30


def test_bad_input_is_named(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bd.token_store(tmp_path / "nowhere", ByteTokenizer())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        bd.token_store(tmp_path / "empty", ByteTokenizer())
    store = bd.token_store(_corpus(tmp_path / "corpus", n=3), ByteTokenizer())
    with open(store.folder / "tokens.bin", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ValueError, match=r"tokens.bin has \d+ bytes, expected"):
        bd.TokenStore(store.folder)


def test_batches_resume_exactly_and_each_process_reads_its_share(tmp_path, cache):
    corpus = tmp_path / "counting"
    corpus.mkdir()
    for i in range(40):  # every row of 16 bytes is different from every other
        (corpus / f"{i:02d}.txt").write_text(" ".join(f"{1000 * i + j}" for j in range(30)))
    data = bd.token_dataset(corpus, ByteTokenizer(), 16, val_fraction=0.1)
    n = len(data.train)
    assert len({tuple(r) for r in data.train.materialize().tokens}) == n
    batches = bd.batch_iterator(data.train, batch_size=8, seed=3)
    first = [next(batches) for _ in range(2 * (n // 8) + 3)]  # past two epoch ends
    # every epoch visits distinct rows, and the epochs are shuffled differently
    epoch0 = [tuple(map(tuple, b.tokens)) for b in first[: n // 8]]
    epoch1 = [tuple(map(tuple, b.tokens)) for b in first[n // 8 : 2 * (n // 8)]]
    rows0 = [r for b in epoch0 for r in b]
    assert len(set(rows0)) == len(rows0) == (n // 8) * 8
    assert epoch0 != epoch1
    # a fresh iterator set to a saved state continues exactly
    again = bd.batch_iterator(data.train, batch_size=8, seed=3)
    for _ in range(5):
        next(again)
    state = again.get_state()
    resumed = bd.batch_iterator(data.train, batch_size=8, seed=3)
    resumed.set_state(state)
    for expected in first[5:12]:
        _assert_split_equal(next(resumed), expected)
    # two processes' shares put together are the global batch, and neither reads the other's rows
    shares = [bd.batch_iterator(data.train, batch_size=8, seed=3, share=slice(i * 4, (i + 1) * 4)) for i in (0, 1)]
    for expected in first[:4]:
        parts = [next(s) for s in shares]
        _assert_split_equal([np.concatenate(x) for x in zip(*parts)], expected)
        assert parts[0].tokens.shape == (4, 16)
    with pytest.raises(ValueError, match=r"batch_size=\d+ is larger than the dataset"):
        bd.batch_iterator(data.train, batch_size=n + 1)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDISTILL_CACHE", str(tmp_path / "x"))
    assert bd.token_store.__module__ == "blockdistill.data.store"
    from blockdistill.data.store import cache_root

    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv("BLOCKDISTILL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "blockdistill"
    assert os.fspath(cache_root()).endswith("blockdistill")
