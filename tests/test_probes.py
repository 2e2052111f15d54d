"""The per-step check of one example alone (``verify="on_change"``): once per optimizer step, at a
micro-batch drawn among the step's, so an interaction that only some micro-batches have is still
caught, at the cost of one example's forward per step (not one per micro-batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun import InRunShapley
from inrun.errors import UnsupportedModuleError

MICRO, SIZE = 4, 6


class CountingMLP(nn.Module):
    """Counts its forwards on one example; centres its hidden rows over the batch when ``center``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.center = False
        self.single = 0

    def forward(self, x: Tensor) -> Tensor:
        self.single += x.shape[0] == 1
        h = torch.tanh(self.body(x))
        return self.head(h - h.mean(0) if self.center else h)


def tracked(optimizer: type[torch.optim.Optimizer], lr: float) -> tuple[CountingMLP, torch.optim.Optimizer, InRunShapley]:
    """A float64 counting MLP, its optimizer and its tracker (the default ``verify="on_change"``)."""
    torch.manual_seed(0)
    model = CountingMLP().double()
    opt = optimizer(model.parameters(), lr=lr)
    xv, yv = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    return model, opt, InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))


def loop(steps: int, centre_micro: int | None = None, centre_from: int = 2) -> tuple[CountingMLP, list[int]]:
    """AdamW over ``MICRO`` micro-batches a step; from ``centre_from`` on, micro-batch ``centre_micro``
    centres its rows. Returns the model and its single-example forwards counted at each step."""
    model, opt, tracker = tracked(torch.optim.AdamW, 0.01)
    per_step = []
    for step in range(steps):
        before = model.single
        for k in range(MICRO):
            x, y = torch.randn(SIZE, 5, dtype=torch.float64), torch.randint(0, 3, (SIZE,))
            model.center = centre_micro == k and step >= centre_from
            ids = list(range((step * MICRO + k) * SIZE, (step * MICRO + k + 1) * SIZE))
            with tracker.step(ids):
                (F.cross_entropy(model(x), y) / MICRO).backward()
        model.center = False
        opt.step()
        opt.zero_grad()
        per_step.append(model.single - before)
    tracker.close()
    return model, per_step


def test_one_example_alone_once_per_step_not_per_micro_batch() -> None:
    _, per_step = loop(6)
    # step 0 is verified (its probes run parts of the batch alone); each later step, one example
    # alone once, plus the validation pass's and the drop row's forwards (batches of 4, not 1)
    assert per_step[0] > 1 and per_step[1:] == [1] * 5


def test_an_interaction_in_one_micro_batch_of_each_step_is_refused() -> None:
    """Centring only in the last micro-batch from step 2: the draw reaches it at some step."""
    with pytest.raises(UnsupportedModuleError, match="examples interact"):
        loop(16, centre_micro=MICRO - 1)


def test_the_model_outputs_are_held_only_for_the_micro_batch_the_check_reads() -> None:
    """Past the verified step, each block's outputs (a language model's logits: as large as its
    output gradient) are dropped when the backward reaches them, except in the micro-batch the
    per-step check runs: the block's end finds storage-less stand-ins of the same shape there."""
    from inrun.tracking.replay import RootCalls

    kept: list[list[bool]] = []
    disarm = RootCalls.disarm

    def recording(self: RootCalls) -> list:
        calls = disarm(self)
        kept[-1].append(all(t.stride() != (0, 0) for c in calls for t in c.outputs))
        return calls

    RootCalls.disarm = recording  # type: ignore[method-assign]
    try:
        model, opt, tracker = tracked(torch.optim.SGD, 0.1)
        for step in range(4):
            kept.append([])
            for k in range(MICRO):
                x, y = torch.randn(SIZE, 5, dtype=torch.float64), torch.randint(0, 3, (SIZE,))
                with tracker.step(list(range((step * MICRO + k) * SIZE, (step * MICRO + k + 1) * SIZE))):
                    (F.cross_entropy(model(x), y) / MICRO).backward()
            opt.step()
            opt.zero_grad()
        tracker.close()
    finally:
        RootCalls.disarm = disarm  # type: ignore[method-assign]
    assert kept[0][0]  # the first micro-batch is verified: it keeps its outputs
    assert [sum(s) for s in kept[1:]] == [1, 1, 1]  # then only the drawn micro-batch of each step


def test_past_the_first_steps_a_small_step_is_checked_at_a_share_of_steps() -> None:
    """Steps of 6 examples: checked at every one of the first 8 steps, then at about
    3 · 6 · 1% = 18% of the steps (one example's forward is about 1/18 of such a step); an
    interaction that appears at step 60 is still refused within the run."""
    from inrun.tracking.probes import EVERY_STEP_UNTIL, check_rate

    assert check_rate(6) == pytest.approx(0.18) and check_rate(34) == 1.0
    model, opt, tracker = tracked(torch.optim.SGD, 0.1)
    checked = []
    refused_at = None
    for step in range(96):
        before = model.single
        model.center = step >= 60
        x, y = torch.randn(SIZE, 5, dtype=torch.float64), torch.randint(0, 3, (SIZE,))
        try:
            with tracker.step(list(range(step * SIZE, (step + 1) * SIZE))):
                F.cross_entropy(model(x), y).backward()
        except UnsupportedModuleError:
            refused_at = step
            break
        opt.step()
        opt.zero_grad()
        checked.append(model.single - before)
    assert checked[1:EVERY_STEP_UNTIL] == [1] * (EVERY_STEP_UNTIL - 1)
    later = checked[EVERY_STEP_UNTIL:60]
    assert 2 <= sum(later) <= 20, later  # 44 steps at 18%: 8 expected
    assert refused_at is not None and refused_at >= 60, (sum(later), refused_at)
