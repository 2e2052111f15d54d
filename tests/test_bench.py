"""`inrun bench` runs end to end and prints one ratio row per method (timings are not asserted)."""

from __future__ import annotations

import re

from inrun.cli import bench
from inrun.cli.bench import floors, main, mlp_workload


def test_bench_prints_a_ratio_row_per_method(capsys) -> None:
    methods = "plain,order 1,order 1 + book-keeping,torch.func per-example"
    assert main(["--workloads", "M", "--steps", "2", "--rounds", "1", "--warmup", "1", "--threads", "1",
                 "--no-memory", "--methods", methods]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| ([\d.]+)x \| ([\d.]+)x \|", out, re.M)}
    assert set(rows) == set(methods.split(","))
    assert float(rows["plain"].group(3)) == 1.0
    assert all(float(r.group(3)) > 0 for r in rows.values())


def test_floors_count_the_added_work() -> None:
    w = mlp_workload()
    f = floors(w)
    # Every method adds the validation pass (32 rows against a batch of 256: 1/8 of training).
    assert f["order 1 + book-keeping"] == 1 + 32 / 256
    assert f["plain"] == 1.0 < f["order 1 + book-keeping"] < f["order 1"] < f["order 2 trapezoid"]


def test_bench_compiled_workload_prints_its_ratios(capsys, monkeypatch) -> None:
    """Workload C at a tiny size, on the aot_eager backend: the four rows, compiled order 1's ratio
    to compiled plain, and the compiled-against-eager line."""
    tiny = bench.gpt2_workload("C", 1, 16, 2, 4, 8, 8, methods=bench.COMPILED_METHODS, vocab=40)
    monkeypatch.setitem(bench.WORKLOADS, "C", lambda: tiny)
    assert main(["--workloads", "C", "--steps", "2", "--rounds", "1", "--warmup", "2", "--threads", "1",
                 "--no-memory", "--compile-backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| ([\d.]+)x \| ([\d.]+)x \|", out, re.M)}
    assert set(rows) == set(bench.COMPILED_METHODS)
    assert float(rows["plain"].group(3)) == 1.0 and float(rows["compiled order 1"].group(3)) > 0
    assert re.search(r"Compiled against eager: plain [\d.]+x, tracked [\d.]+x", out)


def test_bench_waits_for_the_device_before_each_clock_reading() -> None:
    """On CUDA a step's kernels finish after the Python that launched them: the clock synchronizes
    before reading (checked with a stand-in for torch.cuda.synchronize; no GPU needed)."""
    import torch

    from inrun.cli.bench import Clock, time_methods

    calls = []
    clock = Clock(torch.device("cuda"), synchronize=lambda: calls.append(1))
    times = time_methods(mlp_workload(), ["plain"], steps=2, warmup=1, rounds=1, clock=clock)
    steps = 1 + 2  # the warm-up step and the timed ones
    assert len(calls) == 2 * steps and len(times["plain"].wall) == 2
    assert Clock(torch.device("cpu")).synchronize is None


def test_targets_read_the_tables_bench_prints(capsys) -> None:
    """benchmarks/targets.py (perf_tables.sh's last table) parses the rows inrun bench prints."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("targets", Path(__file__).parents[1] / "benchmarks" / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    assert main(["--workloads", "M", "--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1",
                 "--no-memory", "--methods", "plain,order 1"]) == 0
    tables = targets.parse(capsys.readouterr().out)
    assert set(tables["M"]) == {"plain", "order 1"}
    assert float(tables["M"]["plain"]["time"]) == 1.0 and float(tables["M"]["order 1"]["floor"]) > 1
    fake = {"R": {"order 1": {**tables["M"]["order 1"], "time": "1.10", "floor": "1.27"}}}
    lines = targets.table(fake).splitlines()
    assert any(line.startswith("| R: GPT-2 4x256, 16x128, order 1 | 1.20x | 1.10x") and line.endswith("| yes |")
               for line in lines)
    assert any("T: nn.TransformerEncoder" in line and "not measured" in line for line in lines)


def test_memory_floor_counts_what_an_adam_step_keeps() -> None:
    """The memory floor's kept factors per micro-batch (inrun bench's analytic count) equal the
    floating-point bytes the Adam-aware tracker holds at the step, counted storage by storage on a
    small GPT-2 with two micro-batches (shapes where the factors are smaller than per-example
    gradients, so the floor is what an exact route keeps)."""
    import torch

    from inrun.cli.bench import (
        METHODS,
        gpt2_workload,
        kept_per_microbatch,
        memory_floors,
        trainable_parameters,
    )

    w = gpt2_workload("X", 1, 32, 2, 8, 8, 8, micro=2, vocab=64)
    assert all(w.tokens * (d + p) < d * p for d, p, _ in w.linears)
    method = METHODS["Adam-aware order 1"](w)
    kept = []

    def count(optimizer, args, kwargs) -> None:
        seen, total = set(), 0
        for mb in method.tracker._engine.window.micro:
            for cap in mb.captures:
                for t in torch.utils._pytree.tree_flatten(
                        (cap.saved, dict(cap.grad) if isinstance(cap.grad, dict) else cap.grad))[0]:
                    storage = t.untyped_storage() if torch.is_tensor(t) and t.is_floating_point() else None
                    if storage is not None and storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
        kept.append(total)

    method.opt.register_step_pre_hook(count)
    for step in range(2):
        method.step(w.batches[step], list(range(8 * step, 8 * step + 8)))
    assert kept == [2 * kept_per_microbatch(w)] * 2
    floors = memory_floors(w, trainable_parameters(w))
    theta = 4 * trainable_parameters(w)
    assert floors["order 1"] == 2 * theta and floors["Adam-aware order 1"] == 2 * theta + kept_per_microbatch(w)
