"""Value rules: how a step's values are made from its per-example factors, by order, order-2
variant and kind of update (scalar coefficient per parameter, or a per-coordinate slope).

:func:`make_value_rule` is the one place that reads ``order``, ``second_order`` and the update
rule's kind; everything else asks the rule it made:

* ``immediate``: the dots with ``g_val`` are taken during backward (scalar update rules: SGD,
  momentum, the SGD proxy), so nothing needs to be kept for order 1;
* ``keeps_factors``: each tracked call's inputs and output gradients are kept until the
  step (elementwise rules: Adam's slope is known only then) or the next validation pass
  (order 2);
* ``pending``: the values wait for ``g_val(θ_t+1)`` (the trapezoid).

The formulas themselves are in :mod:`inrun.shapley`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .. import shapley
from ..optim import UpdateRule
from .check import ConsistencyCheck, column_sum
from .config import TrackerConfig
from .ddp import DDPSync
from .params import ParamTable
from .routes import contract_window
from .state import Window
from .validation import Validation, ValidationPass

Correction = Literal["none", "hessian", "trapezoid"]


class ValueRule:
    def __init__(
        self, update: UpdateRule, correction: Correction, table: ParamTable, validation: ValidationPass,
        check: ConsistencyCheck, ddp: DDPSync | None,
    ) -> None:
        self.update, self.correction, self.table = update, correction, table
        self.validation, self.check, self.ddp = validation, check, ddp
        self.immediate = not update.elementwise
        self.keeps_factors = update.elementwise or correction != "none"
        self.pending = correction == "trapezoid"

    @property
    def order(self) -> int:
        return 1 if self.correction == "none" else 2

    def at_step(self, window: Window, grads: list[Tensor | None], ratio: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, K]`` values (first order, and the Hessian correction) at ``optimizer.step()``,
        on the device; sets the window's coefficients and its check terms."""
        val = self.validation.current
        with torch.no_grad():
            if self.update.elementwise:
                first = self._first_order_elementwise(window, grads, ratio, val)
            else:
                first = self._first_order_scalar(window, grads, ratio, val)
        second = None
        if self.correction == "hessian":
            second = self._hessian(window, grads, val)
        elif self.correction == "trapezoid":
            window.base_values = first  # the data part's start: g_val at θ_t + f(0)
        return first, second

    def _first_order_scalar(self, window: Window, grads: list[Tensor | None], ratio: Tensor, val: Validation) -> Tensor:
        window.rates = self.update.scalar_coefficients(self.table.params).to(ratio.device)
        window.coef = window.rates * ratio
        window.multipliers = list(window.coef)
        if self.ddp is not None and window.check_terms is not None:
            # the check's terms become the group's: one all-reduce per step
            window.check_terms = self.ddp.reduce_check_terms(window.check_terms)
        first = shapley.first_order(window.coef, window.dots())
        if not self.check.groups and not any(c.entry.handler.multi_output for mb in window.micro for c in mb.captures):
            return first
        # Modules valued jointly (the fallback) are contracted now, along each parameter's step.
        weighted = shapley.weighted(window.multipliers, val.grads)
        joint = contract_window(window, len(self.table), weighted, joint=True, record_route=True, tokens=True)
        if window.check_terms is not None:
            rows = sorted({i for mb in window.micro for c in mb.captures if c.entry.handler.multi_output
                           for i in c.entry.param_index})
            weights = [m.to(v.dtype) * column_sum(v) if i in rows else None
                       for i, (m, v) in enumerate(zip(window.multipliers, val.grads))]
            # Those rows' check is on the weighted dots, the other modules' uses of a shared (tied)
            # parameter included.
            both = joint + window.coef.to(joint).view(-1, 1, 1) * window.dots()
            terms = self.check.terms([both], grads, weights, ratio=ratio, sum_over_ranks=True)
            index = torch.tensor(rows, device=joint.device, dtype=torch.long)
            window.check_terms = tuple(t.index_copy(0, index, j[index]) for t, j in zip(window.check_terms, terms))
        return first + shapley.first_order_weighted(joint)

    def _first_order_elementwise(
        self, window: Window, grads: list[Tensor | None], ratio: Tensor, val: Validation,
    ) -> Tensor:
        slopes = self.update.slopes(self.table.params, grads)
        window.multipliers = [None if s is None else s * (-ratio[i]).to(s.dtype) for i, s in enumerate(slopes)]
        dots = contract_window(window, len(self.table), shapley.weighted(window.multipliers, val.grads),
                               record_route=True, tokens=True)
        weights = [None if m is None else m.to(v.dtype) * column_sum(v) for m, v in zip(window.multipliers, val.grads)]
        # p.grad / ratio is the sum of the per-example gradients over the (global) batch, so
        # under DDP this rank's sums are added over the ranks (one all-reduce)
        window.check_terms = self.check.terms([dots], grads, weights, ratio=ratio, sum_over_ranks=True)
        return shapley.first_order_weighted(dots)

    def _hessian(self, window: Window, grads: list[Tensor | None], val: Validation) -> Tensor:
        """Second-order term with one Hessian-vector product.

        The step is ``Δ(S) = δ0 − c ⊙ g_S`` (``c`` = learning rate × clip factor, ``δ0 = f(0)``
        the data-free part). Expanded around ``θ + δ0``, where the first-order term's validation
        gradient is taken, the Shapley value of the quadratic Taylor utility is
        ``<c ⊙ g_z, g_val(θ + δ0)> − ½ <c ⊙ g_z, H (c ⊙ g_B)>``; ``c ⊙ g_B`` equals
        ``rates ⊙ p.grad`` at the step (the clip factor is already in ``p.grad``). ``H`` is taken
        at ``θ + δ0`` too.
        """
        with torch.no_grad():
            direction = [
                (g if g is not None else torch.zeros_like(p)) * window.rates[i].to(p.dtype)
                for i, (g, p) in enumerate(zip(grads, self.table.params))
            ]
        vectors = self.validation.hessian_vector_products(direction, val.shift, window.step)
        with torch.no_grad():
            dots = contract_window(window, len(self.table), shapley.weighted(window.multipliers, vectors))
        return shapley.hessian_correction(dots)

    def finish(self, window: Window, val_next: Validation) -> Tensor:
        """The trapezoid's ``[B, K]`` values, now that ``g_val(θ_t+1)`` is known (on the device)."""
        with torch.no_grad():
            vectors = shapley.weighted(window.multipliers, val_next.grads)
            if window.coef is not None:
                # SGD-type step: g_val(θ_t+1) is a validation gradient, so the layers on the Gram
                # route use the factors its pass captured, as order 1 does.
                dots = contract_window(window, len(self.table), vectors, gram=val_next.gram, coef=window.coef)
            else:
                dots = contract_window(window, len(self.table), vectors)
            return shapley.trapezoid(window.base_values, shapley.first_order_weighted(dots))


def make_value_rule(
    config: TrackerConfig, update: UpdateRule, table: ParamTable, validation: ValidationPass,
    check: ConsistencyCheck, ddp: DDPSync | None,
) -> ValueRule:
    """The value rule of these settings and this optimizer (the one place that decides it)."""
    correction: Correction = "none"
    if config.order == 2:
        correction = config.second_order
        if correction == "hessian" and update.elementwise:
            raise ValueError(
                f"second_order='hessian' is defined for SGD-type steps; for {type(update.optimizer).__name__} "
                "use second_order='trapezoid' (g_val averaged at θ + f(0) and at θ_t+1)"
            )
    return ValueRule(update, correction, table, validation, check, ddp)
