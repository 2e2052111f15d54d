"""Exceptions raised by inrun. Each message says what went wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class InRunError(Exception):
    """Base class of every error inrun raises on purpose."""


class UnsupportedOptimizerError(InRunError, TypeError):
    """The optimizer (or one of its settings) has no attribution rule."""


class UnsupportedModuleError(InRunError, TypeError):
    """A module cannot be valued per example (e.g. BatchNorm in training mode)."""


class UnsupportedSettingError(InRunError, ValueError):
    """A combination of settings and step arguments that has no exact value (the message names the
    combination and what to change)."""


class BatchMismatchError(InRunError, ValueError):
    """The ids given to ``tracker.step`` do not match the batch the model saw."""


class ValidationLossError(InRunError, ValueError):
    """``val_loss(model)`` returned something that cannot be differentiated or valued."""


class StepOrderError(InRunError, RuntimeError):
    """``tracker.step`` / backward / ``optimizer.step`` were called in an order that cannot be valued."""


class GradientChangeError(StepOrderError):
    """A gradient was changed between the ``tracker.step`` block and ``optimizer.step()`` in a way
    no rule values (not a rescaling, not value clipping, not inside ``tracker.unattributed()``)."""


class ConsistencyError(InRunError, RuntimeError):
    """The per-example values of a step do not add up to the batch gradient autograd computed.

    This means a parameter is used in a way the tracker does not see (for example a weight
    read directly in a parent module's ``forward``), or examples interact inside the model.
    """


class NonFiniteError(InRunError, FloatingPointError):
    """A loss, gradient or value of a step is NaN or infinite."""


class NonFiniteValidationLossError(ValidationLossError, NonFiniteError):
    """``val_loss(model)`` is NaN or infinite: the parameters diverged, or the validation data
    holds NaN/Inf. Caught as either parent."""


class LedgerError(InRunError, ValueError):
    """A saved ledger or run directory does not match what it is being combined with."""


class RunDirError(LedgerError):
    """A directory is not a run, or does not match the run it is combined with."""


class RunInUseError(RunDirError):
    """Another process is training in this run directory."""

    def __init__(self, message: str, holder: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.holder = dict(holder)
        self.hint = "wait for it to finish, or stop it (Ctrl-C or kill) and then resume"


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (or an exception's message) on one line, cut to ``limit`` characters with "…"."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def cause(exc: BaseException, limit: int = 300) -> str:
    """What ended something, in one line: an inrun error's message; an OS error's reason and the
    path it concerns; any other error as ``Type: message``."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return one_line(text if isinstance(exc, InRunError) else f"{type(exc).__name__}: {text}", limit)
