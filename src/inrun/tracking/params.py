"""The parameter table: the trainable parameters in one order, their gradients and norms (what the
loop did to the gradients before the step: :mod:`inrun.tracking.gradmap`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InRunError, NonFiniteError, StepOrderError, UnsupportedModuleError

logger = logging.getLogger(__name__)


class ParamTable:
    """Trainable parameters of a model, each once (tied parameters share one row)."""

    def __init__(self, module: nn.Module) -> None:
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []
        self._row: dict[int, int] = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                self._row[id(p)] = len(self.params)
                self.params.append(p)
                self.names.append(name)
        if not self.params:
            raise InRunError("the model has no trainable parameters (requires_grad=True)")
        self._module = module
        self._modules = {id(m): n for n, m in module.named_modules()}
        self.outside: set[int] = set()  # trainable parameters the optimizer does not hold

    def require_unchanged(self) -> None:
        """Refuse a model whose trainable parameters or modules changed after the tracker was made:
        a replaced layer would have no hooks, an unfrozen parameter no value."""
        now = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        if [id(p) for _, p in now] != [id(p) for p in self.params]:
            before = {id(p): n for n, p in zip(self.names, self.params)}
            added = [n for n, p in now if id(p) not in before]
            gone = [before[i] for i in before if i not in {id(p) for _, p in now}]
            raise UnsupportedModuleError(
                "the model's trainable parameters changed after the tracker was made"
                + (f" (new or unfrozen: {', '.join(added[:3])})" if added else "")
                + (f" (removed or frozen: {', '.join(gone[:3])})" if gone else "")
                + ": make the tracker once the model is final (close this one and make a new one)"
            )
        modules = {id(m): n for n, m in self._module.named_modules()}
        if modules.keys() != self._modules.keys():
            changed = sorted({n for i, n in modules.items() if i not in self._modules})
            raise UnsupportedModuleError(
                f"the model's modules changed after the tracker was made ({', '.join(changed[:3]) or 'some removed'} "
                "replaced or added: they have no hooks): make the tracker once the model is final"
            )

    def __len__(self) -> int:
        return len(self.params)

    def row(self, p: Tensor) -> int:
        return self._row[id(p)]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def grads(self) -> list[Tensor | None]:
        return [p.grad for p in self.params]

    def norms(self, grads: list[Tensor | None]) -> Tensor:
        """``[P]`` float64 gradient norms (0 for a missing gradient)."""
        device = self.device
        present = [g for g in grads if g is not None]
        values = iter(torch._foreach_norm(present)) if present else iter(())
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([next(values).double().to(device) if g is not None else zero for g in grads])

    def all_grads_none(self) -> bool:
        return all(p.grad is None for p in self.params)

    def require_zero_grads(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        with torch.no_grad():
            nonzero = bool(torch.stack(torch._foreach_norm(grads)).any())
        if nonzero:
            stale = [n for n, p in zip(self.names, self.params)
                     if p.grad is not None and id(p) in self.outside and bool(p.grad.detach().ne(0).any())]
            if stale:
                raise StepOrderError(
                    f"gradients of {len(stale)} trainable parameter(s) not held by the optimizer "
                    f"({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}) are not zero at the start of a "
                    "step: optimizer.zero_grad() clears only the parameters it holds, and optimizer.step() "
                    "never applies theirs. Give the optimizer every trainable parameter, or set "
                    "requires_grad=False on those it should not train."
                )
            raise StepOrderError(
                "gradients are not zero at the start of a step: call optimizer.zero_grad() "
                "after each optimizer.step(), so the update is exactly the valued examples' "
                "gradients"
            )

    def warn_missing_from(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        in_opt = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        self.outside = {id(p) for p in self.params if id(p) not in in_opt}
        missing = [n for n, p in zip(self.names, self.params) if id(p) not in in_opt]
        if missing:
            logger.warning(
                "%d trainable parameters are not in the optimizer and get no value: %s",
                len(missing),
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )

    @staticmethod
    def learning_rates(optimizers: Sequence[torch.optim.Optimizer]) -> list[float]:
        """The learning rate of every parameter group, in the optimizers' order; a NaN or infinite
        one is refused (it would make every parameter of its group NaN)."""
        lrs = [float(g["lr"]) for o in optimizers for g in o.param_groups]
        bad = next((k for k, lr in enumerate(lrs) if not math.isfinite(lr)), None)
        if bad is not None:
            raise NonFiniteError(
                f"the learning rate of parameter group {bad} is {lrs[bad]}: the update would make its "
                "parameters non-finite. Check the optimizer's lr and the schedule that sets it."
            )
        return lrs
