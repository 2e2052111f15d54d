"""Routes: how one tracked call's per-example dot products are computed, and which route a
layer takes.

* vector: ``handler.dot`` with the contraction vectors (every handler has it), cost
  ``handler.vector_cost`` per position;
* Gram: the weight's dots from the training and validation factors (``gram_dot``), cost
  ``handler.gram_cost`` per position; for handlers that declare ``supports_gram``;
* book-keeping: per-example weight gradients inside the layer's backward, cost
  ``handler.bookkeeping_cost`` per example; for handlers that declare ``supports_bookkeeping``
  (see :mod:`inrun.tracking.bookkeeping`).

:func:`contract_call` is the one contraction kernel of the vector and Gram routes: the
immediate dots during backward and every deferred contraction (Adam, order 2) go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InRunError
from ..layers import FALLBACK, Rows
from ..layers.linear import GramFactors
from ..layers.parts import PartCall
from ..layers.registry import PerExampleGradients, reduce_rows
from .config import TrackerConfig
from .entries import Entry
from .state import Capture, Window

MAX_BOOKKEEPING_COLUMNS = 4
"""Book-keeping dots every per-example gradient with each validation column: beyond a few
columns the vector route's one projection per column is cheaper."""


def route_label(entry: Entry, gram: bool) -> str:
    if gram:
        return "gram"
    return "fallback" if entry.handler is FALLBACK else f"vector:{entry.handler.name}"


def contract_call(
    entry: Entry, saved: object, grad: Tensor, vectors: Mapping[str, Tensor], gram: Any | None,
    rows: Rows | None = None, positions: Callable[[str, Tensor], None] | None = None, part: PartCall | None = None,
) -> dict[str, Tensor]:
    """``{param name: [B, K]}`` dots of one call's per-example gradients with ``vectors``
    (``[K, *shape]`` by name); with ``gram`` the weight's dots take the Gram route (``K = 1``);
    ``rows``: how the call's rows map to examples (``None``: one row per example). With
    ``segmented`` rows, ``positions(name, [B·T, K])`` first receives each position's dots (token
    values) before they are summed by document. ``part``: what a linear part's call used
    (:mod:`inrun.layers.parts`)."""
    handler = entry.handler
    out: dict[str, Tensor] = {}
    names = entry.param_names
    if isinstance(grad, PerExampleGradients):  # condensed when kept (norms)
        out = grad.dots({n: vectors[n] for n in names})
    elif part is not None:
        out = handler.part_dots(entry.module, saved, grad, {n: vectors[n] for n in names}, gram, part)
    else:
        if gram is not None:
            out["weight"] = handler.gram_dots(entry.module, saved, grad, gram).unsqueeze(1)
            names = tuple(n for n in names if n != "weight")
        rest = {n: vectors[n] for n in names}
        if rest:
            out.update(handler.dot(entry.module, saved, grad, rest))
    if rows is not None and rows.kind == "segmented" and positions is not None:
        for n, d in out.items():
            positions(n, d)
    if rows is not None:
        out = {n: reduce_rows(d, rows) for n, d in out.items()}
    return out


def check_versions(cap: Capture) -> None:
    if any(t._version != v for t, v in cap.versions):
        raise InRunError(
            f"the input of {cap.entry.name} was modified in place after its forward, before the "
            "step's values were complete (order 2, Adam and the fallback read each layer's input "
            "after the backward)"
        )


def contract_window(
    window: Window, n_params: int, vectors: list[Tensor], gram: Mapping[int, GramFactors] | None = None,
    coef: Tensor | None = None, record_route: bool = False, joint: bool | None = None, tokens: bool = False,
) -> Tensor:
    """``[P, B, K]`` dots of the window's kept per-example factors with per-parameter vectors.

    With ``gram`` (validation factors by entry) and ``coef`` (``vectors[p] = coef[p] · g``), a
    layer with factors takes its weight's dots by the Gram route instead, times ``coef``.
    ``joint``: only the calls of modules valued jointly (``True``), or only the others (``False``).
    A jointly valued module's dots are in the row of its first parameter. ``tokens``: the
    contraction is a first-order value (its vectors weighted by the step): add each position's
    dots to the token values of micro-batches that asked for them.
    """
    K = vectors[0].shape[0]
    parts = []
    for mb in window.micro:
        out = torch.zeros(n_params, mb.size, K, dtype=torch.float64, device=mb.dots.device)
        for cap in mb.captures:
            if cap.grad is None or (joint is not None and cap.entry.handler.multi_output != joint):
                continue
            check_versions(cap)
            e = cap.entry
            # condensed per-example gradients are dotted with the (weighted) vectors, not by Gram
            condensed = isinstance(cap.grad, PerExampleGradients)
            factors = gram.get(e.index) if gram is not None and K == 1 and not condensed else None
            by_name = {n: vectors[i] for n, i in zip(e.param_names, e.param_index)}
            if record_route:
                e.route = route_label(e, factors is not None)
            sink = None
            if tokens and mb.tokens_weighted is not None:
                sink = _token_sink(mb.tokens_weighted, e, coef if factors is not None else None)
            for name, d in contract_call(e, cap.saved, cap.grad, by_name, factors, cap.rows, sink, cap.part).items():
                row = e.row(name)
                if factors is not None and name == "weight":
                    out[row] += d.to(out.dtype) * coef[row].to(out.dtype)
                else:
                    out[row] += d.to(out.dtype)
        parts.append(out)
    return torch.cat(parts, dim=1)


def _token_sink(into: Tensor, entry: Entry, coef: Tensor | None) -> Callable[[str, Tensor], None]:
    """Adds a weighted contraction's per-position dots into ``into`` (``[B·T, K]``); the Gram
    route's weight dots are unweighted and take ``coef`` of their row."""

    def add(name: str, d: Tensor) -> None:
        if coef is not None and name == "weight":
            d = d.to(into.dtype) * coef[entry.row(name)].to(into.dtype)
        into.add_(d.to(into.dtype))

    return add


class RoutePolicy:
    """Which route each layer takes, by the settings and one cost model per route."""

    def __init__(self, config: TrackerConfig) -> None:
        self.config = config

    @property
    def captures_gram(self) -> bool:
        return self.config.route != "vector"

    def keep_gram(self, entry: Entry, factors: GramFactors) -> bool:
        """Whether the weight takes the Gram route with these validation factors."""
        if self.config.route == "gram":
            return True
        return self.gram_cost(entry, factors.tokens, factors.residual_rows) < entry.handler.vector_cost(entry.module)

    @staticmethod
    def gram_cost(entry: Entry, val_tokens: int, residual_rows: int = 0) -> float:
        return entry.handler.gram_cost(entry.module, val_tokens, residual_rows)

    def predict(self, entry: Entry, val_tokens: int) -> str:
        """The route a layer is expected to take with ``val_tokens`` validation positions
        (``inrun inspect`` on a model not run yet; the tied head's residual rows not counted)."""
        gram = (
            entry.gram_capable and self.captures_gram
            and (self.config.route == "gram" or self.gram_cost(entry, val_tokens) < entry.handler.vector_cost(entry.module))
        )
        return route_label(entry, gram)

    def use_bookkeeping(
        self, entry: Entry, x: object, batch: int, columns: int, gram: GramFactors | None,
    ) -> bool:
        """Book-keeping for this call: allowed, a call the route can take, and the cheapest."""
        if self.config.bookkeeping == "off" or "weight" not in entry.param_names or columns > MAX_BOOKKEEPING_COLUMNS:
            return False
        tokens = entry.handler.bookkeeping_positions(entry.module, x, batch)
        if tokens is None:
            return False
        if self.config.bookkeeping == "always":
            return True
        vector = tokens * entry.handler.vector_cost(entry.module)
        via_gram = tokens * self.gram_cost(entry, gram.tokens, gram.residual_rows) if gram is not None else float("inf")
        return entry.handler.bookkeeping_cost(entry.module) < min(vector, via_gram)
