"""`blockdistill search`: train a block library for every teacher layer, score it on held-out
rows, and assemble the best student under a budget (see docs/search.md)."""

import dataclasses
import hashlib
import json
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._files import write_json, write_text
from ..data.pipeline import batch_iterator
from ..data.tokenizers import load_tokenizer
from ..distill.step import make_optimizer
from ..interop.folders import load_model, save_model
from ..nn.config import BlockShape, check_execution
from ..nn.costs import (
    block_flops_per_token,
    flops_per_token,
    kv_cache_bytes_per_token,
    parameter_count,
)
from ..nn.hetero import describe_shapes, shape_name
from ..nn.teacher import Teacher
from ..search.latency import block_latencies
from ..search.library import (
    REPLACEMENT_SCORES,
    BlockLibrary,
    LibraryStep,
    assemble_student,
    blockwise_scores,
    init_library,
    replacement_scores,
)
from ..search.solver import choose_blocks
from ..search.space import candidate_costs
from .checkpoint import Checkpointer
from .options import ConfigError, _positive
from .run import (
    _batch_size_check,
    _eval_rows,
    _open_dataset,
    _report,
    _val_batches,
    check_resumed_inputs,
    evaluate,
    run_inputs,
)
from .runconfig import DataOptions, _library, lr_schedule
from .trainer import TrainingError, all_finite

_BUDGET_KINDS = ("params", "kv_bytes", "flops", "latency")
_SCORES = ("kl", "lm_loss", "top1", "blockwise")


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
        from ..search.space import SearchSpace

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

#: the options that decide what the library learns: a resumed search must keep them
_TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig)
                         if f.name not in SearchConfig.RESUMABLE_CHANGES)


def library_step_flops(library: BlockLibrary, *, batch_size: int, seq_len: int) -> float:
    """Analytic training FLOPs of one library step: the teacher's forward (layers only,
    no head) and every trained candidate's forward and backward (three times its
    forward) at every layer, on `batch_size` rows of `seq_len` tokens."""
    config, seq, tokens = library.config, seq_len, batch_size * seq_len
    teacher = flops_per_token(config, seq) - 2.0 * config.dim * config.vocab_size
    blocks = sum(block_flops_per_token(config, s, seq) for s in library.trained_shapes) * config.n_layers
    return tokens * (teacher + 3.0 * blocks)


def _check_resumable(cfg: SearchConfig, saved: dict[str, Any], out: pathlib.Path) -> None:
    changed = {name: (saved.get(name), getattr(cfg, name)) for name in _TRAINING_FIELDS
               if saved.get(name) != getattr(cfg, name)}
    if changed:
        parts = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise ConfigError(f"{out} holds a search with other training options ({parts}); use another --out, "
                          "or the same options to resume it")


def _check_finite(library: BlockLibrary, losses: jax.Array, step: int, last: int | None, out: pathlib.Path) -> None:
    """A `TrainingError` before a diverged library is saved: a candidate block's loss or any
    weight non-finite (the losses are computed before the update, so the weights are
    checked too), naming the candidates and the last good checkpoint (`last`, the step of
    the last save)."""
    rows = np.asarray(losses)
    bad = sorted({shape_name(library.trained_shapes[c]) for c, _ in zip(*np.nonzero(~np.isfinite(rows)))})
    if not bad and bool(all_finite(library)):
        return
    kept = f"the last good checkpoint is {out / 'checkpoints' / str(last)}" if last is not None else \
        "no checkpoint was written before it"
    what = f"the loss of {', '.join(bad)} became non-finite" if bad else "the library's weights became non-finite"
    raise TrainingError(f"{what} at step {step}; stopped, {kept} (try a lower --learning-rate)")


def _train_library(cfg, out, teacher, dataset, library) -> tuple[BlockLibrary, dict[str, Any]]:
    """Train (or resume training) the library; returns it and what the training measured."""
    inputs = run_inputs(dataset, teacher=cfg.teacher)
    optimizer = make_optimizer(lr_schedule(cfg), clip_norm=None)
    step = LibraryStep(optimizer=optimizer, kind=cfg.feature_loss, group_size=cfg.candidates_per_step)
    opt_state = step.init(library)
    batches = batch_iterator(dataset.train, batch_size=cfg.batch_size, seed=cfg.seed)
    checkpointer = Checkpointer(out, keep=2)
    start, seconds = 0, 0.0
    if (latest := checkpointer.latest()) is not None:
        state = checkpointer.read_state(latest)
        _check_resumable(cfg, state.get("search_config", {}), out)
        check_resumed_inputs(out, state, inputs)
        library, opt_state, state = checkpointer.restore(latest, library, opt_state)
        batches.set_state(state["data"])
        start, seconds = latest, float(state.get("train_seconds", 0.0))
        print(f"resuming the library from step {start} ({out / 'checkpoints' / str(start)})", file=sys.stderr)
    stop: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if cfg.progress and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="library", unit="step", file=sys.stderr)
    losses, saved = None, (start or None)
    try:
        for index in range(start, cfg.steps):
            tokens, mask, segments = (jnp.asarray(a) for a in next(batches))
            began = time.perf_counter()
            library, opt_state, losses = step(library, opt_state, teacher, tokens, mask, segment_ids=segments)
            if index == start:  # the first step compiles: time the rest
                jax.block_until_ready(losses)
            else:
                seconds += time.perf_counter() - began
            if bar is not None:
                bar.update(1)
            done = index + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                _check_finite(library, losses, done, saved, out)
                checkpointer.save(done, library, opt_state, {
                    "data": batches.get_state(), "search_config": cfg.to_dict(), "train_seconds": seconds,
                    "inputs": inputs})
                saved = done
            if stop:
                raise KeyboardInterrupt(f"interrupted after step {done} of {cfg.steps} (checkpoint written); "
                                        "rerun the same command to resume")
    finally:
        checkpointer.close()  # the last save finishes, also when training stopped on an error
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
    final = None if losses is None else np.asarray(losses).tolist()
    return library, {"train_seconds": seconds, "last_losses": final}


def _scores(cfg, teacher, val, library) -> dict[str, np.ndarray]:
    """Mean held-out scores over the eval batches `val`: `[candidates, layers]` each (the
    block loss, and the replacement scores of `replacement_scores`)."""
    block, swapped = [], []
    for tokens, mask, segments in val:
        tokens, mask, segments = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(segments)
        block.append(blockwise_scores(library, teacher, tokens, mask, segment_ids=segments, kind=cfg.feature_loss))
        swapped.append(replacement_scores(library, teacher, tokens, mask, segment_ids=segments))
    block, swapped = jax.device_get((block, swapped))
    return {"blockwise": np.mean(block, axis=0),
            **{name: np.mean([s[name] for s in swapped], axis=0) for name in REPLACEMENT_SCORES}}


def _score_key(cfg: SearchConfig, inputs: dict[str, Any], step: int, val_rows: int) -> str:
    """What a library's scores depend on: its training (options, inputs, the step its
    checkpoint holds) and the held-out rows they are measured on."""
    record = {"training": {name: getattr(cfg, name) for name in _TRAINING_FIELDS}, "inputs": inputs, "step": step,
              "val_rows": val_rows, "eval_batches": cfg.eval_batches, "batch_size": cfg.batch_size}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _cached_scores(cfg, out, teacher, val, library, key: str) -> tuple[dict[str, np.ndarray], float, bool]:
    """The scores of `library` on `val`, read back from `out/score_cache/` when this
    library was scored on the same rows before (a new budget is then solved at once);
    returns the scores, the seconds scoring took (when it ran) and whether they were read."""
    path = out / "score_cache" / f"{key}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        return {name: np.asarray(value) for name, value in kept["scores"].items()}, kept["seconds"], True
    began = time.perf_counter()
    scores = _scores(cfg, teacher, val, library)
    seconds = time.perf_counter() - began
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"scores": {name: value.tolist() for name, value in scores.items()}, "seconds": seconds})
    return scores, seconds, False


def _layer_budgets(cfg: SearchConfig, config, latency: dict[str, Any] | None = None
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """`(budget of the layers, teacher total)` per kind: the fraction of the teacher's
    whole-model cost, less what every student shares (embeddings, head, final norm).
    `latency` (see `block_latencies`) holds the measured seconds of the teacher's own block
    (`teacher_block`) and of the shared part."""
    totals = {"params": float(parameter_count(config)),
              "kv_bytes": float(kv_cache_bytes_per_token(config)),
              "flops": float(flops_per_token(config, cfg.seq_len))}
    outer = config.replace(n_layers=1, layer_shapes=(BlockShape(0, 0),))  # no layer: what every student shares
    shared = {"params": float(parameter_count(outer)), "kv_bytes": 0.0, "flops": float(flops_per_token(outer, cfg.seq_len))}
    if latency is not None:
        totals["latency"] = config.n_layers * latency["teacher_block"] + latency["shared"]
        shared["latency"] = latency["shared"]
    budgets = {kind: fraction * totals[kind] - shared[kind] for kind, fraction in cfg.budgets().items()
               if kind in totals}  # a latency budget once the blocks are timed
    for kind, value in budgets.items():
        if value <= 0:
            raise ConfigError(f"budget {kind}={cfg.budgets()[kind]} leaves nothing for the layers: the embeddings "
                              f"and head alone cost {shared[kind]:.4g} of the teacher's {totals[kind]:.4g}")
    return budgets, totals


def _latencies(cfg: SearchConfig, config, shapes) -> dict[str, Any]:
    """Measured seconds of every candidate shape and of the teacher's own block (see
    [`blockdistill.block_latencies`][]), on the search's batches."""
    own = BlockShape(config.mlp_dim, config.n_kv_heads)
    timed_shapes = tuple(dict.fromkeys((*shapes, own)))
    timed = block_latencies(config, timed_shapes, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            cache=cfg.token_cache)
    seconds = dict(zip(timed_shapes, timed["blocks"]))
    return {"blocks": np.asarray([seconds[s] for s in shapes]), "teacher_block": seconds[own],
            "shared": timed["shared"], "device": timed["device"], "cached": timed["cached"]}


def _plot(path: pathlib.Path, names: list[str], scores: np.ndarray, chosen: tuple[int, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.2 + 0.6 * scores.shape[1], 0.8 + 0.32 * len(names)))
    shown = np.log10(np.maximum(scores, 1e-8))
    image = axes.imshow(shown, aspect="auto", cmap="viridis")
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xticks(range(scores.shape[1]), [str(i) for i in range(scores.shape[1])], fontsize=8)
    axes.set_xlabel("teacher layer")
    for layer, candidate in enumerate(chosen):
        axes.add_patch(plt.Rectangle((layer - 0.5, candidate - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    figure.colorbar(image, ax=axes, label=f"log10 {title}")
    axes.set_title(f"{title} per candidate and layer (red: chosen)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _table(names: list[str], scores: dict[str, np.ndarray], chosen: tuple[int, ...], score: str) -> str:
    """Every candidate's score at every layer (the one the choice used, and the block
    loss), the chosen ones in bold."""
    shown = score if score != "blockwise" else "kl"
    layers = scores[shown].shape[1]
    lines = ["| candidate | " + " | ".join(f"layer {l} {shown} / block" for l in range(layers)) + " |",
             "|---|" + "---:|" * layers]
    for c, name in enumerate(names):
        cells = []
        for layer in range(layers):
            cell = f"{scores[shown][c, layer]:.2e} / {scores['blockwise'][c, layer]:.3f}"
            cells.append(f"**{cell}**" if chosen[layer] == c else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SCORE_TITLES = {"kl": "KL with the block swapped in", "lm_loss": "LM loss with the block swapped in",
                 "top1": "top-1 disagreement with the block swapped in"}


def search(cfg: SearchConfig) -> dict[str, Any]:
    """`blockdistill search`: library, scores, choice and student, in `cfg.out`."""
    out = pathlib.Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    tokenizer = load_tokenizer(cfg.teacher)
    dataset = _open_dataset(cfg, tokenizer)
    _batch_size_check(cfg, dataset)
    model = load_model(cfg.teacher, dtype=cfg.dtype, attention_impl=cfg.attention_impl)
    config = model.config
    if cfg.seq_len > config.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the teacher's max_seq_len={config.max_seq_len}")
    if config.layer_shapes is not None:
        raise ConfigError(f"teacher {cfg.teacher} is heterogeneous: the search needs a uniform teacher")
    budgets, totals = _layer_budgets(cfg, config)  # the formulas' budgets, checked before any work
    teacher = Teacher(model)
    calibration, calibration_mask, _ = (jnp.asarray(a) for a in dataset.train.spread(
        cfg.calibration_batches * cfg.batch_size))
    library = init_library(teacher, cfg.space(), calibration, calibration_mask=calibration_mask)
    names = [shape_name(s) for s in library.shapes]
    latency = _latencies(cfg, config, library.shapes) if "latency" in cfg.budgets() else None
    if latency is not None:
        budgets, totals = _layer_budgets(cfg, config, latency)
    out.mkdir(parents=True, exist_ok=True)
    library, trained = _train_library(cfg, out, teacher, dataset, library)
    val = _val_batches(cfg, dataset)
    key = _score_key(cfg, run_inputs(dataset, teacher=cfg.teacher), cfg.steps, _eval_rows(cfg, dataset))
    scores, score_seconds, scores_cached = _cached_scores(cfg, out, teacher, val, library, key)
    costs = candidate_costs(config, library.shapes, seq_len=cfg.seq_len)
    if latency is not None:
        costs["latency"] = latency["blocks"]
    per_layer = {kind: np.tile(costs[kind], (config.n_layers, 1)) for kind in costs}
    choice = choose_blocks(scores[cfg.score].T.astype(np.float64), per_layer, budgets)
    student = assemble_student(teacher, library, choice.indices)
    chosen = [library.shapes[i] for i in choice.indices]
    student_config = student.config
    real = {"params": parameter_count(student_config), "kv_bytes": kv_cache_bytes_per_token(student_config),
            "flops": flops_per_token(student_config, cfg.seq_len)}
    if latency is not None:
        real["latency"] = float(sum(latency["blocks"][i] for i in choice.indices) + latency["shared"])
    teacher_loss, student_loss = evaluate(model, val), evaluate(student, val)
    step_flops = library_step_flops(library, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    record = {
        "teacher": cfg.teacher, "budget": cfg.budgets(), "score": cfg.score,
        "candidates": names, "layers": config.n_layers,
        "indices": list(choice.indices), "chosen": [shape_name(s) for s in chosen],
        "architecture": describe_shapes(student_config),
        "predicted_score": choice.score,
        "costs": {kind: {"student": float(real[kind]), "teacher": totals[kind],
                         "fraction": float(real[kind]) / totals[kind]} for kind in real},
        "eval_loss": {"teacher": teacher_loss, "assembled_student": student_loss},
        "search_cost": {"steps": cfg.steps, "train_seconds": trained["train_seconds"],
                        "score_seconds": score_seconds, "scores_cached": scores_cached,
                        "train_flops": step_flops * cfg.steps, "candidates_trained": len(library.stacks)},
    }
    if latency is not None:
        record["latency"] = {"device": latency["device"], "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                             "blocks_s": latency["blocks"].tolist(), "shared_s": latency["shared"],
                             "cached": latency["cached"]}
    write_json(out / "scores.json", {"candidates": names, **{name: value.tolist() for name, value in scores.items()},
                                     "feature_loss": cfg.feature_loss})
    write_json(out / "choice.json", record)
    write_text(out / "scores.md", _table(names, scores, choice.indices, cfg.score))
    if cfg.plots:
        for name in dict.fromkeys(("kl", cfg.score if cfg.score != "blockwise" else "kl")):
            _plot(out / f"scores_{name}.png", names, scores[name], choice.indices, _SCORE_TITLES[name])
        _plot(out / "scores_blockwise.png", names, scores["blockwise"], choice.indices, f"block {cfg.feature_loss}")
    save_model(student, out / "student", tokenizer=tokenizer,
               extra={"teacher": cfg.teacher, "search": {k: record[k] for k in ("budget", "score", "chosen")},
                      "eval_loss_nats_per_token": student_loss})
    fractions = ", ".join(f"{kind} {record['costs'][kind]['fraction']:.0%}" for kind in real)
    scored = (f"scores read back from {out / 'score_cache'} (scoring took {score_seconds:.0f} s)" if scores_cached
              else f"scored in {score_seconds:.0f} s")
    lines = [
        f"trained {len(library.stacks)} candidates x {config.n_layers} layers for {cfg.steps} steps "
        f"({trained['train_seconds']:.0f} s, {step_flops * cfg.steps / 1e12:.2f} TFLOP); {scored}",
        f"chose ({cfg.budget}, by {cfg.score}): {describe_shapes(student_config)}",
        f"student: {fractions} of the teacher's; held-out loss {student_loss:.4f} before finishing "
        f"(teacher {teacher_loss:.4f})",
        f"saved to {out / 'student'}; scores in {out / 'scores.md'}; finish it with: blockdistill distill "
        f"--student {out / 'student'}" + ("" if cfg.teacher == "shipped" else f" --teacher {cfg.teacher}"),
    ]
    summary = {**record, "lines": lines}
    _report(summary)
    return summary
