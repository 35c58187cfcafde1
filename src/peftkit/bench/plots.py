"""The bench's plots (PNG, matplotlib's Agg backend, written atomically):

- ``quality_vs_params.png`` — task metric against trainable parameters (log scale), error bars over
  seeds, with the Pareto front (no other entry is better with fewer parameters); entries that train
  nothing (zero-shot, few-shot) are horizontal lines.
- ``gain_vs_forgetting.png`` — task gain over the untrained model against forgetting: the
  learn-vs-forget picture (top left is best: learns much, forgets little).
- ``cost.png`` — peak resident memory, tensors saved for backward, and time per step, per entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.atomic import atomic_file
from .aggregate import LOWER_IS_BETTER


def pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points on the front of (fewest parameters, best metric), by parameters."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if not lower_is_better
                                                     else points[i][1]))
    front, best = [], None
    for i in order:
        value = points[i][1]
        if best is None or (value < best if lower_is_better else value > best):
            front.append(i)
            best = value
    return front


def available() -> bool:
    """Whether matplotlib is installed (it is optional: without it the bench writes no plots)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _save(fig: Any, path: Path) -> str:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return str(path)


def write(folder: Path, rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, str]:
    """Draw the three plots into `folder`; returns their paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = base["metric"]
    lower = metric in LOWER_IS_BETTER
    rows = [r for r in rows if r["value_mean"] is not None]
    files = {}
    trained = [r for r in rows if r["trainable"]]
    prompted = [r for r in rows if not r["trainable"]]

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in trained:
        ax.errorbar(r["trainable"], r["value_mean"], yerr=r["value_std"] or 0, fmt="o", capsize=3)
        ax.annotate(r["label"], (r["trainable"], r["value_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if trained:
        points = [(r["trainable"], r["value_mean"]) for r in trained]
        front = pareto(points, lower)
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
        ax.set_xscale("log")
    for r in prompted:
        ax.axhline(r["value_mean"], linestyle="--", color="gray", alpha=0.7)
        ax.annotate(f"{r['label']} (no training)", (0.01, r["value_mean"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    if base.get("value") is not None:
        ax.axhline(base["value"], linestyle=":", color="black", alpha=0.5, label="untrained model")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"held-out {metric}" + (" (lower is better)" if lower else ""))
    ax.set_title("Task quality vs trainable parameters")
    ax.legend(loc="best", fontsize=8)
    files["quality_vs_params"] = _save(fig, folder / "quality_vs_params.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        if r["gain_mean"] is None or r["forgetting_mean"] is None:
            continue
        ax.errorbar(r["forgetting_mean"], r["gain_mean"], xerr=r["forgetting_std"] or 0, yerr=r["value_std"] or 0,
                    fmt="o", capsize=3)
        ax.annotate(r["label"], (r["forgetting_mean"], r["gain_mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axvline(0, color="gray", linewidth=0.8)
    measure = base["forgetting"]["measure"]
    ax.set_xlabel("forgetting: " + ("recall@1 lost (base − after)" if measure == "retrieval"
                                    else "perplexity gained on general text (after − base)"))
    ax.set_ylabel(f"task gain over the untrained model ({'loss down' if lower else metric + ' up'})")
    ax.set_title("Learning vs forgetting")
    files["gain_vs_forgetting"] = _save(fig, folder / "gain_vs_forgetting.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, max(3.0, 0.35 * len(rows) + 1.5)), sharey=True)
    labels = [r["label"] for r in rows]
    for ax, key, title, scale in ((axes[0], "peak_rss_bytes", "peak resident memory (MB)", 1e6),
                                  (axes[1], "saved_for_backward_bytes", "saved for backward (MB)", 1e6),
                                  (axes[2], "step_seconds", "time per step (s)", 1.0)):
        ax.barh(labels, [(r[key] or 0) / scale for r in rows])
        ax.set_title(title, fontsize=10)
    axes[0].invert_yaxis()  # the first entry on top (the axes share it)
    fig.suptitle("Training cost per method", y=1.03)
    files["cost"] = _save(fig, folder / "cost.png")
    plt.close(fig)
    return files
