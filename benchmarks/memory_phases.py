"""Where a method's memory goes in one optimizer step: peak and resident set by phase, and what
the tracker holds between steps, by the attribute path that reaches it.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 \\
        python benchmarks/memory_phases.py --workload A --method "Adam-aware order 1"

Runs ``--warmup`` steps of an ``inrun bench`` workload, then one step phase by phase (each
micro-batch's forward, backward and block end, the optimizer step, zero_grad), printing the peak
resident set within each phase and the resident set after it, in MiB above the process before
its first step (the environment above makes glibc map each large block separately, so freed
tensors leave the resident set, as in ``inrun bench``'s memory probe). Then, for a tracked method,
the tensors reachable from the tracker between steps (parameters and optimizer state left out),
grouped by path, and the factors the step kept against ``inrun bench``'s memory floor. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch import nn

from inrun.cli.bench import METHODS, WORKLOADS, kept_per_microbatch


def _kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def held_by_path(root: object, exclude: set[int]) -> collections.Counter:
    """Bytes of tensor storages reachable from ``root``, by the first attribute path reaching each."""
    seen_objects, seen_storages, by = set(), set(), collections.Counter()
    queue = collections.deque([(root, "tracker")])
    while queue:
        obj, path = queue.popleft()
        if id(obj) in seen_objects or isinstance(obj, (nn.Module, torch.optim.Optimizer, type)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in exclude and key not in seen_storages:
                seen_storages.add(key)
                by[path] += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            queue.extend((v, path + "{}") for v in obj.values())
        elif isinstance(obj, (list, tuple, set)):
            queue.extend((v, path + "[]") for v in obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            queue.extend((v, f"{path}.{k}") for k, v in vars(obj).items())
    return by


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="A", choices=sorted(WORKLOADS))
    parser.add_argument("--method", default="Adam-aware order 1", choices=list(METHODS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = WORKLOADS[args.workload]()
    method = METHODS[args.method](w)
    tracker = getattr(method, "tracker", None)
    B = w.examples
    base = _kib("VmRSS")
    for i in range(args.warmup):
        method.step(w.batches[i % len(w.batches)], list(range(i * B, (i + 1) * B)))
    rows = []

    def mark(phase: str) -> None:
        rows.append((phase, _kib("VmHWM") - base, _kib("VmRSS") - base))
        _reset_peak()

    _reset_peak()
    mark("between steps")
    i = args.warmup
    for k, (part, ids) in enumerate(w.micro_batches(w.batches[i % len(w.batches)], list(range(i * B, (i + 1) * B)))):
        if tracker is not None:
            with tracker.step(ids):
                loss = w.loss(method.runner, part) / w.micro
                mark(f"micro-batch {k} forward")
                loss.backward()
                del loss
                mark(f"micro-batch {k} backward")
            mark(f"micro-batch {k} block end")
        else:
            loss = w.loss(method.runner, part) / w.micro
            mark(f"micro-batch {k} forward")
            loss.backward()
            del loss
            mark(f"micro-batch {k} backward")
    method.opt.step()
    mark("optimizer.step")
    method.opt.zero_grad(set_to_none=True)
    mark("zero_grad")
    print(f"{args.method} on {args.workload}: MiB above the process before its first step\n")
    print("| phase | peak | resident after |\n|---|---:|---:|")
    for phase, peak, rss in rows:
        print(f"| {phase} | {peak:.1f} | {rss:.1f} |")
    if tracker is not None:
        exclude = {p.untyped_storage().data_ptr() for p in method.model.parameters()}
        exclude |= {v.untyped_storage().data_ptr() for s in method.opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)}
        by = held_by_path(tracker._engine, exclude)
        print(f"\nHeld by the tracker between steps: {sum(by.values()) / 2**20:.1f} MiB")
        for path, n in by.most_common(12):
            print(f"  {n / 2**20:8.2f} MiB  {path}")
        print(f"\nFloor: factors kept per micro-batch {kept_per_microbatch(w) / 2**20:.1f} MiB "
              f"({w.micro} micro-batches per step).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
