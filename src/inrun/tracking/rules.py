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

from typing import Any, Literal

import torch
from torch import Tensor

from .. import shapley
from ..errors import StepOrderError, UnsupportedOptimizerError
from ..optim import UpdateRule
from .check import ConsistencyCheck, column_sum
from .config import TrackerConfig
from .ddp import DDPSync
from .gradmap import StepMap
from .params import ParamTable
from .routes import contract_window
from .state import Window
from .validation import Validation, ValidationPass

Correction = Literal["none", "hessian", "trapezoid"]


class MissingFactors(Exception):
    """Value clipping under an SGD-type rule needs each layer's factors, and this step kept none."""


class ValueRule:
    def __init__(
        self, update: UpdateRule, correction: Correction, table: ParamTable, validation: ValidationPass,
        check: ConsistencyCheck, ddp: DDPSync | None, carry: bool = False,
    ) -> None:
        self.update, self.correction, self.table = update, correction, table
        self.validation, self.check, self.ddp = validation, check, ddp
        self.immediate = not update.elementwise
        self.keeps_factors = update.elementwise or correction != "none" or carry
        self.pending = correction == "trapezoid"
        if not self.immediate:
            # every contraction of an elementwise rule takes the vector route (a slope per
            # coordinate has no Gram form): the validation pass's Gram factors would go unread
            validation.captures_gram = False

    @property
    def order(self) -> int:
        return 1 if self.correction == "none" else 2

    def at_step(self, window: Window, smap: StepMap) -> tuple[Tensor, Tensor | None]:
        """``[B, K]`` values (first order, and the Hessian correction) at ``optimizer.step()``,
        on the device; sets the window's coefficients and its check terms. ``smap``: how the
        gradient the optimizer reads came from the examples' (:mod:`inrun.tracking.gradmap`)."""
        val = self.validation.current
        with torch.no_grad():
            if self.update.elementwise:
                first = self._first_order_elementwise(window, smap, val)
            else:
                first = self._first_order_scalar(window, smap, val)
        second = None
        if self.correction == "hessian":
            second = self._hessian(window, smap, val)
        elif self.correction == "trapezoid":
            window.base_values = first  # the data part's start: g_val at θ_t + f(0)
        return first, second

    def _first_order_scalar(self, window: Window, smap: StepMap, val: Validation) -> Tensor:
        ratio = smap.ratio * smap.share
        window.rates = self.update.scalar_coefficients(self.table.params).to(ratio.device)
        window.coef = window.rates * ratio
        # value clipping: a per-coordinate factor, contracted now from the kept factors
        coordinate = {i: window.rates[i] * smap.share * R for i, R in smap.coordinate.items()}
        window.multipliers = [coordinate.get(i, c) for i, c in enumerate(window.coef)]
        if self.ddp is not None and window.check_terms is not None:
            # the check's terms become the group's: one all-reduce per step
            window.check_terms = self.ddp.reduce_check_terms(window.check_terms)
        coef = window.coef
        extra = None
        if coordinate:
            if any(mb.tokens is not None for mb in window.micro):
                raise StepOrderError("token values of a step whose gradients were value-clipped are not computed")
            self.keeps_factors = True  # the loop clips values: later steps keep each layer's factors
            if not all(mb.factors for mb in window.micro):
                raise MissingFactors
            coef = coef.clone()
            coef[list(coordinate)] = 0
            weights = [coordinate.get(i) for i in range(len(self.table))]
            extra = contract_window(window, len(self.table), shapley.weighted(weights, val.grads), joint=False)
            self._check_rows(window, sorted(coordinate), extra, weights, smap, val)
        first = shapley.first_order(coef, window.dots())
        if extra is not None:
            first = first + shapley.first_order_weighted(extra)
            window.coef = None  # the trapezoid's end takes the vector route: no Gram factor per coordinate
        if not self.check.groups and not any(c.entry.handler.multi_output for mb in window.micro for c in mb.captures):
            return first
        # Modules valued jointly (the fallback) are contracted now, along each parameter's step.
        weighted = shapley.weighted(window.multipliers, val.grads)
        joint = contract_window(window, len(self.table), weighted, joint=True, record_route=True, tokens=True)
        if window.check_terms is not None:
            rows = sorted({i for mb in window.micro for c in mb.captures if c.entry.handler.multi_output
                           for i in c.entry.param_index})
            # Those rows' check is on the weighted dots, the other modules' uses of a shared (tied)
            # parameter included.
            both = joint + coef.to(joint).view(-1, 1, 1) * window.dots()
            if extra is not None:
                both = both + extra
            self._check_rows(window, rows, both, window.multipliers, smap, val)
        return first + shapley.first_order_weighted(joint)

    def _check_rows(
        self, window: Window, rows: list[int], dots: Tensor, weights: list[Any], smap: StepMap, val: Validation,
    ) -> None:
        """Replace the check's terms of ``rows`` by those of ``dots`` (weighted by ``weights``)
        against the examples' summed gradient."""
        if window.check_terms is None or not rows:
            return
        vectors = [None if w is None or i not in rows else shapley.weigh(w, column_sum(v).unsqueeze(0))[0]
                   for i, (w, v) in enumerate(zip(weights, val.grads))]
        terms = self.check.terms([dots], smap.batch, vectors, ratio=smap.share_tensor(), sum_over_ranks=True)
        index = torch.tensor(rows, device=dots.device, dtype=torch.long)
        window.check_terms = tuple(t.index_copy(0, index, j[index]) for t, j in zip(window.check_terms, terms))

    def _first_order_elementwise(self, window: Window, smap: StepMap, val: Validation) -> Tensor:
        params = self.table.params
        grads = self.table.grads()
        slopes = self.update.pullbacks(params, grads)  # a slope D, or v -> Jᵀ v (Muon, Adafactor)
        if self.ddp is not None:
            slopes = self.ddp.gathered(slopes)  # FSDP2: whole slopes from the shards' (one all-gather each)
        if smap.offset:
            if mapped := [self.table.names[i] for i in smap.offset if callable(slopes[i])]:
                raise UnsupportedOptimizerError(
                    f"{mapped[0]}: a gradient changed by nobody's part (tracker.unattributed, an extra loss) "
                    f"under {self.update.name}, whose step is a map of the whole gradient, is not valued. "
                    "Call backward of that part inside tracker.step(ids), or use SGD/Adam for this run"
                )
            # nobody's part E' of what the optimizer reads: the data part is f(x) − f(E')
            at_offset = self.update.slopes(params, [smap.offset.get(i) for i in range(len(params))])
        multipliers: list[Tensor | None] = []
        for i, s in enumerate(slopes):
            if s is None:
                multipliers.append(None)
                continue
            factor = smap.factor(i)
            if i in smap.offset and at_offset[i] is not None and smap.batch[i] is not None:
                x, e, g_b = grads[i].to(s.dtype), smap.offset[i].to(s.dtype), smap.batch[i].to(s.dtype)
                step = s * x - at_offset[i] * e
                nonzero = g_b != 0
                m = torch.where(nonzero, step / torch.where(nonzero, g_b, torch.ones_like(g_b)), s * factor.to(s.dtype))
                multipliers.append(-m * smap.share)
            else:
                multipliers.append(shapley.scaled(s, -factor * smap.share))
        window.multipliers = multipliers
        dots = contract_window(window, len(self.table), shapley.weighted(window.multipliers, val.grads),
                               record_route=True, tokens=True)
        weights = [None if m is None else shapley.weigh(m, column_sum(v).unsqueeze(0))[0]
                   for m, v in zip(window.multipliers, val.grads)]
        # g_B is the sum of the per-example gradients over the (global) batch, so under DDP this
        # rank's sums are added over the ranks (one all-reduce)
        window.check_terms = self.check.terms([dots], smap.batch, weights, ratio=smap.share_tensor(),
                                              sum_over_ranks=True)
        return shapley.first_order_weighted(dots)

    def _hessian(self, window: Window, smap: StepMap, val: Validation) -> Tensor:
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
                (smap.data_part(i, g) if g is not None else torch.zeros_like(p)) * window.rates[i].to(p.dtype)
                for i, (g, p) in enumerate(zip(self.table.grads(), self.table.params))
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
    return ValueRule(update, correction, table, validation, check, ddp, carry=config.carry != "off")
