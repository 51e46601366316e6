import json
import random
import re

import numpy as np
import pytest

from blockdistill.data.dataset import Batcher, eval_batches, load_dataset
from blockdistill.data.corpus import Document, default_corpus, read_corpus, split_documents
from blockdistill.data.packing import pack_documents, pack_tokens
from blockdistill.data.tokenizers import ByteTokenizer, Tokenizer


@pytest.fixture(scope="module")
def default_docs():
    return default_corpus()


def _toy_arrays(n=23, seq_len=5):
    tokens = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    mask = np.ones((n, seq_len), dtype=bool)
    return tokens, mask


def _take(batcher, count):
    return [next(batcher) for _ in range(count)]


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for batch_a, batch_b in zip(left, right, strict=True):
        for array_a, array_b in zip(batch_a, batch_b, strict=True):
            np.testing.assert_array_equal(array_a, array_b)


# ----------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text", ["", "hello world", "héllo wörld ✓ 🐍", "def f(x):\n\treturn x\n"]
)
def test_byte_tokenizer_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.size == len(text.encode("utf-8"))
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tokenizer.vocab_size)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


def test_byte_tokenizer_properties():
    tokenizer = ByteTokenizer()
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == 256 and tokenizer.bos_id == 0 and tokenizer.pad_id == 0
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"  # cut, not raised
    with pytest.raises(ValueError, match="300"):
        tokenizer.decode([104, 300])
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(np.zeros((2, 2), np.int32))


# ----------------------------------------------------------------------- packing


@pytest.mark.parametrize("bos_id", [9, None])
@pytest.mark.parametrize("seq_len", [1, 4, 7, 16])
def test_pack_tokens_preserves_stream(seq_len, bos_id):
    rng = np.random.default_rng(0)
    docs = [
        rng.integers(10, 50, size=size).astype(np.int32) for size in [5, 0, 12, 1, 8]
    ]
    tokens, mask, segment_ids = pack_tokens(docs, seq_len, bos_id=bos_id, pad_id=3)
    starts = [] if bos_id is None else [bos_id]
    pieces = [np.concatenate([starts, doc]).astype(np.int32) for doc in docs]
    expected = np.concatenate(pieces)
    owner = np.concatenate([np.full(len(piece), i) for i, piece in enumerate(pieces)])
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_ and segment_ids.dtype == np.int32
    assert tokens.shape == mask.shape == segment_ids.shape == (-(-expected.size // seq_len), seq_len)
    # All tokens, in order, every document starting with the BOS id when there is one.
    np.testing.assert_array_equal(tokens[mask], expected)
    np.testing.assert_array_equal(tokens.reshape(-1)[: expected.size], expected)
    # The mask is True on a prefix of the flat stream, padding is pad_id and segment 0.
    flat_mask = mask.reshape(-1)
    assert flat_mask[: expected.size].all() and not flat_mask[expected.size :].any()
    assert (tokens.reshape(-1)[expected.size :] == 3).all()
    assert (segment_ids.reshape(-1)[expected.size :] == 0).all()
    # Only the last row may be partial.
    assert mask[:-1].all()
    # Segments: numbered from 1 in each row, changing exactly where the document does.
    flat_owner = np.concatenate([owner, np.full(flat_mask.size - owner.size, -1)]).reshape(tokens.shape)
    for row_segments, row_owner, row_mask in zip(segment_ids, flat_owner, mask):
        valid = row_segments[row_mask]
        assert valid.size == 0 or valid[0] == 1
        np.testing.assert_array_equal(np.diff(valid) != 0, np.diff(row_owner[row_mask]) != 0)
        assert (np.diff(valid) >= 0).all() and (np.diff(valid) <= 1).all()


def test_pack_tokens_exact_multiple_and_empty():
    tokens, mask, segment_ids = pack_tokens([np.array([1, 2]), np.array([3])], 4, bos_id=0)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 0], [3, 0, 0, 0]])
    np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 2], [1, 0, 0, 0]])
    tokens, mask, segment_ids = pack_tokens([np.array([1, 2]), np.array([3])], 3)
    np.testing.assert_array_equal(tokens, [[1, 2, 3]])
    np.testing.assert_array_equal(segment_ids, [[1, 1, 2]])
    assert mask.all()
    tokens, mask, segment_ids = pack_tokens([], 4)
    assert tokens.shape == mask.shape == segment_ids.shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len=0"):
        pack_tokens([np.array([1])], 0)


def test_pack_documents_with_bytes():
    texts = ["alpha", "βeta", "", "gamma\n"]
    docs = [Document(name=str(i), text=text) for i, text in enumerate(texts)]
    tokenizer = ByteTokenizer()
    tokens, mask, segment_ids = pack_documents(docs, tokenizer, 6)
    # every document starts with the byte tokenizer's BOS, the NUL byte
    assert tokenizer.decode(tokens[mask]) == "".join("\0" + text for text in texts)
    assert not mask[-1, -1]  # 1 + 5 + 1 + 5 + 1 + 0 + 1 + 6 = 20 bytes -> 4 rows of 6
    np.testing.assert_array_equal(segment_ids[:2], np.ones((2, 6)))  # "alpha", "βeta"
    np.testing.assert_array_equal(segment_ids[2], [1, 2, 2, 2, 2, 2])  # "", "gamm"
    np.testing.assert_array_equal(segment_ids[3], [1, 1, 0, 0, 0, 0])  # "a\n", padding


# ----------------------------------------------------------------------- splitting


def test_split_is_deterministic_and_order_independent():
    docs = [Document(name=f"dir/file_{i}.py", text=f"x = {i}") for i in range(2000)]
    train, val = split_documents(docs, 0.05)
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == len(docs)
    assert 0.03 < len(val) / len(docs) < 0.07
    shuffled = list(docs)
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.05)
    assert {d.name for d in val2} == {d.name for d in val}
    assert {d.name for d in train2} == {d.name for d in train}
    # Each split keeps the input order.
    assert [d.name for d in train2] == [d.name for d in shuffled if d in set(train)]
    # A larger fraction only moves documents from train to val.
    _, val_more = split_documents(docs, 0.2)
    assert {d.name for d in val} <= {d.name for d in val_more}
    assert split_documents(docs, 0.0) == (docs, [])


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        split_documents([Document("a", "b")], 1.0)


# ----------------------------------------------------------------------- batching


def test_batcher_is_deterministic_per_seed():
    tokens, mask = _toy_arrays()
    first = _take(Batcher(tokens, mask, batch_size=4, seed=3), 12)
    again = _take(Batcher(tokens, mask, batch_size=4, seed=3), 12)
    other = _take(Batcher(tokens, mask, batch_size=4, seed=4), 12)
    _assert_same_batches(first, again)
    assert any(
        not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True)
    )


def test_batcher_epochs_are_permutations():
    tokens, mask = _toy_arrays(n=23)
    batcher = Batcher(tokens, mask, batch_size=4, seed=0)
    assert batcher.batches_per_epoch == 5
    epochs = []
    for _ in range(3):
        batches = _take(batcher, 5)
        for batch_tokens, batch_mask, batch_segments in batches:
            assert batch_tokens.shape == batch_mask.shape == batch_segments.shape == (4, 5)
            np.testing.assert_array_equal(batch_segments, np.ones((4, 5)))  # default: a row is a document
        rows = np.concatenate([t[:, 0] // 5 for t, _, _ in batches])
        assert len(set(rows.tolist())) == 20  # no row twice within an epoch
        # every batch row is a row of the dataset
        for batch_tokens, _, _ in batches:
            np.testing.assert_array_equal(batch_tokens, tokens[batch_tokens[:, 0] // 5])
        epochs.append(rows)
    assert batcher.state_dict() == {"epoch": 3, "index": 0, "seed": 0}
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("taken", [0, 2, 5, 7, 13])  # start, mid, boundary, across
def test_batcher_resumes_exactly(taken):
    tokens, mask = _toy_arrays(n=23)
    uninterrupted = _take(Batcher(tokens, mask, batch_size=4, seed=11), taken + 9)
    interrupted = Batcher(tokens, mask, batch_size=4, seed=11)
    _take(interrupted, taken)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["epoch"] == taken // 5 and state["index"] == taken % 5
    resumed = Batcher(tokens, mask, batch_size=4, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    _assert_same_batches(_take(resumed, 9), uninterrupted[taken:])


def test_batcher_errors():
    tokens, mask = _toy_arrays(n=6)
    with pytest.raises(ValueError, match=r"batch_size=7.*\(6 sequences\)"):
        Batcher(tokens, mask, batch_size=7)
    batcher = Batcher(tokens, mask, batch_size=2)
    with pytest.raises(ValueError, match="index=3"):
        batcher.load_state_dict({"epoch": 0, "index": 3, "seed": 0})
    with pytest.raises(ValueError, match="epoch=None"):
        batcher.load_state_dict({"index": 0, "seed": 0})


def test_eval_batches_fixed_and_padded():
    tokens, mask = _toy_arrays(n=10)
    segment_ids = np.where(np.arange(5) < 2, 1, 2).astype(np.int32)[None].repeat(10, 0)
    batches = eval_batches(tokens, mask, segment_ids, batch_size=4)
    assert len(batches) == 3
    _assert_same_batches(batches, eval_batches(tokens, mask, segment_ids, batch_size=4))
    stacked, stacked_mask, stacked_segments = (np.concatenate(arrays) for arrays in zip(*batches))
    np.testing.assert_array_equal(stacked[:10], tokens)  # in order, no shuffle
    np.testing.assert_array_equal(stacked_segments[:10], segment_ids)
    assert stacked_mask[:10].all() and not stacked_mask[10:].any()
    assert not stacked_segments[10:].any()  # filler rows are padding: segment 0
    assert all(t.shape == (4, 5) for t, _, _ in batches)
    _assert_same_batches(eval_batches(tokens, mask, segment_ids, batch_size=4, max_batches=2), batches[:2])
    assert eval_batches(tokens[:0], mask[:0], batch_size=4) == []


# ----------------------------------------------------------------------- corpora


def test_read_single_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "code.py").write_text("import os\n")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")

    docs = read_corpus(tmp_path)
    assert [d.name for d in docs] == ["a.txt", "b/two.txt", "bad.txt"]
    assert docs[0].text == "first"
    assert docs[2].text == "ok \ufffd\ufffd end"
    assert read_corpus(str(tmp_path)) == docs

    assert read_corpus(tmp_path, glob="**/*.py") == [Document("code.py", "import os\n")]
    assert read_corpus(tmp_path / "a.txt") == [Document("a.txt", "first")]
    pattern = str(tmp_path / "**" / "*.txt")
    assert [d.name for d in read_corpus(pattern)] == ["a.txt", "b/two.txt", "bad.txt"]


def test_read_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"text": "one"}, {"text": "two", "id": 2}, {"text": ""}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    docs = read_corpus(path)
    assert docs == [Document("data.jsonl:1", "one"), Document("data.jsonl:2", "two")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.jsonl").write_text('{"text": "three"}\n')
    names = [d.name for d in read_corpus(tmp_path, glob="**/*.jsonl")]
    assert names == ["data.jsonl:1", "data.jsonl:2", "sub/more.jsonl:1"]


def test_read_corpus_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_corpus(missing)
    with pytest.raises(ValueError, match=re.escape(f"corpus '{tmp_path}' is empty")):
        read_corpus(tmp_path)
    (tmp_path / "blank.txt").write_text("")  # only empty documents
    with pytest.raises(ValueError, match=re.escape(f"corpus '{tmp_path}' is empty")):
        read_corpus(tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(str(tmp_path / "*.md"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a valid JSON"):
        read_corpus(bad)
    bad.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:3: .*"text"'):
        read_corpus(bad)
    bad.write_text('["text"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_corpus(bad)


# ----------------------------------------------------------------------- datasets


def test_load_dataset_from_folder(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * (i + 1))
    dataset = load_dataset(tmp_path, ByteTokenizer(), 32, val_fraction=0.2)
    assert dataset.num_documents == 60 and 0 < dataset.num_val_documents < 60
    tokens, mask, segment_ids = dataset.train
    assert tokens.shape[1] == dataset.val.tokens.shape[1] == 32
    total = int(dataset.train.mask.sum() + dataset.val.mask.sum())
    text_bytes = sum(len(p.read_bytes()) for p in tmp_path.iterdir())
    # every byte once, plus one BOS (NUL) before every document
    assert total == text_bytes + 60
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]) & mask[:, 1:]
    assert starts.any() and (tokens[:, 1:][starts] == 0).all()  # a document starts at its BOS
    again = load_dataset(tmp_path, ByteTokenizer(), 32, val_fraction=0.2)
    np.testing.assert_array_equal(again.train.tokens, tokens)
    np.testing.assert_array_equal(again.val.tokens, dataset.val.tokens)


def test_load_dataset_single_file_falls_back_to_stream_split(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("x" * 1000)
    dataset = load_dataset(path, ByteTokenizer(), 100, val_fraction=0.05)
    assert dataset.train.tokens.shape == (10, 100)  # BOS + 1000 bytes: 11 rows
    assert dataset.val.tokens.shape == (1, 100)
    assert dataset.num_val_documents == 0
    empty_val = load_dataset(path, ByteTokenizer(), 100, val_fraction=0.0)
    assert empty_val.train.tokens.shape == (11, 100)
    assert empty_val.val.tokens.shape == (0, 100)
    with pytest.raises(ValueError, match="too small"):
        load_dataset(path, ByteTokenizer(), 1001, val_fraction=0.05)  # one row
    with pytest.raises(ValueError, match="seq_len=0"):
        load_dataset(path, ByteTokenizer(), 0)


def test_default_corpus(default_docs):
    assert len(default_docs) > 100
    names = [d.name for d in default_docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "argparse.py" in names and "json/decoder.py" in names
    for name in names:
        parts = name.split("/")
        assert name.endswith(".py")
        assert not {"test", "tests", "site-packages", "idlelib"} & set(parts), name
    assert all(d.text for d in default_docs)
    assert sum(len(d.text) for d in default_docs) > 1_000_000


def test_default_dataset_split(default_docs, monkeypatch):
    import blockdistill.data.corpus as data

    monkeypatch.setattr(data, "default_corpus", lambda: default_docs)  # read once
    dataset = load_dataset(None, ByteTokenizer(), 256)
    assert dataset.source == "default"
    fraction = dataset.num_val_documents / dataset.num_documents
    assert 0.03 < fraction < 0.07
    n_train, n_val = dataset.train.tokens.shape[0], dataset.val.tokens.shape[0]
    assert 0.01 < n_val / (n_train + n_val) < 0.15
    assert dataset.train.tokens.max() < 256
    batcher = Batcher(*dataset.train, batch_size=8, seed=0)
    tokens, mask, segment_ids = next(batcher)
    assert tokens.shape == mask.shape == segment_ids.shape == (8, 256)
