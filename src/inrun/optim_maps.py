"""Optimizers whose step is a map of the whole gradient, not one scalar function per coordinate.

``torch.optim.Muon`` orthogonalizes the momentum of each matrix (Newton–Schulz), and
``torch.optim.Adafactor`` divides by a second moment factored into row and column means: each
coordinate of the update depends on the whole matrix of the batch gradient ``x``. The step is
still a map ``Δθ = f(x)``, so the first-order value of ``z`` is ``φ_z = −<g_val, J r g_z>`` with
``J`` a derivative of the map: the tracker contracts each example's gradient with ``Jᵀ g_val``
(one vector per parameter, the vector route), where Adam's per-coordinate slope gives
``D ⊙ g_val``. These rules return that pull-back as a function of ``g_val``
(:meth:`UpdateRule.pullbacks`).

Which ``J``: the Shapley value of a game ``v(S) = h(Σ_{z∈S} y_z)`` with many small players is the
Aumann–Shapley value, ``∫_0^1 ∇h(t·x_B) dt`` dotted with ``y_z``: the map's derivative averaged
along the segment from no data to the batch's gradient. For a per-coordinate map that integral is
Adam's secant; here it is computed by Gauss–Legendre quadrature (:data:`PATH_NODES`: 3
vector-Jacobian products of the map per matrix and step, more where the path bends): nodes are
added until the efficiency error (``Σ_z φ_z`` against the data part ``f(x_B) − f(0)``) is within
:data:`EFFICIENCY_RTOL`. Measured against exact enumeration of the real step's game:
docs/optimizers.md.

What is attributed, as for Adam: the data part of this step, ``f(x_B) − f(0)``; ``f(0)`` (the
momentum's carry, weight decay) is no example's and the validation gradient is taken at
``θ + f(0)``; the momentum that carries ``g_z`` into later steps is credited to nobody.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UnsupportedOptimizerError
from .optim import UpdateRule

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


class MuonRule(UpdateRule):
    """``torch.optim.Muon``: ``Δθ = −η' NS(a + c x) − η λ θ`` with ``a`` the momentum's part (``μ² b``
    with Nesterov, ``μ b`` without; ``b`` the buffer before the step), ``c = 1 − μ²`` (Nesterov)
    or ``1 − μ``, ``η'`` the shape-adjusted learning rate; NS is scale-invariant, so with no
    momentum yet (the first step) the step does not depend on the gradient's size."""

    name = "muon"
    elementwise = True
    nodes = PATH_NODES

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

    def pullbacks(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | Pullback | None]:
        out: list[Tensor | Pullback | None] = []
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is None or group is None:
                out.append(None)
                continue
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            a, c, ns = self._map(p, group, dtype)
            scale = -muon_lr(self._lr(group), group.get("adjust_lr_fn"), p.shape)
            out.append(path_pullback(lambda x, a=a, c=c, ns=ns, s=scale: s * ns(a + c * x), g.detach().to(dtype), self.nodes))
        return out

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


class AdafactorRule(UpdateRule):
    """``torch.optim.Adafactor``: ``Δθ = −α/max(1, RMS(u)/d) · u − η λ θ`` with ``u = x ⊙ V̂(x)^{−1/2}``,
    ``V̂`` the second moment (row and column means of ``x²`` mixed into the state, their outer
    product over the mean row; per coordinate for vectors), ``α = max(ε₂, RMS(θ)) min(η, t^{−1/2})``.
    No momentum: ``f(0)`` is the weight decay. On the first step ``V̂`` comes from this batch alone
    (as Adam's first step: the step's size barely depends on the gradient's)."""

    name = "adafactor"
    elementwise = True
    nodes = PATH_NODES

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

    def pullbacks(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | Pullback | None]:
        out: list[Tensor | Pullback | None] = []
        for p, g, group in zip(params, grads, self._groups(params)):
            if g is None or group is None:
                out.append(None)
                continue
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            out.append(path_pullback(self._map(p, group, dtype), g.detach().to(dtype), self.nodes))
        return out

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        steps, any_shift = [], False
        for p, group in zip(params, self._groups(params)):
            wd = 0.0 if group is None else float(group.get("weight_decay", 0.0))
            any_shift = any_shift or wd != 0
            steps.append(-self._lr(group) * wd * p.detach() if wd else torch.zeros_like(p))
        return steps if any_shift else None
