"""Documents packed several to a row, as pretraining packs them, each valued on its own.

A packed run's examples are documents of varying length (each padded to ``length`` in
:class:`~.base.ExampleSet`, its padding ``-100`` in the targets). :func:`pack` lays them, in
order, into rows of ``length`` tokens (next fit: a document that does not fit starts the next
row, the rest of the row is padding); :func:`packed_batch` builds a batch of such rows with what
the tracker and the model need:

* ``segments`` ``[B, T]``: each token's index into the batch's ids, ``-1`` on padding
  (``tracker.step(ids, segments=...)``, docs/documents.md);
* ``position_ids`` restarting at 0 for each document: a Hugging Face causal LM then attends only
  within a document (with ``use_cache=False``), so each document's value is exact and the
  tracker proves it on the first step;
* targets ``-100`` at each document's first token (no token predicts the next document's) and
  on padding (it is trained on by no one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import IGNORE_INDEX, DataError, ExampleSet, Id


def document_lengths(data: ExampleSet) -> list[int]:
    """Tokens per document: up to its last trained target (its padding is ``-100``)."""
    trained = data.targets != IGNORE_INDEX
    last = torch.where(trained.any(dim=1), trained.shape[1] - trained.flip(1).int().argmax(dim=1), 0)
    return [int(n) for n in last.tolist()]


def pack(lengths: Sequence[int], length: int) -> list[list[int]]:
    """Document indices per row of ``length`` tokens, in order (next fit)."""
    rows: list[list[int]] = []
    used = length
    for k, n in enumerate(lengths):
        if not 0 < n <= length:
            raise DataError(f"document {k} has {n} tokens; packed documents need 1..{length} (data.length)")
        if used + n > length:
            rows.append([])
            used = 0
        rows[-1].append(k)
        used += n
    return rows


def packed(data: ExampleSet, length: int) -> ExampleSet:
    """``data`` with its documents packed into rows of ``length`` tokens."""
    if data.task != "lm":
        raise DataError("packing applies to text (task 'lm')")
    data.packed = pack(document_lengths(data), length)
    return data


@dataclass
class PackedBatch:
    """Rows of packed documents: ``ids`` (one per document, in row order), ``inputs``,
    ``targets``, ``segments`` and ``positions``, each ``[B, T]``."""

    ids: list[Id]
    inputs: Tensor
    targets: Tensor
    segments: Tensor
    positions: Tensor


def packed_batch(data: ExampleSet, rows: Sequence[int], lengths: Sequence[int]) -> PackedBatch:
    """The packed rows ``rows`` of ``data`` (see the module docstring)."""
    assert data.packed is not None
    T = data.inputs.shape[1]
    B = len(rows)
    inputs = torch.zeros(B, T, dtype=data.inputs.dtype)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=data.targets.dtype)
    segments = torch.full((B, T), -1, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    ids: list[Id] = []
    for b, row in enumerate(rows):
        at = 0
        for doc in data.packed[row]:
            n = lengths[doc]
            inputs[b, at:at + n] = data.inputs[doc, :n]
            targets[b, at + 1:at + n] = data.targets[doc, 1:n]
            segments[b, at:at + n] = len(ids)
            positions[b, at:at + n] = torch.arange(n)
            ids.append(data.ids[doc])
            at += n
    return PackedBatch(ids, inputs, targets, segments, positions)
