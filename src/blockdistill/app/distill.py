"""`blockdistill distill`, the main job: the teacher and the initial student from the
options, the teacher cache a run reads, and the run itself (see the tutorial for what it
writes)."""

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp

from .._files import write_json
from ..data.pipeline import run_rows
from ..data.store import TokenDataset
from ..data.tokenizers import Tokenizer, load_tokenizer, tokenizer_record
from ..distill.flops import step_flops
from ..distill.losses import cached_divergence_refusal
from ..distill.objective import DistillationObjective
from ..interop.folders import model_digest, read_model_config, save_model
from ..nn.costs import parameter_count
from ..nn.hetero import describe_shapes
from ..nn.model import Transformer
from ..nn.teacher import Teacher
from ..parallel.mesh import check_mesh, make_mesh
from ..parallel.sharding import host_arrays, shard_model
from .options import ConfigError
from .run import (
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
)
from .runconfig import (
    DistillConfig,
    distill_steps,
    on_policy,
    stage_objectives,
    stage_of,
    student_config,
)
from .teacher_cache import TeacherCache
from .trainer import RunFolder

# ----------------------------------------------------------------------------- distill


def load_teacher_and_student(
    cfg: DistillConfig, dataset: TokenDataset, *, load_teacher: bool = True
) -> tuple[Teacher | None, Transformer]:
    """The frozen teacher and the initial student the config describes. With
    `load_teacher=False` (a run that reads every teacher output from a cache, from a
    given `student` folder) the teacher's weights are not read: `None` comes back, the
    fit of the two checked from the teacher's `config.json`."""
    from ..distill.prune import make_student
    from ..interop.folders import load_model

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
    from ..distill.prune import student_config_for
    from ..interop.folders import read_model_config, shipped_teacher_path

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


#: a teacher this large gets a note when the run keeps the default peak learning rate: that
#: rate was chosen on the shipped 4.85M-parameter teacher (docs/quality.md), and on the
#: 135M-parameter SmolLM2 a third of it did better (docs/real.md). The threshold lies
#: between the two teachers measured; nothing finer is known.
LARGE_TEACHER_PARAMS = 50_000_000


def learning_rate_note(cfg: DistillConfig, teacher_params: int) -> str | None:
    """What the run says about its learning rate before it trains (None: nothing)."""
    default = DistillConfig.__dataclass_fields__["learning_rate"].default
    if teacher_params < LARGE_TEACHER_PARAMS or cfg.learning_rate != default or cfg.blockwise_alone:
        return None  # (blockwise training alone did better at 1e-3 there)
    return (f"note: learning_rate={default:g} is the default, chosen on the shipped 4.85M-parameter teacher; "
            f"this teacher has {teacher_params / 1e6:.0f}M parameters, and on SmolLM2-135M logit KD at a peak of "
            "3e-4 closed more of the gap than at 1e-3 (docs/real.md, the learning-rate check; blockwise training "
            "alone went the other way): consider --learning-rate 3e-4")


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
        refusal = cached_divergence_refusal(cfg.divergence, teacher_cache.top_k, int(teacher_cache.meta["vocab_size"]))
        if refusal is not None:  # before anything is written to the run folder
            raise ConfigError(f"teacher_cache={cfg.teacher_cache!r}: {refusal}")
        teacher_loss = teacher_cache.teacher_eval_loss(_eval_rows(cfg, dataset), dataset.val.digest())
    # the teacher runs in the stages that do not read the cache
    needs_teacher = any(o.uses_teacher and not c for o, c in zip(objectives, cached_stages))
    teacher, student = load_teacher_and_student(
        cfg, dataset, load_teacher=needs_teacher or cfg.student is None or teacher_loss is None
    )
    teacher_config = teacher.config if teacher is not None else read_model_config(cfg.teacher)
    for objective in objectives:  # only a blockwise term maps student layers onto teacher layers
        if objective.uses_teacher and objective.passes(0)[1]:
            objective.resolve_layer_map(teacher_config.n_layers, student.config.n_layers)
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
    if (note := learning_rate_note(cfg, teacher_params)) is not None:
        print(note, file=sys.stderr)
    if not needs_teacher:
        teacher = None  # loaded only to derive the student or to score it: training never runs it
    elif mesh is not None:
        # the teacher stays whole on every device: scanning a layer-sharded teacher would
        # all-gather its whole stack every step (see docs/scaling.md)
        teacher = shard_model(teacher, mesh, shard_layers=False)
    trained, reached = fit(cfg, folder, steps, student, dataset, teacher=teacher, teacher_loss=teacher_loss,
                           step_flops=flops_of, stage_of_step=lambda index: stage_of(cfg, index),
                           extra_state={"student_config": student.config.to_dict(), "inputs": inputs}, mesh=mesh,
                           teacher_cache=teacher_cache, cached_stages=cached_stages, policy=on_policy(cfg))
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
