"""What ``deepfm explain`` shows: the report object (its JSON), the terminal tables and the two PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from deepfm.io import atomic_write_text
from deepfm.plots import pyplot, save_figure

TOP_PAIRS = 15  # pairs drawn beside the heatmap and printed on the terminal


def plot_importance(report: dict[str, Any], path: Path) -> None:
    """Horizontal bars of the AUC drop when each field is shuffled (95% interval over the seeds as error bars),
    the drop when it is set to missing as a dot; most important at the top."""
    plt = pyplot()
    rows = report["importance"]
    names = [r["field"] for r in rows][::-1]
    drop = np.array([r["auc_drop"] for r in rows][::-1])
    lo_hi = np.array([r["auc_drop_interval"] for r in rows][::-1]).reshape(-1, 2)
    err = np.abs(np.stack([drop - lo_hi[:, 0], lo_hi[:, 1] - drop]))
    missing = [r["auc_drop_missing"] for r in rows][::-1]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * len(names)))
    ax.barh(y, drop, xerr=err, color="C0", alpha=0.85, ecolor="grey", capsize=2, label="shuffled (95% interval)")
    ax.plot(missing, y, "o", color="C3", ms=4, label="set to missing")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel=f"drop in AUC (base AUC {report['base']['auc']:.4f}, {report['rows']:,} rows)",
           title="Field importance (permutation)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_pairs(report: dict[str, Any], path: Path) -> None:
    """The mean |FM term| of every pair of fields as a heatmap (the upper triangle), and the strongest pairs."""
    plt = pyplot()
    fields = report["fields"]
    strength = np.array(report["pair_matrix"])
    n = len(fields)
    shown = np.where(np.triu(np.ones((n, n), dtype=bool), k=1), strength, np.nan)
    size = 3.5 + 0.16 * n
    fig, (ax, ax_top) = plt.subplots(1, 2, figsize=(size + 4.5, size), gridspec_kw={"width_ratios": [size, 3.2]})
    image = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    ticks = np.arange(n)
    label_size = 8 if n <= 24 else 7
    ax.set_xticks(ticks, fields, rotation=90, fontsize=label_size)
    ax.set_yticks(ticks, fields, fontsize=label_size)
    ax.set_title("Field-pair FM interaction: mean |<e_i, e_j>|")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    top = report["pairs"][:TOP_PAIRS][::-1]
    y = np.arange(len(top))
    ax_top.barh(y, [p["strength"] for p in top], color="C2")
    ax_top.set_yticks(y, [" x ".join(p["fields"]) for p in top], fontsize=8)
    ax_top.set(title=f"Strongest {len(top)} pairs", xlabel="mean |FM term|")
    ax_top.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_output(report: dict[str, Any], folder: Path) -> list[Path]:
    """``importance.png``, ``pairs.png`` and ``explain.json`` in ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "importance.png", folder / "pairs.png", folder / "explain.json"]
    plot_importance(report, paths[0])
    plot_pairs(report, paths[1])
    atomic_write_text(paths[2], json.dumps(report, indent=1))
    return paths


def format_tables(report: dict[str, Any], top_pairs: int = TOP_PAIRS) -> str:
    """The importance table, the strongest pairs and the logit's decomposition, for the terminal."""
    metrics = [m for m in ("auc", "gauc") if m in report["base"]]
    base = ", ".join(f"{k} {v:.4f}" for k, v in report["base"].items())
    lines = [f"{report['rows']:,} rows ({base}); {report['seeds']} shuffles per field", "",
             f"{'field':16s} " + " ".join(f"{m + ' drop [95% interval]':>26s}" for m in metrics)
             + f" {'logloss rise':>13s} {'missing: auc drop':>18s}"]
    for r in report["importance"]:
        cells = [f"{r[m + '_drop']:+.4f} [{r[m + '_drop_interval'][0]:+.4f},{r[m + '_drop_interval'][1]:+.4f}]"
                 for m in metrics]
        lines.append(f"{r['field']:16s} " + " ".join(f"{c:>26s}" for c in cells)
                     + f" {r['logloss_increase']:+13.5f} {r['auc_drop_missing']:+18.4f}")
    lines += ["", f"{'strongest field pairs':33s} {'mean |FM|':>10s} {'mean FM':>10s}"]
    for p in report["pairs"][:top_pairs]:
        lines.append(f"{' x '.join(p['fields']):33s} {p['strength']:10.5f} {p['mean']:+10.5f}")
    lines += ["", f"{'logit part':10s} {'mean':>9s} {'variance':>9s} {'share of var':>13s}"]
    for k, v in report["decomposition"].items():
        lines.append(f"{k:10s} {v['mean']:+9.4f} {v['variance']:9.4f} {v['share']:13.1%}")
    return "\n".join(lines)
