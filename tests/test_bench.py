"""`inrun bench` runs end to end and prints one ratio row per method (timings are not asserted)."""

from __future__ import annotations

import re

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
