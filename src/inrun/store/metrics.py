"""The training curves of a run (``metrics.parquet``): one row per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..files import IntegrityError, atomic_write

METRICS_FILE = "metrics.parquet"


@dataclass
class Metrics:
    """Per-step training curves: one row per step; ``val_loss`` is NaN where not evaluated."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)

    COLUMNS = ("step", "train_loss", "lr", "val_loss", "skipped")

    def append(self, step: int, train_loss: float, lr: float, val_loss: float, skipped: bool) -> None:
        self.step.append(step)
        self.train_loss.append(train_loss)
        self.lr.append(lr)
        self.val_loss.append(val_loss)
        self.skipped.append(skipped)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows."""
        for c in self.COLUMNS:
            del getattr(self, c)[n:]

    def save(self, path: Path, fsync: bool = True, sync_dir: bool | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "step": pa.array(self.step, type=pa.int64()),
                "train_loss": pa.array(self.train_loss, type=pa.float64()),
                "lr": pa.array(self.lr, type=pa.float64()),
                "val_loss": pa.array(self.val_loss, type=pa.float64()),
                "skipped": pa.array(self.skipped, type=pa.bool_()),
            }
        )
        atomic_write(path, lambda p: pq.write_table(table, p), fsync=fsync, sync_dir=sync_dir)

    @classmethod
    def load(cls, path: Path) -> Metrics:
        t = read_parquet(path).to_pydict()
        try:
            return cls(**{c: list(t[c]) for c in cls.COLUMNS})
        except KeyError as exc:
            raise IntegrityError(f"{path} is damaged: no column {exc}") from None

    def final_val_loss(self) -> float:
        vals = [v for v in self.val_loss if not np.isnan(v)]
        return vals[-1] if vals else float("nan")


def read_parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing") from None
    except (OSError, pa.ArrowException) as exc:
        raise IntegrityError(f"{path} cannot be read as Parquet ({' '.join(str(exc).split())[:160]})") from None
