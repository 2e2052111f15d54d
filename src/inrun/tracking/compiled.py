"""``torch.compile``: the per-example dot products inside the compiled graph.

Dynamo traces the tracker's forward hooks into the graph. A hook that read the tracker's Python
state (the recorder of this micro-batch) would put guards on objects that change every step, and
the graph would be compiled again at every step until torch's recompile limit. Traced, a hook
reads only :class:`GraphTaps`, whose Python state changes only when the row plan does; its
tensors (a probe, the validation gradient) enter the graph as inputs, so a new validation
gradient every step needs no recompile:

* each tracked call's output passes through a *tap*, an autograd Function that is the identity
  forward; its backward computes the call's per-example dot products with the validation
  gradient (the handler's own vector route, :meth:`~inrun.layers.LayerHandler.dot`) and returns
  them as the gradient of a zero ``probe`` input ``[P, B, K]``. After the user's backward,
  ``probe.grad`` holds the micro-batch's dots: nothing else leaves the graph, and the gradient
  every other tensor receives is the untracked one.

The rows of each call are those the row verification proved on an eager step (the first one):
a traced call whose layout was not proven, or whose shape does not match it, is recorded in
``missed`` (a side effect dynamo replays after the graph runs) and its step is refused.

What does not run in the graph: blocks run eagerly (``torch.compiler.set_stance("force_eager")``,
every hook in Python as without compile) when :meth:`GraphTaps.eager_reason` names a reason: the
contraction vector is known only after backward (Adam, Muon, Adafactor: the slope needs the
batch's gradient; order 2 keeps the factors), a module has no traceable handler (the
torch.func fallback, the experts handler), DDP, an audited step, the row verification.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..layers import Rows
from ..layers.registry import reduce_rows

if TYPE_CHECKING:
    from .entries import Entry
    from .state import MicroBatch, Plan

logger = logging.getLogger(__name__)

TAPPABLE_ROWS = ("batched", "broadcast", "unbatched", "blocked")


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside a ``torch.compile`` wrapper (``None`` if ``model`` is not one)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else None


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """The module inside DistributedDataParallel / DataParallel and ``torch.compile``'s wrapper,
    and the DDP wrapper met on the way (``None`` if none)."""
    inner, ddp = model, None
    while True:
        if isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            if isinstance(inner, nn.parallel.DistributedDataParallel):
                ddp = inner
            inner = inner.module
        elif compiled_inner(inner) is not None:
            inner = compiled_inner(inner)
        else:
            return inner, ddp


def is_compiled(model: nn.Module) -> bool:
    """Whether the model, or a module inside it, is compiled (wrapped, or ``module.compile()``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def make_tap(entry: Entry, rows: Rows) -> type[torch.autograd.Function]:
    """The tap of one tracked module: identity forward; backward returns the call's ``[n, B, K]``
    dots (one row per parameter of the module) as the gradient of its slice of the probe."""
    module, handler, names = entry.module, entry.handler, entry.param_names

    class Tap(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, out: Tensor, probe: Tensor, saved: Tensor, *vectors: Tensor) -> Tensor:
            ctx.save_for_backward(saved, *vectors)
            ctx.probe_dtype = probe.dtype
            ctx.batch = probe.shape[1]
            return out.view_as(out)

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
            saved, *vectors = ctx.saved_tensors
            g = grad.movedim(rows.dim, 0) if rows.kind == "batched" and rows.dim else grad
            dots = handler.dot(module, saved, g, dict(zip(names, vectors)))
            if rows.kind == "blocked":
                dots = {n: reduce_rows(d, Rows("blocked", ctx.batch)) for n, d in dots.items()}
            per_param = [dots[n] if n in dots else torch.zeros_like(dots[next(iter(dots))]) for n in names]
            return (grad, torch.stack(per_param).to(ctx.probe_dtype), None, *([None] * len(vectors)))

    Tap.__name__ = Tap.__qualname__ = f"InRunTap_{handler.name}"
    return Tap


_TAPS: dict[int, weakref.ref[GraphTaps]] = {}
"""Every live tracker's taps by key. A traced hook reaches its taps through this global: tensors
found through a hook's closure count as the module's own and get static shapes, so the probe's
batch size would be compiled in, one graph per batch size. Weak: a tracker that is dropped
without ``close()`` leaves nothing behind."""


_HOOK_GUARDS: list[bool] = []
"""dynamo's ``skip_nnmodule_hook_guards`` before the first live tracker turned it off."""


def traced_call(key: int, entry: Entry, args: tuple, kwargs: dict, output: Any) -> Any:
    """A tracked module's forward hook as dynamo traces it (see :meth:`GraphTaps.on_forward`)."""
    graph = _TAPS[key]() if key in _TAPS else None
    return None if graph is None else graph.on_forward(entry, args, kwargs, output)


class GraphTaps:
    """What a traced hook reads: the probe and validation gradient of the micro-batch being
    recorded (``armed``), and the proven row layout and tap of each tracked module."""

    def __init__(self) -> None:
        self.key = id(self)
        if not _TAPS:
            # By default dynamo does not guard on module hooks: a graph compiled for a model
            # without the tracker's hooks (another instance of the same class, the model before
            # the tracker was made) would run for this one without them. Turned back when the
            # last tracker closes.
            _HOOK_GUARDS.append(torch._dynamo.config.skip_nnmodule_hook_guards)
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        _TAPS[self.key] = weakref.ref(self)
        weakref.finalize(self, _forget, self.key)
        self.armed = False
        self.probe: Tensor | None = None
        """``[P, B, K]`` zeros that require grad; the graph's backward writes the dots to its ``.grad``."""
        self.vectors: list[Tensor] = []
        """Per parameter row: ``[K, *shape]`` the step's validation gradient."""
        self.layouts: dict[int, Rows] = {}
        self.taps: dict[int, type[torch.autograd.Function]] = {}
        self.missed: list[int] = []
        """Entries a compiled graph called without a tap (appended inside the graph)."""
        self.broken: str | None = None
        """Why blocks stay eager after a graph called a module it could not tap."""
        self.graph_blocks = 0
        self.eager_blocks: dict[str, int] = {}
        self._said: set[str] = set()

    # ------------------------------------------------------------------ traced
    def on_forward(self, entry: Entry, args: tuple, kwargs: dict, output: Any) -> Any:
        """The hook's body when dynamo traces it: the output through the module's tap."""
        if not self.armed or not entry.active or not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        rows, tap, probe = self.layouts.get(entry.index), self.taps.get(entry.index), self.probe
        batch = probe.shape[1]
        if rows is None or tap is None or not _fits(output, rows, batch):
            self.missed.append(entry.index)
            return None
        saved = entry.handler.capture(entry.module, args, kwargs)
        if rows.kind == "batched" and rows.dim:
            saved = saved.movedim(rows.dim, 0)
        elif rows.kind == "broadcast":
            output = output.expand(batch, *output.shape[1:])
        elif rows.kind == "unbatched":
            output = output.unsqueeze(0).expand(batch, *output.shape)
            saved = saved.unsqueeze(0)
        index = list(entry.param_index)
        return tap.apply(output, probe[index], saved, *(self.vectors[i] for i in index))

    # ------------------------------------------------------------------ eager
    def close(self) -> None:
        _forget(self.key)

    def update_plan(self, entries: list[Entry], plan: Plan) -> None:
        """Layouts and taps from what the row verification proved (one layout per module)."""
        proven: dict[int, set[tuple]] = {}
        for index, key in plan.verified:
            proven.setdefault(index, set()).add(key)
        layouts: dict[int, Rows] = {}
        for e in entries:
            keys = proven.get(e.index, set())
            if not e.active or len(keys) != 1 or not e.handler.traceable:
                continue
            (key,) = keys
            if len(key) != 1 or key[0] is None or key[0][0] not in TAPPABLE_ROWS:
                continue
            kind, dim = key[0]
            if kind in ("broadcast", "unbatched") and e.index not in plan.shared_safe:
                continue
            layouts[e.index] = Rows(kind, 0, dim)
        if layouts != self.layouts:
            self.layouts = layouts  # a new dict only when the plan changed: dynamo guards on it
            self.taps = {e.index: make_tap(e, layouts[e.index]) for e in entries if e.index in layouts}

    def untraceable(self, entries: list[Entry], plan: Plan) -> str | None:
        """Why some module the plan has seen cannot be tapped in a graph (``None``: all can)."""
        seen = {index for index, _ in plan.verified}
        for e in entries:
            if not e.active or e.index in self.layouts:
                continue
            if e.site_of or not e.handler.traceable:
                return f"{e.name} is valued by the {e.handler.name} route, which is not traced"
            if e.index in seen:
                return f"the rows of {e.name} have several layouts or one a graph cannot tap"
        return None

    @contextlib.contextmanager
    def block(self, probe: Tensor | None, vectors: list[Tensor], eager_reason: str | None, compiled: bool) -> Iterator[None]:
        """One ``tracker.step`` block: armed with the probe, or run eagerly for ``eager_reason``
        (said once per reason when the model is known to be compiled)."""
        if eager_reason is not None:
            self.eager_blocks[eager_reason] = self.eager_blocks.get(eager_reason, 0) + 1
            if compiled and eager_reason not in self._said and eager_reason != VERIFYING:
                self._said.add(eager_reason)
                logger.warning("torch.compile: tracker.step blocks run eagerly (%s)", eager_reason)
            with torch.compiler.set_stance("force_eager"):
                yield
            return
        self.armed, self.probe, self.vectors, self.missed = True, probe, vectors, []
        try:
            yield
        finally:
            self.armed, self.probe, self.vectors = False, None, []


def _forget(key: int) -> None:
    if _TAPS.pop(key, None) is not None and not _TAPS and _HOOK_GUARDS:
        torch._dynamo.config.skip_nnmodule_hook_guards = _HOOK_GUARDS.pop()


def _fits(output: Tensor, rows: Rows, batch: int) -> bool:
    """Whether a traced call's output has the shape its proven layout says for ``batch`` ids."""
    if rows.kind == "batched":
        return output.dim() > rows.dim and output.shape[rows.dim] == batch
    if rows.kind == "broadcast":
        return output.dim() > 0 and output.shape[0] == 1
    if rows.kind == "blocked":
        return output.dim() > 0 and output.shape[0] % batch == 0
    return True


VERIFYING = "the row verification replays the model's call"
STALE_GRAPH = (
    "; or a graph compiled before the tracker was made ran without its hooks: make the tracker "
    "before the first compiled call, or call torch._dynamo.reset() after making it"
)


def eager_reason(engine: Any, documents: bool = False) -> str | None:
    """Why this block cannot be valued inside a compiled graph (``None``: it can)."""
    if documents:
        return "documents (segments=) are valued eagerly"
    if engine.rule.keeps_factors:
        if engine.rule.correction != "none":
            return "order 2 keeps each layer's inputs and output gradients until the next validation pass"
        return (f"{type(engine.optimizer).__name__}'s values need each layer's inputs and output gradients "
                "after the backward (the step's slope depends on the batch's gradient)")
    if engine.ddp is not None:
        return "DistributedDataParallel is not valued inside a compiled graph yet"
    if engine.declared is not None:
        return "a coupled loss (coupled_loss=) is valued by a forward-mode replay of the model's call"
    if engine.audit is not None and engine.audit.recording:
        return "this step is audited: the audit replays the model's call"
    if engine.config.verify == "every_step":
        return "verify='every_step' replays every micro-batch"
    graph = engine.hooks.graph
    if graph.broken is not None:
        return graph.broken
    if not engine.plan.verified:
        return VERIFYING
    graph.update_plan(engine.entries, engine.plan)
    return graph.untraceable(engine.entries, engine.plan)


def graph_probe(engine: Any, batch: int, documents: bool = False) -> tuple[Tensor | None, str | None]:
    """The probe of a block a compiled graph may value, or why the block runs eagerly."""
    reason = eager_reason(engine, documents)
    if reason is not None:
        return None, reason
    table = engine.table
    probe = torch.zeros(len(table), batch, engine.validation.current.columns, dtype=table.dtype,
                        device=table.device, requires_grad=True)
    # The batch size follows the model's inputs: once they are dynamic, so is the probe's.
    torch._dynamo.maybe_mark_dynamic(probe, 1)
    return probe, None


def add_graph_dots(engine: Any, mb: MicroBatch, dots: Tensor) -> None:
    """A compiled graph's dots (the probe's gradient) into the micro-batch; a call the graph
    could not tap refuses the step, and the blocks that follow run eagerly."""
    graph = engine.hooks.graph
    graph.graph_blocks += 1
    engine.compiled = True
    mb.fired += 1
    mb.dots = dots.to(torch.float64) if mb.dots is None else mb.dots + dots.to(torch.float64)
    for e in engine.entries:
        if e.index in graph.layouts:
            e.route = f"compiled:{e.handler.name}"
    if graph.missed:
        names = ", ".join(sorted({engine.entries[i].name for i in graph.missed}))
        graph.broken = f"the compiled graph called {names} with rows not proven on an eager step"
        engine.window.doomed = graph.broken
