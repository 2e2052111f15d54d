"""Carry: each batch's credit for its gradient's later effect through momentum (``carry="momentum"``).

A step's values credit only the batch's *immediate* effect on that step's update. Momentum (SGD's
buffer, Adam's first moment) carries the batch's gradient ``x_t = r_t Σ_{z∈B_t} g_z`` into every
later update, inside the later steps' data-free moves ``f_s(0)``, which their games attribute to
nobody (the data-free part ``D_s`` of :mod:`inrun.tracking.drop`). The momentum state before step
``s`` holds ``x_t`` with weight ``share_t · d^{s−1−t}`` (SGD: ``share = 1 − dampening``, ``d = μ``;
Adam: ``share = 1 − β1``, ``d = β1``), and ``f_s(0)`` moves the state's content by ``∂f_s(0)/∂m``
(SGD: ``−η μ``; Adam: ``−η β1 / ((1 − β1^s)(sqrt(v̂) + ε))`` per coordinate). To first order the
part of step ``s``'s drop that example ``z`` of step ``t`` carried is therefore::

    carried_z(t → s) = share_t · d^{s−1−t} · <r_t ⊙ g_z, u_s>,   u_s = −(∂f_s(0)/∂m) ⊙ g_val(θ_s + f_s(0))

a dot product of ``g_z`` with the later step's preconditioned validation gradient. ``carried_z`` sums
it over the steps ``s = t+1 ... t+W`` of a window that ends when ``d^{s−1−t}`` falls under
:data:`TOLERANCE` (44 steps at β1 = 0.9, 459 at 0.99; ``carry_window`` caps it). What it does not
credit: the momentum path only (not the second moment's dependence on ``g_z``), and first order.

**How.** Step ``t``'s per-example factors (each layer's inputs and output gradients) are kept until
its window closes; at every later step one accumulator per open window adds ``d^{s−1−t} u_s``
(a parameter-sized buffer per open window: one ``axpy`` each per step); at the close one contraction
of the factors with the accumulator gives every example's ``carried_z``, added to a ledger of their
own (:meth:`inrun.InRunShapley.carried`; by the origin step). Cost: memory ``W`` steps of factors and
``W`` parameter-sized buffers; time one contraction per step (as a first-order value) and ``W``
``axpy``. ``close()`` and :meth:`Carry.close_all` end the windows still open at the current step.

**Checkpoints.** A checkpoint does not end the windows (the uninterrupted run goes on); it stores, per
open window, its carry so far (one contraction each). A run resumed from it cannot go on with those
windows (their factors are gone): it adds their carry so far, and the drop rows of those steps say
their carry was cut at the resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import shapley
from ..errors import InRunError
from ..optim import UpdateRule
from .drop import DropLog
from .params import ParamTable
from .routes import contract_window
from .segments import merge_by_id
from .state import Window

TOLERANCE = 0.01
"""A window closes when the weight of the next step, ``d^{s−1−t}``, is below this for every parameter
(at most 1% of a geometric series' total is left out)."""


@dataclass
class _Open:
    window: Window
    weights: list[float]  # per parameter: share_t · r_t (the factor of the example's gradient)
    decay: list[float]
    power: list[float]  # d^{s−1−t} for the next step s
    acc: list[Tensor | None]  # Σ_s d^{s−1−t} u_s so far, per parameter [K, *shape]
    steps: int = 0


class Carry:
    """The open windows of a tracker with ``carry="momentum"`` (see the module docstring)."""

    def __init__(self, update: UpdateRule, table: ParamTable, ledger: Any, drops: DropLog,
                 window: int | None = None, ddp: Any = None) -> None:
        if ddp is not None:
            raise InRunError("carry does not run under DistributedDataParallel yet: use carry='off'")
        self.update, self.table, self.ledger, self.drops = update, table, ledger, drops
        self.max_steps = window
        self.open: list[_Open] = []

    def at_step(self, window: Window, ratio: Tensor | None, g_val: list[Tensor]) -> None:
        """At step ``s``'s ``optimizer.step()`` (state before it): add ``u_s`` to every open window,
        close the windows that are done, and open one for ``window`` if the rule has momentum."""
        params = self.table.params
        if self.open:
            u = self.update.carried_direction(params, g_val)
            for w in self.open:
                for i, ui in enumerate(u):
                    if ui is None or w.power[i] == 0.0:
                        continue
                    w.acc[i] = ui * w.power[i] if w.acc[i] is None else w.acc[i].add_(ui, alpha=w.power[i])
                w.power = [p * d for p, d in zip(w.power, w.decay)]
                w.steps += 1
            for w in [w for w in self.open if self._done(w)]:
                self._close(w)
        momentum = self.update.momentum(params)
        if momentum is None or not window.micro:
            return
        if ratio is None:  # value clipping or unattributed gradients: not one factor per parameter
            self.drops.carried(window.step, 0.0, "not carried: its gradients were changed per coordinate")
            return
        share, decay = momentum
        r = ratio.double().cpu().tolist()
        window.carrying = True
        self.open.append(_Open(window, [s * ri for s, ri in zip(share, r)], decay, [1.0] * len(params),
                               [None] * len(params)))

    def _done(self, w: _Open) -> bool:
        if self.max_steps is not None and w.steps >= self.max_steps:
            return True
        return max(w.power) < TOLERANCE

    def _values(self, w: _Open) -> np.ndarray:
        """``[B, K]`` carry of the window's examples so far (0 while no later step moved it)."""
        if all(a is None for a in w.acc):
            return np.zeros((len(w.window.ids), 1 if w.window.first is None else w.window.first.shape[1]))
        vectors = [torch.zeros_like(p).unsqueeze(0) if a is None else a * w.weights[i]
                   for i, (a, p) in enumerate(zip(w.acc, self.table.params))]
        K = max(v.shape[0] for v in vectors)
        vectors = [v.expand(K, *v.shape[1:]) if v.shape[0] != K else v for v in vectors]
        with torch.no_grad():
            dots = contract_window(w.window, len(self.table), vectors)
        return shapley.first_order_weighted(dots).cpu().numpy()

    def _close(self, w: _Open, cut: str = "") -> None:
        self.open.remove(w)
        self.add(w.window.step, w.window.ids, self._values(w), cut)
        w.window.carrying = False
        w.window.release()

    def add(self, step: int, ids: list, values: np.ndarray, cut: str = "") -> None:
        if not np.isfinite(values).all():
            return
        ids, values, _ = merge_by_id(ids, values, None)  # a document across micro-batches: one player
        self.ledger.add(step, ids, values)
        self.drops.carried(step, float(values.sum()), cut)

    def close_all(self, cut: str = "") -> None:
        """End every open window at the current step (``close()``, :meth:`InRunShapley.carried`)."""
        for w in list(self.open):
            self._close(w, cut)

    def state(self) -> dict[str, Any]:
        """The carried ledger, and the carry so far of the windows still open (a resumed run adds it
        and cuts them there), as plain lists (a checkpoint loads with ``weights_only=True``)."""
        ledger = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self.ledger.state().items()}
        if ledger.get("trace") is not None:
            ledger["trace"] = {k: list(np.asarray(v).tolist()) for k, v in ledger["trace"].items()}
        return {"ledger": ledger, "open": [{"step": w.window.step, "ids": list(w.window.ids),
                                            "values": self._values(w).tolist()} for w in self.open]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.ledger = type(self.ledger).from_state(state["ledger"])
        for w in list(self.open):
            w.window.carrying = False
            w.window.release()
        self.open = []
        for item in state.get("open", []):
            self.add(int(item["step"]), list(item["ids"]), np.asarray(item["values"], dtype=np.float64),
                     "its carry window was cut at a resume")


def carried_values(carry: Carry | None, final: bool = True) -> Any:
    """The carried table (:meth:`inrun.InRunShapley.carried`): of the windows closed so far, or
    (``final``) of every window, the open ones ended at the current step."""
    if carry is None:
        raise InRunError("carried() needs InRunShapley(..., carry='momentum')")
    if final:
        carry.close_all()
    return carry.ledger.values()
