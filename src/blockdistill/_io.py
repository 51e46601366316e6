"""Saving and loading models and their tokenizers: atomic folders, the blockdistill
format, the shipped teacher."""

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._config import TransformerConfig
from ._data import ByteTokenizer, Tokenizer
from ._model import Transformer

PathLike = str | os.PathLike
MODEL_FILE = "model.eqx"
CONFIG_FILE = "config.json"
FORMAT = "blockdistill"
SHIPPED_TEACHER = pathlib.Path(__file__).parent / "assets" / "teacher"


def write_folder_atomically(path: PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Run `write(tmp)` on a fresh folder next to `path`, then rename it to `path`.

    Readers see either the old folder or the complete new one, never a half-written one;
    a crash leaves at most a hidden `.NAME.tmp-*` folder, which is removed on error.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_json(path: PathLike, data: Any) -> None:
    """Write JSON to `path` atomically (temporary file + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizers

TOKENIZER_KEY = "tokenizer"


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a saved folder records about its tokenizer: `{"kind": "byte"}`, or for a
    Hugging Face tokenizer its BOS and padding ids, vocabulary size and the SHA-256 of its
    `tokenizer.json` (the files themselves are copied next to it)."""
    from ._hf import HFTokenizer

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
        from ._hf import tokenizer_files_of

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
        from ._hf import HFTokenizer

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
            from ._hf import HFTokenizer

            found = HFTokenizer(tokenizer)
        source = f"tokenizer {tokenizer}"
    elif meta.get("format") in (FORMAT, TOKENIZER_FORMAT) and TOKENIZER_KEY in meta:
        found, source = _tokenizer_from_record(path, meta[TOKENIZER_KEY]), f"the tokenizer recorded in {path}"
    elif meta.get("format") != FORMAT and (path / "tokenizer.json").is_file():
        from ._hf import HFTokenizer

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


# ----------------------------------------------------------------------------- models


def save_model(
    model: Transformer,
    path: PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Save a model as a folder: `config.json` and `model.eqx` (`eqx.tree_serialise_leaves`),
    with its tokenizer.

    Written atomically. The tokenizer is recorded in `config.json` (and a Hugging Face
    tokenizer's files are copied into the folder), so that [`blockdistill.load_tokenizer`][]
    and `blockdistill eval` / `export-hf` use the right one. `extra` (JSON-able) is
    stored in `config.json` too.

    **Arguments:**

    - `model`: the [`blockdistill.Transformer`][] to save.
    - `path`: the folder to (re)write.
    - `tokenizer`: the model's tokenizer; `None` records none (the folder then only
      loads as byte-level when its vocabulary has 256 ids).
    - `extra`: optional metadata, e.g. the eval loss.

    **Returns:** the folder's path.

    **Example:**

    ```python
    bd.save_model(student, "runs/demo/student", tokenizer=bd.ByteTokenizer())
    student = bd.load_model("runs/demo/student")
    ```
    """
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}: it is not this model's tokenizer"
        )

    def write(folder: pathlib.Path) -> None:
        meta = {"format": FORMAT, "config": model.config.to_dict(), **(extra or {})}
        if tokenizer is not None:
            meta[TOKENIZER_KEY] = write_tokenizer(tokenizer, folder)
        with open(folder / CONFIG_FILE, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
        eqx.tree_serialise_leaves(folder / MODEL_FILE, model)

    return write_folder_atomically(path, write)


def read_model_config(path: PathLike) -> TransformerConfig:
    """The [`blockdistill.TransformerConfig`][] of a saved blockdistill model folder."""
    path = pathlib.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {path} has no {CONFIG_FILE}")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a blockdistill model (format={meta.get('format')!r})")
    return TransformerConfig.from_dict(meta["config"])


def deserialise(path: pathlib.Path, like: Any) -> Any:
    """`eqx.tree_deserialise_leaves` with a clear error naming a corrupt or truncated file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return eqx.tree_deserialise_leaves(path, like)
    except Exception as error:  # numpy raises several kinds on truncated data
        raise ValueError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error})"
        ) from None


def load_model(path: PathLike, **config_changes: Any) -> Transformer:
    """Load a model folder: a blockdistill folder (`model.eqx`) or a Hugging Face one.

    **Arguments:**

    - `path`: the folder; `"shipped"` loads the teacher that ships with the package.
    - `config_changes`: execution options to change (`scan_layers`, `remat`, `dtype`,
      `attention_impl`).

    **Returns:** a [`blockdistill.Transformer`][].

    **Example:**

    ```python
    teacher_model = bd.load_model("shipped")
    ```
    """
    path = SHIPPED_TEACHER if str(path) == "shipped" else pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / MODEL_FILE).exists():
        config = read_model_config(path)
        allowed = {"scan_layers", "remat", "dtype", "attention_impl"}
        unknown = sorted(set(config_changes) - allowed)
        if unknown:
            raise ValueError(f"load_model cannot change {unknown}; allowed: {sorted(allowed)}")
        config = config.replace(**config_changes)
        like = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
        return deserialise(path / MODEL_FILE, like)
    from ._hf import from_hf

    return from_hf(path, **config_changes)


def shipped_teacher_path() -> pathlib.Path:
    """The folder of the teacher that ships with blockdistill (see the docs' results)."""
    return SHIPPED_TEACHER
