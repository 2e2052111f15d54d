"""Tracker behavior: training untouched, efficiency, per-group learning rates, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import microbatch_values
from test_oracle import gpt2, mlp
from torch import nn

from inrun import (
    BatchMismatchError,
    ConsistencyError,
    InRunShapley,
    NonFiniteError,
    StepOrderError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
    ValidationLossError,
    exact,
)


def lm_batches(n: int, batch: int = 4, seq: int = 8, vocab: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def gpt2_with_dropout() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)  # dropout 0.1 everywhere: the validation pass must not eat RNG


def train(
    model: nn.Module, batches: list[torch.Tensor], tracked: bool, lr: float = 0.1, adamw: bool = False, **options
) -> InRunShapley | None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr / 100) if adamw else torch.optim.SGD(model.parameters(), lr=lr)
    val = lm_batches(1, batch=2, seed=99)[0]
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss, **options) if tracked else None
    model.train()
    torch.manual_seed(123)
    for step, x in enumerate(batches):
        ids = list(range(step * len(x), (step + 1) * len(x)))
        if tracker is not None:
            with tracker.step(ids):
                model(input_ids=x, labels=x).loss.backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return tracker


@pytest.mark.parametrize("adamw", [False, True], ids=["sgd", "adamw"])
def test_parameters_bit_identical_with_and_without_tracker(adamw: bool) -> None:
    """Also with AdamW, whose validation pass runs at θ + f(0) and puts the parameters back."""
    torch.manual_seed(0)
    base = gpt2_with_dropout()
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    batches = lm_batches(5)
    train(plain, batches, tracked=False, adamw=adamw)
    tracker = train(tracked, batches, tracked=True, adamw=adamw)
    assert tracker is not None and len(tracker.values()) == 20
    for (name, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after training with the tracker"
    tracker.close()
    assert all(not m._forward_hooks for m in tracked.modules()), "close() must remove every hook"


def test_bookkeeping_update_equals_autograd_within_rounding() -> None:
    """The book-keeping route sums the weight gradient in another order: equal within float32
    rounding (not bit for bit), and a deep copy of the tracked model trains like the original."""
    torch.manual_seed(0)
    base = gpt2_with_dropout()
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    batches = lm_batches(5)
    train(plain, batches, tracked=False)
    tracker = train(tracked, batches, tracked=True, bookkeeping="always")
    assert "bookkeeping" in tracker.coverage().routes
    for (name, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs beyond float32 rounding")
    twin = copy.deepcopy(tracked)  # carries the bound forward override: must run as an untracked model
    x = batches[0]
    twin(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in twin.parameters())
    assert all(p.grad is None for p in tracked.parameters())
    tracker.close()
    assert "forward" not in vars(tracked.lm_head), "close() must remove the forward override"


def test_batch_values_sum_to_plain_autograd() -> None:
    """Σ_z φ_z = η g_val·g_B, with g_B and g_val from ordinary autograd on a separate copy."""
    torch.manual_seed(0)
    model = gpt2().double()
    ref = copy.deepcopy(model)
    x, val = lm_batches(1)[0], lm_batches(1, batch=2, seed=5)[0]
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss)
    with tracker.step(range(4)):
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    values = tracker.values()

    ref.eval()
    g_val = torch.autograd.grad(ref(input_ids=val, labels=val).loss, list(ref.parameters()))
    ref.train()
    g_b = torch.autograd.grad(ref(input_ids=x, labels=x).loss, list(ref.parameters()))
    expected = lr * sum((a * b).sum() for a, b in zip(g_val, g_b)).item()
    total = sum(values[i] for i in range(4))
    assert total == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_per_group_learning_rates_and_scheduler() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.5},
        {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.05},
    ]
    opt = torch.optim.SGD(groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    val_loss = lambda m: F.cross_entropy(m(xv), yv)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    expected = np.zeros(6)
    for _ in range(3):
        lrs = {f"{i}.{n}": (g["lr"]) for g, mods in zip(opt.param_groups, [[0], [2, 4]]) for i in mods for n in ("weight", "bias")}
        pe = exact.per_example_gradients(model, lambda f, xr, yr: F.cross_entropy(f(xr), yr, reduction="sum") / 6, (x, y))
        expected += exact.first_order_values(pe, exact.validation_gradient(model, val_loss), lrs).numpy()
        with tracker.step(range(6)):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    got = tracker.values()
    np.testing.assert_allclose([got[i] for i in range(6)], expected, rtol=1e-10, atol=1e-15)
    assert got.count(0) == 3


def test_clipping_scales_the_step() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    val_loss = lambda m: F.cross_entropy(m(xv), yv)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    pe = exact.per_example_gradients(model, lambda f, xr, yr: F.cross_entropy(f(xr), yr, reduction="sum") / 6, (x, y))
    unclipped = exact.first_order_values(pe, exact.validation_gradient(model, val_loss), 0.2).numpy()
    with tracker.step(range(6)):
        F.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item()
    opt.step()
    got = tracker.values()
    factor = 0.01 / (norm + 1e-6)
    assert factor < 0.5
    np.testing.assert_allclose([got[i] for i in range(6)], unclipped * factor, rtol=1e-9)


def test_per_validation_table() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(5, 10, dtype=torch.float64), torch.randint(0, 3, (5,))
    xv, yv = torch.randn(3, 10, dtype=torch.float64), torch.randint(0, 3, (3,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv, reduction="none"))
    pe = exact.per_example_gradients(model, lambda f, xr, yr: F.cross_entropy(f(xr), yr, reduction="sum") / 5, (x, y))
    expected = np.stack([
        exact.first_order_values(pe, exact.validation_gradient(model, lambda m, v=v: F.cross_entropy(m(xv[v:v + 1]), yv[v:v + 1])), 0.1).numpy()
        for v in range(3)
    ], axis=1)
    with tracker.step(range(5)):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    ids, table = tracker.per_validation()
    assert ids == list(range(5)) and table.shape == (5, 3)
    np.testing.assert_allclose(table, expected, rtol=1e-10, atol=1e-16)
    values = tracker.values()
    np.testing.assert_allclose([values[i] for i in range(5)], table.sum(1), rtol=1e-12)


class _StackWithoutVmap(torch.autograd.Function):
    """torch.stack whose backward skips the columns with zero gradient: a data-dependent test
    that cannot be vmapped, so the tracker takes its one-column-at-a-time path."""

    @staticmethod
    def forward(ctx, *losses):
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad):
        return tuple(g if bool(g.ne(0).any()) else None for g in grad.unbind(0))


class _TwoBranches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, use: str = "ab") -> torch.Tensor:
        return sum(getattr(self, name)(x) for name in use)


def test_per_validation_columns_reaching_different_parameters() -> None:
    """Column 0 reaches only `a`, column 1 both, column 2 only `b`: each column keeps its own parts."""
    torch.manual_seed(0)
    model = _TwoBranches().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    xv, yv = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    uses = ("a", "ab", "b")

    def column_loss(m, v):
        return ((m(xv[v:v + 1], uses[v]) - yv[v:v + 1]) ** 2).sum()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(
        model, opt, val_loss=lambda m: _StackWithoutVmap.apply(*(column_loss(m, v) for v in range(3)))
    )
    pe = exact.per_example_gradients(model, lambda f, xr, yr: ((f(xr) - yr) ** 2).sum() / 5, (x, y))
    expected = np.stack([
        exact.first_order_values(pe, exact.validation_gradient(model, lambda m, v=v: column_loss(m, v)), 0.1).numpy()
        for v in range(3)
    ], axis=1)
    with tracker.step(range(5)):
        (((model(x) - y) ** 2).sum() / 5).backward()
    opt.step()
    _, table = tracker.per_validation()
    assert np.abs(expected).min() > 1e-6
    np.testing.assert_allclose(table, expected, rtol=1e-10, atol=1e-16)


def test_gradient_accumulation_over_microbatches() -> None:
    """k micro-batches inside one optimizer step give the same values as one batch."""
    torch.manual_seed(0)
    base = mlp().double()
    x, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 3, (8,))
    xv, yv = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    results = []
    for chunks in (1, 4):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        results.append(microbatch_values(model, opt, lambda m: F.cross_entropy(m(xv), yv), x, y, chunks))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv, yv = torch.randn(4, 10), torch.randint(0, 3, (4,))
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))
    return model, opt, tracker, x, y


def test_ids_length_must_match_batch(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(BatchMismatchError, match="6"), tracker.step(range(5)):
        F.cross_entropy(model(x), y).backward()


def test_one_id_for_a_batch_is_an_error(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(BatchMismatchError), tracker.step([0]):
        F.cross_entropy(model(x), y).backward()


def test_more_ids_than_rows_is_an_error(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(BatchMismatchError), tracker.step(range(3)):
        F.cross_entropy(model(x[:1]), y[:1]).backward()


@pytest.mark.parametrize("bad", [[[1], [2]], [1.5, 2.5], [object(), object()]])
def test_ids_must_be_int_or_str(setup, bad) -> None:
    _, _, tracker, _, _ = setup
    with pytest.raises(TypeError, match="int or str"), tracker.step(bad):
        pass


@pytest.mark.parametrize(
    ("val_loss", "message"),
    [
        (lambda m: m(torch.randn(4, 10)), "shape"),
        (lambda m: m(torch.randn(4, 10)).sum() * float("nan"), "not finite"),
        (lambda m: torch.tensor(1.0), "without a gradient"),
        (lambda m: None, "must return a tensor"),
        (lambda m: m(torch.randn(4, 10)).sum().detach(), "without a gradient"),
    ],
)
def test_bad_validation_loss(val_loss, message) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    with pytest.raises(ValidationLossError, match=message), tracker.step(range(2)):
        pass


def test_unsupported_optimizer_names_what_is_supported() -> None:
    model = mlp()
    with pytest.raises(UnsupportedOptimizerError, match="Supported: .*SGD"):
        InRunShapley(model, torch.optim.Adagrad(model.parameters()), val_loss=lambda m: m(torch.randn(1, 10)).sum())


def test_nested_step_is_an_error(setup) -> None:
    _, _, tracker, _, _ = setup
    with pytest.raises(StepOrderError, match="nested"), tracker.step([0]), tracker.step([1]):
        pass


def test_second_backward_in_one_step_is_an_error(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(StepOrderError, match="second backward"), tracker.step(range(6)):
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()


def test_backward_outside_step_is_an_error(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(StepOrderError, match="inside the `with tracker.step"), tracker.step(range(6)):
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(StepOrderError, match="after its `with tracker.step"):
        loss.backward()


def test_optimizer_step_without_tracker_step(setup) -> None:
    model, opt, tracker, x, y = setup
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(StepOrderError, match="no `with tracker.step"):
        opt.step()


def test_gradients_must_start_at_zero(setup) -> None:
    model, opt, tracker, x, y = setup
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(StepOrderError, match="zero_grad"), tracker.step(range(6)):
        pass


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    tracker = InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           val_loss=lambda m: m(torch.randn(3, 4)).sum())
    with pytest.raises(UnsupportedModuleError, match="GroupNorm"), tracker.step(range(3)):
        pass
    model[1].eval()
    with tracker.step(range(3)):
        model(torch.randn(3, 4)).sum().backward()


def test_nan_gradient_raises_before_the_update(setup) -> None:
    model, opt, tracker, x, y = setup
    before = [p.detach().clone() for p in model.parameters()]
    x = x.clone()
    x[0, 0] = float("nan")
    with tracker.step(range(6)):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(NonFiniteError, match="on_nonfinite='skip'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(tracker.values()) == 0


def test_nan_gradient_skip_is_recorded() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv, yv = torch.randn(4, 10), torch.randint(0, 3, (4,))
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv), on_nonfinite="skip")
    x = torch.randn(6, 10)
    x[0, 0] = float("inf")
    with tracker.step(range(6)):
        F.cross_entropy(model(x) * 0 + model(x), torch.zeros(6, dtype=torch.long)).backward()
    opt.zero_grad()  # a GradScaler-style skip: gradients dropped without a step
    with tracker.step(range(6, 12)):
        F.cross_entropy(model(torch.randn(6, 10)), torch.zeros(6, dtype=torch.long)).backward()
    opt.step()
    assert tracker.ledger.skipped and tracker.ledger.skipped[0]["step"] == 0
    assert set(tracker.values()) == set(range(6, 12))


class Leaky(nn.Module):
    """A weight read outside the forward of the module that owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(1)
        return self.out(h) + h @ self.emb.weight[:3].T  # weight read outside Embedding.forward


def test_parameter_used_outside_its_module_is_valued_where_it_is_used() -> None:
    """The row verification sees the missing use and values the weight at the enclosing module."""
    from helpers import Case, compare_with_oracle

    val_ids = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(3))
    case = Case(
        "leaky", Leaky, lambda g: (torch.randint(0, 10, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        lambda f, ids, y, batch_size: F.cross_entropy(f(ids), y, reduction="sum") / batch_size,
        lambda m: m(val_ids).logsumexp(-1).mean(),
    )
    compare_with_oracle(case, torch.float64)
    torch.manual_seed(0)
    model = Leaky()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=case.val_loss)
    with tracker.step(range(4)):
        F.cross_entropy(model(torch.randint(0, 10, (4, 3))), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    assert tracker.coverage().routes["fallback"] == ["emb.weight"]


def test_gradient_changed_after_backward_is_caught() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv, yv = torch.randn(4, 10), torch.randint(0, 3, (4,))
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))
    with tracker.step(range(6)):
        F.cross_entropy(model(torch.randn(6, 10)), torch.randint(0, 3, (6,))).backward()
        with torch.no_grad():
            model[2].weight.grad.add_(torch.randn_like(model[2].weight))  # not the examples' gradient
    with pytest.raises(ConsistencyError, match="2.weight"):
        opt.step()


def test_exception_inside_step_skips_the_window(setup) -> None:
    model, opt, tracker, x, y = setup
    with pytest.raises(KeyError), tracker.step(range(6)):
        F.cross_entropy(model(x), y).backward()
        raise KeyError("user bug")
    opt.step()
    opt.zero_grad()
    assert tracker.ledger.skipped[0]["reason"].startswith("KeyError")
    assert len(tracker.values()) == 0


def test_skip_step_records_the_reason_and_consumes_the_step(setup) -> None:
    model, opt, tracker, x, y = setup
    with tracker.step(range(6)):
        F.cross_entropy(model(x), y).backward()
    tracker.skip_step("loss spike")
    opt.zero_grad()
    with tracker.step(range(6, 12)):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert tracker.ledger.skipped == [{"step": 0, "reason": "loss spike"}]
    assert set(tracker.values()) == set(range(6, 12))
    assert tracker.step_count == 2


def test_the_trace_keeps_every_parameter_groups_learning_rate(tmp_path) -> None:
    from inrun import ValueLedger

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2:].parameters(), "lr": 0.03}])
    xv, yv = torch.randn(4, 10), torch.randint(0, 3, (4,))
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv), keep_trace=True)
    for step in range(2):
        with tracker.step(range(step * 3, step * 3 + 3)):
            F.cross_entropy(model(torch.randn(3, 10)), torch.randint(0, 3, (3,))).backward()
        opt.step()
        opt.zero_grad()
        opt.param_groups[1]["lr"] = 0.01
    assert tracker.ledger.group_lrs == {0: [0.1, 0.03], 1: [0.1, 0.01]}
    assert set(tracker.ledger.trace()["lr"]) == {0.1}
    tracker.ledger.save(tmp_path)
    assert ValueLedger.load(tmp_path).group_lrs == {0: [0.1, 0.03], 1: [0.1, 0.01]}
