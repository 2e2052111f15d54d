"""The value formulas of one iteration as small pure functions (helpful = positive).

Notation: ``dots[p, z, k] = <g_z,p, u_k,p>`` per parameter ``p``, example ``z`` and contraction
vector ``k``; ``coef[p] = c_p`` with data part of the step ``Δθ_p = −c_p · g_B,p`` (``c_p = η``
for SGD; clipping multiplies it by the clip factor).

* first order:      ``φ_z = Σ_p c_p <g_val,p, g_z,p>``
* Hessian order 2:  ``φ_z = Σ_p c_p <g_val,p, g_z,p> − ½ Σ_p <g_z,p, c_p (H (c ⊙ g_B))_p>``
* trapezoid:        ``φ_z = Σ_p c_p <(g_val(θ_t) + g_val(θ_t+1))_p / 2, g_z,p>``

The second-order term gives the diagonal ``g_zᵀHg_z`` to ``z`` and splits each cross term
``g_zᵀHg_z'`` evenly: the Shapley value of the quadratic game ``½ (Σ_S g)ᵀ H (Σ_S g)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_order(coef: Tensor, dots: Tensor) -> Tensor:
    """``[P]`` coefficients and ``[P, B, K]`` dots with ``g_val`` -> ``[B, K]`` values."""
    return torch.einsum("p,pbk->bk", coef.to(dots.dtype), dots)


def hessian_correction(dots_hvp: Tensor) -> Tensor:
    """``[P, B, K]`` dots with ``c ⊙ H (c ⊙ g_B)`` -> ``[B, K]`` second-order correction."""
    return -0.5 * dots_hvp.sum(dim=0)


def trapezoid_correction(coef: Tensor, dots_now: Tensor, dots_next: Tensor) -> Tensor:
    """Correction that turns the first-order value into the trapezoid value.

    ``dots_now`` are dots with ``g_val(θ_t)``, ``dots_next`` with ``g_val(θ_t+1)``;
    the trapezoid value is ``first_order(coef, (dots_now + dots_next) / 2)``.
    """
    return torch.einsum("p,pbk->bk", coef.to(dots_now.dtype), (dots_next - dots_now) / 2)
