"""The other commands over the same machinery: `pretrain`, `cache-teacher`, `plan`,
`eval` and `generate`."""

import math
import pathlib
import sys
from typing import Any

import jax

from .._files import write_json
from ..data.pipeline import run_rows
from ..data.tokenizers import ByteTokenizer, load_tokenizer
from ..distill.objective import DistillationObjective
from ..distill.step import DistillStep, make_optimizer
from ..interop.folders import read_model_config, save_model
from ..nn.costs import parameter_count, pretrain_flops
from ..nn.model import Transformer
from ..parallel.mesh import check_mesh, make_mesh
from .distill import cache_identity, cached_objectives
from .modelconfig import EvalConfig, GenerateConfig
from .options import ConfigError
from .run import (
    TAIL_KS,
    _batch_size_check,
    _eval_rows,
    _open_dataset,
    _prepare_out,
    _report,
    _val_batches,
    check_resumable,
    check_resumed_inputs,
    evaluate,
    fit,
    run_inputs,
    run_tokenizer,
    start_processes,
    tail_masses,
)
from .runconfig import (
    CacheConfig,
    DistillConfig,
    PretrainConfig,
    distill_steps,
    lr_schedule,
    student_config,
)
from .teacher_cache import TeacherCache, build_teacher_cache
from .trainer import RunFolder

#: `cache-teacher` warns when its top k leave more than this much probability out on average
TAIL_WARNING = 0.01

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


def cache_teacher(cfg: CacheConfig) -> dict[str, Any]:
    """`blockdistill cache-teacher`: run the teacher once over the corpus's training rows
    and store its top-k log-probabilities (see [`blockdistill.build_teacher_cache`][])."""
    import signal

    from ..interop.folders import load_model
    from .teacher_cache import bytes_per_token

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
        batches = _val_batches(cfg, dataset)
        loss = evaluate(model, batches, mesh)  # every process: it is one computation
        tails = tail_masses(model, batches, tuple(sorted({*TAIL_KS, cfg.top_k})), cfg.temperature, mesh)
        if jax.process_index() == 0:
            write_json(out / "meta.json", {**cache.meta, "teacher_eval": {
                "rows": rows, "val_sha256": val_sha256, "loss": loss,
                "tail_mass_at": {str(k): v for k, v in tails.items()}}})
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
    tails = {int(k): v for k, v in cache.meta.get("teacher_eval", {}).get("tail_mass_at", {}).items()}
    if tails:
        lines.insert(2, "held-out tail mass outside the top k: " + ", ".join(
            f"k={k}: {v:.2e}" for k, v in sorted(tails.items())))
    if cache.mean_tail_mass > TAIL_WARNING:
        larger = [k for k, v in sorted(tails.items()) if k > cfg.top_k and v <= TAIL_WARNING]
        hint = f"--top-k {larger[0]} leaves {tails[larger[0]]:.1%} out held-out" if larger else "a larger --top-k keeps more"
        lines.insert(2, (
            f"warning: the top {cfg.top_k} leave {cache.mean_tail_mass:.1%} of the teacher's probability out on "
            f"average: the cached KL sees that mass as one bucket "
            f"(docs/teacher_cache.md); {hint} (6 bytes per token per id)"))
    summary = {"rows": cache.num_cached, "bytes_per_token": per_token, "mean_tail_mass": cache.mean_tail_mass,
               "tail_mass_at": tails, "lines": lines}
    _report(summary)
    return summary


# ----------------------------------------------------------------------------- plan


def plan_command(cfg: DistillConfig, device_memory: str | None, argv: list[str] | None = None) -> dict[str, Any]:
    """`blockdistill plan`: per-device memory of the run `cfg` describes, from its step
    compiled on abstract shapes (the teacher's `config.json` alone is read). A mesh of more
    devices than this process has is planned in a child process with as many CPU devices."""
    import os
    import subprocess

    from ..distill.prune import student_config_for
    from ..parallel.mesh import parse_mesh
    from .plan import format_bytes, format_count, parse_bytes, plan_memory

    limit = None if device_memory is None else parse_bytes(device_memory)
    needed = 1 if cfg.mesh is None else math.prod(parse_mesh(cfg.mesh).values())
    if needed > jax.device_count():
        if os.environ.get("BLOCKDISTILL_PLAN_CHILD") or argv is None:
            raise ConfigError(f"mesh={cfg.mesh!r} needs {needed} devices; this process has {jax.device_count()}")
        env = {**os.environ, "BLOCKDISTILL_PLAN_CHILD": "1", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={needed}"}
        done = subprocess.run([sys.executable, "-m", "blockdistill", *argv], env=env)
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
    from ..interop.folders import load_model

    model = load_model(cfg.model, dtype=cfg.dtype)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    dataset = _open_dataset(cfg, tokenizer)
    val = _val_batches(cfg, dataset)
    loss = evaluate(model, val)
    line = f"{cfg.model}: eval loss {loss:.4f} nats/token"
    if isinstance(tokenizer, ByteTokenizer):
        line += f" = {loss / math.log(2):.4f} bits/byte"
    print(line)
    result: dict[str, Any] = {"eval_loss": loss}
    if cfg.teacher is not None:
        result["samples"] = _sample_scores(cfg, model, dataset)
    return result


def _sample_scores(cfg: EvalConfig, model: Transformer, dataset) -> dict[str, Any]:
    """`eval --teacher`: the model scored against the teacher on its own samples, and the
    teacher's NLL of its own samples from the same prompts."""
    import jax
    import jax.numpy as jnp

    from ..distill.onpolicy import score_samples
    from ..interop.folders import load_model

    teacher = load_model(cfg.teacher, dtype=cfg.dtype)
    rows = dataset.val.spread(cfg.sample_rows)[0]
    if len(rows) < cfg.sample_rows:
        raise ConfigError(f"sample_rows={cfg.sample_rows}: the held-out split has only {len(rows)} rows of "
                          f"{cfg.seq_len} tokens")
    prompts = jnp.asarray(rows[: cfg.sample_rows, : cfg.seq_len // 2])
    key = jax.random.key(cfg.sample_seed)
    ours = score_samples(model, teacher, prompts, cfg.sample_tokens, key=key)
    floor = score_samples(teacher, teacher, prompts, cfg.sample_tokens, key=key)
    scores = {name: float(getattr(ours, name)) for name in ("reverse_kl", "forward_kl", "teacher_nll", "student_nll")}
    scores["teacher_own_nll"] = float(floor.teacher_nll)
    scores["tokens"] = int(ours.tokens)
    print(f"on its own samples ({cfg.sample_rows} rows, {prompts.shape[1]}-token prompts, {cfg.sample_tokens} "
          f"tokens at temperature 1): reverse KL to the teacher {scores['reverse_kl']:.4f}, forward KL "
          f"{scores['forward_kl']:.4f}, teacher NLL {scores['teacher_nll']:.4f} nats/token (of its own samples: "
          f"{scores['teacher_own_nll']:.4f})")
    return scores


# ----------------------------------------------------------------------------- generate


def _generation_folder(model: str) -> str:
    """The model folder `model` names: itself, or a run folder's final model (`student/`,
    or a pretraining run's `model/`)."""
    if model == "shipped":
        return model
    for name in ("student", "model"):  # a run folder's own config.json is the run's
        if (pathlib.Path(model) / name / "config.json").is_file():
            return str(pathlib.Path(model) / name)
    return model


def generate_command(cfg: GenerateConfig) -> dict[str, Any]:
    """`blockdistill generate`: continue each prompt with the model and print it.

    The prompts are encoded with the model folder's tokenizer, each after the tokenizer's
    BOS id (as every training document started), and generated together as one batch of
    right-padded rows; a row stops at the end-of-sequence token (the byte tokenizer's is
    the NUL byte that starts the next document), which is not printed.
    """
    import time

    import jax.numpy as jnp
    import numpy as np

    from ..data.tokenizers import HFTokenizer, _find_eos_id
    from ..distill.generate import generate
    from ..interop.folders import load_model

    folder = _generation_folder(cfg.model)
    # scanned layers: one layer's program compiles, whatever the depth
    model = load_model(folder, dtype=cfg.dtype, scan_layers=True)
    tokenizer = load_tokenizer(folder, cfg.tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        eos_id = _find_eos_id(tokenizer.folder, tokenizer.tokenizer)
    else:
        eos_id = tokenizer.bos_id  # a NUL byte starts the next document
    start = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    rows = [np.asarray(start + tokenizer.encode(text).tolist(), np.int32) for text in cfg.prompt]
    width = max(len(row) for row in rows)
    if width + cfg.max_new_tokens > model.config.max_seq_len:
        raise ConfigError(
            f"the longest prompt ({width} tokens) and max_new_tokens={cfg.max_new_tokens} exceed the model's "
            f"max_seq_len={model.config.max_seq_len}: shorten the prompt or lower --max-new-tokens"
        )
    prompts = np.stack([np.pad(row, (0, width - len(row)), constant_values=tokenizer.pad_id) for row in rows])
    began = time.perf_counter()
    out = generate(
        model, jnp.asarray(prompts), cfg.max_new_tokens, key=jax.random.key(cfg.seed),
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id,
        prompt_lengths=jnp.asarray([len(row) for row in rows], jnp.int32),
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    seconds = time.perf_counter() - began
    texts = []
    for index, (text, row, length) in enumerate(zip(cfg.prompt, tokens, lengths), start=1):
        new = row[:length]
        if eos_id is not None and length and new[-1] == eos_id:
            new = new[:-1]
        texts.append(tokenizer.decode(new))
        how = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}, seed {cfg.seed}"
        print(f"--- {cfg.model}, prompt {index} ({len(new)} new tokens, {how}) ---")
        print(text + texts[-1])
    print(f"--- {int(lengths.sum())} tokens in {seconds:.1f} s (compilation included)")
    return {"texts": texts, "tokens": tokens, "lengths": lengths}
