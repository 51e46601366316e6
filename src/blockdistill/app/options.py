"""Options of the `blockdistill` commands as flags and TOML: every option's section in a
TOML file and its help text, a sectioned TOML file read into checked values, and one
`--field-name` flag per option. The option dataclasses themselves are in
[`runconfig`][blockdistill.app.runconfig]."""

import dataclasses
import difflib
import os
import pathlib
import re
import tomllib
import types
import typing
from typing import Any


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
    **{name: ("generate", name) for name in ("prompt", "max_new_tokens", "top_p")},
    **{name: ("eval", name) for name in ("sample_rows", "sample_tokens", "sample_seed")},
    **{name: ("search", name) for name in (
        "budget", "score", "mlp_ratios", "kv_heads", "drop_attention", "drop_mlp", "linear", "identity",
        "candidates_per_step")},
    **{name: ("student", key) for name, key in (
        ("student", "path"), ("student_init", "init"), ("mlp_ratio", "mlp_ratio"), ("student_layers", "layers"),
        ("student_n_layers", "n_layers"), ("kv_heads_ratio", "kv_heads_ratio"),
        ("calibration_batches", "calibration_batches"))},
    **{name: ("objective", name) for name in (
        "blockwise_weight", "blockwise_schedule", "blockwise_weight_end", "blockwise_steps", "temperature",
        "feature_loss", "inject_at", "label_weight", "teacher_weight", "injected_pass", "fused", "cached_kl", "logit_chunk",
        "divergence", "jsd_beta", "skew_alpha", "onpolicy_fraction", "onpolicy_prompt_len", "onpolicy_temperature",
        "onpolicy_top_p", "onpolicy_start")},
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
    'learning_rate': "peak learning rate of AdamW (linear warm-up, cosine decay to a tenth); the default is the shipped teacher's best (docs/quality.md), and on SmolLM2-135M 3e-4 did better (docs/real.md)",
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
    'divergence': "the logit term, between the teacher's and the student's distributions at temperature `T`, times `T^2`: `kl` (forward KL, teacher to student), `reverse_kl`, `jsd` (generalized Jensen-Shannon, GKD's), `skew_kl` (DistiLLM's skew KL) or `tvd` (total variation); a top-k teacher cache serves only `kl` unless it keeps the whole vocabulary (see [Concepts](concepts.md#losses)); `kl` closed the most of the held-out gap in docs/signals.md, `jsd` left the student closest to the teacher on its own samples",
    'jsd_beta': "`beta` of `jsd`, in [0, 1]: the mixture is `beta p_teacher + (1 - beta) q_student`; `0` is the forward KL, `1` the reverse KL",
    'onpolicy_fraction': "on-policy distillation (GKD): the fraction of each batch's rows the student writes itself (its samples continuing the row's first tokens), scored by the teacher on the student's own tokens; 0 is off (needs `label_weight` 0, its default then, and no teacher cache)",
    'onpolicy_prompt_len': "the tokens of a row kept as the prompt of an on-policy row; default: half the row",
    'onpolicy_temperature': "the temperature the student samples its on-policy rows at (0: greedy)",
    'onpolicy_top_p': "nucleus sampling of the on-policy rows: keep the most likely tokens up to this probability",
    'onpolicy_start': "the first step that writes on-policy rows (e.g. a staged recipe's switch: blockwise first, then on-policy)",
    'skew_alpha': "`alpha` of `skew_kl`, in [0, 1]: the KL from the teacher's `p` to the mixture `alpha p + (1 - alpha) q` with the student's `q`",
    'feature_loss': '`cosine`, `l2` or `nmse`',
    'inject_at': '`layer` (whole blocks) or `attention` (MaxText mode)',
    'label_weight': "weight of next-token cross-entropy on the data's labels; not given: 0.5 beside logit KD (forward KL, also in annealed, mixed and staged recipes: the real-teacher study, docs/real.md), 1 for labels alone (`teacher_weight` 0), 0 for blockwise training alone, on-policy rows and the other divergences",
    'teacher_weight': 'scales both teacher terms (KL and blockwise); `0` trains on the labels alone, the no-teacher control (the teacher then only sets the eval gap)',
    'injected_pass': "`vmap`, `scan` or `auto` (the unfused path's injected pass)",
    'fused': "`on`, `off` or `auto`: run teacher and student layer by layer in one scan (see `DistillStep`'s `fused`; the same numbers, flat memory in depth); `auto` fuses wherever it applies",
    'trainable': '`all`, `attention`, `mlp` or `attention+mlp`',
    'coordinator': "`HOST:PORT` of process 0's coordinator for a multi-process run (`jax.distributed`); default: `$JAX_COORDINATOR_ADDRESS`, else one process",
    'num_processes': 'processes of a multi-process run (default: `$JAX_NUM_PROCESSES`)',
    'process_id': "this process's index in a multi-process run, 0 to num_processes - 1 (default: `$JAX_PROCESS_ID`)",
    'mesh': 'a device mesh such as `data=2,layers=4` or `data=2,fsdp=4` (see [Scaling](scaling.md))',
    'budget': "what the searched student may cost, as fractions of the teacher's: `params=F` (all parameters), `kv_bytes=F` (KV cache per token), `flops=F` (forward FLOPs per token), `latency=F` (forward seconds at the search's batch, every candidate block timed on this machine and cached), comma-separated to bound several at once",
    'score': "what the assembly minimises, summed over layers, with only that block swapped into the teacher: `kl` (the teacher's KL, Puzzle's), `lm_loss` (next-token cross-entropy on the held-out rows) or `top1` (how often the top-1 token differs from the teacher's); or `blockwise` (the block's own held-out loss)",
    'mlp_ratios': "the candidates' MLP widths, as fractions of the teacher's (comma-separated)",
    'kv_heads': "the candidates' KV head counts (comma-separated); default: the teacher's n, n/2 and 1",
    'drop_attention': 'also offer every MLP width without attention',
    'drop_mlp': 'also offer every attention choice without an MLP',
    'linear': 'also offer the whole layer as a linear map of its normed input, x + W rmsnorm(x) (from the '
              'identity; exported as DeciLM replace_with_linear, which vLLM does not load)',
    'identity': 'also offer removing the layer',
    'candidates_per_step': "train the candidates in groups of this many, one compiled program per group on the same teacher states: the same numbers, with one group's activations in memory instead of every candidate's; default: all in one program",
    'model': 'the model folder to evaluate (blockdistill or Hugging Face), or `shipped`',
    'tokenizer': 'the tokenizer folder (or `byte`); default: the one the model folder recorded',
    'prompt': 'a text to continue; repeat the flag for several (they are generated together, as one batch)',
    'max_new_tokens': 'tokens to generate after each prompt (fewer when the model ends the text with its end-of-sequence token)',
    'top_p': 'sample only from the smallest set of most likely tokens whose probability reaches P (nucleus sampling)',
    'sample_rows': 'with `teacher`: held-out rows whose first half the model continues with its own samples, scored against the teacher',
    'sample_tokens': "with `teacher`: tokens the model samples (temperature 1) after each row's first half",
    'sample_seed': 'with `teacher`: the key of those samples (the same seed, the same continuations)',
}


def section_of(name: str, cls: Any = None) -> tuple[str, str]:
    """`(section, key)` of a config field in a TOML file (a command's own place for it,
    in its class's `SECTION_CHANGES`, first)."""
    own = getattr(cls, "SECTION_CHANGES", {}).get(name)
    return own if own is not None else _SECTIONS.get(name, ("run", name))


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(`int`, True) for `int | None`; (`int`, False) for `int`; (`tuple[str, ...]`, False)
    for a list of texts."""
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
    if typing.get_origin(base) is tuple:  # a list of texts (a flag given several times)
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{source}: {name} must be a list of strings, got {value!r}")
        return tuple(value)
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
    where = {section_of(name, cls): name for name in fields}
    sections = sorted({section for section, _ in where})
    source = f"config file {path}"
    out: dict[str, Any] = {}
    for top, value in data.items():
        if not isinstance(value, dict):
            if top in fields:
                section, key = section_of(top, cls)
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
        section, key = section_of(name, cls)
        default = defaults[name]
        shown = "" if default is None or default == () else f"default: {str(default).lower() if isinstance(default, bool) else default}; "
        meaning = getattr(cls, "HELP_CHANGES", {}).get(name, HELP[name])
        text = f"{meaning} ({shown}[{section}] {key})".replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(base) is tuple:  # repeat the flag for several values
            parser.add_argument(flag, dest=name, default=None, action="append", metavar="TEXT", help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, type=base, metavar=base.__name__.upper(), help=text)


def given_flags(namespace, cls) -> dict[str, Any]:
    """The flags of `cls` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}
