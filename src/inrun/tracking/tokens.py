"""Token values: each token's first-order term of its document's value, on the steps asked for.

``with tracker.step(ids, segments=seg, token_values=True):`` keeps, for that micro-batch, the
per-position dots every route computes anyway before it sums them by document (nothing else is
computed), and weights them at ``optimizer.step()`` as the document's first-order value is
weighted. A token's value is its share of its document's *first-order* value (the ``first``
column of the trace): summed over a document's tokens it is that value exactly. The second-order
correction is a property of the document's whole gradient and is not split by token. Positions
of no document (``-1``) hold 0.

Cost while asked: ``[parameters, B·T, validation columns]`` float64 on the device for the
micro-batch, and one transfer of ``[B, T]`` values to the host at its optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..files import atomic_write


@dataclass(frozen=True)
class TokenRecord:
    """One micro-batch's token values."""

    step: int
    ids: list
    segments: np.ndarray
    """``[B, T]`` the document index (into ``ids``) of every token, ``-1`` for none."""
    values: np.ndarray
    """``[B, T]`` float64: each token's first-order value (helpful = positive), 0 at ``-1``."""


class TokenValues:
    """The token values of a run's requested micro-batches, in step order."""

    def __init__(self, records: list[TokenRecord] | None = None) -> None:
        self.records: list[TokenRecord] = list(records or [])

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TokenRecord]:
        return iter(self.records)

    def of(self, doc_id: Any) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Every occurrence of one document: ``(step, rows, positions, values)``, its tokens in
        row-major order (a document that spans rows lists both)."""
        out = []
        for r in self.records:
            if doc_id not in r.ids:
                continue
            rows, positions = np.nonzero(r.segments == r.ids.index(doc_id))
            out.append((r.step, rows, positions, r.values[rows, positions]))
        return out

    def to_pandas(self) -> Any:
        """Long format: ``step, id, row, position, value``, one row per token of a document."""
        import pandas as pd

        parts = []
        for r in self.records:
            rows, positions = np.nonzero(r.segments >= 0)
            docs = r.segments[rows, positions]
            ids = np.asarray(r.ids, dtype=object)[docs]
            parts.append(pd.DataFrame({
                "step": np.full(rows.size, r.step, dtype=np.int64), "id": ids, "row": rows.astype(np.int64),
                "position": positions.astype(np.int64), "value": r.values[rows, positions],
            }))
        if not parts:
            return pd.DataFrame({"step": [], "id": [], "row": [], "position": [], "value": []})
        return pd.concat(parts, ignore_index=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_pandas` as one Parquet file, atomically."""
        frame = self.to_pandas()
        frame["id"] = frame["id"].astype(str) if frame["id"].map(type).eq(str).any() else frame["id"]
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
