"""What each optimizer step did to the validation loss, and how much of it the step's values explain.

Step ``t`` moves the parameters from ``θ_t`` to ``θ_{t+1} = θ_t + f_t(x_B)``, where ``f_t(0)`` is the
move the optimizer makes with no data (momentum and second moments carried from earlier batches,
weight decay). Its measured drop splits exactly::

    L(θ_t) − L(θ_{t+1}) = D_t + U_t
    D_t = L(θ_t) − L(θ_t + f_t(0))       the data-free part: attributed to nobody by the step's game
    U_t = L(θ_t + f_t(0)) − L(θ_{t+1})   the step game's exact utility U_t(B): by efficiency the sum
                                          of the exact Shapley values of the step's batch

and ``U_t = Σφ_t + R_t``: the tracker's values of the step, summed (both orders, every validation
column), and the Taylor remainder ``R_t``. Summed over a run, with the moves the tracker did not see
(steps while it was switched off, parameters changed outside ``optimizer.step()``)::

    L(θ_first) − L(θ_last) = Σ D_t + Σ U_t + untracked,     Σ U_t = Σ φ + Σ R_t

**What it costs.** ``L(θ_t + f_t(0))`` is the validation pass's own loss (the pass runs there:
:meth:`~inrun.tracking.validation.ValidationPass.at_step_start`). ``L(θ_{t+1})`` is the next step's
``L(θ_t)``, measured once: free when the next pass runs at ``θ_{t+1}`` itself (``f(0) = 0``: plain
SGD, the first step of momentum or Adam without weight decay) or when the trapezoid's pass did;
otherwise one forward of the validation loss without gradient (about a third of a pass).

**Steps the linearization cannot follow** (Adam's first step, whose second moment comes from this
batch alone: its update is about ``−η sign(x)``) are marked ``nonlinear`` and left out of the
headline totals (:func:`decompose`); the efficiency ``Σφ_t / U_t`` of each step is a column, and a
step whose efficiency leaves :data:`EFFICIENCY_BAND` is flagged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .state import StepState, Window

EFFICIENCY_BAND = (0.8, 1.25)
"""A step whose ``Σφ_t / U_t`` is outside this band is flagged (values 25% off their game's total)."""

DROP_COLUMNS = (
    "step", "status", "lr", "loss_before", "loss_shifted", "loss_after", "data_free", "utility",
    "values", "first_order", "second_order", "remainder", "efficiency", "carried", "carry_cut", "nonlinear", "flag",
)
"""One row per optimizer step the tracker saw (:attr:`DropLog.rows`)."""


@dataclass
class _Record:
    window: Window
    before: Tensor | float
    shifted: Tensor | float
    lr: float
    nonlinear: str = ""
    stepped: bool = True
    after: Tensor | float = math.nan
    versions: tuple[int, ...] | None = None  # parameter versions right after the step


@dataclass
class DropLog:
    """The per-step drop rows of one tracker (see the module docstring).

    Args:
        loss_here: ``L_val`` (summed over columns) at the current parameters, measured once per
            parameter version (:meth:`~inrun.tracking.validation.ValidationPass.loss_here`).
        params: the trainable parameters (their ``_version`` counters tell whether anything moved
            them between the end of a step and the start of the next).
        band: see :data:`EFFICIENCY_BAND`.
    """

    loss_here: Callable[[int], Tensor]
    params: Sequence[nn.Parameter]
    band: tuple[float, float] = EFFICIENCY_BAND
    _rows: list[dict[str, Any]] = field(default_factory=list)
    _done: list[_Record] = field(default_factory=list)  # finished, their tensors not read yet
    _open: _Record | None = None
    _waiting: _Record | None = None
    _last: tuple[tuple[int, ...] | None, float] | None = None  # (versions, L) at the last finish
    _index: dict[int, int] = field(default_factory=dict)  # step -> row
    _carried: dict[int, tuple[float, str]] = field(default_factory=dict)  # for rows not made yet

    # ------------------------------------------------------------------ the engine's calls
    def moved(self) -> bool:
        """Whether something other than the optimizer's step changed the parameters since the last
        step ended (call before a validation pass shifts them)."""
        want = self._waiting.versions if self._waiting is not None else (self._last[0] if self._last else None)
        return want is not None and want != self._versions()

    def start(self, window: Window, shifted_loss: Tensor | None, lr: float, moved: bool) -> None:
        """A new step: finish the previous one with ``L(θ_t)``; ``shifted_loss``: the pass's loss at
        ``θ_t + f_t(0)`` (``None`` when ``f_t(0) = 0``)."""
        if self._waiting is not None:
            self._finish(None if moved else self.loss_here(window.step))
        if self._last is not None and not moved:
            before: Tensor | float = self._last[1]
        else:
            before = self.loss_here(window.step)
        self._open = _Record(window, before, before if shifted_loss is None else shifted_loss.detach().sum(), lr)

    def nonlinear(self, window: Window, reason: str | None) -> None:
        if self._open is not None and self._open.window is window and reason:
            self._open.nonlinear = reason

    def end(self, window: Window | None, stepped: bool) -> None:
        """``window``'s step is over (``stepped``: the optimizer applied it)."""
        record = self._open
        if record is None or window is None or record.window is not window:
            return
        self._open = None
        record.stepped = stepped
        if not stepped:
            record.shifted = record.before  # nothing moved: no data-free move either
        record.versions = self._versions()
        self._waiting = record

    def finish(self) -> None:
        """Measure ``L(θ_{t+1})`` of a step still waiting for it, at the current parameters."""
        if self._waiting is not None:
            moved = self.moved()
            self._finish(None if moved else self.loss_here(self._waiting.window.step + 1))

    def carried(self, step: int, value: float, cut: str = "") -> None:
        """The carry credited to step ``step``'s batch for its later effect (:mod:`.carry`)."""
        self._read()
        k = self._index.get(step)
        if k is None:
            self._carried[step] = (value, cut)
        else:
            self._rows[k].update(carried=value, carry_cut=cut)

    def _finish(self, after: Tensor | None) -> None:
        record, self._waiting = self._waiting, None
        if after is None:
            self._last = None
        else:
            record.after = after
            self._last = (record.versions, after)
        self._done.append(record)
        if len(self._done) >= 64:
            self._read()

    # ------------------------------------------------------------------ results
    @property
    def rows(self) -> list[dict[str, Any]]:
        """Finished steps (columns :data:`DROP_COLUMNS`); a step's row exists once ``L(θ_{t+1})``
        is measured (at the next step, or :meth:`finish`)."""
        self._read()
        return self._rows

    def _read(self) -> None:
        if not self._done:
            return
        records, self._done = self._done, []
        numbers = iter(_floats([x for r in records for x in (r.before, r.shifted, r.after)]))
        for r in records:
            before, shifted, after = next(numbers), next(numbers), next(numbers)
            w = r.window
            valued = w.state is StepState.COMMITTED and w.first is not None
            first = float(np.asarray(w.first).sum()) if valued else math.nan
            second = float(np.asarray(w.second).sum()) if valued and w.second is not None else 0.0
            self._index[w.step] = len(self._rows)
            self._rows.append(self._row(w.step, "valued" if valued else "skipped", r.lr, before, shifted, after,
                                        first, second if valued else math.nan, r.nonlinear))
            if w.step in self._carried:
                self.carried(w.step, *self._carried.pop(w.step))
        if self._last is not None and isinstance(self._last[1], Tensor):
            self._last = (self._last[0], float(self._last[1]))

    def _row(self, step: int, status: str, lr: float, before: float, shifted: float, after: float,
            first: float, second: float, nonlinear: str = "") -> dict[str, Any]:
        values = first + second
        utility = shifted - after
        efficiency = values / utility if utility != 0 and math.isfinite(values) else math.nan
        flag = ""
        if status != "valued":
            flag = "not valued"
        elif not math.isfinite(after):
            flag = "not measured: the parameters changed outside optimizer.step() before the next step"
        elif not (math.isfinite(efficiency) and self.band[0] <= efficiency <= self.band[1]):
            flag = "efficiency outside the band"
        return {
            "step": int(step), "status": status, "lr": float(lr), "loss_before": before,
            "loss_shifted": shifted, "loss_after": after, "data_free": before - shifted, "utility": utility,
            "values": values, "first_order": first, "second_order": second, "remainder": utility - values,
            "efficiency": efficiency, "carried": 0.0, "carry_cut": "", "nonlinear": nonlinear, "flag": flag,
        }

    def global_rows(self, ddp: Any = None) -> list[dict[str, Any]]:
        """:attr:`rows`, with ``values`` summed over the ranks of a DDP group (each rank values its
        own examples; the losses are the same on every rank). A collective under DDP."""
        rows = self.rows
        if ddp is None:
            return rows
        import torch.distributed as dist

        parts: list[Any] = [None] * ddp.world_size
        dist.all_gather_object(parts, [(r["first_order"], r["second_order"], r["carried"]) for r in rows], group=ddp.group)
        merged = []
        for k, r in enumerate(rows):
            first, second, carried = (sum(p[k][i] for p in parts) for i in range(3))
            row = self._row(r["step"], r["status"], r["lr"], r["loss_before"], r["loss_shifted"], r["loss_after"],
                            first, second, r["nonlinear"])
            merged.append({**row, "carried": carried, "carry_cut": r["carry_cut"]})
        return merged

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (taken between steps, after :meth:`finish`)."""
        rows = self.rows
        return {"rows": [dict(r) for r in rows], "last": None if self._last is None else float(self._last[1])}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`; the first step after it starts from the saved ``L(θ_t)`` (the
        parameters are the checkpoint's), so a resumed run's rows equal an uninterrupted one's."""
        self._rows = [dict(r) for r in state.get("rows", [])]
        self._index = {int(r["step"]): k for k, r in enumerate(self._rows)}
        self._done, self._open, self._waiting, self._carried = [], None, None, {}
        last = state.get("last")
        self._last = None if last is None else (None, float(last))


def _floats(xs: Sequence[Tensor | float]) -> list[float]:
    """Numbers of 0-d tensors (one transfer from the device for all of them) and floats."""
    out = [x if not isinstance(x, Tensor) else math.nan for x in xs]
    index = [i for i, x in enumerate(xs) if isinstance(x, Tensor)]
    if index:
        got = torch.stack([xs[i].detach().reshape(()).double() for i in index]).cpu().tolist()
        for i, v in zip(index, got):
            out[i] = v
    return [float(x) for x in out]


@dataclass(frozen=True)
class Decomposition:
    """A run's measured validation drop, decomposed over its drop rows (:func:`decompose`).

    ``measured = data_free + utility + untracked`` over every row; ``values``, ``utility_valued``
    and ``remainder = utility_valued − values`` over the *counted* steps: valued, and not left out
    as ``nonlinear`` (``left_out`` lists those, with their own figures ``left_out_*``).
    """

    steps: int
    loss_first: float
    loss_last: float
    measured: float
    data_free: float
    utility: float
    untracked: float
    values: float
    utility_valued: float
    remainder: float
    carried: float
    not_valued: int
    flagged: int
    left_out: tuple[int, ...]
    left_out_values: float
    left_out_utility: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The totals, the share explained and the headline, as plain data (``summary.json``)."""
        from dataclasses import asdict

        return {**asdict(self), "left_out": list(self.left_out), "explained": self.explained,
                "headline": self.headline()}

    @property
    def explained(self) -> float:
        """Σ values / Σ U_t over the counted steps: the share of their games' drop the values claim."""
        return self.values / self.utility_valued if self.utility_valued else math.nan

    def headline(self) -> str:
        """The decomposition in one line (the report's headline and ``inrun inspect``'s)."""
        if not self.steps:
            return "No step's drop was measured."
        parts = [f"Validation loss {self.loss_first:.4g} → {self.loss_last:.4g} over {self.steps} steps "
                 f"(drop {self.measured:+.4g}) = the steps' own games {self.utility:+.4g} + momentum and "
                 f"decay {self.data_free:+.4g}"]
        if abs(self.untracked) > 0:
            parts[0] += f" + untracked moves {self.untracked:+.4g}"
        parts.append(f"values explain {self.explained:.0%} of the drop their steps' games attribute "
                     f"(Σ values {self.values:+.4g} against {self.utility_valued:+.4g}; Taylor remainder "
                     f"{self.remainder:+.4g})")
        if self.carried:
            parts.append(f"carry credits {self.carried:+.4g} of momentum's part to earlier batches")
        if self.left_out:
            steps = ", ".join(str(s) for s in self.left_out[:3]) + (" ..." if len(self.left_out) > 3 else "")
            parts.append(f"left out: step {steps} ({self.reason.split(':')[0]}; values {self.left_out_values:+.4g} "
                         f"for a game of {self.left_out_utility:+.4g})")
        if self.flagged:
            parts.append(f"{self.flagged} step(s) outside the efficiency band")
        return "; ".join(parts) + "."


def loss_curve(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Step -> the validation loss at θ_step the drop rows measured: each step's ``L(θ_t)`` and,
    after the last, its ``L(θ_t+1)``."""
    curve = {int(r["step"]): float(r["loss_before"]) for r in rows}
    if rows and math.isfinite(rows[-1]["loss_after"]):
        curve[int(rows[-1]["step"]) + 1] = float(rows[-1]["loss_after"])
    return curve


def by_stage(rows: Sequence[Mapping[str, Any]], stages: int = 4) -> list[tuple[str, Decomposition]]:
    """The decomposition of ``stages`` equal spans of steps (``"A-B"`` labels), in order."""
    rows = sorted(rows, key=lambda r: r["step"])
    if not rows:
        return []
    bounds = np.linspace(0, len(rows), min(stages, len(rows)) + 1).round().astype(int)
    return [(f"{rows[a]['step']}-{rows[b - 1]['step']}", decompose(rows[a:b])) for a, b in itertools.pairwise(bounds)]


def decompose(rows: Sequence[Mapping[str, Any]], leave_out_nonlinear: bool = True) -> Decomposition:
    """Totals of drop rows (:attr:`DropLog.rows`, or the run directory's ``drops.parquet``).

    By default a step marked ``nonlinear`` (Adam's first step) is left out of the values' totals
    and shown apart: its values are a linearization of an update no linearization follows (on the
    ``make demo`` run: Σ values 3.7 for a game of 0.6). Its drop stays in ``measured``.
    """
    rows = sorted(rows, key=lambda r: r["step"])
    if not rows:
        nothing = dict.fromkeys(("data_free", "utility", "untracked", "values", "utility_valued", "remainder",
                                 "carried", "left_out_values", "left_out_utility"), 0.0)
        return Decomposition(steps=0, loss_first=math.nan, loss_last=math.nan, measured=math.nan, not_valued=0,
                             flagged=0, left_out=(), **nothing)

    def total(key: str, chosen: Sequence[Mapping[str, Any]]) -> float:
        return float(sum(r[key] for r in chosen if math.isfinite(r[key])))

    def end(r: Mapping[str, Any]) -> float:  # where a row's own move ended, as far as it was measured
        return r["loss_after"] if math.isfinite(r["loss_after"]) else r["loss_before"]

    measured = [r for r in rows if math.isfinite(r["loss_after"])]
    untracked = sum(end(a) - b["loss_before"] for a, b in itertools.pairwise(rows))
    valued = [r for r in measured if r["status"] == "valued"]
    left = [r for r in valued if leave_out_nonlinear and r.get("nonlinear")]
    left_ids = {id(r) for r in left}
    counted = [r for r in valued if id(r) not in left_ids]
    return Decomposition(
        steps=len(rows), loss_first=rows[0]["loss_before"], loss_last=end(rows[-1]),
        measured=rows[0]["loss_before"] - end(rows[-1]), data_free=total("data_free", measured),
        utility=total("utility", measured), untracked=float(untracked),
        values=total("values", counted), utility_valued=total("utility", counted),
        remainder=total("remainder", counted), carried=total("carried", rows),
        not_valued=len(measured) - len(valued), flagged=sum(1 for r in counted if r["flag"]),
        left_out=tuple(int(r["step"]) for r in left), left_out_values=total("values", left),
        left_out_utility=total("utility", left), reason=left[0]["nonlinear"] if left else "",
    )
