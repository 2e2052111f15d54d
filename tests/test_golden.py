"""Golden values: the tracker's output, bit for bit, over a matrix of settings.

Every value and per-validation value (as ``float.hex``) of a few tracked steps, for
{SGD, SGD with momentum and weight decay, AdamW} x {order 1, trapezoid, Hessian} x
{every forced route, auto, auto with book-keeping} x {scalar, vector val_loss} x
{one, two micro-batches} x {clipping off, on}, compared with ``==`` against
``tests/golden/tracker_values.json``. It guards refactors of the engine: a change that moves
code must not move a single bit. Regenerate only on purpose, in a commit that says why::

    INRUN_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Bits depend on the torch build and the CPU's kernels (AVX2 and AVX512 kernels round
differently), so the file records both: on the same torch and CPU capability the comparison is
``==``; elsewhere every number must lie within a rounding bound of the golden one (1e-9 of the
case's largest value in float64, 1e-5 in float32) and every step, id and skip must be equal, so
the matrix guards the engine on every machine rather than skipping where it was not made. One
thread, so the reduction order of every kernel is fixed.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import InRunShapley

GOLDEN = Path(__file__).parent / "golden" / "tracker_values.json"
REGENERATE = os.environ.get("INRUN_REGENERATE_GOLDEN") == "1"

VOCAB, SEQ, BATCH, STEPS = 13, 5, 4, 3


class GatedScale(nn.Module):
    """No handler knows it: valued by the torch.func fallback."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim) * 0.5 + 1)
        self.gate = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + torch.tanh(x * self.gate) * self.scale**2


class GoldenLM(nn.Module):
    """Tied embedding / head, positions without a batch dim, LayerNorm, Linear, HF Conv1D and a
    fallback module: every handler family of a language model in one small net."""

    def __init__(self, dim: int = 8) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(SEQ, dim)
        self.ln = nn.LayerNorm(dim)
        self.up = Conv1D(2 * dim, dim)
        self.down = nn.Linear(2 * dim, dim)
        self.gate = GatedScale(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.wte.weight
        with torch.no_grad():
            nn.init.normal_(self.up.weight, std=0.3)
            self.ln.weight.normal_(1.0, 0.3)
            self.ln.bias.normal_(0.0, 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])  # (T,): no batch dimension
        x = self.wte(ids) + self.wpe(pos)  # (B, T, d)
        x = x + self.down(torch.tanh(self.up(self.ln(x))))
        return self.head(self.gate(x))  # (B, T, V)


def token_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[B]``: each sequence's summed next-token loss."""
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(ids.shape[0], -1).sum(dim=1)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.3),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}
ORDERS = {"order1": {"order": 1}, "trapezoid": {"order": 2}, "hessian": {"order": 2, "second_order": "hessian"}}
ROUTES = {
    "auto": {},
    "auto_bookkeeping": {"bookkeeping": "auto"},
    "vector": {"route": "vector"},
    "gram": {"route": "gram"},
    "bookkeeping": {"bookkeeping": "always"},
}
VAL = ("scalar", "vector")
MICRO = (1, 2)
CLIP = ("noclip", "clip")


def settings() -> list[tuple[str, ...]]:
    rows = []
    for opt, order, route, val, micro, clip in itertools.product(OPTIMIZERS, ORDERS, ROUTES, VAL, MICRO, CLIP):
        if opt == "adamw" and order == "hessian":
            continue  # refused: the Hessian variant is defined for SGD-type steps
        rows.append((opt, order, route, val, str(micro), clip))
    rows += [("sgd", order, route, "scalar", "1", "noclip", "float32") for order in ORDERS for route in ROUTES]
    rows += [("adamw", "order1", route, "scalar", "2", "clip", "float32") for route in ROUTES]
    return rows


def run(opt_name: str, order: str, route: str, val: str, micro: str, clip: str, dtype: str = "float64") -> dict[str, Any]:
    torch.manual_seed(0)
    model = GoldenLM().to(getattr(torch, dtype))
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    val_ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))

    def val_loss(m: nn.Module) -> torch.Tensor:
        losses = token_losses(m, val_ids)
        return losses if val == "vector" else losses.mean()

    tracker = InRunShapley(model, optimizer, val_loss=val_loss, keep_trace=True, **ORDERS[order], **ROUTES[route])
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        for rows in torch.arange(BATCH).chunk(int(micro)):
            with tracker.step([step * BATCH + int(r) for r in rows]):
                (token_losses(model, batch[rows]).sum() / (BATCH * (SEQ - 1))).backward()
        if clip == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
    ledger = tracker.global_ledger()
    trace = ledger.trace()
    per_val = ledger.per_validation()
    tracker.close()
    return {
        "trace": [
            [int(s), int(i), float(a).hex(), float(b).hex()]
            for s, i, a, b in zip(trace["step"], trace["id"], trace["first_order"], trace["second_order"])
        ],
        "per_validation": None if per_val is None else [[float(x).hex() for x in row] for row in per_val[1]],
        "skipped": ledger.skipped,
    }


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def key(row: tuple[str, ...]) -> str:
    return "/".join(row)


@pytest.fixture(scope="module")
def golden(one_thread) -> dict[str, Any]:
    if REGENERATE:
        return {"environment": environment(), "cases": {}}
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; regenerate it with INRUN_REGENERATE_GOLDEN=1")
    return json.loads(GOLDEN.read_text())


ROUNDING = {"float64": 1e-9, "float32": 1e-5}
"""Off the golden file's torch and CPU: how far a number may move, relative to the case's largest."""


def numbers(case: dict[str, Any]) -> list[float]:
    found = [float.fromhex(x) for _, _, a, b in case["trace"] for x in (a, b)]
    return found + [float.fromhex(x) for row in case["per_validation"] or [] for x in row]


def assert_within_rounding(got: dict[str, Any], want: dict[str, Any], dtype: str) -> None:
    assert [r[:2] for r in got["trace"]] == [r[:2] for r in want["trace"]], "steps or ids differ"
    assert (got["per_validation"] is None) == (want["per_validation"] is None)
    assert got["skipped"] == want["skipped"]
    mine, theirs = numbers(got), numbers(want)
    assert len(mine) == len(theirs)
    scale = max((abs(x) for x in theirs), default=0.0) or 1.0
    worst = max((abs(a - b) for a, b in zip(mine, theirs)), default=0.0) / scale
    assert worst <= ROUNDING[dtype], f"moved by {worst:.2e} of the largest value (bound {ROUNDING[dtype]:.0e})"


ROWS = settings()


@pytest.mark.parametrize("row", ROWS, ids=key)
def test_values_are_bit_identical_to_the_golden_file(golden: dict[str, Any], row: tuple[str, ...]) -> None:
    got = run(*row)
    if REGENERATE:
        golden["cases"][key(row)] = got
        if len(golden["cases"]) == len(ROWS):
            GOLDEN.parent.mkdir(exist_ok=True)
            GOLDEN.write_text(json.dumps(golden, indent=0, sort_keys=True) + "\n")
        return
    assert key(row) in golden["cases"], f"no golden values for {key(row)}: regenerate on purpose"
    if golden["environment"] == environment():
        assert got == golden["cases"][key(row)]
    else:
        assert_within_rounding(got, golden["cases"][key(row)], row[6] if len(row) > 6 else "float64")


def test_the_matrix_covers_every_setting(golden: dict[str, Any]) -> None:
    """Each setting is in the file, and the file has no stale rows."""
    if REGENERATE:
        return
    assert set(golden["cases"]) == {key(r) for r in ROWS}
    assert any(case["per_validation"] for case in golden["cases"].values())
