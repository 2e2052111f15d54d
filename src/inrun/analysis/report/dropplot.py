"""The run's drop, decomposed, as a figure: a waterfall from the values to the measured drop, and
each step's efficiency (Σ values / its game's utility) against its band."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...tracking.drop import EFFICIENCY_BAND, Decomposition
from .plots import NEGATIVE, NEUTRAL, POSITIVE, _figure, _png

GREY = "#8c8c8c"


def waterfall_parts(d: Decomposition) -> list[tuple[str, float]]:
    """The waterfall's steps, in order, summing to the measured drop (the last bar)."""
    parts = [("Σ values", d.values), ("Taylor\nremainder", d.remainder)]
    if d.left_out:
        parts.append((f"left-out step{'s' if len(d.left_out) > 1 else ''}\n(games)", d.left_out_utility))
    rest_games = d.utility - d.utility_valued - d.left_out_utility
    if abs(rest_games) > 0:
        parts.append(("steps not\nvalued (games)", rest_games))
    if d.carried:
        parts += [("momentum:\ncarried", d.carried), ("momentum and\ndecay, rest", d.data_free - d.carried)]
    else:
        parts.append(("momentum\nand decay", d.data_free))
    if abs(d.untracked) > 0:
        parts.append(("untracked\nmoves", d.untracked))
    return parts


def drop_figure(d: Decomposition, rows: Sequence[Mapping[str, Any]],
                band: tuple[float, float] = EFFICIENCY_BAND) -> bytes:
    """Left: the waterfall of :func:`waterfall_parts` ending at the measured drop; right: the
    efficiency of every valued step over training, its band shaded, flagged steps red."""
    fig, (ax, ax2) = _figure(width=11.0, height=3.8, ncols=2)
    parts = waterfall_parts(d)
    level = 0.0
    for k, (_, amount) in enumerate(parts):
        ax.bar(k, amount, bottom=level, color=POSITIVE if amount >= 0 else NEGATIVE, width=0.7)
        if k:
            ax.plot([k - 1.35, k - 0.35], [level, level], color="black", lw=0.6)
        ax.text(k, level + amount, f"{amount:+.3g}", ha="center", va="bottom" if amount >= 0 else "top", fontsize=7)
        level += amount
    n = len(parts)
    ax.plot([n - 1.35, n - 0.35], [level, level], color="black", lw=0.6)
    ax.bar(n, d.measured, color=NEUTRAL, width=0.7)
    ax.text(n, d.measured, f"{d.measured:+.3g}", ha="center", va="bottom" if d.measured >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(n + 1), [p[0] for p in parts] + ["measured\ndrop"], fontsize=7)
    ax.set_ylabel("validation loss decrease")
    ax.set_title(f"values explain {d.explained:.0%} of their steps' games; momentum and decay {d.data_free:+.3g}",
                 fontsize=9)
    valued = [r for r in rows if r["status"] == "valued" and math.isfinite(r["efficiency"])]
    steps = np.array([r["step"] for r in valued])
    eff = np.array([r["efficiency"] for r in valued])
    if len(eff):
        lo, hi = band
        top = max(hi * 1.6, float(np.quantile(eff, 0.95)) * 1.1)
        bottom = min(0.0, float(np.quantile(eff, 0.05)))
        ax2.axhspan(lo, hi, color=POSITIVE, alpha=0.15, lw=0)
        ax2.axhline(1.0, color=POSITIVE, lw=0.8)
        left = np.array([bool(r.get("nonlinear")) for r in valued])
        inside = (eff >= lo) & (eff <= hi)
        ax2.scatter(steps[inside & ~left], eff[inside & ~left], s=5, color=NEUTRAL, label="in the band")
        ax2.scatter(steps[~inside & ~left], np.clip(eff[~inside & ~left], bottom, top), s=5, color=NEGATIVE,
                    label="outside the band")
        if left.any():
            ax2.scatter(steps[left], np.clip(eff[left], bottom, top), s=22, marker="x", color=GREY,
                        label="left out (nonlinear)")
        ax2.set_ylim(bottom, top)
        ax2.legend(fontsize=7, loc="upper right")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("Σ values / U_t(B)")
    ax2.set_title(f"efficiency per step (band {band[0]:g}-{band[1]:g}; outside: {d.flagged} of "
                  f"{len(valued) - len(d.left_out)} counted)", fontsize=9)
    return _png(fig)
