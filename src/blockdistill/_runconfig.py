"""Configuration of the `blockdistill` commands: frozen dataclasses, TOML files and flags.

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
import difflib
import os
import re
import pathlib
import tomllib
import types
import typing
from typing import Any

import optax
from jax.sharding import Mesh

from ._config import TransformerConfig, check_execution
from ._objective import DistillationObjective
from ._parallel import LAYERS_AXIS, parse_mesh
from ._prune import StudentConfig
from ._train import TRAINABLE, DistillStep, make_optimizer

_SCHEDULES = ("constant", "linear", "cosine", "staged")
_WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it)."""


#: field -> (section, key in the section): the name the library object gives the option
#: (fields not listed are `[run]` fields under their own name)
_SECTIONS: dict[str, tuple[str, str]] = {
    **{name: ("data", key) for name, key in (
        ("data", "path"), ("data_glob", "glob"), ("token_cache", "cache"), ("val_fraction", "val_fraction"),
        ("seq_len", "seq_len"), ("batch_size", "batch_size"))},
    **{name: ("optimizer", name) for name in (
        "learning_rate", "warmup_steps", "weight_decay", "clip_norm", "schedule_steps", "trainable")},
    **{name: ("model", name) for name in (
        "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "rope_theta", "tie_embeddings",
        "scan_layers", "remat", "dtype", "attention_impl")},
    "model": ("model", "path"),
    "tokenizer": ("model", "tokenizer"),
    "teacher": ("teacher", "path"),
    "teacher_cache": ("teacher", "cache"),
    **{name: ("cache", name) for name in ("top_k", "cache_dtype", "seeds")},
    **{name: ("search", name) for name in (
        "budget", "score", "mlp_ratios", "kv_heads", "drop_attention", "drop_mlp", "linear", "identity",
        "candidates_per_step")},
    **{name: ("student", key) for name, key in (
        ("student", "path"), ("student_init", "init"), ("mlp_ratio", "mlp_ratio"), ("student_layers", "layers"),
        ("student_n_layers", "n_layers"), ("kv_heads_ratio", "kv_heads_ratio"),
        ("calibration_batches", "calibration_batches"))},
    **{name: ("objective", name) for name in (
        "blockwise_weight", "blockwise_schedule", "blockwise_weight_end", "blockwise_steps", "temperature",
        "feature_loss", "inject_at", "label_weight", "teacher_weight", "injected_pass", "fused", "cached_kl", "logit_chunk")},
}


#: what each option means: the flags' help, and the tables of docs/cli.md (a test keeps them equal)
HELP: dict[str, str] = {
    'out': 'the run folder',
    'data': "text file, folder, glob or JSONL (`text` field); default: the `.py` files of the running Python's standard library",
    'data_glob': 'file pattern when `data` is a folder',
    'token_cache': 'where corpora are tokenized to, once (token stores)',
    'val_fraction': 'documents held out for evaluation (chosen by a hash of their path)',
    'seq_len': 'tokens per sequence',
    'batch_size': 'sequences per step',
    'steps': 'training steps',
    'schedule_steps': 'the horizon of the learning-rate and blockwise schedules',
    'extend': 'resume the run in `out` with more `steps`, keeping its schedules',
    'eval_every': 'evaluate every N steps (and at step 0 and at the end)',
    'eval_batches': 'held-out batches per evaluation (rows spread evenly over the held-out split, the same every time)',
    'checkpoint_every': 'checkpoint every N steps (and at the end)',
    'keep_checkpoints': 'newest checkpoints kept',
    'log_every': 'fetch metrics from the device and append them every N steps',
    'seed': 'data order, initialisation',
    'learning_rate': 'peak learning rate of AdamW (linear warm-up, cosine decay to a tenth)',
    'warmup_steps': 'warm-up steps',
    'weight_decay': "AdamW's decoupled weight decay",
    'clip_norm': 'global gradient-norm clipping',
    'scan_layers': '`jax.lax.scan` over layers (false: unrolled loop)',
    'remat': '`none`, `full` or `dots` (rematerialise layers in the backward pass)',
    'dtype': 'compute dtype (`bfloat16` for accelerators; parameters stay float32)',
    'attention_impl': 'attention kernel: `xla`, `blocked`, `cudnn` or `auto` (blocked on CPU, cuDNN on GPU in bf16/fp16); all compute the same attention',
    'progress': 'show the progress bar',
    'plots': 'write the PNG plots',
    'tensorboard': 'also write the metrics as TensorBoard scalars to `out/tensorboard/`',
    'wandb': 'also log the metrics to Weights & Biases',
    'wandb_project': 'the W&B project',
    'wandb_mode': '`online`, `offline` (sync later with `wandb sync`) or `disabled`',
    'dim': 'width',
    'n_layers': 'depth',
    'n_heads': 'query heads',
    'n_kv_heads': 'key/value heads',
    'mlp_dim': 'MLP width',
    'rope_theta': 'RoPE base',
    'tie_embeddings': 'share the embedding with the output head',
    'teacher': 'a blockdistill model folder, a Hugging Face folder, or `shipped`',
    'teacher_cache': "a teacher cache from `blockdistill cache-teacher`: steps without a blockwise term read the teacher's top-k logits from it and do not run the teacher (see [Teacher cache](teacher_cache.md))",
    'cached_kl': "the KL against the cache: `tail` (top-k plus one tail bucket; never above the dense KL) or `renormalized` (both renormalised over the top-k)",
    'logit_chunk': 'compute the head, KL and CE over this many positions at a time (no full `[batch, seq, vocab]` float32 logits in the step; the same numbers); default: all at once',
    'top_k': 'teacher ids kept per position',
    'cache_dtype': "`float16` or `bfloat16`: the stored log-probabilities' type",
    'seeds': 'with `steps`: the seeds of the runs whose rows are cached (comma-separated)',
    'student': 'start from this model folder instead of deriving a student from the teacher',
    'student_init': "`prune` (copy the teacher's weights, then shrink) or `random`",
    'mlp_ratio': 'fraction of MLP channels kept (ranked by mean activation on a calibration batch)',
    'student_layers': '`all`, `group` (student layer j starts from the first teacher layer of group j) or `every-k`',
    'student_n_layers': "the student's depth with `group` / `every-k`",
    'kv_heads_ratio': 'fraction of KV heads kept (adjacent heads merged by averaging)',
    'calibration_batches': 'batches used to rank MLP channels (training rows spread evenly over the corpus)',
    'blockwise_weight': 'the mixing weight `w` (at the start of its schedule)',
    'blockwise_schedule': '`constant`, `linear` or `cosine` from `blockwise_weight` to `blockwise_weight_end`; or `staged`: `blockwise_weight` without label CE until step `blockwise_steps`, then `blockwise_weight_end` with `label_weight` (with `blockwise_weight` 1 and the default end 0: blockwise alone, then KD, plus CE when `label_weight` > 0; each stage compiles only its own passes, so no step runs two)',
    'blockwise_weight_end': '`w` at the end of the schedule',
    'blockwise_steps': 'length of the schedule; for `staged`, the step of the switch',
    'temperature': 'KL temperature `T`',
    'feature_loss': '`cosine`, `l2` or `nmse`',
    'inject_at': '`layer` (whole blocks) or `attention` (MaxText mode)',
    'label_weight': "weight of next-token cross-entropy on the data's labels",
    'teacher_weight': 'scales both teacher terms (KL and blockwise); `0` with `label_weight` > 0 trains on the labels alone, the no-teacher control (the teacher then only sets the eval gap)',
    'injected_pass': "`vmap`, `scan` or `auto` (the unfused path's injected pass)",
    'fused': "`on`, `off` or `auto`: run teacher and student layer by layer in one scan (see `DistillStep`'s `fused`; the same numbers, flat memory in depth); `auto` fuses wherever it applies",
    'trainable': '`all`, `attention`, `mlp` or `attention+mlp`',
    'coordinator': "`HOST:PORT` of process 0's coordinator for a multi-process run (`jax.distributed`); default: `$JAX_COORDINATOR_ADDRESS`, else one process",
    'num_processes': 'processes of a multi-process run (default: `$JAX_NUM_PROCESSES`)',
    'process_id': "this process's index in a multi-process run, 0 to num_processes - 1 (default: `$JAX_PROCESS_ID`)",
    'mesh': 'a device mesh such as `data=2,layers=4` or `data=2,fsdp=4` (see [Scaling](scaling.md))',
    'budget': "what the searched student may cost, as fractions of the teacher's: `params=F` (all parameters), `kv_bytes=F` (KV cache per token), `flops=F` (forward FLOPs per token), comma-separated to bound several at once",
    'score': "what the assembly minimises, summed over layers: `kl` (the teacher's KL with only that block swapped in, Puzzle's) or `blockwise` (the block's own held-out loss)",
    'mlp_ratios': "the candidates' MLP widths, as fractions of the teacher's (comma-separated)",
    'kv_heads': "the candidates' KV head counts (comma-separated); default: the teacher's n, n/2 and 1",
    'drop_attention': 'also offer every MLP width without attention',
    'drop_mlp': 'also offer every attention choice without an MLP',
    'linear': 'also offer the whole layer as a linear map (from the identity)',
    'identity': 'also offer removing the layer',
    'candidates_per_step': "train the candidates in groups of this many, one compiled program per group on the same teacher states: the same numbers, with one group's activations in memory instead of every candidate's; default: all in one program",
    'model': 'the model folder to evaluate (blockdistill or Hugging Face), or `shipped`',
    'tokenizer': 'the tokenizer folder (or `byte`); default: the one the model folder recorded',
}


def section_of(name: str) -> tuple[str, str]:
    """`(section, key)` of a config field in a TOML file."""
    return _SECTIONS.get(name, ("run", name))


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(`int`, True) for `int | None`; (`int`, False) for `int`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def coerce(cls, name: str, value: Any, source: str) -> Any:
    """Check and convert one value for field `name` of `cls`; errors name the key."""
    types_ = _field_types(cls)
    base, optional = _base_type(types_[name])
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(f"{source}: {name} must be a {base.__name__}, got {value!r}")
    return value


def _unknown_key(cls, key: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def load_toml(cls, path: str | os.PathLike) -> dict[str, Any]:
    """Read a sectioned TOML file into checked `{field: value}` for `cls`; a key in the
    wrong section, outside any section or unknown is an error naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    fields = [f.name for f in dataclasses.fields(cls)]
    where = {section_of(name): name for name in fields}
    sections = sorted({section for section, _ in where})
    source = f"config file {path}"
    out: dict[str, Any] = {}
    for top, value in data.items():
        if not isinstance(value, dict):
            if top in fields:
                section, key = section_of(top)
                raise ConfigError(f"{source}: {top!r} must be in section [{section}] (as {key} = ...)")
            raise _unknown_key(cls, top, source)
        if top not in sections:
            raise ConfigError(f"{source}: unknown section [{top}] (sections: {', '.join(sections)})")
        for key, item in value.items():
            name = where.get((top, key))
            if name is None:
                elsewhere = sorted(s for s, k in where if k == key)
                if elsewhere:
                    raise ConfigError(f"{source}: {key!r} belongs in section [{elsewhere[0]}], not [{top}]")
                keys = [k for s, k in where if s == top]
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r} in [{top}]{hint}")
            out[name] = coerce(cls, name, item, f"{source} [{top}]")
    return out


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


def check_processes(cfg: Any) -> None:
    """The multi-process options fit together (a `ConfigError` naming them otherwise)."""
    given = [cfg.coordinator is not None, cfg.num_processes is not None, cfg.process_id is not None]
    if any(given) and not all(given):
        raise ConfigError(
            f"coordinator={cfg.coordinator!r}, num_processes={cfg.num_processes!r}, process_id={cfg.process_id!r}: "
            "a multi-process run needs all three (or none, to read $JAX_COORDINATOR_ADDRESS, "
            "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID)"
        )
    if cfg.num_processes is not None and cfg.num_processes <= 0:
        raise ConfigError(f"num_processes={cfg.num_processes!r} is invalid: must be positive")
    if cfg.process_id is not None and not 0 <= cfg.process_id < (cfg.num_processes or 1):
        raise ConfigError(f"process_id={cfg.process_id!r} is invalid: must be in [0, num_processes={cfg.num_processes})")
    if cfg.coordinator is not None and not re.fullmatch(r"[^:\s]+:[0-9]+", cfg.coordinator):
        raise ConfigError(f"coordinator={cfg.coordinator!r} is invalid: expected HOST:PORT")


def _positive(owner: Any, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}={value!r} is invalid: must be positive")


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

    # the main job's defaults: about 2.5 minutes on 2 CPU cores with the shipped teacher; the
    # recipe (layer-level cosine blockwise + 0.5 label cross-entropy) is the best of the
    # quality study for the default student (docs/quality.md)
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
    # the main job's recipe, from the quality study (docs/quality.md): logit KD alone
    blockwise_weight: float = 0.0
    blockwise_schedule: str = "constant"
    blockwise_weight_end: float = 0.0
    blockwise_steps: int | None = None
    temperature: float = 1.0
    feature_loss: str = "cosine"
    inject_at: str = "layer"
    label_weight: float = 0.0
    teacher_weight: float = 1.0
    injected_pass: str = "auto"
    fused: str = "auto"
    trainable: str = "all"
    mesh: str | None = None
    teacher_cache: str | None = None
    cached_kl: str = "tail"
    logit_chunk: int | None = None

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "calibration_batches", "blockwise_steps")
        # the end of the weight's schedule (the schedule is built here, not by the library)
        if not 0.0 <= self.blockwise_weight_end <= 1.0:
            raise ConfigError(f"blockwise_weight_end={self.blockwise_weight_end!r} is invalid: must be in [0, 1]")
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


_BUDGET_KINDS = ("params", "kv_bytes", "flops")
_SCORES = ("kl", "blockwise")


@dataclasses.dataclass(frozen=True)
class SearchConfig(DataOptions):
    """Options of `blockdistill search` (train a library of candidate blocks for every
    teacher layer, score them, assemble the best student under a budget)."""

    out: str = "runs/search"
    teacher: str = "shipped"
    budget: str = "params=0.5"
    score: str = "kl"
    mlp_ratios: str = "1,0.75,0.5,0.25"
    kv_heads: str | None = None
    drop_attention: bool = True
    drop_mlp: bool = True
    linear: bool = True
    identity: bool = True
    candidates_per_step: int | None = None
    steps: int = 150
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    feature_loss: str = "nmse"
    calibration_batches: int = 4
    eval_batches: int = 4
    checkpoint_every: int = 50
    seed: int = 0
    dtype: str = "float32"
    attention_impl: str = "auto"
    progress: bool = True
    plots: bool = True

    #: what some options mean for this command (the others mean what they mean for `distill`)
    HELP_CHANGES = {"out": "the search folder",
                    "steps": "library training steps (every candidate of every layer learns at each step)",
                    "eval_batches": "held-out batches every candidate is scored on",
                    "learning_rate": "peak learning rate of Adam for every block (linear warm-up, cosine decay to a "
                                     "tenth; no clipping: the blocks train independently)",
                    "feature_loss": "the blocks' loss against the teacher's layer outputs: `nmse` (Puzzle's), "
                                    "`cosine` or `l2`"}
    #: fields a resumed search may change (they do not change what is trained)
    RESUMABLE_CHANGES = frozenset({"out", "budget", "score", "eval_batches", "checkpoint_every", "progress",
                                   "plots", "attention_impl", "token_cache"})

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "steps", "learning_rate", "calibration_batches", "eval_batches", "checkpoint_every",
                  "candidates_per_step")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} is invalid: must be >= 0")
        if self.score not in _SCORES:
            raise ConfigError(f"score={self.score!r} is invalid: must be one of {_SCORES}")
        if self.feature_loss not in ("cosine", "l2", "nmse"):
            raise ConfigError(f"feature_loss={self.feature_loss!r} is invalid: must be 'cosine', 'l2' or 'nmse'")
        _library(check_execution, "none", self.dtype, self.attention_impl, "model")
        self.budgets()
        self.space()

    @property
    def horizon(self) -> int:
        """The number of steps the learning-rate schedule is built for."""
        return self.steps

    def budgets(self) -> dict[str, float]:
        """`budget` as `{kind: fraction of the teacher's}` (a `ConfigError` naming a bad part)."""
        out: dict[str, float] = {}
        for part in self.budget.split(","):
            kind, _, value = part.strip().partition("=")
            if kind not in _BUDGET_KINDS:
                raise ConfigError(f"budget={self.budget!r} is invalid: {kind!r} is not one of {_BUDGET_KINDS} "
                                  "(write e.g. params=0.5)")
            try:
                fraction = float(value)
            except ValueError:
                raise ConfigError(f"budget={self.budget!r} is invalid: {value!r} is not a number") from None
            if not 0 < fraction <= 1:
                raise ConfigError(f"budget={self.budget!r} is invalid: {kind}={value} must be in (0, 1]")
            out[kind] = fraction
        return out

    def space(self):
        """The [`blockdistill.SearchSpace`][] these options describe."""
        from ._search import SearchSpace

        def numbers(name: str, kind: type) -> tuple:
            text = getattr(self, name)
            try:
                return tuple(kind(part) for part in text.split(","))
            except ValueError:
                raise ConfigError(f"{name}={text!r} is invalid: must be comma-separated {kind.__name__}s") from None

        kv = None if self.kv_heads is None else numbers("kv_heads", int)
        return _library(SearchSpace, numbers("mlp_ratios", float), kv, self.drop_attention, self.drop_mlp,
                        self.linear, self.identity)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EvalConfig(DataOptions):
    """Options of `blockdistill eval`."""

    model: str = "shipped"
    tokenizer: str | None = None
    eval_batches: int = 16
    dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "eval_batches")


def build_config(cls, file: str | None, overrides: dict[str, Any]):
    """Defaults < TOML file < flags, each value checked; errors name the key."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(load_toml(cls, file))
    for key, value in overrides.items():
        values[key] = coerce(cls, key, value, "command line")
    return cls(**values)


def add_flags(parser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `cls` (default None: "not given")."""
    import argparse

    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, annotation in _field_types(cls).items():
        if name in skip or name.isupper():
            continue
        base, _ = _base_type(annotation)
        flag = "--" + name.replace("_", "-")
        section, key = section_of(name)
        default = defaults[name]
        shown = "" if default is None else f"default: {str(default).lower() if isinstance(default, bool) else default}; "
        meaning = getattr(cls, "HELP_CHANGES", {}).get(name, HELP[name])
        text = f"{meaning} ({shown}[{section}] {key})".replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, type=base, metavar=base.__name__.upper(), help=text)


def given_flags(namespace, cls) -> dict[str, Any]:
    """The flags of `cls` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}


# ----------------------------------------------------------------------------- library objects
# Each section becomes its library object here, once.


def lr_schedule(cfg: RunConfig | SearchConfig) -> optax.Schedule:
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
    )


def student_config(cfg: DistillConfig) -> StudentConfig:
    """The `StudentConfig` of a run that builds its student from the teacher."""
    return StudentConfig(
        init=cfg.student_init, mlp_ratio=cfg.mlp_ratio, layers=cfg.student_layers,
        n_layers=cfg.student_n_layers, kv_heads_ratio=cfg.kv_heads_ratio, seed=cfg.seed,
    )
