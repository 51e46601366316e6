"""The block solver: pick one candidate block per layer so that the summed score is
smallest under per-kind cost budgets (NVIDIA Puzzle's "multiple-choice knapsack"),
solved exactly as a small mixed-integer program."""

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse
from scipy.optimize import Bounds, LinearConstraint, milp

# A chosen student may exceed a budget by this relative amount (float64 summation noise).
_BUDGET_RTOL = 1e-9
# HiGHS accepts points that break a (scaled) row by its feasibility tolerance; a choice that
# breaks a budget in exact arithmetic is cut off and the program solved again, at most this
# many times.
_MAX_CUTS = 50


@dataclasses.dataclass(frozen=True)
class Choice:
    """The student that `blockdistill.choose_blocks` assembled.

    **Arguments:**

    - `indices`: the chosen candidate index of each layer.
    - `score`: the sum of the chosen candidates' scores.
    - `costs`: per cost kind (every kind given to `choose_blocks`), the sum of the chosen
        candidates' costs.

    **Example:**

    ```python
    choice = bd.choose_blocks([[0.0, 1.0], [0.0, 2.0]], {"params": [[2, 1], [2, 1]]}, {"params": 3})
    choice.to_dict()  # {'indices': [1, 0], 'score': 1.0, 'costs': {'params': 3.0}}
    ```
    """

    indices: tuple[int, ...]
    score: float
    costs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: `{"indices": [...], "score": ..., "costs": {...}}`."""
        return {"indices": list(self.indices), "score": self.score, "costs": dict(self.costs)}


def _fmt(value: float) -> str:
    """A cost as text: integral values without a trailing `.0`, others in full."""
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def _as_scores(scores: Any) -> np.ndarray:
    try:
        array = np.array(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scores must be a [layers, candidates] array of numbers: {error}") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [layers, candidates] array, got shape {array.shape}")
    if np.any(np.isneginf(array)):
        layer, candidate = (int(i) for i in np.argwhere(np.isneginf(array))[0])
        raise ValueError(f"scores[{layer}, {candidate}] is -inf: scores must be finite, or +inf/nan "
                         "for a candidate that is not available")
    array[np.isnan(array)] = np.inf
    return array


def _as_costs(costs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    arrays = {}
    for kind, value in costs.items():
        if not isinstance(kind, str):
            raise ValueError(f"cost kinds must be strings, got {kind!r}")
        try:
            array = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"costs[{kind!r}] must be an array of numbers: {error}") from None
        if array.shape != shape:
            raise ValueError(f"costs[{kind!r}] has shape {array.shape} but scores has shape {shape}: "
                             "give one cost per (layer, candidate)")
        bad = ~np.isfinite(array)
        if np.any(bad):
            layer, candidate = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"costs[{kind!r}][{layer}, {candidate}] is {array[layer, candidate]}: "
                             "costs must be finite")
        if np.any(array < 0):
            layer, candidate = (int(i) for i in np.argwhere(array < 0)[0])
            raise ValueError(f"costs[{kind!r}][{layer}, {candidate}] is {array[layer, candidate]}: "
                             "costs must be >= 0")
        arrays[kind] = array
    return arrays


def _as_budgets(budgets: Mapping[str, Any], kinds: list[str]) -> dict[str, float]:
    if not budgets:
        raise ValueError(f"budgets is empty: give at least one budget, for one of the cost kinds {kinds}")
    checked = {}
    for kind, value in budgets.items():
        if kind not in kinds:
            raise ValueError(f"budget kind {kind!r} has no costs: the known cost kinds are {kinds}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"budgets[{kind!r}] is {value!r}: a budget must be a positive finite number")
        number = float(value)
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"budgets[{kind!r}] is {value!r}: a budget must be a positive finite number")
        checked[kind] = number
    return checked


def choose_blocks(
    scores: Any,
    costs: Mapping[str, Any],
    budgets: Mapping[str, float | int | np.number],
) -> Choice:
    """Pick one candidate block per layer with the smallest summed score whose summed
    costs stay within every budget (an exact multiple-choice knapsack, solved with
    `scipy.optimize.milp`).

    **Arguments:**

    - `scores`: a `[layers, candidates]` array of floats, lower is better (e.g. the
        blockwise distillation loss of each candidate). `+inf` or `nan` marks a candidate
        that is not available at that layer.
    - `costs`: per cost kind (e.g. `"params"`, `"kv_bytes"`), a `[layers, candidates]`
        array of finite costs `>= 0`.
    - `budgets`: per cost kind (a non-empty subset of `costs`' kinds), an upper bound on
        the sum over layers of the chosen candidates' cost; a positive finite number.

    **Returns:**

    A `blockdistill.Choice`: the chosen candidate `indices` (one per layer), their summed
    `score` and their summed `costs` for every kind in `costs`. The result is the exact
    optimum and, among equally good students, deterministic for a given input.

    Raises `ValueError` for malformed input (naming the offending kind, layer or value)
    and for budgets that no student meets (naming the cheapest achievable cost).

    **Example:**

    ```python
    scores = np.array([[0.0, 0.2, 0.9],    # layer 0: candidate 0 is the teacher's block
                       [0.0, 0.1, 0.5]])   # layer 1
    params = np.array([[100, 60, 20],
                       [100, 60, 20]])
    choice = bd.choose_blocks(scores, {"params": params}, {"params": 130})
    choice.indices  # (1, 1): two mid-size blocks beat one full and one tiny block
    ```
    """
    score_array = _as_scores(scores)
    n_layers, n_candidates = score_array.shape
    cost_arrays = _as_costs(costs, score_array.shape)
    limits = _as_budgets(budgets, list(cost_arrays))

    available = np.isfinite(score_array)
    for layer in range(n_layers):
        if not available[layer].any():
            raise ValueError(f"layer {layer} has no available candidate: every score of that layer "
                             "is +inf or nan")

    # Each budget alone: the cheapest student under that kind.
    cheapest = {kind: math.fsum(float(np.min(cost_arrays[kind][layer][available[layer]]))
                                for layer in range(n_layers))
                for kind in cost_arrays}
    over = {kind: limit for kind, limit in limits.items()
            if cheapest[kind] > limit * (1 + _BUDGET_RTOL)}
    if over:
        minimum = ", ".join(f"{kind}={_fmt(cheapest[kind])}" for kind in over)
        raise ValueError(f"budgets {over} cannot be met: the cheapest student costs {minimum}")

    # Variables: x[l, c] for each available (layer, candidate), in row-major order.
    layer_of, candidate_of = np.nonzero(available)
    n_vars = len(layer_of)
    # Subtracting each layer's best score changes no argmin and keeps the objective near 0.
    offsets = np.array([score_array[layer][available[layer]].min() for layer in range(n_layers)])
    objective = score_array[layer_of, candidate_of] - offsets[layer_of]

    one_per_layer = scipy.sparse.csr_array(
        (np.ones(n_vars), (layer_of, np.arange(n_vars))), shape=(n_layers, n_vars))
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0)]
    budget_kinds = list(limits)
    # Each budget row divided by its budget, so that every row reads "<= 1".
    budget_rows = np.stack([cost_arrays[kind][layer_of, candidate_of] / limits[kind] for kind in budget_kinds])
    constraints.append(LinearConstraint(budget_rows, -np.inf, 1.0))

    # The true optimum (no gap), and rows/integrality held far tighter than HiGHS' defaults
    # (1e-7, 1e-6), so that a choice that breaks a budget is rarely even proposed.
    options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0,
               "primal_feasibility_tolerance": 1e-9, "mip_feasibility_tolerance": 1e-9}
    rejected: list[tuple[int, ...]] = []
    for _ in range(_MAX_CUTS + 1):
        cuts = []
        if rejected:
            # Cut off each rejected choice: not all of its variables may be 1 again.
            rows = np.zeros((len(rejected), n_vars))
            for row, chosen in enumerate(rejected):
                rows[row, list(chosen)] = 1.0
            cuts = [LinearConstraint(rows, -np.inf, n_layers - 1.0)]
        with warnings.catch_warnings():
            # scipy passes the options it does not name itself to HiGHS verbatim, with a warning
            warnings.filterwarnings("ignore", message="Unrecognized options detected", category=RuntimeWarning)
            result = milp(objective, integrality=np.ones(n_vars), bounds=Bounds(0.0, 1.0),
                          constraints=constraints + cuts, options=options)
        if result.status == 2:
            alone = ", ".join(f"{kind}={_fmt(cheapest[kind])}" for kind in limits)
            raise ValueError(f"budgets {limits} cannot be met together: each is achievable alone "
                             f"(the cheapest student costs {alone}), but no single choice of blocks "
                             "meets all of them at once")
        if result.status != 0 or result.x is None:
            raise RuntimeError(f"the block solver (scipy.optimize.milp) failed: status {result.status}, "
                               f"{result.message}")

        x = np.round(result.x)
        chosen = tuple(int(i) for i in np.flatnonzero(x == 1.0))
        per_layer = np.bincount(layer_of[list(chosen)], minlength=n_layers)
        if len(chosen) != n_layers or np.any(per_layer != 1):
            raise RuntimeError(f"the block solver returned a point that does not round to one block per "
                               f"layer: blocks per layer {per_layer.tolist()} (x = {result.x.tolist()})")
        indices = tuple(int(candidate_of[i]) for i in chosen)
        totals = {kind: math.fsum(float(array[layer, c]) for layer, c in enumerate(indices))
                  for kind, array in cost_arrays.items()}
        broken = {kind: totals[kind] for kind in budget_kinds
                  if totals[kind] > limits[kind] * (1 + _BUDGET_RTOL)}
        if not broken:
            score = math.fsum(float(score_array[layer, c]) for layer, c in enumerate(indices))
            return Choice(indices=indices, score=score, costs=totals)
        rejected.append(chosen)

    raise RuntimeError(f"the block solver kept returning choices that break the budgets {limits} "
                       f"in exact arithmetic (last: indices {indices}, costs {broken}) after "
                       f"{_MAX_CUTS} cuts")
