"""What the loop checks cost: the gradient reference and its classification at the step
(:mod:`inrun.tracking.gradmap`) and the per-step example run alone (:mod:`inrun.tracking.probes`),
against the tracker without them ("before": the gradient norms read at the block's end and at the
step, as the tracker did when it assumed any change was a clip factor; no per-step example).

Each workload of ``inrun bench`` (default R and M) is trained side by side in one process, steps
alternating between the methods, medians of the step times; printed as ratios to plain training and
to "before", with the load average beside them (a shared machine's timings are noisy: the ratios
are taken side by side for that reason).

    python benchmarks/loop_checks.py [--workloads R,M] [--steps 24] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, ClassVar

import torch

from inrun.cli.bench import METHODS, WORKLOADS, Tracked, time_methods
from inrun.tracking import gradmap


class NormsOnly(gradmap.GradientReference):
    """The tracker before its gradients were verified: two norm passes, no copy, no comparison."""

    def sync(self) -> None:
        self.present = [p.grad is not None for p in self.params]
        self._norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])

    def classify(self, rows: Any = None) -> gradmap.StepMap:
        grads = [p.grad for p in self.params]
        now = torch.stack(torch._foreach_norm([g for g in grads if g is not None])).double()
        ratio = now / torch.stack(self._norms).double().clamp_min(1e-300)
        return gradmap.StepMap(ratio=ratio, batch=grads)

    def changed(self, rows: Any = None) -> list[int]:
        return []

    def batch_grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]


class Before(Tracked):
    options: ClassVar[dict[str, Any]] = {"verify": "layouts"}

    def setup(self) -> None:
        super().setup()
        engine = self.tracker._engine
        engine.gradients = NormsOnly(engine.table.params, engine.table.names)


class Clipped(Tracked):
    """The loop clips by norm between the block and the step (the classification runs)."""

    def step(self, batch: tuple, ids: list[int]) -> None:
        for part, part_ids in self.w.micro_batches(batch, ids):
            self.backward(part, part_ids)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e-3)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class ClippedBefore(Before, Clipped):
    pass


VARIANTS = {
    "order 1, before": type("B", (Before,), {"name": "order 1, before"}),
    "order 1, now": type("N", (Tracked,), {"name": "order 1, now"}),
    "order 1 + clip, before": type("CB", (ClippedBefore,), {"name": "order 1 + clip, before"}),
    "order 1 + clip, now": type("CN", (Clipped,), {"name": "order 1 + clip, now"}),
}


def components(w: Any, repeats: int = 20) -> dict[str, float]:
    """Medians (s) of the checks themselves on the workload's gradients: the reference's copy at a
    block's end, the comparison at an unchanged step, the classification of a clipped one, and the
    per-step example alone."""
    m = METHODS["order 1, now"](w)
    B = w.batches[0][0].shape[0]
    for i in range(2):
        m.step(w.batches[0], list(range(i * B, (i + 1) * B)))
    engine = m.tracker._engine
    ref = engine.gradients
    for part, part_ids in w.micro_batches(w.batches[1], list(range(2 * B, 3 * B))):
        with m.tracker.step(part_ids):
            (w.loss(m.model, part) / w.micro).backward()
    engine.root_calls.arm(B)
    with torch.enable_grad():
        out = w.loss(m.model, w.batches[1])  # a call of the model, kept as the per-step check sees it
    calls = engine.root_calls.disarm()
    del out

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {"copy at the block's end": timed(ref.sync), "compare, unchanged": timed(ref.classify)}
    saved = [p.grad.clone() for p in ref.params]
    for p in ref.params:
        p.grad.mul_(0.5)
    out["classify, clipped"] = timed(ref.classify)
    for p, g in zip(ref.params, saved):
        p.grad.copy_(g)
    out["one example alone"] = timed(lambda: engine.probes.alone(calls, 1, 0))
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    return out


def first_step(w: Any, probes: bool, repeats: int) -> float:
    """Median time of a tracker's first step (the row verification), with or without the probes
    (the shuffled copy's proof and the interaction probes)."""
    from inrun.tracking import plan

    shuffled, interactions = plan.RowVerifier._shuffled_round, plan.refuse_interactions
    if not probes:
        plan.RowVerifier._shuffled_round = lambda self, mb, calls: {}
        plan.refuse_interactions = lambda engine, call: True
    try:
        times = []
        for _ in range(repeats):
            m = METHODS["order 1, now"](w)
            B = w.batches[0][0].shape[0]
            start = time.perf_counter()
            m.step(w.batches[0], list(range(B)))
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        plan.RowVerifier._shuffled_round, plan.refuse_interactions = shuffled, interactions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="R,M")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--first", type=int, default=3, help="fresh trackers whose first step is timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    METHODS.update(VARIANTS)
    names = ["plain", *VARIANTS]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, threads {torch.get_num_threads()}")
    for key in args.workloads.split(","):
        w = WORKLOADS[key]()
        times = time_methods(w, names, args.steps, args.warmup, args.rounds)
        med = {n: statistics.median(t) for n, t in times.items() if t}
        with_probes = [first_step(w, True, 1) for _ in range(args.first)]
        without = [first_step(w, False, 1) for _ in range(args.first)]
        parts = components(w)
        print(f"\n{key}: {w.notes}")
        print("checks alone, median over 20 repeats, as a share of a plain step: " + ", ".join(
            f"{name} {1000 * t:.2f} ms ({t / med['plain']:.1%})" for name, t in parts.items()))
        print(f"first step (row verification): {1000 * statistics.median(with_probes):.0f} ms with the probes, "
              f"{1000 * statistics.median(without):.0f} ms without "
              f"({statistics.median(with_probes) / statistics.median(without):.2f}x; "
              f"{statistics.median(with_probes) / med['plain']:.1f} plain steps)")
        print("| method | median step (ms) | vs plain | vs before |")
        print("|---|---:|---:|---:|")
        for n in names:
            if n not in med:
                continue
            before = med.get(n.replace("now", "before"), med[n])
            print(f"| {n} | {1000 * med[n]:.1f} | {med[n] / med['plain']:.3f} | {med[n] / before:.3f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
