"""Muon and Adafactor: values of the update they make, against the real optimizer.

Oracles: (a) the rule's map of the gradient equals the real ``optimizer.step()`` (Adafactor to
float64 rounding; Muon to torch's bfloat16 Newton–Schulz); (b) exact Shapley values of the real
step's game, every subset of the batch enumerated through a copy of the real optimizer
(``inrun.exact.optimizer_update``), the same check Adam's secant passes in test_optimizers.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon
from test_optimizers import (
    copy_optimizer,
    mlp_batches,
    mlp_example_loss,
    mlp_loss,
    mlp_val_loss,
    real_step,
    rel_rmse,
    tracked_step,
    true_values,
    warm_up,
)
from torch import nn

from inrun import InRunShapley, optim
from inrun.optim import rule_for


def mlp(bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 16, bias=bias), nn.Tanh(), nn.Linear(16, 2, bias=bias)).double()


def warmed(make_opt, bias: bool, warm: int) -> tuple[nn.Module, torch.optim.Optimizer, tuple]:
    model = mlp(bias)
    opt = make_opt(model.parameters())
    batches = mlp_batches(warm + 1, 8)
    warm_up(model, opt, batches[:-1], mlp_loss)
    return model, opt, batches[-1]


def map_and_real_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per parameter: the rule's ``f(0) + (f(x) − f(0))`` and the real step, for the batch's gradient."""
    m2 = copy.deepcopy(model)
    mlp_loss(m2, batch).backward()
    grads = [p.grad.detach().clone() for p in m2.parameters()]
    o2 = copy_optimizer(opt, model, m2)
    rule = rule_for(o2)
    params = list(m2.parameters())
    shift = rule.data_free_step(params) or [torch.zeros_like(p) for p in params]
    pulls = rule.pullbacks(params, grads)  # built from the state before the step, like the tracker
    maps = [rule._map(p, g, torch.float64) for p, g in zip(params, rule._groups(params))]
    real = real_step(model, opt, grads)
    out = []
    for p, g, f, s, r in zip(params, grads, maps, shift, real):
        data = (-optim.muon_lr(rule._lr(o2.param_groups[0]), None, p.shape) * (f[2](f[0] + f[1] * g) - f[2](f[0]))
                if isinstance(rule, optim.MuonRule) else f(g))
        out.append((s + data, r))
    assert all(callable(f) for f in pulls)
    return out


def test_adafactor_map_is_the_real_step() -> None:
    for options in ({}, {"weight_decay": 0.1, "maximize": True}, {"lr": 0.5, "eps": (1e-20, 1e-3)}):
        model, opt, batch = warmed(lambda ps, o=options: torch.optim.Adafactor(ps, **{"lr": 1e-2, **o}), True, 3)
        for mine, real in map_and_real_step(model, opt, batch):
            torch.testing.assert_close(mine, real, rtol=1e-10, atol=1e-15)


def test_muon_map_is_the_real_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule differentiates torch's Newton–Schulz iteration in the parameter's dtype: equal to
    the real step when torch's iteration runs in float64 too; torch runs it in bfloat16, whose
    rounding the quintic iteration amplifies on small singular values (9% of this 2x16 matrix's
    step, 2% of the 16x30 one's)."""
    for nesterov in (True, False):
        make = (lambda ps, n=nesterov: torch.optim.Muon(ps, lr=0.02, nesterov=n, weight_decay=0.1))
        model, opt, batch = warmed(make, False, 5)
        gaps = [float((mine - real).norm() / real.norm()) for mine, real in map_and_real_step(model, opt, batch)]
        assert max(gaps) < 0.15 and min(gaps) < 0.05, gaps
        with monkeypatch.context() as m:
            m.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_float64)
            for mine, real in map_and_real_step(model, opt, batch):
                torch.testing.assert_close(mine, real, rtol=1e-10, atol=1e-15)


def ns_float64(grad, ns_coefficients, ns_steps, eps):
    """torch's Muon orthogonalization (torch/optim/_muon.py) in float64 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.double()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if grad.size(0) > grad.size(1):
        x = x.T
    return x.to(grad.dtype)


CASES = {
    # optimizer, bias (Muon takes matrices only), warm-up steps, bounds for the default rule
    "adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), True, 5, 0.06, 0.999),
    "muon": (lambda ps: torch.optim.Muon(ps, lr=0.02), False, 50, 0.3, 0.99),
    "muon, float64 NS": (lambda ps: torch.optim.Muon(ps, lr=0.02), False, 50, 0.05, 0.999),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_match_exact_shapley_of_the_real_step(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path-integrated derivative (default) against the game enumerated over the 2^8 subsets,
    beside the tangent at the step and the paper's SGD proxy. With torch's bfloat16 Newton–Schulz
    the real step's rounding is in the game (relative RMSE 0.22); with it in float64 the
    linearization's own error is left (0.03)."""
    make_opt, bias, warm, max_rmse, min_pearson = CASES[case]
    if "float64" in case:
        monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_float64)
    model, opt, batch = warmed(make_opt, bias, warm)
    truth = true_values(model, opt, mlp_example_loss, batch, mlp_val_loss)
    path = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss)
    rule = optim.MuonRule if "muon" in case else optim.AdafactorRule
    monkeypatch.setattr(rule, "nodes", (0,))
    tangent = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss)
    proxy = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss, proxy="sgd")
    monkeypatch.setattr(rule, "nodes", optim.PATH_NODES)
    second = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss, order=2)
    assert rel_rmse(path, truth) <= max_rmse and np.corrcoef(path, truth)[0, 1] >= min_pearson
    assert rel_rmse(path, truth) < rel_rmse(tangent, truth) < rel_rmse(proxy, truth)
    assert rel_rmse(second, truth) <= max_rmse  # the trapezoid keeps the step's pull-back until g_val(θ_t+1)


@pytest.mark.parametrize("opt_cls", ["Muon", "Adafactor"])
def test_accumulation_equals_one_batch(opt_cls: str) -> None:
    """Two micro-batches give the values of one batch of the same examples: the pull-back is built
    once, at the step, from the accumulated gradient."""
    make = {"Muon": lambda ps: torch.optim.Muon(ps, lr=0.02), "Adafactor": lambda ps: torch.optim.Adafactor(ps)}[opt_cls]
    model, opt, batch = warmed(make, opt_cls == "Adafactor", 5)
    whole = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss)
    m2 = copy.deepcopy(model)
    o2 = copy_optimizer(opt, model, m2)
    tracker = InRunShapley(m2, o2, val_loss=mlp_val_loss)
    for half in (slice(0, 4), slice(4, 8)):
        with tracker.step(list(range(8))[half]):
            (mlp_loss(m2, (batch[0][half], batch[1][half])) / 2).backward()
    o2.step()
    values = tracker.values()
    np.testing.assert_allclose([values[i] for i in range(8)], whole, rtol=1e-9, atol=1e-15)


def test_first_step_carry_and_unattributed_parts_are_answered_or_refused() -> None:
    """What the drop rows, carry and the gradient map ask of a rule: the first step (no momentum /
    no second moment yet: the step ignores the gradient's size) is named nonlinear, later steps
    are not; carry through Muon's matrix function is refused at construction (Adafactor has no
    momentum: nothing to carry); a gradient part that is nobody's under a map rule is refused at
    the step, naming the parameter."""
    from inrun.errors import UnsupportedOptimizerError

    for make, bias, words in ((lambda ps: torch.optim.Muon(ps, lr=0.02), False, "Muon's first step"),
                              (lambda ps: torch.optim.Adafactor(ps), True, "Adafactor's first step")):
        model = mlp(bias)
        opt = make(model.parameters())
        batch = mlp_batches(1, 8)[0]
        mlp_loss(model, batch).backward()
        rule = rule_for(opt)
        params, grads = list(model.parameters()), [p.grad for p in model.parameters()]
        assert words in rule.nonlinear_step(params, grads)
        opt.step()
        assert rule.nonlinear_step(params, grads) is None
    assert rule_for(torch.optim.Adafactor(mlp(True).parameters())).momentum(params) is None

    model = mlp(False)
    with pytest.raises(UnsupportedOptimizerError, match="carry='off' with Muon"):
        InRunShapley(model, torch.optim.Muon(model.parameters(), lr=0.02), val_loss=mlp_val_loss, carry="momentum")

    model, opt, batch = warmed(lambda ps: torch.optim.Muon(ps, lr=0.02), False, 2)
    tracker = InRunShapley(model, opt, val_loss=mlp_val_loss)
    with tracker.step(list(range(8))):
        mlp_loss(model, batch).backward()
    with tracker.unattributed():
        sum((p * p).sum() for p in model.parameters()).backward()
    with pytest.raises(UnsupportedOptimizerError, match=r"^0\.weight: .*nobody's part.*muon"):
        opt.step()
