"""Corpora: text files, folders, globs and JSONL files read as documents, the default
corpus (the Python standard library's source), and the deterministic train / held-out
split by the hash of each document's name."""

import dataclasses
import glob as globlib
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Any

#: Folders of the standard library left out of the default corpus: installed packages,
#: test suites, the IDLE editor, build configuration, generated documentation topics and
#: the codec tables of `encodings` (large, repetitive tables of hexadecimal literals).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "__pycache__",
        "pydoc_data",
        "encodings",
    }
)
_GLOB_MAGIC = frozenset("*?[")


# --------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus.

    **Arguments:**

    - `name`: a stable identifier: the file's path relative to the corpus root (with `/`
      separators), or `"file.jsonl:LINE"` for line `LINE` (1-based) of a JSONL file. The
      train/validation split hashes it.
    - `text`: the document's text.

    **Example:**

    ```python
    doc = bd.Document(name="pkg/module.py", text="x = 1\\n")
    ```
    """

    name: str
    text: str


def _read_text(path: pathlib.Path) -> str:
    # Files that are not valid UTF-8 are decoded with replacement characters rather than
    # making the whole corpus fail.
    return path.read_bytes().decode("utf-8", errors="replace")


def _read_jsonl(path: pathlib.Path, name: str):
    """The documents of a JSONL file, one line at a time."""
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{lineno}: not a valid JSON line ({error.msg})"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with a string "
                    '"text" field'
                )
            yield Document(name=f"{name}:{lineno}", text=record["text"])


def _named(files: Sequence[pathlib.Path], root: pathlib.Path) -> tuple[tuple[str, pathlib.Path], ...]:
    return tuple(sorted((file.relative_to(root).as_posix(), file) for file in files))


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
    """The files of a corpus, resolved but not read: `files` are `(name, path)` pairs in
    the corpus order (sorted by name); `source` is what was asked for. Build it with
    [`blockdistill.corpus_files`][].

    **Example:**

    ```python
    corpus = bd.corpus_files("my_project/", glob="**/*.py")
    corpus.files[0]          # ("__init__.py", PosixPath("my_project/__init__.py"))
    corpus.fingerprint()     # names, sizes and modification times
    ```
    """

    source: str
    files: tuple[tuple[str, pathlib.Path], ...]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the corpus's content cheaply: every file's name, size and
        modification time (a changed file changes it)."""
        entries = []
        for name, path in self.files:
            stat = path.stat()
            entries.append([name, stat.st_size, stat.st_mtime_ns])
        return {"source": self.source, "files": entries}


def iter_documents(corpus: CorpusFiles):
    """The non-empty documents of `corpus`, one file (or JSONL line) at a time: a corpus
    larger than memory streams through."""
    for name, path in corpus.files:
        if path.suffix == ".jsonl":
            yield from (d for d in _read_jsonl(path, name) if d.text)
        else:
            text = _read_text(path)
            if text:
                yield Document(name=name, text=text)


def corpus_files(path: str | os.PathLike | None, glob: str | None = None) -> CorpusFiles:
    """Resolve a corpus path (see [`blockdistill.read_corpus`][]; `None`: the default
    corpus) to its files, without reading them. Raises like `read_corpus` when the path
    does not exist or matches no file.

    **Example:**

    ```python
    corpus = bd.corpus_files("my_project/", glob="**/*.py")   # resolved, not read
    documents = bd.read_corpus("my_project/", glob="**/*.py")  # the same files, read
    ```
    """
    if path is None:
        root = default_corpus_root()
        if not root.is_dir():
            raise FileNotFoundError(
                f"the standard library folder {str(root)!r} of this interpreter does not "
                "exist, so the default corpus is unavailable"
            )
        files = [file for file in root.rglob("*.py")
                 if _is_default_corpus_file(file.relative_to(root)) and file.is_file()]
        return CorpusFiles("default", _named(files, root))
    text_path = os.fspath(path)
    candidate = pathlib.Path(text_path)
    if candidate.is_file():
        return CorpusFiles(text_path, _named([candidate], candidate.parent))
    if candidate.is_dir():
        pattern = "**/*.txt" if glob is None else glob
        files = [file for file in candidate.glob(pattern) if file.is_file()]
        if not files:
            raise ValueError(
                f"corpus {text_path!r} is empty: no files match {pattern!r} in it"
            )
        return CorpusFiles(text_path, _named(files, candidate))
    parts = candidate.parts
    if any(_GLOB_MAGIC & set(part) for part in parts):
        fixed = []
        for part in parts:
            if _GLOB_MAGIC & set(part):
                break
            fixed.append(part)
        root = pathlib.Path(*fixed) if fixed else pathlib.Path(".")
        files = [
            pathlib.Path(file)
            for file in globlib.glob(text_path, recursive=True)
            if os.path.isfile(file)
        ]
        if not files:
            raise ValueError(
                f"corpus {text_path!r} is empty: the pattern matches no files"
            )
        return CorpusFiles(text_path, _named(files, root))
    raise FileNotFoundError(f"corpus path {text_path!r} does not exist")


def read_corpus(path: str | os.PathLike, glob: str | None = None) -> list[Document]:
    """Read a corpus of documents from disk.

    **Arguments:**

    - `path`: one of
        - a text file: one document, named by the file name;
        - a `.jsonl` file: one document per line, from the line's `"text"` field (blank
          lines are skipped);
        - a folder: every file under it that matches `glob` (recursively with `**`),
          each a document, or one document per line for `.jsonl` files;
        - a glob pattern such as `"data/**/*.py"` (when no such path exists).
    - `glob`: the pattern of files to take from a folder, relative to it; default
      `"**/*.txt"`. Use e.g. `"**/*.py"` for source code or `"**/*.jsonl"`. Ignored for
      a file or a pattern.

    Documents come in a deterministic order, sorted by name; names are paths relative to
    the folder (or to the pattern's fixed leading folders). Empty documents are dropped.
    Bytes that are not valid UTF-8 are decoded as U+FFFD instead of failing.

    **Returns:**

    A list of [`blockdistill.Document`][].

    **Raises:**

    - `FileNotFoundError` if `path` does not exist (and is not a pattern).
    - `ValueError` if no non-empty document is found, or if a JSONL line is not JSON or
      has no string `"text"` field (naming the file and line number).

    **Example:**

    ```python
    docs = bd.read_corpus("my_project/", glob="**/*.py")
    docs[0].name  # e.g. "__init__.py": names are relative to my_project/
    ```
    """
    corpus = corpus_files(path, glob)
    documents = list(iter_documents(corpus))
    if not documents:
        raise ValueError(f"corpus {corpus.source!r} is empty: no non-empty documents found")
    return documents


def default_corpus_root() -> pathlib.Path:
    """The folder of the default corpus: the running interpreter's standard library.

    **Returns:**

    `sysconfig.get_paths()["stdlib"]` as a path.

    **Example:**

    ```python
    bd.default_corpus_root()  # e.g. PosixPath('/usr/lib/python3.11')
    ```
    """
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_default_corpus_file(relative: pathlib.PurePath) -> bool:
    folders = relative.parts[:-1]
    if any(
        folder in _STDLIB_EXCLUDED_DIRS or folder.startswith("config-")
        for folder in folders
    ):
        return False
    # Machine-generated build variables, different on every installation.
    return not relative.name.startswith("_sysconfigdata")


def default_corpus() -> list[Document]:
    """The embedded default corpus: the Python standard library's own source code.

    The `.py` files of the running interpreter's standard library
    ([`blockdistill.default_corpus_root`][]), without installed packages
    (`site-packages`), test suites (`test`, `tests`, `idle_test`), `idlelib`, generated
    or tabular modules (`pydoc_data`, the `encodings` codec tables, `_sysconfigdata*`)
    and build configuration. Nothing is downloaded. The order is sorted by relative
    path, so the corpus is deterministic for a given Python version; CPython 3.11 gives
    about 550 files and 9 MB.

    **Returns:**

    A list of [`blockdistill.Document`][], named by path relative to the standard
    library.

    **Example:**

    ```python
    docs = bd.default_corpus()
    sum(len(doc.text) for doc in docs)  # about 9 million characters
    ```
    """
    corpus = corpus_files(None)
    documents = list(iter_documents(corpus))
    if not documents:
        raise ValueError(f"corpus {str(default_corpus_root())!r} is empty: no non-empty documents found")
    return documents


# --------------------------------------------------------------------------- splitting


def _unit_hash(name: str) -> float:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(
    documents: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation sets, deterministically.

    A document goes to validation when a hash (BLAKE2b, not Python's randomised `hash`)
    of its `name`, read as a number in `[0, 1)`, is below `val_fraction`. The split
    therefore never depends on the order of the documents, on a seed or on the process,
    and adding documents never moves existing ones. About `val_fraction` of the
    documents (not of the tokens) go to validation.

    **Arguments:**

    - `documents`: the documents, with unique names.
    - `val_fraction`: the expected fraction of documents held out, in `[0, 1)`.

    **Returns:**

    `(train, val)`, each a list in the order of `documents`.

    **Example:**

    ```python
    train, val = bd.split_documents(bd.default_corpus(), val_fraction=0.05)
    ```
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
    train, val = [], []
    for document in documents:
        (val if _unit_hash(document.name) < val_fraction else train).append(document)
    return train, val
