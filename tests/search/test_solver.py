"""The block solver (`choose_blocks`): exact optimum under budgets, checked against brute
force and an exact dynamic program, and its input checks."""

import itertools
import math
import warnings

import numpy as np
import pytest

import blockdistill.search.solver as solver
from blockdistill.search.solver import Choice, choose_blocks


def brute_force(scores, costs, budgets, rtol=1e-9):
    """The smallest summed score over every choice that meets the budgets (None if none)."""
    scores = np.asarray(scores, dtype=np.float64)
    n_layers, n_candidates = scores.shape
    best = None
    for indices in itertools.product(range(n_candidates), repeat=n_layers):
        picked = [scores[layer, c] for layer, c in enumerate(indices)]
        if not all(np.isfinite(picked)):
            continue
        if any(math.fsum(costs[kind][layer, c] for layer, c in enumerate(indices)) > limit * (1 + rtol)
               for kind, limit in budgets.items()):
            continue
        total = math.fsum(picked)
        if best is None or total < best:
            best = total
    return best


def check_choice(choice, scores, costs, budgets):
    """The choice is well formed, meets every budget, and reports its own score/costs."""
    scores = np.asarray(scores, dtype=np.float64)
    assert isinstance(choice, Choice)
    assert len(choice.indices) == scores.shape[0]
    assert all(isinstance(i, int) and 0 <= i < scores.shape[1] for i in choice.indices)
    picked = [scores[layer, c] for layer, c in enumerate(choice.indices)]
    assert all(np.isfinite(picked)), "an unavailable candidate was chosen"
    assert choice.score == pytest.approx(math.fsum(picked), rel=1e-12, abs=1e-12)
    assert set(choice.costs) == set(costs)
    for kind, array in costs.items():
        total = math.fsum(np.asarray(array, dtype=np.float64)[layer, c] for layer, c in enumerate(choice.indices))
        assert choice.costs[kind] == pytest.approx(total, rel=1e-12, abs=1e-9)
    for kind, limit in budgets.items():
        assert choice.costs[kind] <= limit * (1 + 1e-9), (kind, choice.costs[kind], limit)


def random_case(rng, n_kinds):
    n_layers = int(rng.integers(1, 6))
    n_candidates = int(rng.integers(1, 6))
    scores = rng.uniform(1e-3, 10.0, size=(n_layers, n_candidates))
    if n_candidates > 1:
        hidden = rng.random((n_layers, n_candidates)) < 0.25
        hidden[np.arange(n_layers), rng.integers(0, n_candidates, n_layers)] = False  # one left per layer
        scores[hidden] = np.where(rng.random(hidden.sum()) < 0.5, np.inf, np.nan)
    kinds = ["params", "kv_bytes"][:n_kinds]
    costs = {kind: rng.integers(0, 50, size=(n_layers, n_candidates)).astype(np.float64) for kind in kinds}
    if rng.random() < 0.5:
        costs["params"] = costs["params"] * 1.37 + rng.uniform(0, 1, size=(n_layers, n_candidates))
    costs["unbudgeted"] = rng.uniform(0, 5, size=(n_layers, n_candidates))
    available = np.isfinite(scores)
    budgets = {}
    for kind in kinds:
        low = sum(costs[kind][layer][available[layer]].min() for layer in range(n_layers))
        high = sum(costs[kind][layer][available[layer]].max() for layer in range(n_layers))
        budgets[kind] = float(rng.uniform(low, high)) if high > low else float(low) + 1.0
        if budgets[kind] <= 0:
            budgets[kind] = 1.0
    return scores, costs, budgets


@pytest.mark.parametrize("n_kinds", [1, 2])
def test_matches_brute_force(n_kinds):
    rng = np.random.default_rng(1234 + n_kinds)
    solved = infeasible = 0
    for _ in range(120):
        scores, costs, budgets = random_case(rng, n_kinds)
        best = brute_force(scores, costs, budgets)
        if best is None:
            with pytest.raises(ValueError, match="cannot be met"):
                choose_blocks(scores, costs, budgets)
            infeasible += 1
            continue
        choice = choose_blocks(scores, costs, budgets)
        check_choice(choice, scores, costs, budgets)
        assert choice.score == pytest.approx(best, rel=0, abs=1e-9)
        solved += 1
    assert solved >= 80  # the cases mostly have a solution (and budgets bind in many)


def test_budget_binds_exactly_at_a_choice():
    # the budget is exactly the cost of the best feasible student: it must not be missed
    scores = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 5.0], [0.0, 0.5, 4.0]])
    params = np.array([[0.3, 0.2, 0.1], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]]) * 1e9 + 12345.678
    budget = float(params[0, 1] + params[1, 0] + params[2, 1])
    choice = choose_blocks(scores, {"params": params}, {"params": budget})
    check_choice(choice, scores, {"params": params}, {"params": budget})
    assert choice.score == pytest.approx(brute_force(scores, {"params": params}, {"params": budget}), abs=1e-12)


def exact_dp(scores, units, budget_units):
    """The optimum for integer costs by dynamic programming over the budget (exact)."""
    best = np.zeros(budget_units + 1)  # best[b]: smallest score of the layers so far using <= b units
    for layer in range(scores.shape[0]):
        new = np.full(budget_units + 1, np.inf)
        for c in range(scores.shape[1]):
            u = int(units[layer, c])
            if u <= budget_units:
                new[u:] = np.minimum(new[u:], best[: budget_units + 1 - u] + scores[layer, c])
        best = new
    return best[budget_units]


def test_large_costs_match_exact_dynamic_program():
    rng = np.random.default_rng(7)
    n_layers, n_candidates = 30, 8
    units = rng.integers(10, 200, size=(n_layers, n_candidates))
    units[:, 0] = 200  # the teacher's block: the largest, best
    params = units.astype(np.float64) * 1e6  # ~1e8 parameters per block
    scores = rng.uniform(1e-3, 1.0, size=(n_layers, n_candidates)) * (200 - units) / 200
    kv = rng.uniform(1e6, 1e9, size=(n_layers, n_candidates))  # reported, not budgeted
    budget_units = int(units.min(axis=1).sum() + 0.4 * (200 * n_layers - units.min(axis=1).sum()))
    costs = {"params": params, "kv_bytes": kv}
    budgets = {"params": budget_units * 1e6}
    choice = choose_blocks(scores, costs, budgets)
    check_choice(choice, scores, costs, budgets)
    best = exact_dp(scores, units, budget_units)
    assert choice.score == pytest.approx(best, rel=0, abs=1e-9)
    assert choice.costs["params"] > 0.99 * budgets["params"]  # the budget binds
    assert choice.score < math.fsum(scores.min(axis=1)) + 100 and choice.score > math.fsum(scores.min(axis=1))


def test_large_costs_two_kinds_match_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(5):
        scores = rng.uniform(1e-3, 10.0, size=(4, 8))
        costs = {"params": rng.uniform(5e7, 3e8, size=(4, 8)), "kv_bytes": rng.uniform(1e8, 1e9, size=(4, 8))}
        budgets = {"params": float(np.quantile(costs["params"].sum(axis=0), 0.3)),
                   "kv_bytes": float(np.quantile(costs["kv_bytes"].sum(axis=0), 0.6))}
        best = brute_force(scores, costs, budgets)
        assert best is not None
        choice = choose_blocks(scores, costs, budgets)
        check_choice(choice, scores, costs, budgets)
        assert choice.score == pytest.approx(best, rel=0, abs=1e-9)


def test_barely_over_budget_is_not_chosen():
    # candidate 0 breaks the budget by 5e-8 (inside HiGHS' default feasibility tolerance): never pick it
    scores = np.array([[0.0, 1.0], [0.0, 0.0]])
    params = np.array([[1e9 * (1 + 5e-8), 0.0], [0.0, 0.0]])
    choice = choose_blocks(scores, {"params": params}, {"params": 1e9})
    assert choice.indices == (1, 0)
    assert choice.costs["params"] == 0.0


def test_over_budget_rounding_is_cut_off_and_resolved(monkeypatch):
    # should the MILP solver ever propose a choice that breaks a budget in exact arithmetic,
    # that choice is cut off and the program solved again
    real_milp = solver.milp
    calls = []

    def sloppy_milp(c, **kwargs):
        result = real_milp(c, **kwargs)
        calls.append(len(kwargs["constraints"]))
        if len(calls) == 1:
            result.x = np.array([1.0, 0.0, 1.0, 0.0])  # (0, 0): over the budget
        return result

    monkeypatch.setattr(solver, "milp", sloppy_milp)
    scores = np.array([[0.0, 1.0], [0.0, 0.5]])
    params = np.array([[10.0, 1.0], [10.0, 1.0]])
    choice = choose_blocks(scores, {"params": params}, {"params": 11.0})
    assert choice.indices == (0, 1)
    assert calls == [2, 3]  # the second solve carried one cut


def test_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_blocks(np.array([[0.0, 1.0]]), {"params": np.array([[2.0, 1.0]])}, {"params": 1.5})


def test_unconstrained_optimum_and_unavailable():
    scores = np.array([[np.inf, 0.5, 0.1], [0.2, np.nan, 0.3]])
    costs = {"params": np.ones((2, 3))}
    choice = choose_blocks(scores, costs, {"params": 10})  # an int budget
    assert choice.indices == (2, 0)
    assert choice.score == pytest.approx(0.3)
    assert choice.costs == {"params": 2.0}
    assert choice.to_dict() == {"indices": [2, 0], "score": choice.score, "costs": {"params": 2.0}}
    choice_np = choose_blocks(scores.tolist(), {"params": [[1, 1, 1], [1, 1, 1]]}, {"params": np.int64(2)})
    assert choice_np.indices == (2, 0)


def test_deterministic_with_ties():
    scores = np.zeros((6, 4))
    costs = {"params": np.tile(np.array([4.0, 3.0, 2.0, 1.0]), (6, 1))}
    first = choose_blocks(scores, costs, {"params": 12.0})
    for _ in range(3):
        assert choose_blocks(scores, costs, {"params": 12.0}) == first
    check_choice(first, scores, costs, {"params": 12.0})


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"costs\['params'\] has shape \(2, 2\) but scores has shape \(2, 3\)"):
        choose_blocks(np.zeros((2, 3)), {"params": np.zeros((2, 2))}, {"params": 1.0})


def test_scores_not_2d():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        choose_blocks(np.zeros(3), {"params": np.zeros(3)}, {"params": 1.0})


def test_unknown_budget_kind():
    with pytest.raises(ValueError, match=r"'flops'.*\['params', 'kv_bytes'\]"):
        choose_blocks(np.zeros((2, 2)), {"params": np.ones((2, 2)), "kv_bytes": np.ones((2, 2))}, {"flops": 1.0})


@pytest.mark.parametrize("bad", [-1.0, np.inf, np.nan])
def test_bad_cost(bad):
    params = np.ones((2, 3))
    params[1, 2] = bad
    with pytest.raises(ValueError, match=r"costs\['params'\]\[1, 2\] is"):
        choose_blocks(np.zeros((2, 3)), {"params": params}, {"params": 10.0})


def test_layer_without_candidate():
    scores = np.array([[0.0, 1.0], [np.inf, np.nan], [0.0, 0.0]])
    with pytest.raises(ValueError, match="layer 1 has no available candidate"):
        choose_blocks(scores, {"params": np.ones((3, 2))}, {"params": 10.0})


def test_negative_infinite_score():
    with pytest.raises(ValueError, match=r"scores\[0, 1\] is -inf"):
        choose_blocks(np.array([[0.0, -np.inf]]), {"params": np.ones((1, 2))}, {"params": 10.0})


@pytest.mark.parametrize("bad", [0.0, -5, np.inf, np.nan])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match=r"budgets\['params'\] is .*positive finite"):
        choose_blocks(np.zeros((1, 2)), {"params": np.ones((1, 2))}, {"params": bad})


def test_empty_budgets():
    with pytest.raises(ValueError, match="budgets is empty"):
        choose_blocks(np.zeros((1, 2)), {"params": np.ones((1, 2))}, {})


def test_infeasible_budget_names_the_cheapest_cost():
    scores = np.array([[0.0, 1.0], [0.0, 1.0]])
    params = np.array([[1000.0, 700.0], [900.0, 800.0]])
    with pytest.raises(ValueError, match=r"budgets \{'params': 1000.0\} cannot be met: the cheapest student costs params=1500"):
        choose_blocks(scores, {"params": params, "kv_bytes": np.zeros((2, 2))}, {"params": 1000, "kv_bytes": 1.0})
    # an unavailable candidate's cost does not count toward the cheapest student
    scores[1, 1] = np.inf
    with pytest.raises(ValueError, match="params=1600"):
        choose_blocks(scores, {"params": params}, {"params": 1500.0})


def test_infeasible_several_kinds():
    costs = {"params": np.array([[10.0, 20.0]]), "kv_bytes": np.array([[5.0, 1.0]])}
    with pytest.raises(ValueError, match=r"'params'.*'kv_bytes'.*params=10, kv_bytes=1"):
        choose_blocks(np.zeros((1, 2)), costs, {"params": 5.0, "kv_bytes": 0.5})


def test_jointly_infeasible():
    # each budget alone is met (by a different candidate), but no candidate meets both
    costs = {"params": np.array([[0.0, 10.0]]), "kv_bytes": np.array([[10.0, 0.0]])}
    with pytest.raises(ValueError, match=r"cannot be met together.*params=0, kv_bytes=0"):
        choose_blocks(np.zeros((1, 2)), costs, {"params": 5.0, "kv_bytes": 5.0})
