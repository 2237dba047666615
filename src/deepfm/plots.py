"""PNG plots a person would rather look at than read: learning curves, ROC, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepfm.io import atomic_path
from deepfm.metrics import auc, reliability, roc_curve


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), imported on first use: drawing is
    optional, and matplotlib is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation AUC per epoch."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_logloss"] for r in history], "o-", label="train")
    if any("valid_logloss" in r for r in history):
        ax_loss.plot(epochs, [r.get("valid_logloss", np.nan) for r in history], "o-", label="valid")
        ax_auc.plot(epochs, [r.get("valid_auc", np.nan) for r in history], "o-", color="C1")
        aucs = [r.get("valid_auc", -np.inf) for r in history]
        best = epochs[int(np.argmax(aucs))]
        for ax in (ax_loss, ax_auc):
            ax.axvline(best, color="grey", ls=":", lw=1, label=f"best epoch ({best})")
        ax_auc.legend(loc="lower right")
    ax_loss.set(title="Log loss", xlabel="epoch")
    ax_loss.legend()
    ax_auc.set(title="Validation AUC", xlabel="epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path)


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, title: str = "ROC (test)") -> None:
    plt = pyplot()
    fpr, tpr = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {auc(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_calibration(labels: np.ndarray, probs: np.ndarray, path: Path,
                     title: str = "Calibration (test)") -> None:
    plt = pyplot()
    mean_p, rate, count = reliability(labels, probs, bins=10)
    fig, ax = plt.subplots(figsize=(5, 5))
    top = float(max(mean_p.max(initial=0), rate.max(initial=0))) * 1.05 or 1.0
    ax.plot([0, top], [0, top], "--", color="grey", lw=1, label="perfect")
    ax.plot(mean_p, rate, "o-", label="model (deciles of prediction)")
    ax.set(title=title, xlabel="mean predicted probability", ylabel="observed click rate",
           xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
