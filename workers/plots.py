"""Every figure facemill draws: ROC curves, training curves, the fine-tuning study's bars, report charts.

matplotlib's object API only (``Figure`` + ``FigureCanvasAgg``), never pyplot, so that drawing holds no
global state and works in Ray workers and threads alike; matplotlib is imported when a figure is made.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def new_figure(size: tuple[float, float], dpi: int = 100):
    """A matplotlib ``Figure`` of ``size`` inches with an Agg canvas attached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_roc(curves: Mapping[str, Sequence[np.ndarray]], path: str | os.PathLike, *,
             title: str = "ROC", log_fpr: bool = False) -> Path:
    """Draw ROC curves into one PNG.

    Args:
        curves: ``{label: (fpr, tpr)}`` or ``{label: (fpr, tpr, thresholds)}``, e.g. ``{"sface":
            roc_curve(scores, same)}``; fpr, tpr float[T] increasing. The legend gives each AUC.
        path: PNG file to write; its folder is created.
        title: figure title.
        log_fpr: log-scaled false accept axis (points with fpr = 0 are not drawn).

    Returns:
        The path written.

    Raises:
        ValueError: no curves, or a curve whose fpr and tpr are not 1-D of one length.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    figure = new_figure((5.5, 5), dpi=120)
    axes = figure.add_subplot()
    smallest = 1.0
    for label, curve in curves.items():
        fpr, tpr = (np.asarray(values, dtype=np.float64) for values in tuple(curve)[:2])
        if fpr.ndim != 1 or fpr.shape != tpr.shape:
            raise ValueError(f"curve {label!r}: fpr and tpr must be 1-D of one length, got "
                             f"{fpr.shape} and {tpr.shape}")
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{label} (AUC {auc:.4f})")
        if (fpr > 0).any():
            smallest = min(smallest, float(fpr[fpr > 0].min()))
    if log_fpr:
        axes.set_xscale("log")
        axes.set_xlim(min(smallest, 1e-3), 1.0)
    else:
        axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_curves(history: list[dict]) -> bytes:
    """PNG bytes of the per-epoch curves (matplotlib Agg, no pyplot state)."""
    from matplotlib.ticker import MaxNLocator

    figure = new_figure((10, 7))
    panels = (("training loss (per step, mean)", ("loss", "softmax", "center", "triplet")),
              ("fixed probe batch", ("probe_loss", "probe_softmax", "probe_center", "probe_triplet")),
              ("held-out verification", ("heldout_accuracy", "heldout_val", "fraction_active")),
              ("learning rate / throughput", ("lr",)))
    for i, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(2, 2, i + 1)
        log_scale = i < 2   # the center loss is ~100x the others
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history
                      if isinstance(row.get(key), (int, float)) and (row[key] > 0 or not log_scale)]
            if points:
                x, y = zip(*points)
                axes.plot(x, y, marker="o", linewidth=1.2, label=key)
        if log_scale and axes.lines:
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 3:
            points = [(row["epoch"], row["samples_per_s"]) for row in history if "samples_per_s" in row]
            if points:
                twin = axes.twinx()
                twin.plot(*zip(*points), color="tab:red", marker="s", linewidth=1, label="samples/s")
                twin.set_ylabel("samples/s")
                twin.legend(loc="upper right", fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(loc="best" if i != 3 else "upper left", fontsize=8)
    figure.tight_layout()
    return png_bytes(figure)


def plot_paired_gains(domains: Sequence[str], base: Sequence[float], tuned: Sequence[float],
                      gains: Sequence[float], errors: Sequence[float], title: str) -> bytes:
    """PNG bytes: accuracy of two models per domain (bars) and the paired gain with its standard error.

    Args:
        domains: D domain names.
        base, tuned: float[D] mean accuracies in percent.
        gains, errors: float[D] mean paired per-fold gain and its standard error, in points.
        title: figure title.
    """
    figure = new_figure((10, 4.2))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    x = np.arange(len(domains))
    left.bar(x - 0.2, base, width=0.4, label="base")
    left.bar(x + 0.2, tuned, width=0.4, label="fine-tuned")
    low = min(min(base), min(tuned)) if len(domains) else 0.0
    left.set_ylim(max(0.0, np.floor(low - 2.0)), 100.0)
    left.set_ylabel("accuracy (%)")
    right.bar(x, gains, yerr=errors, capsize=4, color=["tab:green" if g > 0 else "tab:red" for g in gains])
    right.axhline(0.0, color="0.3", linewidth=0.8)
    right.set_ylabel("paired gain per fold (points, ± SE)")
    for axes in (left, right):
        axes.set_xticks(x, domains, rotation=20, fontsize=8)
        axes.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return png_bytes(figure)


def _report_axes():
    fig = new_figure((4.6, 3.2))   # fixed margins: a layout engine would draw twice
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.9)
    return fig, fig.add_subplot()


def plot_throughput(edges: np.ndarray, rate: np.ndarray, overall: float | None) -> bytes:
    """The report's throughput chart: images/s per bin (``report_data.throughput_series``) as PNG bytes.

    Args:
        edges: float64[K + 1] bin edges, seconds since the first commit.
        rate: float64[K] images/s per bin.
        overall: the whole run's images/s (a dashed line), or None.
    """
    fig, ax = _report_axes()
    ax.stairs(rate, edges, color="#2b6cb0", linewidth=1.6, label="between commits")
    ax.stairs(rate, edges, fill=True, color="#2b6cb0", alpha=0.15)
    ax.set_xlim(edges[0], edges[-1])
    if overall:
        ax.axhline(float(overall), color="#c05621", linestyle="--", linewidth=1,
                   label=f"whole run {float(overall):.1f}/s")
    ax.set_xlabel("seconds since the first shard committed")
    ax.set_ylabel("images / s")
    ax.set_title("throughput")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def plot_face_histogram(values: np.ndarray, xlabel: str, title: str, log_y: bool = False,
                        fmt: str = ".1f") -> bytes:
    """The report's histogram of finite float[N] values (N >= 1) with its median, as PNG bytes."""
    fig, ax = _report_axes()
    lo, hi = float(values.min()), float(values.max())
    counts, edges = np.histogram(values, bins=40 if hi > lo else 1,
                                 range=(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
    ax.stairs(counts, edges, fill=True, color="#2f855a", alpha=0.85)  # one artist, not 40 bars
    if log_y:
        ax.set_yscale("symlog", linthresh=1)
    median = float(np.median(values))
    ax.axvline(median, color="#1d2330", linestyle="--", linewidth=1, label=f"median {median:{fmt}}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("faces")
    ax.set_title(f"{title} (n={values.size:,})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)
