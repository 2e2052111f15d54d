"""The audit: the run checks its own values against exact Shapley values of sampled steps.

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
