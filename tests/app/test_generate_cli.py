"""`blockdistill generate`: continuations from a saved model, a run folder, a Hugging Face
folder and the shipped teacher; its options as flags, TOML and docs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from blockdistill.app.cli import _parser, main
from blockdistill.app.commands import generate_command
from blockdistill.app.options import HELP, build_config
from blockdistill.app.modelconfig import GenerateConfig
from helpers import REPO_ROOT, make_tokenizer_dir

CFG = bd.TransformerConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder whose final student is a tiny byte-level model."""
    run = tmp_path_factory.mktemp("run")
    bd.save_model(bd.Transformer(CFG, key=jax.random.key(0)), run / "student", tokenizer=bd.ByteTokenizer())
    return run


def test_generate_from_a_saved_model_and_a_run_folder(run_folder, capsys):
    prompts = ("def f(x):", "ab")
    out = generate_command(GenerateConfig(model=str(run_folder / "student"), prompt=prompts, max_new_tokens=8))
    # what the library gives for the same rows: BOS (NUL) first, stopping at the next NUL
    model = bd.load_model(run_folder / "student", scan_layers=True)
    tokenizer = bd.ByteTokenizer()
    rows = [np.concatenate([[0], tokenizer.encode(text)]) for text in prompts]
    padded = np.stack([np.pad(row, (0, 10 - len(row))) for row in rows]).astype(np.int32)
    expected = bd.generate(model, jnp.asarray(padded), 8, key=jax.random.key(0), eos_id=0,
                           prompt_lengths=jnp.asarray([len(row) for row in rows], jnp.int32))
    np.testing.assert_array_equal(out["tokens"], expected.tokens)
    printed = capsys.readouterr().out
    for row, (text, continuation) in enumerate(zip(prompts, out["texts"])):
        new = np.asarray(expected.tokens[row, : int(expected.lengths[row])])
        assert continuation == tokenizer.decode(new[:-1] if new[-1] == 0 else new)  # the NUL is not printed
        assert text + continuation in printed
    # the run folder stands for its student; flags reach the same options
    assert main(["generate", str(run_folder), "--prompt", "def f(x):", "--prompt", "ab", "--max-new-tokens", "8"]) == 0
    texts = [line for line in printed.splitlines() if not line.startswith("--- ")]
    assert [line for line in capsys.readouterr().out.splitlines() if not line.startswith("--- ")] == texts


def test_sampling_is_reproducible_by_seed(run_folder, capsys):
    def sampled(seed):
        cfg = GenerateConfig(model=str(run_folder), prompt=("x = ",), max_new_tokens=12, temperature=1.5,
                             top_k=20, top_p=0.95, seed=seed)
        return generate_command(cfg)["tokens"]

    np.testing.assert_array_equal(sampled(0), sampled(0))
    assert not np.array_equal(sampled(0), sampled(1))


def test_generate_from_a_hugging_face_folder(tmp_path, capsys):
    tokenizer_dir = make_tokenizer_dir(tmp_path / "tokenizer")
    model = bd.Transformer(CFG.replace(vocab_size=320), key=jax.random.key(1))
    folder = bd.to_hf(model, tmp_path / "hf", tokenizer_from=tokenizer_dir)
    assert main(["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "prompt 1" in printed and "hello world" in printed


def test_generate_from_the_shipped_teacher(capsys):
    assert main(["generate", "shipped", "--prompt", "import os\n", "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("--- shipped, prompt 1 (16 new tokens, greedy) ---\nimport os\n")
    # the teacher writes Python: its greedy continuation of an import is another import
    assert "import" in printed.split("import os\n", 1)[1]


def test_generate_options_from_toml_and_errors(tmp_path, capsys):
    config = tmp_path / "generate.toml"
    config.write_text('[model]\npath = "shipped"\n[generate]\nprompt = ["a", "b"]\nmax_new_tokens = 4\n'
                      "temperature = 0.5\ntop_k = 3\nseed = 2\n")
    cfg = build_config(GenerateConfig, str(config), {"top_p": 0.9})
    assert cfg.prompt == ("a", "b") and cfg.temperature == 0.5 and cfg.top_k == 3 and cfg.seed == 2
    assert cfg.top_p == 0.9 and cfg.model == "shipped"
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[objective]\ntemperature = 0.5\n[generate]\nprompt = ["a"]\n')
    assert main(["generate", "--config", str(wrong)]) == 1
    assert "unknown section [objective] (sections: generate, model)" in capsys.readouterr().err
    assert main(["generate"]) == 1
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--max-new-tokens", "1000"]) == 1
    assert "max_seq_len=256" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--top-p", "1.5"]) == 1
    assert "top_p" in capsys.readouterr().err


def test_every_generate_option_is_documented():
    page = (REPO_ROOT / "docs" / "cli.md").read_text()
    for field in dataclasses.fields(GenerateConfig):
        assert f"`{field.name}`" in page, f"GenerateConfig.{field.name} is not in docs/cli.md"
    section = page.split("## Options of `generate`", 1)[1].split("\n## ", 1)[0]
    for meaning in GenerateConfig.HELP_CHANGES.values():
        assert " ".join(meaning.split()) in " ".join(section.split()), meaning
    subparsers = next(a for a in _parser()._actions if a.choices and "generate" in a.choices).choices
    for action in subparsers["generate"]._actions:
        if action.dest in ("help", "config", "model"):
            continue
        meaning = GenerateConfig.HELP_CHANGES.get(action.dest, HELP[action.dest])
        assert action.help and meaning in action.help.replace("%%", "%"), action.dest
    rows = dict(re.findall(r"^\| `(\w+)` \| .*? \| (.*) \|$", section, re.MULTILINE))
    assert rows == {name: HELP[name] for name in ("prompt", "max_new_tokens", "top_p")}
