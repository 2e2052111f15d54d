"""The in-memory form every data source is turned into: ids, sources, tensors, previews.

Text becomes byte tokens (vocabulary 256: exact, reversible, no download): each example is cut
to ``length`` bytes, shorter ones are padded and their padding is ignored by the loss (target
``-100``). Tabular data becomes float features and class labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InRunError

Id = int | str

IGNORE_INDEX = -100
TASKS = ("lm", "classify")


class DataError(InRunError, ValueError):
    """Training or validation data cannot be read or used; the message says where and why."""


@dataclass
class ExampleSet:
    """Examples of one split.

    Attributes:
        ids: one unique ``int`` or ``str`` id per example (all of one type).
        sources: data source per example (a package, a domain, a class), or ``None``.
        inputs: ``[N, length]`` int64 byte tokens (``task='lm'``) or ``[N, F]`` float features.
        targets: ``[N, length]`` int64 next-token labels with ``-100`` for padding, or ``[N]``
            int64 class labels.
        previews: a short human-readable form of each example (for reports).
        locations: where each example comes from (``file@offset``, ``data.jsonl:17``).
        task: ``'lm'`` (causal language modelling) or ``'classify'``.
        num_classes: number of classes (``classify``), else ``None``.
        image_shape: ``(C, H, W)`` when the features are an image (digits), else ``None``.
        packed: the examples are *documents* packed several to a row: each training row lists
            the indices of its documents, in order (:mod:`.packing`); ``None``: one example a row.
    """

    ids: list[Id]
    sources: list[str | None]
    inputs: Tensor
    targets: Tensor
    previews: list[str]
    locations: list[str]
    task: str
    num_classes: int | None = None
    image_shape: tuple[int, ...] | None = None
    packed: list[list[int]] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("sources", "previews", "locations"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} ids")
        if self.inputs.shape[0] != n or self.targets.shape[0] != n:
            raise ValueError(f"inputs/targets have {self.inputs.shape[0]}/{self.targets.shape[0]} rows for {n} ids")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> ExampleSet:
        """The examples at ``rows``, in that order (unpacked: pack the subset again)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return ExampleSet(
            ids=[self.ids[r] for r in rows],
            sources=[self.sources[r] for r in rows],
            inputs=self.inputs[idx],
            targets=self.targets[idx],
            previews=[self.previews[r] for r in rows],
            locations=[self.locations[r] for r in rows],
            task=self.task,
            num_classes=self.num_classes,
            image_shape=self.image_shape,
        )

    def fingerprint(self) -> str:
        """SHA-256 of ids, sources and tensors: changes whenever the data would."""
        h = hashlib.sha256()
        h.update(json.dumps([self.task, self.num_classes, list(self.image_shape or ())]).encode())
        h.update(json.dumps([[i, s] for i, s in zip(self.ids, self.sources)]).encode())
        if self.packed is not None:
            h.update(json.dumps(self.packed).encode())
        for t in (self.inputs, self.targets):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def encode_texts(texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
    """Byte tokens ``[N, length]`` and next-token targets (``-100`` on padding)."""
    inputs = torch.zeros(len(texts), length, dtype=torch.long)
    targets = torch.full((len(texts), length), IGNORE_INDEX, dtype=torch.long)
    for r, text in enumerate(texts):
        data = text.encode("utf-8")[:length]
        row = torch.tensor(list(data), dtype=torch.long)
        inputs[r, : len(data)] = row
        targets[r, : len(data)] = row
    return inputs, targets


def is_held_out(example_id: Id, fraction: float) -> bool:
    """Stable validation choice by id: a hash, independent of order and of Python's seed."""
    digest = hashlib.sha1(str(example_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def spread(n: int, limit: int | None) -> list[int]:
    """At most ``limit`` row indices spread evenly over ``range(n)``."""
    if limit is None or n <= limit:
        return list(range(n))
    step = n / limit
    return [int(k * step) for k in range(limit)]


def cap_per_source(sources: Sequence[Any], limit: int | None) -> list[int]:
    """Rows kept when each source keeps at most ``limit`` examples, spread over its rows."""
    if limit is None:
        return list(range(len(sources)))
    by_source: dict[Any, list[int]] = {}
    for r, s in enumerate(sources):
        by_source.setdefault(s, []).append(r)
    keep = [rows[k] for rows in by_source.values() for k in spread(len(rows), limit)]
    return sorted(keep)


def preview_text(text: str, width: int = 240) -> str:
    """The start of a text for a report (whitespace kept; cut with an ellipsis)."""
    return text if len(text) <= width else text[: width - 1] + "…"


INT64 = (-(2**63), 2**63 - 1)  # ids are stored in Parquet int64 columns


def check_unique_ids(ids: Sequence[Any], where: str, locations: Sequence[str] | None = None) -> list[Id]:
    """Ids as ``int``/``str``, all of one type and unique; the error names the first offender
    (by its location, e.g. ``data.jsonl:17``, when ``locations`` are given)."""
    out: list[Id] = []
    seen: set[Id] = set()
    kinds = set()
    for k, i in enumerate(ids):
        at = locations[k] if locations is not None else f"{where}: example {k}"
        if isinstance(i, np.integer):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            text = repr(i)
            raise DataError(f"{at}: id is {text[:60]}; ids must be int or str")
        if isinstance(i, int) and not INT64[0] <= i <= INT64[1]:
            raise DataError(f"{at}: id {i} does not fit in 64 bits; use a smaller number or a string id")
        if isinstance(i, str) and not i:
            raise DataError(f"{at}: id is an empty string")
        if i in seen:
            raise DataError(f"{at}: id {repr(i)[:60]} appears more than once; ids must be unique")
        kinds.add(type(i))
        seen.add(i)
        out.append(i)
    if len(kinds) > 1:
        raise DataError(f"{where}: ids mix int and str; use one type")
    return out
