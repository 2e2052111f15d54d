"""What one optimizer step means for the values: the part of the update the batch's data causes.

A rule turns the optimizer's state at the step into contraction data for the tracker:

* *scalar* rules (plain SGD): the data part of the step of parameter ``p`` is ``−c_p · g_B,p``,
  so ``φ_z = Σ_p c_p · <g_val,p, g_z,p>`` and the dot products can be taken during backward;
* *elementwise* rules (Adam, added by the optimizer work) give a per-coordinate vector.

Weight decay does not depend on the data and is no example's contribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import UnsupportedOptimizerError

SUPPORTED = "torch.optim.SGD (momentum=0)"


class UpdateRule:
    """Base class: how one optimizer's step is attributed."""

    name = "rule"
    elementwise = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UnsupportedOptimizerError` for settings this rule cannot attribute."""

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        """``[n_params]`` float64: ``c_p`` with data part of the step ``−c_p · g_B,p``."""
        raise NotImplementedError


class SGDRule(UpdateRule):
    """Plain SGD: ``θ ← θ − η (g + λθ)``; the data part is ``−η g`` (``+η g`` with ``maximize``)."""

    name = "sgd"

    def validate(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group.get("momentum", 0) != 0 or group.get("nesterov", False):
                raise UnsupportedOptimizerError(
                    f"SGD with momentum (param group {i}: momentum={group.get('momentum')}) is not "
                    f"supported yet: momentum carries each gradient into later steps. Supported: "
                    f"{SUPPORTED}."
                )

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        lr_of: dict[int, float] = {}
        for group in self.optimizer.param_groups:
            sign = -1.0 if group.get("maximize", False) else 1.0
            lr = float(group["lr"])
            for p in group["params"]:
                lr_of[id(p)] = sign * lr
        return torch.tensor([lr_of.get(id(p), 0.0) for p in params], dtype=torch.float64)


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 5:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}. Supported: {SUPPORTED}."
        )
    return optimizer


def rule_for(optimizer: object) -> UpdateRule:
    """The attribution rule for ``optimizer``, or a clear error naming what is supported."""
    opt = unwrap_optimizer(optimizer)
    if type(opt) is torch.optim.SGD:
        return SGDRule(opt)
    raise UnsupportedOptimizerError(
        f"{type(opt).__name__} is not supported: its update is not attributed yet. "
        f"Supported: {SUPPORTED}."
    )
