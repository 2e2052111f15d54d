"""What one optimizer step means for the values: the part of the update the batch's data causes.

Write ``x`` for the gradient the optimizer sees at the step (``p.grad`` after clipping or
unscaling; the tracker knows the per-parameter factor ``r`` between it and the sum of the
examples' gradients, so ``x_S = r · Σ_{z∈S} g_z``). Each coordinate of the update is a function
of it, ``Δθ_j(S) = f_j(x_S,j)``. A rule describes ``f`` at the step by

* ``f(0)``, the step the optimizer would take with no data (momentum, weight decay): no example's
  contribution. It depends only on the optimizer's state, so it is known before the batch, and
  the tracker takes its validation gradient at ``θ + f(0)``: the data part of the step is
  linearized where it starts (for plain SGD, ``f(0) = 0``);
* a per-coordinate slope ``D`` with ``f(x_S) ≈ f(0) + D ⊙ x_S``, so that
  ``φ_z = −<g_val, D ⊙ r g_z>``: one dot product per example, computed by the layer handlers.

*Scalar* rules (SGD with or without momentum: ``D = −c_p`` on a whole parameter) let the tracker
take the dot products with ``g_val`` during backward. *Elementwise* rules (Adam, AdamW) give a
per-coordinate ``D`` known only at the step; the tracker keeps each layer's per-example factors
until then.

Adam's slope (``adam="secant"``, default): ``D_j = (f_j(x_B,j) − f_j(0)) / x_B,j``, the actual
data step of coordinate ``j`` over the gradient that caused it (Aumann–Shapley along the
diagonal: exact efficiency for the game linearized along that segment), evaluated in a form with
no cancellation and equal to ``f_j'(0)`` at ``x = 0``. ``adam="fixed_state"`` (arXiv
2602.00329): the second moment held at its post-step value, ``D_j = −η (1−β1)/(1−β1^t) /
(sqrt(v_j/(1−β2^t)) + ε)``.

Attribution of carried state: momentum (SGD's buffer, Adam's first moment) carries each
gradient into later steps. The value of a step credits only the batch's *immediate* effect on
that step's update; the carried part is in later steps' ``f(0)`` and is credited to nobody.
Weight decay does not depend on the data and is no example's contribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedOptimizerError

SUPPORTED = (
    "torch.optim.SGD (momentum, Nesterov, dampening, weight decay, maximize), "
    "torch.optim.Adam and AdamW (weight decay, amsgrad, maximize); any optimizer with proxy='sgd'"
)
ADAM_LINEARIZATIONS = ("secant", "fixed_state")


class UpdateRule:
    """Base class: how one optimizer's step is attributed."""

    name = "rule"
    elementwise = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UnsupportedOptimizerError` for settings this rule cannot attribute."""

    def _groups(self, params: Sequence[Tensor]) -> list[dict | None]:
        """The parameter group of each parameter (``None`` if not in the optimizer)."""
        group_of: dict[int, dict] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        return [group_of.get(id(p)) for p in params]

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        """``[n_params]`` float64 ``c_p`` with data part of the step ``−c_p · x`` (scalar rules)."""
        raise NotImplementedError

    def slopes(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Per-coordinate ``D_p`` (elementwise rules), from the optimizer state *before* the step."""
        coef = self.scalar_coefficients(params)
        return [None if g is None else torch.full_like(p, -float(c)) for p, g, c in zip(params, grads, coef)]

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """``f(0)`` per parameter, or ``None`` when the step without data is zero or negligible."""
        return None

    def nonlinear_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
        """Why no linearization follows this step's update (``None``: one does), from the state
        before the step."""
        return None

    def momentum(self, params: Sequence[Tensor]) -> tuple[list[float], list[float]] | None:
        """How this step's gradient ``x`` enters the momentum state ``m`` (for carry): per parameter
        its weight ``share`` in ``m`` after the step and ``m``'s decay per step (``None``: no momentum),
        from the state before the step."""
        return None

    def carried_direction(self, params: Sequence[Tensor], g_val: Sequence[Tensor]) -> list[Tensor | None]:
        """Per parameter ``u = −(∂f(0)/∂m) ⊙ g_val`` (``[K, *shape]``): the first-order loss decrease
        per unit of momentum content that this step's data-free move ``f(0)`` makes (for carry)."""
        return [None for _ in params]

    @staticmethod
    def _lr(group: dict) -> float:
        lr = group["lr"]
        return float(lr.item() if isinstance(lr, Tensor) else lr)


class SGDRule(UpdateRule):
    """``torch.optim.SGD``: the data part of the step is ``−c x`` with

    ``c = η`` (no momentum, or the first step without Nesterov), ``η (1 − dampening)`` (momentum),
    ``η (1 + μ (1 − dampening))`` (Nesterov; ``η (1 + μ)`` on the first step); ``−`` for ``maximize``.
    """

    name = "sgd"

    def validate(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group.get("nesterov") and (group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
                raise UnsupportedOptimizerError(f"SGD param group {i}: Nesterov needs momentum > 0 and dampening 0")

    def _first_step(self, p: Tensor) -> bool:
        return self.optimizer.state.get(p, {}).get("momentum_buffer") is None

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        out = []
        for p, group in zip(params, self._groups(params)):
            if group is None:
                out.append(0.0)
                continue
            mu, tau = group.get("momentum", 0.0), group.get("dampening", 0.0)
            if mu == 0:
                factor = 1.0
            elif group.get("nesterov"):
                factor = 1.0 + mu * (1.0 if self._first_step(p) else (1.0 - tau))
            else:
                factor = 1.0 if self._first_step(p) else (1.0 - tau)
            sign = -1.0 if group.get("maximize") else 1.0
            out.append(sign * self._lr(group) * factor)
        return torch.tensor(out, dtype=torch.float64)

    def momentum(self, params: Sequence[Tensor]) -> tuple[list[float], list[float]] | None:
        share, decay = [], []
        for p, group in zip(params, self._groups(params)):
            mu = 0.0 if group is None else group.get("momentum", 0.0)
            sign = -1.0 if group is not None and group.get("maximize") else 1.0
            share.append(0.0 if not mu else sign * (1.0 if self._first_step(p) else 1.0 - group.get("dampening", 0.0)))
            decay.append(float(mu))
        return (share, decay) if any(share) else None

    def carried_direction(self, params: Sequence[Tensor], g_val: Sequence[Tensor]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p, g, group in zip(params, g_val, self._groups(params)):
            mu = 0.0 if group is None else group.get("momentum", 0.0)
            if not mu or self._first_step(p):
                out.append(None)  # no momentum content moves this step
                continue
            # f(0) ∋ −η μ m (Nesterov: −η μ² m)
            out.append(g * (self._lr(group) * mu * (mu if group.get("nesterov") else 1.0)))
        return out

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        steps, any_shift = [], False
        for p, group in zip(params, self._groups(params)):
            mu = 0.0 if group is None else group.get("momentum", 0.0)
            wd = 0.0 if group is None else group.get("weight_decay", 0.0)
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer") if mu else None
            if group is None or (wd == 0 and buf is None):
                steps.append(torch.zeros_like(p))
                continue
            any_shift = True
            decay = wd * p.detach()  # torch adds it after maximize's sign flip: never flipped
            if mu == 0:
                d0 = decay
            elif buf is None:
                d0 = decay * (1 + mu) if group.get("nesterov") else decay
            else:
                buf0 = mu * buf + (1 - group.get("dampening", 0.0)) * decay
                d0 = decay + mu * buf0 if group.get("nesterov") else buf0
            steps.append(-self._lr(group) * d0)
        return steps if any_shift else None


class SGDProxyRule(UpdateRule):
    """The paper's proxy for any optimizer: value the step as if it were ``θ ← θ − η g``."""

    name = "sgd_proxy"

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        return torch.tensor(
            [0.0 if g is None else (-1.0 if g.get("maximize") else 1.0) * self._lr(g) for g in self._groups(params)],
            dtype=torch.float64,
        )


class AdamRule(UpdateRule):
    """``torch.optim.Adam`` / ``AdamW`` (coupled or decoupled weight decay, amsgrad, maximize)."""

    name = "adam"
    elementwise = True

    def __init__(self, optimizer: torch.optim.Optimizer, linearization: str = "secant") -> None:
        if linearization not in ADAM_LINEARIZATIONS:
            raise ValueError(f"adam={linearization!r} is not one of {ADAM_LINEARIZATIONS}")
        self.linearization = linearization
        super().__init__(optimizer)

    def validate(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group.get("differentiable"):
                raise UnsupportedOptimizerError(f"Adam param group {i}: differentiable=True is not supported")

    def _pieces(self, p: Tensor, group: dict, dtype: torch.dtype) -> dict[str, Any]:
        """Coordinate-wise ``f`` of parameter ``p`` at this step: ``f(x) = −s N(x) / den(x)`` with
        ``N(x) = a + b x`` and ``den(x) = sqrt(V0 + e (x² + 2 w x)) / sb + ε`` (``vmax``: amsgrad)."""
        state = self.optimizer.state.get(p, {})
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"]) + 1 if "step" in state else 1.0
        wd = float(group.get("weight_decay", 0.0))
        coupled_wd = wd if wd and not self._decoupled(group) else 0.0
        sigma = -1.0 if group.get("maximize") else 1.0
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        c = p.detach().to(dtype) * coupled_wd if coupled_wd else None  # data-free part of the gradient
        a = torch.zeros_like(p, dtype=dtype) if m is None else m.to(dtype) * beta1
        V0 = torch.zeros_like(p, dtype=dtype) if v is None else v.to(dtype) * beta2
        if c is not None:
            a.add_(c, alpha=1 - beta1)
            V0.addcmul_(c, c, value=1 - beta2)
        vmax = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        return {
            "s": self._lr(group) / (1 - beta1**t),
            "sb": (1 - beta2**t) ** 0.5,
            "eps": float(group["eps"]),
            "a": a,
            "b": (1 - beta1) * sigma,
            "V0": V0,
            "e": 1 - beta2,
            "w": None if c is None else c * sigma,
            "vmax": None if vmax is None else vmax.to(dtype),
        }

    def _decoupled(self, group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay", False)) or isinstance(self.optimizer, torch.optim.AdamW)

    @staticmethod
    def _den(q: dict, second_moment: Tensor) -> Tensor:
        if q["vmax"] is not None:
            second_moment = torch.maximum(q["vmax"], second_moment)
        return second_moment.sqrt().div_(q["sb"]).add_(q["eps"])

    def slopes(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is None or group is None:
                out.append(None)
                continue
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            q = self._pieces(p, group, dtype)
            x = g.detach().to(dtype)
            x_2w = x if q["w"] is None else x + 2 * q["w"]  # x + 2w
            v_x = torch.addcmul(q["V0"], x, x_2w, value=q["e"])  # V0 + e (x² + 2wx)
            if q["vmax"] is None:
                # (f(x) − f(0)) / x without cancellation: den0 − den(x) = −e x (x + 2w) / (sb (R0 + R)),
                # so the slope is −s (b den0 − a e (x + 2w) / (sb (R0 + R))) / (den(x) den0).
                R, R0 = v_x.sqrt_(), q["V0"].sqrt_()
                den_x = R.div(q["sb"]).add_(q["eps"])
                if self.linearization == "fixed_state":
                    out.append(den_x.reciprocal_().mul_(-q["s"] * q["b"]).to(p.dtype))
                    continue
                den0 = R0.div(q["sb"]).add_(q["eps"])
                r_sum = R0.add_(R).mul_(q["sb"]).clamp_min_(torch.finfo(dtype).tiny)
                cross = q["a"].mul_(x_2w).mul_(q["e"]).div_(r_sum)
                slope = den0.mul(q["b"]).sub_(cross).div_(den_x.mul_(den0)).mul_(-q["s"])
            else:
                den_x, den0 = self._den(q, v_x), self._den(q, q["V0"])
                if self.linearization == "fixed_state":
                    out.append(den_x.reciprocal_().mul_(-q["s"] * q["b"]).to(p.dtype))
                    continue
                f_x = -q["s"] * (q["a"] + q["b"] * x) / den_x
                f_0 = -q["s"] * q["a"] / den0
                nonzero = x != 0
                slope = torch.where(nonzero, (f_x - f_0) / torch.where(nonzero, x, torch.ones_like(x)), -q["s"] * q["b"] / den0)
            out.append(slope.to(p.dtype))
        return out

    def momentum(self, params: Sequence[Tensor]) -> tuple[list[float], list[float]] | None:
        groups = self._groups(params)
        share = [0.0 if g is None else (1 - float(g["betas"][0])) * (-1.0 if g.get("maximize") else 1.0) for g in groups]
        decay = [0.0 if g is None else float(g["betas"][0]) for g in groups]
        return share, decay

    def carried_direction(self, params: Sequence[Tensor], g_val: Sequence[Tensor]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p, g, group in zip(params, g_val, self._groups(params)):
            if group is None or "exp_avg" not in self.optimizer.state.get(p, {}):
                out.append(None)
                continue
            # f(0) = −s (β1 m + ...) / den(0): the first moment's content moves by −s β1 / den(0)
            q = self._pieces(p, group, g.dtype)
            out.append(g * (q["s"] * float(group["betas"][0]) / self._den(q, q["V0"])))
        return out

    def nonlinear_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is not None and group is not None and "exp_avg_sq" not in self.optimizer.state.get(p, {}):
                return ("Adam's first step: its second moment comes from this batch alone, so the update "
                        "is about -lr sign(gradient), which no linearization follows")
        return None

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        steps, any_shift = [], False
        for p, group in zip(params, self._groups(params)):
            if group is None or ("exp_avg" not in self.optimizer.state.get(p, {}) and not group.get("weight_decay")):
                steps.append(torch.zeros_like(p))
                continue
            any_shift = True
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            q = self._pieces(p, group, dtype)
            step = q["a"].div_(self._den(q, q["V0"])).mul_(-q["s"])
            wd = float(group.get("weight_decay", 0.0))
            if wd and self._decoupled(group):
                step.add_(p.detach().to(dtype), alpha=-self._lr(group) * wd)
            steps.append(step.to(p.dtype))
        return steps if any_shift else None


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` really runs, inside wrappers such as accelerate's
    ``AcceleratedOptimizer`` (itself a ``torch.optim.Optimizer`` subclass wrapping ``.optimizer``):
    the tracker's step hooks must sit on the inner one."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}. Supported: {SUPPORTED}."
        )
    return optimizer


def rule_for(optimizer: object, proxy: str | None = None, adam: str = "secant") -> UpdateRule:
    """The attribution rule for ``optimizer``, or a clear error naming what is supported.

    Args:
        proxy: ``"sgd"`` values every step with the SGD formula ``η g_val·g_z`` whatever the
            optimizer (the paper's proxy for AdamW runs), for comparison.
        adam: ``"secant"`` or ``"fixed_state"`` linearization of Adam's step.
    """
    opt = unwrap_optimizer(optimizer)
    if proxy is not None:
        if proxy != "sgd":
            raise ValueError(f"proxy={proxy!r}: the only proxy is 'sgd'")
        return SGDProxyRule(opt)
    if type(opt) is torch.optim.SGD:
        return SGDRule(opt)
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        return AdamRule(opt, adam)
    raise UnsupportedOptimizerError(
        f"{type(opt).__name__} is not supported: its update is not attributed yet. Supported: {SUPPORTED}."
    )
