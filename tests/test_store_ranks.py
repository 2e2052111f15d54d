"""Ledgers of several ranks saved as one without gathering the table on any rank
(``save_across_ranks``, 3 ranks under ``torchrun``), against ``merge_states`` of the same ledgers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from store_ranks_worker import rank_ledger
from test_ddp import ROOT, launch_torchrun

from inrun import ValueLedger
from inrun.store.ledger import merge_states


def test_ranks_save_as_one_ledger(tmp_path: Path) -> None:
    launch_torchrun(ROOT / "tests" / "store_ranks_worker.py", tmp_path, nproc=3)
    merged = ValueLedger.load(tmp_path / "merged")
    expected = merge_states([rank_ledger(r).state() for r in range(3)])
    got, want = merged.values(), expected.values()
    assert got.ids() == want.ids()
    np.testing.assert_allclose(got.value, want.value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert got.sources == want.sources
    np.testing.assert_allclose(merged.per_validation().values, expected.per_validation().values, rtol=1e-12)
    assert len(merged.trace()["step"]) == 3 * 12 * 25
    assert merged.skipped == [{"step": 12, "reason": "non-finite loss"}] and merged.steps == 13
    assert len(list((tmp_path / "merged" / "values").glob("part-*.parquet"))) > 3  # range by range
