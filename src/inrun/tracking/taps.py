"""The calls of a module valued by its linear parts (:mod:`inrun.layers.parts`), handed to the active
recorder one call at a time, as if each were an ``nn.Linear`` call.

A forward pre-hook enters the module's :class:`~inrun.layers.parts.LinearTaps` mode when a recorder
is active (a tracked micro-batch, the validation pass, the row verification's replay) and a forward
hook that runs even when the forward raises leaves it. Each ``F.linear`` call whose weight is a
part's weight, or rows of it, and each grouped matmul of a part's expert weights goes to
``recorder.on_forward(part entry, (x,), {}, y, part=...)``. A grouped call's rows are the module
input's rows gathered by expert (``hidden_states[index]``): the gather the forward made of its own
input gives the index; a call whose rows cannot be traced to the input is not reported (the row
verification then values its part at an enclosing module).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..layers.parts import LinearTaps, PartCall, row_slice, same_matrix_stack
from .entries import Entry


class ActiveRecorder(Protocol):
    """What the taps read of :class:`~inrun.tracking.capture.Hooks` (which owns them: importing
    it here would make an import circle)."""

    active: Any
    """The recorder of the block, validation pass or replay being run, or ``None``."""


class ModuleTaps:
    """The parts of one module and the hooks that see its calls."""

    def __init__(self, hooks: ActiveRecorder, module: nn.Module) -> None:
        self.hooks = hooks
        self.parts: list[tuple[Entry, Tensor, Tensor | None]] = []
        self.mode = LinearTaps(self._on_linear, self._on_grouped, self._on_gather)
        self.depth = 0
        self.source: Tensor | None = None  # the module's input of the call being run
        self.gathers: list[tuple[Tensor, Tensor]] = []  # (rows gathered from the input, index)
        self.orders: list[tuple[Tensor, Tensor]] = []  # (offs of a grouped call, its rows' index)
        self.handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def add(self, entry: Entry) -> None:
        part = entry.handler.part
        module = entry.module
        bias = module.get_parameter(part.bias) if part.bias is not None else None
        self.parts.append((entry, module.get_parameter(part.weight), bias))

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.depth or (self.hooks.active is not None and torch.is_grad_enabled()):
            if self.depth == 0:
                self.source = args[0] if args and isinstance(args[0], Tensor) else None
                self.mode.__enter__()
            self.depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.mode.__exit__(None, None, None)
                self.source, self.gathers, self.orders = None, [], []

    def _on_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor) -> None:
        recorder = self.hooks.active
        if recorder is None:
            return
        for entry, whole, whole_bias in self.parts:
            if not entry.active or entry.handler.part.grouped:
                continue
            rows = row_slice(weight, whole)
            if rows is None:
                continue
            with_bias = bias is not None and whole_bias is not None and row_slice(bias, whole_bias) == rows
            recorder.on_forward(entry, (x,), {}, y, part=PartCall(rows, with_bias))

    def _on_gather(self, source: Tensor, index: Tensor, y: Tensor) -> None:
        if source is self.source and index.dim() == 1:
            self.gathers.append((y, index))

    def _on_grouped(self, x: Tensor, weight: Tensor, offs: Tensor | None, y: Tensor) -> None:
        recorder = self.hooks.active
        if recorder is None or offs is None or self.source is None:
            return
        index = next((i for g, i in self.gathers if g is x), None)
        if index is None:  # the rows of an earlier grouped call of the same groups (the down projection)
            index = next((i for o, i in self.orders if o is offs), None)
        if index is None or index.shape[0] != x.shape[0]:
            return
        self.orders.append((offs, index))
        for entry, whole, _ in self.parts:
            part = entry.handler.part
            if entry.active and part.grouped and same_matrix_stack(weight, whole, part.transposed):
                call = PartCall((0, whole.shape[0]), False, offs, index, self.source.shape[0])
                recorder.on_forward(entry, (x,), {}, y, part=call, rows_like=self.source)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
