"""A two-rank job whose last collective is the tracker's: it must exit 0 every time.

Usage::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_exit_worker.py

A small DDP loop with the tracker, then ``tracker.values()`` (an all-gather of the ledgers) as
the job's last collective, ``destroy_process_group()`` and a normal exit, as a user's script
ends. ``benchmarks/ddp_exit.py`` launches it repeatedly and counts aborts at exit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from inrun import InRunShapley


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x_val = torch.randn(4, 8, dtype=torch.float64)
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(x_val).pow(2).mean())
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(3):
        x = torch.randn(4, 8, dtype=torch.float64, generator=gen)
        with tracker.step([f"r{rank}-s{step}-{i}" for i in range(4)]):
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    values = tracker.values()
    assert len(values) == 4 * 3 * dist.get_world_size()
    tracker.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
