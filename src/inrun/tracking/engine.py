"""The step machine: micro-batches in, the optimizer's step hooks, values out.

The life of one step (see :mod:`inrun.tracking.state` for its states)::

    open_microbatch       finish a pending step (flush); ValidationPass.at_step_start: g_val at
                          θ_t + f(0) and the Gram factors; a new Window (OPEN)
    user's forward        TrainRecorder.on_forward keeps each tracked call's input
    user's backward       _on_gradient: contract_call with g_val (immediate rules), factors kept
                          (deferred rules)
    close_microbatch      a call not yet proven: RowVerifier.verify replays the micro-batch and
                          proves its rows (or moves a layer to a site), else RowProbes.alone;
                          GradientReference.sync; ConsistencyCheck.terms (immediate)
    StepOptimizers.pre    the first optimizer's pre-step hook: GradientReference.classify (what the
                          loop did to the gradients); ValueRule.at_step; ConsistencyCheck.finalize:
                          the one host transfer, the window VALUED or SKIPPED
    StepOptimizers.post   the last optimizer's post-step hook: StepLog.end: COMMITTED into the
                          ledger, or PENDING (trapezoid), or the skip recorded; the step counted
    next open / flush     ValueRule.finish with g_val(θ_t+1); StepLog.settle: COMMITTED
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InRunError, StepOrderError, UnsupportedSettingError
from ..optim import rule_for
from . import segments as docs
from .accounts import StepAccounts
from .admission import WindowIds, admit_ids
from .audit import AuditConfig, StepAudit
from .bookkeeping import Bookkeeping
from .capture import Hooks, TrainRecorder
from .check import ConsistencyCheck, column_sum
from .compiled import STALE_GRAPH, add_graph_dots, graph_probe, is_compiled, unwrap
from .config import TrackerConfig
from .cost import StepCost
from .coupled import CoupledLoss, CouplingWatch, attach
from .coverage import Coverage, coverage_of
from .entries import Entry, build_entries, joint_groups
from .fsdp import data_parallel_sync
from .gradmap import GradientReference
from .kept import keep_for_window
from .optimizers import RuleSet, StepOptimizers, optimizer_list
from .params import ParamTable
from .plan import RowVerifier
from .probes import RowProbes
from .replay import RootCalls
from .routes import RoutePolicy, contract_call, route_label
from .rules import make_value_rule
from .state import Capture, Ledger, MicroBatch, Plan, StepLog, Window
from .validation import Validation, ValidationPass


class StepEngine:
    """Every part of the tracker, wired together; :class:`~inrun.InRunShapley` is its facade."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, val_loss: Any, config: TrackerConfig,
        ledger: Ledger, audit: AuditConfig | None = None, carry_ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.module, ddp = unwrap(model)
        self.optimizers = optimizer_list(optimizer)
        self.optimizer = self.optimizers[0]
        options = {"proxy": config.proxy, "adam": config.adam}
        self.update = (rule_for(self.optimizer, **options) if len(self.optimizers) == 1
                       else RuleSet(self.optimizers, **options))
        self.table = ParamTable(self.module)
        self.entries = build_entries(self.module, self.table)
        self.table.warn_missing_from(self.optimizers)
        self.batchnorms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.compiled = is_compiled(model)
        self.policy = RoutePolicy(config)
        self.hooks = Hooks(self.entries)
        self.ddp = data_parallel_sync(model, ddp, self.table, config, self.hooks.handles)  # DDP, FSDP2 or None
        self.validation = ValidationPass(
            self.module, self.table, self.entries, self.hooks, val_loss, config, self.update, self.policy,
        )
        self.check = ConsistencyCheck(config, self.table, self.ddp)
        self.check.groups = joint_groups(self.entries)
        self.rule = make_value_rule(config, self.update, self.table, self.validation, self.check, self.ddp)
        self.log = StepLog(ledger)
        self.accounts = StepAccounts(self.update, self.table, self.validation, carry_ledger, config.carry_window, self.ddp)
        self.enabled = True
        self.window: Window | None = None
        self.pending: Window | None = None
        self.recorder: TrainRecorder | None = None
        self.cost = StepCost()
        self.window_ids = WindowIds(ledger.id_kind())
        self.bookkeeping = (
            Bookkeeping(self.entries, self.policy, self._bookkeeping_target, self._add_dots)
            if config.bookkeeping != "off" else None
        )
        self.plan = Plan()
        self.root_calls = RootCalls(self.module, wanted=self._wants_output_grads, on_call=self._on_root_call,
                                    after_call=self.ddp.agreement(self) if self.ddp is not None else None,
                                    outputs_read=lambda: self.probes.reads(self.window))
        self.documents_seen = False  # a micro-batch had segments (coverage says how documents were valued)
        self.verifier = RowVerifier(self)
        self.probes = RowProbes(self)
        self.declared: CoupledLoss | None = None  # the coupled loss of the block being recorded
        self.hooks.install()
        self.audit = StepAudit(audit, self, val_loss) if audit is not None else None  # only reads (tracking/audit/)
        self.gradients = GradientReference(self.table.params, self.table.names, self.table.local)
        self.steps = StepOptimizers(self)  # the optimizers' step hooks: the step valued at the first

    # ------------------------------------------------------------------ micro-batches
    @contextlib.contextmanager
    def microbatch(self, ids: Any, segments: Any = None, token_values: bool = False, coupled_loss: Any = None) -> Iterator[None]:
        """One ``tracker.step(ids)`` block: admitted, recorded, closed, and timed (from the
        second optimizer step on: the first also proves the rows by a replay)."""
        if not self.enabled:
            yield
            return
        if self.recorder is not None:
            raise StepOrderError("tracker.step() blocks cannot be nested")
        id_list = admit_ids(ids, self.batchnorms)
        self.window_ids.admit_kind(id_list, self.log.count)
        seg = docs.admit_documents(segments, id_list, self.table.device, token_values)
        self.declared = CoupledLoss.of(coupled_loss)
        if self.declared is not None and (self.rule.order != 1 or seg is not None):
            raise UnsupportedSettingError("a coupled_loss is valued by a first-order game of one example per row: make the "
                                          "tracker with order=1 and call tracker.step(ids, coupled_loss=fn) without segments")
        timed = self.log.count >= 1
        t0 = time.perf_counter()
        opening = self.window is None
        recorder = self.open_microbatch(id_list, seg, token_values)
        probe, reason = graph_probe(self, len(id_list), documents=seg is not None)
        t1 = time.perf_counter()
        # a loss that couples the rows, undeclared: watched while rows are being proven
        watch = (CouplingWatch(self.root_calls.inside, len(id_list)) if self.declared is None and seg is None
                 and (not self.plan.verified or self.config.verify == "every_step") else None)
        self.root_calls.coupling = watch
        try:
            self.window_ids.add(self.window, id_list, documents=seg is not None)
            with self.hooks.recording(recorder), watch or contextlib.nullcontext(), self.hooks.graph.block(
                probe, self.validation.current.grads, reason, self.compiled,
            ):
                yield
        except BaseException as exc:
            self.root_calls.coupling = None
            self.close_microbatch(recorder, exc)
            raise
        t2 = time.perf_counter()
        self.root_calls.coupling = None
        self.close_microbatch(recorder, None, probe)
        if self.ddp is not None:
            self.ddp.release()  # FSDP2: no whole parameter left gathered by the probes (clipping skips those)
        if timed:
            self.cost.add(opening, t1 - t0, t2 - t1)

    def open_microbatch(self, ids: list, segments: docs.Segments | None = None, token_values: bool = False) -> TrainRecorder:
        window = self.window
        if window is not None and self.steps.valued:
            self.steps.require_complete()  # an optimizer valued in the last step did not step
        if window is not None and window.micro and self.table.all_grads_none():
            # The previous micro-batches were zeroed away without an optimizer step
            # (e.g. GradScaler skipped it): nothing they computed was applied.
            self.accounts.drops.end(window, stepped=False)
            self.log.skip(window, "gradients were zeroed without an optimizer step", warn=True)
            window = self.window = None
        if window is None:
            self.open_window()
        else:
            self.gradients.require_unchanged("between two tracker.step() blocks of one optimizer step")
        mb = MicroBatch(ids=ids, size=len(ids), rows=len(ids) if segments is None else segments.shape[0],
                        segments=segments, factors=self.rule.keeps_factors)
        if segments is not None:
            self.documents_seen = True
            self._require_layout(mb, segments.layout())
            if token_values:
                docs.request_token_values(mb, len(self.table), self.validation.current.columns, self.table.device)
        self.root_calls.arm(mb.rows, segments)
        self.recorder = self.make_recorder(mb, self.rule.keeps_factors, lambda e: e.index in self.plan.shared_safe)
        if self.audit is not None:
            self.audit.open_microbatch(self.window, ids)  # audit: is this step audited?
        return self.recorder

    def open_window(self) -> None:
        """A new optimizer step: the model as it was made, a pending step finished, the validation
        gradient at the step's start, zero gradients."""
        self.table.require_unchanged()
        self._settle_pending()
        moved = self.accounts.drops.moved()  # before a pass shifts the parameters (and back)
        val = self.validation.at_step_start(self.log.count)
        self.table.require_zero_grads()
        self.window = self.log.open()
        self.accounts.open(self.window, val, moved)
        self.gradients.start()
        self.steps.start()

    @contextlib.contextmanager
    def unattributed(self) -> Iterator[None]:
        """Every change made to the gradients inside is nobody's (see :mod:`.gradmap`)."""
        if self.enabled and self.recorder is not None:
            raise StepOrderError("tracker.unattributed() goes outside the tracker.step() blocks, not inside one")
        if self.enabled and self.window is not None and self.steps.valued:
            self.steps.require_complete()
        if self.enabled:
            self.gradients.require_unchanged("before a tracker.unattributed() block") if self.window else self.open_window()
        yield
        if self.enabled:
            self.gradients.add_unattributed()

    def _require_layout(self, mb: MicroBatch, key: tuple) -> None:
        """``key`` is part of what this micro-batch's values rely on: verified unless proven."""
        mb.layout.append(key)
        if key not in self.plan.verified:
            mb.off_plan = True

    def _on_root_call(self, args: tuple, kwargs: dict) -> None:
        """Documents packed into rows are kept apart by what the model is given (positions, a
        mask): a call with other kinds of inputs is verified again."""
        mb = self.recorder.microbatch if self.recorder is not None else None
        if mb is not None and mb.segments is not None and mb.segments.several:
            self._require_layout(mb, docs.input_layout(args, kwargs))

    def make_recorder(self, mb: MicroBatch, keep_factors: bool, expand_shared: Any) -> TrainRecorder:
        calls = self.bookkeeping.calls if self.bookkeeping is not None else set()
        return TrainRecorder(mb, keep_factors, self._on_gradient, calls, self.plan, self.hooks,
                             self.root_calls.storages, expand_shared, self.module)

    def _verifying(self) -> bool:
        """Whether the micro-batch being recorded needs the row verification (it keeps the
        model's output gradients for the replay only then)."""
        mb = self.recorder.microbatch if self.recorder is not None else None
        return mb is not None and (mb.off_plan or bool(mb.unresolved) or self.config.verify == "every_step")

    def _wants_output_grads(self) -> bool:
        """The model's output gradients are kept for the row verification, and on audited steps."""
        return self._verifying() or self.declared is not None or (self.audit is not None and self.audit.recording)

    def close_microbatch(self, recorder: TrainRecorder, error: BaseException | None, probe: Tensor | None = None) -> None:
        verify = self._verifying()
        recorder.open = False
        self.recorder = None
        calls = self.root_calls.disarm()
        if self.audit is not None:
            self.audit.close_microbatch(recorder.microbatch.ids, error, calls)  # audit: the players' gradients
        window = self.window
        if error is not None:
            if window is not None:
                window.doomed = f"{type(error).__name__} inside tracker.step()"
            return
        mb = recorder.microbatch
        if probe is not None and probe.grad is not None:
            add_graph_dots(self, mb, probe.grad)
        if mb.fired == 0 and not any(g is not None for c in calls for g in c.grads):
            window.doomed = "no backward pass reached a tracked layer inside tracker.step()"
            raise StepOrderError(
                "no backward pass reached a tracked layer inside tracker.step(ids): call "
                "loss.backward() inside the `with tracker.step(ids):` block" + ("" if probe is None else STALE_GRAPH)
            )
        try:
            if verify:
                verified = self.verifier.verify(mb, calls)
                if verified is not mb:
                    mb.captures.clear()  # the replay's micro-batch replaces it: its factors go now
                mb = verified
                self.check.groups = joint_groups(self.entries)
            elif self.config.verify == "on_change":
                self.probes.alone(calls, window.step, len(window.micro))  # one example, alone
            attach(mb, self.declared, calls)
        except BaseException:
            window.doomed = "the row verification refused the model"
            raise
        val = self.validation.current
        if mb.dots is None:
            mb.dots = self.zero_dots(mb, self.table.device)
        window.micro.append(mb)
        self.gradients.sync()
        grads = self.gradients.batch_grads()  # the examples' gradient: without unattributed parts
        with torch.no_grad():
            window.exit_norms = self.table.norms(grads)
            if self.rule.immediate:
                window.check_terms = self.check.terms(
                    [m.dots for m in window.micro], grads, [column_sum(v) for v in val.grads],
                    grad_norms=window.exit_norms,
                )

    def _on_gradient(self, cap: Capture, grad: Tensor, mb: MicroBatch) -> None:
        with self.hooks.paused(), torch.no_grad():
            if self.rule.immediate:
                e, val = cap.entry, self.validation.current
                factors = val.gram.get(e.index)
                e.route = route_label(e, factors is not None)
                vectors = {n: val.grads[i] for n, i in zip(e.param_names, e.param_index)}
                positions = None if mb.tokens is None else docs.position_sink(mb.tokens, e)
                self._add_dots(mb, e, contract_call(e, cap.saved, grad, vectors, factors, cap.rows, positions, cap.part))
            keep_for_window(cap, grad.detach(), mb.factors, condense=mb.segments is None)

    def zero_dots(self, mb: MicroBatch, device: torch.device) -> Tensor:
        columns = self.validation.current.columns
        return torch.zeros(len(self.table), mb.size, columns, dtype=torch.float64, device=device)

    def _add_dots(self, mb: MicroBatch, entry: Entry, dots: dict[str, Tensor]) -> None:
        for name, d in dots.items():
            if mb.dots is None:
                mb.dots = self.zero_dots(mb, d.device)
            mb.dots[entry.row(name)] += d.to(torch.float64)

    def _bookkeeping_target(self) -> tuple[TrainRecorder, Validation] | None:
        recorder = self.hooks.active
        if not isinstance(recorder, TrainRecorder) or not self.rule.immediate:
            return None
        return recorder, self.validation.current

    # ------------------------------------------------------------------ the rest
    def flush(self) -> None:
        """Finish a step waiting for ``g_val(θ_t+1)`` (trapezoid) or ``L(θ_t+1)`` (its drop row), here."""
        self._settle_pending()
        self.accounts.drops.finish()

    def _settle_pending(self) -> None:
        if self.pending is None:
            return
        window, self.pending = self.pending, None
        values = self.rule.finish(window, self.validation.plain(self.log.count))
        second = values.cpu().numpy() - window.first
        if np.isfinite(second).all():
            window.second = second
        else:
            window.skip("non-finite trapezoid correction")
        self.log.settle(window)

    def skip(self, reason: str, by_user: bool = False) -> None:
        if by_user and self.recorder is not None:
            raise StepOrderError("skip_step() must be called after the tracker.step() block, not inside it")
        window, self.window = self.window, None
        self.accounts.drops.end(window, stepped=False)
        self.steps.start()
        self.log.skip(window, reason)

    def checkpoint(self) -> dict[str, Any]:
        """Counters and settings of a checkpoint: between optimizer steps, a pending step done."""
        if self.mid_step():
            raise StepOrderError("a checkpoint must be taken between optimizer steps, not inside one")
        self.flush()
        state: dict[str, Any] = {"step_count": self.log.count, "config": asdict(self.config)}
        if self.audit is not None:
            state["audit"] = self.audit.state()
        state.update(self.accounts.state())
        return state

    def restore(self, state: dict[str, Any], ledger: Ledger | None) -> None:
        saved = TrackerConfig.from_state(state["config"])
        if saved != self.config:
            raise InRunError(f"checkpoint was made with {saved}, this tracker has {self.config}")
        self.log.count = int(state["step_count"])
        if self.audit is not None and state.get("audit") is not None:
            self.audit.load_state(state["audit"])
        self.accounts.load_state(state)
        if ledger is not None:
            self.log.ledger = ledger
            self.window_ids.kind = ledger.id_kind()
        self.validation.forget()

    def set_enabled(self, value: bool) -> None:
        if self.enabled and not value:
            if self.mid_step():
                raise StepOrderError("tracking can only be switched off between optimizer steps")
            self.flush()
        self.enabled = bool(value)

    def mid_step(self) -> bool:
        return self.recorder is not None or (self.window is not None and bool(self.window.micro))

    def coverage(self) -> Coverage:
        cover = coverage_of(self.entries, self.table, lambda e: e.route if e.route != "unused" else "not reached yet")
        if self.documents_seen:
            cover.documents = docs.documents_note(self.entries, self.plan)
        return cover

    def global_ledger(self, rank: int | None = None) -> Ledger | None:
        self.flush()
        return self.log.ledger if self.ddp is None else self.ddp.gather_ledger(self.log.ledger, rank)

    def close(self) -> None:
        with contextlib.suppress(InRunError):
            self.flush()
        if self.audit is not None:
            self.audit.close()
        self.accounts.close()
        self.hooks.remove()
        self.root_calls.remove()
        self.steps.remove()
        if self.bookkeeping is not None:
            self.bookkeeping.remove()
        self.enabled = False

