"""The report's figures, as PNG bytes (matplotlib, Agg backend; no display needed).

Every function takes plain pandas/numpy data and returns the PNG, so each plot can be tested
and reused on its own.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

POSITIVE = "#2a9d5c"
NEGATIVE = "#d1495b"
NEUTRAL = "#4c72b0"
DPI = 110


def _figure(width: float = 8.0, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=DPI)
    return fig, axes


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def value_distribution(values: np.ndarray) -> bytes:
    """Histogram of example values, negative bins red, with the share of negative values."""
    fig, ax = _figure()
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.quantile(values, [0.005, 0.995]) if len(values) else (0.0, 1.0)
    span = max(abs(lo), abs(hi)) or 1.0
    bins = np.linspace(-span, span, 61)
    counts, edges = np.histogram(np.clip(values, -span, span), bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    ax.bar(centers, counts, width=edges[1] - edges[0], color=[NEGATIVE if c < 0 else POSITIVE for c in centers])
    ax.axvline(0, color="black", lw=0.8)
    neg = float((values < 0).mean()) if len(values) else 0.0
    ax.set_title(f"Value distribution: {len(values):,} examples, {neg:.1%} negative (outer 0.5% clipped)")
    ax.set_xlabel("value (helpful > 0, harmful < 0)")
    ax.set_ylabel("examples")
    return _png(fig)


def source_values(sources: Sequence[str], totals: Sequence[float], means: Sequence[float]) -> bytes:
    """Total value per source and mean value per example, as horizontal bars."""
    n = len(sources)
    fig, (a, b) = _figure(9.0, max(2.6, 0.28 * n + 1.2), ncols=2)
    y = np.arange(n)[::-1]
    for ax, data, title in ((a, totals, "total value"), (b, means, "mean value per example")):
        ax.barh(y, data, color=[NEGATIVE if v < 0 else POSITIVE for v in data])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, sources if ax is a else [""] * n, fontsize=8)
        ax.set_title(title)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    return _png(fig)


def source_shares(stage_labels: Sequence[str], sources: Sequence[str], stage_totals: np.ndarray) -> bytes:
    """The paper's Fig. 3: each source's share of the (positive) value per training stage.

    Args:
        stage_labels: one label per stage (e.g. ``"0-49"``).
        sources: one name per row of ``stage_totals``.
        stage_totals: ``[sources, stages]`` summed values.

    Left: share of value per stage among sources whose stage total is positive (negative
    totals are excluded, as in the paper). Right: each source's signed value per stage.
    """
    import matplotlib.pyplot as plt

    fig, (a, b) = _figure(10.0, 4.2, ncols=2)
    totals = np.asarray(stage_totals, dtype=np.float64)
    positive = np.where(totals > 0, totals, 0.0)
    denom = positive.sum(axis=0)
    shares = np.divide(positive, denom, out=np.zeros_like(positive), where=denom > 0)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(sources), 1)))
    x = np.arange(len(stage_labels))
    bottom = np.zeros(len(stage_labels))
    for k, name in enumerate(sources):
        a.bar(x, shares[k], bottom=bottom, color=colors[k], label=name, width=0.85)
        b.plot(x, totals[k], marker="o", ms=3, color=colors[k], label=name)
        bottom += shares[k]
    for ax in (a, b):
        ax.set_xticks(x, stage_labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("training stage (steps)")
    a.set_ylim(0, 1)
    a.set_ylabel("share of positive value")
    a.set_title("Share of value per source and stage")
    b.axhline(0, color="black", lw=0.8)
    b.set_title("Value per source and stage")
    b.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    b.legend(fontsize=6, ncol=2, loc="upper right", frameon=False)
    return _png(fig)


def cumulative_value(
    steps: np.ndarray,
    cumulative: np.ndarray,
    eval_steps: np.ndarray,
    val_decrease: np.ndarray,
    per_source: dict[str, np.ndarray],
) -> bytes:
    """Left: Σ values over steps vs the measured drop of validation loss. Right: per source."""
    fig, (a, b) = _figure(10.0, 3.8, ncols=2)
    a.plot(steps, cumulative, color=NEUTRAL, label="Σ values of the steps so far")
    if len(eval_steps):
        a.plot(eval_steps, val_decrease, "o--", color="black", ms=3, lw=1, label="measured drop of validation loss")
    a.set_xlabel("step")
    a.set_title("Cumulative value")
    a.legend(fontsize=8, frameon=False)
    for name, series in per_source.items():
        b.plot(steps, series, lw=1.2, label=name)
    b.axhline(0, color="black", lw=0.8)
    b.set_xlabel("step")
    b.set_title("Cumulative value per source (largest)")
    b.legend(fontsize=6, ncol=2, frameon=False)
    return _png(fig)


def loss_curves(steps: np.ndarray, train_loss: np.ndarray, eval_steps: np.ndarray, val_loss: np.ndarray) -> bytes:
    """Training loss (and a moving average) and validation loss over steps."""
    fig, ax = _figure()
    if len(steps):
        ax.plot(steps, train_loss, color="#bbbbbb", lw=0.8, label="training loss (batch)")
        window = max(1, len(steps) // 40)
        if window > 1:
            kernel = np.ones(window) / window
            smooth = np.convolve(train_loss, kernel, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="#555555", lw=1.2, label=f"training loss ({window}-step mean)")
    ax.plot(eval_steps, val_loss, "o-", color=NEUTRAL, ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def curation_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], spread: dict[str, np.ndarray] | None = None
) -> bytes:
    """Validation loss over steps of several runs (original, curated, random subset).

    With ``spread`` (one standard deviation per evaluation, over seeds) each curve is the mean
    with a band. The y-axis shows the part of training where the runs differ: it starts after
    the first tenth of the steps (where every run still sits near the initial loss, which would
    otherwise squash the end of the curves into a line); the start is cut off above, not hidden.
    """
    fig, ax = _figure()
    styles = {"original (all data)": ("#999999", "--"), "kept (curated)": (POSITIVE, "-"), "random subset": (NEGATIVE, "-")}
    lows, highs = [], []
    for name, (steps, loss) in curves.items():
        steps, loss = np.asarray(steps, dtype=np.float64), np.asarray(loss, dtype=np.float64)
        color, ls = styles.get(name, (NEUTRAL, "-"))
        band = None if spread is None else np.asarray(spread.get(name, np.zeros_like(loss)), dtype=np.float64)
        final = f"{loss[-1]:.4f}" + (f" ± {band[-1]:.4f}" if band is not None and len(spread or {}) else "")
        ax.plot(steps, loss, ls, color=color, marker="o", ms=3, label=f"{name}: final {final}")
        late = steps >= steps[0] + 0.1 * (steps[-1] - steps[0]) if len(steps) > 2 else np.ones(len(steps), bool)
        lo, hi = loss, loss
        if band is not None:
            ax.fill_between(steps, loss - band, loss + band, color=color, alpha=0.18, lw=0)
            lo, hi = loss - band, loss + band
        if late.any():
            lows.append(float(lo[late].min()))
            highs.append(float(hi[late].max()))
    if lows and highs and max(highs) > min(lows):
        pad = 0.08 * (max(highs) - min(lows))
        ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss" + (" (mean ± sd over seeds)" if spread else ""))
    ax.set_title("Curation: validation loss (start of training cut off above)")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def fidelity_panel(
    steps: np.ndarray, pearson: np.ndarray, spearman: np.ndarray, rel_rmse: np.ndarray, flagged: np.ndarray,
    exact_values: np.ndarray, tracker_values: np.ndarray, value_steps: np.ndarray, warn_rmse: float,
) -> bytes:
    """The audit over training: left, correlation of the tracker's values with the exact Shapley
    values per audited step; middle, relative RMSE and the threshold above which a step is
    unfaithful; right, every audited example's tracker value against its exact value, by step."""
    fig, (a, b, c) = _figure(12.0, 3.6, ncols=3)
    a.plot(steps, pearson, "o-", color=NEUTRAL, ms=4, label="Pearson")
    a.plot(steps, spearman, "s--", color="#8c8c8c", ms=3, lw=1, label="Spearman")
    if flagged.any():
        a.plot(steps[flagged], pearson[flagged], "o", ms=9, mfc="none", mec=NEGATIVE, mew=1.5, label="unfaithful")
    low = float(np.nanmin(np.concatenate([pearson, spearman]))) if len(pearson) else 1.0
    a.set_ylim(min(0.6, low - 0.05), 1.02)
    a.set_xlabel("step")
    a.set_title("Correlation with exact Shapley")
    a.legend(fontsize=7, frameon=False, loc="lower left")
    b.semilogy(steps, np.maximum(rel_rmse, 1e-6), "o-", color=NEUTRAL, ms=4)
    if flagged.any():
        b.plot(steps[flagged], np.maximum(rel_rmse[flagged], 1e-6), "o", ms=9, mfc="none", mec=NEGATIVE, mew=1.5)
    b.axhline(warn_rmse, color=NEGATIVE, lw=0.8, ls=":", label=f"unfaithful above {warn_rmse:g}")
    b.legend(fontsize=7, frameon=False, loc="lower left")
    b.set_xlabel("step")
    b.set_title("Relative RMSE (tracker vs exact)")
    if len(exact_values):
        lo = float(min(exact_values.min(), tracker_values.min()))
        hi = float(max(exact_values.max(), tracker_values.max()))
        c.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        points = c.scatter(exact_values, tracker_values, c=value_steps, cmap="viridis", s=14)
        fig.colorbar(points, ax=c, label="step")
        c.ticklabel_format(style="sci", scilimits=(-3, 3))
    c.set_xlabel("exact Shapley value")
    c.set_ylabel("tracker's value")
    c.set_title("Audited examples")
    return _png(fig)
