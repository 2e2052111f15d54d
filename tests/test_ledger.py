"""Ledger: accumulation by id, Parquet round trip, atomic writes, refusing bad input."""

from __future__ import annotations

import numpy as np
import pytest

from inrun import LedgerError, ValueLedger


def filled(keep_trace: bool = True, columns: int = 1) -> ValueLedger:
    ledger = ValueLedger(keep_trace=keep_trace)
    rng = np.random.default_rng(0)
    ledger.add(0, ["a", "b", "c"], rng.normal(size=(3, columns)), lr=0.1)
    ledger.add(1, ["b", "d", "b"], rng.normal(size=(3, columns)), rng.normal(size=(3, columns)), lr=0.05)
    ledger.record_skip(2, "non-finite gradient or value")
    ledger.set_sources({"a": "json", "d": "email"})
    return ledger


def test_accumulates_sum_and_count_by_id() -> None:
    ledger = ValueLedger()
    ledger.add(0, [1, 2], np.array([[1.0], [2.0]]))
    ledger.add(1, [2, 2, 3], np.array([[0.5], [0.25], [4.0]]), np.array([[0.1], [0.0], [0.0]]))
    v = ledger.values()
    assert v[1] == 1.0 and v[2] == pytest.approx(2.85) and v[3] == 4.0
    assert (v.count(1), v.count(2), v.count(3)) == (1, 3, 1)
    assert v.top(1) == [(3, 4.0)] and v.bottom(1)[0][0] == 1
    assert v.second_order[1] == pytest.approx(0.1)


@pytest.mark.parametrize("columns", [1, 3])
def test_parquet_round_trip(tmp_path, columns) -> None:
    ledger = filled(columns=columns)
    ledger.save(tmp_path)
    back = ValueLedger.load(tmp_path)
    a, b = ledger.values(), back.values()
    assert list(a) == list(b)
    np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert b.sources == ["json", None, None, "email"]
    assert back.skipped == ledger.skipped and back.steps == 3
    ta, tb = ledger.trace(), back.trace()
    for key in ("step", "lr", "first_order", "second_order"):
        np.testing.assert_array_equal(ta[key], tb[key])
    assert list(ta["id"]) == list(tb["id"])
    if columns > 1:
        np.testing.assert_array_equal(ledger.per_validation()[1], back.per_validation()[1])
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must be renamed or removed"


def test_refuses_non_finite_and_bad_shapes() -> None:
    ledger = ValueLedger()
    with pytest.raises(LedgerError, match="non-finite"):
        ledger.add(0, [1], np.array([[np.nan]]))
    with pytest.raises(LedgerError, match="batch, columns"):
        ledger.add(0, [1, 2], np.array([[1.0]]))
    assert len(ledger) == 0


def test_mixed_id_types_are_refused() -> None:
    """One id type per ledger (they share one Parquet column): refused when added, not at save."""
    ledger = ValueLedger()
    with pytest.raises(LedgerError, match="mix int and str"):
        ledger.add(0, [1, "x"], np.ones((2, 1)))
    ledger.add(0, [1, 2], np.ones((2, 1)))
    with pytest.raises(LedgerError, match="mix int and str"):
        ledger.add(1, ["x"], np.ones((1, 1)))


def test_load_refuses_a_directory_that_is_not_a_ledger(tmp_path) -> None:
    with pytest.raises(LedgerError, match="not a saved ledger"):
        ValueLedger.load(tmp_path)


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch) -> None:
    ledger = filled()
    ledger.save(tmp_path)
    before = (tmp_path / "values.parquet").read_bytes()
    import pyarrow.parquet as pq

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    ledger.add(5, ["z"], np.ones((1, 1)))
    with pytest.raises(OSError):
        ledger.save(tmp_path)
    assert (tmp_path / "values.parquet").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_rollback_returns_to_the_mark_exactly(tmp_path) -> None:
    ledger = filled(columns=3)
    before = ledger.state()
    ledger.mark()
    rng = np.random.default_rng(1)
    ledger.add(3, ["a", "new", "c"], rng.normal(size=(3, 3)) * 1e30, lr=1e30)  # a step that blew up
    ledger.record_skip(4, "x")
    ledger.rollback()
    after = ledger.state()
    assert after["ids"] == before["ids"] and after["skipped"] == before["skipped"] and after["steps"] == 3
    for key in ("first_order", "second_order", "count", "per_validation"):
        np.testing.assert_array_equal(after[key], before[key])  # bit for bit, not subtracted
    for key in ("step", "first_order"):
        np.testing.assert_array_equal(after["trace"][key], before["trace"][key])
    ledger.add(3, ["new"], np.ones((1, 3)))  # an id dropped by the rollback starts from zero
    assert ledger.values()["new"] == 3.0 and ledger.values().count("new") == 1


def test_trace_is_spilled_to_parts_and_saves_link_them(tmp_path) -> None:
    store = tmp_path / "run" / "trace"
    ledger = ValueLedger(keep_trace=True, trace_dir=store, spill_rows=10)
    rng = np.random.default_rng(0)
    for step in range(12):
        ledger.add(step, [f"x{(step * 4 + k) % 9}" for k in range(4)], rng.normal(size=(4, 1)), lr=0.1)
        assert ledger._trace_rows < 10  # bounded: at most spill_rows rows wait in memory
    assert len(ledger.trace_part_names()) == 4  # 12 rows per part at most, as they come
    ledger.save(tmp_path / "run")  # the top level: the store itself, nothing copied
    ledger.save(tmp_path / "checkpoint")  # a checkpoint: the same parts, hard-linked
    for name in ledger.trace_part_names():
        a, b = store / name, tmp_path / "checkpoint" / "trace" / name
        assert a.stat().st_ino == b.stat().st_ino
    back = ValueLedger.load(tmp_path / "checkpoint")
    assert len(back.trace()["step"]) == 48 and back.trace()["step"].tolist() == sorted(back.trace()["step"].tolist())
    np.testing.assert_array_equal(back.trace()["first_order"], ledger.trace()["first_order"])


def test_a_ledger_of_format_1_is_still_read(tmp_path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "value": [1.0], "first_order": [1.0], "second_order": [0.0],
                             "count": [1], "source": [None]}, schema=pa.schema([
                                 ("id", pa.string()), ("value", pa.float64()), ("first_order", pa.float64()),
                                 ("second_order", pa.float64()), ("count", pa.int64()), ("source", pa.string())])),
                   tmp_path / "values.parquet")
    (tmp_path / "ledger.json").write_text(json.dumps({"format": 1, "steps": 1, "skipped": [], "keep_trace": False}))
    assert ValueLedger.load(tmp_path).values()["a"] == 1.0
