"""The shipped teacher: is a pretraining run converged, and ship it with its record.

    python experiments/teacher.py report runs/teacher      # curve, convergence, time
    python experiments/teacher.py ship runs/teacher        # copy it into the package

`report` reads a `blockdistill pretrain` run folder (its `metrics.jsonl` and
`config.json`, also while the run is going on) and prints the held-out curve, the
convergence test of the quality issue (the held-out loss improves by less than 1% over
the last 20% of the training steps) and the measured training tokens/s with the hours
the whole run takes at that rate. `ship` writes the run's final model into
`src/blockdistill/assets/teacher/` with `training.json` (command, held-out history,
convergence, throughput) and the run's config as `pretrain.toml`, draws
`docs/images/teacher_curve.png`, and refuses a package over 40 MB.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tomllib
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ASSET = ROOT / "src" / "blockdistill" / "assets" / "teacher"
CURVE = ROOT / "docs" / "images" / "teacher_curve.png"
PACKAGE_LIMIT = 40 * 2**20
#: the convergence test: the last `TAIL` of the steps improve held-out loss by less than `GAIN`
TAIL, GAIN = 0.2, 0.01


def read_run(run: pathlib.Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run / "config.json").read_text())
    return {"records": records, "config": config}


def eval_history(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/student_loss"]) for r in records if "eval/student_loss" in r]


def loss_at(history: list[tuple[int, float]], step: float) -> float:
    """Held-out loss at `step`, linearly interpolated between the evaluations around it."""
    for (s0, l0), (s1, l1) in zip(history, history[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    raise ValueError(f"step {step} is outside the evaluations ({history[0][0]}..{history[-1][0]})")


def tail_gain(history: list[tuple[int, float]], tail: float = TAIL) -> float | None:
    """Relative improvement of the held-out loss over the last `tail` of the steps run so
    far: `(L(s_start) - L(s_end)) / L(s_start)`, `s_start = (1 - tail) s_end`."""
    if len(history) < 2:
        return None
    end_step, end_loss = history[-1]
    start = loss_at(history, (1 - tail) * end_step)
    return (start - end_loss) / start


def summary(run: pathlib.Path) -> dict[str, Any]:
    data = read_run(run)
    records, config = data["records"], data["config"]
    history = eval_history(records)
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    tokens_per_step = config["batch_size"] * config["seq_len"]
    step = max(r["step"] for r in records)
    rate = statistics.median(rates) if rates else None
    gain = tail_gain(history)
    return {
        "step": step,
        "steps": config["steps"],
        "tokens_per_step": tokens_per_step,
        "history": history,
        "tail_gain": gain,
        "converged": gain is not None and step >= config["steps"] and gain < GAIN,
        "tokens_per_s": rate,
        "hours_total": None if rate is None else config["steps"] * tokens_per_step / rate / 3600,
        "hours_left": None if rate is None else (config["steps"] - step) * tokens_per_step / rate / 3600,
        "config": config,
    }


def report(info: dict[str, Any]) -> str:
    lines = [
        f"step {info['step']} of {info['steps']} ({info['step'] * info['tokens_per_step'] / 1e6:.1f}M of "
        f"{info['steps'] * info['tokens_per_step'] / 1e6:.1f}M training bytes)",
        "held-out loss (nats/byte):",
        *(f"  step {s:>6}: {loss:.4f}" for s, loss in info["history"]),
    ]
    if info["tail_gain"] is not None:
        verdict = "converged" if info["converged"] else (
            "not finished" if info["step"] < info["steps"] else "not converged: extend it (--extend)")
        lines.append(f"last {TAIL:.0%} of the steps so far improved it by {info['tail_gain']:.2%} "
                     f"(test: < {GAIN:.0%}): {verdict}")
    if info["tokens_per_s"] is not None:
        lines.append(f"median {info['tokens_per_s']:.0f} training tokens/s: {info['hours_total']:.1f} h for the "
                     f"whole run, {info['hours_left']:.1f} h left at that rate")
    return "\n".join(lines)


def plot(run: pathlib.Path, info: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_run(run)["records"]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    window = max(1, len(train) // 100)
    smooth = [(train[i][0], statistics.fmean(v for _, v in train[max(0, i - window + 1): i + 1]))
              for i in range(len(train))]
    per_step = info["tokens_per_step"] / 1e6
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([s * per_step for s, _ in smooth], [v for _, v in smooth], label=f"training (mean of {window} steps)",
            linewidth=1)
    ax.plot([s * per_step for s, _ in info["history"]], [v for _, v in info["history"]], marker=".",
            label="held out")
    ax.set_xlabel("training bytes (millions)")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_ylim(top=min(4.0, max(v for _, v in info["history"][1:]) + 0.5) if len(info["history"]) > 1 else None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ship(run: pathlib.Path, config_file: pathlib.Path, asset: pathlib.Path = ASSET, curve: pathlib.Path = CURVE,
         force: bool = False) -> dict[str, Any]:
    """Copy the run's model into `asset` with its record; the run must be finished and
    converged unless `force`."""
    info = summary(run)
    if info["step"] < info["steps"]:
        raise SystemExit(f"{run} is at step {info['step']} of {info['steps']}: finish it first")
    if not info["converged"] and not force:
        raise SystemExit(f"{run} is not converged (last {TAIL:.0%} improved {info['tail_gain']:.2%}); "
                         "extend it, or pass --force")
    model = run / "model"
    size = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    if size > PACKAGE_LIMIT:
        raise SystemExit(f"{model} holds {size / 2**20:.1f} MB, over the package's {PACKAGE_LIMIT / 2**20:.0f} MB")
    tomllib.loads(config_file.read_text())  # a valid config, or stop here
    staging = asset.with_name(asset.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("model.eqx", "config.json"):
        shutil.copy2(model / name, staging / name)
    shutil.copy2(config_file, staging / "pretrain.toml")
    record = {
        "command": f"blockdistill pretrain --config {asset.relative_to(ROOT) if asset.is_relative_to(ROOT) else asset}"
                   "/pretrain.toml --out runs/teacher",
        "eval_history": [{"step": s, "eval_loss_nats_per_byte": round(v, 4)} for s, v in info["history"]],
        "tokens_per_step": info["tokens_per_step"],
        "training_bytes": info["steps"] * info["tokens_per_step"],
        "tail_gain": info["tail_gain"],
        "median_tokens_per_s": info["tokens_per_s"],
        "python": f"{sys.version.split()[0]} standard library (default corpus)",
    }
    (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if asset.exists():
        shutil.rmtree(asset)
    staging.rename(asset)
    plot(run, info, curve)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("report", "ship"))
    parser.add_argument("run", type=pathlib.Path, help="a `blockdistill pretrain` run folder")
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "configs" / "teacher.toml",
                        help="the config the run was started with (shipped as pretrain.toml)")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="also draw the curve here (report)")
    parser.add_argument("--force", action="store_true", help="ship a finished run that failed the convergence test")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.jsonl").is_file():
        parser.error(f"{args.run} is not a pretraining run folder (no metrics.jsonl)")
    info = summary(args.run)
    print(report(info))
    if args.action == "report" and args.plot is not None:
        print(f"curve: {plot(args.run, info, args.plot)}")
    if args.action == "ship":
        record = ship(args.run, args.config, force=args.force)
        print(f"shipped to {ASSET} ({record['training_bytes'] / 1e6:.1f}M training bytes); curve: {CURVE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
