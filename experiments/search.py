"""Block search study: does a searched heterogeneous student beat the best uniform one?

For each parameter budget (fractions of the teacher's parameters):

1. one block library is trained for the teacher (`blockdistill search`; the library does
   not depend on the budget, so every budget reuses it) and assembled under the budget;
2. the uniform students that fit the budget (every combination of KV heads and depth with
   the widest MLP, in eighths of the teacher's, that fits; in whole channels where not even
   an eighth fits) are pruned from the teacher;
3. every student is finished with logit KD alone (the main job's recipe when these
   records were made; `label_weight` is kept at 0) for the same number of steps, seed
   0; the best uniform one is refit to the budget's edge (the widest MLP in whole
   channels, so that uniform pruning gets as many parameters as the search) and
   finished too; the searched and the best uniform student then run with every seed.

Results go to a JSON file (one record per run; a rerun resumes and skips what is done)
and a report section of docs/search.md. `--quick` runs the machinery on a tiny budget with
its own results and page (never the docs).

    python experiments/search.py                          # the study (hours on 2 CPU cores)
    python experiments/search.py --cost                   # step cost as the library grows (alone)
    python experiments/search.py --report-only            # rebuild the report from the results
"""

import argparse
import itertools
import json
import pathlib
import shutil
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
BEGIN = "<!-- search-study:begin (written by experiments/search.py; do not edit) -->"
END = "<!-- search-study:end -->"
DEFAULT_STEPS = 150  # the main job's


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"batch_size": 2, "seq_len": 64, "eval_batches": 1, "calibration_batches": 1}
    return {"batch_size": 8, "seq_len": 256, "eval_batches": 16, "calibration_batches": 4}


def _widest_mlp(teacher_config, fields: dict[str, Any], budget: float, ratios) -> float | None:
    """The first of `ratios` (widest first) whose student `fields` fits `budget` x the
    teacher's parameters; None when none does."""
    from blockdistill import StudentConfig, parameter_count, student_config_for

    limit = budget * parameter_count(teacher_config)
    for ratio in ratios:
        student = StudentConfig(mlp_ratio=ratio, layers=fields["student_layers"], n_layers=fields["student_n_layers"],
                                kv_heads_ratio=fields["kv_heads_ratio"])
        if parameter_count(student_config_for(teacher_config, student)) <= limit:
            return ratio
    return None


def _channels(teacher_config) -> list[float]:
    """Every MLP ratio in whole channels of the teacher's MLP, widest first."""
    return [c / teacher_config.mlp_dim for c in range(teacher_config.mlp_dim, 0, -1)]


def uniform_students(teacher_config, budget: float) -> list[dict[str, Any]]:
    """Every uniform student (KV heads, depth) with the widest MLP (in 1/8ths of the
    teacher's; in whole channels where not even 1/8 fits) whose parameters fit `budget` x
    the teacher's; as `distill` options."""
    depths = [("all", None)] + [("group", n) for n in range(1, teacher_config.n_layers)
                                if teacher_config.n_layers % n == 0]
    kv_ratios = sorted({h / teacher_config.n_kv_heads for h in (teacher_config.n_kv_heads, teacher_config.n_kv_heads // 2, 1)
                        if h >= 1 and teacher_config.n_kv_heads % h == 0}, reverse=True)
    found = []
    for (layers, n_layers), kv in itertools.product(depths, kv_ratios):
        fields = {"student_layers": layers, "student_n_layers": n_layers, "kv_heads_ratio": kv}
        ratio = _widest_mlp(teacher_config, fields, budget, [e / 8 for e in range(8, 0, -1)])
        if ratio is None:  # not even an eighth of the MLP fits: the widest in whole channels, if any
            ratio = _widest_mlp(teacher_config, fields, budget, _channels(teacher_config))
        if ratio is not None:
            found.append({"mlp_ratio": ratio, **fields})
    return found


def edge_student(teacher_config, fields: dict[str, Any], budget: float) -> dict[str, Any] | None:
    """The uniform student `fields` (as `uniform_students` gives it) refit to the budget's
    edge: the widest MLP in whole channels that fits; None when that is the same MLP."""
    ratio = _widest_mlp(teacher_config, fields, budget, _channels(teacher_config))
    width = teacher_config.mlp_dim
    if ratio is None or round(ratio * width) == round(fields["mlp_ratio"] * width):
        return None
    return {**fields, "mlp_ratio": ratio}


def uniform_name(fields: dict[str, Any]) -> str:
    depth = "all" if fields["student_layers"] == "all" else f"{fields['student_n_layers']}L"
    return f"uniform-{depth}-kv{fields['kv_heads_ratio']:g}-mlp{fields['mlp_ratio']:.4g}"


def label(name: str, short: bool = False) -> str:
    """A student's name as the report shows it: `uniform-3L-kv0.5-mlp0.75` is "uniform: 3
    layers, KV heads x0.5, MLP x0.75" (ratios of the teacher's; `short`: for a plot)."""
    if not name.startswith("uniform-"):
        return name
    depth, kv, mlp = name.removeprefix("uniform-").split("-")
    layers = "all" if depth == "all" else depth.removesuffix("L")
    if short:
        return f"{layers} L, KV x{kv.removeprefix('kv')}, MLP x{mlp.removeprefix('mlp')}"
    return (f"uniform: {layers} layer{'' if layers == '1' else 's'}, KV heads x{kv.removeprefix('kv')}, "
            f"MLP x{mlp.removeprefix('mlp')}")


def finish(out: pathlib.Path, args, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One KD run of the main job's recipe (resumed if interrupted); its record."""
    from blockdistill import load_model, parameter_count
    from blockdistill.app.distill import distill
    from blockdistill.app.runconfig import DistillConfig

    size = sizes(args.quick)
    cfg = DistillConfig(out=str(out), teacher=args.teacher, steps=args.finish_steps, seed=seed,
                        eval_every=max(1, args.finish_steps // 3), checkpoint_every=max(1, args.finish_steps // 3),
                        keep_checkpoints=1, progress=False, plots=False,
                        **({"data": args.data} if args.data else {}), **size,
                        **{"label_weight": 0.0, **extra})  # KD alone: the finish these records were made with
    began = time.perf_counter()
    summary = distill(cfg)
    student = load_model(out / "student").config
    return {"seed": seed, "initial_loss": summary["initial_loss"], "final_loss": summary["final_loss"],
            "teacher_loss": summary["teacher_loss"], "gap_closed": summary["gap_closed"],
            "params": parameter_count(student), "wall_s": time.perf_counter() - began}


def write_results(path: pathlib.Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def run_study(args) -> dict[str, Any]:
    from blockdistill import load_model, parameter_count
    from blockdistill.interop.folders import shipped_teacher_path
    from blockdistill.app.search import SearchConfig
    from blockdistill.app.search import search

    results = json.loads(args.results.read_text()) if args.results.exists() else {}

    def save():
        write_results(args.results, results)

    teacher_path = shipped_teacher_path() if args.teacher == "shipped" else pathlib.Path(args.teacher)
    teacher_config = load_model(teacher_path).config
    teacher_params = parameter_count(teacher_config)
    size = sizes(args.quick)
    data = {"data": args.data} if args.data else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for budget in [float(b) for b in args.budgets.split(",")]:
        key = f"search/params={budget:g}"
        searched_init = args.out / f"searched-{budget:g}" / "init"
        if key not in results or not searched_init.is_dir():
            cfg = SearchConfig(out=str(args.out / "library"), teacher=args.teacher, budget=f"params={budget:g}",
                               steps=args.library_steps, progress=False, plots=True, **data, **size)
            summary = search(cfg)
            if searched_init.exists():
                shutil.rmtree(searched_init)
            shutil.copytree(args.out / "library" / "student", searched_init)
            results[key] = {k: v for k, v in summary.items() if k != "lines"}
            results["scores"] = json.loads((args.out / "library" / "scores.json").read_text())
            save()
        runs = {"searched": {"student": str(searched_init)}}
        candidates = uniform_students(teacher_config, budget)
        for fields in candidates:
            runs[uniform_name(fields)] = {**fields, "student_init": "prune"}
        def run(name: str, seed: int) -> float:
            run_key = f"finish/params={budget:g}/{name}/seed{seed}"
            if run_key not in results:
                results[run_key] = {"budget": budget, "student": name, **finish(
                    args.out / f"params={budget:g}" / name / f"seed{seed}", args, seed, runs[name])}
                results[run_key]["params_fraction"] = results[run_key]["params"] / teacher_params
                save()
            return results[run_key]["final_loss"]

        # seed 0 of everything; the best uniform student refit to the budget's edge (its MLP
        # in whole channels, not eighths); then every seed of the searched and the best uniform
        for name in list(runs):
            run(name, seeds[0])
        uniform = [n for n in runs if n != "searched"]
        if uniform:
            best = min(uniform, key=lambda n: run(n, seeds[0]))
            edge = edge_student(teacher_config, runs[best], budget)
            if edge is not None:
                runs[uniform_name(edge)] = edge
                uniform.append(uniform_name(edge))
                best = min(uniform, key=lambda n: run(n, seeds[0]))
            for name, seed in itertools.product(("searched", best), seeds[1:]):
                run(name, seed)
    return results


def cost_scaling(args, counts=(1, 2, 5, 10, 20)) -> dict[str, Any]:
    """What one library step costs as the library grows: the first `n` trained candidates
    of the default space for each `n` in `counts`, each step compiled first and then timed
    in rounds side by side (median; run this alone on the machine), with its analytic
    FLOPs and its compiled temporaries."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import blockdistill as bd
    from blockdistill.search.library import _library_step
    from blockdistill.app.search import library_step_flops

    size = sizes(args.quick)
    model = bd.load_model(args.teacher)
    full = bd.init_library(model, bd.SearchSpace(), jnp.zeros((2, size["seq_len"]), jnp.int32))
    tokens = jax.random.randint(jax.random.key(0), (size["batch_size"], size["seq_len"]), 0, model.config.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    programs, rows = {}, {}
    for n in [c for c in counts if c <= len(full.stacks)]:
        library = bd.BlockLibrary(stacks=full.stacks[:n], shapes=full.trained_shapes[:n], config=full.config)
        optimizer = bd.make_optimizer(1e-3, clip_norm=None)
        state = {"library": library, "opt": optimizer.init(eqx.filter(library, eqx.is_inexact_array))}
        step = bd.LibraryStep(optimizer=optimizer)

        def one(step=step, state=state):
            copy = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, (state["library"], state["opt"]))
            jax.block_until_ready(step(*copy, model, tokens, mask)[2])

        compiled = eqx.filter_jit(_library_step).lower(
            (model, tokens, mask, None), library, state["opt"], optimizer=optimizer, kind="nmse").compile()
        memory = compiled.compiled.memory_analysis() if hasattr(compiled, "compiled") else compiled.memory_analysis()
        one()  # compile the step itself
        programs[n] = one
        rows[n] = {"candidates": n, "temp_gib": memory.temp_size_in_bytes / 2**30,
                   "tflop_per_step": library_step_flops(library, batch_size=size["batch_size"],
                                                        seq_len=size["seq_len"]) / 1e12}
    times = {n: [] for n in programs}
    for r in range(3 if args.quick else 5):
        for n in (list(programs) if r % 2 == 0 else list(reversed(programs))):
            began = time.perf_counter()
            programs[n]()
            times[n].append(time.perf_counter() - began)
    for n, values in times.items():
        rows[n]["step_s"] = sorted(values)[len(values) // 2]
    return {"batch_size": size["batch_size"], "seq_len": size["seq_len"], "rows": list(rows.values())}


def plot_students(results: dict[str, Any], budget: float, path: pathlib.Path) -> None:
    """Final loss after the KD finish against the student's real parameters, one point per
    seed (a line through a student's seeds), the searched student in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for k, r in results.items() if k.startswith(f"finish/params={budget:g}/")]
    names = sorted({r["student"] for r in finished}, key=lambda n: (n != "searched", n))
    figure, axes = plt.subplots(figsize=(7.5, 4.6))
    for name in names:
        records = [r for r in finished if r["student"] == name]
        x = records[0]["params_fraction"]
        losses = [r["final_loss"] for r in records]
        colour = "tab:red" if name == "searched" else "tab:gray"
        axes.plot([x] * len(losses), losses, marker="o", linestyle="-", color=colour, alpha=0.8)
        axes.annotate(label(name, short=True), (x, min(losses)), fontsize=6, color=colour,
                      textcoords="offset points", xytext=(4, -8))
    teacher = finished[0]["teacher_loss"] if finished else None
    if teacher is not None:
        axes.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
    axes.axvline(budget, color="tab:blue", linestyle=":", linewidth=1, label=f"budget ({budget:.0%})")
    axes.set_yscale("log")
    axes.set_xlabel("student parameters / teacher parameters")
    axes.set_ylabel("held-out loss after the KD finish (nats/byte)")
    axes.set_title(f"Searched (red) and uniform (grey) students at {budget:.0%} of the parameters", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_cost(cost: dict[str, Any], path: pathlib.Path) -> None:
    """Library step seconds and compiled temporaries against the number of trained candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cost["rows"]
    n = [r["candidates"] for r in rows]
    figure, left = plt.subplots(figsize=(6, 3.8))
    left.plot(n, [r["step_s"] for r in rows], marker="o", color="tab:blue", label="step seconds")
    left.set_xlabel("trained candidates per layer")
    left.set_ylabel("seconds per library step", color="tab:blue")
    right = left.twinx()
    right.plot(n, [r["temp_gib"] for r in rows], marker="s", color="tab:orange", label="compiled temporaries")
    right.set_ylabel("compiled temporaries (GiB)", color="tab:orange")
    left.set_title(f"One library step ({cost['batch_size']} x {cost['seq_len']} tokens) as the library grows",
                   fontsize=9)
    left.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(results: dict[str, Any], images: pathlib.Path | None = None, page: pathlib.Path | None = None) -> str:
    """The study's section of docs/search.md, from the results alone; with `images` (and
    the `page` the links are relative to) its plots too."""
    import os

    def figure(path: pathlib.Path) -> list[str]:
        link = os.path.relpath(path.resolve(), (page or path).resolve().parent)
        return [f"![{path.stem}]({link})", ""]

    budgets = sorted({r["budget"] for k, r in results.items() if k.startswith("finish/")}, reverse=True)
    out = [BEGIN, ""]
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
    for budget in budgets:
        search_record = results.get(f"search/params={budget:g}", {})
        finished = {k: r for k, r in results.items() if k.startswith(f"finish/params={budget:g}/")}
        by_student: dict[str, list[dict]] = {}
        for record in finished.values():
            by_student.setdefault(record["student"], []).append(record)
        out += [f"### {budget:.0%} of the teacher's parameters", ""]
        if search_record:
            cost = search_record["search_cost"]
            out += [f"Searched: {search_record['architecture']} (by {search_record['score']}; library of "
                    f"{cost['candidates_trained']} trained candidates per layer, {cost['steps']} steps, "
                    f"{cost['train_seconds']:.0f} s and {cost['train_flops'] / 1e12:.1f} TFLOP of training, "
                    f"{cost['score_seconds']:.0f} s of scoring). Assembled, before the KD finish: "
                    f"{search_record['eval_loss']['assembled_student']:.4f} (teacher "
                    f"{search_record['eval_loss']['teacher']:.4f}); its real cost: "
                    + ", ".join(f"{kind} {value['fraction']:.1%}" for kind, value in search_record["costs"].items())
                    + " of the teacher's.", ""]
            if images is not None and "scores" in results:
                import numpy as np

                from blockdistill.app.search import _plot

                path = images / f"search_scores_params{budget:g}.png"
                _plot(path, results["scores"]["candidates"], np.asarray(results["scores"]["kl"]),
                      tuple(search_record["indices"]), "KL with the block swapped in")
                out += figure(path)
        out += ["| student | params | seeds | loss before KD | final loss (per seed) | mean | above the teacher |",
                "|---|---:|---:|---:|---|---:|---:|"]
        rows = []
        for name, records in by_student.items():
            records = sorted(records, key=lambda r: r["seed"])
            finals = [r["final_loss"] for r in records]
            rows.append((sum(finals) / len(finals), name, records, finals))
        for mean, name, records, finals in sorted(rows):
            out.append(f"| {label(name)} | {records[0]['params_fraction']:.1%} | {len(records)} | "
                       f"{records[0]['initial_loss']:.4f} | {' / '.join(f'{x:.4f}' for x in finals)} | {mean:.4f} "
                       f"| {mean - records[0]['teacher_loss']:.4f} |")
        out.append("")
        if images is not None and finished:
            path = images / f"search_students_params{budget:g}.png"
            plot_students(results, budget, path)
            out += figure(path)
    if "cost" in results:
        cost = results["cost"]
        out += [f"### What a library step costs as the library grows ({cost['batch_size']} x {cost['seq_len']} tokens)",
                "", "| trained candidates | step s | TFLOP per step | compiled temporaries (GiB) |", "|---:|---:|---:|---:|"]
        out += [f"| {r['candidates']} | {r['step_s']:.3g} | {r['tflop_per_step']:.3g} | {r['temp_gib']:.3g} |"
                for r in cost["rows"]]
        out.append("")
        if images is not None:
            path = images / "search_cost.png"
            plot_cost(cost, path)
            out += figure(path)
    out.append(END)
    return "\n".join(out) + "\n"


def write_report(page: pathlib.Path, text: str) -> None:
    current = page.read_text() if page.exists() else ""
    if BEGIN in current and END in current:
        start, end = current.index(BEGIN), current.index(END) + len(END) + 1
        current = current[:start] + text + current[end:]
    else:
        current = current.rstrip("\n") + "\n\n## Results\n\n" + text
    page.write_text(current)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "search-study")
    parser.add_argument("--teacher", default="shipped")
    parser.add_argument("--data", default=None)
    parser.add_argument("--budgets", default="0.5,0.3", help="fractions of the teacher's parameters")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--library-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--finish-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "experiments" / "search_results.json")
    parser.add_argument("--page", type=pathlib.Path, default=ROOT / "docs" / "search.md")
    parser.add_argument("--images", type=pathlib.Path, default=IMAGES, help="folder for the plots")
    parser.add_argument("--quick", action="store_true", help="tiny budget for testing the machinery")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--cost", action="store_true",
                        help="only measure what a library step costs as it grows (run it alone on the machine)")
    args = parser.parse_args(argv)
    own = all(flag in (argv or sys.argv) for flag in ("--results", "--page", "--images"))
    if args.quick and not own:
        parser.error("--quick needs --results, --page and --images (its numbers never go into the docs)")
    if args.quick:
        args.library_steps, args.finish_steps = min(args.library_steps, 4), min(args.finish_steps, 2)
    if args.cost:
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
        results["cost"] = cost_scaling(args)
        write_results(args.results, results)
    elif args.report_only:
        results = json.loads(args.results.read_text())
        scores = args.out / "library" / "scores.json"
        if "scores" not in results and scores.exists():  # a study made before the scores were kept
            results["scores"] = json.loads(scores.read_text())
            write_results(args.results, results)
    else:
        results = run_study(args)
    write_report(args.page, report(results, args.images, args.page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
