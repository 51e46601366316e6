"""Quality study: which distillation recipe recovers the shipped teacher fastest, per unit of cost.

Every run distils the shipped teacher on the default corpus with the main job's batches
(8 x 256 bytes) and records the held-out loss six times per run, against training tokens,
analytic training FLOPs and measured step seconds. Students: half the MLP width, half the
layers (grouped) and half the KV heads, each pruned from the teacher and, as a control,
from random init. Recipes: logit KD, blockwise only (attention level, the MaxText mode;
layer level, the Puzzle mode, with cosine / l2 / nmse), a constant 50/50 mix, blockwise
annealed into KD, staged (blockwise alone, then KD), label cross-entropy alone (the
no-teacher control) and combinations with label cross-entropy. Three budgets: the main
job's 150 steps for every recipe (`--budget steps`), or as many steps as cost what the main
job's recipe costs in 150 steps, by analytic FLOPs (`--budget flops`) or by step seconds
measured side by side on this machine (`--budget seconds`).

    python experiments/quality.py                 # run what is missing, then report
    python experiments/quality.py --budget flops  # the equal-FLOPs comparison
    python experiments/quality.py --report-only   # rebuild the table and plots from the results

Each run is an ordinary `blockdistill distill` run (in process) in
`--out/<teacher id>/<name>/`; a run that finished is skipped and a crashed one resumes
from its checkpoint, so rerunning the command continues the study. The per-run results go
to `experiments/quality_results.json` (one teacher per file: each record names its
teacher's weights by their sha256), the step seconds measured side by side next to it, and
the report (tables and plots) into `docs/quality.md` between its generated-section markers
and `docs/images/quality_*.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "quality_results.json"
PAGE = ROOT / "docs" / "quality.md"
IMAGES = ROOT / "docs" / "images"
BEGIN = "<!-- quality-study:begin (written by experiments/quality.py; do not edit) -->"
END = "<!-- quality-study:end -->"
COMMAND = "python experiments/quality.py"
OUT = "runs/quality"  # the runs' folder (--out)
#: a study built on this machinery may set this: called as `(results_path, out, quick)`
#: after the arguments are read and before the results are, unless only reporting
BEFORE_RUNS = None
DEFAULT_STEPS = 150  # the main job's budget (DistillConfig.steps)
DEFAULT_LR = 1e-3  # the main job's peak learning rate (DistillConfig.learning_rate)

#: stands for half the teacher's depth (`student_fields` resolves it from the teacher)
HALF_DEPTH = "half the teacher's layers"
#: student shapes (DistillConfig fields); each is run pruned and from random init
STUDENTS: dict[str, dict[str, Any]] = {
    "mlp": {"mlp_ratio": 0.5},
    "layers": {"mlp_ratio": 1.0, "student_layers": "group", "student_n_layers": HALF_DEPTH},
    "kv": {"mlp_ratio": 1.0, "kv_heads_ratio": 0.5},
}
STUDENT_LABELS = {
    "mlp": "half MLP width",
    "layers": "half the layers (grouped)",
    "kv": "half the KV heads",
}

_BLOCKWISE = {"blockwise_weight": 1.0, "blockwise_schedule": "constant"}
_STAGED = {"blockwise_weight": 1.0, "blockwise_weight_end": 0.0, "blockwise_schedule": "staged",
           "inject_at": "layer", "feature_loss": "cosine"}
#: recipes (DistillConfig fields); `recipe()` pins every objective field that a recipe does
#: not set, so that a change of the main job's defaults never changes a recipe
RECIPES: dict[str, dict[str, Any]] = {
    "kd": {"blockwise_weight": 0.0, "blockwise_schedule": "constant"},
    "attn-cosine": {**_BLOCKWISE, "inject_at": "attention", "feature_loss": "cosine"},
    "layer-cosine": {**_BLOCKWISE, "inject_at": "layer", "feature_loss": "cosine"},
    "layer-l2": {**_BLOCKWISE, "inject_at": "layer", "feature_loss": "l2"},
    "layer-nmse": {**_BLOCKWISE, "inject_at": "layer", "feature_loss": "nmse"},
    "mix-0.5": {"blockwise_weight": 0.5, "blockwise_schedule": "constant",
                "inject_at": "layer", "feature_loss": "cosine"},
    "anneal": {"blockwise_weight": 1.0, "blockwise_weight_end": 0.0, "blockwise_schedule": "linear",
               "inject_at": "layer", "feature_loss": "cosine"},
    "anneal+ce": {"blockwise_weight": 1.0, "blockwise_weight_end": 0.0, "blockwise_schedule": "linear",
                  "inject_at": "layer", "feature_loss": "cosine", "label_weight": 0.5},
    "kd+ce": {"blockwise_weight": 0.0, "blockwise_schedule": "constant", "label_weight": 0.5},
    "layer-cosine+ce": {**_BLOCKWISE, "inject_at": "layer", "feature_loss": "cosine", "label_weight": 0.5},
    # the no-teacher control: label cross-entropy alone from the same init
    "ce": {"blockwise_weight": 0.0, "blockwise_schedule": "constant", "teacher_weight": 0.0, "label_weight": 1.0},
    # never two passes in one step: blockwise alone for a fraction of the steps, then KD (+ CE)
    "staged-0.25+ce": {**_STAGED, "stage_fraction": 0.25, "label_weight": 0.5},
    "staged-0.5+ce": {**_STAGED, "stage_fraction": 0.5, "label_weight": 0.5},
    "staged-0.5": {**_STAGED, "stage_fraction": 0.5},
}
_OBJECTIVE_BASE = {"blockwise_weight_end": 0.0, "blockwise_steps": None, "temperature": 1.0,
                   "feature_loss": "cosine", "inject_at": "layer", "label_weight": 0.0, "teacher_weight": 1.0}
#: KD into the main job's student, whose cost sets the equal-cost budgets: the main job's
#: recipe when this study ran (the DistillConfig defaults have since added 0.5 label CE,
#: from the real-teacher study: docs/real.md)
MAIN_RECIPE = "kd"
MAIN_STUDENT = "mlp"


def recipe(name: str, steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """Every objective field of recipe `name` for a run of `steps` steps (a staged
    recipe's switch is a fraction of them)."""
    fields = {**_OBJECTIVE_BASE, **RECIPES[name]}
    fraction = fields.pop("stage_fraction", None)
    if fraction is not None:
        fields["blockwise_steps"] = max(1, round(fraction * steps))
    return fields


RECIPE_LABELS = {
    "kd": "KD only (w = 0)",
    "attn-cosine": "blockwise, attention level, cosine",
    "layer-cosine": "blockwise, layer level, cosine",
    "layer-l2": "blockwise, layer level, l2",
    "layer-nmse": "blockwise, layer level, nmse",
    "mix-0.5": "constant mix w = 0.5 (layer, cosine)",
    "anneal": "blockwise -> KD, linear 1 -> 0 (layer, cosine)",
    "anneal+ce": "anneal + 0.5 label CE",
    "kd+ce": "KD + 0.5 label CE",
    "layer-cosine+ce": "blockwise, layer level, cosine + 0.5 label CE",
    "ce": "labels only (CE, no teacher)",
    "staged-0.25+ce": "staged: blockwise 25% of steps, then KD + 0.5 CE",
    "staged-0.5+ce": "staged: blockwise 50% of steps, then KD + 0.5 CE",
    "staged-0.5": "staged: blockwise 50% of steps, then KD",
}
#: how a run's step count is set: as given, or from the main job's cost in analytic
#: FLOPs or in measured seconds on this machine (a cheaper recipe gets more steps)
BUDGETS = ("steps", "flops", "seconds")


@dataclasses.dataclass(frozen=True)
class Run:
    student: str
    init: str
    recipe: str
    seed: int
    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LR
    budget: str = "steps"

    @property
    def name(self) -> str:
        name = f"{self.student}-{self.init}/{self.recipe}/seed{self.seed}"
        if self.budget != "steps":
            name += f"-equal-{self.budget}"
        elif self.steps != DEFAULT_STEPS:
            name += f"-steps{self.steps}"
        if self.learning_rate != DEFAULT_LR:
            name += f"-lr{self.learning_rate:g}"
        return name


#: the recipes of each (student, init) at equal steps, most important first. The main
#: job's student gets every recipe; the attention-level mode needs the student's depth to
#: match the teacher's, so the half-depth student skips it; the random-init controls get
#: KD, layer-level blockwise and the anneal
GRID: dict[tuple[str, str], tuple[str, ...]] = {
    ("mlp", "prune"): tuple(RECIPES),
    ("kv", "prune"): ("kd", "kd+ce", "attn-cosine", "layer-cosine", "layer-cosine+ce", "anneal+ce",
                      "staged-0.5+ce", "ce"),
    ("layers", "prune"): ("kd", "kd+ce", "layer-cosine", "layer-cosine+ce", "anneal+ce", "staged-0.5+ce", "ce"),
    **{(student, "random"): ("kd", "layer-cosine", "anneal+ce") for student in ("mlp", "kv", "layers")},
}
#: the recipes compared at equal FLOPs and equal seconds (pruned students only): those
#: whose cost per step differs (KD and CE skip the blockwise pass or the teacher, a staged
#: recipe never runs two passes in one step) and the main job's recipe itself
COST_RECIPES = ("kd", "kd+ce", "ce", "layer-cosine", "layer-cosine+ce", "anneal+ce",
                "staged-0.25+ce", "staged-0.5+ce", "staged-0.5")


def cells(budget: str = "steps") -> list[tuple[str, str, str]]:
    """The (student, init, recipe) cells of a budget's grid, most important first."""
    grid = [(student, init, r) for (student, init), recipes in GRID.items() for r in recipes]
    if budget != "steps":
        grid = [c for c in grid if c[1] == "prune" and c[2] in COST_RECIPES]
    return grid


def plan(
    seeds: tuple[int, ...],
    steps: int = DEFAULT_STEPS,
    learning_rate: float = DEFAULT_LR,
    budget: str = "steps",
    steps_for: Any = None,
) -> list[Run]:
    """The runs of a budget's grid, seed-major (a partial study still answers the main
    question); with an equal-cost budget, `steps_for(student, init, recipe)` sets the steps."""

    def run(student: str, init: str, name: str, seed: int) -> Run:
        count = steps if budget == "steps" else steps_for(student, init, name)
        return Run(student, init, name, seed, count, learning_rate, budget)

    return [run(*cell, seed) for seed in seeds for cell in cells(budget)]


def twin(run: Run) -> Run:
    """The equal-steps run with the same steps: an equal-cost run whose steps come out at
    the main job's (the main recipe itself) is that run, and reuses its record."""
    return dataclasses.replace(run, budget="steps")


def teacher_identity(teacher: str | None) -> str:
    """sha256 over the teacher's weight files (`*.eqx`, `*.safetensors`, by name and
    content): the study of one teacher never mixes with another's."""
    from blockdistill.interop.folders import shipped_teacher_path

    folder = shipped_teacher_path() if teacher in (None, "shipped") else pathlib.Path(teacher)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".eqx", ".safetensors")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"teacher {folder}: no weight files (*.eqx, *.safetensors) to identify it by")
    from blockdistill._files import sha256_files

    return sha256_files(files)


def teacher_depth(teacher: str | None) -> int:
    """The number of layers of the teacher folder (blockdistill or Hugging Face; None: the shipped one)."""
    from blockdistill.interop.folders import shipped_teacher_path

    folder = shipped_teacher_path() if teacher in (None, "shipped") else pathlib.Path(teacher)
    meta = json.loads((folder / "config.json").read_text())
    return int(meta["config"]["n_layers"] if meta.get("format") == "blockdistill" else meta["num_hidden_layers"])


def student_fields(student: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DistillConfig fields of `student` for the teacher of `extra` (half the depth resolved)."""
    fields = dict(STUDENTS[student])
    if fields.get("student_n_layers") == HALF_DEPTH:
        fields["student_n_layers"] = max(1, teacher_depth((extra or {}).get("teacher")) // 2)
    return fields


def budget(steps: int, quick: bool) -> dict[str, Any]:
    if quick:  # a smoke test of the machinery at 4/150 of the steps, never used for the docs
        steps = max(2, round(steps * 4 / DEFAULT_STEPS))
        return {"steps": steps, "eval_every": max(1, steps // 2), "checkpoint_every": 2, "eval_batches": 2,
                "batch_size": 2, "seq_len": 64, "calibration_batches": 1, "warmup_steps": 1}
    # the main job's batches (DistillConfig defaults), evaluated 6 times per run
    return {"steps": steps, "eval_every": max(1, steps // 6), "checkpoint_every": 50,
            "eval_batches": 16, "batch_size": 8, "seq_len": 256}


def config_for(run: Run, out: pathlib.Path, quick: bool, extra: dict[str, Any] | None = None):
    """The run's `DistillConfig`; `extra` sets other fields (`teacher`, `data`)."""
    from blockdistill.app.runconfig import DistillConfig

    size = budget(run.steps, quick)
    return DistillConfig(
        out=str(out), seed=run.seed, student_init=run.init, progress=False, plots=False,
        keep_checkpoints=1, learning_rate=run.learning_rate, **size,
        **student_fields(run.student, extra), **recipe(run.recipe, size["steps"]), **(extra or {}),
    )


def execute(run: Run, root: pathlib.Path, quick: bool, extra: dict[str, Any] | None,
            stage_seconds: list[float], teacher: str) -> dict[str, Any]:
    """Run (or resume) one distillation and return its record. `stage_seconds` are the
    seconds per step of each of the run's programs (stages), measured side by side;
    `teacher` the teacher's identity (`teacher_identity`)."""
    from blockdistill.app.distill import distill
    from blockdistill.app.runconfig import stage_of

    out = root / run.name
    cfg = config_for(run, out, quick, extra)
    resumed = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    start = time.perf_counter()
    summary = distill(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    evals = [(r["step"], r["eval/student_loss"]) for r in records if "eval/student_loss" in r]
    rates = sorted(r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    own = training_seconds(records, tokens_per_step)
    flops = {r["step"]: r["train_flops"] for r in records if "train_flops" in r}
    flops[0] = 0.0
    # the seconds axis: each step at its program's step time measured side by side, so
    # that runs compare at equal seconds whatever else the machine did while they ran
    seconds = [0.0]
    for index in range(cfg.steps):
        seconds.append(seconds[-1] + stage_seconds[stage_of(cfg, index)])
    return {
        **dataclasses.asdict(run), "name": run.name, "teacher_sha256": teacher,
        "steps": cfg.steps, "tokens_per_step": tokens_per_step,
        "eval_steps": [s for s, _ in evals], "eval_loss": [v for _, v in evals],
        "eval_flops": [flops[s] for s, _ in evals],
        "eval_seconds": [seconds[s] for s, _ in evals],
        "step_seconds": stage_seconds,
        "eval_own_seconds": [own[s] for s, _ in evals],
        "teacher_loss": summary["teacher_loss"],
        "wall_s": None if resumed else wall,
        "train_tokens_per_s": rates[len(rates) // 2] if rates else None,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "progress", "plots")},
    }


def training_seconds(records: list[dict[str, Any]], tokens_per_step: int) -> dict[int, float]:
    """Measured training seconds through each step: each step takes its log window's
    rate (`tokens_per_s`; evaluation and checkpoints are outside the windows); a step
    that compiled (no rate) takes the rate of the next step that has one."""
    steps = [r for r in records if r["step"] > 0]
    rates = [r.get("tokens_per_s") for r in steps]
    for i in range(len(rates) - 2, -1, -1):
        if rates[i] is None:
            rates[i] = rates[i + 1]
    total, seconds = 0.0, {0: 0.0}
    for record, rate in zip(steps, rates):
        total += tokens_per_step / rate if rate else 0.0
        seconds[record["step"]] = total
    return seconds


# ----------------------------------------------------------------------------- equal cost


def step_seconds(cells: list[tuple[str, str, str]], quick: bool, extra: dict[str, Any] | None,
                 rounds: int = 5) -> dict[str, list[float]]:
    """Measured seconds per training step of each (student, init, recipe) and each of its
    programs (one, or a staged recipe's two), side by side in one process: every program
    compiled first, then `rounds` rounds of one step of each (every other round in reverse
    order), the median per program. An on-policy recipe's step includes its sampling (the
    student writes its share of the batch before the update, as in a run). Keys are
    `student/init/recipe`."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from blockdistill.app.runconfig import distill_steps, on_policy, stage_of
    from blockdistill.app.distill import load_teacher_and_student
    from blockdistill.data.store import token_dataset
    from blockdistill.data.tokenizers import load_tokenizer

    programs: dict[tuple[tuple[str, str, str], int], Any] = {}
    for cell in cells:
        cfg = config_for(Run(*cell, seed=0), ROOT / "unused", quick, extra)
        dataset = token_dataset(cfg.data, load_tokenizer(cfg.teacher), cfg.seq_len, cfg.val_fraction)
        teacher, student = load_teacher_and_student(cfg, dataset)
        tokens, mask, segments = (jnp.asarray(a) for a in dataset.train.take(range(cfg.batch_size)))
        _, steps = distill_steps(cfg)  # the run's own programs, one per stage
        policy = on_policy(cfg)
        stages = [stage_of(cfg, i) for i in range(cfg.steps)]
        for stage, step in enumerate(steps):
            index = stages.index(stage) if stage in stages else 0  # the stage's first step
            own = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, student)  # steps donate it
            state = {"student": own, "opt": step.optimizer.init(eqx.filter(own, eqx.is_array))}

            def one(step=step, state=state, index=index, policy=policy, teacher=teacher,
                    rows=(tokens, mask, segments)):
                if policy is not None and policy.active(index):
                    rows = policy.mix(state["student"], *rows, step=index, key=jax.random.key(0))
                state["student"], state["opt"], metrics = step(
                    state["student"], state["opt"], teacher, rows[0], rows[1], index, segment_ids=rows[2])
                jax.block_until_ready(metrics)

            one()  # compile
            programs[(cell, stage)] = one
    times: dict[tuple[tuple[str, str, str], int], list[float]] = {key: [] for key in programs}
    for r in range(rounds):
        for key in (list(programs) if r % 2 == 0 else list(reversed(programs))):
            start = time.perf_counter()
            programs[key]()
            times[key].append(time.perf_counter() - start)
    median = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    return {"/".join(cell): [median[(c, stage)] for (c, stage) in programs if c == cell]
            for cell in dict.fromkeys(cell for cell, _ in programs)}


def measured_step_seconds(cells: list[tuple[str, str, str]], quick: bool, extra: dict[str, Any] | None,
                          path: pathlib.Path, teacher: str) -> dict[str, list[float]]:
    """Step seconds per program of every cell (`step_seconds`), kept in `path` for the
    teacher `teacher`: the cells not there yet, and always the main job's, are measured
    side by side first."""
    from blockdistill._files import write_json

    kept = json.loads(path.read_text()) if path.exists() else {"teacher_sha256": teacher, "seconds": {}}
    if kept.get("teacher_sha256") != teacher:
        raise ValueError(f"{path}: step seconds of another teacher ({kept.get('teacher_sha256')}, not {teacher}); "
                         "delete it or use other --results")
    main = (MAIN_STUDENT, "prune", MAIN_RECIPE)
    missing = [c for c in dict.fromkeys([main, *cells]) if "/".join(c) not in kept["seconds"]]
    if missing:
        print(f"measuring the step time of {len(missing)} recipes side by side", file=sys.stderr, flush=True)
        kept["seconds"].update(step_seconds(missing, quick, extra))
        write_json(path, kept)
    return kept["seconds"]


def equal_cost_steps(budget: str, steps: int, quick: bool, extra: dict[str, Any] | None,
                     seconds: dict[str, list[float]]):
    """`steps_for(student, init, recipe)`: the steps at which a run costs what the main
    job's recipe costs in `steps` steps, in analytic FLOPs or in step seconds measured side
    by side (`seconds`, as `measured_step_seconds` returns them)."""
    from blockdistill.app.distill import mean_step_flops
    from blockdistill.app.runconfig import stage_of

    def cost(cell):
        cfg = config_for(Run(*cell, seed=0, steps=steps), ROOT / "unused", quick, extra)
        if budget == "flops":
            return mean_step_flops(cfg)
        stages = [stage_of(cfg, i) for i in range(cfg.steps)]
        return sum(seconds["/".join(cell)][stage] for stage in stages) / len(stages)

    reference = cost((MAIN_STUDENT, "prune", MAIN_RECIPE))
    return lambda student, init, name: max(1, round(steps * reference / cost((student, init, name))))


# ----------------------------------------------------------------------------- analysis


def gap_curve(record: dict[str, Any]) -> list[float]:
    """Fraction of the (initial student - teacher) gap closed at each evaluation."""
    initial, teacher = record["eval_loss"][0], record["teacher_loss"]
    gap = initial - teacher
    return [(initial - loss) / gap if gap > 0 else math.nan for loss in record["eval_loss"]]


def cost_axis(record: dict[str, Any], axis: str) -> list[float] | None:
    """A run's cost at each evaluation: training `tokens`, analytic `flops` or measured
    `seconds` (None for a record made before they were recorded)."""
    if axis == "tokens":
        return [s * record["tokens_per_step"] for s in record["eval_steps"]]
    return record.get(f"eval_{axis}")


def tokens_to(record: dict[str, Any], fraction: float, axis: str = "tokens") -> float | None:
    """Training cost (`axis`: tokens, flops or seconds) until `fraction` of the gap is
    first closed, linearly interpolated between the two evaluations around the crossing;
    None when it is never reached (or the cost was not recorded)."""
    closed = gap_curve(record)
    tokens = cost_axis(record, axis)
    if tokens is None:
        return None
    for i in range(1, len(closed)):
        if closed[i] >= fraction:
            before, after = closed[i - 1], closed[i]
            share = (fraction - before) / (after - before) if after > before else 1.0
            return tokens[i - 1] + share * (tokens[i] - tokens[i - 1])
    return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Records by (student, init, recipe), in the order of `plan` (all of one budget)."""
    order = {cell: i for i, cell in enumerate(cells())}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in sorted(records, key=lambda r: (order.get((r["student"], r["init"], r["recipe"]), 10**6),
                                                  r["seed"])):
        groups.setdefault((record["student"], record["init"], record["recipe"]), []).append(record)
    return groups


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (student, init, recipe), averaged over seeds (records of one budget)."""
    rows = []
    for (student, init, recipe), group in _groups(records).items():
        finals = [g["eval_loss"][-1] for g in group]
        to = {(axis, f): [tokens_to(g, f, axis) for g in group]
              for axis in ("tokens", "flops", "seconds") for f in (0.5, 0.9)}
        walls = [g["wall_s"] for g in group if g["wall_s"] is not None]
        rates = [g["train_tokens_per_s"] for g in group if g["train_tokens_per_s"]]
        rows.append({
            "student": student, "init": init, "recipe": recipe, "seeds": len(group),
            "initial": _mean([g["eval_loss"][0] for g in group]),
            "final": _mean(finals), "final_spread": max(finals) - min(finals),
            "closed": _mean([gap_curve(g)[-1] for g in group]),
            # "not reached" when any seed did not reach it
            **{f"{axis}_{round(100 * f)}": "-" if any(cost_axis(g, axis) is None for g in group)
               else None if None in v else _mean(v)  # type: ignore[arg-type]
               for (axis, f), v in to.items()},
            "steps": group[0]["steps"],
            "flops": _mean([g["eval_flops"][-1] for g in group]) if all("eval_flops" in g for g in group) else None,
            "seconds": _mean([g["eval_seconds"][-1] for g in group]) if all("eval_seconds" in g for g in group) else None,
            "wall_s": _mean(walls) if walls else None,
            "tokens_per_s": _mean(rates) if rates else None,
        })
    return rows


def _fmt_tokens(value: float | str | None) -> str:
    """`None`: never reached; `"-"`: not recorded (a run made before costs were)."""
    return value if isinstance(value, str) else "not reached" if value is None else f"{value / 1000:.0f}k"


def _fmt_flops(value: float | str | None) -> str:
    return value if isinstance(value, str) else "not reached" if value is None else f"{value / 1e12:.2f}"


def _fmt_seconds(value: float | str | None) -> str:
    return value if isinstance(value, str) else "not reached" if value is None else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; the best final loss of each student (and init) is in bold."""
    lines = [
        "| student | init | recipe | seeds | steps | eval at step 0 | final eval | gap closed "
        "| tokens to 50% | tokens to 90% | TFLOP to 50% | TFLOP to 90% | s to 50% | s to 90% "
        "| TFLOP | train s | train tokens/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row["student"], row["init"])
        best[key] = min(best.get(key, math.inf), row["final"])
    for row in rows:
        final = f"{row['final']:.4f}"
        if row["seeds"] > 1:
            final += f" ± {row['final_spread'] / 2:.4f}"
        if row["final"] == best[(row["student"], row["init"])]:
            final = f"**{final}**"
        rate = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}"
        flops = "-" if row["flops"] is None else _fmt_flops(row["flops"])
        seconds = "-" if row["seconds"] is None else _fmt_seconds(row["seconds"])
        lines.append(
            f"| {STUDENT_LABELS[row['student']]} | {row['init']} | {RECIPE_LABELS[row['recipe']]} "
            f"| {row['seeds']} | {row['steps']} | {row['initial']:.4f} | {final} | {row['closed']:.1%} "
            f"| {_fmt_tokens(row['tokens_50'])} | {_fmt_tokens(row['tokens_90'])} "
            f"| {_fmt_flops(row['flops_50'])} | {_fmt_flops(row['flops_90'])} "
            f"| {_fmt_seconds(row['seconds_50'])} | {_fmt_seconds(row['seconds_90'])} | {flops} | {seconds} | {rate} |"
        )
    return "\n".join(lines)


#: the x axis of a plot: the record's cost axis, its scale and its label
AXES = {"tokens": (1e3, "training tokens (thousands)"), "flops": (1e12, "training TFLOP (analytic)"),
        "seconds": (1.0, "training seconds (measured)")}


def plot(records: list[dict[str, Any]], images: pathlib.Path, suffix: str = "",
         axis: str = "tokens") -> list[pathlib.Path]:
    """`quality_pruned<suffix>.png` (one panel per pruned student) and
    `quality_random<suffix>.png` (the random-init controls): held-out loss against the
    training cost on `axis` (tokens, flops or seconds), averaged over seeds (records of one
    budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images.mkdir(parents=True, exist_ok=True)
    colours = dict(zip(RECIPES, plt.get_cmap("tab20").colors))  # one colour per recipe
    groups = _groups(records)
    written = []
    for init in ("prune", "random"):
        students = [s for s in STUDENTS if any(k[0] == s and k[1] == init for k in groups)]
        if not students:
            continue
        fig, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students), 4.2), squeeze=False)
        for ax, student in zip(axes[0], students):
            for (s, i, recipe), group in groups.items():
                if (s, i) != (student, init):
                    continue
                scale, _ = AXES[axis]
                cost = np.mean([cost_axis(g, axis) for g in group], axis=0) / scale
                loss = np.mean([g["eval_loss"] for g in group], axis=0)
                ax.plot(cost, loss, marker=".", label=recipe, color=colours[recipe])
                teacher = group[0]["teacher_loss"]
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            ax.set_title(f"{STUDENT_LABELS[student]}, {init}")
            ax.set_xlabel(AXES[axis][1])
            ax.set_ylabel("held-out loss (nats/byte)")
            if init == "random":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = images / f"quality_{'pruned' if init == 'prune' else 'random'}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _shown(path: pathlib.Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(records: list[dict[str, Any]], page: pathlib.Path, images: pathlib.Path,
           results: pathlib.Path = RESULTS) -> str:
    """Write a table and plots per budget; replace the generated section of `page`."""
    command = COMMAND + "".join(f" {flag} {_shown(path)}" for flag, path, default in (
        ("--results", results, RESULTS), ("--page", page, PAGE), ("--images", images, IMAGES))
        if path.resolve() != default.resolve())
    teachers = sorted({r.get("teacher_sha256") or "not recorded" for r in records})
    body = [BEGIN, "", f"Produced by `{command} --report-only` from every run's curve in `{_shown(results)}` "
            f"(teacher weights sha256 {', '.join(t[:12] for t in teachers)}).", ""]
    def variant(record: dict[str, Any]) -> tuple[str, int | None, float]:
        budget = record.get("budget", "steps")
        return budget, record["steps"] if budget == "steps" else None, record["config"]["learning_rate"]

    variants = sorted({variant(r) for r in records},
                      key=lambda v: (BUDGETS.index(v[0]), v[1:] != (DEFAULT_STEPS, DEFAULT_LR), v[1] or 0, v[2]))
    for budget, steps, lr in variants:
        chosen = [r for r in records if variant(r) == (budget, steps, lr)]
        first = chosen[0]
        cfg = first["config"]
        flags = (f" --steps {steps}" if steps not in (None, DEFAULT_STEPS) else "") + (
            f" --learning-rate {lr:g}" if lr != DEFAULT_LR else "") + (
            f" --budget {budget}" if budget != "steps" else "")
        suffix = (f"_steps{steps}" if steps not in (None, DEFAULT_STEPS) else "") + (
            f"_learningrate{lr:g}" if lr != DEFAULT_LR else "") + (f"_equal_{budget}" if budget != "steps" else "")
        if budget == "steps":
            tokens = steps * first["tokens_per_step"]
            heading = f"{tokens:,} training tokens ({steps} steps), peak learning rate {lr:g}"
            size = f"{steps} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes = {tokens:,} training tokens"
        else:
            what = "analytic training FLOPs" if budget == "flops" else "measured training seconds on this machine"
            heading = f"Equal {budget}: the main job's cost in {what}, peak learning rate {lr:g}"
            size = (f"as many steps of {cfg['batch_size']} x {cfg['seq_len']} bytes as the main job's recipe "
                    f"({MAIN_RECIPE}, {STUDENT_LABELS[MAIN_STUDENT]}) costs in {DEFAULT_STEPS} steps, by {what} "
                    "(a cheaper recipe gets more steps; the `steps` column)")
        if len(variants) > 1:
            body += [f"### {heading}", ""]
        body += [
            f"Budget per run: {size}; held-out loss (nats/byte) on {cfg['eval_batches']} fixed batches of "
            f"{cfg['batch_size']} x {cfg['seq_len']} bytes "
            + (f"every {cfg['eval_every']} steps" if budget == "steps" else "six times per run") + "; AdamW at "
            f"{cfg['learning_rate']} with {cfg['warmup_steps']} warm-up steps and cosine decay. "
            f"Teacher: {first['teacher_loss']:.4f}. {len(chosen)} run{'' if len(chosen) == 1 else 's'}"
            + (f" (`{flags.strip()}`)." if flags else "."),
            "",
            table(aggregate(chosen)),
            "",
        ]
        axis = {"steps": "tokens", "flops": "flops", "seconds": "seconds"}[budget]
        for path in plot(chosen, images, suffix, axis):
            link = os.path.relpath(path.resolve(), page.resolve().parent)  # as the page sees it
            body += [f"![{path.stem}]({link})", ""]
    body.append(END)
    return write_section(page, "\n".join(body), BEGIN, END, "Quality study")


def write_section(page: pathlib.Path, section: str, begin: str, end: str, title: str) -> str:
    """Put `section` (which starts with `begin` and ends with `end`) into `page`: in place
    of the text between those markers, else after the page's text; a missing page is made
    with the heading `title`. Returns `section`."""
    if page.exists():
        text = page.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + section + tail
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text = f"# {title}\n\n" + section + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return section


def _config_defaults() -> dict[str, Any]:
    from blockdistill.app.runconfig import DistillConfig

    return {f.name: f.default for f in dataclasses.fields(DistillConfig) if f.default is not dataclasses.MISSING}


def _field_matches(value: Any, expected: Any) -> bool:
    """A recorded config value is its student's or recipe's; half the depth of the record's
    teacher (`HALF_DEPTH`) is any positive depth."""
    if expected == HALF_DEPTH:
        return isinstance(value, int) and value > 0
    return value == expected


def load_results(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    """The recorded runs; each must have been run with its recipe's and student's fields."""
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, record in results.items():
        expected = {**recipe(record["recipe"], record.get("steps", DEFAULT_STEPS)), **STUDENTS[record["student"]]}
        # a field added to the run config after a record was made had its default then
        config = {**_config_defaults(), **record["config"]}
        wrong = {k: config.get(k) for k, v in expected.items() if not _field_matches(config.get(k), v)}
        if wrong:
            raise ValueError(f"{path}: run {name} was not run with recipe {record['recipe']!r} "
                             f"and student {record['student']!r}: it has {wrong}")
    teachers = {r.get("teacher_sha256") for r in results.values()}
    if len(teachers) > 1:
        raise ValueError(f"{path}: runs of {len(teachers)} teachers in one file "
                         f"({', '.join(str(t) for t in teachers)}): one file holds one teacher's study")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT,
                        help=f"folder of the runs, one subfolder per teacher (default {OUT})")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--only", default="*", help="comma-separated globs over run names, e.g. 'mlp-prune/*,kv-*/kd/*' (default all)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per run (default {DEFAULT_STEPS}, the main job's)")
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LR,
                        help=f"peak learning rate (default {DEFAULT_LR:g}, the main job's)")
    parser.add_argument("--budget", choices=BUDGETS, default="steps",
                        help="steps per run: as given (default), or the main job's cost in analytic "
                             "FLOPs or in measured seconds (step times measured side by side first, "
                             "kept next to the results)")
    parser.add_argument("--teacher", default=None,
                        help="teacher folder (blockdistill or Hugging Face; default: the shipped one)")
    parser.add_argument("--data", default=None, help="training text (default: the default corpus)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny budget for testing the machinery; results go to --results only")
    parser.add_argument("--results", default=None, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--page", default=None, help=f"page to write the report into (default {PAGE.relative_to(ROOT)})")
    parser.add_argument("--images", default=None, help=f"folder for the plots (default {IMAGES.relative_to(ROOT)})")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the results")
    args = parser.parse_args(argv)
    own_outputs = None not in (args.results, args.page, args.images)
    if args.quick and not own_outputs:
        parser.error("--quick needs --results, --page and --images (its numbers never go into the docs)")
    extra = {k: v for k, v in (("teacher", args.teacher), ("data", args.data)) if v is not None}
    if extra and not own_outputs:
        parser.error("--teacher and --data need --results, --page and --images "
                     "(the default files hold the study of the shipped teacher)")
    results_path = pathlib.Path(args.results) if args.results else RESULTS
    page = pathlib.Path(args.page) if args.page else PAGE
    images = pathlib.Path(args.images) if args.images else IMAGES
    if BEFORE_RUNS is not None and not args.report_only:
        BEFORE_RUNS(results_path, pathlib.Path(args.out), args.quick)
    results = load_results(results_path)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if not args.report_only:
        from blockdistill._files import write_json

        results_path.parent.mkdir(parents=True, exist_ok=True)

        teacher = teacher_identity(extra.get("teacher"))
        foreign = sorted(n for n, r in results.items() if r.get("teacher_sha256") != teacher)
        if foreign:
            parser.error(f"{results_path} holds runs of another teacher (e.g. {foreign[0]}: "
                         f"{results[foreign[0]].get('teacher_sha256')}, not {teacher}); "
                         "one file holds one teacher's study: pass another --results")
        patterns = args.only.split(",")
        steps = args.steps
        out = pathlib.Path(args.out) / teacher[:12]

        def wanted(runs: list[Run]) -> list[Run]:
            return [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in patterns)]

        # run names do not depend on the steps of an equal-cost budget: choose the runs first
        todo = wanted(plan(seeds, steps, args.learning_rate, args.budget, lambda *_: steps))
        if not todo:
            parser.error(f"--only {args.only!r} matches no run")
        # every run's seconds axis takes its programs' step seconds measured side by side
        seconds_path = results_path.with_name(results_path.stem + "_step_seconds.json")
        cells_todo = [(r.student, r.init, r.recipe) for r in todo if r.name not in results]
        seconds = measured_step_seconds(cells_todo, args.quick, extra, seconds_path, teacher) if cells_todo else {}
        if args.budget != "steps" and cells_todo:  # (every run recorded: nothing to size)
            steps_for = equal_cost_steps(args.budget, steps, args.quick, extra, seconds)
            todo = [dataclasses.replace(r, steps=steps_for(r.student, r.init, r.recipe)) for r in todo]
        for i, run in enumerate(todo):
            if run.name in results:
                continue
            same = twin(run)
            if same.name in results:  # the same run under the equal-steps budget: reuse it
                results[run.name] = {**results[same.name], "budget": run.budget, "name": run.name}
            else:
                print(f"[{i + 1}/{len(todo)}] {run.name}", file=sys.stderr, flush=True)
                cell = "/".join((run.student, run.init, run.recipe))
                results[run.name] = execute(run, out, args.quick, extra, seconds[cell], teacher)
            write_json(results_path, results)
    if not results:
        print("no results yet: run without --report-only first", file=sys.stderr)
        return 1
    print(report(list(results.values()), page, images, results_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
