"""The value formulas of one iteration as small pure functions (helpful = positive).

Notation: ``dots[p, z, k] = <g_z,p, u_k,p>`` per parameter ``p``, example ``z`` and contraction
vector ``k``. The data part of the step is ``Δθ_p = −c_p · g_B,p`` for scalar rules (``c_p = η``
for SGD; clipping multiplies it by the clip factor) and ``Δθ_p ≈ D_p ⊙ x_B,p`` for elementwise
rules (Adam: a per-coordinate slope, see :mod:`inrun.optim`), so a value is a dot product of
``g_z`` with the validation gradient weighted by ``w_p = c_p`` or ``w_p = −ratio_p · D_p``.

* first order, scalar:       ``φ_z = Σ_p c_p <g_val,p, g_z,p>``
* first order, elementwise:  ``φ_z = Σ_p <w_p ⊙ g_val,p, g_z,p>`` (dots already weighted)
* Hessian order 2:           ``φ_z = first order − ½ Σ_p <g_z,p, c_p (H (c ⊙ g_B))_p>``
* trapezoid:                 ``φ_z = ½ (φ_z at the start + φ_z with g_val(θ_t+1))``

The second-order term gives the diagonal ``g_zᵀHg_z`` to ``z`` and splits each cross term
``g_zᵀHg_z'`` evenly: the Shapley value of the quadratic game ``½ (Σ_S g)ᵀ H (Σ_S g)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def first_order(coef: Tensor, dots: Tensor) -> Tensor:
    """``[P]`` coefficients and ``[P, B, K]`` dots with ``g_val`` -> ``[B, K]`` values."""
    return torch.einsum("p,pbk->bk", coef.to(dots.dtype), dots)


def first_order_weighted(dots: Tensor) -> Tensor:
    """``[P, B, K]`` dots with the weighted ``w ⊙ g_val`` -> ``[B, K]`` values."""
    return dots.sum(dim=0)


def hessian_correction(dots_hvp: Tensor) -> Tensor:
    """``[P, B, K]`` dots with ``c ⊙ H (c ⊙ g_B)`` -> ``[B, K]`` second-order correction."""
    return -0.5 * dots_hvp.sum(dim=0)


def trapezoid(start: Tensor, end: Tensor) -> Tensor:
    """``[B, K]`` trapezoid values from the values with ``g_val`` at the step's start and end."""
    return (start + end) / 2


def weighted(weights: Sequence[Tensor | Callable[[Tensor], Tensor] | None], vectors: Sequence[Tensor]) -> list[Tensor]:
    """Per parameter ``w ⊙ vector``, ``[K, *shape]``: ``w`` is a 0-dim tensor (a scalar rule's
    coefficient), a per-coordinate tensor (an elementwise rule's slope) or ``None`` (the
    parameter does not move). Stays on the device: no host sync."""
    return [weigh(w, v) for w, v in zip(weights, vectors)]


def weigh(w: Tensor | Callable[[Tensor], Tensor] | None, v: Tensor) -> Tensor:
    """One parameter's ``[K, *shape]`` vectors through its weight: a scalar, a per-coordinate
    slope, a function (``v -> Jᵀ v``, a step that is a map of the whole gradient) or ``None``."""
    if w is None:
        return torch.zeros_like(v)
    if callable(w):
        return w(v).to(v.dtype)
    w = w.to(device=v.device, dtype=v.dtype)
    return (w.unsqueeze(0) if w.dim() > 0 else w) * v


def scaled(weight: Tensor | Callable[[Tensor], Tensor] | None, factor: Tensor) -> Tensor | Callable[[Tensor], Tensor] | None:
    """A rule's slope or pull-back (``v -> Jᵀ v``) times a scalar factor (``−`` the clip ratio)."""
    if weight is None:
        return None
    if callable(weight):
        return lambda v: weight(v) * factor.to(device=v.device, dtype=v.dtype)
    return weight * factor.to(weight.dtype)
