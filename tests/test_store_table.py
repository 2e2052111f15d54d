"""The id table behind the value store, against a dict: sums, counts, sources and per-validation
columns by id through freezes and merges of its runs, hash collisions of str ids, undo, key-order
partitions, and rebuilding from saved partitions."""

from __future__ import annotations

import numpy as np
import pytest

from inrun.errors import LedgerError
from inrun.store import table as valuestore
from inrun.store.table import IdTable


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny runs, so that a few hundred ids freeze and merge many times."""
    monkeypatch.setattr(valuestore, "DELTA_ROWS", 16)
    monkeypatch.setattr(valuestore, "MAX_RUN_ROWS", 256)


def weak_hash(text: str) -> int:
    return len(text) % 5  # most str ids collide


def random_steps(kind: str, steps: int = 60, seed: int = 0) -> list[tuple[list, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        raw = rng.choice(np.arange(-50, 450), size=int(rng.integers(1, 30)), replace=False)
        ids = [int(i) for i in raw] if kind == "int" else [f"doc-{i}" for i in raw]
        out.append((ids, rng.normal(size=len(ids)), rng.normal(size=len(ids)), rng.normal(size=(len(ids), 3))))
    return out


def oracle(steps: list) -> dict:
    table: dict = {}
    for ids, first, second, per_val in steps:
        for k, i in enumerate(ids):
            f, s, c, p = table.get(i, (0.0, 0.0, 0, np.zeros(3)))
            table[i] = (f + first[k], s + second[k], c + 1, p + per_val[k])
    return table


def check(table: IdTable, expected: dict) -> None:
    assert len(table) == len(expected)
    for i, (f, s, c, p) in expected.items():
        got = table.get(i)
        assert got is not None, i
        np.testing.assert_allclose([got["first_order"], got["second_order"]], [f, s], rtol=1e-12, atol=1e-12)
        assert got["count"] == c
        np.testing.assert_allclose(got["per_validation"], p, rtol=1e-12, atol=1e-12)
    assert table.get(10**12 if table.kind == "int" else "never-seen") is None


@pytest.mark.parametrize("kind", ["int", "str"])
def test_sums_by_id_through_freezes_and_merges(kind: str, small_runs: None, monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "str":
        monkeypatch.setattr(valuestore, "hash_key", weak_hash)
    steps = random_steps(kind)
    table = IdTable()
    for ids, first, second, per_val in steps:
        table.add(ids, first, second, per_val)
    assert len(table.runs) > 3 and max(r.tier for r in table.runs) >= 1  # it froze and merged
    check(table, oracle(steps))

    # partitions: every id once, in key order, in ranges of about the size asked for
    parts = list(table.partitions(rows=40))
    keys = np.concatenate([p["key"] for p in parts])
    assert len(keys) == len(table) and np.all(np.diff(keys) >= 0)
    if kind == "int":  # (the weak hash has 5 keys: equal keys stay in one range)
        assert len(parts) >= len(table) // 40 - 1
    # rebuilt from its partitions (a load), it is the same table
    again = IdTable()
    for p in parts:
        again.adopt({**p, "text": p["id"] if kind == "str" else None})
    check(again, oracle(steps))
    more = random_steps(kind, steps=10, seed=1)
    for ids, first, second, per_val in more:
        again.add(ids, first, second, per_val)
    check(again, oracle(steps + more))


def test_rollback_is_exact(small_runs: None) -> None:
    steps = random_steps("int", steps=20)
    table = IdTable()
    for ids, first, second, _ in steps:
        table.add(ids, first, second, None)
    before = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in table.partitions(10**6)]
    table.mark()
    for ids, first, second, per_val in random_steps("int", steps=5, seed=3):
        table.add(ids, first, second, per_val)
        table.set_sources(ids[:2], ["a", None])
    table.rollback()
    after = list(table.partitions(10**6))
    assert len(before) == len(after) == 1
    for name in ("key", "first", "second", "count"):
        np.testing.assert_array_equal(before[0][name], after[0][name])
    assert after[0]["per_val"] is None and after[0]["source"] is None


def test_sources_and_refusals() -> None:
    table = IdTable()
    table.set_sources([3, 1], ["stdlib/json", "stdlib/os"])
    table.add([1, 2], np.ones(2), np.zeros(2))
    assert table.get(1)["source"] == "stdlib/os" and table.get(2)["source"] is None
    assert table.get(3)["count"] == 0
    with pytest.raises(LedgerError, match="mix int and str"):
        table.add(["x"], np.ones(1), np.zeros(1))
    with pytest.raises(LedgerError, match="64 bits"):
        table.add([2**70], np.ones(1), np.zeros(1))


# ----------------------------------------------------------------------------- on disk
from inrun.files import IntegrityError  # noqa: E402
from inrun.store import partitions as valuefiles  # noqa: E402


def filled(kind: str, steps: list, sources: bool = True) -> IdTable:
    table = IdTable()
    for ids, first, second, per_val in steps:
        table.add(ids, first, second, per_val)
    if sources:
        some = steps[0][0][:3]
        table.set_sources(some, ["s1", "s2", None])
    return table


@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("rows", [40, 10**6])
def test_saved_partitions_read_back(kind: str, rows: int, tmp_path, small_runs: None) -> None:
    steps = random_steps(kind)
    table = filled(kind, steps)
    files, parts = valuefiles.write_values(table, tmp_path, validation_names=["a", "b", "c"], rows=rows)
    if rows == 40:
        assert len(parts) > 5 and all(p["file"].startswith("values/part-") for p in parts)
    else:
        assert [p["file"] for p in parts] == ["values.parquet"]  # a small table: the one file, as before
    again = valuefiles.read_values(tmp_path, parts, files)
    check(again, oracle(steps))
    assert again.get(steps[0][0][0])["source"] == "s1"

    some = [steps[3][0][0], steps[7][0][1], 10**9 if kind == "int" else "absent"]
    got = valuefiles.read_ids(tmp_path, parts, files, some)
    assert set(got) == set(some[:2])
    assert got[some[0]]["count"] == oracle(steps)[some[0]][2]
    if kind == "int":
        t = valuefiles.read_range(tmp_path, parts, files, 100, 199)
        ids = t.column("id").to_pylist()
        assert ids == sorted(i for i in oracle(steps) if 100 <= i <= 199)
    else:
        with pytest.raises(LedgerError, match="stored by hash"):
            valuefiles.read_range(tmp_path, parts, files, 0, 10)

    # damage is an error, never other values
    victim = tmp_path / parts[len(parts) // 2]["file"]
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    with pytest.raises(IntegrityError, match="damaged"):
        valuefiles.read_values(tmp_path, parts, files)


@pytest.mark.parametrize("kind", ["int", "str"])
def test_ranks_merge_by_partition(kind: str, tmp_path, small_runs: None) -> None:
    """Three ranks' saved tables merged range by range (two merging processes) equal one table of
    every rank's steps."""
    ranks = [random_steps(kind, steps=25, seed=s) for s in range(3)]
    sources = []
    for r, steps in enumerate(ranks):
        table = filled(kind, steps, sources=(r == 1))
        files, parts = valuefiles.write_values(table, tmp_path / f"rank{r}", rows=30)
        sources.append((tmp_path / f"rank{r}", parts, files))
    out = tmp_path / "merged"
    files, parts = {}, []
    for i in range(2):
        f, p = valuefiles.merge_saved(sources, out, rows=50, part=(i, 2))
        files.update(f)
        parts += p
    parts.sort(key=lambda e: e["lo"])
    merged = valuefiles.read_values(out, parts, files)
    check(merged, oracle([s for steps in ranks for s in steps]))
    assert merged.get(ranks[1][0][0][0])["source"] == "s1"


# ----------------------------------------------------------------------------- exports
def test_dolma_attribute_files_mirror_the_documents(tmp_path) -> None:
    import gzip
    import json

    from inrun.store.exports import annotate, write_dolma_attributes

    table = IdTable()
    table.add(["a", "c"], np.array([1.0, -2.0]), np.array([0.5, 0.0]))
    docs = tmp_path / "corpus" / "documents" / "2024"
    docs.mkdir(parents=True)
    lines = [{"id": "a", "text": "abcd"}, {"id": "b", "text": "xy"}, {"id": "c", "text": "hello"}]
    with gzip.open(docs / "part0.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    (written,) = write_dolma_attributes(table, tmp_path / "corpus" / "documents", batch=2)
    assert written == tmp_path / "corpus" / "attributes" / "inrun" / "2024" / "part0.jsonl.gz"
    with gzip.open(written, "rt") as f:
        rows = [json.loads(x) for x in f]
    assert [r["id"] for r in rows] == ["a", "b", "c"]  # the same rows, in the same order
    assert rows[0]["attributes"] == {"inrun__count": [[0, 4, 1]], "inrun__value": [[0, 4, 1.5]]}
    assert rows[1]["attributes"] == {"inrun__count": [[0, 2, 0]]}
    assert rows[2]["attributes"]["inrun__value"] == [[0, 5, -2.0]]

    class Doc:  # datatrove's Document: id and a metadata dict
        def __init__(self, i: str) -> None:
            self.id, self.metadata = i, {}

    out = list(annotate([Doc("c"), Doc("zz")], table))
    assert out[0].metadata == {"inrun_value": -2.0, "inrun_count": 1}
    assert np.isnan(out[1].metadata["inrun_value"]) and out[1].metadata["inrun_count"] == 0
