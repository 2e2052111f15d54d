"""Fallback for modules no handler knows: per-example gradients of that module alone.

The module is re-run functionally on each example's captured inputs (``torch.func.vmap`` over
``torch.func.vjp``), pulling back the example's output gradient to the module's *own*
parameters. It is exact for any module whose examples do not interact, costs about one forward
and backward of the module, and holds ``B × (module's parameters)`` at once, so it suits small
custom modules (learned scales, gates), not big blocks. Child modules keep their own handlers.
The module must be deterministic: ``vmap`` refuses random ops such as dropout inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModuleError
from .registry import LayerHandler, stack_dot


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class FunctionalFallbackHandler(LayerHandler):
    name = "fallback"

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        # The module is re-run after the forward (possibly after the optimizer step, for order 2):
        # keep the parameters it ran with. Fallback modules are small by design.
        params = {
            n: p.detach().clone() for n, p in module.named_parameters(recurse=False) if p.requires_grad
        }
        return [_detach(x) for x in leaves], spec, params

    def per_example_grads(
        self, module: nn.Module, saved: Any, grad_out: Tensor, names: list[str]
    ) -> dict[str, Tensor]:
        """Parameter name -> ``[B, *param.shape]`` per-example gradients."""
        leaves, spec, snapshot = saved
        batch = grad_out.shape[0]
        in_dims = tuple(
            0 if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch else None
            for x in leaves
        )
        params = {n: snapshot[n] for n in names}

        def one_example(*leaves_and_grad: Any) -> dict[str, Tensor]:
            *example_leaves, g = leaves_and_grad
            example_leaves = [
                x.unsqueeze(0) if d == 0 else x for x, d in zip(example_leaves, in_dims)
            ]
            args, kwargs = tree_unflatten(example_leaves, spec)
            _, pull_back = vjp(lambda p: functional_call(module, p, args, kwargs), params)
            return pull_back(g.unsqueeze(0))[0]

        try:
            with torch.enable_grad():
                return vmap(one_example, in_dims=(*in_dims, 0))(*leaves, grad_out)
        except RuntimeError as exc:
            raise UnsupportedModuleError(
                f"the torch.func fallback could not compute per-example gradients of "
                f"{type(module).__name__} ({exc}). Register a handler for it with "
                "inrun.layers.register_handler, or freeze its parameters."
            ) from exc

    def dot(
        self, module: nn.Module, saved: Any, grad_out: Tensor, vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        grads = self.per_example_grads(module, saved, grad_out, list(vectors))
        return {n: stack_dot(grads[n], vectors[n]) for n in vectors}


FALLBACK = FunctionalFallbackHandler()
