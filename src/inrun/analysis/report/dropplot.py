"""The report's section on what the values explain: the run's measured drop decomposed (a waterfall
from the values to the measured drop, each step's efficiency Σ values / U_t(B) against its band, and
the decomposition by stage of training)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...tracking.drop import EFFICIENCY_BAND, Decomposition, by_stage
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
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.06 * (hi - lo), hi + 0.08 * (hi - lo))  # room for the labels
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


def drop_section(d: Decomposition, rows: Sequence[Mapping[str, Any]], png: bytes, stages: int = 4) -> list[str]:
    """The HTML of the section (``id=drop``): the headline, the figure, the table by stage."""
    import base64

    e = html.escape
    data = base64.b64encode(png).decode()
    parts = [
        "<h2 id=drop>What the values explain: the run's drop, decomposed</h2>",
        f'<figure><img id="plot-drop" class="plot" alt="the drop, decomposed" src="data:image/png;base64,{data}">',
        "<figcaption>Each optimizer step t moves the validation loss by L(θ_t) − L(θ_t+1) = D_t + U_t: the "
        "data-free part D_t = L(θ_t) − L(θ_t + f(0)) (momentum and second moments carried from earlier batches, "
        "weight decay: in no batch's game) and U_t = L(θ_t + f(0)) − L(θ_t+1), the exact utility of the step's "
        "game, which its exact Shapley values add up to. The values of a step are a Taylor approximation of "
        "them: Σ values = U_t − remainder. Left: the sums over the run, from the values to the measured drop "
        "(a step no linearization follows, such as Adam's first, is left out of the values' totals and shown "
        "apart). Right: each step's efficiency Σ values / U_t against its band.</figcaption></figure>",
    ]
    head = ("steps", "measured drop", "Σ D_t (momentum, decay)", "Σ U_t (games)", "Σ values", "remainder",
            "values / games", "steps out of the band", "left out")
    body = []
    for label, s in by_stage(rows, stages):
        cells = [label, f"{s.measured:+.4f}", f"{s.data_free:+.4f}", f"{s.utility:+.4f}", f"{s.values:+.4f}",
                 f"{s.remainder:+.4f}", "–" if math.isnan(s.explained) else f"{s.explained:.0%}", str(s.flagged),
                 ", ".join(map(str, s.left_out))]
        body.append("<tr>" + "".join(f"<td class=num>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")
    return parts
