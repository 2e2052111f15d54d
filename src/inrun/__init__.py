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
from .ledger import PerValidation, ValueLedger, ValueTable
from .library_run import RunWriter
from .rundir import RunDir
from .tracker import AuditConfig, Coverage, InRunShapley, StepCost, TrackerConfig

__version__ = "0.1.0"

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
