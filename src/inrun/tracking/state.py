"""The state of one optimizer step, made explicit, and the one place where steps are counted and
reach the ledger.

A step (a *window*: every micro-batch between two optimizer steps) moves through::

    OPEN ──optimizer.step() pre-hook──> VALUED ──post-hook──> COMMITTED
      │                                   └──(trapezoid)──> PENDING ──g_val(θ_t+1)──> COMMITTED
      └── doomed (exception in a block, no backward, non-finite with on_nonfinite="skip",
          gradients zeroed without a step, tracker.skip_step) ──> SKIPPED(reason)

:class:`StepLog` moves the step counter (once per window, when its optimizer step or skip
ends it) and writes committed values and skips to the ledger.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..layers import Rows
from .entries import Entry
from .segments import Segments, merge_by_id
from .tokens import TokenValues

logger = logging.getLogger(__name__)


class StepState(enum.Enum):
    OPEN = "open"
    VALUED = "valued"
    PENDING = "pending"
    COMMITTED = "committed"
    SKIPPED = "skipped"


@dataclass
class MicroBatch:
    """One ``tracker.step(ids)`` block."""

    ids: list
    size: int
    """Players: one per id (rows, or documents with ``segments``)."""
    rows: int = 0
    """Rows of the model's batch (``size`` unless ``segments`` says otherwise)."""
    segments: Segments | None = None
    """The documents of packed rows (:mod:`inrun.tracking.segments`); ``None``: a player per row."""
    dots: Tensor | None = None
    """``[P, B, K]`` float64 dots with the step's validation gradient (immediate rules)."""
    tokens: Tensor | None = None
    """Token values requested: ``[P, B·T, K]`` float64 per-position dots, not yet weighted by the
    step's coefficients (immediate rules)."""
    tokens_weighted: Tensor | None = None
    """Token values requested: ``[B·T, K]`` per-position dots already weighted (joint modules,
    elementwise rules)."""
    captures: list[Capture] = field(default_factory=list)
    """Calls whose factors are kept for a contraction after backward (deferred rules)."""
    fired: int = 0
    eps: dict[int, float] = field(default_factory=dict)
    """Parameter row -> machine epsilon of the lowest-precision output gradient of a call valuing it."""
    signature: list[tuple] = field(default_factory=list)
    """``(entry index, row kinds)`` of every tracked call, in order."""
    off_plan: bool = False
    """A call the row verification has not proven: the micro-batch is replayed and verified."""
    unresolved: dict[int, str] = field(default_factory=dict)
    """Entries with a call that could not be captured, and why."""
    factors: bool = False
    """Its captures hold every tracked call's factors (a contraction at the step can use them)."""
    coupled: Any = None
    """A declared coupled loss: what its game needs at the step (:mod:`inrun.tracking.coupled`)."""
    layout: list[tuple] = field(default_factory=list)
    """What else the row verification must have proven for this micro-batch (documents' layout,
    the model's inputs that keep them apart)."""

    def __post_init__(self) -> None:
        self.rows = self.rows or self.size

    def replica(self) -> MicroBatch:
        """An empty micro-batch of the same players (the row verification's replay), which keeps
        every layer's factors."""
        return MicroBatch(ids=self.ids, size=self.size, rows=self.rows, segments=self.segments,
                          layout=list(self.layout), factors=True,
                          tokens=None if self.tokens is None else torch.zeros_like(self.tokens),
                          tokens_weighted=None if self.tokens_weighted is None else torch.zeros_like(self.tokens_weighted))


@dataclass
class Capture:
    """One forward call of a tracked module inside a micro-batch."""

    entry: Entry
    saved: Any
    rows: Rows | None = None
    """How the rows of ``saved`` and ``grad`` map to examples (``None``: the handler knows)."""
    grad: Any = None
    """The output's gradient (a list, one per output tensor, for multi-output handlers)."""
    fired: bool = False
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    weighted_grad: Any = None
    """With segments, the row verification's weighted backward's output gradient (as ``grad``)."""
    part: Any = None
    """A linear part's call (:class:`~inrun.layers.parts.PartCall`): what of its weight it used."""


@dataclass
class Window:
    """Everything between two optimizer steps (one or several micro-batches)."""

    step: int
    state: StepState = StepState.OPEN
    micro: list[MicroBatch] = field(default_factory=list)
    doomed: str | None = None
    """Why this step will be skipped at ``optimizer.step()`` (set while it is still open)."""
    skip_reason: str | None = None
    exit_norms: Tensor | None = None
    check_terms: tuple[Tensor, Tensor, Tensor] | None = None
    rates: Tensor | None = None
    """Scalar rules: ``[P]`` the update rule's coefficient per parameter (learning rate ...)."""
    coef: Tensor | None = None
    """Scalar rules: ``[P]`` coefficient ``c_p`` = rates × the clip factor."""
    multipliers: list[Any] = field(default_factory=list)
    """Per parameter: ``c_p`` (scalar rules) or ``−ratio · D_p`` (elementwise rules)."""
    base_values: Tensor | None = None
    """Trapezoid: the values at the data part's start, on the device."""
    first: np.ndarray | None = None
    second: np.ndarray | None = None
    lr: list[float] | None = None
    """The learning rate of each parameter group at the step."""
    token_values: list[Any] = field(default_factory=list)
    """Token values of the micro-batches that asked (:mod:`inrun.tracking.tokens`)."""
    carrying: bool = False
    """Its factors are kept after it settles: a carry window is open (:mod:`.carry`)."""

    @property
    def ids(self) -> list:
        return [i for mb in self.micro for i in mb.ids]

    def dots(self) -> Tensor:
        return torch.cat([mb.dots for mb in self.micro], dim=1)

    def release(self) -> None:
        """Drop the micro-batches, what their calls kept and the step's per-coordinate multipliers
        (a settled window may live on in the step log and the drop rows; its parameter-sized
        tensors should not: on A, two settled windows' multipliers held 48 MiB between steps)."""
        for mb in self.micro:
            mb.captures.clear()
        self.micro.clear()
        self.multipliers = []

    def value(self, first: np.ndarray, second: np.ndarray | None, lr: list[float]) -> None:
        self.first, self.second, self.lr = first, second, lr
        self.state = StepState.VALUED

    def skip(self, reason: str) -> None:
        self.skip_reason = reason
        self.state = StepState.SKIPPED


class Ledger(Protocol):
    """What the engine needs of a ledger (:class:`inrun.ValueLedger` is one): it records a step's
    values or its skip, and gives its state to be merged over DDP ranks."""

    def add(self, step: int, ids: Any, first: Any, second: Any = None, *, lr: Any = None) -> None: ...

    def record_skip(self, step: int, reason: str) -> None: ...

    def id_kind(self) -> type | None: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_states(cls, states: Any) -> Ledger: ...


class StepLog:
    """Counts optimizer steps and settles windows into the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.count = 0
        self.tokens = TokenValues()

    def open(self) -> Window:
        return Window(step=self.count)

    def end(self, window: Window, pending: bool) -> Window | None:
        """The optimizer step (or the loop's skip) ended ``window``: count it, and settle it
        unless its values wait for the next validation gradient (returned, then, as pending)."""
        self.count += 1
        if window.state is StepState.VALUED and pending:
            window.state = StepState.PENDING
            return window
        self.settle(window)
        return None

    def settle(self, window: Window) -> None:
        if window.state is StepState.SKIPPED:
            self.ledger.record_skip(window.step, window.skip_reason)
        else:
            ids, first, second = merge_by_id(window.ids, window.first, window.second)
            self.ledger.add(window.step, ids, first, second, lr=window.lr)
            self.tokens.records.extend(window.token_values)
            window.state = StepState.COMMITTED
        if not window.carrying:
            window.release()

    def skip(self, window: Window | None, reason: str, warn: bool = False) -> None:
        """End a window that no optimizer step will value (or the step with no window at all)."""
        window = window if window is not None else self.open()
        window.skip(reason)
        if warn:
            logger.warning("step %d not valued: %s", window.step, reason)
        self.end(window, pending=False)


@dataclass
class Plan:
    """What the row verification has proven (:mod:`inrun.tracking.plan`)."""

    verified: set[tuple] = field(default_factory=set)
    """``(entry index, row kinds)`` of calls whose rows are proven to belong to their examples."""
    shared_safe: set[int] = field(default_factory=set)
    """Entries whose shared calls are proven safe to expand to the batch (the model computes the
    same bits)."""
    shared_unsafe: set[int] = field(default_factory=set)
    interactions_tested: bool = False
