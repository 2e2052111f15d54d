"""Workload E (``inrun bench``'s Mixtral 2x256, 8 experts top-2): order 1 with the router valued as
a linear part (the default) beside order 1 with the router on the fallback (as before), and plain
training, alternating in one process (``inrun bench``'s ``time_methods``: medians, CPU-time ratios).

    python benchmarks/moe_router.py                 # 1 thread: CPU time free of spin-waits
    python benchmarks/moe_router.py --threads 2     # inrun bench's thread count (an idle machine)
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from inrun.cli import bench
from inrun.layers import experts, registry

FALLBACK_ROUTER = "order 1, router by the fallback"


class RouterByFallback(bench.METHODS["order 1"]):  # type: ignore[misc, valid-type]
    """Order 1 with the router predicate left out while the tracker is made."""

    name = FALLBACK_ROUTER

    def setup(self) -> None:
        saved = list(registry._BY_PREDICATE)
        registry._BY_PREDICATE[:] = [(p, h) for p, h in saved if p is not experts._is_router]
        try:
            super().setup()
        finally:
            registry._BY_PREDICATE[:] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench.METHODS[FALLBACK_ROUTER] = RouterByFallback
    names = ["plain", FALLBACK_ROUTER, "order 1"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f} at the start")
    times = bench.time_methods(bench.WORKLOADS["E"](), names, args.steps, 2, 4)
    wall, cpu = (statistics.median(getattr(times["plain"], k)) for k in ("wall", "cpu"))
    print("| method | median step (ms) | time ratio | CPU-time ratio |\n|---|---:|---:|---:|")
    for n in names:
        w, c = statistics.median(times[n].wall), statistics.median(times[n].cpu)
        print(f"| {n} | {w * 1000:.0f} | {w / wall:.3f}x | {c / cpu:.3f}x |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
