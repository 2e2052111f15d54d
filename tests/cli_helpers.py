"""Small configs and helpers shared by the CLI, run-directory and report tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import inrun
from inrun.run.config import RunConfig, parse_config
from inrun.run.data.base import is_held_out
from inrun.run.runner import RunResult, train

SRC = Path(inrun.__file__).resolve().parents[1]

DIGITS_MLP = """
seed = 3
output = "{out}"
[model]
kind = "mlp"
hidden = [16]
[data]
kind = "sklearn"
dataset = "digits"
[validation]
max_examples = 32
[optimizer]
name = "sgd"
lr = 0.3
[training]
steps = {steps}
batch_size = 16
eval_every = 10
threads = 1
[values]
order = {order}
on_nonfinite = "{on_nonfinite}"
[checkpoint]
every = {every}
keep = 2
"""

TINY_GPT2 = """
seed = 0
output = "{out}"
[model]
kind = "hf"
hf_type = "gpt2"
hf_config = {{ n_layer = 1, n_embd = 32, n_head = 2, resid_pdrop = 0.0, embd_pdrop = 0.0, attn_pdrop = 0.0 }}
{lora}
[data]
kind = "stdlib"
length = 32
packages = ["json", "email", "tomllib", "zoneinfo"]
max_per_source = 40
[validation]
max_examples = 4
[optimizer]
name = "sgd"
lr = 1.0
[training]
steps = {steps}
batch_size = 8
clip_grad_norm = 1.0
eval_every = 4
threads = 1
[checkpoint]
every = 0
"""


def digits_config(out: Path, steps: int = 40, order: int = 1, every: int = 10, on_nonfinite: str = "stop", **_: Any) -> str:
    return DIGITS_MLP.format(out=out, steps=steps, order=order, every=every, on_nonfinite=on_nonfinite)


def gpt2_config(out: Path, steps: int = 24, lora: bool = False) -> str:
    adapters = '[model.lora]\nr = 2\ntarget_modules = ["c_attn"]' if lora else ""
    return TINY_GPT2.format(out=out, steps=steps, lora=adapters)


def run_in_process(text: str, overrides: tuple[str, ...] = (), **kwargs: Any) -> RunResult:
    """Train a config in this process, restoring torch's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        return train(parse_config(text, overrides=overrides), **kwargs)
    finally:
        torch.set_num_threads(threads)


def config_of(text: str) -> RunConfig:
    return parse_config(text)


def cli_env() -> dict[str, str]:
    """Environment in which ``python -m inrun.cli`` imports this checkout's inrun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cli(*args: str, **kwargs: Any) -> subprocess.Popen:
    """Start ``python -m inrun.cli ARGS`` as a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "inrun.cli", *args], env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, **kwargs,
    )


def tabular_file(path: Path, n: int = 48) -> tuple[Path, str]:
    """A JSONL file; returns the id of a training row that :func:`_poison` can corrupt."""
    rng = np.random.default_rng(0)
    nan_row = next(i for i in range(n) if not is_held_out(f"ex{i}", 0.2))
    with path.open("w") as f:
        for i in range(n):
            x = rng.normal(size=3)
            row = {"id": f"ex{i}", "source": "a" if i % 2 else "b", "x0": x[0], "x1": x[1], "x2": x[2], "y": int(x[0] > 0)}
            f.write(json.dumps(row) + "\n")
    return path, f"ex{nan_row}"


def tabular_config(
    data: Path, out: Path, policy: str, steps: int = 12, every: int = 4, order: int = 1, batch_size: int = 8
) -> str:
    return f"""
output = "{out}"
[model]
kind = "mlp"
hidden = [8]
[data]
kind = "file"
path = "{data}"
features = ["x0", "x1", "x2"]
label_field = "y"
[validation]
fraction = 0.2
[optimizer]
lr = 0.1
[training]
steps = {steps}
batch_size = {batch_size}
eval_every = 3
threads = 1
[values]
order = {order}
on_nonfinite = "{policy}"
[checkpoint]
every = {every}
"""
