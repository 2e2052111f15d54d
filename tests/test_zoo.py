"""The zoo: every architecture in ``zoo.ZOO`` valued exactly, against an oracle that computes each
example's gradient on that example alone (float64 < 1e-9 of ``‖g_z‖ ‖u‖``; mixtures of experts
with grouped matmul in float32 < 1e-4). A subset also with AdamW (the Adam-aware rule) and with
order 2 (the trapezoid)."""

from __future__ import annotations

import pytest
from zoo import ZOO, ZooCase, run_case

pytestmark = pytest.mark.usefixtures("one_thread")

BY_NAME = {c.name: c for c in ZOO}
ADAMW = ["gpt2", "llama", "opt", "t5", "bert-mlm", "mixtral", "torch-encoder-sf", "torch-lstm", "torch-embeddingbag"]
TRAPEZOID = ["gpt2", "gemma", "bart", "vit", "olmoe", "torch-transformer", "torch-gru-sf", "torch-cnn-instancenorm"]


def test_the_zoo_is_large() -> None:
    assert len(ZOO) >= 24 and len(BY_NAME) == len(ZOO)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_exact_with_sgd(case: ZooCase) -> None:
    run_case(case, "sgd")


@pytest.mark.parametrize("name", ADAMW)
def test_exact_with_adamw(name: str) -> None:
    run_case(BY_NAME[name], "adamw")


@pytest.mark.parametrize("name", TRAPEZOID)
def test_exact_with_order_2(name: str) -> None:
    run_case(BY_NAME[name], "trapezoid")
