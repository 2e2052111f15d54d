"""Normalization layers with an elementwise affine: ``y = w ⊙ x̂ + b``.

The per-example gradients are feature-sized (``Σ_t D_z,t ⊙ x̂_z,t`` and ``Σ_t D_z,t``), so they
are formed directly and dotted with the contraction vectors.

* ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``: x̂ from the functional op without affine.
* Llama-style RMSNorm modules (``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``...): any
  module whose class name ends in ``RMSNorm``/``LayerNorm`` and whose only parameters are
  ``weight`` (and ``bias``). Their output is affine in ``weight`` whatever the internal
  precision or the ``w`` vs ``1 + w`` convention, so ``x̂ = f(w=1) − f(w=0)`` exactly.
* ``nn.BatchNorm*`` only in eval mode (running statistics); in training mode the batch
  statistics couple the examples and no per-example gradient exists.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UnsupportedModuleError
from .registry import (
    LayerHandler,
    PerExampleGradients,
    as_float,
    first_input,
    register_handler,
    register_predicate,
    stack_dot,
)


class _AffineNormHandler(LayerHandler):
    """Shared dot: ``w``-gradient ``Σ D ⊙ x̂`` and ``b``-gradient ``Σ D`` per example."""

    param_names = ("weight", "bias")

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        return first_input(module, args, kwargs).detach()

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x̂``, a new tensor (:meth:`dot` multiplies it in place)."""
        raise NotImplementedError

    def feature_shape(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        """Shape of the parameter the per-position gradients are summed into."""
        return tuple(module.weight.shape)

    def sum_to_features(self, module: nn.Module, t: Tensor) -> Tensor:
        """``[B, ...] -> [B, *feature_shape]``: sum over every position of an example."""
        shape = self.feature_shape(module, t)
        return t.reshape(t.shape[0], -1, *shape).sum(dim=1)

    def dot(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        like = next(iter(vectors.values()))
        D = as_float(grad_out, like)
        if "weight" in vectors:
            with torch.no_grad():
                x_hat = as_float(self.normalized(module, saved), like)
                x_hat = x_hat.mul_(D) if x_hat.shape == D.shape else x_hat * D  # D ⊙ x̂ in x̂'s buffer
            out["weight"] = stack_dot(self.sum_to_features(module, x_hat), vectors["weight"])
        if "bias" in vectors:
            out["bias"] = stack_dot(self.sum_to_features(module, D), vectors["bias"])
        return out

    def condense(self, module: nn.Module, saved: Tensor, grad_out: Tensor) -> PerExampleGradients:
        """``[rows, *features]`` per parameter, in at least float32: ``2·T`` times smaller than the
        input and output gradient of a call of ``T`` positions."""
        dtype = torch.promote_types(grad_out.dtype, torch.float32)
        D = grad_out.to(dtype)
        out = PerExampleGradients()
        if getattr(module, "weight", None) is not None:
            out["weight"] = self.sum_to_features(module, D * self.normalized(module, saved).to(dtype))
        if getattr(module, "bias", None) is not None:
            out["bias"] = self.sum_to_features(module, D)
        return out


class LayerNormHandler(_AffineNormHandler):
    name = "layernorm"
    traceable = True

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() - len(module.normalized_shape) >= 2

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormHandler(_AffineNormHandler):
    name = "rmsnorm"
    traceable = True

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() - len(module.normalized_shape) >= 2

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class GroupNormHandler(_AffineNormHandler):
    """``[B, C, *spatial]``: per-channel parameters, summed over the spatial positions."""

    name = "groupnorm"
    traceable = True

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def sum_to_features(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


class BatchNormHandler(GroupNormHandler):
    """Eval-mode BatchNorm: ``x̂ = (x − running_mean) / sqrt(running_var + eps)`` per channel."""

    name = "batchnorm_eval"

    def check(self, module: nn.Module) -> None:
        if module.training or not module.track_running_stats:
            raise UnsupportedModuleError(batchnorm_message(module))

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)


def batchnorm_message(module: nn.Module) -> str:
    return (
        f"{type(module).__name__} in training mode normalizes with statistics of the whole batch, "
        "so every example's gradient depends on the others and per-example values are not "
        "defined. Replace it with GroupNorm/LayerNorm, or put the BatchNorm layers in eval mode "
        "(running statistics) while tracking, e.g. `for m in model.modules(): "
        "isinstance(m, nn.modules.batchnorm._BatchNorm) and m.eval()`."
    )


class ElementwiseAffineHandler(_AffineNormHandler):
    """Norm modules from other libraries (e.g. ``LlamaRMSNorm``): ``x̂ = f(w=1) − f(w=0)``."""

    name = "affine_norm"

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        """A per-feature weight normalizing the last dimensions; proven by the row verification
        (a module that normalizes over the sequence too gives other dots, and is moved)."""
        return x.dim() - module.weight.dim() >= 2

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        w = module.weight
        params = {"weight": torch.ones_like(w)}
        zeros = {"weight": torch.zeros_like(w)}
        if getattr(module, "bias", None) is not None:
            params["bias"] = zeros["bias"] = torch.zeros_like(module.bias)
        return functional_call(module, params, (x,)) - functional_call(module, zeros, (x,))

    def feature_shape(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return tuple(module.weight.shape)


def _is_affine_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name.endswith("LayerNorm")):
        return False
    own = {n for n, _ in module.named_parameters(recurse=False)}
    has_children = next(module.children(), None) is not None
    return "weight" in own and own <= {"weight", "bias"} and not has_children


register_handler(nn.LayerNorm, handler=LayerNormHandler())
register_handler(nn.RMSNorm, handler=RMSNormHandler())
register_handler(nn.GroupNorm, handler=GroupNormHandler())
register_handler(nn.modules.batchnorm._BatchNorm, handler=BatchNormHandler())
register_predicate(_is_affine_norm, ElementwiseAffineHandler())
