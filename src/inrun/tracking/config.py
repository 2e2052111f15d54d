"""The tracker's settings: one frozen dataclass, every choice a ``Literal``, validated on creation."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch

Order = Literal[1, 2]
SecondOrder = Literal["trapezoid", "hessian"]
Route = Literal["auto", "vector", "gram"]
Bookkeeping = Literal["off", "auto", "always"]
ValMode = Literal["eval", "train"]
NonFinitePolicy = Literal["raise", "skip"]
AdamLinearization = Literal["secant", "fixed_state"]
Proxy = Literal["sgd"]
Verify = Literal["layouts", "on_change", "every_step"]
ValThreads = Literal["auto", "all", "one"]


@dataclass(frozen=True)
class TrackerConfig:
    """Settings of an :class:`~inrun.InRunShapley` tracker; every field is validated on creation."""

    order: Order = 1
    """1: first order ``η g_val·g_z``; 2: adds the interaction with the rest of the batch."""
    second_order: SecondOrder = "trapezoid"
    """Order-2 variant: ``"trapezoid"`` (g_val at θ_t and θ_t+1) or ``"hessian"`` (one HVP)."""
    route: Route = "auto"
    """Ghost route of the layers that have several: ``"auto"`` picks the cheaper of the vector
    and Gram routes per layer; ``"vector"`` or ``"gram"`` force one wherever a layer has it."""
    bookkeeping: Bookkeeping = "off"
    """The book-keeping route (Linear and Conv1D layers): per-example weight gradients formed in
    place of autograd's weight-gradient GEMM, no extra FLOPs. ``"auto"``: where it is the
    cheapest route; ``"always"``: wherever a call allows it. It changes the order of the sums
    of the weight gradient, so the update equals the untracked one within float32 rounding
    instead of bit for bit: off by default."""
    check: bool = True
    """Check every step that Σ_z of the per-example dots equals ``<grad, g_val>`` per parameter."""
    check_rtol: float | None = None
    """Relative tolerance of that check; default by dtype (float64 1e-6, float32 1e-3, else 5e-2)."""
    on_nonfinite: NonFinitePolicy = "raise"
    """NaN/Inf gradient or value at ``optimizer.step()``: ``"raise"`` (from the pre-step hook, so
    the update is not applied), or ``"skip"``: the step's values are dropped and the skip is
    recorded, but the optimizer still applies the step. To drop the update too, check the loss
    in your loop and call :meth:`InRunShapley.skip_step` instead of ``optimizer.step()``."""
    val_mode: ValMode = "eval"
    """Module mode during the validation pass: ``"eval"`` (no dropout) or ``"train"``."""
    keep_trace: bool = False
    """Keep one row per (step, example) with both value parts and the learning rate."""
    adam: AdamLinearization = "secant"
    """Adam/AdamW linearization: ``"secant"`` (actual step / gradient) or ``"fixed_state"``."""
    proxy: Proxy | None = None
    """``"sgd"``: value every step with ``η g_val·g_z`` whatever the optimizer (the paper's proxy)."""
    verify: Verify = "on_change"
    """When the rows of every tracked call are proven to belong to their examples (a replay of the
    model's call against exact per-example gradients, :mod:`inrun.tracking.plan`, on the batch and
    on a shuffled copy of it, with probes of interactions between examples,
    :mod:`inrun.tracking.probes`): ``"on_change"`` at the first step and whenever a call's row
    layout is new, and at every micro-batch one example run alone and compared with its row of the
    batch (an interaction caught when it happens); ``"layouts"``: the same without the per-step
    example; ``"every_step"``: every micro-batch proven and probed (about two more forwards and
    four backward passes each)."""
    val_threads: ValThreads = "all"
    """CPU threads of the validation pass: ``"all"`` (torch's intra-op count), ``"one"``, or
    ``"auto"``: whichever of the two its measured wall time says is faster (timed at the first
    passes and re-timed now and then). A pass over a few validation rows is a sequence of small
    kernels; on two threads each waits for both threads to be scheduled at once, which a busy
    machine makes many times slower. ``"all"`` by default because the thread count changes the
    rounding of a reduction: under ``"auto"`` the values depend on the machine's load in their
    last bits, so two runs, or a run and its resumed copy, are no longer bit for bit equal.
    Without effect on GPU."""

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = _choices(f.type)
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{f.name}={value!r} is not one of {allowed}")
        if self.check_rtol is not None and not (0 < self.check_rtol < 1):
            raise ValueError(f"check_rtol={self.check_rtol!r} must be in (0, 1)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrackerConfig:
        """Build from keyword options, answering a misspelt one with the names it may mean."""
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {known}"
                raise TypeError(f"unknown tracker option {name!r}{hint}")
        return cls(**options)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TrackerConfig:
        """Rebuild a saved config; ``bookkeeping`` saved as a bool (before it took a mode) reads
        as ``"auto"``/``"off"``, and the route ``"bookkeeping"`` as ``bookkeeping="always"``."""
        state = dict(state)
        if isinstance(state.get("bookkeeping"), bool):
            state["bookkeeping"] = "auto" if state["bookkeeping"] else "off"
        if state.get("route") == "bookkeeping":
            state["route"], state["bookkeeping"] = "auto", "always"
        return cls(**state)

    def check_tolerance(self, dtype: torch.dtype) -> float:
        """The consistency check's relative tolerance for gradients of ``dtype``."""
        if self.check_rtol is not None:
            return self.check_rtol
        if dtype == torch.float64:
            return 1e-6
        if dtype == torch.float32:
            return 1e-3
        return 5e-2


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field (``None`` for other fields)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    literal = _LITERALS.get(name.replace(" | None", ""))
    if literal is None:
        return None
    allowed: Sequence[Any] = get_args(literal)
    return (*allowed, None) if name.endswith("| None") else tuple(allowed)


_LITERALS = {
    "Order": Order, "SecondOrder": SecondOrder, "Route": Route, "Bookkeeping": Bookkeeping,
    "ValMode": ValMode, "NonFinitePolicy": NonFinitePolicy, "AdamLinearization": AdamLinearization,
    "Proxy": Proxy, "Verify": Verify, "ValThreads": ValThreads,
}
