"""What a call keeps for a contraction after the backward (Adam's slope, order 2): its input as it
was, at the precision the layer computed with, and the versions that show an in-place change; or,
where they are smaller (norms; linear maps over sequences longer than ``d·p / (d + p)``), its
per-example gradients in place of both factors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .state import Capture


def keep_for_window(cap: Capture, grad: Tensor, keep: bool, condense: bool) -> None:
    """With ``keep`` (a rule that contracts after the backward), keeps a call's output gradient
    beside its input until the window's contraction, else drops its input; with ``condense`` (no
    document needs the positions apart), a handler that can replaces both by the call's per-example
    gradients (:meth:`~inrun.layers.registry.LayerHandler.condense`). Run with the hooks paused and
    no autograd graph."""
    if not keep:
        cap.saved = None
        return
    cap.grad = grad
    if condense and cap.part is None:
        condensed = cap.entry.handler.condense(cap.entry.module, cap.saved, grad)
        if condensed is not None:  # the input is not read again: no in-place change can matter
            cap.saved, cap.grad, cap.versions = None, condensed, []


def at_compute_dtype(handler: Any, saved: Any) -> Any:
    """A kept input at the precision the layer computed with: under autocast a linear map or a
    convolution multiplies its input cast to the autocast dtype (bfloat16: half the bytes of the
    float32 activation), so that cast is what its weight's gradient was made of."""
    if not (handler.autocast_input and isinstance(saved, Tensor) and saved.is_floating_point()):
        return saved
    device = saved.device.type
    if not torch.is_autocast_enabled(device):
        return saved
    dtype = torch.get_autocast_dtype(device)
    return saved.to(dtype) if saved.element_size() > torch.finfo(dtype).bits // 8 else saved


def activation_storages(args: tuple, kwargs: dict) -> set[int]:
    """Storages of a call's inputs that have autograd history: activations the model computed
    (``capture`` detaches what it keeps, so this is read from the call's own arguments)."""
    leaves, _ = tree_flatten((args, kwargs))
    return {
        x.untyped_storage().data_ptr() for x in leaves
        if isinstance(x, Tensor) and (x.requires_grad or x.grad_fn is not None)
    }


def own_leaf_tensors(saved: Any, activations: set[int] = frozenset()) -> Any:
    """Copies of the tensors in ``saved`` that may be user data: every tensor but those whose
    storage is in ``activations`` (inputs with autograd history, which no loop refills)."""
    if isinstance(saved, Tensor):
        if saved.grad_fn is not None or saved.requires_grad:
            return saved
        return saved if saved.untyped_storage().data_ptr() in activations else saved.clone()
    if isinstance(saved, (list, tuple)):
        items = [own_leaf_tensors(x, activations) for x in saved]
        return type(saved)(items) if isinstance(saved, tuple) else items
    return saved


def versions(saved: Any) -> list[tuple[Tensor, int]]:
    if isinstance(saved, Tensor):
        return [(saved, saved._version)]
    if isinstance(saved, (list, tuple)):
        return [tv for x in saved for tv in versions(x)]
    return []
