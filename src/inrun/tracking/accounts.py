"""A step's accounts after its values: its drop row (:mod:`.drop`: what the step did to the validation
loss) and its batch's carry (:mod:`.carry`: its later effect through momentum). The engine tells this
object when a step opens, reaches ``optimizer.step()`` and ends; nothing here changes the values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..errors import UnsupportedOptimizerError
from ..optim import UpdateRule
from .carry import Carry
from .drop import DropLog
from .optimizers import RuleSet
from .params import ParamTable
from .state import Window
from .validation import Validation, ValidationPass


class StepAccounts:
    """The drop rows of every step and, with ``carry_ledger``, the carry of every batch."""

    def __init__(self, update: UpdateRule, table: ParamTable, validation: ValidationPass,
                 carry_ledger: Any = None, carry_window: int | None = None, ddp: Any = None) -> None:
        self.update, self.table = update, table
        if carry_ledger is not None and isinstance(update, RuleSet):
            raise UnsupportedOptimizerError(
                "carry='momentum' follows one optimizer's momentum and this run steps several: use carry='off'")
        if carry_ledger is not None and getattr(update, "carry_refusal", None):
            raise UnsupportedOptimizerError(update.carry_refusal)
        self.drops = DropLog(validation.loss_here, table.params)
        self.carry = None if carry_ledger is None else Carry(update, table, carry_ledger, self.drops, carry_window, ddp)

    def open(self, window: Window, val: Validation, moved: bool) -> None:
        """A new step whose validation pass ``val`` ran (``moved``: :meth:`DropLog.moved` before it)."""
        lr = float(self.update.optimizer.param_groups[0]["lr"])
        self.drops.start(window, val.loss if val.shifted else None, lr, moved)

    def at_step(self, window: Window, grads: list[Tensor | None], ratio: Tensor | None, g_val: list[Tensor]) -> None:
        """At ``optimizer.step()``, the state before it; ``ratio``: each parameter's uniform factor
        from the batch's gradient to the update's (``None``: a per-coordinate one, which carry does not
        follow: the step's batch is then credited for nothing later, and its drop row says so)."""
        self.drops.nonlinear(window, self.update.nonlinear_step(self.table.params, grads))
        if self.carry is not None:
            self.carry.at_step(window, ratio, g_val)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"drops": self.drops.state()}
        if self.carry is not None:
            state["carry"] = self.carry.state()
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("drops") is not None:
            self.drops.load_state(state["drops"])
        if self.carry is not None and state.get("carry") is not None:
            self.carry.load_state(state["carry"])

    def close(self) -> None:
        if self.carry is not None:
            self.carry.close_all()
