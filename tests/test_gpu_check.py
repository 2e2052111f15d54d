"""benchmarks/gpu_check.sh's CPU-safe parts: its dry run, and the throughput harness on a tiny GPT-2 on the CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_both_steps() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, env=env, check=True, timeout=60)
    assert "INRUN_TEST_DEVICE=cuda" in res.stdout and "tests/test_oracle.py" in res.stdout
    assert "GPT-2 small 12x768" in res.stdout and "16x1024 tokens" in res.stdout


def test_harness_times_every_method_on_a_tiny_gpt2(capsys, one_thread) -> None:
    harness = load_harness()
    assert harness.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| ([\d.]+)x \|", out, re.M)}
    assert set(rows) == set(harness.DEFAULT_METHODS)
    assert float(rows["plain"].group(4)) == 1.0 and all(int(r.group(3)) > 0 for r in rows.values())


def test_harness_refuses_unknown_methods() -> None:
    with pytest.raises(SystemExit, match="unknown methods"):
        load_harness().main(["--device", "cpu", "--tiny", "--methods", "plain,nonsense"])
