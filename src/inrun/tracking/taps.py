"""The calls of a module valued by its linear parts (:mod:`inrun.layers.attention`), handed to the
active recorder one ``F.linear`` call at a time, as if each were an ``nn.Linear`` call.

A forward pre-hook enters the module's :class:`~inrun.layers.attention.LinearTaps` mode when a
recorder is active (a tracked micro-batch, the validation pass, the row verification's replay) and
a forward hook that runs even when the forward raises leaves it. Each ``F.linear`` call whose weight
is a part's weight, or rows of it, goes to ``recorder.on_forward(part entry, (x,), {}, y, part=...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..layers.attention import LinearTaps, PartCall, row_slice
from .entries import Entry

if TYPE_CHECKING:
    from .capture import Hooks


class ModuleTaps:
    """The parts of one module and the hooks that see its ``F.linear`` calls."""

    def __init__(self, hooks: Hooks, module: nn.Module) -> None:
        self.hooks = hooks
        self.parts: list[tuple[Entry, Tensor, Tensor | None]] = []
        self.mode = LinearTaps(self._on_linear)
        self.depth = 0
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
                self.mode.__enter__()
            self.depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.mode.__exit__(None, None, None)

    def _on_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor) -> None:
        recorder = self.hooks.active
        if recorder is None:
            return
        for entry, whole, whole_bias in self.parts:
            if not entry.active:
                continue
            rows = row_slice(weight, whole)
            if rows is None:
                continue
            with_bias = bias is not None and whole_bias is not None and row_slice(bias, whole_bias) == rows
            recorder.on_forward(entry, (x,), {}, y, part=PartCall(rows, with_bias))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
