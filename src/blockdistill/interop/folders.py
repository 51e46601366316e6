"""Saving and loading models and their tokenizers: atomic folders, the blockdistill
format, the shipped teacher."""

import json
import os
import pathlib
from typing import Any

import equinox as eqx
import jax

from .._files import (
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    SHIPPED_TEACHER,
    PathLike,
    sha256_files,
    write_folder_atomically,
)
from ..data.tokenizers import TOKENIZER_KEY, Tokenizer, write_tokenizer
from ..nn.config import TransformerConfig
from ..nn.hetero import compact_layers, padded_skeleton
from ..nn.model import Transformer
from .hf import from_hf

# ----------------------------------------------------------------------------- identity


def model_digest(path: str | os.PathLike) -> str:
    """sha256 over a model folder's `config.json` and weight files (`*.eqx`,
    `*.safetensors`), by name and content: the teacher a cache was made from.
    `"shipped"` is the shipped teacher.

    **Example:**

    ```python
    bd.model_digest("shipped")   # 64 hex digits
    ```
    """
    from .folders import shipped_teacher_path

    folder = shipped_teacher_path() if str(path) == "shipped" else pathlib.Path(path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".eqx", ".safetensors") or p.name == "config.json") \
        if folder.is_dir() else []
    if not any(p.suffix in (".eqx", ".safetensors") for p in files):
        raise FileNotFoundError(f"model folder {folder} has no weight files (*.eqx, *.safetensors)")
    return sha256_files(files)

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
    """The [`blockdistill.TransformerConfig`][] of a model folder, read from its
    `config.json` alone (no weights are read): a blockdistill folder, a Hugging Face one
    (as [`blockdistill.from_hf`][] would build it), `"shipped"`, or such a `config.json`
    file itself."""
    path = SHIPPED_TEACHER if str(path) == "shipped" else pathlib.Path(path)
    config_file = path if path.is_file() else path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {path} has no {CONFIG_FILE}")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if meta.get("format") == FORMAT:
        return TransformerConfig.from_dict(meta["config"])
    if "model_type" in meta:
        from .hf_config import _config_from_hf

        return _config_from_hf(meta, config_file, {})
    raise ValueError(f"{config_file} is neither a blockdistill model (format={meta.get('format')!r}) "
                     "nor a Hugging Face one (no model_type)")


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
        try:
            return deserialise(path / MODEL_FILE, like)
        except ValueError:
            if config.layer_shapes is None:
                raise
            try:  # a heterogeneous model saved before compact segments: every layer padded
                return _load_padded(path / MODEL_FILE, like, config)
            except ValueError:
                pass
            raise
    return from_hf(path, **config_changes)


def _load_padded(file: pathlib.Path, like: Transformer, config: TransformerConfig) -> Transformer:
    """A heterogeneous model saved in the padded form (every layer at the widest shape, as
    blockdistill stored them before compact segments), read and stored compactly."""
    padded = deserialise(file, eqx.tree_at(lambda m: m.layers.layers, like, padded_skeleton(config)))
    return eqx.tree_at(lambda m: m.layers.layers, padded, compact_layers(padded.layers.layers, config))


def shipped_teacher_path() -> pathlib.Path:
    """The folder of the teacher that ships with blockdistill (see the docs' results)."""
    return SHIPPED_TEACHER
