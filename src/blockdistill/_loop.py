"""The training loop behind `blockdistill pretrain` and `blockdistill distill`.

Host-side work stays thin: batches come in as numpy, the step is one jitted call, and
metrics stay on the device until a log step, when all steps since the last one are
fetched with a single transfer.
"""

import dataclasses
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
import optax
from jax.sharding import Mesh

from ._checkpoint import Checkpointer, list_checkpoints, read_state
from ._config import TransformerConfig
from ._data import Batcher, Split, eval_batches
from ._files import write_json
from ._io import read_model_config, save_model
from ._tokenizers import (
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    read_tokenizer_record,
    save_tokenizer,
    tokenizer_record,
)
from ._flops import pretrain_flops, step_flops
from ._store import PackedRows, TokenDataset, batch_iterator, token_dataset
from ._metrics import MetricsWriter, TensorBoardWriter, WandbWriter
from ._model import Transformer
from ._prune import StudentConfig
from ._objective import DistillationObjective, next_token_cross_entropy, next_token_pairs
from ._parallel import (
    LAYERS_AXIS,
    check_mesh,
    host_arrays,
    make_mesh,
    parse_mesh,
    process_rows,
    shard_batch,
    shard_local_batch,
    shard_model,
    shard_opt_state,
)
from ._runconfig import ConfigError, DistillConfig, EvalConfig, PretrainConfig, RunConfig
from ._teacher import Teacher
from ._train import DistillStep, compiled_step, make_optimizer

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "time_s", "compile_s")


class TrainingError(RuntimeError):
    """A run that had to stop (the message says why and what was kept)."""


# ----------------------------------------------------------------------------- helpers


def lr_schedule(cfg: RunConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to a tenth of it over the
    run's schedule horizon (`steps`, or `schedule_steps`); past it the rate stays at its
    final value."""
    horizon = cfg.horizon
    warmup = min(cfg.warmup_steps, max(horizon - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=warmup, decay_steps=max(horizon, warmup + 1),
        end_value=0.1 * cfg.learning_rate,
    )


def blockwise_schedule(cfg: DistillConfig):
    """The mixing weight `w` of the objective: a float or an optax schedule (for
    `staged`, the weight of the first stage; see `make_objective`)."""
    if cfg.blockwise_schedule in ("constant", "staged") or cfg.blockwise_weight == cfg.blockwise_weight_end:
        return cfg.blockwise_weight
    steps = cfg.blockwise_steps or cfg.horizon
    if cfg.blockwise_schedule == "linear":
        return optax.linear_schedule(cfg.blockwise_weight, cfg.blockwise_weight_end, steps)
    alpha = cfg.blockwise_weight_end / cfg.blockwise_weight if cfg.blockwise_weight else 0.0
    return optax.cosine_decay_schedule(cfg.blockwise_weight, steps, alpha=alpha)


def stage_switch(cfg: DistillConfig) -> int | None:
    """The step at which a `staged` run switches from its first stage to its second
    (`blockwise_steps`, default half the schedule horizon); `None` for other schedules."""
    if cfg.blockwise_schedule != "staged":
        return None
    return cfg.blockwise_steps if cfg.blockwise_steps is not None else cfg.horizon // 2


def stage_of(cfg: DistillConfig, index: int) -> int:
    """The stage that runs step `index`: 1 from a `staged` run's switch on, else 0."""
    switch = stage_switch(cfg)
    return 1 if switch is not None and index >= switch else 0


def stage_objectives(cfg: DistillConfig) -> list[DistillationObjective]:
    """The objective of each stage of a run: one, or two for `staged`."""
    return [make_objective(cfg, stage) for stage in range(2 if stage_switch(cfg) is not None else 1)]


def distill_steps(cfg: DistillConfig, mesh: Mesh | None = None) -> tuple[list[DistillationObjective], list[DistillStep]]:
    """A run's objective and compiled step per stage (one, or two for `staged`; step
    `index` runs stage `stage_of(cfg, index)`), all sharing one optimizer."""
    objectives = stage_objectives(cfg)
    optimizer = make_optimizer(
        lr_schedule(cfg), weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm, trainable=cfg.trainable
    )
    fused = {"auto": "auto", "on": True, "off": False}[cfg.fused]
    steps = [
        DistillStep(objective, optimizer, mesh=mesh, trainable=cfg.trainable, fused=fused)
        for objective in objectives
    ]
    return objectives, steps


def make_objective(cfg: DistillConfig, stage: int = 0) -> DistillationObjective:
    """The objective of a run (of stage `stage` for a `staged` run).

    `staged` never mixes passes: stage 0 is `w = blockwise_weight` without label CE (with
    the default weight 1, blockwise alone), stage 1 is `w = blockwise_weight_end` with
    the run's `label_weight` (with the default 0, KD and CE alone).
    """
    injected_pass = cfg.injected_pass
    if injected_pass == "auto" and cfg.mesh is not None and parse_mesh(cfg.mesh)[LAYERS_AXIS] > 1:
        # on a layers axis only the vmap pass keeps every block on its own device (a scan
        # over the layer-sharded stack gathers it every step); both give the same losses
        injected_pass = "vmap"
    weight, label_weight = blockwise_schedule(cfg), cfg.label_weight
    if cfg.blockwise_schedule == "staged":
        weight, label_weight = (cfg.blockwise_weight, 0.0) if stage == 0 else (cfg.blockwise_weight_end, cfg.label_weight)
    return DistillationObjective(
        blockwise_weight=weight,
        temperature=cfg.temperature,
        feature_loss=cfg.feature_loss,
        inject_at=cfg.inject_at,
        label_weight=label_weight,
        teacher_weight=cfg.teacher_weight,
        injected_pass=injected_pass,
    )


def run_tokenizer(out: pathlib.Path, tokenizer: Tokenizer) -> None:
    """Record the run's tokenizer in `out/tokenizer/` when the run starts; a resumed run
    must be given the same one (its data and checkpoints depend on it)."""
    folder = out / "tokenizer"
    if not (folder / "config.json").is_file():
        if jax.process_index() == 0:
            save_tokenizer(tokenizer, folder)
        return
    recorded = read_tokenizer_record(folder)
    current = tokenizer_record(tokenizer)
    if recorded != current:
        raise ConfigError(
            f"{out} was started with another tokenizer ({recorded}) than the one given now "
            f"({current}); use another --out, or the tokenizer the run started with"
        )


@eqx.filter_jit
def _eval_sums(
    model: Transformer, tokens: jax.Array, mask: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    logits = jax.vmap(lambda t, seg: model(t, segment_ids=seg).logits)(tokens, segment_ids)
    count = jnp.sum(next_token_pairs(mask, segment_ids).astype(jnp.float32))
    return next_token_cross_entropy(logits, tokens, mask, segment_ids) * count, count


def _place_batch(mesh: Mesh | None, batch: Split) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A host batch on the device(s): split over the mesh's `data` axis when there is one."""
    if mesh is None:
        return tuple(jnp.asarray(array) for array in batch)
    return shard_batch(mesh, *batch)


def evaluate(model: Transformer, batches: list[Split], mesh: Mesh | None = None) -> float:
    """Mean next-token cross-entropy (nats per token) of a model over fixed batches of
    packed rows (pairs within one document only)."""
    total, count = [], []
    for batch in batches:
        s, c = _eval_sums(model, *_place_batch(mesh, batch))
        total.append(s)
        count.append(c)
    total, count = jax.device_get((total, count))
    return float(np.sum(total) / max(np.sum(count), 1.0))


def _val_batches(cfg: RunConfig | EvalConfig, dataset: TokenDataset) -> list[Split]:
    return eval_batches(
        *dataset.val.materialize(cfg.eval_batches * cfg.batch_size), batch_size=cfg.batch_size,
        max_batches=cfg.eval_batches, pad_id=dataset.tokenizer.pad_id,
    )


def _open_dataset(cfg: RunConfig | EvalConfig, tokenizer: Tokenizer) -> TokenDataset:
    """The run's corpus: tokenized once into a token store (reused by later runs), packed
    on demand."""
    show = getattr(cfg, "progress", False) and jax.process_index() == 0
    return token_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, glob=cfg.data_glob,
                         cache=cfg.token_cache, progress=show)


class _Batches:
    """A run's training batches: the Grain pipeline (`batch_iterator`), this process's
    rows of each global batch only; its position is JSON for the checkpoint. A checkpoint
    written before the pipeline (a `Batcher` position) resumes with that `Batcher`."""

    def __init__(self, rows: PackedRows, cfg: RunConfig, share: slice | None):
        self.rows, self.cfg, self.share = rows, cfg, share
        self.iterator = batch_iterator(rows, batch_size=cfg.batch_size, seed=cfg.seed, share=share)
        self.legacy: Batcher | None = None

    def restore(self, state: dict[str, Any]) -> None:
        if {"epoch", "index"} <= state.keys():
            self.legacy = Batcher(*self.rows.materialize(), batch_size=self.cfg.batch_size, seed=self.cfg.seed)
            self.legacy.load_state_dict(state)
        else:
            self.iterator.set_state(state)

    def __next__(self) -> Split:
        if self.legacy is None:
            return next(self.iterator)
        batch = next(self.legacy)
        return Split(*(array[self.share or slice(None)] for array in batch))

    def state(self) -> dict[str, Any]:
        return self.legacy.state_dict() if self.legacy is not None else self.iterator.get_state()


def _batch_size_check(cfg: RunConfig, dataset: TokenDataset) -> None:
    n = len(dataset.train)
    if cfg.batch_size > n:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training split of "
            f"{dataset.source!r} ({n} sequences of {cfg.seq_len} tokens)"
        )
    if len(dataset.val) == 0:
        raise ConfigError(f"corpus {dataset.source!r} leaves no validation sequences (val_fraction={cfg.val_fraction})")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Stepper:
    """What differs between pretraining and distillation."""

    step: Callable[..., tuple[Any, Any, dict]]
    eval_teacher: float | None


class Run:
    """One run folder: metrics, checkpoints, evaluation, plots and resumption."""

    def __init__(self, cfg: RunConfig, out: pathlib.Path, kind: str):
        self.cfg = cfg
        self.out = out
        self.kind = kind
        # with several processes (multi-host), process 0 writes the run folder; the
        # others keep their metrics in a hidden folder of their own
        self.writer = jax.process_index() == 0
        folder = out if self.writer else out / f".process-{jax.process_index()}"
        self.metrics_path = folder / METRICS_FILE
        self.stop_requested = False
        self.pending: list[tuple[int, dict]] = []
        self.last_checkpoint: int | None = None
        #: analytic training FLOPs of the step at an index (set by the command)
        self.step_flops: Callable[[int], float] | None = None
        self._flops_prefix = [0.0]
        #: where records go besides the JSONL file (TensorBoard, W&B; opened by `open_writers`)
        self.writers: list[MetricsWriter] = []

    def learning_rate(self, index: int) -> float:
        """The learning rate of the step at `index` (the schedule of the run as resumed)."""
        return float(lr_schedule(self.cfg)(index))

    def open_writers(self) -> None:
        """Open the TensorBoard and W&B writers the config asks for (process 0 only)."""
        if not self.writer:
            return
        if self.cfg.tensorboard:
            self.writers.append(TensorBoardWriter(self.out / "tensorboard"))
        if self.cfg.wandb:
            self.writers.append(WandbWriter(self.out, project=self.cfg.wandb_project, name=self.out.name,
                                            config={"command": self.kind, **self.cfg.to_dict()},
                                            mode=self.cfg.wandb_mode))

    def close_writers(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def train_flops(self, step: int) -> float:
        """Analytic training FLOPs of steps `0 .. step - 1`, the `train_flops` metric."""
        while len(self._flops_prefix) <= step:
            index = len(self._flops_prefix) - 1
            self._flops_prefix.append(self._flops_prefix[-1] + self.step_flops(index))
        return self._flops_prefix[step]

    # --------------------------------------------------------------- resumption

    def newest_checkpoint(self) -> pathlib.Path | None:
        found = list_checkpoints(self.out)
        return found[-1] if found else None

    def check_resumable(self, checkpoint: pathlib.Path) -> RunConfig:
        """The config to resume with: the current one, unless it would change what the
        saved run trains (an error that names each change). With `extend`, `steps` may
        grow and the saved run's schedule horizon is kept."""
        state = read_state(checkpoint)
        saved = state.get("config", {})
        cfg = self.cfg
        saved_horizon = saved.get("schedule_steps") or saved.get("steps", cfg.steps)
        if cfg.extend:
            if cfg.steps < state["step"]:
                raise ConfigError(
                    f"--extend to steps={cfg.steps} is invalid: {checkpoint} is already at "
                    f"step {state['step']}"
                )
            if cfg.schedule_steps not in (None, saved_horizon):
                raise ConfigError(
                    f"--extend keeps the saved run's schedules (schedule_steps={saved_horizon}); "
                    f"schedule_steps={cfg.schedule_steps} would change them"
                )
            cfg = dataclasses.replace(cfg, schedule_steps=saved_horizon)
        current = cfg.to_dict()
        ignored = RunConfig.RESUMABLE_CHANGES | ({"steps"} if cfg.extend else set())
        changed = sorted(
            k for k in current if k not in ignored and saved.get(k, current[k]) != current[k]
        )
        # a run saved before `schedule_steps` existed had its schedules built from steps
        if "schedule_steps" in changed and cfg.horizon == saved_horizon:
            changed.remove("schedule_steps")
        if changed:
            pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            message = f"{self.out} holds a run with other settings ({pairs}); "
            if "steps" in changed:
                message += (
                    f"steps: the learning-rate schedule (warm-up, cosine decay over "
                    f"{saved_horizon} steps) and the blockwise-weight schedule are built from it, "
                    f"so changing it would change the training of the steps already run. Rerun "
                    f"with --steps {saved.get('steps')} to resume as it was, or add --extend to "
                    f"train on to {cfg.steps} steps with the schedules of the saved run (past "
                    f"step {saved_horizon} they stay at their final values); or use another --out"
                )
            else:
                message += "use another --out or the same settings to resume it"
            raise ConfigError(message)
        return cfg

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps up to `step` (those after it are replayed)."""
        if not self.metrics_path.exists():
            return
        kept = [
            line for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    # --------------------------------------------------------------- metrics

    def write_lines(self, records: list[dict]) -> None:
        with open(self.metrics_path, "a") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for writer in self.writers:
            writer.write(records)

    def flush(
        self, now: float, since: float, tokens_per_step: int, last_fields: dict | None = None
    ) -> list[dict]:
        """Fetch pending step metrics (one transfer), check them, append them.

        `last_fields` are merged into the last step's record before it is written (eval
        results, the compile time); a field whose value is `None` is removed instead.
        """
        if not self.pending:
            return []
        steps, device_metrics = zip(*self.pending)
        host = jax.device_get(list(device_metrics))
        elapsed = max(now - since, 1e-9)
        tokens_per_s = tokens_per_step * len(steps) / elapsed
        records = []
        bad_step = None
        for step, metrics in zip(steps, host):
            record = {"step": step}
            for key, value in metrics.items():
                value = np.asarray(value)
                record[key] = value.tolist() if value.ndim else float(value)
            record["tokens_per_s"] = tokens_per_s
            record["learning_rate"] = self.learning_rate(step - 1)  # the step that led here
            if self.step_flops is not None:
                record["train_flops"] = self.train_flops(step)
            records.append(record)
            if not math.isfinite(record["loss"]):
                bad_step = step
                break
        if bad_step is None:
            for key, value in (last_fields or {}).items():
                if value is None:
                    records[-1].pop(key, None)
                else:
                    records[-1][key] = value
        self.pending = []
        self.write_lines(records)
        if bad_step is not None:
            kept = (
                f"the last good checkpoint is {self.out / 'checkpoints' / str(self.last_checkpoint)}"
                if self.last_checkpoint is not None
                else "no checkpoint was written before it"
            )
            raise TrainingError(
                f"loss became non-finite ({records[-1]['loss']}) at step {bad_step}; stopped, "
                f"{kept} (try a lower --learning-rate)"
            )
        return records

    # --------------------------------------------------------------- plots

    def plot(self) -> None:
        if not self.cfg.plots or not self.writer or not self.metrics_path.exists():
            return
        from ._plots import plot_metrics

        plot_metrics(self.metrics_path, self.out)


def _install_stop_handler(run: Run):
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, exit. Second: stop at once."""
    previous = {}

    def handler(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\nstopping: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_handlers(previous) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def train(
    run: Run,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    stepper: _Stepper,
    dataset: TokenDataset,
    extra_state: dict[str, Any],
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Shared loop: resume, evaluate, step, log, checkpoint, plot, summarise.

    With a `mesh`, the model and optimizer state are placed on it after any resumption
    (checkpoints hold whole host arrays, so a run resumes on any mesh) and every batch
    is split over its `data` axis.
    """
    cfg = run.cfg
    batches = _Batches(dataset.train, cfg, None if mesh is None else process_rows(mesh, cfg.batch_size))
    val = _val_batches(cfg, dataset)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model = shard_model(model, mesh)
        opt_state = shard_opt_state(opt_state, model, mesh)
    checkpointer = Checkpointer(run.out, keep=cfg.keep_checkpoints)
    start = 0
    latest = checkpointer.latest()
    if latest is not None:
        # read straight onto this run's placement (any mesh, whatever wrote it)
        model, opt_state, state = checkpointer.restore(latest, model, opt_state)
        batches.restore(state["data"])
        start = state["step"]
        run.last_checkpoint = start
        run.truncate_metrics(start)
        print(f"resuming from {checkpointer.path(latest)} (step {start})", file=sys.stderr)
    else:
        run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        run.metrics_path.write_text("")
    if run.writer:
        write_json(run.out / "config.json", {"command": run.kind, **cfg.to_dict()})
    run.open_writers()

    def save(step: int) -> None:
        # asynchronous: returns once the arrays are off the devices, written meanwhile
        state = {"data": batches.state(), "config": cfg.to_dict(), "kind": run.kind, **extra_state}
        checkpointer.save(step, model, opt_state, state)
        run.last_checkpoint = step

    def do_eval(step: int) -> dict[str, float]:
        record = {"eval/student_loss": evaluate(model, val, mesh)}
        if stepper.eval_teacher is not None:
            record["eval/teacher_loss"] = stepper.eval_teacher
        return record

    if start == 0:
        run.write_lines([{"step": 0, **do_eval(0)}])
    tokens_per_step = cfg.batch_size * cfg.seq_len
    previous = _install_stop_handler(run)
    progress = None
    if cfg.progress and run.writer:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=start, desc=run.kind, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    try:
        since = time.perf_counter()
        step = start
        last_record: dict = {}
        while step < cfg.steps and not run.stop_requested:
            batch = next(batches)
            if mesh is None:
                tokens, mask, segment_ids = (jnp.asarray(array) for array in batch)
            else:  # this process's rows of the global batch
                tokens, mask, segment_ids = shard_local_batch(mesh, cfg.batch_size, *batch)
            model, opt_state, metrics = stepper.step(model, opt_state, tokens, mask, segment_ids, step)
            step += 1
            if run.pending:
                # steps are dispatched asynchronously: keep one step queued behind the
                # running one (the host prepares the next batch meanwhile) rather than
                # racing ahead, so the progress bar and Ctrl-C follow the device
                jax.block_until_ready(run.pending[-1][1]["loss"])
            run.pending.append((step, metrics))
            first = step == start + 1
            is_eval = step % cfg.eval_every == 0 or step == cfg.steps
            is_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps or run.stop_requested
            if first or step % cfg.log_every == 0 or is_eval or is_checkpoint:
                # the window ends when the device has finished its steps (dispatch is
                # asynchronous), and the next one starts after evaluation, logging and
                # checkpointing: windows cover all training time and nothing else
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                fields: dict = {}
                if first:  # the first step compiles: a compile-inclusive rate means nothing
                    fields = {"compile_s": now - since, "tokens_per_s": None}
                if is_eval:
                    fields.update(do_eval(step))
                records = run.flush(now, since, tokens_per_step, fields)
                last_record = records[-1]
                if is_checkpoint:
                    save(step)
                since = time.perf_counter()
            if progress is not None:
                progress.update(1)
                if last_record:
                    shown = {"loss": f"{last_record.get('loss', float('nan')):.4f}"}
                    if last_record.get("tokens_per_s"):
                        shown["tok/s"] = f"{last_record['tokens_per_s']:.0f}"
                    if "eval/student_loss" in last_record:
                        shown["eval"] = f"{last_record['eval/student_loss']:.4f}"
                    progress.set_postfix(shown, refresh=False)
        if run.stop_requested and run.last_checkpoint != step:
            # the request came between the checks of the last step: save it now
            run.flush(time.perf_counter(), since, tokens_per_step)
            save(step)
    finally:
        if progress is not None:
            progress.close()
        checkpointer.close()  # the last save is on disk before the run returns
        _restore_handlers(previous)
        run.close_writers()
        run.plot()
    if run.stop_requested and step < cfg.steps:
        raise KeyboardInterrupt(
            f"interrupted at step {step}: checkpoint written to {run.out / 'checkpoints' / str(step)}; "
            "rerun the same command to resume"
        )
    return {"model": model, "step": step, "evals": _read_evals(run)}


def _read_evals(run: Run) -> dict[int, dict]:
    evals = {}
    for line in run.metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "eval/student_loss" in record:
            evals[record["step"]] = record
    return evals


def _prepare_out(cfg: RunConfig, default: str) -> pathlib.Path:
    out = pathlib.Path(cfg.out or default)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def _report(summary: dict) -> None:
    for line in summary["lines"]:
        print(line)


# ----------------------------------------------------------------------------- pretrain


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train a model from scratch with next-token cross-entropy (`blockdistill pretrain`)."""
    out = _prepare_out(cfg, "runs/pretrain")
    tokenizer = ByteTokenizer()
    dataset = _open_dataset(cfg, tokenizer)
    _batch_size_check(cfg, dataset)
    model_cfg = TransformerConfig(
        vocab_size=tokenizer.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, mlp_dim=cfg.mlp_dim, max_seq_len=cfg.seq_len,
        rope_theta=cfg.rope_theta, tie_embeddings=cfg.tie_embeddings,
        scan_layers=cfg.scan_layers, remat=cfg.remat, dtype=cfg.dtype,
        attention_impl=cfg.attention_impl,
    )
    run = Run(cfg, out, "pretrain")
    if (checkpoint := run.newest_checkpoint()) is not None:
        cfg = run.cfg = run.check_resumable(checkpoint)
    flops = pretrain_flops(model_cfg, seq_len=cfg.seq_len, batch=cfg.batch_size)
    run.step_flops = lambda index: flops
    run_tokenizer(out, tokenizer)
    model = Transformer(model_cfg, key=jax.random.key(cfg.seed))
    optimizer = make_optimizer(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    step = compiled_step(_pretrain_step, optimizer=optimizer)

    def run_step(model, opt_state, tokens, mask, segment_ids, index):
        return step((tokens, mask, segment_ids), model, opt_state)

    result = train(run, model, optimizer, _Stepper(run_step, None), dataset,
                   {"model_config": model_cfg.to_dict()})
    model = result["model"]
    evals = result["evals"]
    final = evals[max(evals)]["eval/student_loss"]
    save_model(model, out / "model", tokenizer=tokenizer, extra={"eval_loss_nats_per_token": final,
                                            "eval_bits_per_byte": final / math.log(2)})
    lines = [
        f"pretrained {model_cfg.n_layers} layers x {model_cfg.dim} wide "
        f"({_count_params(model) / 1e6:.2f}M parameters) for {result['step']} steps",
        f"eval loss {final:.4f} nats/token = {final / math.log(2):.4f} bits/byte; model saved to {out / 'model'}",
    ]
    summary = {"eval_loss": final, "lines": lines}
    _report(summary)
    return summary


def _pretrain_step(batch, model, opt_state, *, optimizer):
    tokens, mask, segment_ids = batch

    def loss_fn(model):
        logits = jax.vmap(lambda t, seg: model(t, segment_ids=seg).logits)(tokens, segment_ids)
        return next_token_cross_entropy(logits, tokens, mask, segment_ids)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    return model, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def _count_params(model: eqx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


# ----------------------------------------------------------------------------- distill


def load_teacher_and_student(cfg: DistillConfig, dataset: TokenDataset) -> tuple[Teacher, Transformer]:
    """The frozen teacher and the initial student the config describes."""
    from ._io import load_model
    from ._prune import make_student

    exec_opts = dict(
        scan_layers=cfg.scan_layers, remat=cfg.remat, dtype=cfg.dtype, attention_impl=cfg.attention_impl
    )
    teacher_model = load_model(cfg.teacher, **exec_opts)
    if teacher_model.config.vocab_size < dataset.tokenizer.vocab_size:
        raise ConfigError(
            f"teacher vocab_size {teacher_model.config.vocab_size} is smaller than the "
            f"tokenizer's {dataset.tokenizer.vocab_size}"
        )
    if cfg.seq_len > teacher_model.config.max_seq_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} is longer than the teacher's max_seq_len={teacher_model.config.max_seq_len}"
        )
    if cfg.student is not None:
        student = load_model(cfg.student, **exec_opts)
        t, s = teacher_model.config, student.config
        if t.dim != s.dim:
            raise ConfigError(f"teacher width dim={t.dim} != student width dim={s.dim} ({cfg.student})")
        if t.vocab_size != s.vocab_size:
            raise ConfigError(
                f"teacher vocab_size={t.vocab_size} != student vocab_size={s.vocab_size} ({cfg.student})"
            )
        return Teacher(teacher_model), student
    student_cfg = student_config(cfg)
    calibration, calibration_mask, calibration_segments = (
        jnp.asarray(array) for array in dataset.train.materialize(cfg.calibration_batches * cfg.batch_size)
    )
    student = make_student(
        teacher_model, student_cfg, calibration, calibration_mask=calibration_mask,
        calibration_segment_ids=calibration_segments, key=jax.random.key(cfg.seed),
    )
    return Teacher(teacher_model), student


def student_config(cfg: DistillConfig) -> StudentConfig:
    """The `StudentConfig` of a run that builds its student from the teacher."""
    return StudentConfig(
        init=cfg.student_init, mlp_ratio=cfg.mlp_ratio, layers=cfg.student_layers,
        n_layers=cfg.student_n_layers, kv_heads_ratio=cfg.kv_heads_ratio, seed=cfg.seed,
    )


def mean_step_flops(cfg: DistillConfig) -> float:
    """Analytic training FLOPs per step of a run, averaged over its steps (a `staged`
    run's two stages weighted by their lengths); reads only the teacher's config."""
    from ._io import read_model_config, shipped_teacher_path
    from ._prune import student_config_for

    if cfg.student is not None:
        raise ConfigError("mean_step_flops needs a student built from the teacher (student=None)")
    teacher = read_model_config(shipped_teacher_path() if cfg.teacher == "shipped" else cfg.teacher)
    student = student_config_for(teacher, student_config(cfg))
    objectives = stage_objectives(cfg)
    total = sum(
        step_flops(objectives[stage_of(cfg, i)], teacher, student, seq_len=cfg.seq_len, batch=cfg.batch_size, step=i)
        for i in range(cfg.steps)
    )
    return total / cfg.steps


def _gap_line(closed: float, final: float, teacher_loss: float) -> str:
    if not math.isfinite(closed):
        return "gap closed: n/a (the initial student was not worse than the teacher)"
    line = f"closed {closed:.1%} of the gap between the initial student and the teacher"
    if closed > 1.0:  # label cross-entropy can teach the data beyond a weak teacher
        line += f": the student ends {teacher_loss - final:.4f} below the teacher"
    return line


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """The main job (`blockdistill distill`): see the docs' tutorial for what it writes."""
    out = _prepare_out(cfg, "runs/distill")
    mesh = None if cfg.mesh is None else make_mesh(cfg.mesh)
    if mesh is not None:
        check_mesh(mesh, batch_size=cfg.batch_size)
    tokenizer = load_tokenizer(cfg.teacher)
    run = Run(cfg, out, "distill")
    if (checkpoint := run.newest_checkpoint()) is not None:
        cfg = run.cfg = run.check_resumable(checkpoint)
    dataset = _open_dataset(cfg, tokenizer)
    _batch_size_check(cfg, dataset)
    teacher, student = load_teacher_and_student(cfg, dataset)
    objectives, steps = distill_steps(cfg, mesh)
    optimizer = steps[0].optimizer
    if objectives[0].uses_teacher:
        objectives[0].resolve_layer_map(teacher.config.n_layers, student.config.n_layers)
    if mesh is not None:
        check_mesh(mesh, batch_size=cfg.batch_size, n_layers=student.config.n_layers)
        # the teacher stays whole on every device: scanning a layer-sharded teacher would
        # all-gather its whole stack every step (see docs/scaling.md)
        teacher = shard_model(teacher, mesh, shard_layers=False)

    def run_step(model, opt_state, tokens, mask, segment_ids, index):
        # a staged run switches programs at a step: each stage compiles only its passes
        return steps[stage_of(cfg, index)](model, opt_state, teacher, tokens, mask, index, segment_ids=segment_ids)

    run.step_flops = lambda index: step_flops(
        objectives[stage_of(cfg, index)], teacher.config, student.config,
        seq_len=cfg.seq_len, batch=cfg.batch_size, step=index,
    )

    run_tokenizer(out, tokenizer)
    val = _val_batches(cfg, dataset)
    teacher_loss = evaluate(teacher.model, val, mesh)
    result = train(run, student, optimizer, _Stepper(run_step, teacher_loss), dataset,
                   {"student_config": student.config.to_dict()}, mesh)
    student = host_arrays(result["model"]) if mesh is not None else result["model"]
    evals = result["evals"]
    initial = evals[0]["eval/student_loss"] if 0 in evals else float("nan")
    final = evals[max(evals)]["eval/student_loss"]
    gap = initial - teacher_loss
    closed = (initial - final) / gap if gap > 0 else float("nan")
    if run.writer:
        save_model(student, out / "student", tokenizer=tokenizer, extra={
            "teacher": cfg.teacher, "eval_loss_nats_per_token": final, "teacher_eval_loss": teacher_loss,
        })
    scfg, tcfg = student.config, teacher.config
    ratio = _count_params(student) / _count_params(teacher.model)
    lines = [
        f"teacher: {tcfg.n_layers} layers, mlp {tcfg.mlp_dim}, kv heads {tcfg.n_kv_heads}; "
        f"student: {scfg.n_layers} layers, mlp {scfg.mlp_dim}, kv heads {scfg.n_kv_heads} "
        f"({ratio:.0%} of the teacher's parameters)",
        f"eval loss (nats/token): teacher {teacher_loss:.4f} | student at step 0 {initial:.4f} "
        f"-> step {result['step']} {final:.4f}",
        _gap_line(closed, final, teacher_loss),
        f"student saved to {out / 'student'}; metrics in {run.metrics_path}; plots in {out}",
    ]
    summary = {"teacher_loss": teacher_loss, "initial_loss": initial, "final_loss": final,
               "gap_closed": closed, "lines": lines}
    if run.writer:
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "lines"})
    _report(summary)
    return summary


# ----------------------------------------------------------------------------- eval


def evaluate_command(cfg: EvalConfig) -> dict[str, Any]:
    """`blockdistill eval`: held-out loss of a model (nats/token and bits/byte)."""
    from ._io import load_model

    model = load_model(cfg.model, dtype=cfg.dtype)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    dataset = _open_dataset(cfg, tokenizer)
    val = _val_batches(cfg, dataset)
    loss = evaluate(model, val)
    line = f"{cfg.model}: eval loss {loss:.4f} nats/token"
    if isinstance(tokenizer, ByteTokenizer):
        line += f" = {loss / math.log(2):.4f} bits/byte"
    print(line)
    return {"eval_loss": loss}


__all__ = ["distill", "evaluate", "evaluate_command", "pretrain", "read_model_config"]
