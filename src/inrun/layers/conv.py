"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A convolution's output is linear in its weight, so the directional derivative of example z's
output along a weight-shaped vector ``U`` is the same convolution with ``U`` as the weight:
``<g_z, U> = <D_z, conv(A_z; U)>``. One convolution per contraction vector, whatever the
stride, dilation, groups or padding mode, and no unfolded patches in memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .registry import LayerHandler, as_float, first_input, register_handler, stack_dot


class ConvHandler(LayerHandler):
    name = "conv"
    autocast_input = True
    math_methods = ("forward", "_conv_forward")
    traceable = True
    param_names = ("weight", "bias")

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        return first_input(module, args, kwargs).detach()

    def dot(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        batch = grad_out.shape[0]
        if "weight" in vectors:
            U = vectors["weight"]  # (K, C_out, C_in / groups, *kernel)
            x = as_float(saved, U)
            D = as_float(grad_out, U).reshape(batch, -1)
            cols = []
            for k in range(U.shape[0]):
                y = module._conv_forward(x, U[k], None)  # (B|1, C_out, *spatial)
                cols.append((y.reshape(y.shape[0], -1) * D).sum(dim=1))
            out["weight"] = torch.stack(cols, dim=1)
        if "bias" in vectors:
            ub = vectors["bias"]  # (K, C_out)
            D = as_float(grad_out, ub)
            out["bias"] = stack_dot(D.reshape(batch, D.shape[1], -1).sum(dim=2), ub)
        return out

    def vector_cost(self, module: nn.Module) -> float:
        return float(module.weight.numel())


register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d, handler=ConvHandler())
