"""The fallback: exact per-example dots for any module, as directional derivatives.

For parameters ``θ_M`` of a module and a direction ``u``, ``<g_z, u> = d/dε L_z(θ + εu)``, and by
the chain rule that is the forward-mode derivative of the module's outputs along ``u`` (a JVP),
contracted per example with the gradient the backward sent to those outputs:
``<g_z, u> = Σ_{outputs o} Σ_{rows of z} (∂L/∂o) ⊙ (J_o u)``. One JVP per contraction vector
re-runs the module's forward on the inputs it was called with (the same random numbers, its
buffers copied so running statistics are not touched): no per-example loop, no per-example
gradient in memory, any output structure (tuples, dicts) and any computation inside (routing,
slicing, attention across the positions of one example). Its cost is about three forwards of
the module per contraction.

A module's parameters are valued *jointly*: one JVP along all of them, the tracker giving each its
step's weight (learning rate, Adam's slope) in the direction, and checking the module as one
group. It values a module's own parameters (an unknown module), and, as a *site*, the parameters of
modules inside it whose own calls do not carry the batch (flattened or routed rows that are not
contiguous per example, broadcast tables whose consumer is not a broadcast, a weight used outside
its module's forward): those are valued where the batch is visible again.

Exact when each output row belongs to one example and examples do not interact inside the module
(checked by the tracker's row verification). Attention runs on its math backend and RNNs without
MKL-DNN here, since their fused kernels have no forward-mode derivative; where forward mode fails
anyway (``weight_norm``, a custom autograd Function without ``jvp``, a packed RNN) the JVP is the
derivative of a VJP (:func:`jvp_by_double_backward`); a module neither can differentiate is refused
with a one-line error naming it.

The call is replayed as it ran: buffers it changed in place (``spectral_norm``'s power iteration)
from their values before it, a reentrant activation checkpoint inline, a key/value cache it wrote
into left out (:func:`without_caches`).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModuleError
from .registry import LayerHandler, Rows, reduce_rows


@dataclass
class CallRecord:
    """One call of a module: its inputs, the random-number state it started from, its outputs'
    row maps, and (for deferred contractions) the module's tensors at the time of the call."""

    leaves: list[Any]
    spec: Any
    rng: Tensor | None
    rows: list[Rows | None]
    state: dict[str, Tensor] | None = None
    outputs: list[int] | None = None
    """Positions, among the output's leaves, of the tensors ``rows`` and the gradients refer to."""
    buffers_before: dict[str, Tensor] = field(default_factory=dict)
    """Buffers the call changed in place (``spectral_norm``'s power iteration), as they were before
    it: the replay starts from them."""


class JVPHandler(LayerHandler):
    name = "fallback"
    multi_output = True
    replays_calls = True

    def __init__(self) -> None:
        self.no_forward_mode: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        """Modules with an op that has no forward-mode formula: their JVPs go by double backward
        from the first failure on (not tried in forward mode at every call)."""

    def batch_dims(self, module: nn.Module, n_outputs: int) -> list[int] | None:
        """RNNs: ``batch_first`` for the output, dimension 1 for the hidden states;
        ``nn.MultiheadAttention``: ``batch_first`` for the output, 0 for the attention weights."""
        first = getattr(module, "batch_first", None)
        if isinstance(module, nn.RNNBase):
            return [0 if first else 1] + [1] * (n_outputs - 1)
        if isinstance(module, nn.MultiheadAttention):
            return [0 if first else 1] + [0] * (n_outputs - 1)
        return None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> CallRecord:
        """The call's inputs, detached; a key/value cache the call wrote into is left out (see
        :func:`without_caches`)."""
        leaves, spec = tree_flatten((args, kwargs))
        return CallRecord([x.detach() if isinstance(x, Tensor) else x for x in without_caches(leaves)], spec, None, [])

    def keep(self, module: nn.Module, saved: CallRecord) -> CallRecord:
        """The call read again after the optimizer step: keep the module's tensors as they were."""
        saved.state = _detached(module, copy=True)
        return saved

    def dot(
        self, module: nn.Module, saved: CallRecord, grad_out: Sequence[Tensor | None], vectors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """``{first name: [B, K]}``: the dots of all the given parameters *together*, one JVP per
        column along all of them at once (a module's parameters are valued jointly; the tracker
        weights the vectors by each parameter's step before it calls this, and checks the module
        as one group)."""
        args, kwargs = tree_unflatten(saved.leaves, saved.spec)
        current = saved.state if saved.state is not None else _detached(module)
        current = {**current, **saved.buffers_before}
        buffers = {n for n, _ in module.named_buffers()}
        tied = _tied_names(module)
        names = list(vectors)
        along = {n for name in names for n in tied.get(name, {name})}
        primal = {n: current[n] for n in names}
        # One name per tied tensor: functional_call ties the others to it (the tangents' other
        # names take the dual that way).
        rest = {n: t for n, t in current.items() if n not in along and n == min(tied.get(n, {n}))}
        tangents = {n: _without_padding_rows(module, tied.get(n, {n}), vectors[n]) for n in names}

        def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            # Fresh copies of the buffers at every run: a forward that updates them in place
            # (running statistics, spectral_norm's power iteration) starts where the call started.
            state = {**rest, **{n: t.clone() for n, t in rest.items() if n in buffers}, **p}
            leaves = tree_flatten(functional_call(module, state, args, kwargs, strict=False))[0]
            return tuple(leaves[i] for i in saved.outputs)

        like = next(iter(vectors.values()))
        cols = []
        for k in range(like.shape[0]):
            tangent = {n: tangents[n][k].to(primal[n].dtype) for n in names}
            with _replaying(saved.rng):
                tangent_out = self.directional_derivative(module, f, primal, tangent)
            cols.append(contract_outputs(tangent_out, grad_out, saved.rows, like))
        return {names[0]: torch.stack(cols, dim=1)}


    def directional_derivative(
        self, module: nn.Module, f: Callable[[dict[str, Tensor]], tuple[Tensor, ...]], primal: dict[str, Tensor],
        tangent: dict[str, Tensor],
    ) -> tuple[Tensor, ...]:
        """``J v``: the derivative of ``f``'s outputs at ``primal`` along ``tangent``. Forward mode
        where torch has a formula for every op; otherwise (``weight_norm``, a custom autograd
        Function without ``jvp``, a packed RNN) the derivative of a VJP, which needs none."""
        if module not in self.no_forward_mode:
            try:
                return jvp(f, (primal,), (tangent,))[1]
            except (NotImplementedError, RuntimeError) as exc:
                forward_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.no_forward_mode.add(module)
        else:
            forward_error = "no forward-mode formula"
        try:
            return jvp_by_double_backward(f, primal, tangent)
        except (NotImplementedError, RuntimeError) as exc:
            self.no_forward_mode.discard(module)
            raise UnsupportedModuleError(
                f"the fallback could not take the directional derivative of {type(module).__name__} "
                f"(forward mode: {forward_error}; double backward: {str(exc).splitlines()[0]}). Register a "
                "handler for it with inrun.layers.register_handler, or freeze its parameters."
            ) from exc


def jvp_by_double_backward(
    f: Callable[[dict[str, Tensor]], tuple[Tensor, ...]], primal: dict[str, Tensor], tangent: dict[str, Tensor],
) -> tuple[Tensor, ...]:
    """``J v = d/du [(Jᵀ u) · v]``: a VJP with a free cotangent ``u`` is linear in ``u``, and its
    dot with ``v`` has ``J v`` as its gradient in ``u``. A forward, a backward that keeps its
    graph, and a backward of that: about twice the cost of forward mode, for any op whose
    backward autograd can differentiate.

    A backward autograd cannot differentiate (``once_differentiable``, a ``detach`` inside)
    would drop its part silently; by linearity ``(J v) · u = (Jᵀ u) · v`` at the random ``u``
    used here, and a dropped part breaks that identity: it raises instead (a part too small for
    the identity's tolerance is left to the row verification and the per-step check)."""
    with torch.enable_grad():
        params = {n: t.detach().requires_grad_(True) for n, t in primal.items()}
        outputs = f(params)
        gen = torch.Generator(device=outputs[0].device).manual_seed(0)  # not the call's random stream
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device).requires_grad_(True)
                      for o in outputs]
        vjp = torch.autograd.grad(outputs, list(params.values()), grad_outputs=cotangents, create_graph=True,
                                  allow_unused=True)
        used = [(g, tangent[n]) for n, g in zip(params, vjp) if g is not None]
        terms = [(g * v).sum() for g, v in used]
        if not terms:
            return tuple(torch.zeros_like(o) for o in outputs)
        value = torch.stack(terms).sum()
        grads = (torch.autograd.grad(value, cotangents, allow_unused=True) if value.requires_grad
                 else [None] * len(outputs))
    jv = tuple(torch.zeros_like(o) if g is None else g.detach() for o, g in zip(outputs, grads))
    with torch.no_grad():
        back = sum((j * u).sum() for j, u in zip(jv, cotangents))
        scale = sum((g.abs() * v.abs()).sum() for g, v in used) + sum((j * u).abs().sum() for j, u in zip(jv, cotangents))
        # Loose enough for modules that compute in float32 inside a float64 model (RecurrentGemma's
        # scan): a dropped part is a share of the whole, rounding is not.
        rtol = {torch.float64: 1e-5, torch.float32: 1e-3}.get(value.dtype, 5e-2)
        if (back - value).abs() > rtol * scale + 1e-30:
            raise RuntimeError("the backward of an op inside cannot be differentiated (once_differentiable?)")
    return jv


def is_kv_cache(x: Any) -> bool:
    """A Hugging Face key/value (or recurrent-state) cache: ``transformers.cache_utils.Cache``."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(x, cache_utils.Cache)


def without_caches(leaves: list[Any]) -> list[Any]:
    """A call's input leaves with each key/value cache replaced by ``None``.

    A Hugging Face model trained with ``use_cache`` on (the default of many configs) hands every
    layer a cache that the layer's forward *writes* (keys appended, convolution and recurrent
    states stored); a replay of the call with the same cache object would append again and see
    its own keys. In a training forward the cache a layer receives is empty for that layer (the
    model made it for this call, or the caller gave an empty one: :class:`~inrun.tracking.replay.
    RootCalls` refuses others), and a layer with an empty cache computes exactly what it computes
    with none; the row verification checks the replay against exact per-example gradients."""
    return [None if is_kv_cache(x) else x for x in leaves]


def contract_outputs(
    tangents: Sequence[Any], grads: Sequence[Tensor | None], rows: Sequence[Rows | None], like: Tensor,
) -> Tensor:
    """``[B]``: ``Σ_outputs Σ_{rows of z} grad ⊙ tangent`` per example; with ``segmented`` rows
    ``[B·T]`` per position (the caller sums them by document, or keeps them as token values)."""
    total: Tensor | None = None
    for t, g, r in zip(tangents, grads, rows):
        if g is None or r is None or not isinstance(t, Tensor):
            continue
        per_row = (t.to(like.dtype) * g.to(like.dtype))
        if r.dim:
            per_row = per_row.movedim(r.dim, 0)
        if r.kind == "segmented":
            part = per_row.reshape(r.index.numel(), -1).sum(dim=1)  # (B·T,)
        else:
            part = reduce_rows(per_row.reshape(per_row.shape[0], -1).sum(dim=1, keepdim=True), r)[:, 0]
        total = part if total is None else total + part
    if total is None:
        # No gradient reached the call's outputs (a pooler whose output the loss does not read):
        # no example's loss depends on its parameters through this call.
        batch = next((r.index.numel() if r.kind == "segmented" else r.batch for r in rows if r is not None), None)
        if batch is None:
            raise UnsupportedModuleError("no output of the module has a batch dimension")
        return torch.zeros(batch, dtype=like.dtype, device=like.device)
    return total


def _detached(module: nn.Module, copy: bool = False) -> dict[str, Tensor]:
    """Every parameter and buffer by every name, detached (copied), tied names sharing one tensor."""
    made: dict[int, Tensor] = {}
    items = [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
    return {n: made.setdefault(id(t), t.detach().clone() if copy else t.detach()) for n, t in items}


def _without_padding_rows(module: nn.Module, names: set[str], U: Tensor) -> Tensor:
    """An embedding's ``padding_idx`` row gets no gradient by definition (autograd zeroes it),
    although the forward depends on it: the directional derivative must not move it either."""
    for name in names:
        owner = module.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, nn.Embedding) and owner.padding_idx is not None and name.endswith("weight"):
            U = U.clone()
            U[:, owner.padding_idx] = 0
    return U


def _tied_names(module: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> every name of the same tensor (tied embeddings and heads)."""
    by_id: dict[int, set[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    return {n: names for names in by_id.values() for n in names}


@contextlib.contextmanager
def _replaying(rng: Tensor | None) -> Iterator[None]:
    """The module's call again: its random numbers, and kernels that have a forward derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mkldnn = torch._C._get_mkldnn_enabled()  # its fused RNN has no forward derivative
    torch._C._set_mkldnn_enabled(False)
    try:
        with torch.random.fork_rng(devices=[]), sdpa_kernel([SDPBackend.MATH]), inline_checkpoints():
            if rng is not None:
                torch.set_rng_state(rng)
            yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)


class _InlineCheckpoint:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` during a replay: the function
    called as it is (what the checkpoint's forward computes, and what its backward recomputes)."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            with torch.no_grad():  # a reentrant checkpoint passes no gradient then
                return function(*args)
        return function(*args)


@contextlib.contextmanager
def inline_checkpoints() -> Iterator[None]:
    """Reentrant ``torch.utils.checkpoint`` (and HF's ``use_reentrant=True``) as plain calls while
    the tracker replays a call: its backward refuses ``torch.autograd.grad`` and it has no forward
    derivative; run inline, it computes the same outputs with an ordinary graph."""
    import torch.utils.checkpoint as checkpointing

    original = checkpointing.CheckpointFunction
    checkpointing.CheckpointFunction = _InlineCheckpoint  # type: ignore[misc]
    try:
        yield
    finally:
        checkpointing.CheckpointFunction = original  # type: ignore[misc]


FALLBACK = JVPHandler()
