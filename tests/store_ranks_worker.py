"""Each rank's ledger saved as one by ``save_across_ranks`` (run by ``torchrun`` from
``tests/test_store_ranks.py``); tiny runs and partitions, so that ranges, merges and freezes are many."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from inrun import ValueLedger
from inrun.store import partitions, table


def rank_ledger(rank: int) -> ValueLedger:
    """Rank ``rank``'s ledger: ids that overlap between ranks, a trace, two validation columns,
    sources on rank 1, a skipped step on rank 2."""
    rng = np.random.default_rng(rank)
    ledger = ValueLedger(keep_trace=True)
    for step in range(12):
        ids = [int(i) for i in rng.choice(400, size=25, replace=False)]
        ledger.add(step, ids, rng.normal(size=(25, 2)), rng.normal(size=(25, 2)), lr=0.1)
    if rank == 1:
        ledger.set_sources({i: f"src{i % 3}" for i in range(0, 400, 7)})
    if rank == 2:
        ledger.record_skip(12, "non-finite loss")
    return ledger


def main(out: Path) -> None:
    import torch.distributed as dist

    from inrun.store.ledger import save_across_ranks

    partitions.PARTITION_ROWS = 40
    table.DELTA_ROWS, table.MAX_RUN_ROWS = 16, 256
    dist.init_process_group("gloo")
    try:
        save_across_ranks(rank_ledger(dist.get_rank()), out / "merged")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
