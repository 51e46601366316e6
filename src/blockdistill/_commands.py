"""The commands `blockdistill pretrain`, `distill` and `eval`: each builds its library
objects from the run config (the data, the models, the objective, the optimizer) and runs
them through the one [`Trainer`][blockdistill._trainer.Trainer] with its hooks."""

import dataclasses
import math
import pathlib
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ._cache import TeacherCache, TopKLogits, build_teacher_cache, model_digest
from ._checkpoint import Checkpointer
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
from ._hetero import describe_shapes, parameter_count
from ._store import PackedRows, TokenDataset, batch_iterator, run_rows, token_dataset
from ._metrics import TensorBoardWriter, WandbWriter
from ._model import Transformer
from ._objective import DistillationObjective, next_token_cross_entropy, next_token_pairs
from ._trainer import (
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
from ._parallel import (
    check_mesh,
    host_arrays,
    make_mesh,
    process_rows,
    shard_batch,
    shard_local_batch,
    shard_model,
    shard_opt_state,
)
from ._runconfig import (
    CacheConfig,
    ConfigError,
    DataOptions,
    DistillConfig,
    EvalConfig,
    PretrainConfig,
    RunConfig,
    distill_steps,
    lr_schedule,
    stage_objectives,
    stage_of,
    student_config,
)
from ._teacher import Teacher
from ._train import DistillStep, make_optimizer


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
) -> tuple[Transformer, int]:
    """Train `model` with `step` (or one step per stage, chosen by `stage_of_step(index)`)
    for `cfg.steps` steps in `folder`, resuming from its newest checkpoint: the Trainer with
    the metrics, evaluation, non-finite, checkpoint, progress, signal and plot hooks.
    `metric_keys` keeps only those of the step's metrics. With `teacher_cache`, the stages
    marked in `cached_stages` read each batch's teacher logits from it instead of running
    the teacher. Returns the trained model (as placed) and the step reached."""
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

    def step_fn(model, opt_state, batch, index):
        cached = None
        if teacher_cache is not None:
            batch, cached = batch
        tokens, mask, segment_ids = place(batch)
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
        return model, opt_state, metrics

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


# ----------------------------------------------------------------------------- pretrain


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train a model from scratch with next-token cross-entropy (`blockdistill pretrain`)."""
    out = _prepare_out(cfg, "runs/pretrain")
    start_processes(cfg)
    tokenizer = ByteTokenizer()
    dataset = _open_dataset(cfg, tokenizer)
    _batch_size_check(cfg, dataset)
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    folder = RunFolder(out, "pretrain")
    inputs = run_inputs(dataset)
    if (state := folder.newest_state()) is not None:
        cfg = check_resumable(cfg, out, state)
        check_resumed_inputs(out, state, inputs)
    flops = pretrain_flops(model_cfg, seq_len=cfg.seq_len, batch=cfg.batch_size)
    run_tokenizer(out, tokenizer)
    model = Transformer(model_cfg, key=jax.random.key(cfg.seed))
    # the same update as distillation's, with labels alone (no teacher)
    objective = DistillationObjective(blockwise_weight=0.0, teacher_weight=0.0, label_weight=1.0)
    optimizer = make_optimizer(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    model, reached = fit(cfg, folder, DistillStep(objective, optimizer), model, dataset,
                         step_flops=lambda index: flops, metric_keys=("loss", "grad_norm"),
                         extra_state={"model_config": model_cfg.to_dict(), "inputs": inputs})
    result = {"model": model, "step": reached, "evals": folder.evals()}
    model = result["model"]
    evals = result["evals"]
    final = evals[max(evals)]["eval/student_loss"]
    save_model(model, out / "model", tokenizer=tokenizer, extra={"eval_loss_nats_per_token": final,
                                            "eval_bits_per_byte": final / math.log(2), "step": reached})
    lines = [
        f"pretrained {model_cfg.n_layers} layers x {model_cfg.dim} wide "
        f"({parameter_count(model.config) / 1e6:.2f}M parameters) for {result['step']} steps",
        f"eval loss {final:.4f} nats/token = {final / math.log(2):.4f} bits/byte; model saved to {out / 'model'}",
    ]
    summary = {"eval_loss": final, "lines": lines}
    _report(summary)
    return summary


# ----------------------------------------------------------------------------- distill


def load_teacher_and_student(
    cfg: DistillConfig, dataset: TokenDataset, *, load_teacher: bool = True
) -> tuple[Teacher | None, Transformer]:
    """The frozen teacher and the initial student the config describes. With
    `load_teacher=False` (a run that reads every teacher output from a cache, from a
    given `student` folder) the teacher's weights are not read: `None` comes back, the
    fit of the two checked from the teacher's `config.json`."""
    from ._io import load_model
    from ._prune import make_student

    exec_opts = dict(
        scan_layers=cfg.scan_layers, remat=cfg.remat, dtype=cfg.dtype, attention_impl=cfg.attention_impl
    )
    if not load_teacher and cfg.student is None:
        raise ValueError("a student derived from the teacher needs the teacher's weights (load_teacher=False)")
    teacher_model = load_model(cfg.teacher, **exec_opts) if load_teacher else None
    t = teacher_model.config if teacher_model is not None else read_model_config(cfg.teacher)
    if t.vocab_size < dataset.tokenizer.vocab_size:
        raise ConfigError(
            f"teacher vocab_size {t.vocab_size} is smaller than the tokenizer's {dataset.tokenizer.vocab_size}"
        )
    if cfg.seq_len > t.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the teacher's max_seq_len={t.max_seq_len}")
    teacher = None if teacher_model is None else Teacher(teacher_model)
    if cfg.student is not None:
        student = load_model(cfg.student, **exec_opts)
        s = student.config
        if t.dim != s.dim:
            raise ConfigError(f"teacher width dim={t.dim} != student width dim={s.dim} ({cfg.student})")
        if t.vocab_size != s.vocab_size:
            raise ConfigError(
                f"teacher vocab_size={t.vocab_size} != student vocab_size={s.vocab_size} ({cfg.student})"
            )
        return teacher, student
    student_cfg = student_config(cfg)
    calibration, calibration_mask, calibration_segments = (
        jnp.asarray(array) for array in dataset.train.spread(cfg.calibration_batches * cfg.batch_size)
    )
    student = make_student(
        teacher_model, student_cfg, calibration, calibration_mask=calibration_mask,
        calibration_segment_ids=calibration_segments, key=jax.random.key(cfg.seed),
    )
    return teacher, student


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
    start_processes(cfg)
    mesh = None if cfg.mesh is None else make_mesh(cfg.mesh)
    if mesh is not None:
        check_mesh(mesh, batch_size=cfg.batch_size)
    tokenizer = load_tokenizer(cfg.teacher)
    folder = RunFolder(out, "distill")
    if (state := folder.newest_state()) is not None:
        cfg = check_resumable(cfg, out, state)
    dataset = _open_dataset(cfg, tokenizer)
    _batch_size_check(cfg, dataset)
    inputs = run_inputs(dataset, teacher=cfg.teacher)
    if state is not None:
        run_tokenizer(out, tokenizer)  # another tokenizer is named as such, before the rows it changes
        check_resumed_inputs(out, state, inputs)
    objectives, steps = distill_steps(cfg, mesh)
    teacher_cache, cached_stages, teacher_loss = None, (False,) * len(objectives), None
    if cfg.teacher_cache is not None:
        teacher_cache = open_teacher_cache(cfg, tokenizer, dataset, teacher_sha256=inputs["teacher_sha256"])
        cached_stages = cached_objectives(objectives)
        if not any(cached_stages):
            raise ConfigError(
                f"teacher_cache={cfg.teacher_cache!r}: every step of this recipe has a blockwise term, "
                "which needs the teacher's states (a cache holds only logits): it would never be read"
            )
        teacher_loss = teacher_cache.teacher_eval_loss(_eval_rows(cfg, dataset), dataset.val.digest())
    # the teacher runs in the stages that do not read the cache
    needs_teacher = any(o.uses_teacher and not c for o, c in zip(objectives, cached_stages))
    teacher, student = load_teacher_and_student(
        cfg, dataset, load_teacher=needs_teacher or cfg.student is None or teacher_loss is None
    )
    teacher_config = teacher.config if teacher is not None else read_model_config(cfg.teacher)
    if objectives[0].uses_teacher:
        objectives[0].resolve_layer_map(teacher_config.n_layers, student.config.n_layers)
    if mesh is not None:
        check_mesh(mesh, batch_size=cfg.batch_size, n_layers=student.config.n_layers)

    def flops_of(index: int) -> float:
        stage = stage_of(cfg, index)
        return step_flops(objectives[stage], teacher_config, student.config,
                          seq_len=cfg.seq_len, batch=cfg.batch_size, step=index, cached=cached_stages[stage])

    run_tokenizer(out, tokenizer)
    if teacher_loss is None:
        teacher_loss = evaluate(teacher.model, _val_batches(cfg, dataset), mesh)
    teacher_params = parameter_count(teacher_config)
    if not needs_teacher:
        teacher = None  # loaded only to derive the student or to score it: training never runs it
    elif mesh is not None:
        # the teacher stays whole on every device: scanning a layer-sharded teacher would
        # all-gather its whole stack every step (see docs/scaling.md)
        teacher = shard_model(teacher, mesh, shard_layers=False)
    trained, reached = fit(cfg, folder, steps, student, dataset, teacher=teacher, teacher_loss=teacher_loss,
                           step_flops=flops_of, stage_of_step=lambda index: stage_of(cfg, index),
                           extra_state={"student_config": student.config.to_dict(), "inputs": inputs}, mesh=mesh,
                           teacher_cache=teacher_cache, cached_stages=cached_stages)
    student = host_arrays(trained) if mesh is not None else trained
    result = {"step": reached, "evals": folder.evals()}
    evals = result["evals"]
    initial = evals[0]["eval/student_loss"] if 0 in evals else float("nan")
    final = evals[max(evals)]["eval/student_loss"]
    gap = initial - teacher_loss
    closed = (initial - final) / gap if gap > 0 else float("nan")
    if folder.writer:
        save_model(student, out / "student", tokenizer=tokenizer, extra={
            "teacher": cfg.teacher, "eval_loss_nats_per_token": final, "teacher_eval_loss": teacher_loss,
            "step": reached,
        })
    scfg, tcfg = student.config, teacher_config
    ratio = parameter_count(scfg) / teacher_params
    shape = (f"{scfg.n_layers} layers, mlp {scfg.mlp_dim}, kv heads {scfg.n_kv_heads}" if scfg.layer_shapes is None
             else f"{scfg.n_layers} layers ({describe_shapes(scfg)})")
    lines = [
        f"teacher: {tcfg.n_layers} layers, mlp {tcfg.mlp_dim}, kv heads {tcfg.n_kv_heads}; "
        f"student: {shape} ({ratio:.0%} of the teacher's parameters)",
        f"eval loss (nats/token): teacher {teacher_loss:.4f} | student at step 0 {initial:.4f} "
        f"-> step {result['step']} {final:.4f}",
        _gap_line(closed, final, teacher_loss),
        f"student saved to {out / 'student'}; metrics in {folder.metrics_path}; plots in {out}",
    ]
    if teacher_cache is not None:
        cached_steps = sum(cached_stages[stage_of(cfg, i)] for i in range(cfg.steps))
        lines.insert(3, f"teacher logits read from {teacher_cache.folder} (top {teacher_cache.top_k}, mean tail mass "
                        f"{teacher_cache.mean_tail_mass:.2e}) in {cached_steps} of {cfg.steps} steps")
    summary = {"teacher_loss": teacher_loss, "initial_loss": initial, "final_loss": final,
               "gap_closed": closed, "lines": lines}
    if folder.writer:
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "lines"})
    _report(summary)
    return summary


# ----------------------------------------------------------------------------- teacher cache


def cache_identity(teacher: str, tokenizer: Tokenizer, dataset: TokenDataset,
                   teacher_sha256: str | None = None) -> dict[str, Any]:
    """What a teacher cache is made from, as its `meta` records it and a run compares it:
    the teacher's weights (digest; `teacher_sha256` when already computed), the tokenizer,
    and the training rows themselves (their digest: the corpus's tokens, the split of its
    documents, the sequence length), so that rows which differ under the same count (e.g.
    another `val_fraction`) are another cache."""
    return {
        "teacher": {"sha256": teacher_sha256 or model_digest(teacher)},
        "tokenizer": tokenizer_record(tokenizer),
        "data": {"source": dataset.source, "split": "train", "seq_len": dataset.seq_len,
                 "rows": len(dataset.train), "rows_sha256": dataset.train.digest()},
    }


def cached_objectives(objectives: list[DistillationObjective]) -> tuple[bool, ...]:
    """Which stages' objectives a teacher cache can serve: those that use the teacher's
    logits alone (no blockwise term, which needs the teacher's states)."""
    return tuple(o.uses_teacher and not o.passes(0)[1] for o in objectives)


def open_teacher_cache(cfg: DistillConfig, tokenizer: Tokenizer, dataset: TokenDataset, *,
                       teacher_sha256: str | None = None) -> TeacherCache:
    """The run's teacher cache, checked against its teacher, tokenizer, training rows and
    temperature (a `ConfigError` naming each mismatch)."""
    try:
        cache = TeacherCache(cfg.teacher_cache)
        cache.check({**cache_identity(cfg.teacher, tokenizer, dataset, teacher_sha256),
                     "temperature": float(cfg.temperature)})
        if cache.row_index is not None:  # a cache of some runs' rows: this run must read only those
            cache.positions(run_rows(len(dataset.train), batch_size=cfg.batch_size, steps=cfg.steps, seeds=(cfg.seed,)))
    except KeyError as error:
        raise ConfigError(f"{error.args[0]} (this run: {cfg.steps} steps at batch size {cfg.batch_size}, "
                          f"seed {cfg.seed})") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cache


def cache_teacher(cfg: CacheConfig) -> dict[str, Any]:
    """`blockdistill cache-teacher`: run the teacher once over the corpus's training rows
    and store its top-k log-probabilities (see [`blockdistill.build_teacher_cache`][])."""
    import signal

    from ._cache import bytes_per_token
    from ._io import load_model

    out = pathlib.Path(cfg.out)
    start_processes(cfg)
    mesh = None if cfg.mesh is None else make_mesh(cfg.mesh)
    if mesh is not None:
        check_mesh(mesh, batch_size=cfg.batch_size)
    tokenizer = load_tokenizer(cfg.teacher)
    dataset = _open_dataset(cfg, tokenizer)
    model = load_model(cfg.teacher, dtype=cfg.dtype, attention_impl=cfg.attention_impl)
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the teacher's max_seq_len={model.config.max_seq_len}")
    if cfg.top_k > model.config.vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the teacher's vocabulary ({model.config.vocab_size})")
    stop = []
    handlers = {}

    def request_stop(signum, frame):
        stop.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        handlers[signum] = signal.signal(signum, request_stop)
    row_index, selection = None, "all"
    if cfg.steps is not None:
        _batch_size_check(cfg, dataset)
        row_index = run_rows(len(dataset.train), batch_size=cfg.batch_size, steps=cfg.steps, seeds=cfg.seed_list())
        selection = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seeds": list(cfg.seed_list())}
    try:
        cache = build_teacher_cache(
            model, dataset.train, out, top_k=cfg.top_k, temperature=cfg.temperature, values_dtype=cfg.cache_dtype,
            batch_size=cfg.batch_size, identity=cache_identity(cfg.teacher, tokenizer, dataset), mesh=mesh,
            progress=cfg.progress, should_stop=lambda: bool(stop), row_index=row_index, selection=selection,
        )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if not cache.meta.get("complete"):
        raise KeyboardInterrupt(f"interrupted after {cache.rows_done()} of {cache.num_cached} rows; "
                                "rerun the same command to resume")
    rows, val_sha256 = _eval_rows(cfg, dataset), dataset.val.digest()
    if cache.teacher_eval_loss(rows, val_sha256) is None:
        loss = evaluate(model, _val_batches(cfg, dataset), mesh)  # every process: it is one computation
        if jax.process_index() == 0:
            write_json(out / "meta.json", {**cache.meta, "teacher_eval": {"rows": rows, "val_sha256": val_sha256,
                                                                          "loss": loss}})
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("blockdistill-cache-evaluated")
        cache = TeacherCache(out)
    per_token = bytes_per_token(cfg.top_k, cfg.cache_dtype)
    which = "every training row" if row_index is None else (
        f"the rows of {cfg.steps}-step runs at batch size {cfg.batch_size}, "
        f"seed{'s' if len(cfg.seed_list()) > 1 else ''} {cfg.seeds}")
    lines = [
        f"cached the teacher's top {cfg.top_k} log-probabilities (temperature {cfg.temperature}) for "
        f"{cache.num_cached} of {cache.num_rows} training rows of {cache.seq_len} tokens ({which}) in {out}",
        f"{per_token} bytes per token, {per_token * cache.num_cached * cache.seq_len / 1e6:.1f} MB; "
        f"mean tail mass outside the top {cfg.top_k}: {cache.mean_tail_mass:.2e}",
        f"teacher held-out loss {cache.teacher_eval_loss(rows, val_sha256):.4f} on {rows} rows; distill with "
        f"--teacher-cache {out}",
    ]
    summary = {"rows": cache.num_cached, "bytes_per_token": per_token, "mean_tail_mass": cache.mean_tail_mass,
               "lines": lines}
    _report(summary)
    return summary


# ----------------------------------------------------------------------------- plan


def plan_command(cfg: DistillConfig, device_memory: str | None, argv: list[str] | None = None) -> dict[str, Any]:
    """`blockdistill plan`: per-device memory of the run `cfg` describes, from its step
    compiled on abstract shapes (the teacher's `config.json` alone is read). A mesh of more
    devices than this process has is planned in a child process with as many CPU devices."""
    import os
    import subprocess

    from ._parallel import parse_mesh
    from ._plan import format_bytes, format_count, parse_bytes, plan_memory
    from ._prune import student_config_for

    limit = None if device_memory is None else parse_bytes(device_memory)
    needed = 1 if cfg.mesh is None else math.prod(parse_mesh(cfg.mesh).values())
    if needed > jax.device_count():
        if os.environ.get("BLOCKDISTILL_PLAN_CHILD") or argv is None:
            raise ConfigError(f"mesh={cfg.mesh!r} needs {needed} devices; this process has {jax.device_count()}")
        env = {**os.environ, "BLOCKDISTILL_PLAN_CHILD": "1", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={needed}"}
        done = subprocess.run([sys.executable, "-m", "blockdistill.cli", *argv], env=env)
        if done.returncode:
            raise RuntimeError(f"planning on {needed} CPU devices failed (exit status {done.returncode})")
        return {}
    teacher = read_model_config(cfg.teacher).replace(dtype=cfg.dtype, remat=cfg.remat, scan_layers=cfg.scan_layers,
                                                    attention_impl=cfg.attention_impl)
    if cfg.student is not None:
        student = read_model_config(cfg.student)
    else:
        student = student_config_for(teacher, student_config(cfg))
    student = student.replace(dtype=cfg.dtype, remat=cfg.remat, scan_layers=cfg.scan_layers,
                              attention_impl=cfg.attention_impl)
    if cfg.seq_len > teacher.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the teacher's max_seq_len={teacher.max_seq_len}")
    mesh = None if cfg.mesh is None else make_mesh(cfg.mesh)
    objectives, steps = distill_steps(cfg, mesh)
    top_k, cached = None, (False,) * len(objectives)
    if cfg.teacher_cache is not None:  # the stages that read it plan the step without the teacher
        cache = TeacherCache(cfg.teacher_cache)
        for name, want, have in (("seq_len", cfg.seq_len, cache.seq_len),
                                 ("temperature", float(cfg.temperature), cache.temperature),
                                 ("vocab_size", teacher.vocab_size, cache.meta.get("vocab_size"))):
            if want != have:
                raise ConfigError(f"teacher cache {cache.folder} was made for {name}={have!r}, this run has {want!r}")
        top_k, cached = cache.top_k, cached_objectives(objectives)
    plans = [plan_memory(teacher, student, objective, batch_size=cfg.batch_size, seq_len=cfg.seq_len, mesh=mesh,
                         optimizer=step.optimizer, trainable=cfg.trainable, fused=step.fused, device_memory=limit,
                         teacher_top_k=top_k if from_cache else None)
             for objective, step, from_cache in zip(objectives, steps, cached)]
    worst = max(plans, key=lambda p: p["total"])
    how = "one device" if cfg.mesh is None else cfg.mesh
    lines = [
        f"teacher {cfg.teacher}: {teacher.n_layers} layers x {teacher.dim}, vocab {teacher.vocab_size} "
        f"({format_count(parameter_count(teacher))} parameters); student: {student.n_layers} layers, MLP "
        f"{student.mlp_dim}, {student.n_kv_heads} KV heads ({format_count(parameter_count(student))})",
        f"batch {cfg.batch_size} x {cfg.seq_len}, compute {cfg.dtype}, remat {cfg.remat}, mesh {how}"
        + (f"; teacher logits from {cfg.teacher_cache} (top {top_k}) in {sum(cached)} of {len(plans)} stages"
           if cfg.teacher_cache is not None else "")
        + (f"; the larger of {len(plans)} stages" if len(plans) > 1 else ""),
        "per device:",
        f"  teacher parameters  {format_bytes(worst['teacher_params']):>12}",
        f"  student parameters  {format_bytes(worst['student_params']):>12}",
        f"  optimizer state     {format_bytes(worst['opt_state']):>12}",
        f"  batch               {format_bytes(worst['batch']):>12}",
        f"  temporaries         {format_bytes(worst['temporaries']):>12}   (compiled for {worst['backend']}"
        + ("; an estimate for an accelerator)" if worst["backend"] == "cpu" else ")"),
        f"  total               {format_bytes(worst['total']):>12}"
        + ("" if limit is None else f"   of {format_bytes(limit)}: "
           + ("fits" if worst["fits"] else "DOES NOT FIT")),
    ]
    _report({"lines": lines})
    return worst


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


__all__ = ["cache_teacher", "distill", "plan_command", "evaluate", "evaluate_command", "pretrain", "read_model_config"]
