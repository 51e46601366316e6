"""What a teacher cache costs in quality: the main job as measured (logit KD alone on the
half-MLP student, 150 steps; the default has since added label CE, kept at 0 here)
distilled from the shipped teacher directly and from caches of its top 16 and top 64
log-probabilities, three seeds each.

    python experiments/teacher_cache.py                 # caches, 9 runs (resumable), report
    python experiments/teacher_cache.py --report-only   # rebuild the table from the results

Each cache holds exactly the rows the three seeds' runs read (`cache-teacher --steps 150
--seeds 0,1,2`). Results go to experiments/teacher_cache_results.json and the table into
docs/teacher_cache.md. Losses do not depend on what else the machine runs; step times are
the benchmark's (`kd_cached_vs_kd` in benchmarks/run.py), measured side by side.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "teacher_cache_results.json"
PAGE = ROOT / "docs" / "teacher_cache.md"
BEGIN = "<!-- teacher-cache-study:begin (written by experiments/teacher_cache.py; do not edit) -->"
END = "<!-- teacher-cache-study:end -->"
SEEDS = (0, 1, 2)
TOP_KS = (16, 64)


def build_cache(out: pathlib.Path, top_k: int, steps: int) -> dict[str, Any]:
    from blockdistill.app.commands import cache_teacher
    from blockdistill.app.runconfig import CacheConfig, DistillConfig

    main = DistillConfig()
    cfg = CacheConfig(out=str(out), top_k=top_k, steps=steps, seeds=",".join(map(str, SEEDS)),
                      batch_size=main.batch_size, seq_len=main.seq_len, eval_batches=main.eval_batches,
                      progress=False)
    start = time.perf_counter()
    summary = cache_teacher(cfg)
    meta = json.loads((out / "meta.json").read_text())
    disk = sum(f.stat().st_size for f in out.glob("*.npy"))
    return {"top_k": top_k, "rows": summary["rows"], "bytes_per_token": summary["bytes_per_token"],
            "disk_bytes": disk, "mean_tail_mass": summary["mean_tail_mass"], "seconds": time.perf_counter() - start,
            "teacher_eval": meta["teacher_eval"]}


def run(out: pathlib.Path, seed: int, cache: pathlib.Path | None, steps: int) -> dict[str, Any]:
    from blockdistill.app.distill import distill
    from blockdistill.app.runconfig import DistillConfig

    summary_file = out / "summary.json"
    wall = None
    if not summary_file.is_file():
        cfg = DistillConfig(out=str(out), seed=seed, steps=steps, progress=False, plots=False,
                            label_weight=0.0,  # KD alone: the recipe these records were made with
                            teacher_cache=None if cache is None else str(cache))
        start = time.perf_counter()
        distill(cfg)
        wall = time.perf_counter() - start
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {**{k: summary[k] for k in ("teacher_loss", "initial_loss", "final_loss", "gap_closed")},
            "wall_s": wall, "tokens_per_s_median": statistics.median(rates) if rates else None,
            "train_flops": max(r.get("train_flops", 0.0) for r in records)}


def table(results: dict[str, Any]) -> str:
    lines = ["| teacher | final eval loss, seeds 0 / 1 / 2 | mean | gap closed (mean) | vs dense (mean) |",
             "| --- | --- | --- | --- | --- |"]
    dense = statistics.mean(r["final_loss"] for r in results["runs"]["dense"].values())
    for name in ("dense", *(f"top{k}" for k in TOP_KS)):
        runs = results["runs"].get(name, {})
        if len(runs) < len(SEEDS):
            continue
        finals = [runs[str(s)]["final_loss"] for s in SEEDS]
        closed = statistics.mean(runs[str(s)]["gap_closed"] for s in SEEDS)
        label = "the teacher itself (dense KL)" if name == "dense" else f"cache, top {name[3:]} + tail"
        delta = "" if name == "dense" else f"{statistics.mean(finals) - dense:+.5f}"
        lines.append(f"| {label} | {' / '.join(f'{v:.4f}' for v in finals)} | {statistics.mean(finals):.4f} | "
                     f"{closed:.1%} | {delta} |")
    lines += ["", "| cache | rows | bytes per token | on disk | mean tail mass | teacher held-out loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for k in TOP_KS:
        c = results["caches"].get(str(k))
        if c:
            lines.append(f"| top {k} | {c['rows']} | {c['bytes_per_token']} | {c['disk_bytes'] / 1e6:.0f} MB | "
                         f"{c['mean_tail_mass']:.2e} | {c['teacher_eval']['loss']:.4f} |")
    flops = {name: statistics.mean(r["train_flops"] for r in runs.values())
             for name, runs in results["runs"].items() if runs}
    if "dense" in flops and f"top{TOP_KS[0]}" in flops:
        lines += ["", f"Training FLOPs per run (analytic): dense {flops['dense'] / 1e12:.1f} TFLOP, from a cache "
                      f"{flops[f'top{TOP_KS[0]}'] / 1e12:.1f} TFLOP "
                      f"({flops[f'top{TOP_KS[0]}'] / flops['dense']:.2f}x)."]
    return "\n".join(lines)


def report(results: dict[str, Any], page: pathlib.Path) -> None:
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n\n{table(results)}\n\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/teacher_cache", help="folder of the caches and runs")
    parser.add_argument("--steps", type=int, default=150, help="steps per run (default: the main job's)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--page", default=str(PAGE))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    results_path = pathlib.Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"caches": {}, "runs": {}}
    if not args.report_only:
        root = pathlib.Path(args.out)
        for k in TOP_KS:
            if str(k) in results["caches"]:  # built (its build time measured) before
                continue
            results["caches"][str(k)] = build_cache(root / f"cache-top{k}", k, args.steps)
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        for name, cache in (("dense", None), *((f"top{k}", root / f"cache-top{k}") for k in TOP_KS)):
            for seed in SEEDS:
                if str(seed) in results["runs"].get(name, {}):
                    continue
                print(f"[{name} seed {seed}]", file=sys.stderr, flush=True)
                record = run(root / name / f"seed{seed}", seed, cache, args.steps)
                results["runs"].setdefault(name, {})[str(seed)] = record
                results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    report(results, pathlib.Path(args.page))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
