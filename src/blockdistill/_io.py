"""Saving and loading models: atomic folders, the blockdistill format, the shipped teacher."""

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


def save_model(model: Transformer, path: PathLike, *, extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Save a model as a folder: `config.json` and `model.eqx` (`eqx.tree_serialise_leaves`).

    Written atomically. `extra` (JSON-able) is stored in `config.json` too.

    **Arguments:**

    - `model`: the [`blockdistill.Transformer`][] to save.
    - `path`: the folder to (re)write.
    - `extra`: optional metadata, e.g. the eval loss.

    **Returns:** the folder's path.

    **Example:**

    ```python
    bd.save_model(student, "runs/demo/student")
    student = bd.load_model("runs/demo/student")
    ```
    """

    def write(folder: pathlib.Path) -> None:
        meta = {"format": FORMAT, "config": model.config.to_dict(), **(extra or {})}
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
    - `config_changes`: execution options to change (`scan_layers`, `remat`, `dtype`).

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
        allowed = {"scan_layers", "remat", "dtype"}
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
