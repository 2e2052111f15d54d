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

*Map* rules (Muon, Adafactor: a step that is a function of the whole gradient of a matrix) give
a pull-back ``v -> Jᵀ v`` instead of ``D`` (see the section on them below).

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

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import UnsupportedOptimizerError

SUPPORTED = (
    "torch.optim.SGD (momentum, Nesterov, dampening, weight decay, maximize), "
    "torch.optim.Adam and AdamW (weight decay, amsgrad, maximize), torch.optim.Muon, "
    "torch.optim.Adafactor; any optimizer with proxy='sgd'"
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

    def pullbacks(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Any]:
        """Per parameter, what a value's validation vector goes through (elementwise rules): a
        per-coordinate slope ``D`` (``v -> D ⊙ v``), or a function ``v -> Jᵀ v`` for a step that
        is a map of the whole gradient (Muon, Adafactor: below); ``v`` is ``[K, *shape]``."""
        return self.slopes(params, grads)

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """``f(0)`` per parameter, or ``None`` when the step without data is zero or negligible."""
        return None

    carry_refusal: str | None = None
    """Why ``carry='momentum'`` is refused for this rule (``None``: :meth:`momentum` answers it)."""

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


# ----------------------------------------------------------------------------- steps that are maps
# Optimizers whose step is a map of the whole gradient, not one scalar function per coordinate.
#
# ``torch.optim.Muon`` orthogonalizes the momentum of each matrix (Newton–Schulz), and
# ``torch.optim.Adafactor`` divides by a second moment factored into row and column means: each
# coordinate of the update depends on the whole matrix of the batch gradient ``x``. The step is
# still a map ``Δθ = f(x)``, so the first-order value of ``z`` is ``φ_z = −<g_val, J r g_z>`` with
# ``J`` a derivative of the map: the tracker contracts each example's gradient with ``Jᵀ g_val``
# (one vector per parameter, the vector route), where Adam's per-coordinate slope gives
# ``D ⊙ g_val``. These rules return that pull-back as a function of ``g_val``
# (:meth:`UpdateRule.pullbacks`).
#
# Which ``J``: the Shapley value of a game ``v(S) = h(Σ_{z∈S} y_z)`` with many small players is the
# Aumann–Shapley value, ``∫_0^1 ∇h(t·x_B) dt`` dotted with ``y_z``: the map's derivative averaged
# along the segment from no data to the batch's gradient. For a per-coordinate map that integral is
# Adam's secant; here it is computed by Gauss–Legendre quadrature (:data:`PATH_NODES`: 3
# vector-Jacobian products of the map per matrix and step, more where the path bends): nodes are
# added until the efficiency error (``Σ_z φ_z`` against the data part ``f(x_B) − f(0)``) is within
# :data:`EFFICIENCY_RTOL`. Measured against exact enumeration of the real step's game:
# docs/optimizers.md.
#
# What is attributed, as for Adam: the data part of this step, ``f(x_B) − f(0)``; ``f(0)`` (the
# momentum's carry, weight decay) is no example's and the validation gradient is taken at
# ``θ + f(0)``; the momentum that carries ``g_z`` into later steps is credited to nobody.

Pullback = Callable[[Tensor], Tensor]
"""``[K, *shape] -> [K, *shape]``: validation vectors to ``Jᵀ v`` for one parameter."""

PATH_NODES = (3, 6, 12)
"""Gauss–Legendre node counts tried in turn for the path integral (VJPs of the map per matrix and
step): the first whose efficiency error is within :data:`EFFICIENCY_RTOL` is kept."""

EFFICIENCY_RTOL = 1e-3
"""Accepted ``|<∫Jᵀ v, x> − <v, f(x) − f(0)>|`` relative to ``|<v, f(x) − f(0)>|``: how far the
integrated derivative may miss the step's data part along the batch's own gradient."""


def path_pullback(f: Callable[[Tensor], Tensor], x: Tensor, nodes: Sequence[int]) -> Pullback:
    """``v -> ∫_0^1 J(t x)ᵀ v dt`` by Gauss–Legendre quadrature, with the first node count of
    ``nodes`` whose integral gives the data part along ``x`` (efficiency) to
    :data:`EFFICIENCY_RTOL` on the first ``v`` it is called with, kept for later calls
    (``nodes = (0,)``: the tangent at the step, ``J(x)ᵀ v``)."""
    chosen: list[int] = []

    def integral(v: Tensor, n: int) -> Tensor:
        if n == 0:
            points, weights = [1.0], [1.0]
        else:
            t, w = np.polynomial.legendre.leggauss(n)
            points, weights = list((t + 1) / 2), list(w / 2)
        out = torch.zeros_like(v)
        with torch.enable_grad():
            for t, w in zip(points, weights):
                xt = (x * t).detach().requires_grad_(True)
                y = f(xt)
                for k in range(v.shape[0]):
                    (g,) = torch.autograd.grad(y, xt, v[k].to(y.dtype), retain_graph=k + 1 < v.shape[0])
                    out[k] += w * g.to(out.dtype)
        return out

    def pull(v: Tensor) -> Tensor:
        if chosen:
            return integral(v, chosen[0])
        with torch.no_grad():
            total = v.sum(dim=0).to(x.dtype)
            target = float((total * (f(x) - f(torch.zeros_like(x)))).sum())
        for n in nodes:
            out = integral(v, n)
            got = float((out.sum(dim=0).to(x.dtype) * x).sum())
            if abs(got - target) <= EFFICIENCY_RTOL * abs(target):
                break
        chosen.append(n)
        return out

    return pull


def newton_schulz(G: Tensor, coefficients: Sequence[float], steps: int, eps: float) -> Tensor:
    """torch's Muon orthogonalization (``_zeropower_via_newtonschulz``), differentiable and in
    ``G``'s dtype (torch runs it in bfloat16)."""
    a, b, c = coefficients
    tall = G.size(0) > G.size(1)
    X = G.T if tall else G
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon learning rate per matrix shape (``_adjust_lr``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MapRule(UpdateRule):
    """A rule whose step maps the whole gradient of a parameter (a matrix function, a factored second
    moment): each parameter's data part is valued through :func:`path_pullback` of its step map."""

    elementwise = True
    nodes = PATH_NODES

    def _step_map(self, p: Tensor, group: dict, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """``x -> `` the part of ``p``'s step its gradient ``x`` makes (up to a constant)."""
        raise NotImplementedError

    def pullbacks(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | Pullback | None]:
        out: list[Tensor | Pullback | None] = []
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is None or group is None:
                out.append(None)
                continue
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            out.append(path_pullback(self._step_map(p, group, dtype), g.detach().to(dtype), self.nodes))
        return out


class MuonRule(MapRule):
    """``torch.optim.Muon``: ``Δθ = −η' NS(a + c x) − η λ θ`` with ``a`` the momentum's part (``μ² b``
    with Nesterov, ``μ b`` without; ``b`` the buffer before the step), ``c = 1 − μ²`` (Nesterov)
    or ``1 − μ``, ``η'`` the shape-adjusted learning rate; NS is scale-invariant, so with no
    momentum yet (the first step) the step does not depend on the gradient's size."""

    name = "muon"
    carry_refusal = ("carry='momentum' credits momentum per coordinate, and Muon's step is a matrix function "
                     "of its momentum (Newton-Schulz): its carry is not valued. Use carry='off' with Muon")

    def nonlinear_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is not None and group is not None and self.optimizer.state.get(p, {}).get("momentum_buffer") is None:
                return ("Muon's first step: with no momentum yet the step is -lr NS(gradient), which does not "
                        "depend on the gradient's size, so no linearization follows it")
        return None

    def _map(self, p: Tensor, group: dict, dtype: torch.dtype) -> tuple[Tensor, float, Callable[[Tensor], Tensor]]:
        """``(a, c, NS)`` of parameter ``p``'s step: the data part is ``−η' (NS(a + c x) − NS(a))``."""
        mu = float(group["momentum"])
        buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
        base = torch.zeros_like(p, dtype=dtype) if buf is None else buf.detach().to(dtype)
        nesterov = bool(group.get("nesterov"))
        a = base * (mu * mu if nesterov else mu)
        c = (1 - mu * mu) if nesterov else (1 - mu)
        coefficients, steps, eps = group["ns_coefficients"], int(group["ns_steps"]), float(group["eps"])
        return a, c, lambda m: newton_schulz(m, coefficients, steps, eps)

    def _step_map(self, p: Tensor, group: dict, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        a, c, ns = self._map(p, group, dtype)
        scale = -muon_lr(self._lr(group), group.get("adjust_lr_fn"), p.shape)
        return lambda x: scale * ns(a + c * x)

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        steps, any_shift = [], False
        for p, group in zip(params, self._groups(params)):
            if group is None:
                steps.append(torch.zeros_like(p))
                continue
            any_shift = True
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            a, _, ns = self._map(p, group, dtype)
            with torch.no_grad():
                step = ns(a) * -muon_lr(self._lr(group), group.get("adjust_lr_fn"), p.shape)
                step -= self._lr(group) * float(group["weight_decay"]) * p.detach().to(dtype)
            steps.append(step.to(p.dtype))
        return steps if any_shift else None


class AdafactorRule(MapRule):
    """``torch.optim.Adafactor``: ``Δθ = −α/max(1, RMS(u)/d) · u − η λ θ`` with ``u = x ⊙ V̂(x)^{−1/2}``,
    ``V̂`` the second moment (row and column means of ``x²`` mixed into the state, their outer
    product over the mean row; per coordinate for vectors), ``α = max(ε₂, RMS(θ)) min(η, t^{−1/2})``.
    No momentum: ``f(0)`` is the weight decay. On the first step ``V̂`` comes from this batch alone
    (as Adam's first step: the step's size barely depends on the gradient's)."""

    name = "adafactor"

    def nonlinear_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is not None and group is not None and "step" not in self.optimizer.state.get(p, {}):
                return ("Adafactor's first step: its second moment comes from this batch alone, so the update "
                        "does not depend on the gradient's size, and no linearization follows it")
        return None

    def validate(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group.get("differentiable"):
                raise UnsupportedOptimizerError(f"Adafactor param group {i}: differentiable=True is not supported")

    def _map(self, p: Tensor, group: dict, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """The data part of ``p``'s step as a function of its gradient (``f(0) = 0`` for it)."""
        state = self.optimizer.state.get(p, {})
        t = float(state["step"]) + 1 if "step" in state else 1.0
        mix = t ** float(group["beta2_decay"])  # the weight of this step's moments (1 on the first)
        lr, d = self._lr(group), float(group["d"])
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else float(eps1)
        alpha = max(float(eps2), float(p.detach().norm()) / p.numel() ** 0.5) * min(lr, t ** -0.5)
        sign = -1.0 if group.get("maximize") else 1.0

        def zeros(shape: tuple[int, ...]) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=p.device)

        if p.dim() > 1:
            row = state.get("row_var")
            col = state.get("col_var")
            row = zeros((*p.shape[:-1], 1)) if row is None else row.detach().to(dtype)
            col = zeros((*p.shape[:-2], 1, p.shape[-1])) if col is None else col.detach().to(dtype)

            def second_moment(x: Tensor) -> Tensor:
                r = torch.lerp(row, (x * x).mean(dim=-1, keepdim=True), mix)
                c = torch.lerp(col, (x * x).mean(dim=-2, keepdim=True), mix)
                return (r @ c) / r.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            var = state.get("variance")
            var = zeros(tuple(p.shape)) if var is None else var.detach().to(dtype)

            def second_moment(x: Tensor) -> Tensor:
                return torch.lerp(var, x * x, mix)

        def step(x: Tensor) -> Tensor:
            x = sign * x
            u = second_moment(x).clamp(min=eps1 * eps1).rsqrt() * x
            denom = torch.clamp(u.norm() / (u.numel() ** 0.5 * d), min=1.0)
            return -alpha * u / denom

        return step

    def _step_map(self, p: Tensor, group: dict, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        return self._map(p, group, dtype)

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        steps, any_shift = [], False
        for p, group in zip(params, self._groups(params)):
            wd = 0.0 if group is None else float(group.get("weight_decay", 0.0))
            any_shift = any_shift or wd != 0
            steps.append(-self._lr(group) * wd * p.detach() if wd else torch.zeros_like(p))
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
    if type(opt) is getattr(torch.optim, "Muon", None):
        return MuonRule(opt)
    if type(opt) is getattr(torch.optim, "Adafactor", None):
        return AdafactorRule(opt)
    raise UnsupportedOptimizerError(
        f"{type(opt).__name__} is not supported: its update is not attributed yet. Supported: {SUPPORTED}."
    )
