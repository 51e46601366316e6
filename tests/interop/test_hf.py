"""Hugging Face interop: parity with `transformers` on tiny random checkpoints."""

import json
import shutil
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

import blockdistill as bd
from blockdistill.interop.hf import from_hf, to_hf
from blockdistill.data.tokenizers import HFTokenizer, load_hf_tokenizer
from helpers import make_tokenizer_dir

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}
SEQ = 24
TOKENS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], SEQ).astype(np.int32)


def make_hf(kind="llama", seed=0, std=0.2, **changes):
    """A tiny random `transformers` causal LM with weights large enough that errors show."""
    config_cls, model_cls = CLASSES[kind]
    config = config_cls(**{**SMALL, **changes})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # RMSNorm scales around 1
                param.copy_(1.0 + std * torch.randn_like(param))
            else:
                param.copy_(std * torch.randn_like(param))
    return model


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def hf_forward(model, tokens=TOKENS):
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long)[None], output_hidden_states=True)
    return out.logits[0].float().numpy(), [h[0].float().numpy() for h in out.hidden_states]


@eqx.filter_jit
def forward(model, tokens):
    return model(tokens)


def our_logits(model, tokens=TOKENS):
    return np.asarray(forward(model, jnp.asarray(tokens)).logits)


def assert_close(ours, theirs, rtol=1e-4, what=""):
    """Max error relative to the largest reference value (elementwise relative error is
    meaningless near zero)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    error = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert error < rtol, f"{what}: relative error {error:.2e} >= {rtol:.0e}"


def assert_matches_hf(model, hf_model, tokens=TOKENS):
    """Logits and every layer's input (the HF hidden states) agree within 1e-4."""
    hf_logits, hf_hidden = hf_forward(hf_model, tokens)
    out = forward(model, jnp.asarray(tokens))
    assert_close(out.logits, hf_logits, what="logits")
    n_layers = model.config.n_layers
    assert len(hf_hidden) == n_layers + 1
    for index in range(n_layers):
        assert_close(out.states.layer_in[index], hf_hidden[index], what=f"layer_in[{index}]")
    # HF's last hidden state is the final norm of the last layer's output.
    final = model.norm(out.states.layer_out[-1])
    assert_close(final, hf_hidden[-1], what="final hidden state")


def random_model(config, seed=0, std=0.2):
    """A `bd.Transformer` with random weights, without compiling the initialiser."""
    skeleton = eqx.filter_eval_shape(bd.Transformer, config, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(skeleton)
    values = [jnp.asarray(std * rng.standard_normal(x.shape), dtype=jnp.float32) for x in leaves]
    return jax.tree.unflatten(treedef, values)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A saved untied Llama checkpoint and its `transformers` model."""
    model = make_hf("llama")
    return save_hf(model, tmp_path_factory.mktemp("llama")), model


def copy_checkpoint(source, target):
    shutil.copytree(source, target)
    return target


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- import parity


@pytest.mark.parametrize(
    "kind, tied",
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False)],
)
def test_from_hf_matches_transformers(tmp_path, kind, tied):
    hf_model = make_hf(kind, tie_word_embeddings=tied)
    model = from_hf(save_hf(hf_model, tmp_path))
    assert model.config.tie_embeddings == tied
    assert (model.lm_head is None) == tied
    assert model.config.qkv_bias == (kind == "qwen2")
    assert model.config.n_layers == 3 and model.config.n_kv_heads == 2
    assert model.layers.layers.self_attn.q_proj.weight.shape == (3, 64, 64)
    assert model.layers.layers.mlp.down_proj.weight.shape == (3, 64, 96)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    assert_matches_hf(model, hf_model)


def test_packed_row_matches_transformers_per_document(llama_dir):
    """A Hugging Face teacher on a packed row computes, for each document, what
    `transformers` computes on that document alone (BOS first, positions from 0)."""
    folder, hf_model = llama_dir
    model = from_hf(folder)
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, SMALL["vocab_size"], size).astype(np.int32) for size in (9, 5, 6)]
    tokens, mask, segment_ids = bd.pack_tokens(docs, SEQ, bos_id=1, pad_id=0)
    assert tokens.shape == (1, SEQ) and not mask[0, -1]  # 24 slots, 24 - 1 used
    packed = model(jnp.asarray(tokens[0]), segment_ids=jnp.asarray(segment_ids[0]))
    start = 0
    for doc in docs:
        own = np.concatenate([[1], doc]).astype(np.int32)
        hf_logits, hf_hidden = hf_forward(hf_model, own)
        rows = slice(start, start + own.size)
        assert_close(packed.logits[rows], hf_logits, what="packed logits")
        assert_close(packed.states.layer_in[1, rows], hf_hidden[1], what="packed layer_in[1]")
        start += own.size


def test_overrides_and_explicit_head_dim(tmp_path, llama_dir):
    folder, hf_model = llama_dir
    unrolled = from_hf(folder, scan_layers=False, max_seq_len=32, remat="full")
    assert unrolled.config.scan_layers is False
    assert unrolled.config.max_seq_len == 32 and unrolled.config.remat == "full"
    assert from_hf(folder).config.max_seq_len == SMALL["max_position_embeddings"]
    assert_matches_hf(unrolled, hf_model)
    # head_dim that is not hidden_size // num_attention_heads
    wide = make_hf("llama", head_dim=32)
    model = from_hf(save_hf(wide, tmp_path / "wide"))
    assert model.config.head_dim == 32
    assert_matches_hf(model, wide)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_load(tmp_path, dtype):
    hf_model = make_hf("qwen2", std=0.1).to(dtype)
    folder = save_hf(hf_model, tmp_path)
    model = from_hf(folder)
    state = hf_model.state_dict()
    np.testing.assert_array_equal(
        model.embed_tokens.weight, state["model.embed_tokens.weight"].float().numpy()
    )
    np.testing.assert_array_equal(
        model.layers.layers.self_attn.k_proj.bias[2],
        state["model.layers.2.self_attn.k_proj.bias"].float().numpy(),
    )
    assert model.embed_tokens.weight.dtype == jnp.float32
    # a fresh float32 model of the rounded weights (`.float()` would keep a rounded RoPE)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert_matches_hf(model, reference)


def test_sharded_checkpoint(tmp_path, llama_dir):
    _, hf_model = llama_dir
    folder = save_hf(hf_model, tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert_matches_hf(from_hf(folder), hf_model)


def test_llama3_rope_scaling(tmp_path):
    rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    hf_model = make_hf("llama", rope_scaling=rope, max_position_embeddings=128)
    folder = save_hf(hf_model, tmp_path / "scaled")
    model = from_hf(folder)
    assert model.config.rope_scaling == bd.RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
    tokens = np.arange(48, dtype=np.int32) % SMALL["vocab_size"]
    assert_matches_hf(model, hf_model, tokens)
    # the scaling matters: the same weights without it give other logits
    plain = copy_checkpoint(folder, tmp_path / "plain")
    config = json.loads((plain / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        config.pop(key, None)
    (plain / "config.json").write_text(json.dumps(config))
    unscaled = from_hf(plain)
    assert unscaled.config.rope_scaling is None
    hf_logits, _ = hf_forward(hf_model, tokens)
    assert np.max(np.abs(our_logits(unscaled, tokens) - hf_logits)) > 1e-2 * np.max(
        np.abs(hf_logits)
    )


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", True)])
def test_round_trip_through_to_hf(tmp_path, kind, tied):
    hf_model = make_hf(kind, tie_word_embeddings=tied)
    model = from_hf(save_hf(hf_model, tmp_path / "in"))
    out = to_hf(model, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(hf_model)
    hf_logits, _ = hf_forward(hf_model)
    assert_close(hf_forward(reloaded)[0], hf_logits, what="exported logits")
    assert_matches_hf(model, reloaded)
    again = from_hf(out)
    assert again.config == model.config
    assert eqx.tree_equal(eqx.filter(again, eqx.is_array), eqx.filter(model, eqx.is_array))


def test_to_hf_of_a_native_model(tmp_path):
    config = bd.TransformerConfig(
        vocab_size=96,
        dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=80,
        max_seq_len=64,
        rope_theta=5000.0,
        rope_scaling=bd.RopeScaling(factor=4.0, original_max_position_embeddings=16),
        norm_eps=1e-6,
    )
    model = random_model(config)
    out = to_hf(model, tmp_path / "native")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded, transformers.LlamaForCausalLM)
    tokens = TOKENS % config.vocab_size
    assert_matches_hf(model, reloaded, tokens)
    # also as Qwen2 (zero biases) and Mistral
    for architecture in ("Qwen2ForCausalLM", "MistralForCausalLM"):
        folder = to_hf(model, tmp_path / architecture, architecture=architecture)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert type(reloaded).__name__ == architecture
        assert_close(hf_forward(reloaded, tokens)[0], our_logits(model, tokens), what=architecture)


def test_to_hf_replaces_atomically_and_copies_tokenizer(tmp_path, llama_dir):
    folder, _ = llama_dir
    model = from_hf(folder)
    tokenizer_dir = make_tokenizer_dir(tmp_path / "tok")
    (tokenizer_dir / "config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 2}))
    target = tmp_path / "export" / "student"
    to_hf(model, target)
    (target / "stale.txt").write_text("from an older export")
    to_hf(model, target, tokenizer_from=tokenizer_dir)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in target.parent.iterdir()] == ["student"]  # no temporary folders
    config = json.loads((target / "config.json").read_text())
    assert config["eos_token_id"] == 3 and config["bos_token_id"] == 2
    assert HFTokenizer(target).encode("hello world").tolist() == HFTokenizer(
        tokenizer_dir
    ).encode("hello world").tolist()
    fast = transformers.AutoTokenizer.from_pretrained(target)
    assert fast("hello world", add_special_tokens=False)["input_ids"] == (
        HFTokenizer(target).encode("hello world").tolist()
    )


# ----------------------------------------------------------------------------- errors


def test_missing_files_raise(tmp_path, llama_dir):
    folder, _ = llama_dir
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        from_hf(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as info:
        from_hf(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), r"'gpt2'.*'llama'.*qwen2"),
        (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"'yarn'.*'llama3'"),
        (dict(hidden_act="gelu"), "gelu"),
        (dict(attention_bias=True), "attention_bias"),
    ],
)
def test_unsupported_config_raises(tmp_path, llama_dir, changes, pattern):
    folder = copy_checkpoint(llama_dir[0], tmp_path / "ckpt")
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ValueError, match=pattern):
        from_hf(folder)


def test_shape_fields_cannot_be_overridden(llama_dir):
    with pytest.raises(ValueError, match=r"n_layers.*scan_layers"):
        from_hf(llama_dir[0], n_layers=2)


def rewrite_weights(folder, edit):
    file = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(file))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(file))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"'model\.layers\.1\.mlp\.up_proj\.weight'.*\(96, 64\).*missing",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
            r"'model\.layers\.0\.self_attn\.o_proj\.bias'.*unexpected",
        ),
        (
            lambda t: t.update(
                {"model.layers.2.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
            ),
            r"'model\.layers\.2\.self_attn\.k_proj\.weight'.*\(32, 64\).*\(64, 64\)",
        ),
        (
            lambda t: t.pop("lm_head.weight"),
            r"'lm_head\.weight'.*\(128, 64\).*missing",
        ),
    ],
    ids=["missing", "extra", "wrong-shape", "missing-head"],
)
def test_bad_tensors_raise(tmp_path, llama_dir, edit, pattern):
    folder = copy_checkpoint(llama_dir[0], tmp_path / "ckpt")
    rewrite_weights(folder, edit)
    with pytest.raises(ValueError, match=pattern):
        from_hf(folder)


def test_tied_checkpoint_with_a_stored_head(tmp_path, llama_dir):
    folder = copy_checkpoint(llama_dir[0], tmp_path / "ckpt")
    edit_json(folder / "config.json", tie_word_embeddings=True)
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    assert from_hf(folder).lm_head is None
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_hf(folder)


def test_to_hf_rejects_what_hf_cannot_hold(tmp_path):
    config = bd.TransformerConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, qkv_bias=True)
    model = random_model(config)
    with pytest.raises(ValueError, match="qkv_bias"):
        to_hf(model, tmp_path / "out", architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        to_hf(model, tmp_path / "out", architecture="GPT2LMHeadModel")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        to_hf(model, tmp_path / "out", tokenizer_from=tmp_path)
    assert not (tmp_path / "out").exists()
    assert to_hf(model, tmp_path / "out").is_dir()  # Qwen2 inferred
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"


# ----------------------------------------------------------------------------- tokenizer


def test_hf_tokenizer(tmp_path):
    folder = make_tokenizer_dir(tmp_path / "tok")
    tokenizer = HFTokenizer(folder)
    assert tokenizer.pad_id == 2  # "<|endoftext|>" from tokenizer_config.json
    assert tokenizer.bos_id is None  # the tokenizer adds nothing before a text
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.vocab_size == max(vocab.values()) + 1
    text = "def hello(x):\n    return x + 'ü'"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert 0 <= ids.min() and ids.max() < tokenizer.vocab_size
    assert tokenizer.pad_id not in ids.tolist()  # no special tokens added
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(jnp.asarray(ids)) == text
    assert tokenizer.decode(ids.tolist()) == text
    assert tokenizer.encode("").shape == (0,)
    assert HFTokenizer(folder, pad_id=0, bos_id=1).pad_id == 0
    # config.json's eos_token_id comes first (the first one of a list)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert load_hf_tokenizer(folder).pad_id == 1
    with pytest.raises(ValueError, match="bos_id=999 is outside the vocabulary"):
        HFTokenizer(folder, bos_id=999)


def test_hf_tokenizer_bos_is_what_the_tokenizer_adds(tmp_path):
    folder = make_tokenizer_dir(tmp_path / "tok")
    # a post-processor that prepends <|bos|> (id 1), as Llama's tokenizer.json does
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", 1)]
    )
    raw.save(str(folder / "tokenizer.json"))
    tokenizer = HFTokenizer(folder)
    assert tokenizer.bos_id == 1
    assert tokenizer.encode("hello").tolist() == raw.encode("hello", add_special_tokens=False).ids
    tokens, mask, segment_ids = bd.pack_documents(
        [bd.Document("a", "hello"), bd.Document("b", "world")], tokenizer, 16
    )
    starts = tokens[0][np.flatnonzero(np.diff(segment_ids[0], prepend=0) > 0)]
    assert starts.tolist() == [1, 1]  # every document begins with the BOS
    assert HFTokenizer(folder, bos_id=None).bos_id is None
    # tokenizer_config.json's add_bos_token + bos_token, when the post-processor is silent
    folder2 = make_tokenizer_dir(tmp_path / "tok2")
    edit_json(folder2 / "tokenizer_config.json", add_bos_token=True, bos_token="<|bos|>")
    assert HFTokenizer(folder2).bos_id == 1


def test_load_hf_tokenizer_without_tokenizer_json(tmp_path):
    assert load_hf_tokenizer(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)


def test_hf_tokenizer_without_eos_pads_with_zero(tmp_path):
    folder = make_tokenizer_dir(tmp_path / "tok")
    (folder / "tokenizer_config.json").unlink()
    assert HFTokenizer(folder).pad_id == 0  # padding is masked out: any id will do


def test_hf_tokenizer_without_tokenizers_package(tmp_path, monkeypatch):
    folder = make_tokenizer_dir(tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r'pip install "blockdistill\[hf\]"'):
        HFTokenizer(folder)


# ----------------------------------------------------------------------------- tokenizer provenance


def test_distilled_student_keeps_the_teachers_tokenizer(tmp_path, corpus, capsys):
    """A student of a Hugging Face teacher is saved with the teacher's tokenizer, so
    `blockdistill eval` scores it on the same tokens as the run did."""
    from blockdistill.app.cli import main

    teacher_dir = save_hf(make_hf("llama", vocab_size=320), tmp_path / "teacher")
    make_tokenizer_dir(teacher_dir)  # its 300-id tokenizer.json next to the weights
    out = tmp_path / "run"
    data = ["--data", str(corpus), "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2"]
    args = ["distill", "--no-progress", "--no-plots", "--out", str(out), "--teacher", str(teacher_dir),
            "--steps", "4", "--eval-every", "4", "--checkpoint-every", "2", *data]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval/student_loss" in r][-1]["eval/student_loss"]
    student = out / "student"
    assert (student / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    assert json.loads((student / "config.json").read_text())["tokenizer"]["kind"] == "hf"
    capsys.readouterr()
    assert main(["eval", str(student), *data]) == 0
    assert f"eval loss {final:.4f} nats/token" in capsys.readouterr().out
    # export-hf of the run and of a checkpoint carry the tokenizer along
    for source in (out, out / "checkpoints" / "2"):
        exported = tmp_path / f"hf-{source.name}"
        assert main(["export-hf", str(source), str(exported)]) == 0
        assert (exported / "tokenizer.json").is_file()
    # rerunning (resuming) the run with another tokenizer is refused
    raw = tokenizers.Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    raw.save(str(teacher_dir / "tokenizer.json"))
    assert main(args) == 1
    assert "another tokenizer" in capsys.readouterr().err
    # a folder that recorded no tokenizer is not silently taken as byte-level
    config = json.loads((student / "config.json").read_text())
    del config["tokenizer"]
    (student / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(student), *data]) == 1
    assert "vocabulary of 320 ids is not the byte tokenizer's 256" in capsys.readouterr().err


def test_tokenizer_bigger_than_the_vocabulary_is_an_error(tmp_path):
    model = random_model(bd.TransformerConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2))
    tokenizer = HFTokenizer(make_tokenizer_dir(tmp_path / "tok"))  # about 300 ids
    size = tokenizer.vocab_size
    with pytest.raises(ValueError, match=f"{size} ids.*vocab_size is 128"):
        bd.save_model(model, tmp_path / "model", tokenizer=tokenizer)
    bd.save_model(model, tmp_path / "model")
    with pytest.raises(ValueError, match=f"{size} ids but the model .* vocabulary of 128"):
        bd.load_tokenizer(tmp_path / "model", tmp_path / "tok")
