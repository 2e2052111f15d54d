"""The model's own calls of a micro-batch, kept so that they can be run again exactly.

An independent exact route to per-example quantities, used to check the fast routes (which rows
of a layer belong to which example) and to audit a step's values against exact Shapley values:

* :class:`RootCalls` watches the calls of the tracked model (the root module): when armed for a
  micro-batch it keeps each call's inputs, the random-number state it started from, its outputs,
  and the gradient the user's backward sent to every output with a batch dimension;
* :meth:`RootCall.replay` runs the call again: the same inputs, the same random numbers (so the
  same dropout masks), the model's buffers (running statistics) restored afterwards, so a
  replay changes nothing the user's model computes or holds;
* :func:`weighted_gradients`: ``Σ_z w_z g_z`` for rows of example weights ``w``, by a backward
  of the replayed outputs with the user's output gradients weighted per example. With
  ``w = e_z`` it is example ``z``'s gradient ``g_z``, exactly, through plain autograd.

Why this is exact: by the id contract, row ``z`` of every batched model output belongs to example
``z`` and the loss adds up over examples, so ``g_z = J_zᵀ G_z`` with ``G_z`` the row of the
output gradient. Nothing in it depends on how the layers inside arrange their rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten


@dataclass
class RootCall:
    """One call of the root module inside a micro-batch."""

    module: nn.Module
    args: tuple
    kwargs: dict
    rng: tuple[Tensor, list[Tensor]]
    outputs: list[Tensor] = field(default_factory=list)
    """The batched output tensors (leading dimension = the micro-batch), detached."""
    grads: list[Tensor | None] = field(default_factory=list)
    """The user's backward's gradient of each batched output (``None`` if none arrived)."""

    def replay(self) -> list[Tensor]:
        """The batched outputs of the call run again (with a graph), in the same order."""
        module = self.module
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        devices = [i for i in range(len(self.rng[1]))]
        try:
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(self.rng[0])
                for i, state in enumerate(self.rng[1]):
                    torch.cuda.set_rng_state(state, i)
                out = module(*self.args, **self.kwargs)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return batched_leaves(out, self.outputs[0].shape[0] if self.outputs else None)


def batched_leaves(output: Any, batch: int | None) -> list[Tensor]:
    """The tensors of an output structure whose leading dimension is the batch."""
    leaves, _ = tree_flatten(output)
    return [
        t for t in leaves
        if isinstance(t, Tensor) and t.dim() > 0 and t.is_floating_point() and (batch is None or t.shape[0] == batch)
    ]


class RootCalls:
    """Hooks on the root module that keep its calls while armed (off: two cheap checks per call)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.batch: int | None = None
        self.calls: list[RootCall] = []
        self._starting: list[RootCall] = []
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def arm(self, batch: int) -> None:
        self.batch, self.calls, self._starting = batch, [], []

    def disarm(self) -> list[RootCall]:
        calls, self.batch, self.calls, self._starting = self.calls, None, [], []
        return calls

    @property
    def armed(self) -> bool:
        return self.batch is not None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.batch is None or not torch.is_grad_enabled():
            return
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        self._starting.append(RootCall(module, args, dict(kwargs), (torch.get_rng_state(), cuda)))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.batch is None or not self._starting:
            return
        call = self._starting.pop()
        outputs = [t for t in batched_leaves(output, self.batch) if t.requires_grad]
        call.outputs = [t.detach() for t in outputs]
        call.grads = [None] * len(outputs)
        for k, t in enumerate(outputs):
            t.register_hook(_keeper(call.grads, k))
        self.calls.append(call)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _keeper(slots: list[Tensor | None], k: int) -> Any:
    def keep(grad: Tensor) -> None:
        slots[k] = grad.detach()

    return keep


def weighted_gradients(
    calls: Sequence[RootCall], params: Sequence[Tensor], weights: Tensor,
) -> list[Tensor]:
    """Per parameter ``[R, *shape]``: ``Σ_z weights[r, z] g_z`` for each row ``r`` of ``weights``
    (``[R, B]``), summed over the micro-batch's root calls, by replay and plain autograd."""
    R = weights.shape[0]
    total = [torch.zeros((R, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    for call in calls:
        present = [(k, g) for k, g in enumerate(call.grads) if g is not None]
        if not present:
            continue
        with torch.enable_grad():
            outputs = call.replay()
            for r in range(R):
                grad_outputs = [g * _rows(weights[r], g) for _, g in present]
                grads = torch.autograd.grad(
                    [outputs[k] for k, _ in present], list(params), grad_outputs=grad_outputs,
                    retain_graph=r + 1 < R, allow_unused=True,
                )
                for i, g in enumerate(grads):
                    if g is not None:
                        total[i][r] += g.detach()
    return total


def _rows(w: Tensor, like: Tensor) -> Tensor:
    """``[B]`` weights shaped to multiply the rows of ``like`` (``[B, ...]``)."""
    return w.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def armed(calls: RootCalls, batch: int) -> Iterator[RootCalls]:
    calls.arm(batch)
    try:
        yield calls
    finally:
        calls.disarm()
