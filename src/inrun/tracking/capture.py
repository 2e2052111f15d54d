"""Capture hooks: what each tracked module's forward call keeps, and its output-gradient hook.

One forward hook per tracked module, installed once; it hands each call to the *active
recorder*, which is what the tracker is doing right now: ``None`` (nothing: the user's own
evaluation, a handler re-running a module), a :class:`TrainRecorder` (inside
``tracker.step(ids)``) or a :class:`ValidationRecorder` (the validation pass keeping the
Gram route's factors). Inputs are captured detached; the output gradient comes from a tensor
hook on the output, which works with in-place ops where full backward module hooks do not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import BatchMismatchError, StepOrderError, UnsupportedModuleError
from ..layers import Layout
from ..layers.registry import expand_leading
from .entries import Entry
from .state import Capture, MicroBatch


class Recorder(Protocol):
    def on_forward(self, entry: Entry, args: tuple, kwargs: dict, output: Any) -> Any: ...


class Hooks:
    """The forward hooks of every tracked module, dispatching to the active recorder."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.active: Recorder | None = None
        self.handles: list[Any] = []

    def install(self) -> None:
        self.handles = [e.module.register_forward_hook(self._hook(e), with_kwargs=True) for e in self.entries]

    def _hook(self, entry: Entry) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            recorder = self.active
            return None if recorder is None else recorder.on_forward(entry, args, kwargs, output)

        return hook

    @contextlib.contextmanager
    def recording(self, recorder: Recorder | None) -> Iterator[None]:
        previous, self.active = self.active, recorder
        try:
            yield
        finally:
            self.active = previous

    def paused(self) -> contextlib.AbstractContextManager:
        """Suspend capture while handlers re-run modules (fallback, norms)."""
        return self.recording(None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class TrainRecorder:
    """Captures the calls of one micro-batch and routes their output gradients to ``on_gradient``."""

    def __init__(
        self, microbatch: MicroBatch, keep_factors: bool,
        on_gradient: Callable[[Capture, Tensor, MicroBatch], None], bookkeeping_calls: set[int],
    ) -> None:
        self.microbatch = microbatch
        self.keep_factors = keep_factors
        self.on_gradient = on_gradient
        self.bookkeeping_calls = bookkeeping_calls  # entries whose current call went through book-keeping
        self.open = True  # False once the block has ended: later gradients are refused

    def on_forward(self, entry: Entry, args: tuple, kwargs: dict, output: Any) -> Any:
        if entry.index in self.bookkeeping_calls:
            self.bookkeeping_calls.discard(entry.index)  # this call went through the Function
            return None
        if not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"{entry.name} ({type(entry.module).__name__}) has trainable parameters and "
                f"returns {type(output).__name__}, not a tensor; no handler knows it and the "
                "fallback needs a single tensor output. Register a handler or freeze it."
            )
        if not output.requires_grad:
            return None
        mb = self.microbatch
        layout = entry.handler.layout(entry.module, args, output, mb.size)
        if layout is Layout.BATCHED:
            mb.batched_seen = True
        elif not mb.batched_seen:
            # A broadcast call (positions, a shared prefix) only makes sense once the batch
            # itself has gone through a tracked layer; before that, the ids and rows disagree.
            raise BatchMismatchError(
                f"{entry.name} ({type(entry.module).__name__}) saw {output.shape[0]} row(s) but "
                f"the step has {mb.size} ids: pass exactly one id per row of the batch"
            )
        saved = entry.handler.capture(entry.module, args, kwargs)
        if layout is Layout.UNBATCHED and isinstance(saved, Tensor):
            saved = saved.unsqueeze(0)
        if self.keep_factors:
            # The factors are read again after the step: copy inputs that are the user's data
            # (a loop may refill one input buffer in place) and remember activations' versions.
            saved = own_leaf_tensors(saved)
        cap = Capture(entry=entry, saved=saved, microbatch=mb)
        if self.keep_factors:
            cap.versions = versions(saved)
            mb.captures.append(cap)
        new_output = None
        if layout is not Layout.BATCHED:
            output = new_output = expand_leading(output, layout, mb.size)
        output.register_hook(lambda grad: self.on_gradient(cap, grad, self.accept(cap, grad)))
        return new_output

    def accept(self, cap: Capture, grad: Tensor) -> MicroBatch:
        """Checks shared by every route when a tracked call's output gradient arrives."""
        if cap.fired:
            raise StepOrderError(
                "a second backward pass went through the same forward inside one "
                "tracker.step(ids) block; each example's gradient would be counted twice"
            )
        if not self.open:
            raise StepOrderError(
                "backward() ran after its `with tracker.step(ids):` block had ended; call "
                "loss.backward() inside the block"
            )
        cap.fired = True
        mb = cap.microbatch
        mb.fired += 1
        if grad.dtype in (torch.float16, torch.bfloat16):
            mb.low_precision = True
        return mb


class ValidationRecorder:
    """Keeps the inputs and output gradients of the Gram-capable layers' validation calls, and
    the rows that row-sparse layers sharing a Gram weight (a tied embedding) looked up."""

    def __init__(self, entries: list[Entry]) -> None:
        self.residual_sources = {i for e in entries for i in e.residual_from}
        self.calls: dict[int, list[list[Any]]] = {}
        self.saved_rows: dict[int, list[Any]] = {}
        self.handles: list[Any] = []

    def on_forward(self, entry: Entry, args: tuple, kwargs: dict, output: Any) -> None:
        if entry.index in self.residual_sources:
            self.saved_rows.setdefault(entry.index, []).append(entry.handler.capture(entry.module, args, kwargs))
        if not entry.gram_capable or not isinstance(output, Tensor) or not output.requires_grad:
            return None
        call = [entry.handler.capture(entry.module, args, kwargs), None]
        self.calls.setdefault(entry.index, []).append(call)

        def keep(grad: Tensor) -> None:
            call[1] = grad.detach()

        self.handles.append(output.register_hook(keep))
        return None

    def discard(self) -> None:
        """Drop every capture (and the gradient hooks, before any backward runs)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.calls.clear()

    def complete_calls(self) -> dict[int, list[tuple[Tensor, Tensor]]]:
        """Entry index -> its ``(input, output gradient)`` calls, for entries whose every call
        received a gradient."""
        return {
            idx: [(a, g) for a, g in calls]
            for idx, calls in self.calls.items()
            if all(g is not None for _, g in calls)
        }

    def rows_of(self, sources: tuple[int, ...], entries: list[Entry]) -> Tensor:
        """The distinct weight rows the row-sparse ``sources`` touched in the validation pass."""
        rows = [
            entries[src].handler.gradient_rows(entries[src].module, saved)
            for src in sources for saved in self.saved_rows.get(src, [])
        ]
        return torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long)


def own_leaf_tensors(saved: Any) -> Any:
    """Copies of the tensors in ``saved`` that are user data (no autograd history)."""
    if isinstance(saved, Tensor):
        return saved.clone() if saved.grad_fn is None and not saved.requires_grad else saved
    if isinstance(saved, (list, tuple)):
        items = [own_leaf_tensors(x) for x in saved]
        return type(saved)(items) if isinstance(saved, tuple) else items
    return saved


def versions(saved: Any) -> list[tuple[Tensor, int]]:
    if isinstance(saved, Tensor):
        return [(saved, saved._version)]
    if isinstance(saved, (list, tuple)):
        return [tv for x in saved for tv in versions(x)]
    return []
