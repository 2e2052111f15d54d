"""Capture hooks: what each tracked module's forward call keeps, and its output-gradient hook.

One forward hook per tracked module, installed once; traced by ``torch.compile`` it taps the
call inside the graph (:mod:`inrun.tracking.compiled`); run eagerly it hands each call to the *active
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
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import StepOrderError
from ..layers import Rows
from ..layers.parts import PartCall, PartHandler, PartInput
from . import rows as row_maps
from .compiled import GraphTaps, traced_call
from .entries import Entry
from .kept import activation_storages, at_compute_dtype, own_leaf_tensors, versions
from .replay import BufferWatch
from .rows import depends_on_batch, leaf_rows, output_leaves, outputs_cut, row_key
from .state import Capture, MicroBatch, Plan
from .taps import ModuleTaps


class Recorder(Protocol):
    def on_forward(self, entry: Entry, args: tuple, kwargs: dict, output: Any, part: PartCall | None = None,
                   rows_like: Tensor | None = None) -> Any: ...


class Hooks:
    """The forward hooks of every tracked module, dispatching to the active recorder."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.active: Recorder | None = None
        self.handles: list[Any] = []
        self.call_rng: dict[int, Tensor] = {}  # entry -> RNG state at its call's start (replaying handlers)
        self.graph = GraphTaps()  # what a hook reads when dynamo traces it
        self.taps: dict[int, ModuleTaps] = {}  # module -> the taps of the parts valued inside it
        self.call_buffers: dict[int, Any] = {}  # entry -> its buffers at its call's start (replaying handlers)
        self.buffers_before: dict[int, dict[str, Tensor]] = {}  # entry -> what its last call changed, as before
        self.buffer_watch = BufferWatch()

    def install(self) -> None:
        for e in self.entries:
            self.add(e)

    def add(self, entry: Entry) -> None:
        """Hook one more entry (a site made by the row verification)."""
        module = entry.module
        if isinstance(entry.handler, PartHandler):
            taps = self.taps.get(id(module))
            if taps is None:
                taps = self.taps[id(module)] = ModuleTaps(self, module)
            taps.add(entry)
            return
        if entry.handler.replays_calls:
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(entry)))
        self.handles.append(module.register_forward_hook(self._hook(entry), with_kwargs=True))

    def _pre_hook(self, entry: Entry) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple) -> None:
            if torch.compiler.is_compiling():
                return
            if isinstance(self.active, TrainRecorder) and entry.active:
                self.call_rng[entry.index] = torch.get_rng_state()
                self.call_buffers[entry.index] = self.buffer_watch.before(module)

        return hook

    def _hook(self, entry: Entry) -> Callable[..., Any]:
        key = self.graph.key  # traced, the hook reaches its taps through a global, not self

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if torch.compiler.is_compiling():
                return traced_call(key, entry, args, kwargs, output)
            seen = self.call_buffers.pop(entry.index, None)
            if seen is not None:  # learned from every call, captured or not
                self.buffers_before[entry.index] = self.buffer_watch.changed(module, seen)
            recorder = self.active
            if recorder is None or not entry.active:
                return None
            return recorder.on_forward(entry, args, kwargs, output)

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
        self.graph.close()
        for taps in self.taps.values():
            taps.remove()
        self.taps.clear()


class TrainRecorder:
    """Captures the calls of one micro-batch and routes their output gradients to ``on_gradient``.

    Each call gets a candidate row map (:mod:`inrun.tracking.rows`). A call the plan has not
    verified marks the micro-batch *off plan* (the row verification then replays it); a call
    with no reading of its rows, or a shared call the plan has not shown safe to expand, is not
    captured at all: the model computes exactly what it computes untracked.
    """

    def __init__(
        self, microbatch: MicroBatch, keep_factors: bool,
        on_gradient: Callable[[Capture, Tensor, MicroBatch], None], bookkeeping_calls: set[int],
        plan: Plan, hooks: Hooks, root_storages: set[int], expand_shared: Callable[[Entry], bool],
        root: nn.Module,
    ) -> None:
        self.microbatch = microbatch
        self.keep_factors = keep_factors
        self.on_gradient = on_gradient
        self.bookkeeping_calls = bookkeeping_calls  # entries whose current call went through book-keeping
        self.plan, self.hooks, self.root_storages = plan, hooks, root_storages
        self.expand_shared = expand_shared
        self.root = root
        self.open = True  # False once the block has ended: later gradients are refused
        self.muted = False  # True while a verification runs a second backward through the replay

    def on_forward(
        self, entry: Entry, args: tuple, kwargs: dict, output: Any, part: PartCall | None = None,
        rows_like: Tensor | None = None,
    ) -> Any:
        """One tracked call; ``part``: a call of a module's linear part (:mod:`inrun.layers.parts`),
        whose dots come in the rows of ``rows_like`` (the module's input a grouped call gathered
        from), or else in the call's own rows, sequence-first (``nn.MultiheadAttention``)."""
        mb = self.microbatch
        if entry.index in self.bookkeeping_calls:
            self.bookkeeping_calls.discard(entry.index)  # this call went through the Function
            mb.signature.append((entry.index, (("batched", 0),)))
            return None
        if not torch.is_grad_enabled():
            return None
        leaves, spec, index = output_leaves(output)
        if not leaves:
            return None
        handler = entry.handler
        if not handler.multi_output and not isinstance(output, Tensor):
            mb.unresolved[entry.index] = f"returns {type(output).__name__}, and its handler takes one tensor"
            mb.signature.append((entry.index, None))
            return None
        independent = not depends_on_batch(args, kwargs, self.root_storages)
        if rows_like is not None:
            rows = [leaf_rows(rows_like, mb.rows, independent, entry.batch_dim)]
        elif part is not None and handler.part.sequence_first:
            rows = [row_maps.sequence_first_rows(leaves[0], mb.rows)]
        else:
            declared = handler.batch_dims(entry.module, len(leaves)) or [entry.batch_dim] * len(leaves)
            rows = [leaf_rows(t, mb.rows, independent, d) for t, d in zip(leaves, declared)]
        shared = all(r is not None and r.shared for r in rows)
        root = entry.module is self.root and part is None
        if root:
            # The model's own outputs: rows by the id contract; a loss computed inside the model
            # has no rows and reaches the parameters only through the batched outputs.
            rows = [Rows("batched", mb.rows) if t.dim() > 0 and t.shape[0] == mb.rows else None for t in leaves]
        by_row, seg = rows, mb.segments
        unstride = seg is not None and rows[0] is not None and rows[0].kind == "strided"
        if seg is not None:
            # A strided call ([S·B, ...], row s·B + b) is given to the handler in position order.
            rows = [seg.rows if seg.positions == leaves[0].shape[0] else None] if unstride else \
                seg.split(rows, [rows_like] if rows_like is not None else leaves)
        key = (entry.index, row_key(rows))
        mb.signature.append(key)
        if key not in self.plan.verified:
            mb.off_plan = True
        if any(r is None for r in rows) if not handler.multi_output else all(r is None for r in rows):
            mb.unresolved[entry.index] = (
                "its output rows do not show which example they belong to" if seg is None else
                "its outputs do not have one position per token of the micro-batch, so its terms cannot "
                "be split by document"
            )
            return None
        if any(r is not None and r.shared for r in by_row) and not shared:
            mb.unresolved[entry.index] = "some of its outputs are shared by the batch and some are not"
            return None
        if shared and not self.expand_shared(entry):
            mb.unresolved.setdefault(entry.index, "its call does not depend on the batch")
            return None
        saved = handler.capture(entry.module, args, kwargs)
        flatten = False  # a [B, T, ...] call given to the handler as [B·T, ...] (one row per position)
        if handler.replays_calls:
            saved.rng = self.hooks.call_rng.pop(entry.index, None)
            saved.buffers_before = self.hooks.buffers_before.pop(entry.index, {})
            saved.outputs = index
            saved.rows = rows if seg is not None else [
                Rows("batched", mb.size) if r is not None and r.shared else r for r in rows]
        elif isinstance(saved, Tensor):
            if by_row[0].kind == "unbatched":
                saved = saved.unsqueeze(0)
            elif by_row[0].dim:
                saved = saved.movedim(by_row[0].dim, 0)
            if unstride:
                saved = row_maps.from_strided(saved, mb.rows)
            elif seg is not None and by_row[0].kind != "blocked":
                saved = seg.flatten_positions(saved, handler, entry.module)
                if saved is None:
                    mb.unresolved[entry.index] = "its handler cannot split a call by token position"
                    return None
                flatten = True
        elif seg is not None and by_row[0].kind != "blocked":
            mb.unresolved[entry.index] = "its handler cannot split a call by token position"
            return None
        if self.keep_factors:
            # The factors are read again after the step: copy inputs that are the user's data
            # (a loop may refill one input buffer in place) and remember activations' versions.
            saved = own_leaf_tensors(saved, activation_storages(args, kwargs))
            saved = handler.keep(entry.module, at_compute_dtype(handler, saved))
        if seg is not None:
            reduce = seg.rows
        else:
            reduce = None if handler.multi_output else (Rows("batched", mb.size) if rows[0].shared else rows[0])
        cap = Capture(entry=entry, saved=saved, rows=reduce, part=part)
        if self.keep_factors or handler.multi_output:
            cap.versions = versions(saved)
            mb.captures.append(cap)
        if handler.multi_output and len(leaves) > 1:
            # An output another output was computed from has in its gradient that one's too:
            # contract only the outputs the rest were not computed from (the model's logits,
            # not its encoder states the decoder read; not a loss computed inside the model).
            # Outputs without rows (a loss computed inside the module) reach the parameters through
            # the rowed outputs they were computed from: only the rowed outputs form the cut.
            rowed = [k for k, r in enumerate(rows) if r is not None]
            cut = outputs_cut([leaves[k] for k in rowed], [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)])
            keep = {k for k, c in zip(rowed, cut) if c}
            rows = [r if k in keep else None for k, r in enumerate(rows)]
        if shared:
            leaves = [row_maps.expand_shared(t, r) for t, r in zip(leaves, by_row)]
        if handler.multi_output:
            cap.grad = [None] * len(leaves)
            for k, t in enumerate(leaves):
                t.register_hook(self._slot(cap, k, rows[k]))
        else:
            dim = rows[0].dim
            if unstride:
                leaves[0].register_hook(lambda g: self._deliver(cap, row_maps.from_strided(g, mb.rows)))
            elif flatten:
                leaves[0].register_hook(lambda g: self._deliver(cap, g.movedim(dim, 0).flatten(0, 1)))
            else:
                leaves[0].register_hook(lambda g: self._deliver(cap, g.movedim(dim, 0) if dim else g))
        if not shared:
            return None
        if isinstance(output, Tensor):
            return leaves[0]
        all_leaves, _ = tree_flatten(output)
        for i, t in zip(index, leaves):
            all_leaves[i] = t
        return tree_unflatten(all_leaves, spec)

    def _deliver(self, cap: Capture, grad: Tensor) -> None:
        if self.muted:
            if self.microbatch.segments is not None:
                cap.weighted_grad = grad.detach()  # the verification's weighted backward
            return
        mb = self.accept(cap, grad)
        if mb.segments is not None and self.keep_factors:
            cap.grad = grad.detach()  # kept for the verification's comparison of documents' gradients
        self.on_gradient(cap, grad, mb)

    def _slot(self, cap: Capture, k: int, rows: Rows | None) -> Callable[[Tensor], None]:
        def keep(grad: Tensor) -> None:
            if self.muted:
                if self.microbatch.segments is not None and rows is not None:
                    if cap.weighted_grad is None:
                        cap.weighted_grad = [None] * len(cap.grad)
                    cap.weighted_grad[k] = grad.detach()
                return
            if rows is None:
                return
            if cap.grad[k] is not None:
                raise StepOrderError(SECOND_BACKWARD)
            if not self.open:
                raise StepOrderError(AFTER_BLOCK)
            if not cap.fired:
                cap.fired = True
                self.microbatch.fired += 1
            note_precision(self.microbatch, cap, grad)
            cap.grad[k] = grad.detach()

        return keep

    def accept(self, cap: Capture, grad: Tensor) -> MicroBatch:
        """Checks shared by every route when a tracked call's output gradient arrives."""
        if cap.fired:
            raise StepOrderError(SECOND_BACKWARD)
        if not self.open:
            raise StepOrderError(AFTER_BLOCK)
        cap.fired = True
        mb = self.microbatch
        mb.fired += 1
        note_precision(mb, cap, grad)
        return mb


def note_precision(mb: MicroBatch, cap: Capture, grad: Tensor) -> None:
    """Record the lowest precision a call's output gradient came in for the parameters it values:
    the consistency check's tolerance for those parameters follows it."""
    if grad.is_floating_point():
        eps = torch.finfo(grad.dtype).eps
        for row in cap.entry.param_index:
            if eps > mb.eps.get(row, 0.0):
                mb.eps[row] = eps


SECOND_BACKWARD = (
    "a second backward pass went through the same forward inside one tracker.step(ids) block; "
    "each example's gradient would be counted twice"
)
AFTER_BLOCK = (
    "backward() ran after its `with tracker.step(ids):` block had ended; call loss.backward() "
    "inside the block"
)


class ValidationRecorder:
    """Keeps the inputs and output gradients of the Gram-capable layers' validation calls, and
    the rows that row-sparse layers sharing a Gram weight (a tied embedding) looked up."""

    def __init__(self, entries: list[Entry]) -> None:
        self.residual_sources = {i for e in entries for i in e.residual_from}
        self.calls: dict[int, list[list[Any]]] = {}
        self.saved_rows: dict[int, list[Any]] = {}
        self.handles: list[Any] = []

    def on_forward(
        self, entry: Entry, args: tuple, kwargs: dict, output: Any, part: PartCall | None = None,
        rows_like: Tensor | None = None,
    ) -> None:
        if entry.index in self.residual_sources:
            self.saved_rows.setdefault(entry.index, []).append(entry.handler.capture(entry.module, args, kwargs))
        if not entry.gram_capable or not isinstance(output, Tensor) or not output.requires_grad:
            return None
        saved = entry.handler.capture(entry.module, args, kwargs)
        call = [saved if part is None else PartInput(saved, part), None]
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
