"""Small configs and helpers shared by the CLI, run-directory and report tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import inrun
from inrun.config import RunConfig, parse_config
from inrun.runner import RunResult, train

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


def digits_config(out: Path, steps: int = 40, order: int = 1, every: int = 10, **_: Any) -> str:
    return DIGITS_MLP.format(out=out, steps=steps, order=order, every=every)


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
