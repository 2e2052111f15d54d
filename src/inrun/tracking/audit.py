"""The run's own audit: exact Shapley values of sampled steps, next to the tracker's values.

The values are a Taylor approximation of each step's Shapley value; how good it is depends on the
learning rate, the optimizer and the moment of training (docs/fidelity.md). The audit measures it
inside the run, on the run's own steps, without changing them.

**Which steps.** Every ``every`` optimizer steps (steps ``every, 2·every, ...``; step 0 only if
named) and at the steps named in ``at``.

**The players.** ``m = min(players, B)`` examples of the step's ``B``, drawn uniformly (reservoir
sampling over the step's micro-batches, seeded by ``(seed, step)``: the same players whenever the
run is repeated or resumed).

**The game** of an audited step ``t`` over the players ``P``, for ``S ⊆ P``::

    U(S) = L_val(θ_t) − L_val(θ_t + Δ(S)),   Δ(S) = F_t(r ⊙ Σ_{z∈S} g_z)

* ``g_z``: example ``z``'s exact gradient at ``θ_t`` (the gradient of its share of the loss the
  user back-propagated), by replaying the model's own calls of the micro-batch
  (:mod:`inrun.tracking.replay`: same inputs, same dropout masks) and plain autograd, independent
  of the tracker's per-layer routes. A completeness check refuses the audit when the players'
  gradients cannot be exact: ``Σ_z g_z`` over the micro-batch must equal the gradient autograd
  accumulated (it does not when a loss term bypasses the model's outputs, e.g. a penalty on the
  parameters).
* ``r``: the per-parameter factor the loop applied between backward and the step (gradient
  clipping, unscaling), as the step saw it.
* ``F_t``: the *real* optimizer step from the optimizer's state before step ``t`` (learning rate
  of the schedule at ``t``, momentum, Adam's moments, weight decay): a scratch copy of the
  optimizer, its state restored for every subset (:func:`inrun.exact.optimizer_update`).
  ``Δ(∅) = F_t(0)`` is the data-free move (momentum, weight decay); it shifts every subset alike
  and leaves the Shapley values unchanged.
* ``L_val``: the tracker's ``val_loss`` (summed over columns), in the tracker's validation mode.

The examples of the batch that are not players are *absent* from this game: it is the step as it
would have been taken with only the players' gradients (each still its share of the full batch's
loss). Its Shapley values are the exact ones (enumeration of all ``2^m`` subsets for
``m ≤ max_exact``, else ``permutations`` Monte-Carlo permutations with a standard error per
value: :mod:`inrun.exact`).

**The tracker's side** of the comparison is the tracker's own value rule applied to *the same
game*: the same order and variant (first order; trapezoid with ``g_val`` at ``θ_t + F_t(0)`` and at
``θ_t + Δ(P)``; Hessian), the same update rule (SGD coefficient; Adam's secant or fixed-state slope
at ``x_P = r ⊙ Σ_{z∈P} g_z``; the SGD proxy), from the players' exact gradients. When the players
are the whole batch this *is* the ledger's value of each example for the step, and so it is for
first-order values of SGD-type rules with any players; the ledger's value is stored beside it.
Why not compare with the ledger when ``m < B``: the exact game of the whole batch needs ``2^B``
evaluations, and the ledger's second-order and Adam values depend on the rest of the batch. The
sub-batch step is shorter than the real one (about ``m/B`` of it with SGD), so its Taylor error is
smaller: with ``m < B`` the audit can be optimistic; ``players ≥ B`` audits the real step (exact up
to ``max_exact`` examples, Monte Carlo beyond).

**Numbers per audited step**: Pearson and Spearman correlation of the tracker's values with the
exact ones, relative RMSE ``‖φ̂ − φ‖ / ‖φ‖``, the efficiency gap ``(Σ φ̂ − Σ φ) / Σ |φ|``
(``Σ φ = U(P) − U(∅)``), and the cost (utility evaluations, seconds). A step is *unfaithful*
when Pearson ``< warn_below`` and relative RMSE ``> warn_rmse``; the first one is logged as a
warning, once, with the numbers.

**It never changes training.** Parameters are read, never written (the game runs on a float64
copy of the model by default, or functionally); the replay restores buffers and uses its own copy
of the random-number state; every random number of the audit comes from a forked generator; the
user's gradients and the optimizer's state are not touched (autograd.grad and a scratch optimizer).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import exact
from ..errors import InRunError
from ..modes import evaluating
from .replay import RootCall, weighted_gradients
from .state import StepState, Window

logger = logging.getLogger(__name__)

Precision = Literal["float64", "model"]
PRECISIONS = ("float64", "model")

STEP_COLUMNS = (
    "step", "status", "reason", "method", "players", "batch", "order", "variant", "rule", "lr",
    "utility", "rms_exact", "stderr", "pearson", "spearman", "rel_rmse", "efficiency_gap",
    "evaluations", "seconds_gradients", "seconds_game", "flagged",
)
VALUE_COLUMNS = ("step", "id", "exact", "stderr", "tracker", "ledger")


class AuditError(InRunError, ValueError):
    """An audit setting is invalid, or the audit cannot run with this model or training setup."""


@dataclass(frozen=True)
class AuditConfig:
    """When and how the run checks its own values against exact Shapley values."""

    every: int = 100
    """Audit steps ``every, 2·every, ...`` (0: only the steps in ``at``)."""
    at: tuple[int, ...] = ()
    """Further steps to audit (0-based optimizer steps; step 0 is audited only if named here)."""
    players: int = 8
    """Examples drawn from the step's batch (all of them if the batch is smaller)."""
    max_exact: int = 12
    """Enumerate every subset up to this many players; Monte Carlo beyond."""
    permutations: int = 256
    """Monte-Carlo permutations when the players are more than ``max_exact``."""
    seed: int = 0
    """Seed of the players' draw and of the permutations (with the step number)."""
    warn_below: float = 0.7
    """A step is unfaithful when Pearson is below this and relative RMSE above ``warn_rmse``."""
    warn_rmse: float = 0.3
    """See ``warn_below``."""
    precision: Precision = "float64"
    """``"float64"``: the game on a float64 copy of the model (a utility is a difference of two
    nearby losses: float32 rounding would blur small steps); ``"model"``: in the model's dtype."""
    budget: float | None = None
    """At most this share of the wall time since the tracker was made goes to the audit: a due
    step is skipped (and recorded as such) while the audit has spent more. ``None``: no limit."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", tuple(sorted({int(s) for s in self.at})))
        if self.every < 0:
            raise AuditError(f"audit.every={self.every}: must be >= 0 (0: only the steps in audit.at)")
        if any(s < 0 for s in self.at):
            raise AuditError(f"audit.at={list(self.at)}: steps are 0-based, so >= 0")
        if self.players < 2:
            raise AuditError(f"audit.players={self.players}: must be at least 2 (a game of one player has no ranking)")
        if not 1 <= self.max_exact <= exact.MAX_ENUMERATION:
            raise AuditError(f"audit.max_exact={self.max_exact}: must be in [1, {exact.MAX_ENUMERATION}]")
        if self.permutations < 2:
            raise AuditError(f"audit.permutations={self.permutations}: must be at least 2 (for a standard error)")
        if not -1 <= self.warn_below <= 1:
            raise AuditError(f"audit.warn_below={self.warn_below}: a correlation, in [-1, 1]")
        if not self.warn_rmse > 0:
            raise AuditError(f"audit.warn_rmse={self.warn_rmse}: must be > 0")
        if self.precision not in PRECISIONS:
            raise AuditError(f"audit.precision={self.precision!r} is not one of {PRECISIONS}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise AuditError(f"audit.budget={self.budget}: a share of the run's time, in (0, 1] (or None: no limit)")

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is audited."""
        return (self.every > 0 and step > 0 and step % self.every == 0) or step in self.at

    def evaluations(self, players: int) -> int:
        """Utility evaluations one audit of ``players`` players costs (its bound)."""
        m = min(players, self.players)
        return 2**m if m <= self.max_exact else self.permutations * m + 1

    @classmethod
    def of(cls, value: AuditConfig | Mapping[str, Any] | bool | None) -> AuditConfig | None:
        """``None``/``False``: no audit; ``True``: the defaults; a mapping: these settings."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise AuditError(f"audit must be an AuditConfig, a dict of its settings, True or None; got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        for name in value:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are {known}"
                raise AuditError(f"unknown audit setting {name!r}{hint}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["at"] = list(self.at)
        return d


# ----------------------------------------------------------------------------- fidelity numbers
def fidelity(exact_values: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, relative RMSE and efficiency gap of ``approx`` against ``exact_values``."""
    e, a = np.asarray(exact_values, np.float64), np.asarray(approx, np.float64)
    scale = float(np.sqrt(np.mean(e**2)))
    abs_sum = float(np.abs(e).sum())
    return {
        "pearson": _pearson(e, a),
        "spearman": _pearson(_ranks(e), _ranks(a)),
        "rel_rmse": float(np.sqrt(np.mean((a - e) ** 2)) / scale) if scale > 0 else math.nan,
        "efficiency_gap": float((a.sum() - e.sum()) / abs_sum) if abs_sum > 0 else math.nan,
        "rms_exact": scale,
    }


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx**2).sum()) * float((dy**2).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank (as Spearman needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    end = np.cumsum(counts)
    return ((end - counts + end - 1) / 2.0)[inverse]


# ----------------------------------------------------------------------------- the players
@dataclass
class _Player:
    position: int  # row in the step (over its micro-batches, in order)
    id: Any
    grads: list[Tensor] | None = None  # per trainable parameter, the example's exact gradient


@dataclass
class _Sample:
    """The players of one audited step: a uniform reservoir over the step's rows."""

    step: int
    size: int
    rng: np.random.Generator
    seen: int = 0
    slots: list[_Player] = field(default_factory=list)
    refused: str | None = None
    skipped: str | None = None  # not audited at all (over the time budget)
    seconds: float = 0.0

    def offer(self, ids: Sequence[Any]) -> list[_Player]:
        """Let a micro-batch's rows into the reservoir; the players that entered and stayed."""
        entered: dict[int, _Player] = {}
        for i in ids:
            player = _Player(self.seen, i)
            if len(self.slots) < self.size:
                self.slots.append(player)
                entered[id(player)] = player
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.size:
                    entered.pop(id(self.slots[j]), None)
                    self.slots[j] = player
                    entered[id(player)] = player
            self.seen += 1
        return list(entered.values())


# ----------------------------------------------------------------------------- the audit
class StepAudit:
    """The audit inside a :class:`~inrun.tracking.engine.StepEngine` (see the module docstring).

    The engine calls :meth:`open_microbatch` before the user's forward of a micro-batch,
    :meth:`close_microbatch` after its backward with the model's calls its
    :class:`~inrun.tracking.replay.RootCalls` kept (their output gradients are kept while
    :attr:`recording`), and :meth:`at_step` from the optimizer's pre-step hook once the step is
    valued (parameters and optimizer state still those before the step).
    """

    def __init__(self, config: AuditConfig, engine: Any, val_loss: Any) -> None:
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
        self._sample: _Sample | None = None
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
            self._sample = _Sample(step, self.config.players, np.random.default_rng(seed))
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
        except _Refused as exc:
            sample.refused = str(exc)
        sample.seconds += time.perf_counter() - t0

    def _player_gradients(
        self, calls: list[RootCall], players: list[_Player], offset: int, batch: int, baseline: list[Tensor | None] | None,
    ) -> None:
        """Each entering player's exact gradient (rows ``position − offset`` of this micro-batch of
        ``batch`` rows), and the check that the micro-batch's rows add up to its gradient."""
        table = self.engine.table
        if not any(g is not None for c in calls for g in c.grads):
            raise _Refused(
                "no output of the model with one row per example received a gradient (the model "
                "returns only a loss?): per-example gradients cannot be taken from its outputs"
            )
        rows = [p.position - offset for p in players]
        dtype = table.dtype
        weights = torch.zeros(len(rows) + 1, batch, dtype=dtype)
        for r, row in enumerate(rows):
            weights[r, row] = 1.0
        weights[-1] = 1.0  # the whole micro-batch: the completeness check
        with self.engine.hooks.paused(), torch.random.fork_rng(devices=_cuda_devices(table.params)):
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
                    raise _Refused(
                        f"the per-example gradients from the model's outputs do not add up to the "
                        f"gradient of parameter {table.names[p_index]!r} (a loss term that does not pass "
                        "through the model's outputs, e.g. a penalty on the parameters?)"
                    )
        for r, player in enumerate(players):
            player.grads = [g[r] for g in got]

    # ------------------------------------------------------------------ the step
    def at_step(self, window: Window, ratio: Tensor) -> None:
        """Audit ``window`` if due: called with the parameters and optimizer state before the step."""
        sample = self._sample
        if sample is None or sample.step != window.step:
            return
        self._sample = None
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
            with self.engine.hooks.paused(), torch.random.fork_rng(devices=_cuda_devices(self.engine.table.params)):
                result = self._game(window, players, ratio)
        except _Refused as exc:
            row.update(status="refused", reason=str(exc), seconds_gradients=sample.seconds)
            self.steps.append(row)
            self._tell(f"audit of step {window.step} refused: {exc}")
            return
        exact_values, stderr, approx, method, evaluations = result
        self._spent += time.perf_counter() - t0
        numbers = fidelity(exact_values, approx)
        flagged = (
            len(players) >= 4 and numbers["pearson"] < self.config.warn_below
            and numbers["rel_rmse"] > self.config.warn_rmse
        )
        row.update(
            status="ok", method=method, utility=float(exact_values.sum()),
            stderr=float(np.mean(stderr)) if len(stderr) else 0.0, evaluations=evaluations,
            seconds_gradients=sample.seconds, seconds_game=time.perf_counter() - t0, flagged=bool(flagged),
            **{k: numbers[k] for k in ("pearson", "spearman", "rel_rmse", "efficiency_gap", "rms_exact")},
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
            "order": rule.order, "variant": "first order" if rule.correction == "none" else rule.correction,
            "rule": self.engine.update.name, "lr": float(self.engine.optimizer.param_groups[0]["lr"]),
            "utility": math.nan, "rms_exact": math.nan, "stderr": math.nan, "pearson": math.nan,
            "spearman": math.nan, "rel_rmse": math.nan, "efficiency_gap": math.nan, "evaluations": 0,
            "seconds_gradients": 0.0, "seconds_game": 0.0, "flagged": False,
        }

    def _message(self, row: dict[str, Any]) -> str:
        what = f"order-{row['order']} values"
        if row["rule"] == "sgd_proxy":
            what += " (SGD proxy)"
        elif row["rule"] == "adam":
            what += " (Adam-aware)"
        if row["rule"] == "sgd_proxy":
            advice = "the SGD proxy does not follow this optimizer's step; value it with its own rule (proxy=None)"
        elif self._first_adam_step():
            advice = ("it is the optimizer's first Adam step, whose update (the second moment from this batch "
                      "alone) no linearization follows; later steps are audited as they come")
        elif row["order"] == 1:
            advice = "use order=2 or a smaller learning rate"
        else:
            advice = "use a smaller learning rate"
        return (
            f"{what} correlate r = {row['pearson']:.2f} with exact Shapley at step {row['step']} "
            f"(Spearman {row['spearman']:.2f}, relative RMSE {row['rel_rmse']:.2f}, {row['players']} examples, "
            f"lr {row['lr']:.3g}): {advice}"
        )

    def _first_adam_step(self) -> bool:
        opt = self.engine.optimizer
        if self.engine.update.name != "adam":
            return False
        return all("step" not in opt.state.get(p, {}) or float(opt.state[p]["step"]) == 0 for p in self.engine.table.params)

    def _tell(self, message: str) -> None:
        key = message.split(":", 1)[-1]
        if key not in self._told:
            self._told.add(key)
            logger.warning(message)

    def fill_ledger(self) -> None:
        """Copy the ledger's values of audited examples once their steps are final (trapezoid:
        after the next validation pass)."""
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
    def _game(self, window: Window, players: list[_Player], ratio: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
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
            est = exact.monte_carlo_shapley(game.utility, m, self.config.permutations,
                                            seed=self.config.seed * 1_000_003 + window.step)
            values, stderr, method, evaluations = est.values, est.stderr, est.method, est.evaluations
        approx = self._tracker_values(model, theta, per_example, ratio, update, eval_mode)
        return values.numpy(), stderr.numpy(), approx.numpy(), method, evaluations

    def _model(self) -> tuple[nn.Module, dict[str, Tensor]]:
        """The model the game is evaluated on and its parameters ``θ_t`` by name."""
        module = self.engine.module
        if self._precision == "float64" and self.engine.table.dtype != torch.float64:
            try:
                twin = _float64_twin(module)
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
        loss_module = _LossModule(model, self.val_loss)
        summed = {n: g.sum(dim=0) for n, g in per_example.items()}  # Σ_{z∈P} g_z
        shift = upd.data_free_step(table.params)
        start = {n: theta[n] + (0 if shift is None else shift[i].to(dtype)) for i, n in enumerate(names)}
        with evaluating(model, eval_mode):
            g_start = _gradient(loss_module, start)
        # per parameter: the weight w_p of the dot <g_z, w_p ⊙ g_val> (a scalar c_p, or −r D_p)
        if upd.elementwise:
            x = [(ratio[i].to(p.dtype) * summed[n].to(p.dtype)) for i, (n, p) in enumerate(zip(names, table.params))]
            slopes = upd.slopes(table.params, x)
            weights: list[Any] = [
                torch.zeros_like(theta[n]) if s is None else (-ratio[i].to(dtype) * s.to(dtype))
                for i, (n, s) in enumerate(zip(names, slopes))
            ]
        else:
            coef = upd.scalar_coefficients(table.params) * ratio.to(torch.float64).cpu()
            weights = [float(c) for c in coef]

        def values_with(vectors: Mapping[str, Tensor]) -> Tensor:
            total = torch.zeros(next(iter(per_example.values())).shape[0], dtype=torch.float64)
            for i, n in enumerate(names):
                v = weights[i] * vectors[n]
                total += (per_example[n].flatten(1).double() @ v.flatten().double()).cpu()
            return total

        first = values_with(g_start)
        if rule.correction == "none":
            return first
        if rule.correction == "trapezoid":
            delta = update({n: g.unsqueeze(0) for n, g in summed.items()})  # Δ(P), the real rule
            end = {n: theta[n] + delta[n][0] for n in names}
            with evaluating(model, eval_mode):
                g_end = _gradient(loss_module, end)
            return (first + values_with(g_end)) / 2
        # Hessian: first − ½ <g_z, c ⊙ H (c ⊙ Σ_P g_z)>, H at θ + f(0)
        direction = {n: weights[i] * summed[n] for i, n in enumerate(names)}
        with evaluating(model, eval_mode):
            hv = _hessian_vector(loss_module, start, direction)
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


class _Refused(Exception):
    """The audit of a step cannot be exact; the message says why."""


def audit_summary(steps: Sequence[Mapping[str, Any]], config: AuditConfig | None = None) -> dict[str, Any]:
    """Headline numbers of an audit: how many steps, how faithful, what it cost."""
    ok = [r for r in steps if r["status"] == "ok"]
    skipped = [r["step"] for r in steps if r["status"] == "skipped"]

    def median(key: str) -> float:
        xs = [r[key] for r in ok if r[key] is not None and np.isfinite(r[key])]
        return float(np.median(xs)) if xs else math.nan

    def worst(key: str) -> float:
        xs = [r[key] for r in ok if r[key] is not None and np.isfinite(r[key])]
        return float(min(xs)) if xs else math.nan

    flagged = [r["step"] for r in ok if r["flagged"]]
    return {
        "audited_steps": len(ok),
        "refused_steps": len(steps) - len(ok) - len(skipped),
        "skipped_steps": skipped,
        "flagged_steps": flagged,
        "median_pearson": median("pearson"),
        "median_spearman": median("spearman"),
        "median_rel_rmse": median("rel_rmse"),
        "worst_pearson": worst("pearson"),
        "worst_step": min(ok, key=lambda r: r["pearson"] if np.isfinite(r["pearson"]) else math.inf)["step"] if ok else None,
        "evaluations": int(sum(r["evaluations"] for r in steps)),
        "seconds": float(sum(r["seconds_gradients"] + r["seconds_game"] for r in steps)),
        "config": None if config is None else config.to_dict(),
    }


# ----------------------------------------------------------------------------- helpers
def _cuda_devices(params: Sequence[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _float64_twin(module: nn.Module) -> nn.Module:
    """A float64 copy of the model (gradients dropped), whose root casts floating inputs to float64.

    The copy keeps the model's own hooks (a user's hook may be part of its forward); the
    tracker's hooks in it do nothing while the tracker's capture is paused, as it is during the
    audit. Hooks that the copy's root needs for the inputs are added to the copy only.
    """
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.grad = None
    twin.to(torch.float64)

    def cast(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args), _cast_floats(kwargs)

    twin.register_forward_pre_hook(cast, with_kwargs=True)
    return twin


def _cast_floats(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v) for k, v in value.items()}
    return value


def _gradient(loss_module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``∇ L_val`` at ``params`` (by name), functionally: the model's own parameters untouched."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    with torch.enable_grad():
        loss = functional_call(loss_module, {"model." + n: t for n, t in leaves.items()}, ())
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])).detach() for n, g in zip(leaves, grads)}


def _hessian_vector(loss_module: nn.Module, params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``H v`` of ``L_val`` at ``params``: forward-over-reverse, attention on its math backend."""

    def loss_of(p: Mapping[str, Tensor]) -> Tensor:
        return functional_call(loss_module, {"model." + n: t for n, t in p.items()}, ())

    primal = {n: t.detach() for n, t in params.items()}
    tangent = {n: vector[n].to(t.dtype) for n, t in primal.items()}
    with sdpa_kernel([SDPBackend.MATH]):
        _, hv = jvp(grad(loss_of), (primal,), (tangent,))
    return {n: t.detach() for n, t in hv.items()}


class _LossModule(nn.Module):
    """``forward() = val_loss(model).sum()``, so ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, val_loss: Any) -> None:
        super().__init__()
        self.model = model
        self.val_loss = val_loss

    def forward(self) -> Tensor:
        return self.val_loss(self.model).sum()
