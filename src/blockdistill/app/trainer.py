"""The training loop behind `blockdistill pretrain` and `blockdistill distill`: one
`Trainer`, and hooks for everything around the step.

The loop is thin: a batch goes in, the jitted step runs (asynchronously), and its metrics
stay on the device. At a *boundary* (a step some hook asked for: a log, evaluation or
checkpoint step, the first and the last step, or a stop request) the device is waited
for, the metrics of all steps since the last boundary are fetched in one transfer and
turned into records, and the hooks run in order:

- `fields(trainer, step)`: extra fields for the boundary's record (evaluation results);
- `after_flush(trainer, step, records)`: write the records (JSONL, TensorBoard, W&B),
  stop on a non-finite loss, checkpoint, show progress.

`on_start`, `on_step` (after every step) and `on_end` (always, also on errors) complete
the protocol. Time spent at a boundary is outside the `tokens_per_s` windows, so the rate
covers training only.
"""

import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._files import write_json
from .checkpoint import Checkpointer, list_checkpoints, read_state

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "time_s", "compile_s")
clock = time.perf_counter  # the windows' clock (a test gives it a fake one)


class TrainingError(RuntimeError):
    """A run that had to stop (the message says why and what was kept)."""


# ----------------------------------------------------------------------------- the loop


class Hook:
    """Something the [`Trainer`][blockdistill.app.trainer.Trainer] does around its steps.
    Every method is optional; `due(step)` says whether `step` must be a boundary."""

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def due(self, step: int) -> bool:
        return False

    def fields(self, trainer: "Trainer", step: int) -> dict[str, Any]:
        return {}

    def after_flush(self, trainer: "Trainer", step: int, records: list[dict[str, Any]]) -> None:
        pass

    def on_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def on_end(self, trainer: "Trainer") -> None:
        pass


class Trainer:
    """Runs `step_fn` from step `start` to `steps` over `batches`, with `hooks`.

    `step_fn(model, opt_state, batch, index) -> (model, opt_state, metrics)` is the
    run's jitted update (it may donate the model and optimizer state); `batches` yields
    host batches; `record_fields(step)` adds host-side fields to every step's record (the
    learning rate, the cumulative FLOPs). The trainer keeps `model`, `opt_state`, `step`
    and `stop_requested` for the hooks.
    """

    def __init__(self, step_fn: Callable, model: Any, opt_state: Any, batches: Any, *, start: int, steps: int,
                 tokens_per_step: int, hooks: list[Hook], record_fields: Callable[[int], dict] | None = None):
        self.step_fn = step_fn
        self.model, self.opt_state = model, opt_state
        self.batches = batches
        self.step = start
        self.start = start
        self.steps = steps
        self.tokens_per_step = tokens_per_step
        self.hooks = hooks
        self.record_fields = record_fields or (lambda step: {})
        self.stop_requested = False
        self.pending: list[tuple[int, dict]] = []

    def run(self) -> None:
        for hook in self.hooks:
            hook.on_start(self)
        try:
            since = clock()
            while self.step < self.steps and not self.stop_requested:
                batch = next(self.batches)
                self.model, self.opt_state, metrics = self.step_fn(self.model, self.opt_state, batch, self.step)
                self.step += 1
                step = self.step
                if self.pending:
                    # steps are dispatched asynchronously: keep one queued behind the
                    # running one (the host prepares the next batch meanwhile) rather
                    # than racing ahead, so progress and Ctrl-C follow the device
                    jax.block_until_ready(self.pending[-1][1]["loss"])
                self.pending.append((step, metrics))
                first = step == self.start + 1
                if first or self.boundary(step):
                    # the window ends when the device has finished its steps, and the
                    # next one starts after the hooks: windows cover training only
                    jax.block_until_ready(metrics)
                    now = clock()
                    fields: dict[str, Any] = {}
                    if first:  # the first step compiles: a compile-inclusive rate means nothing
                        fields = {"compile_s": now - since, "tokens_per_s": None}
                    for hook in self.hooks:
                        fields.update(hook.fields(self, step))
                    records = self.flush(now, since, fields)
                    for hook in self.hooks:
                        hook.after_flush(self, step, records)
                    since = clock()
                for hook in self.hooks:
                    hook.on_step(self, step)
            if self.pending or self.stop_requested:
                # a stop request after the last boundary: close the window (and checkpoint)
                records = self.flush(clock(), since, {})
                for hook in self.hooks:
                    hook.after_flush(self, self.step, records)
        finally:
            for hook in reversed(self.hooks):
                hook.on_end(self)

    def boundary(self, step: int) -> bool:
        return step == self.steps or self.stop_requested or any(hook.due(step) for hook in self.hooks)

    def flush(self, now: float, since: float, last_fields: dict[str, Any]) -> list[dict[str, Any]]:
        """The pending steps' records (one device transfer): each step's metrics, the
        window's `tokens_per_s` and `record_fields`; `last_fields` go into the last record
        (a `None` value removes the field)."""
        if not self.pending:
            return []
        steps, device_metrics = zip(*self.pending)
        host = jax.device_get(list(device_metrics))
        tokens_per_s = self.tokens_per_step * len(steps) / max(now - since, 1e-9)
        records = []
        for step, metrics in zip(steps, host):
            record: dict[str, Any] = {"step": step}
            for key, value in metrics.items():
                value = np.asarray(value)
                record[key] = value.tolist() if value.ndim else float(value)
            record["tokens_per_s"] = tokens_per_s
            record.update(self.record_fields(step))
            records.append(record)
        for key, value in last_fields.items():
            if value is None:
                records[-1].pop(key, None)
            else:
                records[-1][key] = value
        self.pending = []
        return records


# ----------------------------------------------------------------------------- the run folder


class RunFolder:
    """A run's folder: its metrics file (JSONL, the record) and its checkpoints. With
    several processes, process 0 writes the folder; the others keep their metrics in a
    hidden folder of their own."""

    def __init__(self, out: pathlib.Path, kind: str):
        self.out = out
        self.kind = kind
        self.writer = jax.process_index() == 0
        folder = out if self.writer else out / f".process-{jax.process_index()}"
        self.metrics_path = folder / METRICS_FILE

    def newest_checkpoint(self) -> pathlib.Path | None:
        checkpoints = list_checkpoints(self.out)
        return checkpoints[-1] if checkpoints else None

    def newest_state(self) -> dict[str, Any] | None:
        """The JSON state of the newest checkpoint (`None` for a fresh run)."""
        checkpoint = self.newest_checkpoint()
        return None if checkpoint is None else read_state(checkpoint)

    def start_metrics(self, resumed_at: int | None) -> None:
        """A fresh metrics file, or the one of a resumed run cut back to its checkpoint
        (the steps after it are replayed)."""
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is None or not self.metrics_path.exists():
            self.metrics_path.write_text("")
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resumed_at]
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def evals(self) -> dict[int, dict]:
        """The evaluation records written so far, by step."""
        evals = {}
        for line in self.metrics_path.read_text().splitlines():
            record = json.loads(line)
            if "eval/student_loss" in record:
                evals[record["step"]] = record
        return evals

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            write_json(self.out / "config.json", {"command": self.kind, **config})


# ----------------------------------------------------------------------------- hooks


class MetricsHook(Hook):
    """Appends every record to the JSONL file (flushed and synced), then to the other
    writers (TensorBoard, W&B); `due` every `log_every` steps."""

    def __init__(self, folder: RunFolder, log_every: int, writers: list | None = None):
        self.folder, self.log_every, self.writers = folder, log_every, writers or []

    def due(self, step: int) -> bool:
        return step % self.log_every == 0

    def write(self, records: list[dict[str, Any]]) -> None:
        with open(self.folder.metrics_path, "a") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for writer in self.writers:
            writer.write(records)

    def after_flush(self, trainer: Trainer, step: int, records: list[dict[str, Any]]) -> None:
        self.write(records)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def on_end(self, trainer: Trainer) -> None:
        self.close()


class EvalHook(Hook):
    """Held-out loss every `every` steps and at the last step: `evaluate(model)`, plus
    fixed fields (the teacher's loss), in the boundary's record."""

    def __init__(self, every: int, evaluate: Callable[[Any], float], extra: dict[str, float] | None = None):
        self.every, self.evaluate, self.extra = every, evaluate, extra or {}

    def record(self, model: Any) -> dict[str, float]:
        return {"eval/student_loss": self.evaluate(model), **self.extra}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def fields(self, trainer: Trainer, step: int) -> dict[str, Any]:
        return self.record(trainer.model) if self.due(step) or step == trainer.steps else {}


class NonFiniteHook(Hook):
    """Stops the run before a diverged model is saved, naming the step and the last good
    checkpoint (it runs before the checkpoint hook). Every step's `loss` and `grad_norm`
    are checked (the loss is computed before the update, so a finite loss with an inf or
    NaN gradient, e.g. a bf16 overflow in the backward pass, still writes non-finite
    weights), and at a step that will be saved, the model's weights themselves."""

    KEYS = {"loss": "loss", "grad_norm": "gradient norm"}

    def __init__(self, folder: RunFolder, checkpoints: "CheckpointHook"):
        self.folder, self.checkpoints = folder, checkpoints

    def _stop(self, what: str, step: int) -> None:
        last = self.checkpoints.last
        kept = (f"the last good checkpoint is {self.folder.out / 'checkpoints' / str(last)}"
                if last is not None else "no checkpoint was written before it")
        raise TrainingError(f"{what} at step {step}; stopped, {kept} (try a lower --learning-rate)")

    def after_flush(self, trainer: Trainer, step: int, records: list[dict[str, Any]]) -> None:
        for record in records:
            for key, name in self.KEYS.items():
                if key in record and not math.isfinite(record[key]):
                    self._stop(f"{name} became non-finite ({record[key]})", record["step"])
        if self.checkpoints.saves_at(trainer, step) and not bool(all_finite(trainer.model)):
            self._stop("the weights became non-finite (with a finite loss and gradient norm)", step)


@eqx.filter_jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point array of `tree` is finite (one scalar from the device)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class CheckpointHook(Hook):
    """A checkpoint every `every` steps, at the last step and when a stop was requested
    (asynchronous: training goes on while it is written); `state()` gives the JSON part
    (the data position, the config). The last save is on disk when the run ends."""

    def __init__(self, checkpointer: Checkpointer, every: int, state: Callable[[], dict[str, Any]],
                 last: int | None = None):
        self.checkpointer, self.every, self.state = checkpointer, every, state
        self.last = last

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def saves_at(self, trainer: Trainer, step: int) -> bool:
        """Whether the boundary at `step` writes a checkpoint."""
        return (self.due(step) or step == trainer.steps or trainer.stop_requested) and self.last != step

    def after_flush(self, trainer: Trainer, step: int, records: list[dict[str, Any]]) -> None:
        if self.saves_at(trainer, step):
            self.checkpointer.save(step, trainer.model, trainer.opt_state, self.state())
            self.last = step

    def on_end(self, trainer: Trainer) -> None:
        self.checkpointer.close()


class ProgressHook(Hook):
    """A tqdm progress bar with the latest loss, tokens/s and eval loss."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.shown = desc, None, {}

    def on_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.steps, initial=trainer.step, desc=self.desc, unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def after_flush(self, trainer: Trainer, step: int, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        last = records[-1]
        self.shown = {"loss": f"{last.get('loss', float('nan')):.4f}"}
        if last.get("tokens_per_s"):
            self.shown["tok/s"] = f"{last['tokens_per_s']:.0f}"
        if "eval/student_loss" in last:
            self.shown["eval"] = f"{last['eval/student_loss']:.4f}"

    def on_step(self, trainer: Trainer, step: int) -> None:
        self.bar.update(1)
        if self.shown:
            self.bar.set_postfix(self.shown, refresh=False)

    def on_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnSignal(Hook):
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: abort at once."""

    def __init__(self):
        self.previous: dict = {}

    def on_start(self, trainer: Trainer) -> None:
        def handler(signum, frame):
            if trainer.stop_requested:
                raise KeyboardInterrupt
            trainer.stop_requested = True
            print("\nstopping: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def on_end(self, trainer: Trainer) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}


class PlotHook(Hook):
    """`loss.png` and `feature_per_layer.png` from the metrics file when the run ends."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_end(self, trainer: Trainer) -> None:
        if self.folder.writer and self.folder.metrics_path.exists():
            from .plots import plot_metrics

            plot_metrics(self.folder.metrics_path, self.folder.out)
