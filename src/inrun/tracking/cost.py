"""Where the time of the tracked steps went: the validation passes next to the training blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCost:
    """Where the time of the tracked steps went (host clock; from the second optimizer step on,
    the first one also proves the rows by a replay).

    On a GPU the clock measures what the host waited for, which is close to the kernels' time
    only when something synchronizes (the tracker reads one number back per step).
    """

    steps: int = 0
    """Optimizer steps timed."""
    validation_seconds: float = 0.0
    """Opening the steps: the validation pass (two with the trapezoid under momentum or Adam)."""
    train_seconds: float = 0.0
    """Inside the ``tracker.step`` blocks: your forward and backward, with the tracker's hooks."""

    @property
    def ratio(self) -> float:
        """Validation time over training-block time: ``1.0`` means the validation pass costs as
        much as your forward and backward of the step's micro-batches."""
        return self.validation_seconds / self.train_seconds if self.train_seconds > 0 else float("nan")

    def add(self, opening: bool, validation_seconds: float, train_seconds: float) -> None:
        """Count one micro-batch: ``opening`` when it opened its optimizer step."""
        self.steps += int(opening)
        self.validation_seconds += validation_seconds
        self.train_seconds += train_seconds

    def copy(self) -> StepCost:
        return StepCost(self.steps, self.validation_seconds, self.train_seconds)

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "validation_seconds": self.validation_seconds,
                "train_seconds": self.train_seconds, "ratio": self.ratio}
