"""Configuration of the `blockdistill` commands: frozen dataclasses, and the library
objects each run builds from them (schedules, objectives, steps, the student config).

Every option of a command is a field here, and a command-line flag (`--field-name`). In a
TOML file (`--config FILE`) each option lives in the section of the library object it
becomes, under that object's own name for it:

- `[data]`: [`blockdistill.token_dataset`][] (`path`, `glob`, `cache`, `val_fraction`,
  `seq_len`, `batch_size`);
- `[optimizer]`: [`blockdistill.make_optimizer`][] and its learning-rate schedule;
- `[model]`: [`blockdistill.TransformerConfig`][] (pretraining's shape; how models run);
- `[teacher]` and `[student]`: the teacher's folder, the student's folder or its
  [`blockdistill.StudentConfig`][];
- `[objective]`: [`blockdistill.DistillationObjective`][] and the schedule of its weight;
- `[run]`: the run itself (folder, steps, evaluation, checkpoints, logging, mesh).

A key in another section than its own, or outside any section, is an error naming the
right one. Flags override the file. Each section becomes its library object once (the
methods below), and the values are validated there, by the library types.
"""

import dataclasses
import re
from typing import Any, Protocol, runtime_checkable

import optax
from jax.sharding import Mesh

from ..distill.objective import DistillationObjective
from ..distill.onpolicy import OnPolicy
from ..distill.prune import StudentConfig
from ..distill.step import TRAINABLE, DistillStep, make_optimizer
from ..nn.config import TransformerConfig, check_execution
from ..parallel.mesh import LAYERS_AXIS, parse_mesh
from .options import ConfigError, _positive, check_processes, section_of

_SCHEDULES = ("constant", "linear", "cosine", "staged")
_WANDB_MODES = ("online", "offline", "disabled")


def _library(build, *args) -> Any:
    """Build (and so validate) a library object; its `ValueError` becomes a `ConfigError`."""
    try:
        return build(*args)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error) + _option_hint(str(error))) from None


#: the library types whose errors name their own fields, and their sections
_OWNER_SECTIONS = {"StudentConfig": "student", "DistillationObjective": "objective",
                   "TransformerConfig": "model", "model": "model"}


def _option_hint(message: str) -> str:
    """` (--flag / [section] key)` for a library error that names `Owner.field=`."""
    match = re.match(r"(\w+)\.(\w+)=", message)
    if match is None or match.group(1) not in _OWNER_SECTIONS:
        return ""
    section, key = _OWNER_SECTIONS[match.group(1)], match.group(2)
    for name in _all_fields():
        if section_of(name) == (section, key):
            return f" (--{name.replace('_', '-')} / [{section}] {key})"
    return ""


def _all_fields() -> list[str]:
    return [f.name for cls in (DistillConfig, PretrainConfig) for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The `[data]` options every command shares: the corpus and how it is cut into rows."""

    data: str | None = None
    data_glob: str | None = None
    token_cache: str | None = None
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r} is invalid: must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig(DataOptions):
    """Options shared by `blockdistill pretrain` and `blockdistill distill`."""

    out: str | None = None
    steps: int = 300
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "float32"
    attention_impl: str = "auto"
    progress: bool = True
    plots: bool = True
    schedule_steps: int | None = None
    extend: bool = False
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "blockdistill"
    wandb_mode: str = "online"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    #: fields that may change between a run and its resumption (they do not change
    #: what is trained). `steps` is not one of them: the learning-rate and blockwise
    #: schedules are built from it; `extend` resumes with more steps explicitly.
    RESUMABLE_CHANGES = frozenset(
        {"eval_every", "checkpoint_every", "keep_checkpoints",
         "log_every", "progress", "plots", "out", "mesh", "extend", "fused", "attention_impl",
         "tensorboard", "wandb", "wandb_project", "wandb_mode", "token_cache", "logit_chunk",
         "coordinator", "num_processes", "process_id"}
    )

    @property
    def horizon(self) -> int:
        """The number of steps the schedules are built for (`schedule_steps`, else `steps`)."""
        return self.schedule_steps or self.steps

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                  "log_every", "learning_rate", "schedule_steps")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} is invalid: must be >= 0")
        _library(check_execution, self.remat, self.dtype, self.attention_impl, "model")
        if self.wandb_mode not in _WANDB_MODES:
            raise ConfigError(f"wandb_mode={self.wandb_mode!r} is invalid: must be one of {_WANDB_MODES}")
        check_processes(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """Options of `blockdistill pretrain` (train a model from scratch with cross-entropy)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    mlp_dim: int = 768
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        _library(self.model_config, 256)

    def model_config(self, vocab_size: int) -> TransformerConfig:
        """The `[model]` section as the library's `TransformerConfig` (it validates)."""
        return TransformerConfig(
            vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, mlp_dim=self.mlp_dim, max_seq_len=self.seq_len,
            rope_theta=self.rope_theta, tie_embeddings=self.tie_embeddings, scan_layers=self.scan_layers,
            remat=self.remat, dtype=self.dtype, attention_impl=self.attention_impl,
        )


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunConfig):
    """Options of `blockdistill distill` (see the docs' CLI page for each)."""

    # the main job's defaults: about 2.5 minutes on 2 CPU cores with the shipped teacher
    steps: int = 150
    eval_every: int = 50
    checkpoint_every: int = 50
    teacher: str = "shipped"
    student: str | None = None
    student_init: str = "prune"
    mlp_ratio: float = 0.5
    student_layers: str = "all"
    student_n_layers: int | None = None
    kv_heads_ratio: float = 1.0
    calibration_batches: int = 4
    # the main job's recipe: logit KD (the quality study, docs/quality.md) plus 0.5 label
    # cross-entropy (the real-teacher study, docs/real.md): `default_label_weight`
    blockwise_weight: float = 0.0
    blockwise_schedule: str = "constant"
    blockwise_weight_end: float = 0.0
    blockwise_steps: int | None = None
    temperature: float = 1.0
    feature_loss: str = "cosine"
    inject_at: str = "layer"
    label_weight: float | None = None
    teacher_weight: float = 1.0
    injected_pass: str = "auto"
    fused: str = "auto"
    trainable: str = "all"
    mesh: str | None = None
    teacher_cache: str | None = None
    cached_kl: str = "tail"
    logit_chunk: int | None = None
    divergence: str = "kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    # on-policy distillation (GKD): a fraction of each batch written by the student itself
    onpolicy_fraction: float = 0.0
    onpolicy_prompt_len: int | None = None
    onpolicy_temperature: float = 1.0
    onpolicy_top_p: float | None = None
    onpolicy_start: int = 0

    @property
    def blockwise_alone(self) -> bool:
        """Blockwise training alone at every step (constant weight 1): the free-running
        pass, and with it the logit terms, never runs."""
        return self.blockwise_schedule == "constant" and self.blockwise_weight == 1.0

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "calibration_batches", "blockwise_steps")
        if self.onpolicy_fraction > 0:
            if self.label_weight not in (None, 0):
                raise ConfigError(
                    f"onpolicy_fraction={self.onpolicy_fraction} with label_weight={self.label_weight}: the label "
                    "cross-entropy would train the student on its own samples; use label_weight=0 with on-policy "
                    "distillation")
            if self.teacher_cache is not None:
                raise ConfigError(
                    f"onpolicy_fraction={self.onpolicy_fraction} with teacher_cache={self.teacher_cache!r}: the teacher "
                    "must score the student's own sequences, which no cache holds")
            _library(on_policy, self)
        # the end of the weight's schedule (the schedule is built here, not by the library)
        if not 0.0 <= self.blockwise_weight_end <= 1.0:
            raise ConfigError(f"blockwise_weight_end={self.blockwise_weight_end!r} is invalid: must be in [0, 1]")
        if self.label_weight is None:
            object.__setattr__(self, "label_weight", default_label_weight(self))
        if self.teacher_weight == 0 and self.label_weight == 0:
            raise ConfigError(
                "teacher_weight=0 with label_weight=0 leaves nothing to train on: give "
                "label_weight > 0 (labels alone) or teacher_weight > 0"
            )
        choices = {  # the application's own choices; the library objects check the rest
            "blockwise_schedule": _SCHEDULES,
            "fused": ("auto", "on", "off"),
            "trainable": TRAINABLE,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: must be one of {allowed}")
        if self.mesh is not None:
            _library(parse_mesh, self.mesh)
        if self.teacher_cache is not None and self.teacher_weight == 0:
            raise ConfigError(
                f"teacher_cache={self.teacher_cache!r} with teacher_weight=0: a run on the labels alone "
                "never reads the teacher or its cache"
            )
        if self.student is None:
            _library(student_config, self)
        _library(stage_objectives, self)


@dataclasses.dataclass(frozen=True)
class CacheConfig(DataOptions):
    """Options of `blockdistill cache-teacher` (run a teacher once over a corpus's training
    rows and store its top-k logits)."""

    out: str = "runs/teacher-cache"
    teacher: str = "shipped"
    steps: int | None = None
    seeds: str = "0"
    top_k: int = 64
    temperature: float = 1.0
    cache_dtype: str = "float16"
    eval_batches: int = 16
    dtype: str = "float32"
    attention_impl: str = "auto"
    mesh: str | None = None
    progress: bool = True
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    #: what some options mean for this command (the others mean what they mean for `distill`)
    HELP_CHANGES = {"out": "the cache folder",
                    "batch_size": "rows per teacher forward; with `steps`, also the batch size of the runs whose "
                                  "rows are cached",
                    "steps": "cache only the rows that runs of this many steps read (with `batch_size` and "
                             "`seeds`); default: every training row",
                    "eval_batches": "the teacher's held-out loss is measured on eval_batches x batch_size rows and "
                                    "kept in the cache (a run with as many rows reads it instead of loading the teacher)"}

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "eval_batches", "top_k", "temperature", "steps")
        self.seed_list()
        check_processes(self)
        self._check_choices()

    def seed_list(self) -> tuple[int, ...]:
        """`seeds` as integers (a `ConfigError` naming a bad one)."""
        try:
            seeds = tuple(int(part) for part in self.seeds.split(","))
        except ValueError:
            raise ConfigError(f"seeds={self.seeds!r} is invalid: must be comma-separated integers") from None
        if any(not 0 <= seed < 2**32 for seed in seeds):
            raise ConfigError(f"seeds={self.seeds!r} is invalid: each must be in [0, 2**32)")
        return seeds

    def _check_choices(self):
        if self.cache_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"cache_dtype={self.cache_dtype!r} is invalid: must be 'float16' or 'bfloat16'")
        _library(check_execution, "none", self.dtype, self.attention_impl, "model")
        if self.mesh is not None:
            _library(parse_mesh, self.mesh)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- library objects
# Each section becomes its library object here, once.


@runtime_checkable
class ScheduleOptions(Protocol):
    """What a learning-rate schedule is built from: a run's or a search's options."""

    learning_rate: float
    warmup_steps: int

    @property
    def horizon(self) -> int: ...


def lr_schedule(cfg: ScheduleOptions) -> optax.Schedule:
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
    """The step at which a run switches from its first stage to its second: a `staged`
    run's `blockwise_steps` (default half the schedule horizon); with a teacher cache, the
    step at which a `linear` or `cosine` weight reaches 0 (`blockwise_steps`), if the run
    goes on past it (from there it is plain KD, which reads the cache). `None` otherwise."""
    if cfg.blockwise_schedule == "staged":
        return cfg.blockwise_steps if cfg.blockwise_steps is not None else cfg.horizon // 2
    if (cfg.teacher_cache is not None and cfg.blockwise_schedule in ("linear", "cosine")
            and cfg.blockwise_weight > 0 and cfg.blockwise_weight_end == 0):
        end = cfg.blockwise_steps or cfg.horizon
        return end if end < cfg.steps else None
    return None


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


#: label cross-entropy beside logit KD when a run gives no `label_weight`: on SmolLM2-135M,
#: KD + 0.5 CE into the main job's half-MLP student closed more of the gap than KD alone
#: at equal seconds (docs/real.md); on the shipped teacher the two tied (docs/quality.md)
DEFAULT_LABEL_WEIGHT = 0.5


def default_label_weight(cfg: DistillConfig) -> float:
    """The `label_weight` of a run that gives none: `DEFAULT_LABEL_WEIGHT` beside logit KD
    on corpus rows (forward KL; also KD's part of an annealed, mixed or staged recipe), 1
    for labels alone (`teacher_weight` 0), and 0 where the measured recipes ran without
    labels: blockwise training alone (constant weight 1, no free-running pass to carry the
    CE), on-policy rows (the CE would train on the student's own samples) and the other
    divergences."""
    if cfg.teacher_weight == 0:
        return 1.0
    if cfg.blockwise_alone or cfg.onpolicy_fraction > 0 or cfg.divergence != "kl":
        return 0.0
    return DEFAULT_LABEL_WEIGHT


def make_objective(cfg: DistillConfig, stage: int = 0) -> DistillationObjective:
    """The objective of a run (of stage `stage` for a `staged` run).

    `staged` never mixes passes: stage 0 is `w = blockwise_weight` without label CE (with
    the default weight 1, blockwise alone), stage 1 is `w = blockwise_weight_end` with
    the run's `label_weight` (by default `DEFAULT_LABEL_WEIGHT`: KD and CE).
    """
    injected_pass = cfg.injected_pass
    if injected_pass == "auto" and cfg.mesh is not None and parse_mesh(cfg.mesh)[LAYERS_AXIS] > 1:
        # on a layers axis only the vmap pass keeps every block on its own device (a scan
        # over the layer-sharded stack gathers it every step); both give the same losses
        injected_pass = "vmap"
    weight, label_weight = blockwise_schedule(cfg), cfg.label_weight
    if cfg.blockwise_schedule == "staged":
        weight, label_weight = (cfg.blockwise_weight, 0.0) if stage == 0 else (cfg.blockwise_weight_end, cfg.label_weight)
    elif stage == 1:  # a scheduled weight after it reached 0 (`stage_switch`): KD alone
        weight = 0.0
    return DistillationObjective(
        blockwise_weight=weight,
        temperature=cfg.temperature,
        feature_loss=cfg.feature_loss,
        inject_at=cfg.inject_at,
        label_weight=label_weight,
        teacher_weight=cfg.teacher_weight,
        injected_pass=injected_pass,
        cached_kl=cfg.cached_kl,
        logit_chunk=cfg.logit_chunk,
        divergence=cfg.divergence,
        jsd_beta=cfg.jsd_beta,
        skew_alpha=cfg.skew_alpha,
    )


def on_policy(cfg: DistillConfig) -> OnPolicy | None:
    """The run's [`blockdistill.OnPolicy`][] (`None` without on-policy distillation): the
    prompt is half the row unless `onpolicy_prompt_len` says otherwise."""
    if cfg.onpolicy_fraction == 0:
        return None
    prompt_len = cfg.onpolicy_prompt_len if cfg.onpolicy_prompt_len is not None else cfg.seq_len // 2
    policy = OnPolicy(fraction=cfg.onpolicy_fraction, prompt_len=prompt_len, temperature=cfg.onpolicy_temperature,
                      top_p=cfg.onpolicy_top_p, start=cfg.onpolicy_start)
    policy.check(cfg.seq_len, cfg.batch_size)
    return policy


def student_config(cfg: DistillConfig) -> StudentConfig:
    """The `StudentConfig` of a run that builds its student from the teacher."""
    return StudentConfig(
        init=cfg.student_init, mlp_ratio=cfg.mlp_ratio, layers=cfg.student_layers,
        n_layers=cfg.student_n_layers, kv_heads_ratio=cfg.kv_heads_ratio, seed=cfg.seed,
    )
