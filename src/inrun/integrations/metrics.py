"""Metrics of the values while training runs: to TensorBoard, or to any function of yours.

:func:`value_scalars` turns the values so far into a flat ``dict`` of named numbers (the value
distribution's quantiles, the share of negative values, the total of every source);
:class:`ValueMonitor` computes it every ``every`` optimizer steps and hands it to each callback
as ``callback(step, scalars)``. A callback that also has a ``histogram(step, values)`` method
gets the values themselves (that is how :class:`TensorBoardWriter` draws the distribution).
Anything else that produces numbers per step (the in-run audit's fidelity, your own) joins by
passing a function ``tracker -> dict[str, float]`` in ``sources``.

The Trainer (:class:`~inrun.integrations.hf.InRunTrainer`) adds the same scalars to its own logs,
so ``report_to="tensorboard"`` (or wandb, mlflow...) receives them; the Lightning callback sends
them to the Trainer's loggers.

The values are those committed so far: with the trapezoid (order 2) a step is committed when
the next one starts, so the scalars of step ``t`` include the values up to step ``t - 1``.

Example:
    >>> monitor = ValueMonitor(tracker, [TensorBoardWriter("runs/tb"), print], every=10)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store.ledger import ValueTable

if TYPE_CHECKING:
    from ..tracker import InRunShapley

logger = logging.getLogger(__name__)

__all__ = ["TensorBoardWriter", "ValueMonitor", "value_scalars"]

Callback = Callable[[int, dict[str, float]], Any]
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def value_scalars(values: ValueTable, *, prefix: str = "inrun/", max_sources: int = 20) -> dict[str, float]:
    """Named numbers that describe the values (of the examples valued at least once).

    Keys (with the default ``prefix``): ``inrun/examples_valued``, ``inrun/value_total``,
    ``inrun/value_mean``, ``inrun/value_std``, ``inrun/value_p01`` ... ``inrun/value_p99``,
    ``inrun/negative_share`` and ``inrun/source/<name>/total`` for the ``max_sources`` sources
    with the largest total in absolute value (examples without a source are ``(no source)``).
    """
    valued = values.counts > 0
    v = values.value[valued]
    out: dict[str, float] = {f"{prefix}examples_valued": float(valued.sum())}
    if len(v) == 0:
        return out
    out[f"{prefix}value_total"] = float(v.sum())
    out[f"{prefix}value_mean"] = float(v.mean())
    out[f"{prefix}value_std"] = float(v.std())
    for q, x in zip(QUANTILES, np.quantile(v, QUANTILES)):
        out[f"{prefix}value_p{round(q * 100):02d}"] = float(x)
    out[f"{prefix}negative_share"] = float((v < 0).mean())
    sources = [s if s is not None else "(no source)" for s, ok in zip(values.sources, valued) if ok]
    if any(s != "(no source)" for s in sources):
        totals: dict[str, float] = {}
        for s, x in zip(sources, v):
            totals[s] = totals.get(s, 0.0) + float(x)
        for s in sorted(totals, key=lambda k: -abs(totals[k]))[:max_sources]:
            out[f"{prefix}source/{s}/total"] = totals[s]
    return out


class ValueMonitor:
    """Every ``every`` optimizer steps: :func:`value_scalars` of the values so far (and of each
    extra ``sources`` function) to every callback, as ``callback(step, scalars)``.

    It hooks the tracker's optimizer (after the tracker's own hook, so the step just taken is
    included); :meth:`close` removes the hook. :meth:`emit` sends the scalars at any time.

    Args:
        tracker: the tracker whose values are described.
        callbacks: functions ``callback(step, scalars)``; those with a ``histogram(step,
            values)`` method also get the values of the examples valued so far.
        every: optimizer steps between two reports.
        sources: more scalars: functions ``tracker -> dict[str, float]``, merged in.
        max_sources: data sources reported by name (largest totals first).
    """

    def __init__(
        self,
        tracker: InRunShapley,
        callbacks: Iterable[Callback] = (),
        *,
        every: int = 10,
        sources: Iterable[Callable[[InRunShapley], Mapping[str, float]]] = (),
        max_sources: int = 20,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every!r} must be at least 1")
        self.tracker = tracker
        self.callbacks = list(callbacks)
        self.every = every
        self.sources = list(sources)
        self.max_sources = max_sources
        self.last: dict[str, float] = {}
        self._handle = tracker.optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self.tracker.step_count
        if self.tracker.enabled and step % self.every == 0:
            self.emit(step)

    def scalars(self) -> tuple[dict[str, float], np.ndarray]:
        """The scalars now, and the values they describe."""
        values = self.tracker.ledger.values()
        scalars = value_scalars(values, max_sources=self.max_sources)
        for source in self.sources:
            scalars.update({str(k): float(v) for k, v in source(self.tracker).items()})
        return scalars, values.value[values.counts > 0]

    def emit(self, step: int | None = None) -> dict[str, float]:
        """Send the scalars now (``step`` default: the tracker's step count); returns them."""
        step = self.tracker.step_count if step is None else step
        scalars, values = self.scalars()
        self.last = scalars
        for callback in self.callbacks:
            callback(step, dict(scalars))
            histogram = getattr(callback, "histogram", None)
            if histogram is not None and len(values):
                histogram(step, values)
        return scalars

    def close(self) -> None:
        self._handle.remove()
        for callback in self.callbacks:
            flush = getattr(callback, "flush", None)
            if flush is not None:
                flush()


class TensorBoardWriter:
    """A :class:`ValueMonitor` callback that writes the scalars (and a histogram of the values)
    to a TensorBoard event file, with ``torch.utils.tensorboard`` (``pip install tensorboard``).

    Args:
        log_dir: the directory of the event file, or a ``SummaryWriter`` you already have.
    """

    def __init__(self, log_dir: str | os.PathLike | Any) -> None:
        if isinstance(log_dir, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "TensorBoardWriter needs the tensorboard package: pip install tensorboard "
                    "(or `pip install inrun[tensorboard]`)"
                ) from exc
            self.writer = SummaryWriter(log_dir=str(log_dir))
            self._owned = True
        else:
            self.writer = log_dir
            self._owned = False

    def __call__(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def histogram(self, step: int, values: np.ndarray) -> None:
        self.writer.add_histogram("inrun/values", np.asarray(values, dtype=np.float64), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self._owned:
            self.writer.close()
