"""The zoo: every architecture in ``zoo.ZOO``, ``zoo_patterns.PATTERNS`` and
``zoo_families.FAMILIES`` valued exactly, against an oracle that computes each example's gradient
on that example alone (float64 < 1e-9 of ``‖g_z‖ ‖u‖``; mixtures of experts with grouped matmul in
float32 < 1e-4; models that compute in float32 inside, < 1e-6), or refused with a one-line
``InRunError`` that names the module and the fix. A subset also with AdamW (the Adam-aware rule)
and with order 2 (the trapezoid)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from zoo import ZOO, ZooCase, run_case
from zoo_families import FAMILIES
from zoo_patterns import PATTERNS

from inrun.errors import InRunError

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ZOO + PATTERNS + FAMILIES
BY_NAME = {c.name: c for c in ALL}
ADAMW = ["gpt2", "llama", "opt", "t5", "bert-mlm", "mixtral", "torch-encoder-sf", "torch-lstm", "torch-embeddingbag",
         "t5-labels", "tcn-legacy-weight-norm", "gpt-oss", "loss-and-logits"]
TRAPEZOID = ["gpt2", "gemma", "bart", "vit", "olmoe", "torch-transformer", "torch-gru-sf", "torch-cnn-instancenorm",
             "tcn-spectral-norm", "gpt2-checkpoint-reentrant", "custom-functions-without-jvp", "gru-packed-sequence",
             "qwen3-next"]


def test_the_zoo_is_large() -> None:
    assert len(ALL) >= 80 and len(BY_NAME) == len(ALL)


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_exact_with_sgd(case: ZooCase) -> None:
    if case.refused is None:
        run_case(case, "sgd")
        return
    with pytest.raises(InRunError) as refusal:
        run_case(case, "sgd")
    message = str(refusal.value)
    assert "\n" not in message and re.search(case.refused, message), message


@pytest.mark.parametrize("name", ADAMW)
def test_exact_with_adamw(name: str) -> None:
    run_case(BY_NAME[name], "adamw")


@pytest.mark.parametrize("name", TRAPEZOID)
def test_exact_with_order_2(name: str) -> None:
    run_case(BY_NAME[name], "trapezoid")


@pytest.mark.parametrize("name", ["torch-checkpoint-reentrant", "tcn-spectral-norm"])
def test_exact_with_the_audit_on(name: str) -> None:
    """The audit replays and differentiates the model too (inline checkpoints, restored buffers)."""
    run_case(dataclasses.replace(BY_NAME[name], tracker_options={"audit": {"every": 1, "players": 3}}), "sgd")
