"""Helpers shared by test modules (not tests)."""

import contextlib
import importlib.util
import json
import pathlib
import sys

import tokenizers

#: the repository checkout the tests run from (docs, experiments, README)
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_tokenizer_dir(folder):
    """A small byte-level BPE tokenizer trained here (no download) with an EOS token."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<|bos|>", "<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["hello world, hello tokenizer", "def f(x):\n    return x + 1\n"] * 20
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return folder


@contextlib.contextmanager
def loaded_script(name: str, path: pathlib.Path, *also: str):
    """The script at `path` imported as module `name` (registered in `sys.modules`, where
    dataclasses look their module up), for a module-scoped fixture; `name` and the private
    modules the script registers itself (`also`) are removed afterwards."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        for key in (name, *also):
            sys.modules.pop(key, None)
