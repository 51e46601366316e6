"""Tokenizers: the interface, the byte tokenizer, Hugging Face `tokenizers`, and how a
saved folder records, copies and loads its tokenizer."""

import hashlib
import json
import pathlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Array, Int

from .._files import (
    CONFIG_FILE,
    FORMAT,
    SHIPPED_TEACHER,
    PathLike,
    write_folder_atomically,
)

# --------------------------------------------------------------------------- tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    [`blockdistill.ByteTokenizer`][] implements it; so does the Hugging Face wrapper.

    - `vocab_size`: number of token ids; every id is in `[0, vocab_size)`.
    - `bos_id`: the id that starts every document when documents are packed (the
      tokenizer's beginning-of-sequence token, which a model trained with it expects at
      the start of each document), or `None` when the tokenizer has none.
    - `pad_id`: the id that fills the unused end of the last packed row (masked out).
    - `encode(text)`: a 1-D integer array of token ids (no special tokens added).
    - `decode(ids)`: the text of a 1-D sequence of ids.

    **Example:**

    ```python
    def check(tokenizer: bd.Tokenizer) -> None:
        assert tokenizer.decode(tokenizer.encode("def f():")) == "def f():"

    check(bd.ByteTokenizer())
    ```
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Any) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: the token ids of a text are its UTF-8 bytes.

    `vocab_size` is 256. `bos_id` (and `pad_id`) is 0, the NUL byte, which practically
    never occurs in text or source code: every packed document starts with it, so the
    model knows where a document begins. A text that does contain NUL bytes still
    round-trips, but its NULs look like document starts to the model.

    **Example:**

    ```python
    tokenizer = bd.ByteTokenizer()
    ids = tokenizer.encode("héllo")   # int32 [104, 195, 169, 108, 108, 111]
    tokenizer.decode(ids)             # "héllo"
    ```
    """

    vocab_size: int = 256
    bos_id: int | None = 0
    pad_id: int = 0

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def encode(self, text: str) -> Int[np.ndarray, " length"]:
        """Token ids of `text`.

        **Arguments:**

        - `text`: any string.

        **Returns:**

        The UTF-8 bytes of `text` as an `int32` array.

        **Example:**

        ```python
        bd.ByteTokenizer().encode("ab")  # array([97, 98], dtype=int32)
        ```
        """
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Text of a sequence of byte ids.

        **Arguments:**

        - `ids`: a 1-D sequence or array (numpy, JAX, list) of ids in `[0, 256)`.

        **Returns:**

        The bytes decoded as UTF-8; invalid sequences (for example a multi-byte
        character cut in half at a sequence boundary) become U+FFFD rather than raising.

        **Example:**

        ```python
        bd.ByteTokenizer().decode([104, 105])  # "hi"
        ```
        """
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(
                f"ByteTokenizer.decode expects a 1-D sequence of ids, got shape "
                f"{array.shape}"
            )
        if array.size == 0:
            return ""
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"ByteTokenizer.decode expects integer ids, got dtype {array.dtype}"
            )
        bad = (array < 0) | (array >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"ByteTokenizer.decode: id {int(array[bad][0])} is outside [0, 256)"
            )
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


#: Files of a Hugging Face tokenizer folder that `to_hf(tokenizer_from=...)` copies.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files_of(folder: Path) -> list[Path]:
    """The Hugging Face tokenizer files (`_TOKENIZER_FILES`) that `folder` holds."""
    return [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]


# ----------------------------------------------------------------------------- tokenizer


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            'HFTokenizer needs the optional dependency `tokenizers`: pip install "blockdistill[hf]"'
        ) from error
    return tokenizers


def _token_name(value: Any) -> str | None:
    """The text of a special token as `tokenizer_config.json` writes it (str or dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _find_eos_id(folder: Path, tokenizer: Any) -> int | None:
    """The EOS id: `config.json`, then the tokenizer's own files, then generation config."""
    for file_name, key in (
        (CONFIG_FILE, "eos_token_id"),
        ("tokenizer_config.json", "eos_token"),
        ("special_tokens_map.json", "eos_token"),
        ("generation_config.json", "eos_token_id"),
    ):
        file = folder / file_name
        if not file.is_file():
            continue
        value = json.loads(file.read_text()).get(key)
        if key == "eos_token_id":
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        else:
            name = _token_name(value)
            token_id = None if name is None else tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
    return None


def _find_bos_id(folder: Path, tokenizer: Any) -> int | None:
    """The id the tokenizer itself puts before a text, if any.

    First the tokenizer's own post-processor (what `encode(text, add_special_tokens=True)`
    prepends, as the model saw in training), then `tokenizer_config.json` when it says
    `add_bos_token: true` and names its `bos_token`.
    """
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    special = tokenizer.encode("a", add_special_tokens=True).ids
    if len(special) > len(plain) and special[1 : 1 + len(plain)] == plain:
        return int(special[0])
    file = folder / "tokenizer_config.json"
    if file.is_file():
        config = json.loads(file.read_text())
        name = _token_name(config.get("bos_token"))
        if config.get("add_bos_token") is True and name is not None:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
    return None


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`) with blockdistill's
    tokenizer interface.

    Needs the optional dependency `tokenizers` (`pip install "blockdistill[hf]"`).

    **Arguments:**

    - `folder`: a folder holding `tokenizer.json`, typically a HF checkpoint.
    - `bos_id`: the id that starts every packed document. `"auto"` (default): the
      beginning-of-sequence token the tokenizer itself adds before a text (its
      post-processor, e.g. Llama's `<|begin_of_text|>`, or `add_bos_token` with
      `bos_token` in `tokenizer_config.json`), or `None` when it adds none (e.g. Qwen2).
    - `pad_id`: the id of padding (masked out everywhere); default the EOS id named by
      the folder's `config.json` (`eos_token_id`, the first one if a list) or its
      tokenizer files (`eos_token`), else the BOS id, else 0.

    **Attributes:** `vocab_size` (ids, added tokens included), `bos_id` and `pad_id`.

    **Example:**

    ```python
    tokenizer = bd.HFTokenizer("checkpoints/SmolLM2-135M")
    ids = tokenizer.encode("def f(x):")   # int32 numpy array, no special tokens
    tokenizer.decode(ids)                  # "def f(x):"
    ```
    """

    vocab_size: int
    bos_id: int | None
    pad_id: int

    def __init__(
        self,
        folder: PathLike,
        *,
        bos_id: int | None | Literal["auto"] = "auto",
        pad_id: int | None = None,
    ):
        tokenizers = _import_tokenizers()
        self.folder = Path(folder)
        file = self.folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{self.folder} has no tokenizer.json")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(file))
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        if bos_id == "auto":
            bos_id = _find_bos_id(self.folder, self.tokenizer)
        if pad_id is None:
            pad_id = _find_eos_id(self.folder, self.tokenizer)
        if pad_id is None:
            pad_id = 0 if bos_id is None else bos_id
        for name, value in (("bos_id", bos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"HFTokenizer {name}={value} is outside the vocabulary of {self.vocab_size} ids"
                )
        self.bos_id = bos_id
        self.pad_id = pad_id

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({str(self.folder)!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, pad_id={self.pad_id})"
        )

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        """Token ids of `text` (int32), without any special tokens added.

        **Example:**

        ```python
        ids = tokenizer.encode("hello world")
        ```
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32).reshape(-1)

    def encode_batch(self, texts: Sequence[str]) -> list[Int[np.ndarray, " n"]]:
        """`encode` of many texts at once (the `tokenizers` library's batch encoding, in
        parallel threads): what the token store uses.

        **Example:**

        ```python
        ids = tokenizer.encode_batch(["hello world", "def f(x):"])
        ```
        """
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32).reshape(-1) for e in encodings]

    def decode(self, ids: Int[np.ndarray, " n"] | Int[Array, " n"] | Sequence[int]) -> str:
        """The text of a sequence of token ids (special tokens are kept).

        **Example:**

        ```python
        text = tokenizer.decode(tokenizer.encode("hello world"))
        ```
        """
        as_list = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(as_list, skip_special_tokens=False)


def load_hf_tokenizer(folder: PathLike) -> HFTokenizer | None:
    """The [`blockdistill.HFTokenizer`][] of a folder, or `None` if it has no
    `tokenizer.json` (e.g. a byte-level model, or only a sentencepiece `tokenizer.model`).

    **Example:**

    ```python
    tokenizer = bd.load_hf_tokenizer("checkpoints/SmolLM2-135M")
    if tokenizer is None:
        ...  # fall back to a byte-level tokenizer
    ```
    """
    if not (Path(folder) / "tokenizer.json").is_file():
        return None
    return HFTokenizer(folder)


# ----------------------------------------------------------------------------- tokenizers

TOKENIZER_KEY = "tokenizer"


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a saved folder records about its tokenizer: `{"kind": "byte"}`, or for a
    Hugging Face tokenizer its BOS and padding ids, vocabulary size and the SHA-256 of its
    `tokenizer.json` (the files themselves are copied next to it)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, HFTokenizer):
        digest = hashlib.sha256((tokenizer.folder / "tokenizer.json").read_bytes()).hexdigest()
        return {"kind": "hf", "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id,
                "vocab_size": tokenizer.vocab_size, "sha256": digest}
    raise ValueError(
        f"cannot record tokenizer {tokenizer!r}: only ByteTokenizer and HFTokenizer can be saved"
    )


def write_tokenizer(tokenizer: Tokenizer, folder: pathlib.Path) -> dict[str, Any]:
    """Copy a tokenizer's files into `folder` (nothing for bytes); return its record."""
    record = tokenizer_record(tokenizer)
    if record["kind"] == "hf":
        for file in tokenizer_files_of(tokenizer.folder):
            shutil.copyfile(file, folder / file.name)
    return record


def read_tokenizer_record(folder: PathLike) -> dict[str, Any]:
    """The tokenizer record of a saved folder (`{}` when it records none)."""
    meta = json.loads((pathlib.Path(folder) / CONFIG_FILE).read_text())
    return meta.get(TOKENIZER_KEY, {})


def _tokenizer_from_record(folder: pathlib.Path, record: dict[str, Any]) -> Tokenizer:
    if record.get("kind") == "byte":
        return ByteTokenizer()
    if record.get("kind") == "hf":
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder} records a Hugging Face tokenizer but its tokenizer.json is missing"
            )
        return HFTokenizer(folder, bos_id=record.get("bos_id"), pad_id=record.get("pad_id"))
    raise ValueError(f"{folder / CONFIG_FILE}: unknown tokenizer record {record!r}")


TOKENIZER_FORMAT = "blockdistill-tokenizer"


def save_tokenizer(tokenizer: Tokenizer, path: PathLike) -> pathlib.Path:
    """Write a tokenizer folder (its record in `config.json`, and a Hugging Face
    tokenizer's files), atomically; [`blockdistill.load_tokenizer`][] reads it back."""

    def write(folder: pathlib.Path) -> None:
        meta = {"format": TOKENIZER_FORMAT, TOKENIZER_KEY: write_tokenizer(tokenizer, folder)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return write_folder_atomically(path, write)


def _vocab_size_of(meta: dict[str, Any]) -> int | None:
    if meta.get("format") == TOKENIZER_FORMAT:
        return None
    if meta.get("format") == FORMAT:
        return int(meta["config"]["vocab_size"])
    size = meta.get("vocab_size", meta.get("text_config", {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def load_tokenizer(path: PathLike, tokenizer: PathLike | None = None) -> Tokenizer:
    """The tokenizer of a model folder.

    - a blockdistill folder ([`blockdistill.save_model`][], or a run's `tokenizer/`
      folder) uses the tokenizer it recorded (the byte tokenizer, or the Hugging Face
      tokenizer whose files were copied into it); a folder saved before tokenizers were recorded is taken as byte-level
      only if its vocabulary has 256 ids, and is an error otherwise;
    - a Hugging Face checkpoint folder uses its `tokenizer.json`.

    `tokenizer` (a folder with `tokenizer.json`, or `"byte"`) overrides that. In every
    case a tokenizer with more ids than the model's vocabulary is a `ValueError` naming
    both sizes.

    **Arguments:**

    - `path`: the model folder; `"shipped"` for the shipped teacher.
    - `tokenizer`: optional override.

    **Returns:** a [`blockdistill.Tokenizer`][].

    **Example:**

    ```python
    bd.load_tokenizer("shipped")  # ByteTokenizer()
    ```
    """
    path = SHIPPED_TEACHER if str(path) == "shipped" else pathlib.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {path} has no {CONFIG_FILE}")
    meta = json.loads(config_file.read_text())
    vocab_size = _vocab_size_of(meta)
    if tokenizer is not None:
        if str(tokenizer) == "byte":
            found: Tokenizer = ByteTokenizer()
        else:
            found = HFTokenizer(tokenizer)
        source = f"tokenizer {tokenizer}"
    elif meta.get("format") in (FORMAT, TOKENIZER_FORMAT) and TOKENIZER_KEY in meta:
        found, source = _tokenizer_from_record(path, meta[TOKENIZER_KEY]), f"the tokenizer recorded in {path}"
    elif meta.get("format") != FORMAT and (path / "tokenizer.json").is_file():
        found, source = HFTokenizer(path), f"the tokenizer.json of {path}"
    elif vocab_size == ByteTokenizer.vocab_size:
        found, source = ByteTokenizer(), f"the byte tokenizer (the 256-id vocabulary of {path})"
    else:
        raise ValueError(
            f"{path} records no tokenizer and its vocabulary of {vocab_size} ids is not the "
            f"byte tokenizer's {ByteTokenizer.vocab_size}: pass the tokenizer's folder "
            "(--tokenizer FOLDER)"
        )
    if vocab_size is not None and found.vocab_size > vocab_size:
        raise ValueError(
            f"{source} has {found.vocab_size} ids but the model {path} has a vocabulary of "
            f"{vocab_size}: it is not this model's tokenizer"
        )
    return found
