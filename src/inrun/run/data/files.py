"""Your own data: JSONL, plain text or Parquet files.

* ``.jsonl``: one JSON object per line with an ``id`` (int or str, unique), optionally a
  ``source``, and either a ``text`` or numeric feature columns plus a label (names configurable).
* ``.parquet``: the same columns.
* ``.txt``: one example per non-empty line; the id is the line number (1-based) and the source
  is the file's name.

Text is tokenized as bytes (see :mod:`inrun.run.data.base`). Tabular features are standardized with
the training rows' mean and deviation. Files must be UTF-8; every feature must be a finite
number with ``|x| <= 1e15`` (:data:`FEATURE_LIMIT`): a NaN, an infinity or a sentinel such as
``1e300`` is an error that names its row and field, since one such value would otherwise change
the scaling of its column for every other row.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import utf8_text
from .base import DataError, ExampleSet, check_unique_ids, encode_texts, preview_text

# Beyond this a value is a sentinel or corruption, not a measurement: float64 no longer holds
# its integers exactly (2**53 ~ 9e15), and one such value sets its column's mean and deviation.
FEATURE_LIMIT = 1e15


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; an error names the line and column of the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return utf8_text(raw, lambda line, column, byte: DataError(
        f"{path.name}:{line}: byte 0x{byte:02x} at column {column} is not UTF-8; save the file as UTF-8"))


def _data_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file")
    return path


@dataclass
class Record:
    """One row of a file, with where it came from."""

    fields: dict[str, Any]
    location: str


def read_records(path: str | Path, id_field: str = "id") -> list[Record]:
    """Rows of a ``.jsonl``, ``.txt`` or ``.parquet`` file.

    Raises:
        DataError: the file is missing, a line is not a JSON object, or an id is missing.
    """
    path = _data_file(Path(path), "data file")
    suffix = path.suffix.lower()
    records: list[Record] = []
    if suffix in (".txt", ".jsonl"):
        text = _read_text(path)
    if suffix == ".txt":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(Record({id_field: n, "text": line, "source": path.stem}, f"{path.name}:{n}"))
        return records
    if suffix == ".jsonl":
        # Universal newlines, as reading the file in text mode numbers its lines.
        for n, line in enumerate(io.StringIO(text, newline=None), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path.name}:{n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path.name}:{n}: expected a JSON object, got {type(row).__name__}")
            records.append(Record(row, f"{path.name}:{n}"))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path} is not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
        for n, row in enumerate(rows):
            records.append(Record(row, f"{path.name}[{n}]"))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .txt or .parquet")
    for rec in records:
        if id_field not in rec.fields or rec.fields[id_field] is None:
            raise DataError(f"{rec.location}: no '{id_field}' field (every example needs a unique id)")
    return records


def text_examples(
    records: Sequence[Record], length: int, id_field: str, text_field: str, source_field: str
) -> ExampleSet:
    """Byte-token examples from records with a text field."""
    texts = []
    for rec in records:
        text = rec.fields.get(text_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"{rec.location}: '{text_field}' must be a non-empty string, got {text!r}")
        texts.append(text)
    ids = check_unique_ids([r.fields[id_field] for r in records], "data", [r.location for r in records])
    inputs, targets = encode_texts(texts, length)
    return ExampleSet(
        ids=ids,
        sources=[_source(r, source_field) for r in records],
        inputs=inputs,
        targets=targets,
        previews=[preview_text(t) for t in texts],
        locations=[r.location for r in records],
        task="lm",
    )


def tabular_examples(
    records: Sequence[Record],
    features: Sequence[str],
    label_field: str,
    classes: Sequence[Any],
    id_field: str,
    source_field: str,
) -> ExampleSet:
    """Feature/label examples (features not yet standardized)."""
    index = {c: k for k, c in enumerate(classes)}
    X = np.empty((len(records), len(features)), dtype=np.float64)
    y = np.empty(len(records), dtype=np.int64)
    for r, rec in enumerate(records):
        for k, name in enumerate(features):
            v = rec.fields.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(f"{rec.location}: feature '{name}' must be a number, got {_short(v)}")
            if not (isinstance(v, int) or math.isfinite(v)) or abs(v) > FEATURE_LIMIT:
                raise DataError(
                    f"{rec.location}: feature '{name}' is {_short(v)}; features must be finite with "
                    f"|x| <= {FEATURE_LIMIT:g} (fix or drop the row, or rescale the column)"
                )
            X[r, k] = v
        label = rec.fields.get(label_field)
        if label not in index:
            raise DataError(f"{rec.location}: label '{label_field}' is {label!r}, not one of {list(classes)}")
        y[r] = index[label]
    ids = check_unique_ids([r.fields[id_field] for r in records], "data", [r.location for r in records])
    previews = [
        f"{rec.fields[label_field]}: " + ", ".join(f"{n}={_fmt(rec.fields[n])}" for n in features)
        for rec in records
    ]
    return ExampleSet(
        ids=ids,
        sources=[_source(r, source_field) for r in records],
        inputs=torch.tensor(X, dtype=torch.float64),
        targets=torch.tensor(y),
        previews=[preview_text(p) for p in previews],
        locations=[r.location for r in records],
        task="classify",
        num_classes=len(classes),
    )


def label_classes(records: Sequence[Record], label_field: str) -> list[Any]:
    """Sorted distinct labels (int or str) found in ``records``."""
    labels = set()
    for rec in records:
        v = rec.fields.get(label_field)
        if v is None or isinstance(v, (bool, float, dict, list)):
            raise DataError(f"{rec.location}: label '{label_field}' must be an int or str, got {_short(v)}")
        labels.add(v)
    if len({type(v) for v in labels}) > 1:
        raise DataError(f"labels in '{label_field}' mix int and str")
    return sorted(labels)


def standardize(train: ExampleSet, *others: ExampleSet) -> None:
    """Scale float features in place with the training rows' mean and deviation (the values
    are finite and bounded, :data:`FEATURE_LIMIT`, so the statistics are too)."""
    X = train.inputs.numpy()
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    for s in (train, *others):
        s.inputs = ((s.inputs - torch.from_numpy(mean)) / torch.from_numpy(std)).to(torch.float32)


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _source(rec: Record, field: str) -> str | None:
    v = rec.fields.get(field)
    return None if v is None else str(v)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def read_id_list(path: str | Path) -> list[Any]:
    """Ids from a ``.parquet`` file (column ``id``) or a ``.txt`` file (one per line)."""
    path = _data_file(Path(path), "id list")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path} is not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
        if "id" not in table.column_names:
            raise DataError(f"{path}: no 'id' column")
        return table.column("id").to_pylist()
    if path.suffix.lower() == ".txt":
        out: list[Any] = []
        for line in _read_text(path).splitlines():
            line = line.strip()
            if line:
                out.append(int(line) if line.lstrip("-").isdigit() else line)
        return out
    raise DataError(f"{path}: an id list must be .parquet (column 'id') or .txt (one id per line)")
