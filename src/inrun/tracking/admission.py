"""What a model and a micro-batch must be before the tracker takes them: refusals with what to do."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
from torch import nn

from ..errors import BatchMismatchError, UnsupportedModuleError, one_line
from ..layers.norm import batchnorm_message

Id = int | str
MAX_ID_CHARS = 1000  # an id is a key: printed in tables, stored once per value; the text goes elsewhere


def admit_model(model: Any, val_loss: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise UnsupportedModuleError(
            f"the model's parameter {meta} is on the meta device (it has a shape but no data), so it "
            "cannot be trained or valued. Materialize the model first (model.to_empty(device=...) and "
            "load its weights, or build it outside torch.device('meta')), then make the tracker."
        )
    if not callable(val_loss):
        raise TypeError("val_loss must be a callable taking the model and returning a loss")


def repeated_id_error(ids: list, where: str) -> BatchMismatchError:
    seen: set = set()
    dup = next(i for i in ids if i in seen or seen.add(i))
    return BatchMismatchError(
        f"example id {dup!r} appears twice in {where}. Each row of a step is one player of that "
        "step's game, and rows under one id would be added up silently. Give each row its own id "
        "(a sampler that draws with replacement: f\"{id}#{k}\" per draw, summed afterwards if you "
        "want one value per example), or drop the repeated rows from the batch."
    )


def admit_ids(ids: Any, batchnorms: list[nn.Module]) -> list:
    """The ids of one micro-batch as a list, refused when empty or repeated, or when a BatchNorm
    in training mode mixes the rows' statistics."""
    id_list = check_ids(ids)
    if not id_list:
        raise BatchMismatchError("tracker.step() needs at least one id")
    if len(set(id_list)) < len(id_list):
        raise repeated_id_error(id_list, "this batch")
    for bn in batchnorms:
        if bn.training:
            raise UnsupportedModuleError(batchnorm_message(bn))
    return id_list


class WindowIds:
    """The ids seen so far in the open optimizer step, across its micro-batches. A document (ids
    of micro-batches with segments) may continue in a later micro-batch: it is one player, its
    parts added; a row's id may not repeat."""

    def __init__(self, kind: type | None = None) -> None:
        self._window: object = None
        self._rows: set = set()
        self._documents: set = set()
        self.kind = kind  # int or str: the run's ids are all of one kind (None: none seen yet)

    def admit_kind(self, ids: list, step: int) -> None:
        """Refuse ids of the other kind than the run's so far (the ledger keeps them in one
        column, so a mix would be refused only when the values are saved, after the compute)."""
        kinds = {type(i) for i in ids} | ({self.kind} if self.kind is not None else set())
        if len(kinds) > 1:
            first = next(i for i in ids if type(i) is not (self.kind or type(ids[0])))
            raise BatchMismatchError(
                f"step {step}: example ids mix int and str (id {one_line(repr(first), 60)} among "
                f"{'the run' if self.kind else 'this batch'}'s {(self.kind or type(ids[0])).__name__} ids): "
                "a run's ids are all int or all str. Give every example an id of one kind (e.g. str(i) for all)."
            )
        self.kind = kinds.pop()

    def add(self, window: object, ids: list, documents: bool = False) -> None:
        if window is not self._window:
            self._window, self._rows, self._documents = window, set(), set()
        again = self._rows.intersection(ids) if documents else (self._rows | self._documents).intersection(ids)
        if again:
            raise repeated_id_error([*again] * 2, "this optimizer step (an earlier micro-batch)")
        (self._documents if documents else self._rows).update(ids)


def check_ids(ids: Any) -> list[Id]:
    """Normalize ids (list, tuple, 1-D int tensor or array) to a list of ``int``/``str``."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        if getattr(ids, "ndim", 1) != 1:
            raise TypeError(f"ids must be one-dimensional, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"ids must be a sequence with one id per example, got {type(ids).__name__}"
        )
    out: list[Id] = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, str, np.integer)):
            hint = "" if isinstance(i, Hashable) else " (it is not even hashable)"
            raise TypeError(
                f"example ids must be int or str, got {type(i).__name__} {i!r}{hint}. "
                "Use a stable index or key of the example in your dataset."
            )
        if isinstance(i, str) and len(i) > MAX_ID_CHARS:
            raise ValueError(
                f"an example id has {len(i):,} characters ({one_line(repr(i[:40]), 60)}...): ids are keys "
                f"of at most {MAX_ID_CHARS} characters. Use a short key (an index or a hash of the text) and "
                "give the text to the report as the examples' 'text' column."
            )
        out.append(int(i) if isinstance(i, np.integer) else i)
    return out
