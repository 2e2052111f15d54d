"""inrun: In-Run Data Shapley, the value of every training example to the run that uses it.

>>> from inrun import InRunShapley                                          # doctest: +SKIP
>>> tracker = InRunShapley(model, optimizer, val_loss=lambda m: m(**val).loss)  # doctest: +SKIP
"""

from .errors import (
    BatchMismatchError,
    ConsistencyError,
    InRunError,
    LedgerError,
    NonFiniteError,
    StepOrderError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
    ValidationLossError,
)
from .store.ledger import PerValidation, ValueLedger, ValueTable
from .store.rundir import RunDir
from .store.writer import RunWriter
from .tracker import AuditConfig, Coverage, InRunShapley, StepCost, TrackerConfig
from .version import __version__

__all__ = [
    "AuditConfig",
    "BatchMismatchError",
    "ConsistencyError",
    "Coverage",
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
    "ValidationLossError",
    "ValueLedger",
    "ValueTable",
    "__version__",
]
