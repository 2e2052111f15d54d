"""What carry (``carry="momentum"``) changes on the demo's recipe, and what it costs.

Two copies of the ``make demo`` model (GPT-2 2x128 on standard-library chunks, AdamW, clip 1.0)
train on the same batches side by side in one process, one tracker with carry and one without,
their steps alternating; printed: the median step time of each and their ratio (with the load
average), the memory carry keeps (factors of the open windows and their accumulators), and what
the carried values change: Σ carried against Σ of the data-free parts (which carry credits to
earlier batches), and the ranking (Spearman of immediate against immediate + carried values).

Usage: python benchmarks/carry.py [--steps 120] [--warmup 0] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from importlib import resources

import numpy as np
import torch

from inrun import InRunShapley
from inrun.run.config import load_config
from inrun.run.data import load_data
from inrun.run.models import build_model, build_optimizer, build_schedule, loss_function
from inrun.tracking.drop import decompose


def kept_bytes(tracker: InRunShapley) -> int:
    """Bytes the open carry windows hold: kept factors of their micro-batches and accumulators."""
    carry = tracker._engine.accounts.carry
    seen: set[int] = set()
    total = 0

    def add(t: object) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            for x in t:
                add(x)

    for w in carry.open:
        add(w.acc)
        for mb in w.window.micro:
            for cap in mb.captures:
                add(cap.saved)
                add(cap.grad)
    return total


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    demo = resources.files("inrun") / "configs" / "demo.toml"
    config = load_config(str(demo), [*args.set, f"training.steps={args.steps}"])
    torch.set_num_threads(config.training.threads or torch.get_num_threads())
    train_set, val_set = load_data(config)
    torch.manual_seed(config.seed)
    base = build_model(config.model, train_set).train()
    loss_fn = loss_function(train_set)
    runs = {}
    for name, carry in (("immediate", "off"), ("carry", "momentum")):
        model = copy.deepcopy(base)
        opt = build_optimizer(config.optimizer, model)
        schedule = build_schedule(config.schedule, opt, args.steps)
        tracker = InRunShapley(model, opt, val_loss=lambda m: loss_fn(m, val_set.inputs, val_set.targets),
                               order=config.values.order, carry=carry)
        runs[name] = {"model": model, "opt": opt, "schedule": schedule, "tracker": tracker, "times": [], "kept": 0}
    gen = torch.Generator().manual_seed(config.seed)
    bs, clip = config.training.batch_size, config.training.clip_grad_norm
    for step in range(args.steps):
        rows = torch.randperm(len(train_set.ids), generator=gen)[:bs]
        ids = [train_set.ids[int(r)] for r in rows]
        x, y = train_set.inputs[rows], train_set.targets[rows]
        for name in (("immediate", "carry") if step % 2 == 0 else ("carry", "immediate")):
            run = runs[name]
            t0 = time.perf_counter()
            with run["tracker"].step(ids):
                loss_fn(run["model"], x, y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(run["model"].parameters(), clip)
            run["opt"].step()
            run["opt"].zero_grad()
            run["schedule"].step()
            run["times"].append(time.perf_counter() - t0)
            if name == "carry":
                run["kept"] = max(run["kept"], kept_bytes(run["tracker"]))
    validation = runs["immediate"]["tracker"]._engine.validation
    forward = []
    for _ in range(9):  # the drop row's one extra forward (L(θ_t+1) where f(0) ≠ 0), as it runs
        validation._plain_loss = None
        t0 = time.perf_counter()
        validation.loss_here(args.steps)
        forward.append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    immediate, carried_run = runs["immediate"]["tracker"], runs["carry"]["tracker"]
    rows = carried_run.drops()
    values = carried_run.values()
    carried = carried_run.carried()
    ids = list(values)
    v = np.array([values[i] for i in ids])
    c = np.array([carried.get(i, 0.0) for i in ids])
    median = {n: statistics.median(r["times"][2:]) for n, r in runs.items()}
    total = decompose(rows)
    window = carried_run._engine.accounts.carry
    print(f"demo recipe, {args.steps} steps of {bs}, order {config.values.order}, {config.optimizer.name} "
          f"lr {config.optimizer.lr}; load average {load:.1f}")
    print(f"| | immediate | with carry | ratio |\n|---|---:|---:|---:|\n| median step (s) | "
          f"{median['immediate']:.3f} | {median['carry']:.3f} | {median['carry'] / median['immediate']:.2f} |")
    print(f"the drop rows' extra forward L(θ_t+1): {statistics.median(forward) * 1e3:.1f} ms = "
          f"{statistics.median(forward) / median['immediate']:.1%} of a step")
    print(f"memory kept by the open windows (factors and accumulators): {runs['carry']['kept'] / 2**20:.0f} MiB "
          f"(window {len(window.open)} steps open at the end)")
    print(f"Σ values {v.sum():+.4f}; Σ carried {c.sum():+.4f}; Σ data-free parts {total.data_free:+.4f} "
          f"(step games Σ U {total.utility:+.4f}, measured drop {total.measured:+.4f})")
    print(f"Spearman(immediate, immediate + carried) {spearman(v, v + c):.3f}; "
          f"Spearman(immediate, carried) {spearman(v, c):.3f}; examples {len(ids)}")
    same = np.array_equal(immediate.values().value, values.value)
    print(f"immediate values of the two trackers identical: {same}")


if __name__ == "__main__":
    main()
