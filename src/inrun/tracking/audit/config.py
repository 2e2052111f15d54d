"""The audit's settings (:class:`AuditConfig`, ``[audit]`` in a run config) and the columns of its rows.

See :mod:`inrun.tracking.audit` for what the audit does and docs/audit.md for the numbers.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ... import exact
from ...errors import InRunError
from ..config import setting

Precision = Literal["float64", "model"]
PRECISIONS = ("float64", "model")

STEP_COLUMNS = (
    "step", "status", "reason", "method", "game", "players", "batch", "order", "variant", "rule", "lr",
    "utility", "rms_exact", "stderr", "pearson", "spearman", "rel_rmse", "noise", "efficiency_gap",
    "evaluations", "seconds_gradients", "seconds_game", "flagged", "data_free", "step_utility", "step_values",
)
VALUE_COLUMNS = ("step", "id", "exact", "stderr", "tracker", "ledger")


class AuditError(InRunError, ValueError):
    """An audit setting is invalid, or the audit cannot run with this model or training setup."""


@dataclass(frozen=True)
class AuditConfig:
    """When and how the run checks its own values against exact Shapley values."""

    every: int = setting(100, "audit steps every, 2*every, ... (0: only the steps in 'at')")
    """Audit steps ``every, 2·every, ...`` (0: only the steps in ``at``)."""
    at: tuple[int, ...] = setting((), "further steps to audit (0-based; step 0 only if named)")
    """Further steps to audit (0-based optimizer steps; step 0 is audited only if named here)."""
    players: int = setting(32, "the players of an audited step: all of its examples when it has at most this many "
                               "(its full game), else this many drawn (a sub-game, its distance to the full game shown)")
    """The players of an audited step: every example of the step when it has at most this many
    (the step's own game, whose exact values the ledger's are compared with), else this many
    drawn uniformly (a sub-game: the step as if only they were in the batch; its distance to the
    full game is shown beside it: the full step's utility ``U_t(B)`` and Σ of its values)."""
    max_exact: int = setting(12, "enumerate every subset up to this many players; Monte Carlo beyond")
    """Enumerate every subset up to this many players; Monte Carlo beyond."""
    permutations: int = setting(16, "Monte-Carlo permutations beyond max_exact players (even: antithetic pairs)")
    """Monte-Carlo permutations when the players are more than ``max_exact``: an even number,
    sampled in antithetic pairs (each with its reverse: exact for the quadratic part of the game;
    on the ``make demo`` run 32 of them left a noise of 0.2-0.7% of the values' scale)."""
    seed: int = setting(0, "seed of the players' draw and of the permutations (with the step)")
    """Seed of the players' draw and of the permutations (with the step number)."""
    warn_below: float = setting(0.7, "a flagged step's warning names the ranking when Pearson is below this")
    """A flagged step's warning names the ranking when Pearson is below this (see ``warn_rmse``)."""
    warn_rmse: float = setting(0.3, "a step is unfaithful when the relative RMSE exceeds this by more than twice the noise")
    """A step is unfaithful when the relative RMSE of the tracker's values against the game's exact
    ones exceeds this by more than twice the Monte-Carlo noise (``noise``; 0 when enumerated):
    a uniform overshoot is as unfaithful as a wrong ranking."""
    precision: Precision = setting("float64", "'float64' (the game on a float64 copy of the model) or 'model' (its dtype)")
    """``"float64"``: the game on a float64 copy of the model (a utility is a difference of two
    nearby losses: float32 rounding would blur small steps); ``"model"``: in the model's dtype."""
    budget: float | None = setting(None, "at most this share of the run's wall time goes to the audit (a due step over it is skipped); none: no limit")
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
        if self.permutations < 4 or self.permutations % 2:
            raise AuditError(f"audit.permutations={self.permutations}: an even number, at least 4 (antithetic "
                             "pairs, at least two for a standard error)")
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
