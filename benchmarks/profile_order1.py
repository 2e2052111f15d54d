"""Where a first-order valued step spends its time beyond plain training, by ablation and by op.

Ablation (same model, same batches, alternating, medians; see inrun.cli.bench): plain training;
plain training plus one validation forward/backward (the part every method pays); the tracker
without its per-step consistency check; the tracker as shipped; the tracker with book-keeping.
Then torch.profiler's self CPU time per op over a few steps of plain training and of the tracker,
side by side, so the extra time can be read op by op.

Usage: python benchmarks/profile_order1.py [--workload R] [--steps 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from inrun.cli import bench


class PlainPlusValidation(bench.Method):
    """Plain training plus the validation forward/backward the tracker runs every step."""

    name = "plain + validation pass"

    def step(self, batch: tuple, ids: list[int]) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        torch.autograd.grad(self.w.val_loss(self.model), params)
        self.model.train()
        super().step(batch, ids)


ABLATION = {
    "plain": bench.Method,
    "plain + validation pass": PlainPlusValidation,
    "order 1, no check": bench.tracked("order 1, no check", check=False),
    "order 1": bench.METHODS["order 1"],
    "order 1 + book-keeping": bench.METHODS["order 1 + book-keeping"],
}


def op_times(method: bench.Method, w: bench.Workload, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per op name, per step."""
    B = w.batches[0][0].shape[0]
    method.step(w.batches[0], list(range(B)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(steps):
            method.step(w.batches[s % len(w.batches)], list(range((s + 1) * B, (s + 2) * B)))
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[event.key] += event.self_cpu_time_total / 1000 / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="R", choices=sorted(bench.WORKLOADS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w = bench.WORKLOADS[args.workload]()
    bench.METHODS.update(ABLATION)
    times = {n: t.wall for n, t in bench.time_methods(w, list(ABLATION), args.steps, warmup=2, rounds=4).items()}
    plain = statistics.median(times["plain"])
    print(f"### Ablation, workload {args.workload} ({w.notes}), {args.threads} threads, medians of {args.steps} steps\n")
    print("| method | median step (ms) | ratio to plain |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1000:.0f} | {statistics.median(t) / plain:.2f}x |")

    base = op_times(bench.Method(w), w, 4)
    tracked = op_times(ABLATION["order 1"](w), w, 4)
    extra = sorted(((tracked.get(k, 0.0) - base.get(k, 0.0), k) for k in set(base) | set(tracked)), reverse=True)
    print(f"\n### Self CPU time per step by op (torch.profiler, 4 steps): plain {sum(base.values()):.0f} ms, "
          f"order 1 {sum(tracked.values()):.0f} ms\n")
    print("| op | plain (ms) | order 1 (ms) | extra (ms) |")
    print("|---|---:|---:|---:|")
    for delta, key in extra[: args.top]:
        print(f"| `{key}` | {base.get(key, 0.0):.1f} | {tracked.get(key, 0.0):.1f} | {delta:+.1f} |")


if __name__ == "__main__":
    main()
