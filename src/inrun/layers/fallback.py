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
(checked by the tracker's row verification). Ops without a forward-mode derivative fail with a
clear error (attention runs on its math backend and RNNs without MKL-DNN here, since their fused
kernels have none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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


class JVPHandler(LayerHandler):
    name = "fallback"
    multi_output = True
    replays_calls = True

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
        leaves, spec = tree_flatten((args, kwargs))
        return CallRecord([x.detach() if isinstance(x, Tensor) else x for x in leaves], spec, None, [])

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
        buffers = {n for n, _ in module.named_buffers()}
        tied = _tied_names(module)
        names = list(vectors)
        along = {n for name in names for n in tied.get(name, {name})}
        primal = {n: current[n] for n in names}
        # One name per tied tensor: functional_call ties the others to it (the tangents' other
        # names take the dual that way).
        rest = {n: (t.clone() if n in buffers else t) for n, t in current.items()
                if n not in along and n == min(tied.get(n, {n}))}
        tangents = {n: _without_padding_rows(module, tied.get(n, {n}), vectors[n]) for n in names}

        def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            leaves = tree_flatten(functional_call(module, {**rest, **p}, args, kwargs, strict=False))[0]
            return tuple(leaves[i] for i in saved.outputs)

        like = next(iter(vectors.values()))
        cols = []
        for k in range(like.shape[0]):
            with _replaying(saved.rng):
                try:
                    _, tangent_out = jvp(f, (primal,), ({n: tangents[n][k].to(primal[n].dtype) for n in names},))
                except (NotImplementedError, RuntimeError) as exc:
                    raise UnsupportedModuleError(
                        f"the fallback could not take the forward-mode derivative of "
                        f"{type(module).__name__} ({str(exc).splitlines()[0]}). Register a handler for it "
                        "with inrun.layers.register_handler, or freeze its parameters."
                    ) from exc
            cols.append(contract_outputs(tangent_out, grad_out, saved.rows, like))
        return {names[0]: torch.stack(cols, dim=1)}


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
        raise UnsupportedModuleError("no output of the module received a gradient with a batch dimension")
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
        with torch.random.fork_rng(devices=[]), sdpa_kernel([SDPBackend.MATH]):
            if rng is not None:
                torch.set_rng_state(rng)
            yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)


FALLBACK = JVPHandler()
