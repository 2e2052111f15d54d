"""``StepAudit``: the audit inside the engine (see :mod:`inrun.tracking.audit` for what it does)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ... import exact
from ...modes import evaluating
from ...shapley import scaled, weigh
from ..replay import RootCall, weighted_gradients
from ..state import StepState, Window
from .config import AuditConfig, AuditError, Precision
from .game import (
    Player,
    Refused,
    Sample,
    audit_summary,
    cuda_devices,
    fidelity,
    float64_twin,
    gradient,
    hessian_vector,
    unfaithful_message,
)

logger = logging.getLogger(__name__)

class AuditedEngine(Protocol):
    """What the audit reads of the engine (it writes nothing; its hooks are paused in a replay)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    table: Any  # the parameter table
    rule: Any  # the value rule; update: the optimizer's rule
    update: Any
    config: Any
    ddp: Any
    hooks: Any


class StepAudit:
    """The audit inside a :class:`~inrun.tracking.engine.StepEngine` (see the module docstring).

    The engine calls :meth:`open_microbatch` before the user's forward of a micro-batch,
    :meth:`close_microbatch` after its backward with the model's calls its
    :class:`~inrun.tracking.replay.RootCalls` kept (their output gradients are kept while
    :attr:`recording`), and :meth:`at_step` from the optimizer's pre-step hook once the step is
    valued (parameters and optimizer state still those before the step).
    """

    def __init__(self, config: AuditConfig, engine: AuditedEngine, val_loss: Any) -> None:
        if engine.ddp is not None:
            raise AuditError(
                "the audit does not run under DistributedDataParallel yet (its game would need every "
                "rank's examples); audit a single-process run, or pass audit=None"
            )
        self.config = config
        self.engine = engine
        self.val_loss = val_loss
        self.recording = False
        """Whether the micro-batch being recorded belongs to an audited step."""
        self.steps: list[dict[str, Any]] = []
        """One row per audited step (columns :data:`STEP_COLUMNS`)."""
        self._values: list[dict[str, Any]] = []
        self.warned = False
        self._told: set[str] = set()
        self._sample: Sample | None = None
        self._baseline: list[Tensor | None] | None = None
        self._waiting: list[tuple[Window, list[int], int]] = []  # (window, player positions, first value row)
        self._precision: Precision = config.precision
        self._clock = time.perf_counter()
        self._spent = 0.0  # seconds the audit took in this process (the budget's numerator)

    # ------------------------------------------------------------------ micro-batches
    def open_microbatch(self, window: Window, ids: list) -> None:
        step = window.step
        if not self.config.due(step):
            return
        if self._sample is None or self._sample.step != step:
            seed = np.random.SeedSequence([self.config.seed, step])
            self._sample = Sample(step, self.config.players, np.random.default_rng(seed))
            budget = self.config.budget
            elapsed = time.perf_counter() - self._clock
            if budget is not None and self._spent > budget * elapsed:
                self._sample.skipped = (
                    f"over the time budget: the audit took {self._spent:.1f} s of {elapsed:.1f} s "
                    f"(> {budget:.0%})"
                )
        if self._sample.skipped is not None:
            return
        # The micro-batch's own gradient is p.grad after it minus p.grad before it (accumulation).
        with torch.no_grad():
            self._baseline = [None if p.grad is None else p.grad.detach().clone() for p in self.engine.table.params]
        self.recording = True

    def close_microbatch(self, ids: list, error: BaseException | None, calls: list[RootCall]) -> None:
        if not self.recording:
            return
        self.recording = False
        sample, baseline, self._baseline = self._sample, self._baseline, None
        if sample is None or sample.refused is not None:
            return
        if error is not None:
            sample.refused = f"{type(error).__name__} inside tracker.step()"
            return
        offset = sample.seen
        entered = sample.offer(ids)
        if not entered:
            return
        t0 = time.perf_counter()
        try:
            self._player_gradients(calls, entered, offset, len(ids), baseline)
        except Refused as exc:
            sample.refused = str(exc)
        sample.seconds += time.perf_counter() - t0

    def _player_gradients(
        self, calls: list[RootCall], players: list[Player], offset: int, batch: int, baseline: list[Tensor | None] | None,
    ) -> None:
        """Each entering player's exact gradient (rows ``position − offset`` of this micro-batch of
        ``batch`` rows), and the check that the micro-batch's rows add up to its gradient."""
        table = self.engine.table
        if not any(g is not None for c in calls for g in c.grads):
            raise Refused(
                "no output of the model with one row per example received a gradient (the model "
                "returns only a loss?): per-example gradients cannot be taken from its outputs"
            )
        rows = [p.position - offset for p in players]
        dtype = table.dtype
        weights = torch.zeros(len(rows) + 1, batch, dtype=dtype)
        for r, row in enumerate(rows):
            weights[r, row] = 1.0
        weights[-1] = 1.0  # the whole micro-batch: the completeness check
        with self.engine.hooks.paused(), torch.random.fork_rng(devices=cuda_devices(table.params)):
            got = weighted_gradients(calls, table.params, weights.to(table.device))
        with torch.no_grad():
            for p_index, (p, g) in enumerate(zip(table.params, got)):
                before = None if baseline is None else baseline[p_index]
                actual = p.grad if before is None or p.grad is None else p.grad - before
                if actual is None:
                    actual = torch.zeros_like(p)
                total = g[-1]
                tol = (1e-9 if dtype == torch.float64 else 1e-3) * float(actual.norm() + total.norm()) + 1e-30
                if float((total - actual).norm()) > tol:
                    raise Refused(
                        f"the per-example gradients from the model's outputs do not add up to the "
                        f"gradient of parameter {table.names[p_index]!r} (a loss term that does not pass "
                        "through the model's outputs, e.g. a penalty on the parameters?)"
                    )
        for r, player in enumerate(players):
            player.grads = [g[r] for g in got]

    # ------------------------------------------------------------------ the step
    def at_step(self, window: Window, ratio: Tensor, refused: str | None = None) -> None:
        """Audit ``window`` if due, before the step; ``refused``: why its game cannot be audited."""
        sample = self._sample
        if sample is None or sample.step != window.step:
            return
        self._sample = None
        sample.refused = sample.refused or refused
        if window.state is not StepState.VALUED:
            return
        players = sorted(sample.slots, key=lambda p: p.position)
        row = self._base_row(window, len(players), sample.seen)
        self._spent += sample.seconds
        if sample.skipped is not None:
            row.update(status="skipped", reason=sample.skipped)
            self.steps.append(row)
            return
        if sample.refused is None and any(p.grads is None for p in players):
            sample.refused = "a player's gradient is missing"
        if sample.refused is not None:
            row.update(status="refused", reason=sample.refused, seconds_gradients=sample.seconds)
            self.steps.append(row)
            self._tell(f"audit of step {window.step} refused: {sample.refused}")
            return
        t0 = time.perf_counter()
        try:
            with self.engine.hooks.paused(), torch.random.fork_rng(devices=cuda_devices(self.engine.table.params)):
                result = self._game(window, players, ratio)
        except Refused as exc:
            row.update(status="refused", reason=str(exc), seconds_gradients=sample.seconds)
            self.steps.append(row)
            self._tell(f"audit of step {window.step} refused: {exc}")
            return
        exact_values, stderr, approx, method, evaluations = result
        self._spent += time.perf_counter() - t0
        numbers = fidelity(exact_values, approx, stderr)
        flagged = len(players) >= 4 and numbers["rel_rmse"] > self.config.warn_rmse + 2 * numbers["noise"]
        row.update(
            status="ok", method=method, utility=float(exact_values.sum()),
            stderr=float(np.mean(stderr)) if len(stderr) else 0.0, evaluations=evaluations,
            seconds_gradients=sample.seconds, seconds_game=time.perf_counter() - t0, flagged=bool(flagged),
            **{k: numbers[k] for k in ("pearson", "spearman", "rel_rmse", "noise", "efficiency_gap", "rms_exact")},
        )
        self.steps.append(row)
        first_row = len(self._values)
        for p, e, s, a in zip(players, exact_values, stderr, approx):
            self._values.append({"step": window.step, "id": p.id, "exact": float(e), "stderr": float(s),
                                "tracker": float(a), "ledger": math.nan})
        self._waiting.append((window, [p.position for p in players], first_row))
        self.fill_ledger()
        if flagged and not self.warned:
            self.warned = True
            logger.warning(self._message(row))

    def _base_row(self, window: Window, players: int, batch: int) -> dict[str, Any]:
        rule = self.engine.rule
        return {
            "step": window.step, "status": "", "reason": "", "method": "", "players": players, "batch": batch,
            "game": "full" if players == batch else "sub", "noise": math.nan, "data_free": math.nan,
            "step_utility": math.nan, "step_values": math.nan,
            "order": rule.order, "variant": "first order" if rule.correction == "none" else rule.correction,
            "rule": self.engine.update.name, "lr": float(self.engine.optimizer.param_groups[0]["lr"]),
            "utility": math.nan, "rms_exact": math.nan, "stderr": math.nan, "pearson": math.nan,
            "spearman": math.nan, "rel_rmse": math.nan, "efficiency_gap": math.nan, "evaluations": 0,
            "seconds_gradients": 0.0, "seconds_game": 0.0, "flagged": False,
        }

    def _message(self, row: dict[str, Any]) -> str:
        table = self.engine.table
        nonlinear = self.engine.update.nonlinear_step(table.params, table.grads())
        return unfaithful_message(row, nonlinear, self.config.warn_below)

    def _tell(self, message: str) -> None:
        key = message.split(":", 1)[-1]
        if key not in self._told:
            self._told.add(key)
            logger.warning(message)

    def fill_ledger(self) -> None:
        """Copy the ledger's values of audited examples once their steps are final (trapezoid:
        after the next validation pass), and beside each audited step what its game cannot see:
        the step's data-free part, its whole batch's utility ``U_t(B)`` and Σ values (its drop row)."""
        missing = {r["step"] for r in self.steps if r["status"] == "ok" and math.isnan(r["step_utility"])}
        if missing:
            drops = {d["step"]: d for d in self.engine.accounts.drops.rows if d["step"] in missing}
            for r in self.steps:
                if r["step"] in drops and r["status"] == "ok":
                    d = drops[r["step"]]
                    r.update(data_free=d["data_free"], step_utility=d["utility"], step_values=d["values"])
        still = []
        for window, positions, first_row in self._waiting:
            if window.state is StepState.COMMITTED:
                values = np.asarray(window.first).sum(axis=1)
                if window.second is not None:
                    values = values + np.asarray(window.second).sum(axis=1)
                for k, pos in enumerate(positions):
                    self._values[first_row + k]["ledger"] = float(values[pos])
            elif window.state is not StepState.SKIPPED:
                still.append((window, positions, first_row))
        self._waiting = still

    # ------------------------------------------------------------------ the game
    def _game(self, window: Window, players: list[Player], ratio: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
        eng = self.engine
        table = eng.table
        names = table.names
        model, theta = self._model()
        dtype = next(iter(theta.values())).dtype
        per_example = {n: torch.stack([p.grads[i] for p in players]).to(dtype) for i, n in enumerate(names)}
        factors = {n: float(ratio[i]) for i, n in enumerate(names)}
        update = exact.optimizer_update(eng.module, eng.optimizer, grad_factor=factors, start=theta)
        eval_mode = eng.config.val_mode == "eval"
        game = exact.StepGame(model, self.val_loss, per_example, update, eval_mode=eval_mode, chunk_size=None)
        m = len(players)
        if m <= self.config.max_exact:
            values = exact.enumerate_shapley(game.utility, m)
            stderr = torch.zeros_like(values)
            method, evaluations = "enumeration", 2**m
        else:
            est = exact.monte_carlo_shapley(game.utility, m, self.config.permutations, antithetic=True,
                                            seed=self.config.seed * 1_000_003 + window.step)
            values, stderr, method, evaluations = est.values, est.stderr, est.method, est.evaluations
        approx = self._tracker_values(model, theta, per_example, ratio, update, eval_mode)
        return values.numpy(), stderr.numpy(), approx.numpy(), method, evaluations

    def _model(self) -> tuple[nn.Module, dict[str, Tensor]]:
        """The model the game is evaluated on and its parameters ``θ_t`` by name."""
        module = self.engine.module
        if self._precision == "float64" and self.engine.table.dtype != torch.float64:
            try:
                twin = float64_twin(module)
                theta = exact.trainable_parameters(twin)
                with torch.no_grad(), evaluating(twin, self.engine.config.val_mode == "eval"):
                    self.val_loss(twin)
                return twin, theta
            except (RuntimeError, TypeError, ValueError) as exc:
                self._precision = "model"
                logger.warning("audit: the float64 copy of the model cannot run val_loss (%s); the audit "
                               "evaluates its game in the model's dtype", exc)
        return module, exact.trainable_parameters(module)

    def _tracker_values(
        self, model: nn.Module, theta: dict[str, Tensor], per_example: dict[str, Tensor], ratio: Tensor,
        update: exact.UpdateFn, eval_mode: bool,
    ) -> Tensor:
        """The tracker's value rule applied to the players' game (see the module docstring)."""
        eng = self.engine
        table, rule, upd = eng.table, eng.rule, eng.update
        names = table.names
        dtype = next(iter(theta.values())).dtype
        loss_module = exact.LossModule(model, self.val_loss)
        summed = {n: g.sum(dim=0) for n, g in per_example.items()}  # Σ_{z∈P} g_z
        shift = upd.data_free_step(table.params)
        start = {n: theta[n] + (0 if shift is None else shift[i].to(dtype)) for i, n in enumerate(names)}
        with evaluating(model, eval_mode):
            g_start = gradient(loss_module, start)
        # per parameter: the weight w_p of the dot <g_z, w_p(g_val)>: a scalar c_p, −r D_p, or −r Jᵀ
        if upd.elementwise:
            x = [(ratio[i].to(p.dtype) * summed[n].to(p.dtype)) for i, (n, p) in enumerate(zip(names, table.params))]
            slopes = upd.pullbacks(table.params, x)
            weights: list[Any] = [
                torch.zeros_like(theta[n]) if s is None else scaled(s if callable(s) else s.to(dtype), -ratio[i].to(dtype))
                for i, (n, s) in enumerate(zip(names, slopes))
            ]
        else:
            coef = upd.scalar_coefficients(table.params) * ratio.to(torch.float64).cpu()
            weights = list(coef)

        def values_with(vectors: Mapping[str, Tensor]) -> Tensor:
            total = torch.zeros(next(iter(per_example.values())).shape[0], dtype=torch.float64)
            for i, n in enumerate(names):
                v = weigh(weights[i], vectors[n].unsqueeze(0))[0]
                total += (per_example[n].flatten(1).double() @ v.flatten().double()).cpu()
            return total

        first = values_with(g_start)
        if rule.correction == "none":
            return first
        if rule.correction == "trapezoid":
            delta = update({n: g.unsqueeze(0) for n, g in summed.items()})  # Δ(P), the real rule
            end = {n: theta[n] + delta[n][0] for n in names}
            with evaluating(model, eval_mode):
                g_end = gradient(loss_module, end)
            return (first + values_with(g_end)) / 2
        # Hessian: first − ½ <g_z, c ⊙ H (c ⊙ Σ_P g_z)>, H at θ + f(0)
        direction = {n: weights[i] * summed[n] for i, n in enumerate(names)}
        with evaluating(model, eval_mode):
            hv = hessian_vector(loss_module, start, direction)
        return first - 0.5 * values_with(hv)

    # ------------------------------------------------------------------ results
    @property
    def values(self) -> list[dict[str, Any]]:
        """One row per audited example (columns :data:`VALUE_COLUMNS`); ``ledger`` is NaN until
        the step's values are final (a trapezoid step: after the next validation pass)."""
        self.fill_ledger()
        return self._values

    def summary(self) -> dict[str, Any]:
        """Headline numbers over the audited steps (see :func:`audit_summary`)."""
        self.fill_ledger()
        return audit_summary(self.steps, self.config)

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (lists of rows, the warned flag, the settings)."""
        self.fill_ledger()
        return {"config": self.config.to_dict(), "steps": [dict(r) for r in self.steps],
                "values": [dict(r) for r in self._values], "warned": self.warned}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = AuditConfig.of(dict(state.get("config", {})))
        if saved != self.config:
            logger.info("resuming with other audit settings (%s, was %s): earlier audit rows are kept", self.config, saved)
        self.steps = [dict(r) for r in state.get("steps", [])]
        self._values = [dict(r) for r in state.get("values", [])]
        self.warned = bool(state.get("warned", False))
        self._sample, self._waiting = None, []

    def close(self) -> None:
        self.recording = False
