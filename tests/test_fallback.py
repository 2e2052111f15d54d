"""The fallback's directional derivatives where torch has no forward-mode formula, and what its
replays leave out or restore: each against an independent computation in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.utils import parametrizations
from zoo_patterns import Cube, TanhLinear

from inrun import InRunShapley, UnsupportedModuleError
from inrun.layers import handler_for
from inrun.layers.fallback import FALLBACK, inline_checkpoints, jvp_by_double_backward


def along(module: nn.Module, x: Tensor) -> tuple:
    """``f(params)`` of a module's call on ``x``, its parameters, and a random direction."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    tangent = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        out = functional_call(module, p, (x,))
        return out if isinstance(out, tuple) else (out,)

    return f, params, tangent


def test_the_derivative_of_a_vjp_is_the_jvp() -> None:
    """``d/du [(Jᵀu)·v] = J v``, against forward mode, for a module with several outputs."""
    torch.manual_seed(0)
    module = nn.GRU(4, 5, batch_first=True).double()
    f, params, tangent = along(module, torch.randn(3, 6, 4, dtype=torch.float64))
    expected = jvp(f, (params,), (tangent,))[1]
    got = jvp_by_double_backward(f, params, tangent)
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-14)


def test_weight_norm_has_no_forward_mode_and_is_differentiated_by_double_backward() -> None:
    """Against forward mode of the same function written with ordinary ops (``g v / ‖v‖``)."""
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv1d(3, 4, 2)).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    f, params, tangent = along(conv, x)
    with pytest.raises(RuntimeError, match="forward AD"):
        jvp(f, (params,), (tangent,))
    got = FALLBACK.directional_derivative(conv, f, params, tangent)[0]

    def by_hand(p: dict[str, Tensor]) -> Tensor:
        g, v = p["parametrizations.weight.original0"], p["parametrizations.weight.original1"]
        return F.conv1d(x, g * v / v.norm(dim=(1, 2), keepdim=True), p["bias"])

    expected = jvp(by_hand, (params,), (tangent,))[1]
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_custom_functions_without_jvp_are_differentiated_by_double_backward() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    u = torch.randn(4, 4, dtype=torch.float64)

    def f(p: dict[str, Tensor]) -> tuple[Tensor]:
        return (TanhLinear.apply(x, p["w"]) + Cube.apply(x @ p["w"]),)

    def by_hand(p: dict[str, Tensor]) -> Tensor:
        return torch.tanh(x @ p["w"].T) + (x @ p["w"]) ** 3

    module = nn.Identity()
    got = FALLBACK.directional_derivative(module, f, {"w": w}, {"w": u})[0]
    assert torch.allclose(got, jvp(by_hand, ({"w": w},), ({"w": u},))[1], rtol=1e-12, atol=1e-14)


class OnceDifferentiable(torch.autograd.Function):
    """A backward autograd cannot differentiate: neither route can take the derivative."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return OnceDifferentiable.apply(x @ self.w)


def test_a_module_neither_route_can_differentiate_is_refused_in_one_line() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Opaque(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(x), y))
    with pytest.raises(UnsupportedModuleError) as refusal, tracker.step([0, 1, 2, 3]):
        F.cross_entropy(model(x), y).backward()
    message = str(refusal.value)
    assert "\n" not in message and "Opaque" in message and "double backward" in message
    assert "register_handler" in message


def test_a_legacy_weight_norm_module_is_not_the_registered_class_math() -> None:
    """Its ``weight`` is computed by a forward pre-hook from ``weight_g``/``weight_v``: the conv
    handler does not know those parameters, so the module takes the fallback."""
    assert handler_for(nn.Conv1d(3, 4, 2)).name == "conv"
    assert handler_for(nn.utils.weight_norm(nn.Conv1d(3, 4, 2))) is None
    assert handler_for(parametrizations.weight_norm(nn.Linear(3, 4))).name == "linear"  # only its bias


def test_a_reentrant_checkpoint_runs_inline_only_while_replaying() -> None:
    import torch.utils.checkpoint as checkpointing

    original = checkpointing.CheckpointFunction
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError), inline_checkpoints():
        assert checkpointing.CheckpointFunction is not original
        y = checkpointing.checkpoint(torch.sin, x, use_reentrant=True)
        assert torch.equal(y, torch.sin(x)) and y.grad_fn.name() == "SinBackward0"  # an ordinary graph
        raise ValueError
    assert checkpointing.CheckpointFunction is original


def test_a_model_given_a_prefilled_cache_is_refused_in_one_line() -> None:
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 20, (2, 4))
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=x, labels=x).loss)
    with torch.no_grad():
        cache = model(input_ids=x, past_key_values=DynamicCache(), use_cache=True).past_key_values
    with pytest.raises(UnsupportedModuleError) as refusal, tracker.step([0, 1]):
        model(input_ids=x, past_key_values=cache, labels=x).loss.backward()
    message = str(refusal.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message and "use_cache=False" in message


def test_each_validation_column_replays_spectral_norm_from_the_calls_buffers() -> None:
    """With a per-validation table the fallback takes one JVP per column; each must start from the
    power-iteration vectors the call started from, so the columns add up to the scalar run's
    values (which the zoo checks against the oracle)."""
    import copy

    from zoo_patterns import NormedTCN

    torch.manual_seed(0)
    base = NormedTCN("spectral_norm").double()
    x = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1])
    vx = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    vy = torch.tensor([1, 0])
    values = []
    for per_example in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reduction = "none" if per_example else "sum"
        tracker = InRunShapley(model, opt, val_loss=lambda m, r=reduction: F.cross_entropy(m(vx), vy, reduction=r))
        with tracker.step([0, 1, 2]):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        if per_example:
            ids, table = tracker.per_validation()
            values.append(dict(zip(ids, table.sum(axis=1))))
        else:
            values.append(dict(tracker.values().items()))
        tracker.close()
    for i in range(3):
        assert abs(values[0][i] - values[1][i]) <= 1e-12 * max(abs(values[0][i]), 1e-12)
