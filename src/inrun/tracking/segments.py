"""Documents in packed sequences: a micro-batch's players are its documents, not its rows.

``tracker.step(ids, segments=seg)``: ``seg [B, T]`` integers, for every token the index into
``ids`` of the document it belongs to (``-1``: none, e.g. padding). Every tracked call then keeps
its per-position terms apart (``segmented`` rows, :class:`inrun.layers.Rows`) and sums them by
document (:func:`inrun.layers.registry.reduce_rows`) where it would have summed them by row:

* a position-wise handler (linear, embedding, per-token norms; :meth:`LayerHandler.splits_positions`)
  sees the call flattened to ``[B·T, ...]``, one row per position, on every route (vector, Gram);
* a call whose rows are already positions (experts: ``[B·T, d]``) is summed as it is;
* the fallback contracts each output position with its gradient (:func:`contract_outputs`);
* any other call cannot be split by position and is valued at an enclosing site (the row
  verification moves it), as a call whose rows are not its examples is.

Why a document's value is then exact, and when: a parameter's gradient of document ``d``'s loss
is ``Σ_t J_tᵀ ∂L_d/∂out_t`` over a call's output positions ``t``. When the model keeps documents
apart (block-diagonal attention), ``∂L_d/∂out_t`` is the gradient the backward delivered at ``t``
if ``t`` belongs to ``d``, and zero otherwise, so the per-position terms summed over ``d``'s
positions are ``d``'s own. When documents attend to each other (EOS-only packing), a position's
output gradient carries later documents' losses too, and the split is wrong (57% on a tiny
Llama). Isolation is therefore proven, not assumed: the row verification
(:mod:`inrun.tracking.plan`) weights each output position's gradient by a random weight of its
document and compares the ghost dots with the exact ``Σ_d w_d g_d`` through the replay. A call
whose terms mix documents fails and moves to an enclosing module, up to one whose output
positions each reach the loss on their own (the model's trunk before a position-wise head): there
the fallback's directional derivative of each document's loss along ``g_val`` is exact for any
attention pattern. :meth:`InRunShapley.coverage` says which parameters were valued that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BatchMismatchError, UnsupportedModuleError
from ..layers import Rows


@dataclass
class Segments:
    """The documents of one micro-batch, on the model's device."""

    index: Tensor
    """``[B·T]`` long: the player of every position (row-major), ``count`` for no document."""
    shape: tuple[int, int]
    count: int
    several: bool
    """Some row holds two documents or more (their isolation must be proven)."""

    @property
    def rows(self) -> Rows:
        return Rows("segmented", self.count, 0, self.index)

    @property
    def positions(self) -> int:
        return self.index.numel()

    def matches(self, t: Tensor, dim: int = 0) -> bool:
        """``t`` has the micro-batch's ``[B, T]`` positions at dimensions ``dim, dim + 1``."""
        return t.dim() >= dim + 2 and tuple(t.shape[dim:dim + 2]) == self.shape

    def position_weights(self, w: Tensor, like: Tensor) -> Tensor:
        """``[players]`` weights shaped to multiply an output ``[B, T, ...]`` position by position
        (positions of no document get 0)."""
        full = torch.cat([w.to(device=like.device, dtype=like.dtype), like.new_zeros(1)])
        return full[self.index.to(like.device)].reshape(*self.shape, *([1] * (like.dim() - 2)))

    def split(self, rows: list[Rows | None], leaves: list[Tensor]) -> list[Rows | None]:
        """Each output's row map made a position map (``None``: its positions are not the
        micro-batch's tokens): batched ``[B, T, ...]`` (after its batch dimension is moved to the
        front; a shared output once expanded to the batch), or ``[B·T, ...]`` (blocked)."""
        out: list[Rows | None] = []
        for r, t in zip(rows, leaves):
            shape: tuple[int, ...] | None = None
            if r is None:
                pass
            elif r.kind == "blocked":
                shape = (self.positions,) if t.shape[0] == self.positions else None
            elif r.kind == "broadcast":
                shape = (self.shape[0], *t.shape[1:])
            elif r.kind == "unbatched":
                shape = (self.shape[0], *t.shape)
            else:
                moved = list(t.shape)
                moved.insert(0, moved.pop(r.dim))
                shape = tuple(moved)
            ok = shape is not None and (shape[0] == self.positions if r.kind == "blocked"
                                        else len(shape) >= 2 and tuple(shape[:2]) == self.shape)
            dim = r.dim if ok and r.kind == "batched" else 0
            out.append(Rows("segmented", self.count, dim, self.index) if ok else None)
        return out

    def flatten_positions(self, saved: Tensor, handler: Any, module: Any) -> Tensor | None:
        """A call's input ``[B|1, T, ...]`` (batch first) as ``[B·T, ...]``, one row per position,
        when its handler treats positions on their own (``None`` otherwise)."""
        if saved.dim() < 2 or saved.shape[1] != self.shape[1] or saved.shape[0] not in (1, self.shape[0]):
            return None
        if not handler.splits_positions(module, saved):
            return None
        return saved.expand(self.shape[0], *saved.shape[1:]).flatten(0, 1)

    def to_numpy(self) -> np.ndarray:
        """``[B, T]`` the segments as given (``-1``: no document); a host transfer (token values)."""
        index = self.index.cpu().numpy().reshape(self.shape)
        return np.where(index == self.count, -1, index).astype(np.int64)

    def layout(self) -> tuple:
        """What the row verification proves about the documents' layout: whether a row holds
        several of them (one document per row needs no isolation)."""
        return ("segments", self.several)


def admit_documents(segments: Any, ids: list, device: torch.device, token_values: bool) -> Segments | None:
    """A micro-batch's ``segments`` (``None``: a player per row) and whether it may ask for token values."""
    if token_values and segments is None:
        raise BatchMismatchError(
            "token_values=True needs segments (which document each token belongs to); for one "
            "document per row pass segments=torch.arange(B)[:, None].expand(B, T), -1 at padding"
        )
    return None if segments is None else admit_segments(segments, ids, device)


def admit_segments(segments: Any, ids: list, device: torch.device) -> Segments:
    """``segments`` checked against ``ids``: a ``[B, T]`` integer tensor (or array) with values in
    ``[-1, len(ids))`` and every id given at least one token. One host transfer."""
    seg = torch.as_tensor(segments)
    if seg.dtype in (torch.bool,) or seg.is_floating_point() or seg.is_complex():
        raise BatchMismatchError(
            f"segments must be an integer tensor (the index into ids of each token's document, -1 for "
            f"none), got dtype {seg.dtype}"
        )
    if seg.dim() != 2:
        raise BatchMismatchError(
            f"segments must be [batch, tokens] (one document index per token), got shape {tuple(seg.shape)}"
        )
    n = len(ids)
    flat = seg.reshape(-1).to(device=device, dtype=torch.long)
    valid = flat >= 0
    counts = torch.zeros(n + 1, dtype=torch.long, device=device).index_add_(
        0, torch.where(valid, flat + 1, 0).clamp(max=n), torch.ones_like(flat))
    rows = flat.reshape(seg.shape)
    big = torch.iinfo(torch.long).max
    row_min = torch.where(rows >= 0, rows, big).amin(dim=1)
    several = ((rows.amax(dim=1) > row_min) & (row_min < big)).any()
    lo, hi, empty, many = torch.stack([
        flat.min(), flat.max(), (counts[1:] == 0).sum(), several.long(),
    ]).tolist() if flat.numel() else (0, -1, n, 0)
    if lo < -1 or hi >= n:
        raise BatchMismatchError(
            f"segments holds {lo if lo < -1 else hi}, but each value must index ids ({n} of them) or be "
            "-1 (no document)"
        )
    if empty:
        missing = ids[int(torch.nonzero(counts[1:] == 0)[0])]
        raise BatchMismatchError(
            f"id {missing!r} has no token in segments: give every id of the step at least one token "
            "(segments[b, t] = its index in ids), or leave it out of ids"
        )
    index = torch.where(valid, flat, n)
    return Segments(index, (int(seg.shape[0]), int(seg.shape[1])), n, bool(many))


def input_layout(args: tuple, kwargs: dict) -> tuple:
    """The kind of inputs a model call was given (which keyword arguments, scalar settings such as
    ``use_cache``): documents are kept apart by them, so a new kind is verified again."""
    named = tuple(sorted(
        (k, v if isinstance(v, (bool, int, str)) else type(v).__name__)
        for k, v in kwargs.items() if v is not None
    ))
    return ("inputs", len(args), named)


def merge_by_id(ids: list, first: np.ndarray, second: np.ndarray | None) -> tuple[list, np.ndarray, np.ndarray | None]:
    """One row per id: a document that spans micro-batches of one step is one player, its parts'
    values added (every value rule is linear in a player's gradient)."""
    position: dict[Any, int] = {}
    inverse = np.fromiter((position.setdefault(i, len(position)) for i in ids), dtype=np.int64, count=len(ids))
    if len(position) == len(ids):
        return ids, first, second

    def add(v: np.ndarray | None) -> np.ndarray | None:
        if v is None:
            return None
        out = np.zeros((len(position), *v.shape[1:]), dtype=v.dtype)
        np.add.at(out, inverse, v)
        return out

    return list(position), add(first), add(second)


def token_values_of(window: Any) -> list:
    """The token values of the window's micro-batches that asked for them (at ``optimizer.step()``,
    once its coefficients are known); their per-position buffers are freed."""
    from .tokens import TokenRecord

    out = []
    for mb in window.micro:
        if mb.tokens_weighted is None:
            continue
        values = mb.tokens_weighted
        if window.coef is not None:
            values = values + torch.einsum("p,pnk->nk", window.coef.to(values), mb.tokens)
        flat = values.sum(dim=1).cpu().numpy()
        out.append(TokenRecord(window.step, list(mb.ids), mb.segments.to_numpy(),
                               flat.reshape(mb.segments.shape)))
        mb.tokens = mb.tokens_weighted = None
    return out


def documents_note(entries: list, plan: Any) -> str:
    """How this run's documents were valued (for :meth:`InRunShapley.coverage`)."""
    kept_apart = any(k[:2] == ("segments", True) for k in plan.verified if isinstance(k, tuple))
    sites = sorted({e.name for e in entries if e.active and e.site_of})
    text = "each token's terms summed by document, proven by replay against per-document gradients"
    if kept_apart:
        text += "; rows hold several documents"
    if sites:
        text += ("; where a layer's token terms mix documents (documents attend to each other) or its rows "
                 "are not positions, the directional derivative of each document's loss at an enclosing "
                 "module: " + ", ".join(sites))
    return text


def mixed_documents(captures: list, seg: Segments, w: Tensor, rtol: float) -> dict[int, str]:
    """Calls whose output gradient at a token carries other documents' losses: the weighted
    backward (document ``d``'s loss times ``w_d``) must reach each position ``t`` of document ``d``
    with ``w_d`` times the plain backward's gradient there, position by position. This compares
    gradients, not dot products, so a small leak (a document attending to another a little) shows
    even where it moves a layer's dot by less than the per-step check's tolerance."""
    full = torch.cat([w, w.new_zeros(1)])
    out: dict[int, str] = {}
    for cap in captures:
        if cap.grad is None or cap.weighted_grad is None:
            continue
        if cap.entry.handler.multi_output:
            dims = [0 if r is None else r.dim for r in cap.saved.rows]
            pairs = [(g, v, d) for g, v, d in zip(cap.grad, cap.weighted_grad, dims)]
        else:
            pairs = [(cap.grad, cap.weighted_grad, 0)]
        for g, v, dim in pairs:
            if g is None or v is None:
                continue
            g = g.movedim(dim, 0).reshape(seg.positions, -1)
            v = v.movedim(dim, 0).reshape(seg.positions, -1)
            weights = full.to(g)[seg.index.to(g.device)].unsqueeze(1)
            if float((v - weights * g).norm()) > rtol * float(full.abs().max() * g.norm()) + 1e-300:
                out[cap.entry.index] = (
                    "its output gradient at a token carries other documents' losses (documents attend to "
                    "each other), so its terms cannot be split by document"
                )
    return out


def refuse_undocumented_gradient(grads: list[Tensor | None], segments: Segments) -> None:
    """Positions of no document (``-1``) get no value, so the loss must send them no gradient
    (``grads``: the model's output gradients)."""
    for g in grads:
        if g is not None and segments.matches(g):
            nowhere = 1 - segments.position_weights(torch.ones(segments.count), g)  # 1 at no document
            if bool((g.abs() * nowhere).sum() > 0):
                raise UnsupportedModuleError(
                    "the loss sends gradient to tokens of no document (segments = -1): nothing would "
                    "credit their part of the update. Leave them out of the loss (labels -100, a "
                    "mask), or give them a document in segments."
                )


def position_sink(tokens: Tensor, entry: Any) -> Any:
    """Adds a call's per-position dots into its parameters' rows of the token values."""

    def add(name: str, d: Tensor) -> None:
        tokens[entry.row(name)] += d.to(torch.float64)

    return add


def request_token_values(mb: Any, params: int, columns: int, device: torch.device) -> None:
    """The micro-batch keeps its per-position dots (:mod:`inrun.tracking.tokens`)."""
    positions = mb.segments.positions
    mb.tokens = torch.zeros(params, positions, columns, dtype=torch.float64, device=device)
    mb.tokens_weighted = torch.zeros(positions, columns, dtype=torch.float64, device=device)
