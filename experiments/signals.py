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
quality.__doc__ = __doc__

if __name__ == "__main__":
    sys.exit(quality.main())
