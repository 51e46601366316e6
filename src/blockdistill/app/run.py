"""What every command's run shares: the corpus and its held-out batches, the training
batches and their position, the resume checks (settings, what was read), the metrics
writers, and `fit`, which runs a model's steps through the one
[`Trainer`][blockdistill.app.trainer.Trainer] with its hooks."""

import dataclasses
import functools
import pathlib
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..data.dataset import Batcher, eval_batches
from ..data.packing import Split
from ..data.pipeline import batch_iterator
from ..data.store import PackedRows, TokenDataset, token_dataset
from ..data.tokenizers import (
    Tokenizer,
    read_tokenizer_record,
    save_tokenizer,
    tokenizer_record,
)
from ..distill.losses import next_token_cross_entropy, next_token_pairs
from ..distill.onpolicy import OnPolicy
from ..distill.sparse import TopKLogits, tail_mass_at
from ..distill.step import DistillStep
from ..interop.folders import model_digest
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from ..parallel.sharding import (
    process_rows,
    shard_batch,
    shard_local_batch,
    shard_model,
    shard_opt_state,
)
from .checkpoint import Checkpointer
from .metrics import TensorBoardWriter, WandbWriter
from .options import ConfigError
from .runconfig import CacheConfig, DataOptions, RunConfig, lr_schedule
from .teacher_cache import TeacherCache
from .trainer import (
    CheckpointHook,
    EvalHook,
    MetricsHook,
    NonFiniteHook,
    PlotHook,
    ProgressHook,
    RunFolder,
    StopOnSignal,
    Trainer,
)

# ----------------------------------------------------------------------------- helpers


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


#: the top-k sizes whose tail mass `cache-teacher` reports on the held-out rows
TAIL_KS = (16, 64, 256, 1024, 4096)


@functools.partial(jax.jit, static_argnames=("ks", "temperature"))
def _tail_sums(model: Transformer, tokens, mask, segment_ids, temperature, ks: tuple[int, ...]):
    logits = jax.vmap(lambda t, seg: model(t, segment_ids=seg).logits)(tokens, segment_ids)
    count = jnp.sum(mask.astype(jnp.float32))
    return tail_mass_at(logits, mask, ks, temperature) * count, count


def tail_masses(model: Transformer, batches: list[Split], ks: tuple[int, ...], temperature: float = 1.0,
                mesh: Mesh | None = None) -> dict[int, float]:
    """The model's mean probability mass outside its top `k` over fixed batches, for each
    `k` of `ks` at most its vocabulary (see [`blockdistill.tail_mass_at`][])."""
    ks = tuple(k for k in ks if k <= model.config.vocab_size)
    totals, counts = [], []
    for batch in batches:
        total, count = _tail_sums(model, *_place_batch(mesh, batch), temperature=float(temperature), ks=ks)
        totals.append(total)
        counts.append(count)
    totals, counts = jax.device_get((totals, counts))
    mean = np.sum(totals, axis=0) / max(float(np.sum(counts)), 1.0)
    return {k: float(v) for k, v in zip(ks, mean)}


def _val_batches(cfg: DataOptions, dataset: TokenDataset) -> list[Split]:
    return eval_batches(
        *dataset.val.spread(cfg.eval_batches * cfg.batch_size), batch_size=cfg.batch_size,
        max_batches=cfg.eval_batches, pad_id=dataset.tokenizer.pad_id,
    )


def _eval_rows(cfg: DataOptions, dataset: TokenDataset) -> int:
    """How many held-out rows an evaluation reads (see `_val_batches`)."""
    return min(cfg.eval_batches * cfg.batch_size, len(dataset.val))


def _open_dataset(cfg: DataOptions, tokenizer: Tokenizer) -> TokenDataset:
    """The run's corpus: tokenized once into a token store (reused by later runs), packed
    on demand."""
    show = getattr(cfg, "progress", False) and jax.process_index() == 0
    return token_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, glob=cfg.data_glob,
                         cache=cfg.token_cache, progress=show)


class _Batches:
    """A run's training batches: the Grain pipeline (`batch_iterator`), this process's
    rows of each global batch only; its position is JSON for the checkpoint. A checkpoint
    written before the pipeline (a `Batcher` position) resumes with that `Batcher`."""

    def __init__(self, rows: PackedRows, cfg: RunConfig, share: slice | None, teacher_cache: TeacherCache | None = None):
        self.rows, self.cfg, self.share = rows, cfg, share
        self.iterator = batch_iterator(rows, batch_size=cfg.batch_size, seed=cfg.seed, share=share,
                                       teacher_cache=teacher_cache)
        self.legacy: Batcher | None = None
        self.cached = teacher_cache is not None

    def restore(self, state: dict[str, Any]) -> None:
        if {"epoch", "index"} <= state.keys():
            if self.cached:
                raise ConfigError("this checkpoint predates the Grain pipeline; it cannot resume with a teacher cache")
            self.legacy = Batcher(*self.rows.materialize(), batch_size=self.cfg.batch_size, seed=self.cfg.seed)
            self.legacy.load_state_dict(state)
        else:
            self.iterator.set_state(state)

    def __next__(self) -> Split | tuple[Split, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.legacy is None:
            return next(self.iterator)
        batch = next(self.legacy)
        return Split(*(array[self.share or slice(None)] for array in batch))

    def state(self) -> dict[str, Any]:
        return self.legacy.state_dict() if self.legacy is not None else self.iterator.get_state()


def _batch_size_check(cfg: DataOptions, dataset: TokenDataset) -> None:
    n = len(dataset.train)
    if cfg.batch_size > n:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training split of "
            f"{dataset.source!r} ({n} sequences of {cfg.seq_len} tokens)"
        )
    if len(dataset.val) == 0:
        raise ConfigError(f"corpus {dataset.source!r} leaves no validation sequences (val_fraction={cfg.val_fraction})")


# ----------------------------------------------------------------------------- the run


def check_resumable(cfg: RunConfig, out: pathlib.Path, state: dict[str, Any]) -> RunConfig:
    """The config to resume a run with: the given one, unless it would change what the
    saved run trains (an error that names each change). With `extend`, `steps` may grow
    and the saved run's schedule horizon is kept."""
    saved = state.get("config", {})
    saved_horizon = saved.get("schedule_steps") or saved.get("steps", cfg.steps)
    if cfg.extend:
        if cfg.steps < state["step"]:
            raise ConfigError(
                f"--extend to steps={cfg.steps} is invalid: the checkpoint of {out} is already at "
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
    changed = sorted(k for k in current if k not in ignored and saved.get(k, current[k]) != current[k])
    # a run saved before `schedule_steps` existed had its schedules built from steps
    if "schedule_steps" in changed and cfg.horizon == saved_horizon:
        changed.remove("schedule_steps")
    if changed:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        message = f"{out} holds a run with other settings ({pairs}); "
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
            if "eval_batches" in changed:
                message += (f"eval_batches: the evaluations already in {out / 'metrics.jsonl'} (step 0's among "
                            f"them) were made on {saved.get('eval_batches')} held-out batches; the rest of the "
                            "run, its gap closed and its plots would mix two held-out sets; ")
            message += "use another --out or the same settings to resume it"
        raise ConfigError(message)
    return cfg


def run_inputs(dataset: TokenDataset, *, teacher: str | None = None) -> dict[str, Any]:
    """What a run reads, recorded in its checkpoints and compared when it resumes: the
    corpus's rows ([`TokenDataset.identity`][blockdistill.TokenDataset.identity]) and,
    for a run with a teacher, the digest of the teacher's weights."""
    inputs: dict[str, Any] = {"corpus": dataset.identity()}
    if teacher is not None:
        inputs["teacher"], inputs["teacher_sha256"] = str(teacher), model_digest(teacher)
    return inputs


def check_resumed_inputs(out: pathlib.Path, state: dict[str, Any], inputs: dict[str, Any]) -> None:
    """A `ConfigError` when what the saved run read (`state["inputs"]`, see `run_inputs`)
    is not what the run would read now: the corpus's training or held-out rows changed
    (a resumed run would go on with other batches and evaluate on other rows than at step
    0), or the teacher's folder now holds other weights. A checkpoint written before the
    inputs were recorded is not checked."""
    saved = state.get("inputs")
    if not saved:
        return
    problems = []
    old, new = saved.get("corpus", {}), inputs.get("corpus", {})
    for split, what in (("train", "training"), ("val", "held-out")):
        key = f"{split}_sha256"
        if key in old and old[key] != new.get(key):
            problems.append(f"its {what} rows changed ({old[f'{split}_rows']} rows, sha256 {old[key][:12]} when "
                            f"the run started; now {new[f'{split}_rows']} rows, sha256 {new[key][:12]})")
    if problems:
        problems = [f"the corpus {new.get('source', old.get('source'))!r} is not what the run started on: "
                    + " and ".join(problems)]
    if "teacher_sha256" in saved and "teacher_sha256" in inputs and saved["teacher_sha256"] != inputs["teacher_sha256"]:
        problems.append(f"the teacher {inputs.get('teacher', '')!r} holds other weights (sha256 "
                        f"{saved['teacher_sha256'][:12]} when the run started; now {inputs['teacher_sha256'][:12]})")
    if problems:
        raise ConfigError(f"{out} cannot resume: " + "; ".join(problems) + ". Resuming would train and evaluate on "
                          "other data than its checkpoints and step-0 evaluation; restore what changed, or use "
                          "another --out")


def _writers(cfg: RunConfig, folder: RunFolder) -> list:
    """The TensorBoard and W&B writers the config asks for (process 0 only)."""
    if not folder.writer:
        return []
    writers: list = []
    if cfg.tensorboard:
        writers.append(TensorBoardWriter(folder.out / "tensorboard"))
    if cfg.wandb:
        writers.append(WandbWriter(folder.out, project=cfg.wandb_project, name=folder.out.name,
                                   config={"command": folder.kind, **cfg.to_dict()}, mode=cfg.wandb_mode))
    return writers


def fit(
    cfg: RunConfig,
    folder: RunFolder,
    step: DistillStep | list[DistillStep],
    model: Transformer,
    dataset: TokenDataset,
    *,
    teacher: Teacher | None = None,
    teacher_loss: float | None = None,
    step_flops: Any = None,
    stage_of_step: Any = None,
    extra_state: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    metric_keys: tuple[str, ...] | None = None,
    teacher_cache: TeacherCache | None = None,
    cached_stages: tuple[bool, ...] = (),
    policy: OnPolicy | None = None,
) -> tuple[Transformer, int]:
    """Train `model` with `step` (or one step per stage, chosen by `stage_of_step(index)`)
    for `cfg.steps` steps in `folder`, resuming from its newest checkpoint: the Trainer with
    the metrics, evaluation, non-finite, checkpoint, progress, signal and plot hooks.
    `metric_keys` keeps only those of the step's metrics. With `teacher_cache`, the stages
    marked in `cached_stages` read each batch's teacher logits from it instead of running
    the teacher. With `policy`, the steps it is active in first have part of their batch
    written by the model itself (on-policy distillation; its seconds are the step's
    `gen_seconds` metric, apart from the update's). Returns the trained model (as placed)
    and the step reached."""
    steps = step if isinstance(step, list) else [step]
    optimizer = steps[0].optimizer
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model = shard_model(model, mesh)
        opt_state = shard_opt_state(opt_state, model, mesh)
    batches = _Batches(dataset.train, cfg, None if mesh is None else process_rows(mesh, cfg.batch_size),
                       teacher_cache)
    val = _val_batches(cfg, dataset)
    checkpointer = Checkpointer(folder.out, keep=cfg.keep_checkpoints)
    start, last = 0, None
    latest = checkpointer.latest()
    if latest is not None:
        # read straight onto this run's placement (any mesh, whatever wrote it)
        model, opt_state, state = checkpointer.restore(latest, model, opt_state)
        batches.restore(state["data"])
        start = last = state["step"]
        print(f"resuming from {checkpointer.path(latest)} (step {start})", file=sys.stderr)
    folder.start_metrics(last)
    folder.write_config(cfg.to_dict())

    metrics = MetricsHook(folder, cfg.log_every, _writers(cfg, folder))
    evaluation = EvalHook(cfg.eval_every, lambda m: evaluate(m, val, mesh),
                          {} if teacher_loss is None else {"eval/teacher_loss": teacher_loss})
    checkpoints = CheckpointHook(checkpointer, cfg.checkpoint_every, last=last, state=lambda: {
        "data": batches.state(), "config": cfg.to_dict(), "kind": folder.kind, **(extra_state or {})})
    hooks = [metrics, evaluation, NonFiniteHook(folder, checkpoints), checkpoints, StopOnSignal()]
    if cfg.progress and folder.writer:
        hooks.append(ProgressHook(folder.kind))
    if cfg.plots:
        hooks.append(PlotHook(folder))

    def place(arrays):
        if mesh is None:
            return tuple(jnp.asarray(array) for array in arrays)
        return shard_local_batch(mesh, cfg.batch_size, *arrays)  # this process's rows of the global batch

    sample_key = jax.random.fold_in(jax.random.key(cfg.seed), 0x6F6E)  # resumes with the same samples

    def step_fn(model, opt_state, batch, index):
        cached = None
        if teacher_cache is not None:
            batch, cached = batch
        tokens, mask, segment_ids = place(batch)
        generation = {}
        if policy is not None and policy.active(index):  # the model writes part of its batch
            began = time.perf_counter()
            tokens, mask, segment_ids = jax.block_until_ready(
                policy.mix(model, tokens, mask, segment_ids, step=index, key=sample_key))
            seconds = time.perf_counter() - began
            written = policy.rows(cfg.batch_size) * (cfg.seq_len - policy.prompt_len)
            generation = {"gen_seconds": seconds, "gen_tokens_per_s": written / max(seconds, 1e-9)}
        # a staged run switches programs at a step: each stage compiles only its passes
        stage = stage_of_step(index) if stage_of_step is not None else 0
        chosen = steps[stage]
        if cached is not None and cached_stages[stage]:  # the teacher's logits from the cache
            ids, logprobs, log_tail = place(cached)
            model, opt_state, metrics = chosen(model, opt_state, None, tokens, mask, index, segment_ids=segment_ids,
                                               teacher_logits=TopKLogits(ids, logprobs, log_tail))
        else:
            model, opt_state, metrics = chosen(model, opt_state, teacher, tokens, mask, index, segment_ids=segment_ids)
        if metric_keys is not None:  # the run's own metrics only (pretraining: no teacher terms)
            metrics = {key: metrics[key] for key in metric_keys}
        return model, opt_state, {**metrics, **generation}

    schedule = lr_schedule(cfg)
    flops_prefix = [0.0]

    def record_fields(step_number: int) -> dict[str, float]:
        fields = {"learning_rate": float(schedule(step_number - 1))}  # of the update that led here
        if step_flops is not None:
            while len(flops_prefix) <= step_number:
                flops_prefix.append(flops_prefix[-1] + step_flops(len(flops_prefix) - 1))
            fields["train_flops"] = flops_prefix[step_number]
        return fields

    trainer = Trainer(step_fn, model, opt_state, batches, start=start, steps=cfg.steps,
                      tokens_per_step=cfg.batch_size * cfg.seq_len, hooks=hooks, record_fields=record_fields)
    try:
        if start == 0:
            metrics.write([{"step": 0, **evaluation.record(model)}])
        trainer.run()
    finally:
        metrics.close()  # also when the run failed before its loop started
    if trainer.stop_requested and trainer.step < cfg.steps:
        raise KeyboardInterrupt(
            f"interrupted at step {trainer.step}: checkpoint written to "
            f"{checkpointer.path(trainer.step)}; rerun the same command to resume"
        )
    return trainer.model, trainer.step


def start_processes(cfg: RunConfig | CacheConfig) -> None:
    """Join a multi-process run (`jax.distributed.initialize`) when the config or the
    standard environment variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`) name one; on CPUs the processes' collectives go over Gloo. Must run
    before anything asks JAX for its devices."""
    import os

    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator is None:
        return
    num = cfg.num_processes if cfg.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if num is None or pid is None:
        raise ConfigError(f"coordinator {coordinator!r} given without the number of processes and this "
                          "process's id (--num-processes, --process-id or $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)")
    from jax._src import distributed

    if distributed.global_state.client is not None:  # joined already (e.g. a library caller did)
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=int(num), process_id=int(pid))


def _prepare_out(cfg: RunConfig, default: str) -> pathlib.Path:
    out = pathlib.Path(cfg.out or default)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def _report(summary: dict) -> None:
    for line in summary["lines"]:
        print(line)
