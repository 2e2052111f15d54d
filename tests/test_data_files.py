"""Your own data: JSONL, text and Parquet files with ids and sources; clear errors for bad rows."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from inrun.run.config import RunConfig
from inrun.run.data import DataError, load_data
from inrun.run.data.base import IGNORE_INDEX

TEXTS = [f"example number {i} " + "x" * (i % 7) for i in range(60)]


def file_config(path, **data) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"kind": "hf", "hf_type": "gpt2"},
        "data": {"kind": "file", "path": str(path), "length": 24, **data},
        "validation": {"fraction": 0.2},
        "training": {"batch_size": 4},
    })


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_each_file_format_loads_ids_sources_and_bytes(tmp_path, fmt) -> None:
    rows = [{"id": f"doc-{i}", "text": t, "source": "even" if i % 2 == 0 else "odd"} for i, t in enumerate(TEXTS)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(TEXTS) + "\n\n")
    train, val = load_data(file_config(path))
    assert len(train) + len(val) == len(TEXTS) and len(val) > 0
    assert set(train.ids).isdisjoint(val.ids)
    if fmt == "txt":
        assert train.ids[0] == 1 and train.sources[0] == "data"  # line number, file name
    else:
        assert all(str(i).startswith("doc-") for i in train.ids) and set(train.sources) == {"even", "odd"}
    r = 0
    text = TEXTS[int(str(train.ids[r]).removeprefix("doc-")) - (1 if fmt == "txt" else 0)]
    n = min(len(text.encode()), 24)
    assert bytes(train.inputs[r, :n].tolist()).decode() == text[:n]
    assert (train.targets[r, n:] == IGNORE_INDEX).all() and (train.targets[r, :n] == train.inputs[r, :n]).all()
    assert train.inputs.dtype == torch.long


def test_bad_rows_are_errors_that_say_where(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"id": 1, "text": "a"}, {"text": "no id"}])
    with pytest.raises(DataError, match=r"data.jsonl:2: no 'id' field"):
        load_data(file_config(path))
    write_jsonl(path, [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    with pytest.raises(DataError, match="id 1 appears more than once"):
        load_data(file_config(path))
    path.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": \n')
    with pytest.raises(DataError, match="data.jsonl:2: not valid JSON"):
        load_data(file_config(path))
    write_jsonl(path, [{"id": i, "body": "a"} for i in range(10)])
    with pytest.raises(DataError, match="'text' must be a non-empty string"):
        load_data(file_config(path))
    with pytest.raises(DataError, match="does not exist"):
        load_data(file_config(tmp_path / "missing.jsonl"))


def test_subset_keeps_listed_ids_and_refuses_unknown_ones(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    train, _ = load_data(file_config(path))
    keep = train.ids[::2]
    (tmp_path / "keep.txt").write_text("\n".join(map(str, keep)))
    sub, _ = load_data(file_config(path, subset=str(tmp_path / "keep.txt")))
    assert sub.ids == keep
    (tmp_path / "keep.txt").write_text("\n".join(map(str, [*keep, 999])))
    with pytest.raises(DataError, match="1 id\\(s\\) are not in the training split"):
        load_data(file_config(path, subset=str(tmp_path / "keep.txt")))


def test_tabular_file_with_features_and_labels(tmp_path) -> None:
    path = tmp_path / "table.jsonl"
    write_jsonl(path, [{"id": i, "a": float(i), "b": i % 3, "label": ["cat", "dog"][i % 2]} for i in range(40)])
    cfg = RunConfig.from_dict({
        "model": {"kind": "mlp"},
        "data": {"kind": "file", "path": str(path), "features": ["a", "b"], "label_field": "label"},
        "validation": {"fraction": 0.2},
        "training": {"batch_size": 4},
    })
    train, val = load_data(cfg)
    assert train.task == "classify" and train.num_classes == 2 and train.inputs.shape[1] == 2
    assert abs(float(train.inputs[:, 0].mean())) < 1e-5  # standardized with training statistics
    assert "cat" in train.previews[0] or "dog" in train.previews[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "is nan"), (float("inf"), "is inf"), (1e300, "is 1e+300"), (-2.0**70, "is -1.1805916207174113e+21")],
)
def test_a_non_finite_or_absurd_feature_is_an_error_naming_its_row(tmp_path, value, message) -> None:
    """One such value used to change the scaling of its column for every row (or make it -inf)."""
    path = tmp_path / "table.jsonl"
    rows = [{"id": i, "a": float(i), "label": i % 2} for i in range(40)]
    rows[17]["a"] = value
    write_jsonl(path, rows)
    cfg = RunConfig.from_dict({
        "model": {"kind": "mlp"},
        "data": {"kind": "file", "path": str(path), "features": ["a"], "label_field": "label"},
        "validation": {"fraction": 0.2},
        "training": {"batch_size": 4},
    })
    with pytest.raises(DataError, match=rf"table.jsonl:18: feature 'a' {re.escape(message)}"):
        load_data(cfg)


def test_unreadable_files_are_errors_that_say_where(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n{"id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: byte 0xe9 at column 23 is not UTF-8"):
        load_data(file_config(path))
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match="is a directory, not a file"):
        load_data(file_config(path))
    broken = tmp_path / "data.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        load_data(file_config(broken))
    write_jsonl(tmp_path / "ids.jsonl", [{"id": 2**70, "text": "a"}, *({"id": i, "text": "b"} for i in range(30))])
    with pytest.raises(DataError, match="ids.jsonl:1: id 1180591620717411303424 does not fit in 64 bits"):
        load_data(file_config(tmp_path / "ids.jsonl"))
