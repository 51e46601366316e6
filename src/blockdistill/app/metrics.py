"""Where a run's metrics go besides `metrics.jsonl` (the record, always written):
TensorBoard event files and Weights & Biases, both optional extras.

Every writer takes the same records the JSONL file gets (one dict per step, with `step`)
and turns each number into a scalar series of the same name; a per-layer list such as
`feature_per_layer` becomes one series per layer, `feature_per_layer/layer_0`, ....
"""

import math
import pathlib
import secrets
from typing import Any, Protocol

#: the keys of a record that are not series
_NOT_SERIES = ("step",)


class MetricsWriter(Protocol):
    """A destination of metrics records."""

    def write(self, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalar series of one record: numbers by name, lists as `name/layer_<i>`;
    non-finite values are kept (they are what a diverging run looks like)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SERIES or isinstance(value, (str, bool)) or value is None:
            continue
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    out[f"{key}/layer_{i}"] = float(item)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def _missing(extra: str, package: str) -> ImportError:
    return ImportError(
        f"--{extra} needs the {package!r} package: pip install 'blockdistill[{extra}]' (or pip install {package})"
    )


class TensorBoardWriter:
    """Scalars into TensorBoard event files under `folder` (`tensorboard --logdir folder`).

    Written with TensorBoard's own numpy-only writer (`tensorboard.summary.Writer`). A
    resumed run appends a new event file; the steps it replays after its checkpoint come
    out of order, and TensorBoard's reader drops the older values of those steps.
    """

    def __init__(self, folder: str | pathlib.Path):
        try:
            from tensorboard.summary import Writer
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(str(self.folder))

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            for tag, value in scalars(record).items():
                self._writer.add_scalar(tag, value, step=int(record["step"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars into a Weights & Biases run.

    The run's id is kept in `folder/wandb-id`, so a resumed run continues the same W&B
    run. `mode` is W&B's: "online", "offline" (synced later with `wandb sync`) or
    "disabled"; the `WANDB_*` environment variables apply as usual.
    """

    def __init__(self, folder: str | pathlib.Path, *, project: str, name: str | None = None,
                 config: dict[str, Any] | None = None, mode: str = "online"):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "wandb-id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B run ids are [a-z0-9]
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(folder),
                               config=config, mode=mode)
        self._last_step = -1

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            step = int(record["step"])
            if step < self._last_step:  # W&B keeps steps increasing: replayed steps are skipped
                continue
            values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
            self._run.log(values, step=step)
            self._last_step = step

    def close(self) -> None:
        self._run.finish()
