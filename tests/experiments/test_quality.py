"""The quality-study script (experiments/quality.py): its machinery on a tiny budget.

The study's numbers come from the full budget and live in docs/quality.md; here we check
that the script runs recipes through the real main job, resumes, and reports correctly.
"""

import json
import math
import pathlib

import pytest
from helpers import REPO_ROOT, loaded_script

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def quality():
    with loaded_script("quality_study", ROOT / "experiments" / "quality.py") as module:
        yield module


def _record(losses, teacher=1.0, steps_between=10, tokens_per_step=100):
    return {"eval_loss": losses, "teacher_loss": teacher, "tokens_per_step": tokens_per_step,
            "eval_steps": [i * steps_between for i in range(len(losses))]}


def test_gap_and_tokens_to(quality):
    # initial 3.0, teacher 1.0: gap 2.0; closed 0, 0.25, 0.75, 0.95
    record = _record([3.0, 2.5, 1.5, 1.1])
    assert quality.gap_curve(record) == pytest.approx([0.0, 0.25, 0.75, 0.95])
    # 50% lies halfway between the evals at steps 10 (25%) and 20 (75%): step 15 = 1500 tokens
    assert quality.tokens_to(record, 0.5) == pytest.approx(1500.0)
    # 90% between steps 20 (75%) and 30 (95%): 3/4 of the way, step 27.5
    assert quality.tokens_to(record, 0.9) == pytest.approx(2750.0)
    assert quality.tokens_to(_record([3.0, 2.9, 2.8]), 0.5) is None
    # a student that starts no worse than the teacher has no gap to close
    assert all(math.isnan(x) for x in quality.gap_curve(_record([1.0, 0.9])))


def test_cost_to_a_fraction_on_every_axis(quality):
    record = _record([3.0, 2.5, 1.5, 1.1])
    record.update(eval_flops=[0.0, 10.0, 20.0, 30.0], eval_seconds=[0.0, 1.0, 2.0, 4.0])
    assert quality.tokens_to(record, 0.5, "flops") == pytest.approx(15.0)
    assert quality.tokens_to(record, 0.9, "seconds") == pytest.approx(3.5)
    assert quality.tokens_to(_record([3.0, 2.5, 1.5]), 0.5, "flops") is None  # not recorded


def test_training_seconds_take_each_windows_rate(quality):
    # the compiling first step has no rate of its own: it takes the next window's
    records = [{"step": 0}, {"step": 1, "compile_s": 5.0}, {"step": 2, "tokens_per_s": 100.0},
               {"step": 3, "tokens_per_s": 50.0}]
    assert quality.training_seconds(records, 100) == {0: 0.0, 1: 1.0, 2: 2.0, 3: 4.0}


def test_plan_covers_the_grid(quality):
    runs = quality.plan((0, 1))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    # the main job's student gets every recipe, first, and seed 0 comes before seed 1
    assert [r.recipe for r in runs[: len(quality.RECIPES)]] == list(quality.RECIPES)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    for student in quality.STUDENTS:
        for init in ("prune", "random"):
            assert any(r.student == student and r.init == init for r in runs), (student, init)
    # the half-depth student cannot run the attention-level mode
    assert not any(r.student == "layers" and r.recipe == "attn-cosine" for r in runs)
    # every run's configuration is valid
    for run in runs:
        quality.config_for(run, pathlib.Path("unused"), quick=False)
    # the equal-cost grids: pruned students, the recipes whose cost differs, the main one
    for budget in ("flops", "seconds"):
        costed = quality.plan((0,), budget=budget, steps_for=lambda *_: 7)
        assert {r.init for r in costed} == {"prune"} and all(r.steps == 7 for r in costed)
        assert {r.recipe for r in costed} <= set(quality.COST_RECIPES)
        assert ("mlp", quality.MAIN_RECIPE) in {(r.student, r.recipe) for r in costed}
        assert quality.twin(costed[0]).name == f"{costed[0].student}-prune/{costed[0].recipe}/seed0-steps7"


def test_teacher_identity(quality, tmp_path):
    """A teacher is named by its weights: another file content is another teacher."""
    (tmp_path / "model.eqx").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    first = quality.teacher_identity(str(tmp_path))
    assert len(first) == 64 and quality.teacher_identity(str(tmp_path)) == first
    (tmp_path / "config.json").write_text('{"changed": 1}')  # not weights
    assert quality.teacher_identity(str(tmp_path)) == first
    (tmp_path / "model.eqx").write_bytes(b"other weights")
    assert quality.teacher_identity(str(tmp_path)) != first
    assert len(quality.teacher_identity(None)) == 64  # the shipped teacher
    with pytest.raises(ValueError, match="no weight files"):
        quality.teacher_identity(str(tmp_path / "missing"))


def test_quick_study_runs_resumes_and_reports(quality, tmp_path, capsys, tiny_teacher):
    args = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results.json"),
            "--page", str(tmp_path / "page.md"), "--images", str(tmp_path / "images"),
            "--only", "mlp-prune/kd/*,mlp-prune/layer-cosine/*", "--teacher", tiny_teacher]
    (tmp_path / "page.md").write_text("# Study\n\nwritten by hand\n")
    assert quality.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == ["mlp-prune/kd/seed0", "mlp-prune/layer-cosine/seed0"]
    teacher = quality.teacher_identity(tiny_teacher)
    measured = json.loads((tmp_path / "results_step_seconds.json").read_text())
    assert measured["teacher_sha256"] == teacher
    for record in results.values():
        assert record["eval_steps"] == [0, 2, 4]
        assert all(math.isfinite(x) for x in record["eval_loss"])
        assert record["wall_s"] > 0
        assert record["teacher_sha256"] == teacher
        # the seconds axis: every step at its program's step time measured side by side
        (per_step,) = measured["seconds"][f"{record['student']}/{record['init']}/{record['recipe']}"]
        assert record["step_seconds"] == [per_step] and per_step > 0
        assert record["eval_seconds"] == pytest.approx([0.0, 2 * per_step, 4 * per_step])
    assert (tmp_path / "runs" / teacher[:12] / "mlp-prune/kd/seed0" / "summary.json").exists()
    # the recipes really differ: KD and blockwise-only runs end at different losses
    finals = {name: r["eval_loss"][-1] for name, r in results.items()}
    assert finals["mlp-prune/kd/seed0"] != finals["mlp-prune/layer-cosine/seed0"]
    kd_config = results["mlp-prune/kd/seed0"]["config"]
    assert kd_config["blockwise_weight"] == 0.0 and kd_config["mlp_ratio"] == 0.5
    page = (tmp_path / "page.md").read_text()
    assert page.startswith("# Study\n\nwritten by hand\n")
    assert page.count(quality.BEGIN) == 1 and page.count(quality.END) == 1
    assert "blockwise, layer level, cosine" in page and "KD only" in page
    (plot,) = (tmp_path / "images").glob("quality_pruned*.png")
    assert plot.stat().st_size > 0 and f"images/{plot.name}" in page

    # a second run finds every result and trains nothing; the report is rebuilt in place
    before = (tmp_path / "results.json").read_text()
    capsys.readouterr()
    assert quality.main(args) == 0
    assert "[1/" not in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == before
    assert (tmp_path / "page.md").read_text() == page

    # runs of another teacher never join these results (refused before anything runs)
    other = tmp_path / "other-teacher"
    other.mkdir()
    (other / "model.eqx").write_bytes(b"other weights")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        quality.main([*args[:-2], "--teacher", str(other)])
    assert "holds runs of another teacher" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == before


def test_equal_cost_budgets_give_cheaper_recipes_more_steps(quality, tmp_path, capsys, tiny_teacher):
    """At equal cost the main job's recipe keeps its steps, the labels-only control, which
    skips the teacher, gets more and a recipe of two passes per step fewer; every run
    records its FLOPs and seconds. The main recipe's run at equal cost is its run at equal
    steps, reused, not run again."""
    main_recipe = quality.MAIN_RECIPE
    common = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results.json"),
              "--page", str(tmp_path / "page.md"), "--images", str(tmp_path / "images"), "--teacher", tiny_teacher]
    assert quality.main([*common, "--only", f"mlp-prune/{main_recipe}/*"]) == 0
    capsys.readouterr()
    recipes = (main_recipe, "ce", "staged-0.5", "layer-cosine+ce")
    for budget in ("flops", "seconds"):  # one study folder: the step times are measured once
        args = [*common, "--budget", budget, "--only", ",".join(f"mlp-prune/{r}/*" for r in recipes)]
        assert quality.main(args) == 0
        assert f"{main_recipe}/seed0-equal" not in capsys.readouterr().err  # reused
        everything = json.loads((tmp_path / "results.json").read_text())
        twin = everything[f"mlp-prune/{main_recipe}/seed0"]
        results = {name: r for name, r in everything.items() if name.endswith(f"-equal-{budget}")}
        assert results[f"mlp-prune/{main_recipe}/seed0-equal-{budget}"]["eval_loss"] == twin["eval_loss"]
        main, ce, staged, both = (results[f"mlp-prune/{r}/seed0-equal-{budget}"] for r in recipes)
        assert main["steps"] == 4  # the reference: 4/150 of the main job in quick mode
        measured = json.loads((tmp_path / "results_step_seconds.json").read_text())["seconds"]
        if budget == "flops":
            assert ce["steps"] > main["steps"]
            assert both["steps"] < main["steps"]  # the injected and the free-running pass in every step
        else:  # each recipe's steps follow its measured step seconds (whose order, at these tiny
            # shapes and under load, is noise: only the rule is checked)
            for record, recipe in ((ce, "ce"), (both, "layer-cosine+ce")):
                ratio = measured[f"mlp/prune/{main_recipe}"][0] / measured[f"mlp/prune/{recipe}"][0]
                # the main job's steps times the ratio, then scaled to the quick mode's 4/150
                # (rounded twice, as the study does: 4 * ratio alone is off by one near .5)
                full = max(1, round(quality.DEFAULT_STEPS * ratio))
                assert record["steps"] == quality.budget(full, quick=True)["steps"], (recipe, ratio)
        if budget == "flops":  # blockwise, then KD: no more FLOPs per step than KD
            assert staged["steps"] >= main["steps"]
        assert staged["config"]["blockwise_steps"] == max(1, round(staged["steps"] / 2))
        for record in results.values():
            assert record["budget"] == budget
            assert record["eval_flops"][0] == record["eval_seconds"][0] == 0.0
            assert all(b > a for a, b in zip(record["eval_flops"], record["eval_flops"][1:]))
            assert all(b > a for a, b in zip(record["eval_seconds"], record["eval_seconds"][1:]))
        if budget == "flops":  # equal within one step's rounding
            per_step = ce["eval_flops"][-1] / ce["steps"]
            assert abs(ce["eval_flops"][-1] - main["eval_flops"][-1]) <= per_step / 2 + 1
        assert set(measured) == {f"mlp/prune/{r}" for r in recipes}
        assert len(measured["mlp/prune/staged-0.5"]) == 2  # one time per stage
        if budget == "seconds":  # equal within one step's rounding
            per_step = ce["eval_seconds"][-1] / ce["steps"]
            assert abs(ce["eval_seconds"][-1] - main["eval_seconds"][-1]) <= per_step / 2 + 1e-9
        page = (tmp_path / "page.md").read_text()
        assert f"Equal {budget}" not in page or "TFLOP to 50%" in page
        assert "TFLOP to 50%" in page and "labels only" in page


@pytest.mark.parametrize("args", [["--quick"], ["--teacher", "some/teacher"], ["--data", "corpus.txt"]])
def test_other_studies_never_go_to_the_docs(quality, args, capsys):
    """A tiny budget, another teacher or other data need their own results and page."""
    with pytest.raises(SystemExit):
        quality.main(args)
    assert "--results" in capsys.readouterr().err


def test_results_must_match_their_recipe(quality, tmp_path):
    """A recorded run whose config is not its recipe's (e.g. after the main job's defaults
    changed under it) is refused, naming the run and the field."""
    record = {"recipe": "kd", "student": "mlp",
              "config": {**quality.recipe("kd"), **quality.STUDENTS["mlp"], "label_weight": 0.5}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"mlp-prune/kd/seed0": record}))
    with pytest.raises(ValueError, match=r"mlp-prune/kd/seed0.*'label_weight': 0.5"):
        quality.load_results(path)
    record["config"]["label_weight"] = 0.0
    path.write_text(json.dumps({"mlp-prune/kd/seed0": record}))
    assert quality.load_results(path) == {"mlp-prune/kd/seed0": record}
    # a field the run config gained later counts at its default in an older record
    del record["config"]["teacher_weight"]
    path.write_text(json.dumps({"mlp-prune/kd/seed0": record}))
    assert quality.load_results(path) == {"mlp-prune/kd/seed0": record}
    record["config"]["teacher_weight"] = 0.0
    path.write_text(json.dumps({"mlp-prune/kd/seed0": record}))
    with pytest.raises(ValueError, match="teacher_weight"):
        quality.load_results(path)


def test_default_budget_is_the_main_jobs(quality):
    """The study pins its budget so that recorded runs stay comparable; it must still be
    the main job's, as the docs say."""
    from blockdistill.app.runconfig import DistillConfig

    main_job = DistillConfig()
    assert quality.DEFAULT_STEPS == main_job.steps
    assert quality.DEFAULT_LR == main_job.learning_rate
    full = quality.budget(quality.DEFAULT_STEPS, quick=False)
    assert (full["batch_size"], full["seq_len"]) == (main_job.batch_size, main_job.seq_len)
    # the equal-cost budgets are the cost of KD into the main job's student: the main job's
    # recipe when this study ran, which has since added label CE (the real-teacher study)
    from blockdistill.app.runconfig import DEFAULT_LABEL_WEIGHT

    fields = {**quality.recipe(quality.MAIN_RECIPE), **quality.student_fields(quality.MAIN_STUDENT)}
    assert {k: getattr(main_job, k) for k in fields} == {**fields, "label_weight": DEFAULT_LABEL_WEIGHT}


def test_half_depth_student_follows_the_teacher(quality, tmp_path):
    """The half-depth student is half of whatever teacher the study runs on, and records of
    a teacher of another depth still load; a depth that is not a positive int is refused."""
    from blockdistill.interop.folders import read_model_config, shipped_teacher_path

    shipped = read_model_config(shipped_teacher_path()).n_layers
    assert quality.student_fields("layers")["student_n_layers"] == max(1, shipped // 2)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
    assert quality.student_fields("layers", {"teacher": str(hf)})["student_n_layers"] == 4
    assert quality.student_fields("mlp", {"teacher": str(hf)}) == quality.STUDENTS["mlp"]
    record = {"recipe": "kd", "student": "layers",
              "config": {**quality.recipe("kd"), **quality.student_fields("layers", {"teacher": str(hf)})}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"layers-prune/kd/seed0": record}))
    assert quality.load_results(path)["layers-prune/kd/seed0"]["config"]["student_n_layers"] == 4
    record["config"]["student_n_layers"] = "two"
    path.write_text(json.dumps({"layers-prune/kd/seed0": record}))
    with pytest.raises(ValueError, match="student_n_layers"):
        quality.load_results(path)
