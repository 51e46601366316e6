"""The signals-study script (experiments/signals.py): the quality study's machinery with
its own recipes, files and budget reference; its numbers live in docs/signals.md."""


import pytest
from helpers import REPO_ROOT, loaded_script


@pytest.fixture(scope="module")
def signals():
    with loaded_script("signals_study", REPO_ROOT / "experiments" / "signals.py", "_signals_study_quality") as module:
        yield module


def test_every_recipe_is_a_valid_run_of_the_half_depth_student(signals, tmp_path):
    """Each recipe builds a run config (the divergence and on-policy fields checked by
    DistillConfig), pins the fields a default change could move, and the files, budget
    reference and run folder are the study's own, not the quality study's."""
    from blockdistill.app.runconfig import on_policy

    quality = signals.quality
    assert quality.MAIN_STUDENT == "layers" and quality.MAIN_RECIPE == "kd"
    assert quality.RESULTS.name == "signals_results.json" and quality.OUT == "runs/signals"
    assert quality.cells("seconds") == [("layers", "prune", r) for r in signals.RECIPES]
    seen = set()
    for name in signals.RECIPES:
        fields = quality.recipe(name)
        assert {"divergence", "onpolicy_fraction"} <= set(fields), name
        cfg = quality.config_for(quality.Run("layers", "prune", name, 0, budget="seconds"), tmp_path, quick=True)
        policy = on_policy(cfg)
        assert (policy is not None) == name.startswith("onpolicy"), name
        if policy is not None:
            policy.check(cfg.seq_len, cfg.batch_size)  # the quick batch holds a student row
        seen.add((cfg.divergence, cfg.onpolicy_fraction, cfg.teacher_weight))
    assert len(seen) == len(signals.RECIPES)  # no two recipes are the same run


def test_recorded_runs_are_backfilled_before_the_study_reads_them(signals, tmp_path, monkeypatch):
    """`main` hands the parsed results file and run folder (either flag spelling) to the
    backfill before the machinery reads the results, and does not backfill when it only
    reports."""
    calls = []

    class Stop(Exception):
        pass

    def backfill(results, out, quick):
        calls.append((results, out, quick))
        raise Stop

    monkeypatch.setattr(signals, "backfill", backfill)
    files = ["--results", str(tmp_path / "r.json"), "--page", str(tmp_path / "p.md"), "--images", str(tmp_path)]
    with pytest.raises(Stop):
        signals.main(["--quick", f"--out={tmp_path / 'runs'}", *files])
    assert calls == [(tmp_path / "r.json", tmp_path / "runs", True)]
    signals.main(["--report-only", *files])  # nothing recorded: it says so and returns
    assert len(calls) == 1
