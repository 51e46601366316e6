"""Fixtures shared by the study scripts' tests."""

import pytest


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-layer byte-level teacher of width 64: the study's machinery at a fraction of the
    shipped teacher's compile and step time (its numbers never matter here)."""
    import jax

    import blockdistill as bd

    config = bd.TransformerConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  mlp_dim=128, max_seq_len=64)
    path = tmp_path_factory.mktemp("tiny-teacher") / "teacher"
    bd.save_model(bd.Transformer(config, key=jax.random.key(0)), path, tokenizer=bd.ByteTokenizer())
    return str(path)
