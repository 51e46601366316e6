"""Signals study: which logit divergence and how much on-policy data help the hardest student.

The quality study (`experiments/quality.py`, docs/quality.md) compares blockwise and logit
recipes with one divergence, forward KL, on corpus rows only. This study asks, for the
student that loses most (half the teacher's layers, pruned and grouped), whether the other
divergences (`--divergence reverse_kl | jsd | tvd`) or on-policy distillation (GKD: a
fraction of each batch continued by the student itself from corpus prompts, the divergence
taken on its own tokens) beat forward KL and the best recipe so far (labels alone, at
equal seconds), at equal measured seconds: an on-policy step pays for its sampling, so it
gets fewer steps.

It is the quality study's machinery (loaded from `experiments/quality.py` as a private
module and configured here): every run is an ordinary in-process `blockdistill distill`
run, a finished run is skipped and a stopped one resumes from its checkpoint, and each
record has the same fields (held-out loss curve, analytic FLOPs, step seconds measured side
by side; an on-policy recipe's step seconds include its sampling). The budget is what KD
into this student costs in the main job's 150 steps.

    python experiments/signals.py --budget seconds                      # seed 0 of every recipe
    python experiments/signals.py --budget seconds --seeds 1,2 --only 'layers-prune/ce/*,layers-prune/kd-jsd/*'
    python experiments/signals.py --report-only
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def _load(name: str, file: pathlib.Path):
    """A private instance of a sibling script (configuring it here changes no other import)."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


quality = _load("_signals_study_quality", HERE / "quality.py")

#: every recipe pins the divergence and the on-policy fields, so that a change of the
#: defaults never changes a recipe
_KD = {"blockwise_weight": 0.0, "blockwise_schedule": "constant", "divergence": "kl", "jsd_beta": 0.5,
       "onpolicy_fraction": 0.0}
RECIPES = {  # in the order they run: the main questions first
    "kd": _KD,
    "onpolicy-0.5": {**_KD, "onpolicy_fraction": 0.5},
    "kd-jsd": {**_KD, "divergence": "jsd"},
    "onpolicy-0.5-jsd": {**_KD, "onpolicy_fraction": 0.5, "divergence": "jsd"},
    "ce": {**_KD, "teacher_weight": 0.0, "label_weight": 1.0},  # the best at equal seconds so far
    "kd-rkl": {**_KD, "divergence": "reverse_kl"},
    # GKD: lambda of the batch written by the student at temperature 1 from the row's first half
    "onpolicy-0.25": {**_KD, "onpolicy_fraction": 0.25},
    "onpolicy-1.0": {**_KD, "onpolicy_fraction": 1.0},
    "kd-tvd": {**_KD, "divergence": "tvd"},
}
RECIPE_LABELS = {
    "kd": "KD, forward KL",
    "ce": "labels only (CE, no teacher)",
    "kd-rkl": "KD, reverse KL",
    "kd-jsd": "KD, JSD (beta 0.5)",
    "kd-tvd": "KD, total variation",
    "onpolicy-0.25": "on-policy 25% of rows, forward KL",
    "onpolicy-0.5": "on-policy 50% of rows, forward KL",
    "onpolicy-0.5-jsd": "on-policy 50% of rows, JSD (GKD)",
    "onpolicy-1.0": "on-policy all rows, forward KL",
}

quality.RECIPES = RECIPES
quality.RECIPE_LABELS = RECIPE_LABELS
quality.GRID = {("layers", "prune"): tuple(RECIPES)}
quality.COST_RECIPES = tuple(RECIPES)
quality.MAIN_STUDENT = "layers"  # the budget: KD into this student in the main job's steps
quality.MAIN_RECIPE = "kd"
quality.RESULTS = HERE / "signals_results.json"
quality.PAGE = ROOT / "docs" / "signals.md"
quality.IMAGES = ROOT / "docs" / "images" / "signals"
quality.BEGIN = "<!-- signals-study:begin (written by experiments/signals.py; do not edit) -->"
quality.END = "<!-- signals-study:end -->"
quality.COMMAND = "python experiments/signals.py"
quality.OUT = "runs/signals"
_budget = quality.budget


def budget(steps: int, quick: bool) -> dict:
    """The quality study's run sizes; `--quick` rows come four to a batch (a quarter of
    the batch is then one row for the student to write)."""
    return {**_budget(steps, quick), **({"batch_size": 4} if quick else {})}


quality.budget = budget

# ----------------------------------------------------------------------------- on the student's own samples

#: the evaluation on the student's own text (`bd.score_samples`): the first SAMPLE_PROMPT
#: tokens of SAMPLE_ROWS held-out rows (spread over the split), continued by SAMPLE_NEW
#: tokens sampled at temperature 1 with one fixed key, the same for every run (paired)
SAMPLE_ROWS, SAMPLE_PROMPT, SAMPLE_NEW, SAMPLE_SEED = 16, 128, 128, 1234
SAMPLES_BEGIN = "<!-- signals-samples:begin (written by experiments/signals.py; do not edit) -->"
SAMPLES_END = "<!-- signals-samples:end -->"
SAMPLE_FIELDS = ("reverse_kl", "forward_kl", "teacher_nll", "student_nll")


def sample_spec(quick: bool) -> dict:
    if quick:
        return {"rows": 2, "prompt": 16, "new": 16, "seed": SAMPLE_SEED}
    return {"rows": SAMPLE_ROWS, "prompt": SAMPLE_PROMPT, "new": SAMPLE_NEW, "seed": SAMPLE_SEED}


def sample_scores(student_folder: pathlib.Path, cfg, quick: bool) -> dict:
    """`bd.score_samples` of a finished run's student, of its initial (pruned) self and of
    the teacher (whose reverse KL to itself is 0: its row gives the teacher's own NLL of
    its own samples, the floor a student's `teacher_nll` approaches)."""
    import jax

    import blockdistill as bd
    from blockdistill.app.distill import load_teacher_and_student

    spec = sample_spec(quick)
    tokenizer = bd.load_tokenizer(cfg.teacher)
    dataset = bd.token_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction)
    rows = dataset.val.spread(spec["rows"])[0][: spec["rows"], : spec["prompt"]]
    teacher_model, initial = load_teacher_and_student(cfg, dataset)[:2]
    teacher = teacher_model.model if hasattr(teacher_model, "model") else teacher_model
    key = jax.random.key(spec["seed"])

    def scores(model) -> dict:
        out = bd.score_samples(model, teacher, jax.numpy.asarray(rows), spec["new"], key=key)
        return {name: float(getattr(out, name)) for name in SAMPLE_FIELDS}

    return {"student": scores(bd.load_model(student_folder)), "initial": scores(initial),
            "teacher": scores(teacher), "spec": spec}


_execute = quality.execute


def execute(run, root, quick, extra, stage_seconds, teacher):
    """The quality study's run, then its student scored on its own samples."""
    record = _execute(run, root, quick, extra, stage_seconds, teacher)
    cfg = quality.config_for(run, root / run.name, quick, extra)
    record["samples"] = sample_scores(root / run.name / "student", cfg, quick)
    return record


quality.execute = execute


def backfill(results_path: pathlib.Path, out: pathlib.Path, quick: bool) -> int:
    """Score on their own samples the recorded runs made before that score existed, from
    the students their run folders kept; returns how many were scored."""
    import json

    from blockdistill._files import write_json

    if not results_path.exists():
        return 0
    results = json.loads(results_path.read_text())
    done = 0
    for name, record in results.items():
        folder = out / record["teacher_sha256"][:12] / name
        if "samples" in record or not (folder / "student" / "config.json").is_file():
            continue
        run = quality.Run(record["student"], record["init"], record["recipe"], record["seed"], record["steps"],
                          record["learning_rate"], record["budget"])
        extra = {k: record["config"][k] for k in ("teacher", "data") if record["config"].get(k) is not None}
        record["samples"] = sample_scores(folder / "student", quality.config_for(run, folder, quick, extra), quick)
        write_json(results_path, results)
        print(f"scored {name} on its own samples", file=sys.stderr, flush=True)
        done += 1
    return done


def samples_table(records: list[dict]) -> str:
    """Per recipe (mean over its seeds, with the spread when there are more), the scores on
    the student's own samples, the initial student's and the teacher's first."""
    scored = [r for r in records if "samples" in r]
    if not scored:
        return ""
    spec = scored[0]["samples"]["spec"]
    head = ("| recipe | seeds | reverse KL (student to teacher) | forward KL | teacher NLL of the student's tokens "
            "| student NLL of its tokens |\n|---|---:|---:|---:|---:|---:|")
    lines = [head]

    def row(label, values):
        cells = []
        for name in SAMPLE_FIELDS:
            xs = [v[name] for v in values]
            mean = sum(xs) / len(xs)
            cells.append(f"{mean:.4f}" + (f" ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else ""))
        return f"| {label} | {len(values)} | " + " | ".join(cells) + " |"

    lines.append(row("the teacher (its own samples)", [scored[0]["samples"]["teacher"]]))
    lines.append(row("initial student (pruned)", [scored[0]["samples"]["initial"]]))
    by_recipe: dict[str, list[dict]] = {}
    for record in scored:
        if record.get("budget") == "seconds":
            by_recipe.setdefault(record["recipe"], []).append(record["samples"]["student"])
    for name in RECIPES:
        if name in by_recipe:
            lines.append(row(RECIPE_LABELS[name], by_recipe[name]))
    intro = (f"On the student's own text: the first {spec['prompt']} tokens of {spec['rows']} held-out rows, each "
             f"continued by {spec['new']} tokens the student samples at temperature 1 (one fixed key, the same "
             "prompts and key for every run), scored with `bd.score_samples` (nats per sampled token; lower is "
             "better in every column but the last; ± is half the range over seeds).")
    return "\n".join([SAMPLES_BEGIN, "", intro, "", *lines, "", SAMPLES_END])


_report = quality.report


def report(records, page, images, results=quality.RESULTS):
    section = _report(records, page, images, results)
    table = samples_table(records)
    if table:
        quality.write_section(page, table, SAMPLES_BEGIN, SAMPLES_END, "Signals study")
    return section + ("\n\n" + table if table else "")


quality.report = report
quality.__doc__ = __doc__


def main(argv: list[str] | None = None) -> int:
    quality.BEFORE_RUNS = backfill  # the runs recorded before the own-text score get it first
    return quality.main(argv)


if __name__ == "__main__":
    sys.exit(main())
