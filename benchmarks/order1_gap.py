"""Order 1's gap to its FLOP floor, by part of the tracked step.

Plain training and order 1 run in alternation on the same model and batches (inrun.cli.bench's
workloads); in the tracked steps each part's CPU time is read by wrapping the tracker's methods
(inclusive: a part's time holds what it calls). The table compares each part with its share of
the FLOP floor: the validation pass with ``|V|/|B|`` of training, the contractions in the backward
with the route's multiply-adds (docs/performance.md), and lists the parts the floor does not count
(the per-step checks, the capture). CPU time, not wall time: on a shared machine it is the steadier
one; with one thread (the default) it is free of spin-waits, so it is the work each part does.

Usage: python benchmarks/order1_gap.py [--workloads R,S,T] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from inrun.cli import bench
from inrun.tracking import capture, check, engine, gradmap, params, probes, validation

SPENT: dict[str, float] = defaultdict(float)
"""Part -> CPU seconds in the current step."""

PARTS: list[tuple[object, str, str]] = [
    (validation.ValidationPass, "_pass", "validation pass"),
    (engine.StepEngine, "_on_gradient", "contractions in the backward"),
    (capture.TrainRecorder, "on_forward", "forward capture"),
    (probes.RowProbes, "alone", "one example alone (verify='on_change')"),
    (gradmap.GradientReference, "sync", "gradient map: copy"),
    (gradmap.GradientReference, "classify", "gradient map: comparison at the step"),
    (params.ParamTable, "norms", "gradient norms"),
    (check.ConsistencyCheck, "terms", "consistency check: terms"),
    (check.ConsistencyCheck, "finalize", "consistency check: the host transfer"),
]


def timed(f: Callable, part: str) -> Callable:
    active = [False]

    @functools.wraps(f)
    def run(*args: object, **kwargs: object) -> object:
        if active[0]:
            return f(*args, **kwargs)
        active[0] = True
        start = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            SPENT[part] += time.process_time() - start
            active[0] = False

    return run


def measure(name: str, steps: int) -> None:
    w = bench.WORKLOADS[name]()
    methods = {"plain": bench.Method(w), "order 1": bench.METHODS["order 1"](w)}
    cpu: dict[str, list[float]] = defaultdict(list)
    parts: list[dict[str, float]] = []
    B = w.examples
    count = 0
    for r in range(steps + 2):
        for method in (["plain", "order 1"] if r % 2 == 0 else ["order 1", "plain"]):
            SPENT.clear()
            start = time.process_time()
            methods[method].step(w.batches[count % len(w.batches)], list(range(count * B, (count + 1) * B)))
            spent = time.process_time() - start
            count += 1
            if r >= 2:  # warm-up: the first step proves the rows by a replay
                cpu[method].append(spent)
                if method == "order 1":
                    parts.append(dict(SPENT))
    plain, tracked = statistics.median(cpu["plain"]), statistics.median(cpu["order 1"])
    floor = bench.floors(w)
    val_share, contraction_share = floor["plain + validation pass"] - 1, floor["order 1"] - floor["plain + validation pass"]
    print(f"### Workload {name}: {w.notes}\n")
    print(f"{torch.get_num_threads()} thread(s), medians of {steps} steps, load average {os.getloadavg()[0]:.2f}: "
          f"plain {plain * 1000:.0f} ms, order 1 {tracked * 1000:.0f} ms of CPU time a step, "
          f"ratio **{tracked / plain:.3f}** against a floor of {floor['order 1']:.3f}\n")
    print("| part of the tracked step | CPU ms a step | share of a plain step | its FLOP share |")
    print("|---|---:|---:|---:|")
    shares = {"validation pass": val_share, "contractions in the backward": contraction_share}
    accounted = 0.0
    for _, _, part in PARTS:
        ms = statistics.median([p.get(part, 0.0) for p in parts])
        accounted += ms
        share = f"{100 * shares[part]:.1f}%" if part in shares else "0 (not counted)"
        print(f"| {part} | {ms * 1000:.1f} | {100 * ms / plain:.1f}% | {share} |")
    rest = tracked - plain - accounted
    print(f"| the rest (training's own work, hooks, bookkeeping of the step) | {rest * 1000:.1f} | "
          f"{100 * rest / plain:.1f}% | 0 |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="R,S,T")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for owner, method, part in PARTS:
        if hasattr(owner, method):  # a part the tree does not have is listed at 0
            setattr(owner, method, timed(getattr(owner, method), part))
    for name in args.workloads.split(","):
        measure(name, args.steps)


if __name__ == "__main__":
    main()
