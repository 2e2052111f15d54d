"""The tracker's settings: one frozen dataclass, every choice a ``Literal``, validated on creation.

It is the one table of the value settings' defaults: each field carries its default, its choices
(the ``Literal``) and a one-line help, and the run config's ``[values]`` section takes all three
from here (:func:`option`), so ``inrun train`` and ``InRunShapley`` cannot disagree.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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
CarryMode = Literal["off", "momentum"]


def setting(default: Any, help: str) -> Any:
    """A setting: its default and its one-line help (``inrun train --list-keys`` prints it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Option:
    """One setting of a settings dataclass: its default, its choices (``None``: any value of its
    type) and its help."""

    default: Any
    choices: tuple[Any, ...] | None
    help: str


def option(cls: type, name: str) -> Option:
    """The default, choices and help of setting ``name`` of ``cls`` (:class:`TrackerConfig`,
    :class:`~inrun.AuditConfig`)."""
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return Option(default, _literal_choices(get_type_hints(cls)[name]), f.metadata.get("help", ""))


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` (or ``Literal | None``) type allows; ``None`` for other types."""
    if get_origin(tp) is Literal:
        return tuple(get_args(tp))
    if get_origin(tp) in (Union, UnionType):
        inner = [_literal_choices(a) for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return (*inner[0], None)
    return None


CHECK_EPS_FACTOR = 4.0
"""The consistency check's tolerance in units of the machine epsilon of a step's lowest precision."""


@dataclass(frozen=True)
class TrackerConfig:
    """Settings of an :class:`~inrun.InRunShapley` tracker; every field is validated on creation."""

    order: Order = setting(1, "1: first order; 2: with the interaction inside the batch")
    """1: first order ``η g_val·g_z``; 2: adds the interaction with the rest of the batch."""
    second_order: SecondOrder = setting("trapezoid", "order 2: 'trapezoid' (no Hessian) or 'hessian'")
    """Order-2 variant: ``"trapezoid"`` (g_val at θ_t and θ_t+1) or ``"hessian"`` (one HVP)."""
    route: Route = setting("auto", "per-layer route: 'auto', 'vector' or 'gram'")
    """Ghost route of the layers that have several: ``"auto"`` picks the cheaper of the vector
    and Gram routes per layer; ``"vector"`` or ``"gram"`` force one wherever a layer has it."""
    bookkeeping: Bookkeeping = setting("off", "the book-keeping route of Linear layers: 'off', 'auto' or 'always'")
    """The book-keeping route (Linear and Conv1D layers): per-example weight gradients formed in
    place of autograd's weight-gradient GEMM, no extra FLOPs. ``"auto"``: where it is the
    cheapest route; ``"always"``: wherever a call allows it. It changes the order of the sums
    of the weight gradient, so the update equals the untracked one within float32 rounding
    instead of bit for bit: off by default."""
    check: bool = setting(True, "check every step that per-example values add up to the batch gradient")
    """Check every step that Σ_z of the per-example dots equals ``<grad, g_val>`` per parameter."""
    check_rtol: float | None = setting(None, "that check's relative tolerance (default: by each parameter's precision)")
    """Relative tolerance of that check; default by the precision each parameter's step went through
    (float64 1e-6, float32 1e-3, fp16 and TF32 3.9e-3, bf16 3.1e-2: see :meth:`check_tolerance_for`)."""
    on_nonfinite: NonFinitePolicy = setting("raise", "NaN/Inf at optimizer.step(): 'raise' or 'skip'")
    """NaN/Inf gradient or value at ``optimizer.step()``: ``"raise"`` (from the pre-step hook, so
    the update is not applied), or ``"skip"``: the step's values are dropped and the skip is
    recorded, but the optimizer still applies the step. To drop the update too, check the loss
    in your loop and call :meth:`InRunShapley.skip_step` instead of ``optimizer.step()``."""
    val_mode: ValMode = setting("eval", "module mode of the validation pass: 'eval' or 'train'")
    """Module mode during the validation pass: ``"eval"`` (no dropout) or ``"train"``."""
    keep_trace: bool = setting(False, "keep one row per (step, example)")
    """Keep one row per (step, example) with both value parts and the learning rate."""
    adam: AdamLinearization = setting("secant", "Adam/AdamW linearization: 'secant' or 'fixed_state'")
    """Adam/AdamW linearization: ``"secant"`` (actual step / gradient) or ``"fixed_state"``."""
    proxy: Proxy | None = setting(None, "'sgd': value every step as SGD would (the paper's proxy)")
    """``"sgd"``: value every step with ``η g_val·g_z`` whatever the optimizer (the paper's proxy)."""
    verify: Verify = setting("on_change", "when rows are proven to belong to their examples: 'on_change', 'layouts' or 'every_step'")
    """When the rows of every tracked call are proven to belong to their examples (a replay of the
    model's call against exact per-example gradients, :mod:`inrun.tracking.plan`, on the batch and
    on a shuffled copy of it, with probes of interactions between examples,
    :mod:`inrun.tracking.probes`): ``"on_change"`` at the first step and whenever a call's row
    layout is new, and at every optimizer step one example (of a micro-batch drawn by the step) run
    alone and compared with its row of the batch (an interaction caught when it happens); ``"layouts"``: the same without the per-step
    example; ``"every_step"``: every micro-batch proven and probed (about two more forwards and
    four backward passes each)."""
    val_threads: ValThreads = setting("all", "CPU threads of the validation pass: 'all', 'one' or 'auto'")
    """CPU threads of the validation pass: ``"all"`` (torch's intra-op count), ``"one"``, or
    ``"auto"``: whichever of the two its measured wall time says is faster (timed at the first
    passes and re-timed now and then). A pass over a few validation rows is a sequence of small
    kernels; on two threads each waits for both threads to be scheduled at once, which a busy
    machine makes many times slower. ``"all"`` by default because the thread count changes the
    rounding of a reduction: under ``"auto"`` the values depend on the machine's load in their
    last bits, so two runs, or a run and its resumed copy, are no longer bit for bit equal.
    Without effect on GPU."""
    carry: CarryMode = setting("off", "'momentum': also credit each batch for its gradient's later effect through momentum")
    """``"momentum"``: also credit each batch for its gradient's later effect through momentum
    (first order, over a window set by β1 or μ; :mod:`inrun.tracking.carry`), in a table of its own
    (:meth:`~inrun.InRunShapley.carried`). Costs memory: the window's steps of per-layer factors."""
    carry_window: int | None = setting(None, "at most this many later steps per carry window (none: until beta1^n < 1%)")
    """At most this many later steps per carry window (``None``: until β1^n < 1%, 44 at β1 = 0.9)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = _choices(f.type)
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{f.name}={value!r} is not one of {allowed}")
        if self.check_rtol is not None and not (0 < self.check_rtol < 1):
            raise ValueError(f"check_rtol={self.check_rtol!r} must be in (0, 1)")
        if self.carry_window is not None and self.carry_window < 1:
            raise ValueError(f"carry_window={self.carry_window!r} must be at least 1 (or None)")
        if self.carry != "off" and self.bookkeeping != "off":
            raise ValueError("carry needs every layer's factors kept, which bookkeeping does not: use bookkeeping='off'")

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

    def check_tolerance_for(self, eps: float) -> float:
        """The consistency check's relative tolerance for a parameter whose step went through
        precision ``eps`` (the machine epsilon of the lowest precision on its way).

        float64: 1e-6. Lower precisions: ``CHECK_EPS_FACTOR · eps``, at least 1e-3 (float32's
        sums over a long sequence). A 16-bit gradient element is rounded once (relative error at
        most ``eps/2``), so the two sides of the check can differ by up to ``eps/2`` of
        ``‖g_B‖ ‖g_val‖`` at any size: bf16 3.1e-2, fp16 and TF32 3.9e-3 (measured drift: bf16
        1.9e-3, fp16 3.9e-5; ``benchmarks/precision.py``).
        """
        if self.check_rtol is not None:
            return self.check_rtol
        if eps <= torch.finfo(torch.float64).eps:
            return 1e-6
        return max(1e-3, CHECK_EPS_FACTOR * eps)


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
    "Proxy": Proxy, "Verify": Verify, "ValThreads": ValThreads, "CarryMode": CarryMode,
}
