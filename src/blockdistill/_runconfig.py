"""Configuration of the `blockdistill` commands: frozen dataclasses, TOML files and flags.

Every option of a command is a field here; a TOML file (`--config FILE`) sets any of them
by name, and command-line flags (`--field-name`) override the file.
"""

import dataclasses
import difflib
import os
import pathlib
import tomllib
import types
import typing
from typing import Any

from ._config import _ATTENTION_IMPLS, _DTYPES, _REMAT
from ._layer import INJECT_LEVELS
from ._objective import FEATURE_LOSSES
from ._parallel import parse_mesh
from ._train import TRAINABLE

_SCHEDULES = ("constant", "linear", "cosine", "staged")
_WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it)."""


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
    """Read a TOML file into checked `{field: value}` for `cls` (sections are flattened)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # [section] tables only group keys
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in flat.items():
        if key not in known:
            raise _unknown_key(cls, key, f"config file {path}")
        out[key] = coerce(cls, key, value, f"config file {path}")
    return out


def _positive(owner: Any, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}={value!r} is invalid: must be positive")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Options shared by `blockdistill pretrain` and `blockdistill distill`."""

    out: str | None = None
    data: str | None = None
    data_glob: str | None = None
    token_cache: str | None = None
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
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

    #: fields that may change between a run and its resumption (they do not change
    #: what is trained). `steps` is not one of them: the learning-rate and blockwise
    #: schedules are built from it; `extend` resumes with more steps explicitly.
    RESUMABLE_CHANGES = frozenset(
        {"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
         "log_every", "progress", "plots", "out", "mesh", "extend", "fused", "attention_impl",
         "tensorboard", "wandb", "wandb_project", "wandb_mode", "token_cache"}
    )

    @property
    def horizon(self) -> int:
        """The number of steps the schedules are built for (`schedule_steps`, else `steps`)."""
        return self.schedule_steps or self.steps

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size", "steps", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "log_every", "learning_rate",
                  "schedule_steps")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} is invalid: must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r} is invalid: must be in [0, 1)")
        if self.remat not in _REMAT:
            raise ConfigError(f"remat={self.remat!r} is invalid: must be one of {sorted(_REMAT)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is invalid: must be one of {sorted(_DTYPES)}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl={self.attention_impl!r} is invalid: must be one of {_ATTENTION_IMPLS}"
            )
        if self.wandb_mode not in _WANDB_MODES:
            raise ConfigError(f"wandb_mode={self.wandb_mode!r} is invalid: must be one of {_WANDB_MODES}")

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
        _positive(self, "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


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
    blockwise_weight: float = 1.0
    blockwise_schedule: str = "constant"
    blockwise_weight_end: float = 0.0
    blockwise_steps: int | None = None
    temperature: float = 1.0
    feature_loss: str = "cosine"
    inject_at: str = "layer"
    label_weight: float = 0.5
    teacher_weight: float = 1.0
    injected_pass: str = "auto"
    fused: str = "auto"
    trainable: str = "all"
    mesh: str | None = None

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "calibration_batches", "blockwise_steps", "temperature")
        for name in ("blockwise_weight", "blockwise_weight_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value!r} is invalid: must be in [0, 1]")
        if self.label_weight < 0:
            raise ConfigError(f"label_weight={self.label_weight!r} is invalid: must be >= 0")
        if self.teacher_weight < 0:
            raise ConfigError(f"teacher_weight={self.teacher_weight!r} is invalid: must be >= 0")
        if self.teacher_weight == 0 and self.label_weight == 0:
            raise ConfigError(
                "teacher_weight=0 with label_weight=0 leaves nothing to train on: give "
                "label_weight > 0 (labels alone) or teacher_weight > 0"
            )
        choices = {
            "student_init": ("prune", "random"),
            "blockwise_schedule": _SCHEDULES,
            "feature_loss": FEATURE_LOSSES,
            "inject_at": INJECT_LEVELS,
            "injected_pass": ("auto", "vmap", "scan"),
            "fused": ("auto", "on", "off"),
            "trainable": TRAINABLE,
            "student_layers": ("all", "group", "every-k"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: must be one of {allowed}")
        if self.mesh is not None:
            try:
                parse_mesh(self.mesh)
            except ValueError as error:
                raise ConfigError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Options of `blockdistill eval`."""

    model: str = "shipped"
    tokenizer: str | None = None
    data: str | None = None
    data_glob: str | None = None
    token_cache: str | None = None
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
    eval_batches: int = 16
    dtype: str = "float32"

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size", "eval_batches")


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

    for name, annotation in _field_types(cls).items():
        if name in skip or name.isupper():
            continue
        base, _ = _base_type(annotation)
        flag = "--" + name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=name, default=None, type=base, metavar=base.__name__.upper())


def given_flags(namespace, cls) -> dict[str, Any]:
    """The flags of `cls` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}
