"""Heterogeneous students in NVIDIA Puzzle's DeciLM / Nemotron-NAS format: exported,
loaded by `transformers` through the exported modeling code (trust_remote_code), read back
by `from_hf`, and Puzzle-style configs read."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import blockdistill as bd
from blockdistill.app.cli import main
from blockdistill.interop.decilm import FFN_ROUNDING, ffn_mult_for, ffn_mult_to_intermediate_size
from blockdistill.interop.decilm_code import CONFIGURATION_CODE
from blockdistill.interop.folders import read_model_config

BASE = bd.TransformerConfig(vocab_size=256, dim=64, n_layers=7, n_heads=4, n_kv_heads=2, mlp_dim=128, max_seq_len=64)
#: every block kind the format carries: full, fewer KV heads and a narrower MLP,
#: attention removed, the MLP removed, the identity, a narrower MLP, a linear layer
MIXED_SHAPES = (
    bd.BlockShape(128, 2),
    bd.BlockShape(64, 1),
    bd.BlockShape(128, 0),
    bd.BlockShape(0, 2),
    bd.BlockShape(0, 0),
    bd.BlockShape(96, 2),
    bd.BlockShape(0, 0, linear=True),
)
TOKENS = np.random.default_rng(0).integers(0, BASE.vocab_size, 20).astype(np.int32)


def random_model(config, seed=0, std=0.2):
    """A `bd.Transformer` with random weights large enough that errors show (norms around
    1), each layer at its own shape as a heterogeneous model stores it."""
    skeleton = eqx.filter_eval_shape(bd.Transformer, config, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(skeleton)
    model = jax.tree.unflatten(treedef, [jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32) for x in leaves])
    norms = lambda m: [m.norm.weight] + [  # noqa: E731
        norm.weight for segment in m.layers.segments
        for norm in (segment.input_layernorm, segment.post_attention_layernorm) if norm is not None
    ]
    return eqx.tree_at(norms, model, [1.0 + w for w in norms(model)])


@eqx.filter_jit
def forward(model, tokens):
    return model(tokens)


def assert_close(ours, theirs, rtol=1e-4, what=""):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    error = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert error < rtol, f"{what}: relative error {error:.2e} >= {rtol:.0e}"


def assert_same_logits(model, other):
    np.testing.assert_array_equal(forward(model, jnp.asarray(TOKENS)).logits, forward(other, jnp.asarray(TOKENS)).logits)


def load_remote(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed student, and its export."""
    model = random_model(BASE.replace(layer_shapes=MIXED_SHAPES))
    return model, bd.to_hf(model, tmp_path_factory.mktemp("decilm") / "student")


# ----------------------------------------------------------------------------- the format


def test_ffn_mult_rounding():
    # the loaders' rule: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672  # Nemotron-51B's widest MLP
    assert ffn_mult_to_intermediate_size(1.0, 8192) == 5632  # 5461, rounded up
    assert ffn_mult_to_intermediate_size(2.625, 8192) == 14336
    assert ffn_mult_to_intermediate_size(0.5, 64) == 256  # 21, rounded up
    namespace: dict = {}
    exec(compile(CONFIGURATION_CODE, "configuration_blockdistill_decilm.py", "exec"), namespace)
    exported_rule = namespace["intermediate_size"]
    section = namespace["Section"]
    for hidden in (64, 256, 3072, 4096, 8192):
        for mult in np.round(np.arange(0.05, 8.0, 0.0625), 6):
            width = ffn_mult_to_intermediate_size(float(mult), hidden)
            assert width == math.ceil(int(2 * float(mult) * hidden / 3) / FFN_ROUNDING) * FFN_ROUNDING
            assert exported_rule(section(ffn_mult=float(mult)), hidden) == width
    # exactly the positive multiples of 256 have an ffn_mult, which gives them back
    for hidden in (64, 256, 4096, 5120, 8192):
        for width in range(1, 4 * FFN_ROUNDING + 1):
            mult = ffn_mult_for(width, hidden)
            assert (mult is not None) == (width % FFN_ROUNDING == 0)
            if mult is not None:
                assert ffn_mult_to_intermediate_size(mult, hidden) == width
    assert ffn_mult_for(768, 256) == 4.5 and ffn_mult_for(14336, 4096) == 5.25
    assert exported_rule(section(intermediate_size=96), 64) == 96


def test_the_exported_config(mixed):
    _, folder = mixed
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert "intermediate_size" not in config and "num_key_value_heads" not in config
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    blocks = config["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 4, None, 2, None, 2, None]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, False, True, False, False]
    # the linear layer is a linear attention (x + W rmsnorm(x)) with no FFN
    assert [b["attention"]["replace_with_linear"] for b in blocks] == [False] * 6 + [True]
    assert [b["ffn"]["replace_with_linear"] for b in blocks] == [False] * 7
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True, True, False, True]
    # widths that are not multiples of 256 go as the exact intermediate_size
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [128, 64, 128, None, None, 96, None]
    assert not any("ffn_mult" in b["ffn"] for b in blocks)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "configuration_blockdistill_decilm.py", "model.safetensors", "modeling_blockdistill_decilm.py",
    ]


def test_stored_parameters_are_the_models_own(mixed):
    model, folder = mixed
    stored = safetensors.numpy.load_file(folder / "model.safetensors")
    assert sum(v.size for v in stored.values()) == bd.parameter_count(model.config)
    # the model stores exactly these (each layer at its own shape); the padded form more
    assert sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))) == bd.parameter_count(model.config)
    padded, _ = bd.padded_layers(model)
    assert bd.parameter_count(model.config) < sum(x.size for x in jax.tree.leaves(padded))
    # parts a layer lacks have no tensors (no norm either); layer 4 is the identity
    assert not [name for name in stored if name.startswith("model.layers.4.")]
    assert "model.layers.2.input_layernorm.weight" not in stored
    assert stored["model.layers.1.self_attn.k_proj.weight"].shape == (16, 64)  # 1 KV head of 16
    assert stored["model.layers.5.mlp.down_proj.weight"].shape == (64, 96)
    assert sorted(name for name in stored if name.startswith("model.layers.6.")) == [
        "model.layers.6.input_layernorm.weight", "model.layers.6.self_attn.linear_attn.weight",
    ]
    assert stored["model.layers.6.self_attn.linear_attn.weight"].shape == (64, 64)


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_gives_our_logits(tmp_path, mixed, tied):
    model, folder = mixed
    if tied:
        model = random_model(model.config.replace(tie_embeddings=True), seed=1)
        folder = bd.to_decilm(model, tmp_path / "tied")
    hf_model = load_remote(folder)
    assert type(hf_model).__name__ == "DeciLMForCausalLM"
    with torch.no_grad():
        out = hf_model(torch.as_tensor(TOKENS, dtype=torch.long)[None], output_hidden_states=True)
    ours = forward(model, jnp.asarray(TOKENS))
    assert_close(ours.logits, out.logits[0].numpy(), what="logits")
    for index in range(model.config.n_layers):
        assert_close(ours.states.layer_in[index], out.hidden_states[index][0].numpy(), what=f"layer_in[{index}]")
    if tied:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_transformers_generates_our_greedy_continuation(mixed):
    model, folder = mixed
    hf_model = load_remote(folder)
    prompt = list(TOKENS[:6])
    ours = list(prompt)
    for _ in range(5):
        ours.append(int(jnp.argmax(forward(model, jnp.asarray(ours)).logits[-1])))
    for use_cache in (True, False):  # the KV cache holds the attention layers only
        with torch.no_grad():
            theirs = hf_model.generate(
                torch.as_tensor(prompt, dtype=torch.long)[None], max_new_tokens=5, do_sample=False,
                use_cache=use_cache, pad_token_id=0,
            )
        assert theirs[0].tolist() == ours, use_cache


# ----------------------------------------------------------------------------- round trips


def test_from_hf_reads_it_back(mixed):
    model, folder = mixed
    again = bd.from_hf(folder)
    assert again.config == model.config
    for layer in range(model.config.n_layers):  # (the norms of parts a layer lacks are not stored)
        assert eqx.tree_equal(bd.own_weights(again, layer), bd.own_weights(model, layer)), layer
    outer = lambda m: (m.embed_tokens, m.norm, m.lm_head)  # noqa: E731
    assert eqx.tree_equal(outer(again), outer(model))
    assert_same_logits(again, model)
    assert read_model_config(folder) == model.config  # what --teacher, --student and plan read
    assert bd.load_model(folder, scan_layers=False).config == model.config.replace(scan_layers=False)


def test_a_uniform_model_stays_llama_unless_asked(tmp_path):
    model = random_model(BASE.replace(n_layers=2))
    llama = bd.to_hf(model, tmp_path / "llama")
    assert json.loads((llama / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in llama.iterdir()) == ["config.json", "model.safetensors"]
    folder = bd.to_decilm(model, tmp_path / "decilm")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    again = bd.from_hf(folder)
    assert again.config == model.config and again.config.layer_shapes is None  # one shape: a plain model
    assert eqx.tree_equal(eqx.filter(again, eqx.is_array), eqx.filter(model, eqx.is_array))
    with pytest.raises(ValueError, match="layers differ.*DeciLMForCausalLM"):
        bd.to_hf(random_model(BASE.replace(layer_shapes=MIXED_SHAPES)), tmp_path / "x", architecture="LlamaForCausalLM")


def test_ffn_mult_is_written_when_exact(tmp_path):
    shapes = (bd.BlockShape(512, 2), bd.BlockShape(256, 1), bd.BlockShape(96, 2))
    config = BASE.replace(n_layers=3, mlp_dim=512, layer_shapes=shapes)
    model = random_model(config)
    folder = bd.to_decilm(model, tmp_path / "mult")
    ffn = [b["ffn"] for b in json.loads((folder / "config.json").read_text())["block_configs"]]
    assert [f.get("ffn_mult") for f in ffn] == [12.0, 6.0, None] and ffn[2]["intermediate_size"] == 96
    assert bd.from_hf(folder).config == config
    hf_model = load_remote(folder)
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(TOKENS, dtype=torch.long)[None]).logits[0].numpy()
    assert_close(forward(model, jnp.asarray(TOKENS)).logits, logits, what="logits")
    with pytest.raises(ValueError, match=r"layer 2 \(kv2 mlp96\) has an MLP of width 96.*nearest: \[256\]"):
        bd.to_decilm(model, tmp_path / "strict", ffn_mult_only=True)
    assert not (tmp_path / "strict").exists()


def test_what_the_format_cannot_hold_is_refused(tmp_path):
    biased = random_model(BASE.replace(n_layers=1, qkv_bias=True))
    with pytest.raises(ValueError, match="qkv_bias"):
        bd.to_decilm(biased, tmp_path / "biased")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- Puzzle's checkpoints


def rewrite_blocks(folder, edit):
    file = folder / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def test_puzzle_style_configs_are_read(tmp_path, mixed):
    model, folder = mixed

    def puzzle(config):  # as Puzzle writes them: every key, and no auto_map of ours
        del config["auto_map"]
        for block in config["block_configs"]:
            block["attention"].update(sparsify=None, window_length=None, num_sink_tokens=None, unshifted_sink=False)
            block["ffn"].update(sparsify=None)
            if block["ffn"]["no_op"]:
                block["ffn"]["ffn_mult"] = None

    def modelopt(config):  # NVIDIA ModelOpt's newer form: num_key_value_heads per layer
        for block in config["block_configs"]:
            group = block["attention"].pop("n_heads_in_group")
            block["attention"]["num_key_value_heads"] = None if group is None else 4 // group
            block["ffn"].update(gated=True, hidden_act="silu")

    for name, edit in (("puzzle", puzzle), ("modelopt", modelopt)):
        target = tmp_path / name
        target.mkdir()
        for file in ("config.json", "model.safetensors"):
            (target / file).write_bytes((folder / file).read_bytes())
        rewrite_blocks(target, edit)
        again = bd.from_hf(target)
        assert again.config == model.config, name


def test_a_linear_layer_written_in_the_ffn_section_is_read(tmp_path, mixed):
    """Puzzle may write a linear layer as a linear FFN beside an attention no_op (the same
    function, x + W rmsnorm(x), under the FFN's names): it reads as the same model, and
    the exported modeling code runs it too."""
    model, folder = mixed
    target = tmp_path / "ffn-linear"
    target.mkdir()
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    for name in ("configuration_blockdistill_decilm.py", "modeling_blockdistill_decilm.py"):
        (target / name).write_bytes((folder / name).read_bytes())

    def to_ffn(config):
        config["block_configs"][6] = {
            "attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
            "ffn": {"no_op": False, "replace_with_linear": True},
        }

    rewrite_blocks(target, to_ffn)
    stored = safetensors.numpy.load_file(folder / "model.safetensors")
    renamed = {"model.layers.6.input_layernorm.weight": "model.layers.6.post_attention_layernorm.weight",
               "model.layers.6.self_attn.linear_attn.weight": "model.layers.6.mlp.linear_mlp.weight"}
    safetensors.numpy.save_file({renamed.get(k, k): v for k, v in stored.items()}, target / "model.safetensors",
                                metadata={"format": "pt"})
    again = bd.from_hf(target)
    assert again.config == model.config
    assert_same_logits(again, model)
    with torch.no_grad():
        logits = load_remote(target)(torch.as_tensor(TOKENS, dtype=torch.long)[None]).logits[0].numpy()
    assert_close(forward(model, jnp.asarray(TOKENS)).logits, logits, what="logits")


@pytest.mark.parametrize(
    "layer, section, change, pattern",
    [
        (0, "attention", {"replace_with_linear": True}, r"block_configs\[0\] has a linear attention .* beside a real"),
        (1, "ffn", {"replace_with_linear": True}, r"block_configs\[1\] has a linear ffn .* beside a real"),
        (1, "ffn", {"moe": {"num_local_experts": 8}}, "moe"),
        (0, "attention", {"window_length": 128}, "window_length"),
        (0, "attention", {"n_heads_in_group": 3}, "does not divide"),
        (0, "ffn", {"hidden_act": "relu"}, "SwiGLU"),
        (0, "ffn", {"intermediate_size": None}, "neither"),
    ],
)
def test_puzzle_features_we_cannot_run_are_refused(tmp_path, mixed, layer, section, change, pattern):
    _, folder = mixed
    target = tmp_path / "edited"
    target.mkdir()
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    rewrite_blocks(target, lambda c: c["block_configs"][layer][section].update(change))
    with pytest.raises(ValueError, match=pattern):
        read_model_config(target)


def test_a_checkpoint_whose_tensors_disagree_with_its_blocks(tmp_path, mixed):
    _, folder = mixed
    target = tmp_path / "wrong"
    target.mkdir()
    for file in ("config.json", "model.safetensors"):
        (target / file).write_bytes((folder / file).read_bytes())
    rewrite_blocks(target, lambda c: c["block_configs"][5]["ffn"].update(intermediate_size=64))
    with pytest.raises(ValueError, match=r"model.layers.5.mlp.gate_proj.weight.*\(64, 64\), got \(96, 64\)"):
        bd.from_hf(target)


# ----------------------------------------------------------------------------- the command


def test_export_hf_of_a_saved_heterogeneous_student(tmp_path, mixed, capsys):
    model, _ = mixed
    saved = bd.save_model(model, tmp_path / "student", tokenizer=bd.ByteTokenizer())
    code = main(["export-hf", str(saved), str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DeciLMForCausalLM (transformers: trust_remote_code=True)" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert_same_logits(bd.from_hf(tmp_path / "hf"), model)
