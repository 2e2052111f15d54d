"""The book-keeping route: while tracked, a supporting module's ``forward`` is replaced by one
that sends cheap-enough calls through the handler's autograd Function (per-example weight
gradients formed in place of the weight-gradient GEMM, Bu et al. 2023).

The override is a method bound to the module (``module.forward``), set when the tracker is made
with ``bookkeeping`` on and removed by :meth:`Bookkeeping.remove` (``tracker.close()``), which
puts back whatever ``forward`` attribute was there before. A deep copy of the model rebinds the
override to the copy, which is not tracked and runs its class's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .capture import TrainRecorder
from .entries import Entry
from .kept import own_leaf_tensors, versions
from .routes import RoutePolicy
from .state import Capture, MicroBatch
from .validation import Validation


class Bookkeeping:
    def __init__(
        self, entries: list[Entry], policy: RoutePolicy,
        active: Callable[[], tuple[TrainRecorder, Validation] | None],
        add_dots: Callable[[MicroBatch, Entry, dict[str, Tensor]], None],
    ) -> None:
        """``active()`` is the recorder and validation gradient of an immediate-rule micro-batch
        being recorded now (``None`` otherwise); ``add_dots`` adds a call's dots to its micro-batch."""
        self.policy, self.active, self.add_dots = policy, active, add_dots
        self.calls: set[int] = set()  # entries whose current forward went through the Function
        self.overrides: list[tuple[nn.Module, Any]] = []
        for entry in entries:
            if entry.handler.supports_bookkeeping:
                self._install(entry)

    def _install(self, entry: Entry) -> None:
        module = entry.module
        previous = module.__dict__.get("forward")

        def forward(module_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if module_self is module and not kwargs and len(args) == 1:
                call = self._maybe_call(entry, args[0])
                if call is not None:
                    return call
            if previous is not None and module_self is module:
                return previous(*args, **kwargs)
            return type(module_self).forward(module_self, *args, **kwargs)

        module.forward = types.MethodType(forward, module)
        self.overrides.append((module, previous))

    def _maybe_call(self, entry: Entry, x: Any) -> Tensor | None:
        if torch.compiler.is_compiling():
            return None  # a compiled graph taps the call instead (tracking/compiled.py)
        active = self.active()
        if active is None or not torch.is_grad_enabled() or torch.is_autocast_enabled():
            return None
        recorder, val = active
        mb = recorder.microbatch
        if mb.segments is not None:
            return None  # per-document weight gradients would need each document's slice of the rows
        if not self.policy.use_bookkeeping(entry, x, mb.size, val.columns, val.gram.get(entry.index)):
            return None
        cap = Capture(entry=entry, saved=None)
        if recorder.keep_factors:
            mb.captures.append(cap)
        vectors = {n: val.grads[i] for n, i in zip(entry.param_names, entry.param_index)}

        def sink(dots: dict[str, Tensor], x: Tensor, grad_out: Tensor) -> None:
            if recorder.muted:
                return
            batch = recorder.accept(cap, grad_out)
            entry.route = "bookkeeping"
            self.add_dots(batch, entry, dots)
            if recorder.keep_factors:
                history = {x.untyped_storage().data_ptr()} if x.requires_grad or x.grad_fn is not None else set()
                cap.saved, cap.grad = own_leaf_tensors(x.detach(), history), grad_out.detach()
                cap.versions = versions(cap.saved)

        self.calls.add(entry.index)
        return entry.handler.bookkeeping_call(entry.module, x, vectors, sink)

    def remove(self) -> None:
        for module, previous in self.overrides:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self.overrides.clear()
