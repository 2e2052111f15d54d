"""The run's own audit: exact Shapley values of sampled steps, next to the tracker's values.

The values are a Taylor approximation of each step's Shapley value; how good it is depends on the
learning rate, the optimizer and the moment of training (docs/fidelity.md). The audit measures it
inside the run, on the run's own steps, without changing them.

**Which steps.** Every ``every`` optimizer steps (steps ``every, 2·every, ...``; step 0 only if
named) and at the steps named in ``at``.

**The players.** Every example of the step (its own game) when the batch has at most ``players``;
else ``players`` of them, drawn uniformly (reservoir sampling over the step's micro-batches, seeded
by ``(seed, step)``: the same players whenever the run is repeated or resumed), with the full
step's utility and values shown beside the sub-game's.

**It never changes training.** Parameters are read, never written (the game runs on a float64
copy of the model by default, or functionally); the replay restores buffers and uses its own copy
of the random-number state; every random number of the audit comes from a forked generator; the
user's gradients and the optimizer's state are not touched (autograd.grad and a scratch optimizer).

=================  =========================================================================
``config``         ``AuditConfig`` (its settings, validated) and the columns of its rows
``game``           the game of an audited step, its exact values and the fidelity numbers
``step``           ``StepAudit``: the audit inside the engine (players, replay, the game)
=================  =========================================================================

What the audit measures and costs: docs/audit.md. Its rows on disk: :mod:`inrun.store.auditlog`.
"""

from .config import AuditConfig, AuditError
from .step import StepAudit

__all__ = ["AuditConfig", "AuditError", "StepAudit"]
