"""Exact Shapley values of one *real* optimizer step, for the optimizer tests.

U(S) = L_val(θ) − L_val(θ after the optimizer's own ``step()`` with gradient ``r · Σ_{z∈S} g_z``),
with parameters and optimizer state restored before every subset. Per-example gradients come
from torch.func.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from inrun import exact


def optimizer_step_utility(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    per_example: dict[str, torch.Tensor],
    val_loss: Callable[[nn.Module], torch.Tensor],
    grad_factor: float = 1.0,
) -> Callable[[int], float]:
    """``U(mask)`` (bit ``i`` = example ``i``) through scratch copies of ``model`` and ``optimizer``."""
    scratch = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    live = list(scratch.parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [live[index[id(p)]] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    opt = type(optimizer)(groups)
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    snapshot = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in live}
    theta = [p.detach().clone() for p in live]
    names = [n for n, _ in scratch.named_parameters()]
    grads = [per_example[n] * grad_factor for n in names]
    scratch.eval()

    def val() -> float:
        with torch.no_grad():
            return float(val_loss(scratch).sum())

    base = val()

    def utility(mask: int) -> float:
        members = [i for i in range(grads[0].shape[0]) if mask >> i & 1]
        with torch.no_grad():
            for p, t, g in zip(live, theta, grads):
                p.copy_(t)
                p.grad = g[members].sum(0) if members else torch.zeros_like(p)
            for p in live:
                state = opt.state[p]
                state.clear()
                state.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in snapshot[p].items()})
        opt.step()
        return base - val()

    return utility


def exact_shapley(utility: Callable[[int], float], n: int) -> np.ndarray:
    """Shapley values by evaluating each of the 2^n subsets once."""
    values = np.array([utility(mask) for mask in range(1 << n)])
    sizes = np.array([bin(mask).count("1") for mask in range(1 << n)])
    weight = np.array([math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)])
    phi = np.zeros(n)
    masks = np.arange(1 << n)
    for i in range(n):
        without = masks[(masks >> i & 1) == 0]
        phi[i] = np.sum(weight[sizes[without]] * (values[without | (1 << i)] - values[without]))
    return phi


def per_example(model: nn.Module, example_loss: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    B = batch[0].shape[0]
    return exact.per_example_gradients(model, lambda f, *rows: example_loss(f, *rows, batch_size=B), batch)
