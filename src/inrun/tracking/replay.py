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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import BatchMismatchError, UnsupportedModuleError
from ..layers.fallback import inline_checkpoints, is_kv_cache, without_caches
from .rows import outputs_cut
from .segments import Segments


class ReplayingEngine(Protocol):
    """What a replay of the model's calls reads of the engine
    (:class:`~inrun.tracking.engine.StepEngine`): its model, parameter table, hooks and validation."""

    module: nn.Module
    table: Any
    hooks: Any
    validation: Any


@dataclass
class RootCall:
    """One call of the root module inside a micro-batch."""

    module: nn.Module
    args: tuple
    kwargs: dict
    rng: tuple[Tensor, list[Tensor]]
    autocast: list[tuple[str, torch.dtype]] = field(default_factory=list)
    """The device types (and dtypes) autocast was on for when the call started."""
    outputs: list[Tensor] = field(default_factory=list)
    """The batched output tensors (leading dimension = the micro-batch), detached."""
    grads: list[Tensor | None] = field(default_factory=list)
    """The user's backward's gradient of each batched output (``None`` if none arrived)."""
    positions: list[int] = field(default_factory=list)
    """Which of the output's batched float tensors are :attr:`outputs` (those with a gradient)."""
    random: bool = False
    """The call drew random numbers (dropout): it cannot be re-run on part of the batch alike."""
    buffers_before: dict[str, Tensor] = field(default_factory=dict)
    """The buffers the call changed in place (``spectral_norm``'s power iteration), as they were
    before it: the replay starts from them."""
    segments: Segments | None = None
    """The micro-batch's documents: players are documents, and an output's positions carry them."""

    def player_weights(self, w: Tensor, like: Tensor) -> Tensor:
        """``[players]`` weights shaped to multiply an output gradient ``like`` (row by row, or
        position by position with documents)."""
        if self.segments is None:
            return _rows(w, like)
        if not self.segments.matches(like):
            raise UnsupportedModuleError(
                f"an output of the model, {tuple(like.shape)}, does not have the [rows, tokens] = "
                f"{list(self.segments.shape)} positions of segments, so its gradient cannot be split by "
                "document: with segments, every output of the model with a batch dimension must have "
                "one position per token (the logits), and the loss must be a sum of per-token terms"
            )
        return self.segments.position_weights(w, like)

    def replay(self) -> list[Tensor]:
        """The batched outputs of the call run again (with a graph), in the same order. Run it
        inside :func:`buffers_kept` (after every backward through it) so that running statistics
        the forward updates are put back."""
        out = self.rerun(self.args, self.kwargs)
        return batched_leaves(out, self.outputs[0].shape[0] if self.outputs else None)

    def rerun(self, args: tuple, kwargs: dict, forward: Callable[..., Any] | None = None) -> Any:
        """The call's module (or ``forward``, e.g. a functional call of it) on ``args`` and ``kwargs``
        as the call ran: its random numbers, autocast, checkpoints inlined, buffers as they were
        before it (inside :func:`buffers_kept`)."""
        devices = list(range(len(self.rng[1])))
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.rng[0])
            for i, state in enumerate(self.rng[1]):
                torch.cuda.set_rng_state(state, i)
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            stack.enter_context(inline_checkpoints())
            restore_buffers(self.module, self.buffers_before)
            return (forward or self.module)(*args, **kwargs)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """The module's buffers as they were when the block started (only changed ones are written,
    after the block, so a backward inside it still finds the tensors its graph saved)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in saved:
                if not torch.equal(b, before):
                    b.copy_(before)


class BufferWatch:
    """The buffers a module's forward changes in place (``spectral_norm``'s power-iteration
    vectors, running statistics), and their values before a call, so that a replay of the call
    starts where the call started. Which buffers change is learned from the module's first call
    (every buffer is copied once); after that only those are copied, per call."""

    def __init__(self) -> None:
        self.changing: dict[int, set[str]] = {}

    def before(self, module: nn.Module) -> tuple[dict[str, tuple[int, int]], dict[str, Tensor]]:
        """Before a call: each buffer's identity and version, and copies of those it may change."""
        buffers = dict(module.named_buffers())
        names = self.changing.get(id(module), buffers.keys())
        return ({n: (id(b), b._version) for n, b in buffers.items()},
                {n: buffers[n].detach().clone() for n in names if n in buffers})

    def changed(self, module: nn.Module, seen: tuple[dict[str, tuple[int, int]], dict[str, Tensor]]) -> dict[str, Tensor]:
        """After the call: the buffers it changed, with their values before it."""
        versions, copies = seen
        now = {n: (id(b), b._version) for n, b in module.named_buffers()}
        changed = {n for n, v in now.items() if versions.get(n) != v}
        self.changing[id(module)] = self.changing.get(id(module), set()) | changed
        return {n: copies[n] for n in changed if n in copies}


def restore_buffers(module: nn.Module, values: dict[str, Tensor]) -> None:
    """Put buffers back to the values a call started from (inside :func:`buffers_kept`)."""
    with torch.no_grad():
        for name, value in values.items():
            module.get_buffer(name).copy_(value)


def replayed_targets(call: RootCall) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """The call replayed: ``(output, the user's gradient of it)`` for the outputs the gradient of
    the loss reaches the parameters through (see :func:`inrun.tracking.rows.outputs_cut`), and
    every batched output of the replay."""
    outputs = call.replay()
    if len(outputs) != len(call.outputs):
        raise ReplayMismatch("the replay returned other outputs")
    inputs = [x for x in tree_flatten((call.args, call.kwargs))[0] if isinstance(x, Tensor)]
    cut = outputs_cut(outputs, inputs) if len(outputs) > 1 else [True] * len(outputs)
    return [(t, g) for t, g, keep in zip(outputs, call.grads, cut) if keep and g is not None], outputs


class ReplayMismatch(Exception):
    """A replay's outputs differ from the call's."""


def batched_leaves(output: Any, batch: int | None) -> list[Tensor]:
    """The tensors of an output structure whose leading dimension is the batch."""
    leaves, _ = tree_flatten(output)
    return [
        t for t in leaves
        if isinstance(t, Tensor) and t.dim() > 0 and t.is_floating_point() and (batch is None or t.shape[0] == batch)
    ]


class RootCalls:
    """Hooks on the root module that keep its calls while armed.

    Armed for a micro-batch of ``B`` ids, every call is checked to have outputs with ``B`` rows
    (the ids match the batch) and its inputs and random-number state are kept; the gradient the
    user's backward sends to its outputs is kept only if ``wanted()`` says so when it arrives (a
    model's output gradient can be as large as its logits), and the outputs themselves only if
    ``wanted()`` or ``outputs_read()`` (the per-step probe's micro-batch) says so then: otherwise
    each is replaced by a tensor of its shape without storage, so the backward's peak does not
    hold the logits.
    """

    def __init__(self, module: nn.Module, wanted: Callable[[], bool] = lambda: True,
                 on_call: Callable[[tuple, dict], None] | None = None,
                 after_call: Callable[[], None] | None = None,
                 outputs_read: Callable[[], bool] = lambda: True) -> None:
        self.module = module
        self.wanted = wanted
        self.outputs_read = outputs_read
        self.on_call = on_call
        """Told each armed call's inputs as it starts (before its backward)."""
        self.after_call = after_call
        """Told when an armed call's forward has ended."""
        self.batch: int | None = None
        self.segments: Segments | None = None
        self.calls: list[RootCall] = []
        self.storages: set[int] = set()
        """Storages of the current micro-batch's model inputs (what depends on the batch)."""
        self._starting: list[RootCall] = []
        self._buffers: list[tuple[dict[str, tuple[int, int]], dict[str, Tensor]]] = []
        self.watch = BufferWatch()
        self.coupling: Any = None
        """Told the model's batched outputs (:class:`inrun.tracking.coupled.CouplingWatch`)."""
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def arm(self, batch: int, segments: Segments | None = None) -> None:
        self.batch, self.segments, self.calls, self._starting, self._buffers = batch, segments, [], [], []
        self.storages.clear()

    def disarm(self) -> list[RootCall]:
        calls, self.batch, self.segments, self.calls = self.calls, None, None, []
        self._starting, self._buffers = [], []
        return calls

    @property
    def armed(self) -> bool:
        return self.batch is not None

    def inside(self) -> bool:
        """Whether a call of the model is running now."""
        return bool(self._starting)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling() or self.batch is None or not torch.is_grad_enabled():
            return
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        rng = (torch.get_rng_state(), cuda)
        if self.on_call is not None:
            self.on_call(args, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        self.storages.update(x.untyped_storage().data_ptr() for x in leaves if isinstance(x, Tensor))
        caches = [x for x in leaves if is_kv_cache(x)]
        if caches:
            if any(c.get_seq_length() > 0 for c in caches):
                raise UnsupportedModuleError(
                    f"{type(module).__name__} was called with a key/value cache that already holds positions "
                    "(past_key_values): its forward writes to the cache, so the call cannot be replayed to prove "
                    "which example each row belongs to. Train without a prefilled cache (use_cache=False)."
                )
            args, kwargs = tree_unflatten(without_caches(leaves), spec)  # replays: an empty cache is none
        self._starting.append(RootCall(module, args, dict(kwargs), rng, autocast, segments=self.segments))
        self._buffers.append(self.watch.before(module))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.compiler.is_compiling() or self.batch is None or not self._starting:
            return
        call = self._starting.pop()
        call.buffers_before = self.watch.changed(module, self._buffers.pop())
        call.random = not torch.equal(torch.get_rng_state(), call.rng[0]) or any(
            not torch.equal(torch.cuda.get_rng_state(i), state) for i, state in enumerate(call.rng[1]))
        leaves = batched_leaves(output, self.batch)
        call.positions = [i for i, t in enumerate(leaves) if t.requires_grad]
        outputs = [leaves[i] for i in call.positions]
        if not outputs:
            rows = sorted({t.shape[0] for t in batched_leaves(output, None) if t.requires_grad})
            if not rows:
                scalar = any(isinstance(t, Tensor) and t.dim() == 0 and t.requires_grad for t in tree_flatten(output)[0])
                raise UnsupportedModuleError(
                    f"{type(module).__name__}'s forward returned "
                    f"{'only a scalar (a loss)' if scalar else 'no differentiable tensor with a row per example'}: "
                    "the tracker credits each example through its rows of the model's outputs and proves them "
                    "by replaying the call. Return the per-example outputs the loss is computed from as well, "
                    "e.g. `return loss, logits` or an output with `.logits`."
                )
            raise BatchMismatchError(
                f"the model's outputs have {rows or 'no'} row(s) but the step has {self.batch} ids: pass "
                "exactly one id per row of the batch (per-example values need the model's outputs to "
                "have one row per example, batch first)"
            )
        if self.segments is not None and not any(self.segments.matches(t) for t in outputs):
            raise BatchMismatchError(
                f"segments is {list(self.segments.shape)} (rows, tokens) but no output of the model has "
                f"those positions ({[list(t.shape) for t in outputs]}): give segments one entry per token "
                "of the model's output (the logits' first two dimensions)"
            )
        if self.coupling is not None:
            for t in outputs:
                self.coupling.output(t)
        call.outputs = [t.detach() for t in outputs]
        call.grads = [None] * len(outputs)
        for k, t in enumerate(outputs):
            source = cast_source(t)
            if source is None:
                t.register_hook(self._keeper(call, k, t.dtype))
            else:
                node, index = source
                node.register_prehook(self._node_keeper(call, k, t.dtype, index))
        self.calls.append(call)
        if self.after_call is not None:
            self.after_call()

    def _keeper(self, call: RootCall, k: int, dtype: torch.dtype) -> Any:
        def keep(grad: Tensor) -> None:
            if self.wanted():
                call.grads[k] = grad.detach().to(dtype)
            elif not self.outputs_read():
                out = call.outputs[k]
                call.outputs[k] = torch.empty((), dtype=out.dtype, device=out.device).expand(out.shape)

        return keep

    def _node_keeper(self, call: RootCall, k: int, dtype: torch.dtype, index: int) -> Any:
        keep = self._keeper(call, k, dtype)

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if grad_outputs[index] is not None:
                keep(grad_outputs[index])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def cast_source(t: Tensor) -> tuple[Any, int] | None:
    """The autograd node (and its output index) of the tensor that ``t`` is a dtype cast of, when
    the model's output is a cast copy: Accelerate's ``convert_outputs_to_fp32`` (``bf16=True``,
    ``fp16=True``) and FSDP2's ``output_dtype`` return ``logits.float()`` while a loss computed
    inside the model reads the 16-bit logits, so no gradient reaches the copy. The gradient of
    the source (every use of it, the copy's included) is what the user's backward sent to the
    model's output; cast to ``t``'s dtype it is exactly the gradient the copy would pass back.
    ``None`` when ``t`` is not a cast."""
    node, index = t.grad_fn, 0
    found = None
    while node is not None and type(node).__name__ == "ToCopyBackward0":
        parent, index = node.next_functions[0]
        if parent is None or type(parent).__name__ == "AccumulateGrad":
            break
        node = found = parent
    return None if found is None else (found, index)


def weighted_gradients(
    calls: Sequence[RootCall], params: Sequence[Tensor], weights: Tensor,
) -> list[Tensor]:
    """Per parameter ``[R, *shape]``: ``Σ_z weights[r, z] g_z`` for each row ``r`` of ``weights``
    (``[R, B]``), summed over the micro-batch's root calls, by replay and plain autograd."""
    R = weights.shape[0]
    total = [torch.zeros((R, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    for call in calls:
        if not any(g is not None for g in call.grads):
            continue
        with torch.enable_grad(), buffers_kept(call.module):
            targets, _ = replayed_targets(call)
            for r in range(R):
                grads = torch.autograd.grad(
                    [t for t, _ in targets], list(params),
                    grad_outputs=[g * call.player_weights(weights[r], g) for _, g in targets],
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
