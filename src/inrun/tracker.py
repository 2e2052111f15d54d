"""``InRunShapley``: In-Run Data Shapley values computed inside the user's own training loop.

A facade over :mod:`inrun.tracking` (one job per module; the life of one step: its ``engine``),
where all per-step state lives: nothing is stored on the user's parameters or optimizer.
:meth:`InRunShapley.close` removes every hook (and the book-keeping route's ``forward``
override), leaving the model and optimizer exactly as they were.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .optim import UpdateRule
from .store.ledger import PerValidation, ValueLedger, ValueTable
from .store.rundir import RunDir
from .store.writer import RunWriter
from .tracking.admission import admit_model
from .tracking.audit import AuditConfig, StepAudit
from .tracking.carry import carried_values
from .tracking.config import (
    AdamLinearization,
    Bookkeeping,
    CarryMode,
    NonFinitePolicy,
    Order,
    Proxy,
    Route,
    SecondOrder,
    TrackerConfig,
    ValMode,
    ValThreads,
    Verify,
)
from .tracking.cost import StepCost
from .tracking.coupled import CoupledLoss
from .tracking.coverage import Coverage, describe
from .tracking.drop import loss_curve
from .tracking.engine import StepEngine
from .tracking.rules import ValueRule
from .tracking.tokens import TokenValues

__all__ = ["AuditConfig", "CoupledLoss", "Coverage", "InRunShapley", "StepCost", "TrackerConfig"]


class InRunShapley:
    """In-Run Data Shapley values of every training example, computed during training.

    Wrap each step's forward and backward in ``with tracker.step(ids):``; call ``optimizer.step()``
    as usual. Each example gets ``φ_z = η · g_val · g_z`` per step (order 1, helpful = positive; ``g_z``
    its share of the loss's gradient, ``g_val`` val_loss's), added up by id. No per-example gradient of
    the model is formed: each layer gives exact dot products from its inputs and output gradients.

    Args:
        model: the model being trained (may be DDP-wrapped or FSDP2-sharded: docs/scaling.md).
        optimizer: its optimizer, or a list of them (``docs/loops.md``; :mod:`inrun.optim`).
        val_loss: ``val_loss(model) -> Tensor``: a scalar validation loss, or a vector of
            per-validation-example losses (their sum is the utility, and a per-(train,
            validation) table is kept). Called in ``eval`` mode at the current parameters.
        order: 1 (``η g_val·g_z``) or 2 (adds the interaction with the rest of the batch).
        second_order: order-2 variant, ``"trapezoid"`` (g_val at θ_t and θ_t+1, no Hessian) or
            ``"hessian"`` (one Hessian-vector product per step; SGD-type optimizers only).
        route: ``"auto"`` (the cheaper of vector and Gram per layer), ``"vector"`` or ``"gram"``: same values.
        bookkeeping: ``"off"``, ``"auto"`` or ``"always"``: Linear/Conv1D weight gradients formed per
            example in place of the GEMM (no extra FLOPs; the update equal within float32 rounding).
        check: check every step that the per-example dots add up to ``<grad, g_val>``.
        check_rtol: that check's relative tolerance (default: by each parameter's precision, docs/precision.md).
        on_nonfinite: NaN/Inf at ``optimizer.step()``: ``"raise"`` before the update, or ``"skip"`` (recorded).
        val_mode: module mode of the validation pass, ``"eval"`` or ``"train"``.
        keep_trace: keep one row per (step, example) with both value parts.
        adam: Adam/AdamW linearization, ``"secant"`` (actual step / gradient) or ``"fixed_state"``.
        proxy: ``"sgd"``: every step valued as ``η g_val·g_z`` whatever the optimizer (the paper's proxy).
        verify: when each layer's rows are proven to be their examples' and interactions probed
            (``docs/loops.md``): ``"on_change"`` (new layouts, and one example alone every step),
            ``"layouts"`` or ``"every_step"``.
        val_threads: CPU threads of the validation pass: ``"all"`` (torch's), ``"one"``, or
            ``"auto"`` (the faster by measured time; last bits then depend on the load).
        carry: ``"momentum"``: also credit each batch for its gradient's later effect through
            momentum (:meth:`carried`, :mod:`inrun.tracking.carry`); ``"off"``.
        carry_window: at most this many later steps per carry window (``None``: until β1^n < 1%).
        ledger: a :class:`~inrun.ValueLedger` to add to (e.g. one loaded to resume a run).
        audit: the values checked during the run against exact Shapley values of sampled steps' games
            (an :class:`~inrun.AuditConfig`, its settings as a dict, or ``True``: every 100 steps, the whole
            game up to 32 examples; :mod:`inrun.tracking.audit`). Off by default; never changes training.
        validation_ids: one label per validation example (``val_loss`` a vector): :meth:`per_validation`'s columns.
        **options: none today; an unknown name is refused with the nearest field's name.

    A repeated row id within one optimizer step raises :class:`~inrun.BatchMismatchError` (a
    document continued in a later micro-batch is one player). Padding: ``docs/guide-pytorch.md``.
    Clipping, scaling, :meth:`unattributed`, several optimizers, coupled losses: ``docs/loops.md``.
    ``torch.compile`` (the model compiled before or after the tracker is made): ``docs/compile.md``.

    Example:
        >>> tracker = InRunShapley(model, opt, val_loss=lambda m: loss_fn(m(xv), yv))  # doctest: +SKIP
        >>> for ids, x, y in loader:                                                  # doctest: +SKIP
        ...     with tracker.step(ids):
        ...         loss_fn(model(x), y).backward()
        ...     opt.step(); opt.zero_grad()
        >>> tracker.values().top(5)                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        val_loss: Callable[[nn.Module], Tensor],
        *,
        order: Order = 1,
        second_order: SecondOrder = "trapezoid",
        route: Route = "auto",
        bookkeeping: Bookkeeping = "off",
        check: bool = True,
        check_rtol: float | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
        val_mode: ValMode = "eval",
        keep_trace: bool = False,
        adam: AdamLinearization = "secant",
        proxy: Proxy | None = None,
        verify: Verify = "on_change",
        val_threads: ValThreads = "all",
        carry: CarryMode = "off", carry_window: int | None = None,
        ledger: ValueLedger | None = None,
        audit: AuditConfig | Mapping[str, Any] | bool | None = None,
        validation_ids: Sequence[Any] | None = None,
        **options: Any,
    ) -> None:
        admit_model(model, val_loss)
        self.config = TrackerConfig.from_options(dict(
            order=order, second_order=second_order, route=route, bookkeeping=bookkeeping, check=check,
            check_rtol=check_rtol, on_nonfinite=on_nonfinite, val_mode=val_mode, keep_trace=keep_trace,
            adam=adam, proxy=proxy, verify=verify, val_threads=val_threads, carry=carry,
            carry_window=carry_window, **options,
        ))
        self.model = model
        self.val_loss = val_loss
        self.ledger = ledger if ledger is not None else ValueLedger(keep_trace=self.config.keep_trace)
        if validation_ids is not None:
            self.ledger.validation_names = [str(v) for v in validation_ids]
        self.audit_config = AuditConfig.of(audit)
        carry = ValueLedger(keep_trace=self.config.keep_trace) if self.config.carry != "off" else None
        self._engine = StepEngine(model, optimizer, val_loss, self.config, self.ledger, self.audit_config, carry)
        self.module = self._engine.module
        self.optimizer = self._engine.optimizer

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def step(self, ids: Any, *, segments: Any = None, token_values: bool = False, coupled_loss: Any = None) -> Iterator[InRunShapley]:
        """Value the examples of one (micro-)batch: run its forward and backward inside.

        Args:
            ids: one id (``int`` or ``str``) per row of the batch (per document with ``segments``).
            segments: packed rows (``docs/documents.md``): ``[B, T]`` integers, each token's index
                into ``ids`` (``-1``: no document); one value per document, proven exact by replay.
            token_values: keep each token's first-order value (:meth:`token_values`).
            coupled_loss: a loss coupling the examples (a :class:`~inrun.CoupledLoss`; ``docs/loops.md``).
        """
        with self._engine.microbatch(ids, segments, token_values, coupled_loss):
            yield self

    def token_values(self) -> TokenValues:
        """Token values of the ``token_values=True`` micro-batches (this process's, under DDP)."""
        return self._engine.log.tokens

    def unattributed(self) -> contextlib.AbstractContextManager[None]:
        """Changes to the gradients made inside (outside the blocks, before ``optimizer.step()``) are
        nobody's, like weight decay: a regularizer's backward, noise (``docs/loops.md``)."""
        return self._engine.unattributed()

    @property
    def enabled(self) -> bool:
        """While ``False`` steps are not valued and need no ``tracker.step`` block (warm-up steps)."""
        return self._engine.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._engine.set_enabled(value)

    def skip_step(self, reason: str) -> None:
        """Drop the current step unvalued, recorded with ``reason``: call it instead of ``optimizer.step()``
        (NaN loss, a ``GradScaler`` overflow), then zero the gradients; the step number is consumed."""
        self._engine.skip(reason, by_user=True)

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (valued or skipped): the number of the next step."""
        return self._engine.log.count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._engine.log.count = int(value)

    # ------------------------------------------------------------------ results
    def values(self) -> ValueTable:
        """id -> accumulated value (float64); under DDP the global table, a collective (:meth:`global_ledger`)."""
        return self._engine.global_ledger().values()

    def per_validation(self) -> PerValidation | None:
        """Per-(train, validation) values when ``val_loss`` returns a vector, else ``None``: a :class:`~inrun.PerValidation`
        (``.to_pandas()``: a row per id, a column per validation id). Under DDP global, a collective."""
        return self._engine.global_ledger().per_validation()

    def drops(self) -> list[dict[str, Any]]:
        """Each optimizer step's drop, decomposed (:mod:`inrun.tracking.drop`); a collective under DDP."""
        self._engine.flush()
        return self._engine.accounts.drops.global_rows(self._engine.ddp)

    def carried(self, final: bool = True) -> ValueTable:
        """id -> credit for its gradient's later effect through momentum (:mod:`inrun.tracking.carry`)."""
        self._engine.flush()
        return carried_values(self._engine.accounts.carry, final)

    def cost(self) -> StepCost:
        """How long the validation passes took next to your forward and backward (:class:`StepCost`)."""
        return self._engine.cost.copy()

    def validation_losses(self) -> dict[int, float]:
        """Step -> validation loss at θ_step: every step's L(θ_t) and L after the last (:meth:`drops`)."""
        self._engine.flush()
        return loss_curve(self._engine.accounts.drops.rows)

    def save_run(
        self, path: str | os.PathLike, *, examples: Any = None, description: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> RunDir:
        """A run directory of the values so far at a new ``path``, as ``inrun train`` writes (``report``,
        ``inspect``, ``curate`` read it); the arguments as for :class:`inrun.RunWriter`."""
        return RunWriter(Path(path), self, examples=examples, state={}, rng=False,
                         description=description, metadata=metadata).finish()

    def global_ledger(self, rank: int | None = None) -> ValueLedger | None:
        """``self.ledger``; under DDP all ranks' merged by id (a collective) on every rank, or on ``rank`` only (else ``None``)."""
        return self._engine.global_ledger(rank)

    def flush(self) -> None:
        """Finish a step waiting for ``g_val(θ_t+1)`` (trapezoid) or ``L(θ_t+1)`` (:meth:`drops`)."""
        self._engine.flush()

    def coverage(self) -> Coverage:
        """Which route valued each trainable parameter (a tied one: ``+``-joined), and documents."""
        return self._engine.coverage()

    def describe(self) -> dict[str, Any]:
        """Settings, the route of every parameter and the valued modules (``tracker.json``)."""
        return describe(self._engine)

    @property
    def in_step(self) -> bool:
        """Inside a step: from its first ``tracker.step`` block until ``optimizer.step()``."""
        return self._engine.mid_step()

    @property
    def rule(self) -> UpdateRule:
        """How the optimizer's step is attributed (:mod:`inrun.optim`)."""
        return self._engine.update

    @property
    def value_rule(self) -> ValueRule:
        """How each step's values are made (order, variant; :mod:`inrun.tracking.rules`)."""
        return self._engine.rule

    @property
    def audit(self) -> StepAudit | None:
        """The run's audit (``None`` without ``audit=``): per audited step its game's exact Shapley values
        beside the tracker's, their agreement and cost (``audit.steps``, ``.values``, ``.summary()``)."""
        return self._engine.audit

    @property
    def world_size(self) -> int:
        """Processes of the DDP or FSDP2 group the model trains in (1 for a single process)."""
        return 1 if self._engine.ddp is None else self._engine.ddp.world_size

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters and settings to checkpoint beside ``self.ledger``, between optimizer steps (a
        pending order-2 step is completed at the current parameters, as the resumed run would)."""
        return self._engine.checkpoint()

    def load_state_dict(self, state: dict[str, Any], ledger: ValueLedger | None = None) -> None:
        """Restore :meth:`state_dict` (and optionally the ledger saved with it)."""
        self._engine.restore(state, ledger)
        if ledger is not None:
            self.ledger = ledger

    def close(self) -> None:
        """Finish pending work and remove every hook; the model and optimizer are left as found."""
        self._engine.close()

    def __enter__(self) -> InRunShapley:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

