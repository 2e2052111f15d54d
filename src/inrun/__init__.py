"""inrun: In-Run Data Shapley, the value of every training example to the run that uses it.

>>> from inrun import InRunShapley                                          # doctest: +SKIP
>>> tracker = InRunShapley(model, optimizer, val_loss=lambda m: m(**val).loss)  # doctest: +SKIP

The package is built on floors, each importing only from those below it: the ground floor
(``errors``, ``modes``, ``files``, ``shapley``, ``optim``, ``layers``, ``exact``), :mod:`inrun.tracking` (the
life of a step and the audit), :mod:`inrun.store` (the ledger, run directories and their one
writer), :mod:`inrun.tracker` (the facade), :mod:`inrun.run` (``inrun train``),
:mod:`inrun.analysis` (reports, views, inspect, curate), :mod:`inrun.integrations` and
:mod:`inrun.cli`. README.md's module map says which file to open for a change.
"""

from .errors import (
    BatchMismatchError,
    ConsistencyError,
    GradientChangeError,
    InRunError,
    LedgerError,
    NonFiniteError,
    StepOrderError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
    UnsupportedSettingError,
    ValidationLossError,
)
from .store.ledger import PerValidation, ValueLedger, ValueTable
from .store.rundir import RunDir
from .store.writer import RunWriter
from .tracker import AuditConfig, CoupledLoss, Coverage, InRunShapley, StepCost, TrackerConfig
from .version import __version__

__all__ = [
    "AuditConfig",
    "BatchMismatchError",
    "ConsistencyError",
    "CoupledLoss",
    "Coverage",
    "GradientChangeError",
    "InRunError",
    "InRunShapley",
    "LedgerError",
    "NonFiniteError",
    "PerValidation",
    "RunDir",
    "RunWriter",
    "StepCost",
    "StepOrderError",
    "TrackerConfig",
    "UnsupportedModuleError",
    "UnsupportedOptimizerError",
    "UnsupportedSettingError",
    "ValidationLossError",
    "ValueLedger",
    "ValueTable",
    "__version__",
]
