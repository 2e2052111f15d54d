"""Optimizers: values of the update the optimizer actually makes, against real optimizer steps.

Oracles: (a) exact Shapley values of the real step's utility, enumerated through a copy of the
real optimizer (``inrun.exact.optimizer_update``); (b) for steps affine in the gradient (SGD with momentum), the
exact first-order values ``−g_val·(Δθ({z}) − Δθ(∅))`` from the real optimizer; (c) efficiency
of the linearized game: ``Σ_z φ_z = −g_val·(Δθ(B) − Δθ(∅))`` with the real step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import microbatch_values
from test_oracle import gpt2
from torch import nn

from inrun import InRunShapley, UnsupportedOptimizerError, exact


def tabular() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    X, Y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return torch.tensor(X), torch.tensor(Y)


X, Y = tabular()
VAL = (X[:64], Y[:64])
POOL = torch.arange(64, len(X))


def mlp_val_loss(m: nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(VAL[0].to(next(m.parameters()).dtype)), VAL[1])


def mlp_example_loss(f: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return F.cross_entropy(f(x), y, reduction="sum") / batch_size


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def mlp_batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = POOL[torch.randint(0, len(POOL), (batch,), generator=g)]
        out.append((X[idx], Y[idx]))
    return out


def warm_up(model: nn.Module, opt: torch.optim.Optimizer, batches: list, loss: Callable) -> None:
    for b in batches:
        loss(model, b).backward()
        opt.step()
        opt.zero_grad()


def mlp_loss(model: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def copy_optimizer(opt: torch.optim.Optimizer, model: nn.Module, new_model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer (groups, hyper-parameters, a deep copy of its state) over ``new_model``."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    live = list(new_model.parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [live[index[id(p)]] for p in g["params"]]}
        for g in opt.param_groups
    ]
    new = type(opt)(groups)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors: copy first
    return new


def tracked_step(model, opt, batch, loss, val_loss, clip=None, **options) -> np.ndarray:
    """Values of one step taken on copies of ``model`` and ``opt`` (originals untouched)."""
    new_model = copy.deepcopy(model)
    new_opt = copy_optimizer(opt, model, new_model)
    tracker = InRunShapley(new_model, new_opt, val_loss=val_loss, **options)
    B = batch[0].shape[0]
    with tracker.step(range(B)):
        loss(new_model, batch).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(new_model.parameters(), clip)
    new_opt.step()
    v = tracker.values()
    tracker.close()
    return np.array([v[i] for i in range(B)])


def per_example(model: nn.Module, example_loss: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    B = batch[0].shape[0]
    return exact.per_example_gradients(model, lambda f, *rows: example_loss(f, *rows, batch_size=B), batch)


def true_values(model, opt, example_loss, batch, val_loss) -> np.ndarray:
    """Exact Shapley values of the real optimizer step (2^B validation losses)."""
    B = batch[0].shape[0]
    result = exact.exact_step_values(
        model, lambda f, *rows: example_loss(f, *rows, batch_size=B), batch, val_loss,
        update=exact.optimizer_update(model, opt), chunk_size=None,
    )
    assert result.method == "enumeration"
    return result.values.numpy()


def rel_rmse(est: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((est - truth) ** 2)) / np.mean(np.abs(truth)))


# ----------------------------------------------------------------------------- Adam vs exact Shapley
def gpt2_setup():
    torch.manual_seed(0)
    model = gpt2(n_layer=1, vocab=30, dim=16).double()
    g = torch.Generator().manual_seed(3)
    val = torch.randint(0, 30, (2, 6), generator=g)

    def val_loss(m):
        return m(input_ids=val, labels=val).loss

    def loss(m, b):
        return m(input_ids=b[0], labels=b[0]).loss

    def example_loss(f, ids, batch_size):
        logits = f(input_ids=ids).logits
        return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / (batch_size * (ids.shape[1] - 1))

    batches = [(torch.randint(0, 30, (8, 6), generator=g),) for _ in range(WARM["gpt2"] + 1)]
    return model, loss, example_loss, val_loss, batches


def mlp_setup():
    return make_mlp(), mlp_loss, mlp_example_loss, mlp_val_loss, mlp_batches(WARM["mlp"] + 1, 8)


# Real training steps before the valued step. This GPT-2 (width 16, random tokens) after only 5
# steps is in a harder state than the code-trained one of docs/optimizers.md (0.03 there): the
# secant values correlate (Pearson ≥ 0.99) but their relative RMSE is 0.13, and at lr 1e-2 order
# 2 does not improve on order 1 yet (0.067 vs 0.051): Adam's step is still strongly nonlinear
# in the gradient so early. Both hold from about 20 steps on.
WARM = {"mlp": 5, "gpt2": 20}


@pytest.fixture(scope="module", params=["mlp", "gpt2"])
def adam_case(request):
    model, loss, example_loss, val_loss, batches = (mlp_setup if request.param == "mlp" else gpt2_setup)()
    return request.param, model, loss, example_loss, val_loss, batches


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_secant_matches_exact_shapley_of_the_real_step(adam_case, opt_cls) -> None:
    """lr 1e-3, Adam state after ≥ 5 real steps: Pearson ≥ 0.99, RMSE ≤ 0.1 of mean |value|."""
    name, model, loss, example_loss, val_loss, batches = adam_case
    model = copy.deepcopy(model)
    opt = opt_cls(model.parameters(), lr=1e-3, weight_decay=0.01)
    warm_up(model, opt, batches[:-1], loss)
    batch = batches[-1]
    truth = true_values(model, opt, example_loss, batch, val_loss)
    secant = tracked_step(model, opt, batch, loss, val_loss)
    fixed = tracked_step(model, opt, batch, loss, val_loss, adam="fixed_state")
    proxy = tracked_step(model, opt, batch, loss, val_loss, proxy="sgd")
    assert np.corrcoef(secant, truth)[0, 1] >= 0.99, (name, secant, truth)
    assert rel_rmse(secant, truth) <= 0.1
    # The default is the better linearization, and both beat the paper's SGD proxy.
    assert rel_rmse(secant, truth) < rel_rmse(fixed, truth) < rel_rmse(proxy, truth)


def test_adam_order2_fixes_large_learning_rate(adam_case) -> None:
    """lr 1e-2: the secant values shift (validation curvature over the step); order 2 corrects it."""
    name, model, loss, example_loss, val_loss, batches = adam_case
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    warm_up(model, opt, batches[:-1], loss)
    batch = batches[-1]
    truth = true_values(model, opt, example_loss, batch, val_loss)
    first = tracked_step(model, opt, batch, loss, val_loss)
    second = tracked_step(model, opt, batch, loss, val_loss, order=2)
    assert rel_rmse(second, truth) <= 0.05, (name, rel_rmse(first, truth), rel_rmse(second, truth))
    assert rel_rmse(second, truth) < rel_rmse(first, truth)


# ----------------------------------------------------------------------------- exact identities
def real_step(model: nn.Module, opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The change of every parameter when a copy of ``opt`` steps with the given gradients."""
    m2 = copy.deepcopy(model)
    o2 = copy_optimizer(opt, model, m2)
    ps = list(m2.parameters())
    before = [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    o2.step()
    return [p.detach() - b for p, b in zip(ps, before)]


def linear_values(model, opt, batch, val_loss, factor: float = 1.0) -> tuple[np.ndarray, float]:
    """Per example ``−g_val·(Δθ({z}) − Δθ(∅))`` and ``−g_val·(Δθ(B) − Δθ(∅))`` from real steps,
    with ``g_val`` at ``θ + Δθ(∅)``: where the step lands without data (the linearization point)."""
    pe = per_example(model, mlp_example_loss, batch)
    names = [n for n, _ in model.named_parameters()]
    zero = real_step(model, opt, [torch.zeros_like(pe[n][0]) for n in names])
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, z in zip(shifted.parameters(), zero):
            p.add_(z)
    gv = exact.validation_gradient(shifted, val_loss)

    def gain(step):
        return -sum(float((gv[n] * (s - z)).sum()) for n, s, z in zip(names, step, zero))

    B = batch[0].shape[0]
    single = np.array([gain(real_step(model, opt, [factor * pe[n][i] for n in names])) for i in range(B)])
    total = gain(real_step(model, opt, [factor * pe[n].sum(0) for n in names]))
    return single, total


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.5, maximize=True),
    ],
    ids=["momentum", "dampening+wd", "nesterov", "maximize"],
)
@pytest.mark.parametrize("warm", [0, 3], ids=["first-step", "later-step"])
def test_sgd_momentum_immediate_values_are_exact(options, warm) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **options)
    sign = -1.0 if options.get("maximize") else 1.0
    warm_up(model, opt, mlp_batches(warm, 10, seed=1), lambda m, b: sign * mlp_loss(m, b))
    batch = mlp_batches(1, 10, seed=2)[0]
    expected, _ = linear_values(model, opt, batch, mlp_val_loss)
    got = tracked_step(model, opt, batch, lambda m, b: sign * mlp_loss(m, b), mlp_val_loss)
    # with maximize the optimizer ascends the loss it is given: the example shares flip sign too
    np.testing.assert_allclose(got, sign * expected if options.get("maximize") else expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_adam_secant_efficiency_with_the_real_step(opt_cls, clip) -> None:
    """Σ_z φ_z = −g_val·(Δθ(B) − Δθ(∅)) exactly, clipped or not (clip factor scales the gradient)."""
    model = make_mlp()
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.05)
    warm_up(model, opt, mlp_batches(4, 10), mlp_loss)
    batch = mlp_batches(1, 10, seed=4)[0]
    factor = 1.0
    if clip is not None:
        probe = copy.deepcopy(model)
        mlp_loss(probe, batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(probe.parameters(), clip).item()
        factor = min(1.0, clip / (norm + 1e-6))
        assert factor < 0.5
    _, total = linear_values(model, opt, batch, mlp_val_loss, factor)
    got = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss, clip=clip)
    assert got.sum() == pytest.approx(total, rel=1e-9)


def test_adam_per_group_hyperparameters() -> None:
    model = make_mlp()
    groups = [
        {"params": list(model[0].parameters()), "lr": 3e-3, "betas": (0.8, 0.99)},
        {"params": list(model[2].parameters()), "lr": 1e-3, "weight_decay": 0.1},
    ]
    opt = torch.optim.AdamW(groups)
    warm_up(model, opt, mlp_batches(5, 10), mlp_loss)
    batch = mlp_batches(1, 10, seed=5)[0]
    _, total = linear_values(model, opt, batch, mlp_val_loss)
    got = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss)
    assert got.sum() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "nesterov"],
)
@pytest.mark.parametrize("order", [1, 2])
def test_accumulation_matches_one_batch(make_opt, order) -> None:
    """k micro-batches inside one optimizer step give the values of one batch of the same examples."""
    base = make_mlp()
    warm_opt = make_opt(base.parameters())
    warm_up(base, warm_opt, mlp_batches(3, 8), mlp_loss)
    x, y = mlp_batches(1, 8, seed=9)[0]
    results = []
    for chunks in (1, 4):
        model = copy.deepcopy(base)
        opt = make_opt(model.parameters())
        opt.load_state_dict(copy.deepcopy(warm_opt.state_dict()))
        results.append(microbatch_values(model, opt, mlp_val_loss, x, y, chunks, order=order))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-10)


def test_sgd_proxy_is_the_papers_formula() -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warm_up(model, opt, mlp_batches(3, 10), mlp_loss)
    batch = mlp_batches(1, 10, seed=6)[0]
    pe = per_example(model, mlp_example_loss, batch)
    expected = exact.first_order_values(pe, exact.validation_gradient(model, mlp_val_loss), 3e-3).numpy()
    got = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss, proxy="sgd")
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize("variant", ["hessian", "trapezoid"])
@pytest.mark.parametrize(
    "options", [dict(momentum=0.9, weight_decay=0.01), dict(weight_decay=0.2)], ids=["momentum", "weight-decay"]
)
def test_momentum_order2_beats_order1_against_exact_shapley(variant, options) -> None:
    """Order 2 linearizes around the data-free step f(0) (momentum, weight decay) for both variants."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, **options)
    warm_up(model, opt, mlp_batches(4, 10), mlp_loss)
    batch = mlp_batches(1, 10, seed=7)[0]
    truth = true_values(model, opt, mlp_example_loss, batch, mlp_val_loss)
    first = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss)
    second = tracked_step(model, opt, batch, mlp_loss, mlp_val_loss, order=2, second_order=variant)
    assert rel_rmse(second, truth) < 0.3 * rel_rmse(first, truth), (rel_rmse(first, truth), rel_rmse(second, truth))


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.AdamW(ps, lr=1e-3)],
    ids=["sgd-momentum", "adamw"],
)
def test_bf16_autocast_error_bound(make_opt) -> None:
    """Values under bf16 autocast vs float32, same model and batches.

    Bound (asserted): relative RMSE ≤ 0.02 of mean |value| and Spearman ≥ 0.995 over 4 valued
    steps of a small GPT-2 after 4 warm-up steps (measured: 0.003 SGD, 0.006 AdamW; Spearman
    0.9999). Accumulation is float64 either way; the difference is bf16 rounding of the
    activations and output gradients that autograd itself uses for the update. Adam's very
    first step is left out: its values are degenerate in any precision (see docs/optimizers.md).
    """
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    base = gpt2(n_layer=2, vocab=40, dim=32)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 40, (16, 12), generator=g) for _ in range(8)]
    val = torch.randint(0, 40, (4, 12), generator=g)
    results = []
    for dtype in (None, torch.bfloat16):
        model = copy.deepcopy(base)
        opt = make_opt(model.parameters())

        def autocast(dtype=dtype):
            return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)

        def val_loss(m):
            with autocast():
                return m(input_ids=val, labels=val).loss.float()

        tracker = InRunShapley(model, opt, val_loss=val_loss)
        for step, x in enumerate(xs):
            tracker.enabled = step >= 4
            with tracker.step(range(step * 16, (step + 1) * 16)):
                with autocast():
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
            opt.step()
            opt.zero_grad()
        v = tracker.values()
        assert len(v) == 64
        results.append(np.array([v[i] for i in range(64, 128)]))
    ref, low = results
    assert rel_rmse(low, ref) <= 0.02
    assert spearmanr(low, ref).statistic >= 0.995


def test_switching_tracking_off_and_on_recomputes_the_validation_gradient() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=mlp_val_loss)
    batches = mlp_batches(4, 6)
    for step, b in enumerate(batches):
        tracker.enabled = step != 1
        if step == 3:
            pe = per_example(model, mlp_example_loss, b)
            expected = exact.first_order_values(pe, exact.validation_gradient(model, mlp_val_loss), 0.1).numpy()
        with tracker.step(range(step * 6, (step + 1) * 6)):
            mlp_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    v = tracker.values()
    assert not any(i in v for i in range(6, 12))
    np.testing.assert_allclose([v[i] for i in range(18, 24)], expected, rtol=1e-10)


# ----------------------------------------------------------------------------- errors
def test_unsupported_optimizer_is_named_with_the_alternatives() -> None:
    model = make_mlp()
    with pytest.raises(UnsupportedOptimizerError, match="Adagrad is not supported.*Adam and AdamW.*proxy='sgd'"):
        InRunShapley(model, torch.optim.Adagrad(model.parameters()), val_loss=mlp_val_loss)
    tracker = InRunShapley(model, torch.optim.Adagrad(model.parameters()), val_loss=mlp_val_loss, proxy="sgd")
    tracker.close()


def test_hessian_variant_is_refused_for_adam() -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match="trapezoid"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), val_loss=mlp_val_loss, order=2, second_order="hessian")
