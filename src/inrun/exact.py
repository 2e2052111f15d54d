"""Ground truth for one training step, independent of the tracker's ghost routes.

* :func:`per_example_gradients`: true per-example gradients of the whole model by
  ``torch.func`` (``vmap`` over ``grad`` of a functional call), for auditing and tests;
* :func:`validation_gradient`: the gradient of the validation loss at the current parameters;
* :func:`first_order_values`: ``η · g_val · g_z`` from those two, the quantity the tracker's
  order-1 values must equal.

Use float64 models for audits: the comparisons are then exact to ~1e-12.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

ExampleLoss = Callable[..., Tensor]
"""``example_loss(model_fn, *rows) -> scalar``: one example's share of the training loss.

``model_fn`` behaves like the model (call it as you call the model); ``rows`` are that example's
slices of the batch tensors, each with a leading dimension of 1. With a batch-mean loss over
``B`` examples, return the example's loss divided by ``B``.
"""


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Name -> detached tensor of every parameter with ``requires_grad`` (tied ones once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module,
    example_loss: ExampleLoss,
    batch: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-example gradients ``[B, *param.shape]`` of every trainable parameter.

    Args:
        model: the model at the parameters of the step (its mode is used as is).
        example_loss: see :data:`ExampleLoss`.
        batch: tensors with the examples along dim 0.
        chunk_size: examples per ``vmap`` chunk (bounds memory).
    """
    params = trainable_parameters(model)

    def loss_of_one(p: Mapping[str, Tensor], *row: Tensor) -> Tensor:
        def model_fn(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, dict(p), args, kwargs)

        return example_loss(model_fn, *(r.unsqueeze(0) for r in row))

    in_dims = (None, *([0] * len(batch)))
    return vmap(grad(loss_of_one), in_dims=in_dims, chunk_size=chunk_size)(params, *batch)


def validation_gradient(
    model: nn.Module, val_loss: Callable[[nn.Module], Tensor], *, eval_mode: bool = True
) -> dict[str, Tensor]:
    """Gradient of ``val_loss(model).sum()`` for every trainable parameter (eval mode by default)."""
    params = trainable_parameters(model)
    flags = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        loss = val_loss(model).sum()
        names = list(params)
        live = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [live[n] for n in names], allow_unused=True)
    finally:
        for m, flag in flags:
            m.training = flag
    return {
        n: (g if g is not None else torch.zeros_like(params[n])).detach()
        for n, g in zip(names, grads)
    }


def first_order_values(
    per_example: Mapping[str, Tensor],
    val_grad: Mapping[str, Tensor],
    lr: float | Mapping[str, float],
) -> Tensor:
    """``[B]`` values ``Σ_p η_p <g_z,p, g_val,p>`` in float64.

    ``lr`` is one learning rate, or one per parameter name (per-group learning rates).
    """
    total: Tensor | None = None
    for name, g in per_example.items():
        eta = lr[name] if isinstance(lr, Mapping) else lr
        term = eta * (g.flatten(1).double() @ val_grad[name].flatten().double())
        total = term if total is None else total + term
    assert total is not None, "no parameters"
    return total


def dot_scale(per_example: Mapping[str, Tensor], val_grad: Mapping[str, Tensor]) -> Tensor:
    """``[B]`` ``‖g_z‖·‖g_val‖``: the natural scale of a per-example dot product's error."""
    gz = torch.sqrt(sum((g.flatten(1).double() ** 2).sum(1) for g in per_example.values()))
    gv = torch.sqrt(sum((v.double() ** 2).sum() for v in val_grad.values()))
    return gz * gv
