"""What a training run reports: ``metrics.json`` (the DVC metrics: best val balanced accuracy, macro
AUC, epoch), ``run.json`` (every final number, device, backbone, sizes, timings), ``lineage.json``,
``history.csv`` (one row per epoch, epoch 0 the untrained model: a DVC plot) and ``curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.fsutil import atomic_write_text, write_json
from pipeline.core.reporting import pyplot, save_figure

#: The train stage's DVC metrics (``reports/train/metrics.json``); the rest is in ``run.json``.
DVC_METRICS = ("val_balanced_accuracy", "val_macro_auc", "best_epoch")


def write_reports(reports: Path, history: list[dict[str, Any]], result: dict, info: dict, lin: dict) -> None:
    """``reports/train/``: the DVC metrics, every number (``run.json``), the lineage, the history (a
    DVC plot) and its curves."""
    for row in history:
        row.pop("images", None)
    write_history(history, reports / "history.csv")
    write_json(reports / "metrics.json", {k: result[k] for k in DVC_METRICS}, sort_keys=False)
    write_json(reports / "run.json", {**info, "result": result})
    write_json(reports / "lineage.json", lin)
    plot_curves(history, {**result, **info}, reports / "curves.png")


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """The per-epoch history as CSV (floats with 6 significant digits; a DVC plot)."""
    cols = list(history[0].keys())
    cell = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [",".join(cols)] + [",".join(cell(r[c]) for c in cols) for r in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curves(history: list[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    """``curves.png``: the loss curves and the validation metrics per epoch, the best epoch marked."""
    plt = pyplot()
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss (weighted, smoothed)")
    ax.plot(ep, [r["val_loss"] for r in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, label in (
        ("val_balanced_accuracy", "balanced accuracy"),
        ("val_accuracy", "accuracy"),
        ("val_macro_auc", "macro AUC (one-vs-rest)"),
        ("val_binary_auc", "binary AUC (malignant)"),
    ):
        if key in history[0]:
            ax.plot(ep, [r[key] for r in history], "o-", label=label)
    ax.axvline(result["best_epoch"], color="grey", ls="--", lw=1, label=f"best epoch ({result['best_epoch']})")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.set_title("Validation metrics")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"{result['backbone']} at {result['input_size'][0]}x{result['input_size'][1]}, target {result['target_level']}",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path)
