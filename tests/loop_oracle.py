"""The float64 oracle of the training-loop table (tests/test_loop_table.py), written with plain
autograd and the real optimizers, independent of the tracker's routes, rules and gradient map.

For one step of a loop, before the loop runs it:

* ``g_z``: each example's gradient, by back-propagating its share of the loss *alone* (a copy of
  the model, the example's rows only) with plain autograd;
* ``E``: the gradient no example caused (what the loop does inside ``tracker.unattributed()``);
* the gradient the optimizer reads, from the loop's own transformation of ``g_B + E`` as the row
  writes it with torch ops (norm clipping, value clipping, scaling), split into its data part
  ``R ⊙ g_B`` and its nobody's part ``E'`` by the row's map taken at the real step;
* the real optimizers' update, from copies of them: ``upd(x)``, ``upd(E')`` and ``upd(0)``
  (the data-free step), and the secant ``D = (upd(x) − upd(E')) / g_B`` per coordinate;
* ``g_val`` at ``θ + upd(0)`` (eval mode), and ``φ_z = −<g_val, D ⊙ g_z>``.

A coupled loss (declared with ``tracker.step(ids, coupled_loss=fn)``) is valued by the Shapley
value of its first-order game, enumerated over every subset ``S`` of the batch: ``∇_θ fn(rows S)``
by plain autograd on the rows of ``S`` alone, ``u(S) = −<g_val, D ⊙ ∇_θ fn(S)>``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Grads = dict[str, Tensor]


def named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gradient(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Grads:
    """``∇_θ loss(model)`` by plain autograd on a copy (zeros where unused)."""
    twin = copy.deepcopy(model)
    params = named(twin)
    grads = torch.autograd.grad(loss(twin), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(params.items(), grads)}


def real_update(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], x: Grads | None) -> Grads:
    """What copies of the real optimizers do to the parameters with gradient ``x`` (``None``:
    gradient zero on every parameter)."""
    twin, opts = copy.deepcopy((model, list(optimizers)))
    params = named(twin)
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = torch.zeros_like(p) if x is None else x[n].clone()
    for o in opts:
        o.step()
    return {n: params[n].detach() - before[n] for n in params}


def validation_gradient(model: nn.Module, val_loss: Callable[[nn.Module], Tensor], shift: Grads) -> Grads:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in named(twin).items():
            p.add_(shift[n])
    twin.eval()
    return gradient(twin, val_loss)


def secant(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], g_b: Grads,
           step_map: Callable[[Grads, Grads], tuple[Grads, Grads]], extra: Grads) -> tuple[Grads, Grads]:
    """``D`` (the real step's data part per unit of ``g_B``) and ``upd(0)``."""
    data, nobody = step_map(g_b, extra)
    x = {n: data[n] + nobody[n] for n in g_b}
    moved, free, still = real_update(model, optimizers, x), real_update(model, optimizers, nobody), \
        real_update(model, optimizers, None)
    D = {n: torch.where(g_b[n] != 0, (moved[n] - free[n]) / torch.where(g_b[n] != 0, g_b[n], 1), 0) for n in g_b}
    return D, still


def first_order_values(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], shares: Sequence[Callable[[nn.Module], Tensor]],
    val_loss: Callable[[nn.Module], Tensor], step_map: Callable[[Grads, Grads], tuple[Grads, Grads]],
    extra: Grads | None = None,
) -> list[float]:
    """``φ_z`` of each example (its share of the loss alone) for one step of the loop."""
    per_example = [gradient(model, share) for share in shares]
    g_b = {n: sum(g[n] for g in per_example) for n in per_example[0]}
    extra = extra if extra is not None else {n: torch.zeros_like(g) for n, g in g_b.items()}
    D, still = secant(model, optimizers, g_b, step_map, extra)
    g_val = validation_gradient(model, val_loss, still)
    return [-sum(float((g_val[n] * D[n] * g[n]).sum()) for n in g) for g in per_example]


def coupled_values(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], batch_loss: Callable[[nn.Module, list[int]], Tensor],
    size: int, val_loss: Callable[[nn.Module], Tensor],
    step_map: Callable[[Grads, Grads], tuple[Grads, Grads]] | None = None,
) -> list[float]:
    """Exact Shapley values of the first-order game of a coupled loss: ``batch_loss(model, rows)``
    is the loss of the rows ``S`` alone; every subset enumerated. The real step's secant ``D``
    (and clip factor) is the linear map of every subset's gradient."""
    g_b = gradient(model, lambda m: batch_loss(m, list(range(size))))
    D, still = secant(model, optimizers, g_b, step_map or identity, {n: torch.zeros_like(g) for n, g in g_b.items()})
    g_val = validation_gradient(model, val_loss, still)
    weight = {n: -g_val[n] * D[n] for n in g_val}
    utility: dict[tuple[int, ...], float] = {(): 0.0}
    for k in range(1, size + 1):
        for rows in itertools.combinations(range(size), k):
            g = gradient(model, lambda m, rows=rows: batch_loss(m, list(rows)))
            utility[rows] = sum(float((weight[n] * g[n]).sum()) for n in g)
    values = [0.0] * size
    for rows, u in utility.items():
        for z in range(size):
            if z in rows:
                continue
            w = math.factorial(len(rows)) * math.factorial(size - len(rows) - 1) / math.factorial(size)
            values[z] += w * (utility[tuple(sorted((*rows, z)))] - u)
    return values


# ---------------------------------------------------------------- the loops' maps, written apart
def identity(g_b: Grads, extra: Grads) -> tuple[Grads, Grads]:
    return g_b, extra


def scaled(s: float) -> Callable[[Grads, Grads], tuple[Grads, Grads]]:
    return lambda g_b, extra: ({n: s * g for n, g in g_b.items()}, {n: s * e for n, e in extra.items()})


def norm_clipped(max_norm: float, names: Sequence[str] | None = None) -> Callable[[Grads, Grads], tuple[Grads, Grads]]:
    """``clip_grad_norm_`` over ``names`` (default all): one factor on ``g_B + E``, the real step's."""

    def apply(g_b: Grads, extra: Grads) -> tuple[Grads, Grads]:
        group = list(g_b) if names is None else list(names)
        total = math.sqrt(sum(float(((g_b[n] + extra[n]) ** 2).sum()) for n in group))
        r = min(1.0, max_norm / (total + 1e-6))
        return ({n: (r if n in group else 1.0) * g for n, g in g_b.items()},
                {n: (r if n in group else 1.0) * e for n, e in extra.items()})

    return apply


def value_clipped(c: float) -> Callable[[Grads, Grads], tuple[Grads, Grads]]:
    """``clip_grad_value_``: ``clamp(g_B + E) − clamp(E)`` is the examples' part."""

    def apply(g_b: Grads, extra: Grads) -> tuple[Grads, Grads]:
        nobody = {n: e.clamp(-c, c) for n, e in extra.items()}
        return {n: (g + extra[n]).clamp(-c, c) - nobody[n] for n, g in g_b.items()}, nobody

    return apply


def assert_close(got: Sequence[float], expected: Sequence[float], what: str, rtol: float = 1e-9) -> None:
    scale = max(abs(e) for e in expected) + 1e-300
    worst = max(abs(g - e) for g, e in zip(got, expected))
    assert worst <= rtol * scale, f"{what}: tracker {list(got)} vs oracle {list(expected)} (error {worst / scale:.2e})"


def ids_of(step: int, size: int, offset: int = 0) -> list[Any]:
    return [f"s{step}-{offset + k}" for k in range(size)]
