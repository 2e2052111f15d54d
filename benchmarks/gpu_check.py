"""Throughput of GPT-2 small on a GPU: plain training vs order 1, Adam-aware order 1 and order 2.

GPT-2 small (12 x 768, 12 heads, vocab 50257), 16 x 1024 tokens per step, 1 validation sequence
of 1024 tokens; each method its own copy of the same model and batches (``inrun.cli.bench``'s GPT-2
workload and methods), in alternation after warm-up. Every step is timed between two
``torch.cuda.synchronize()`` calls; a method's throughput is tokens per step over its median
step time, and its ratio is to plain SGD training ("Adam-aware order 1" to plain AdamW). Peak
memory is what a step allocates above what was allocated before it (``max_memory_allocated``),
the worst step of the method, as a ratio to its baseline's. float32 with TF32 matmuls off, like
the tests.

    python benchmarks/gpu_check.py [--device cuda] [--steps 10] [--tiny] [--dry-run]

``--tiny`` (GPT-2 1 x 32, 2 x 16 tokens) and ``--device cpu`` let the suite run the harness
(tests/test_gpu_check.py); ``--dry-run`` prints the plan and exits.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from inrun.cli.bench import BASELINE_OF, METHODS, Clock, Workload, gpt2_workload, on_device

DEFAULT_METHODS = ("plain", "order 1", "plain AdamW", "Adam-aware order 1", "order 2 trapezoid")


def workload(tiny: bool, device: torch.device) -> Workload:
    """GPT-2 small as inrun.cli.bench builds its GPT-2 workloads, with model and data on ``device``."""
    if tiny:
        w = gpt2_workload("G", 1, 32, 2, 2, 16, 16, vocab=64)
    else:
        w = gpt2_workload("G", 12, 768, 12, 16, 1024, 1024, vocab=50257)
    return on_device(w, device)


def timed_step(method: object, w: Workload, index: int, clock: Clock) -> tuple[float, float]:
    """(seconds, bytes allocated above the step's start at its peak) of one optimizer step; the
    clock waits for the device's queued work before each reading."""
    batch = w.batches[index % len(w.batches)]
    B = w.examples
    device = clock.device
    clock.read()
    base = 0
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = clock.read()
    method.step(batch, list(range(index * B, (index + 1) * B)))
    seconds = clock.read() - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return seconds, float(peak)


def measure(w: Workload, names: list[str], steps: int, warmup: int, device: torch.device) -> dict[str, dict[str, float]]:
    methods = {n: METHODS[n](w) for n in names}
    clock = Clock(device)
    counter = dict.fromkeys(names, 0)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks = dict.fromkeys(names, 0.0)

    def run(n: str) -> tuple[float, float]:
        out = timed_step(methods[n], w, counter[n], clock)
        counter[n] += 1
        return out

    for n in names:
        for _ in range(warmup):
            run(n)
    for r in range(steps):
        for n in names if r % 2 == 0 else reversed(names):
            seconds, peak = run(n)
            times[n].append(seconds)
            peaks[n] = max(peaks[n], peak)
    tokens = w.examples * w.tokens
    return {n: {"median_s": statistics.median(times[n]), "tokens_per_s": tokens / statistics.median(times[n]),
                "peak_bytes": peaks[n]} for n in names}


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| method | median step (ms) | tokens/s | time ratio | peak step memory (MiB) | memory ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, r in results.items():
        base = results.get(BASELINE_OF.get(n, "plain"), r)
        mib, mem = "n/a", "n/a"  # measured on CUDA only
        if base["peak_bytes"]:
            mib, mem = f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / base['peak_bytes']:.2f}x"
        lines.append(f"| {n} | {1000 * r['median_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['median_s'] / base['median_s']:.2f}x | {mib} | {mem} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--tiny", action="store_true", help="GPT-2 1x32 on 2x16 tokens (the suite's smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; methods: {list(METHODS)}")
    names += [b for b in {BASELINE_OF.get(n, "plain") for n in names} if b not in names]
    device = torch.device(args.device)
    size = "GPT-2 1x32, 2x16 tokens" if args.tiny else "GPT-2 small 12x768, vocab 50257, 16x1024 tokens, 1 val x 1024"
    print(f"{size} on {device}; {args.steps} timed steps after {args.warmup} warm-up, methods: {', '.join(names)}")
    if args.dry_run:
        return 0
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu --tiny, or on a GPU machine")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results = measure(workload(args.tiny, device), names, args.steps, args.warmup, device)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
