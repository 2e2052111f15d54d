"""Each step's drop, decomposed: ``L(θ_t) − L(θ_t+1) = D_t + U_t``, checked against an independent
oracle: the exact game of the step (``inrun.exact``: torch.func per-example gradients, the real
optimizer step from a copy of its state) enumerated over every subset of the batch, and the
validation loss the loop measures itself. The loop has two micro-batches per step and clipping."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import InRunShapley, exact
from inrun.tracking.drop import decompose

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8  # two micro-batches of 4: the exact game enumerates 2^8 subsets


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    return X[:200], torch.tensor(y[:200]), X[1500:1580], torch.tensor(y[1500:1580])


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)


def run(kind: str, lr: float, steps: int, oracle_steps=(), between=None, **options):
    """Train an MLP ``steps`` steps; at ``oracle_steps`` the exact game of the step (all 2^8 subsets)
    from a copy of the model and optimizer taken just before ``optimizer.step()``."""
    xt, yt, xv, yv = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = make_optimizer(kind, model.parameters(), lr)

    def val_loss(m):
        return F.cross_entropy(m(xv), yv)

    with torch.no_grad():
        first_loss = float(val_loss(model))
    tracker = InRunShapley(model, opt, val_loss=val_loss, keep_trace=True, **options)
    games = {}
    for s in range(steps):
        rows = list(range(s * BATCH, (s + 1) * BATCH))
        for half in (rows[:4], rows[4:]):
            with tracker.step(half):
                (F.cross_entropy(model(xt[half]), yt[half]) / 2).backward()
        unclipped = [p.grad.clone() for p in model.parameters()]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if s in oracle_steps:
            twin = copy.deepcopy(model)
            twin_opt = make_optimizer(kind, twin.parameters(), lr)
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            factor = {n: float(p.grad.norm() / g.norm()) for (n, p), g in zip(model.named_parameters(), unclipped)}
            per_example = exact.per_example_gradients(
                twin, lambda f, x, y: F.cross_entropy(f(x), y) / BATCH, (xt[rows], yt[rows]))
            game = exact.StepGame(twin, val_loss, per_example,
                                  exact.optimizer_update(twin, twin_opt, grad_factor=factor))
            subsets = exact.all_subsets(BATCH)
            games[s] = (game.utility(subsets), exact.enumerate_shapley(game.utility, BATCH))
        opt.step()
        opt.zero_grad()
        if between is not None:
            between(s, model, tracker)
    rows = tracker.drops()
    with torch.no_grad():
        last_loss = float(val_loss(model))
    return tracker, rows, games, first_loss, last_loss


@pytest.mark.parametrize("kind, lr", [("sgd", 0.5), ("momentum", 0.1), ("adamw", 0.01)])
def test_each_step_is_its_data_free_part_plus_the_exact_utility_of_its_game(kind, lr) -> None:
    """Per step: ``D_t`` is the exact game's ``U(∅)`` (the optimizer's step with no data), ``U_t`` its
    ``U(B) − U(∅)``, which is Σ of the exact Shapley values (efficiency); ``values`` is Σ of the
    ledger's values of the step; over the run the parts add up to the drop the loop measured."""
    tracker, rows, games, first_loss, last_loss = run(kind, lr, steps=5, oracle_steps=(0, 2, 4), order=2)
    assert [r["step"] for r in rows] == list(range(5))
    for step, (utility, shapley) in games.items():
        r = rows[step]
        empty, full = float(utility[0]), float(utility[-1])  # all_subsets: ∅ first, the batch last
        np.testing.assert_allclose(r["data_free"], empty, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(r["utility"], full - empty, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(r["utility"], float(shapley.sum()), rtol=1e-9, atol=1e-13)
    trace = tracker.ledger.trace()
    for r in rows:
        in_step = trace["step"] == r["step"]
        np.testing.assert_allclose(r["values"], (trace["first_order"] + trace["second_order"])[in_step].sum(),
                                   rtol=1e-12)
        assert r["remainder"] == pytest.approx(r["utility"] - r["values"], abs=1e-15)
    if kind == "sgd":
        assert all(r["data_free"] == 0.0 and r["loss_shifted"] == r["loss_before"] for r in rows)
    else:
        assert sum(abs(r["data_free"]) for r in rows[1:]) > 1e-4  # momentum and decay moved
    total = decompose(rows)
    assert total.measured == pytest.approx(first_loss - last_loss, rel=1e-12)
    assert total.data_free + total.utility + total.untracked == pytest.approx(first_loss - last_loss, rel=1e-12)
    assert total.untracked == 0.0


def test_adam_first_step_is_marked_and_left_out_of_the_totals() -> None:
    tracker, rows, _, first_loss, last_loss = run("adamw", 0.01, steps=4)
    assert rows[0]["nonlinear"].startswith("Adam's first step") and not any(r["nonlinear"] for r in rows[1:])
    total = decompose(rows)
    assert total.left_out == (0,)
    assert total.values == pytest.approx(sum(r["values"] for r in rows[1:]), rel=1e-12)
    assert total.left_out_values == pytest.approx(rows[0]["values"], rel=1e-12)
    assert total.measured == pytest.approx(first_loss - last_loss, rel=1e-12)  # its drop is still in
    assert "left out: step 0 (Adam's first step" in total.headline()
    kept = decompose(rows, leave_out_nonlinear=False)
    assert kept.values == pytest.approx(sum(r["values"] for r in rows), rel=1e-12)


def test_untracked_moves_are_their_own_part() -> None:
    """Steps taken with tracking off, and parameters changed outside ``optimizer.step()``, are no
    step's drop: the rows still add up to the measured drop with them as ``untracked``."""

    def between(step, model, tracker):
        if step == 1:
            tracker.enabled = False  # the loop's steps 2 and 3 train untracked
        if step == 3:
            tracker.enabled = True
        if step == 5:
            with torch.no_grad():
                model[0].bias.mul_(0.5)  # a loop's own change of the parameters after tracked step 3

    def train():
        xt, yt, xv, yv = digits()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        with torch.no_grad():
            first = float(F.cross_entropy(model(xv), yv))
        tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))
        for s in range(8):
            rows = list(range(s * BATCH, (s + 1) * BATCH))
            with tracker.step(rows):
                F.cross_entropy(model(xt[rows]), yt[rows]).backward()
            opt.step()
            opt.zero_grad()
            between(s, model, tracker)
        rows = tracker.drops()
        with torch.no_grad():
            return rows, first - float(F.cross_entropy(model(xv), yv))

    rows, measured = train()
    assert [r["step"] for r in rows] == list(range(6))  # the tracker counts the steps it saw
    assert math.isnan(rows[3]["utility"]) and rows[3]["flag"].startswith("not measured")
    total = decompose(rows)
    assert abs(total.untracked) > 1e-3
    assert total.data_free + total.utility + total.untracked == pytest.approx(measured, rel=1e-12)


@pytest.mark.parametrize("kind, order, calls", [
    ("sgd", 1, 1),        # f(0) = 0: the pass at θ_t gives L(θ_t) = L(θ_t + f(0))
    ("momentum", 1, 2),   # the pass at θ_t + f(0), and a forward at θ_t without gradient
    ("momentum", 2, 2),   # trapezoid: its pass at θ_t+1 gives L(θ_t+1): no extra forward
    ("adamw", 2, 2),
])
def test_what_the_losses_cost(kind, order, calls) -> None:
    """Validation-loss calls per step, counted: the drop's losses come from passes the tracker runs
    anyway, but for one forward without gradient per step when f(0) ≠ 0 at order 1."""
    xt, yt, xv, yv = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = make_optimizer(kind, model.parameters(), 0.05)
    counted = []

    def val_loss(m):
        counted.append(torch.is_grad_enabled())
        return F.cross_entropy(m(xv), yv)

    tracker = InRunShapley(model, opt, val_loss=val_loss, order=order)
    per_step = []
    for s in range(4):
        before = len(counted)
        rows = list(range(s * BATCH, (s + 1) * BATCH))
        with tracker.step(rows):
            F.cross_entropy(model(xt[rows]), yt[rows]).backward()
        opt.step()
        opt.zero_grad()
        per_step.append(len(counted) - before)
    assert per_step[2:] == [calls, calls]
