"""What the report shows of each training example (``examples.parquet``): ids, sources, previews,
locations and lengths, described from a table or a list of ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..tracking.admission import check_ids

PREVIEW_CHARS = 240


@dataclass
class Examples:
    """What the report shows of each training example (``examples.parquet``)."""

    ids: list
    sources: list[str | None]
    locations: list[str]
    previews: list[str]
    lengths: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """SHA-256 of ids and sources: a resumed run must describe the same examples."""
        return hashlib.sha256(json.dumps([[i, s] for i, s in zip(self.ids, self.sources)]).encode()).hexdigest()

    def columns(self) -> tuple[list, list, list, list, list | None]:
        return self.ids, self.sources, self.locations, self.previews, self.lengths


def examples_from(
    data: Any,
    *,
    id_column: str = "id",
    source_column: str = "source",
    text_columns: Sequence[str] = ("preview", "text"),
    location_column: str = "location",
    length_column: str = "length",
) -> Examples | None:
    """Describe the training examples for the report, from a table with an id column.

    Args:
        data: ``None``; a ``pandas.DataFrame``, a ``datasets.Dataset`` or a mapping of columns
            (``{"id": [...], "source": [...], "text": [...]}``); or a plain sequence of ids.
            Columns used when present: the id (required), ``source`` (grouping in the report
            and in ``summary.json``), ``preview`` or else ``text`` (cut to 240 characters),
            ``location`` (where the example comes from), ``length`` (tokens; checked against
            the values, see :func:`inrun.store.summary.summarize`).

    Raises:
        TypeError: ids that are not ``int``/``str``, or a table without the id column.
        ValueError: an id that appears twice.
    """
    if data is None:
        return None
    if isinstance(data, (list, tuple)) or (hasattr(data, "tolist") and not hasattr(data, "columns")):
        ids = check_ids(data)
        return _examples(ids, {}, id_column)
    names = _column_names(data)
    if id_column not in names:
        raise TypeError(
            f"the examples table has no {id_column!r} column (it has {sorted(names)[:12]}); give "
            "every training example an id column, or name it with id_column="
        )

    def column(name: str) -> list | None:
        return list(data[name]) if name in names else None

    cols = {
        "source": column(source_column),
        "preview": next((column(c) for c in text_columns if c in names), None),
        "location": column(location_column),
        "length": column(length_column),
    }
    return _examples(check_ids(column(id_column)), cols, id_column)


def _column_names(data: Any) -> set[str]:
    if hasattr(data, "column_names"):  # datasets.Dataset
        return set(data.column_names)
    if hasattr(data, "columns"):  # pandas.DataFrame
        return {str(c) for c in data.columns}
    if isinstance(data, Mapping):
        return set(data)
    raise TypeError(
        f"examples must be a table (pandas.DataFrame, datasets.Dataset, a mapping of columns) or a "
        f"sequence of ids, got {type(data).__name__}"
    )


def _examples(ids: list, cols: Mapping[str, list | None], id_column: str) -> Examples:
    seen: set = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"example id {i!r} appears more than once in the examples table; ids must be unique")
        seen.add(i)
    n = len(ids)

    def text(values: list | None, default: str = "") -> list[str]:
        if values is None:
            return [default] * n
        out = []
        for v in values:
            s = "" if v is None else str(v)
            out.append(s if len(s) <= PREVIEW_CHARS else s[: PREVIEW_CHARS - 1] + "…")
        return out

    sources = cols.get("source")
    lengths = cols.get("length")
    return Examples(
        ids=ids,
        sources=[None if s is None else str(s) for s in sources] if sources is not None else [None] * n,
        locations=text(cols.get("location")),
        previews=text(cols.get("preview")),
        lengths=[None if x is None else int(x) for x in lengths] if lengths is not None else None,
    )
