"""Training checkpoints: written atomically, the last few kept, resumed exactly."""

import json
import pathlib
import shutil
from typing import Any

import equinox as eqx
import jax

from ._io import PathLike, deserialise, write_folder_atomically
from ._parallel import host_arrays

STATE_FILE = "state.json"
MODEL_FILE = "student.eqx"
OPT_FILE = "opt_state.eqx"


def checkpoint_dir(out: PathLike) -> pathlib.Path:
    return pathlib.Path(out) / "checkpoints"


def list_checkpoints(out: PathLike) -> list[pathlib.Path]:
    """Complete checkpoints of a run folder, oldest first.

    A checkpoint is complete once its folder has its final name `checkpoints/<step>`:
    folders are written under a temporary name and renamed, so a crash never leaves a
    half-written checkpoint under a step's name.
    """
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def save_checkpoint(
    out: PathLike,
    step: int,
    model: eqx.Module,
    opt_state: Any,
    state: dict[str, Any],
    *,
    keep: int = 3,
) -> pathlib.Path:
    """Write `checkpoints/<step>/` (model, optimizer state, JSON state) atomically.

    Keeps the newest `keep` checkpoints and removes older ones (after the new one is
    complete), as well as temporary folders left by a crash.

    Sharded arrays are gathered into whole host arrays first, so a checkpoint does not
    depend on the mesh it was written on: load it with `load_checkpoint` and place the
    result on any mesh (or none). With several processes every process must call this
    (the gathering is collective) and process 0 writes.

    **Example:**

    ```python
    save_checkpoint("runs/demo", 100, student, opt_state, {"data": batcher.state_dict()})
    ```
    """

    model, opt_state = host_arrays(model), host_arrays(opt_state)
    path = checkpoint_dir(out) / str(step)
    if jax.process_index() != 0:
        return path

    def write(folder: pathlib.Path) -> None:
        eqx.tree_serialise_leaves(folder / MODEL_FILE, model)
        eqx.tree_serialise_leaves(folder / OPT_FILE, opt_state)
        with open(folder / STATE_FILE, "w") as handle:
            json.dump({**state, "step": step}, handle, indent=2, sort_keys=True)

    write_folder_atomically(path, write)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(out).glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return path


def read_state(path: pathlib.Path) -> dict[str, Any]:
    """The JSON state of a checkpoint; a clear error names a missing or corrupt file."""
    file = path / STATE_FILE
    if not file.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is corrupt or truncated ({error})") from None


def load_checkpoint(path: pathlib.Path, model_like: eqx.Module, opt_like: Any) -> tuple[eqx.Module, Any, dict]:
    """Load `(model, opt_state, state)`; corrupt or truncated files raise a `ValueError`
    that names the file."""
    state = read_state(path)
    model = deserialise(path / MODEL_FILE, model_like)
    opt_state = deserialise(path / OPT_FILE, opt_like)
    for name in (MODEL_FILE, OPT_FILE):  # trailing garbage is corruption too
        _check_size(path / name, model if name == MODEL_FILE else opt_state)
    return model, opt_state, state


def _check_size(file: pathlib.Path, tree: Any) -> None:
    import io

    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    if buffer.getbuffer().nbytes != file.stat().st_size:
        raise ValueError(
            f"{file} is corrupt or truncated: {file.stat().st_size} bytes, expected "
            f"{buffer.getbuffer().nbytes}"
        )
