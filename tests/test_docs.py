"""The documentation cannot rot: the tutorial runs, and every public name is documented."""

import inspect
import json
import linecache
import pathlib
import re
import textwrap
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockdistill as bd

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
TUTORIAL = DOCS / "tutorial.md"
API = DOCS / "api"

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
_API_LINE = re.compile(r"^[ \t]*:::[ \t]+blockdistill\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*$")
_SKIP_MARK = "# not run"


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """`(line number of the opening fence, dedented code)` of every ```python block."""
    return python_blocks_in(path.read_text(encoding="utf-8"), path.name)


def python_blocks_in(text: str, source: str) -> list[tuple[int, str]]:
    """`python_blocks` of a Markdown text (a page or a docstring) named `source`."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening.group("indent")
        start = index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise AssertionError(f"{source}:{start + 1}: unclosed ```python block")
        code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in body)
        blocks.append((start + 1, textwrap.dedent(code) + "\n"))
        index += 1
    return blocks


def runnable(code: str) -> bool:
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return not first.startswith(_SKIP_MARK)


def test_python_blocks_parser():
    # guard the extractor itself, so that a silently empty tutorial cannot pass
    blocks = python_blocks(TUTORIAL)
    assert len([code for _, code in blocks if runnable(code)]) >= 8


def run_blocks(path: pathlib.Path) -> dict:
    """Execute the ```python blocks of `path` in order, in one shared namespace."""
    namespace: dict = {"__name__": "__tutorial__"}
    blocks = [(line, code) for line, code in python_blocks(path) if runnable(code)]
    for number, (line, code) in enumerate(blocks, start=1):
        filename = f"{path.name}, block {number} (line {line})"
        try:
            exec(compile(code, filename, "exec"), namespace)
        except Exception:
            pytest.fail(
                f"{path.name} block {number} (starting at line {line}) raised:\n"
                f"{traceback.format_exc()}\n--- the block ---\n{code}",
                pytrace=False,
            )
    return namespace


def test_tutorial_runs():
    run_blocks(TUTORIAL)


def test_readme_example_runs():
    namespace = run_blocks(DOCS.parent / "README.md")
    assert float(namespace["metrics"]["loss"]) > 0


def documented_names() -> dict[str, str]:
    """`name -> page` for every `::: blockdistill.NAME` line under docs/api/."""
    names = {}
    for page in sorted(API.rglob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            match = _API_LINE.match(line)
            if match:
                names.setdefault(match.group("name"), str(page.relative_to(DOCS)))
    return names


def test_every_public_name_is_in_the_api_reference():
    documented = documented_names()
    missing = [name for name in bd.__all__ if name not in documented]
    assert not missing, (
        f"public names without a `::: blockdistill.NAME` line in docs/api/*.md: {missing}; "
        "add each to the page of its group (see docs/api/index.md)"
    )
    unknown = [name for name in documented if name not in bd.__all__]
    assert not unknown, f"docs/api/ documents names that are not in blockdistill.__all__: {unknown}"


@pytest.mark.parametrize("name", bd.__all__)
def test_public_docstring_has_an_example(name):
    obj = getattr(bd, name)
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    doc = doc or ""
    assert "Example" in doc and "```python" in doc, (
        f"blockdistill.{name}: its docstring needs an **Example:** section with a "
        "```python code block"
    )


# ----------------------------------------------------------------------------- docstrings
#
# Every public docstring's examples run. The ```python blocks of `blockdistill.NAME`'s
# docstring, then those of its own public methods and properties (in the order they are
# defined), run in order in one fresh namespace per NAME, in a fresh working directory.
# The namespace starts with the small fixtures of `ExampleFixtures`, which examples use by
# name (`model`, `batch_tokens`, `dataset`, ...); the directory holds the paths examples
# name ("checkpoints/SmolLM2-135M", "my_project/").

#: Examples marked `# not run` (they cannot run here at all, e.g. multi-host); keep rare.
MAX_SKIPPED_EXAMPLES = 3


def docstring_examples(name: str) -> list[tuple[str, int, str]]:
    """`(owner, line in the owner's docstring, code)` of every ```python block of
    `blockdistill.NAME`'s docstring and of its public methods' and properties'."""
    obj = getattr(bd, name)
    owners = [(f"blockdistill.{name}", obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj))]
    if inspect.isclass(obj):
        for attribute, value in vars(obj).items():
            if attribute.startswith("_") and attribute != "__call__":
                continue
            if isinstance(value, property):
                value = value.fget
            elif isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                owners.append((f"blockdistill.{name}.{attribute}", value.__doc__))
    return [
        (owner, line, code)
        for owner, doc in owners
        for line, code in python_blocks_in(inspect.cleandoc(doc or ""), owner)
    ]


def skipped_examples() -> list[str]:
    return [
        f"{owner} (docstring line {line})"
        for name in bd.__all__
        for owner, line, code in docstring_examples(name)
        if not runnable(code)
    ]


def test_docstring_examples_are_found():
    # guard the extractor: class, method, property and classmethod examples all count
    owners = {owner for name in bd.__all__ for owner, _, _ in docstring_examples(name)}
    for owner in ("Batcher", "Batcher.state_dict", "TransformerConfig.replace",
                  "TransformerConfig.from_dict", "ByteTokenizer.encode", "Transformer"):
        assert f"blockdistill.{owner}" in owners


def test_few_docstring_examples_are_not_run():
    skipped = skipped_examples()
    assert len(skipped) <= MAX_SKIPPED_EXAMPLES, (
        f"{len(skipped)} docstring examples are marked `{_SKIP_MARK}` (at most "
        f"{MAX_SKIPPED_EXAMPLES} may be): {skipped}; make them runnable with the fixtures of "
        "tests/test_docs.py::ExampleFixtures"
    )


TINY_CONFIG = dict(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, max_seq_len=64
)
#: 64 bytes of source code: the 4 rows of 16 tokens of `batch_tokens`.
EXAMPLE_TEXT = "def add(a, b):\n    return a + b\ndef sub(a, b):\n    return a - b\n"
EXAMPLE_PROJECT = {
    "__init__.py": '"""My project."""\n',
    "main.py": "from .utils.helpers import greet\n\nprint(greet('world'))\n",
    "utils/helpers.py": "def greet(name):\n    return f'hello {name}'\n",
}


def global_names(code) -> set[str]:
    """Every global name a compiled block (or a function or class in it) refers to."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if inspect.iscode(constant):
            names |= global_names(constant)
    return names


def copy_arrays(tree):
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


class ExampleFixtures:
    """What docstring examples may use by name, each built on first use and then reused.

    One tiny shape everywhere (`cfg`, batches of 4 x 16 tokens), so that every jitted
    function compiles once for all examples. Names in `REBUILT` are made anew for every
    namespace and those in `COPIED` are copies: they are mutable (a `Batcher`) or may be
    donated by a step (models, the optimizer state), so one example cannot spoil them for
    the next.
    """

    MODULES = {"bd": bd, "jax": jax, "jnp": jnp, "np": np, "eqx": eqx, "optax": optax, "json": json}
    REBUILT = frozenset({"batcher", "opt_state"})
    COPIED = frozenset({"model", "student", "library"})
    #: folders that examples name, relative to their working directory -> their writer
    PATHS = {"checkpoints/SmolLM2-135M": "write_hf_checkpoint", "my_project": "write_project"}

    def __init__(self, corpus: pathlib.Path, folder: pathlib.Path):
        self.corpus = corpus
        self.folder = folder
        self.cache: dict = {}

    def names(self) -> set[str]:
        made = {name.removeprefix("make_") for name in dir(self) if name.startswith("make_")}
        return made | set(self.MODULES)

    def get(self, name: str):
        if name in self.MODULES:
            return self.MODULES[name]
        if name in self.REBUILT:
            return getattr(self, f"make_{name}")()
        if name not in self.cache:
            self.cache[name] = getattr(self, f"make_{name}")()
        value = self.cache[name]
        return copy_arrays(value) if name in self.COPIED else value

    def namespace(self, used: set[str]) -> dict:
        """A fresh namespace with the fixtures among `used`."""
        return {"__name__": "__example__", **{name: self.get(name) for name in self.names() & used}}

    def make_cfg(self):
        return bd.TransformerConfig(**TINY_CONFIG)

    def make_model(self):
        return bd.Transformer(self.get("cfg"), key=jax.random.key(0))

    def make_teacher(self):
        return bd.Teacher(self.get("model"))

    def make_student(self):
        return bd.Transformer(self.get("cfg"), key=jax.random.key(1))

    def make_batch_tokens(self):
        return jnp.asarray(bd.ByteTokenizer().encode(EXAMPLE_TEXT).reshape(4, 16))

    def make_tokens(self):
        return self.get("batch_tokens")[0]

    def make_mask(self):
        return jnp.ones(self.get("batch_tokens").shape, dtype=bool)

    def make_teacher_out(self):
        return jax.vmap(self.get("teacher"))(self.get("batch_tokens"))

    def make_objective(self):  # blockwise only: its step compiles 3x faster than with KL
        return bd.DistillationObjective(blockwise_weight=1.0)

    def make_optimizer(self):
        return bd.make_optimizer(1e-3)

    def make_opt_state(self):
        return self.get("optimizer").init(eqx.filter(self.get("student"), eqx.is_array))

    def make_library(self):
        space = bd.SearchSpace(mlp_ratios=(1.0, 0.5), kv_heads=(1,))
        return bd.init_library(self.get("teacher"), space, self.get("batch_tokens"))

    def make_mesh(self):
        return bd.make_mesh("data=4,layers=2")  # conftest's 8 CPU devices

    def make_docs(self):  # a small corpus, six standard-library modules, not the default
        return bd.read_corpus(self.corpus)

    def make_dataset(self):
        return bd.load_dataset(self.corpus, bd.ByteTokenizer(), seq_len=16)

    def make_tokenizer(self):
        return bd.ByteTokenizer()

    def make_data(self):
        return bd.token_dataset(self.corpus, bd.ByteTokenizer(), seq_len=16)

    def make_rows(self):
        return self.get("data").train

    def make_store(self):
        return self.get("data").store

    def make_batcher(self):
        return bd.Batcher(*self.get("dataset").train, batch_size=8, seed=0)

    def write_hf_checkpoint(self) -> pathlib.Path:
        """The tiny model as a Llama checkpoint, with a small BPE tokenizer trained here."""
        import tokenizers

        source = self.folder / "tokenizer"
        source.mkdir()
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<|endoftext|>"], show_progress=False
        )
        tokenizer.train_from_iterator([EXAMPLE_TEXT, "hello world", "def f(x):"] * 10, trainer)
        assert tokenizer.get_vocab_size() <= TINY_CONFIG["vocab_size"]
        tokenizer.save(str(source / "tokenizer.json"))
        (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        return bd.to_hf(self.get("model"), self.folder / "SmolLM2-135M", tokenizer_from=source)

    def write_project(self) -> pathlib.Path:
        folder = self.folder / "my_project"
        for name, text in EXAMPLE_PROJECT.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        return folder

    def populate(self, directory: pathlib.Path, text: str) -> None:
        """Link into `directory` every fixture folder that `text` names."""
        for path, writer in self.PATHS.items():
            if path in text:
                if path not in self.cache:
                    self.cache[path] = getattr(self, writer)()
                link = directory / path
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.cache[path], target_is_directory=True)


@pytest.fixture(scope="session")
def example_fixtures(corpus, tmp_path_factory):
    return ExampleFixtures(corpus, tmp_path_factory.mktemp("example-fixtures"))


@pytest.mark.parametrize("name", bd.__all__)
def test_docstring_examples_run(name, example_fixtures, tmp_path, monkeypatch):
    examples = [example for example in docstring_examples(name) if runnable(example[2])]
    programs = {}
    for owner, line, code in examples:
        filename = f"<{owner} docstring example, line {line}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        try:
            programs[filename] = compile(code, filename, "exec")
        except SyntaxError:
            pass  # reported in its turn below
    used = set().union(*(global_names(program) for program in programs.values()))
    monkeypatch.chdir(tmp_path)
    example_fixtures.populate(tmp_path, "".join(code for _, _, code in examples))
    namespace = example_fixtures.namespace(used)
    for number, (owner, line, code) in enumerate(examples, start=1):
        filename = f"<{owner} docstring example, line {line}>"
        error = None
        try:
            exec(programs.get(filename) or compile(code, filename, "exec"), namespace)
        except Exception:
            error = traceback.format_exc()
        if error is not None:  # fail outside `except`: a report, not a chain of exceptions
            pytest.fail(
                f"blockdistill.{name}: docstring example {number} of {len(examples)} "
                f"({owner}, docstring line {line}) raised:\n{error}\n--- the example ---\n{code}",
                pytrace=False,
            )
