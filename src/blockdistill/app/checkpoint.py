"""Training checkpoints on Orbax: every process writes its own shards, asynchronously.

`Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` over `<run>/checkpoints/`,
one folder per step. A checkpoint holds two items: `arrays` (the student's and the
optimizer's array leaves, sharded as they are on the devices) and `state` (JSON: the step,
the data position, the run config, the model config). Orbax writes a step under a
temporary name and renames it when complete, so a crash (even `kill -9` in the middle of
an asynchronous save) never leaves a half-written checkpoint under a step's name; the
newest `keep` are kept.

Restoring reads the arrays straight onto the shardings of the templates it is given, so a
checkpoint resumes on another mesh or device count than the one that wrote it.
Checkpoints of the earlier format (`student.eqx`, `opt_state.eqx`, `state.json` per step)
still load.
"""

import json
import pathlib
from typing import Any

import equinox as eqx
import jax

from .._files import PathLike
from ..interop.folders import deserialise

STATE_ITEM = "state"
ARRAYS_ITEM = "arrays"
# the earlier format (one eqx file per tree and a state.json), still read
LEGACY_STATE_FILE = "state.json"
LEGACY_MODEL_FILE = "student.eqx"
LEGACY_OPT_FILE = "opt_state.eqx"


def checkpoint_dir(out: PathLike) -> pathlib.Path:
    return pathlib.Path(out) / "checkpoints"


def list_checkpoints(out: PathLike) -> list[pathlib.Path]:
    """Complete checkpoints of a run folder, oldest first (folders named by their step;
    Orbax's temporary folders, and anything else, are not checkpoints)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def _is_leaf_array(x: Any) -> bool:
    """An array, or the shape of one (a template from `eqx.filter_eval_shape`)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _leaves(tree: Any) -> tuple[list[Any], list[str]]:
    """The array leaves of a tree and their paths (the names a checkpoint checks)."""
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_leaf_array))[0]
    return [leaf for _, leaf in flat], [jax.tree_util.keystr(path) for path, _ in flat]


def _item_arrays(model: eqx.Module, opt_state: Any) -> tuple[dict[str, Any], dict[str, list[list]]]:
    """The arrays item (`{tree: {index: array}}`) and what the state records of each
    array: `[path, shape, dtype]`."""
    arrays, described = {}, {}
    for name, tree in (("student", model), ("opt_state", opt_state)):
        leaves, names = _leaves(tree)
        arrays[name] = {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}
        described[name] = [[n, list(x.shape), str(x.dtype)] for n, x in zip(names, leaves)]
    return arrays, described


def _fill(like: Any, leaves: list[Any]) -> Any:
    """`like` with its array leaves replaced by `leaves`, in order."""
    dynamic, static = eqx.partition(like, _is_leaf_array)
    treedef = jax.tree.structure(dynamic)
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def is_legacy(path: pathlib.Path) -> bool:
    return (path / LEGACY_STATE_FILE).is_file()


def is_checkpoint(path: pathlib.Path) -> bool:
    """Whether `path` is a checkpoint folder (of either format)."""
    return is_legacy(path) or ((path / STATE_ITEM / "metadata").is_file() and (path / ARRAYS_ITEM).is_dir())


class Checkpointer:
    """The checkpoints of one run folder (`out/checkpoints/<step>/`).

    **Example:**

    ```python
    checkpointer = Checkpointer("runs/demo", keep=3)
    checkpointer.save(100, student, opt_state, {"data": data_state})   # returns at once
    ...
    step = checkpointer.latest()
    student, opt_state, state = checkpointer.restore(step, student, opt_state)
    checkpointer.close()   # waits for a save in flight
    ```

    `save` returns as soon as the arrays are copied off the devices (the step may then
    donate their buffers); the files are written in the background. With several
    processes every process calls `save` and `restore` (each writes and reads its own
    shards).
    """

    def __init__(self, out: PathLike, *, keep: int = 3, asynchronous: bool = True):
        import orbax.checkpoint as ocp

        self.directory = checkpoint_dir(out).absolute()
        self._ocp = ocp
        self._manager = None
        self._keep = keep
        self._asynchronous = asynchronous

    @property
    def manager(self):
        """The Orbax `CheckpointManager` (created, with its folder, on first use)."""
        if self._manager is None:
            ocp = self._ocp
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=self._asynchronous, create=True,
                cleanup_tmp_directories=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=(ARRAYS_ITEM, STATE_ITEM))
        return self._manager

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return [int(p.name) for p in list_checkpoints(self.directory.parent)]

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, model: eqx.Module, opt_state: Any, state: dict[str, Any]) -> pathlib.Path:
        """Start writing checkpoint `step` (the student, the optimizer state and the JSON
        `state`); the previous save is finished first."""
        ocp = self._ocp
        arrays, paths = _item_arrays(model, opt_state)
        state = {**state, "step": step, "leaves": paths}
        self.manager.save(step, args=ocp.args.Composite(**{
            ARRAYS_ITEM: ocp.args.StandardSave(arrays), STATE_ITEM: ocp.args.JsonSave(state),
        }))
        return self.path(step)

    def wait(self) -> None:
        """Block until a save in flight is on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def read_state(self, step: int) -> dict[str, Any]:
        """The JSON state of checkpoint `step`; a missing or corrupt one is a clear error."""
        return read_state(self.path(step))

    def restore(self, step: int, model_like: eqx.Module, opt_like: Any) -> tuple[eqx.Module, Any, dict]:
        """`(model, opt_state, state)` of checkpoint `step`, each array placed like the
        corresponding leaf of the templates (their shardings: any mesh, or one device).
        A checkpoint of another structure, or a corrupt one, is a `ValueError` naming it."""
        path = self.path(step)
        state = read_state(path)
        if is_legacy(path):
            model, opt_state = _restore_legacy(path, model_like, opt_like)
            return model, opt_state, state
        _, expected = _item_arrays(model_like, opt_like)
        for name in ("student", "opt_state"):
            _check_leaves(path, name, state.get("leaves", {}).get(name), expected[name])
        ocp = self._ocp
        abstract = {
            "student": {f"{i:05d}": _abstract(x) for i, x in enumerate(_leaves(model_like)[0])},
            "opt_state": {f"{i:05d}": _abstract(x) for i, x in enumerate(_leaves(opt_like)[0])},
        }
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                ARRAYS_ITEM: ocp.args.StandardRestore(abstract)}))[ARRAYS_ITEM]
        except Exception as error:  # tensorstore and Orbax raise many kinds on damaged files
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {first})") from None
        model = _fill(model_like, [restored["student"][k] for k in sorted(restored["student"])])
        opt_state = _fill(opt_like, [restored["opt_state"][k] for k in sorted(restored["opt_state"])])
        return model, opt_state, state


def _check_leaves(path: pathlib.Path, name: str, saved: list | None, expected: list) -> None:
    """The arrays a checkpoint holds are the ones the run builds (paths, shapes, dtypes)."""
    saved = [list(x) for x in saved or []]
    if [x[0] for x in saved] != [x[0] for x in expected]:
        missing = sorted({x[0] for x in expected} - {x[0] for x in saved})[:3]
        raise ValueError(
            f"checkpoint {path} holds another {name} than the run builds ({len(saved)} arrays, not "
            f"{len(expected)}; e.g. {missing or 'their order'} differ): resume with the settings it "
            "was written with, or use another --out"
        )
    for (where, shape, dtype), (_, want_shape, want_dtype) in zip(saved, expected):
        if (shape, dtype) != (want_shape, want_dtype):
            raise ValueError(f"checkpoint {path}: {name} array {where} is {dtype}{shape}, "
                             f"the run builds {want_dtype}{want_shape}")


def read_state(path: pathlib.Path) -> dict[str, Any]:
    """The JSON state of a checkpoint folder (either format); a clear error names a
    missing or corrupt file."""
    file = path / LEGACY_STATE_FILE if is_legacy(path) else path / STATE_ITEM / "metadata"
    if not file.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: {file.relative_to(path)} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is corrupt or truncated ({error})") from None


def load_checkpoint_model(path: pathlib.Path, model_like: eqx.Module) -> eqx.Module:
    """Only the student of a checkpoint folder (for export), on the default device."""
    state = read_state(path)
    if is_legacy(path):
        model = deserialise(path / LEGACY_MODEL_FILE, model_like)
        _check_size(path / LEGACY_MODEL_FILE, model)
        return model
    import orbax.checkpoint as ocp

    leaves = _leaves(model_like)[0]
    _check_leaves(path, "student", state.get("leaves", {}).get("student"), _item_arrays(model_like, {})[1]["student"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"student": {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                            for i, x in enumerate(leaves)}}
    try:  # the student's arrays alone (a partial restore: the optimizer state stays on disk)
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(path.absolute() / ARRAYS_ITEM, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True))
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {first})") from None
    return _fill(model_like, [restored["student"][k] for k in sorted(abstract["student"])])


def _restore_legacy(path: pathlib.Path, model_like: eqx.Module, opt_like: Any) -> tuple[eqx.Module, Any]:
    """A checkpoint of the earlier format, placed like the templates' leaves."""
    host_model = deserialise(path / LEGACY_MODEL_FILE, _on_host(model_like))
    host_opt = deserialise(path / LEGACY_OPT_FILE, _on_host(opt_like))
    for name, tree in ((LEGACY_MODEL_FILE, host_model), (LEGACY_OPT_FILE, host_opt)):
        _check_size(path / name, tree)

    def place(tree: Any, like: Any) -> Any:
        leaves = _leaves(tree)[0]
        likes = _leaves(like)[0]
        return _fill(like, [jax.device_put(x, getattr(y, "sharding", None)) for x, y in zip(leaves, likes)])

    return place(host_model, model_like), place(host_opt, opt_like)


def _on_host(tree: Any) -> Any:
    import numpy as np

    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype) if eqx.is_array(x) else x, tree)


def _check_size(file: pathlib.Path, tree: Any) -> None:
    """Trailing garbage in an eqx file is corruption too."""
    import io

    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    if buffer.getbuffer().nbytes != file.stat().st_size:
        raise ValueError(
            f"{file} is corrupt or truncated: {file.stat().st_size} bytes, expected "
            f"{buffer.getbuffer().nbytes}"
        )
