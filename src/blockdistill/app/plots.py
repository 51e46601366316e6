"""PNG plots of a run's metrics.jsonl (matplotlib, headless)."""

import json
import pathlib

import numpy as np


def plot_metrics(metrics_path: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Write `loss.png` (training losses and eval curves) and, for distillation runs,
    `feature_per_layer.png` (each student layer's feature loss over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/student_loss" in r]
    written = []
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        for key in ("loss", "kl", "feature", "ce"):
            # a term whose weight was zero at a step is not computed (reported as 0):
            # leave a gap there rather than a drop to the bottom of the log axis
            values = [r.get(key) if r.get(key) else np.nan for r in train]
            if not all(np.isnan(values)):
                ax_train.plot(steps, values, label=key)
        ax_train.set_yscale("log")
        ax_train.set_xlabel("step")
        ax_train.set_title("training objective")
        ax_train.legend()
    if evals:
        steps = [r["step"] for r in evals]
        ax_eval.plot(steps, [r["eval/student_loss"] for r in evals], "o-", label="student")
        if "eval/teacher_loss" in evals[0]:
            ax_eval.axhline(evals[0]["eval/teacher_loss"], color="k", ls="--", label="teacher")
        ax_eval.set_xlabel("step")
        ax_eval.set_ylabel("nats / token")
        ax_eval.set_title("held-out loss (free-running)")
        ax_eval.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    per_layer = [r for r in train if r.get("feature_per_layer") and any(r["feature_per_layer"])]
    if per_layer:
        values = np.array([r["feature_per_layer"] for r in per_layer])
        steps = [r["step"] for r in per_layer]
        fig, ax = plt.subplots(figsize=(6, 4))
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], label=f"layer {layer}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("blockwise feature loss per student layer")
        ax.legend()
        fig.tight_layout()
        path = out / "feature_per_layer.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
