"""What Adam's and order 2's deferred contractions keep over an accumulation window: norms keep their
per-example gradients (not their input and output gradient), and under autocast a linear layer's
input is kept at the autocast dtype it was multiplied in; the values stay the oracle's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import InRunShapley
from inrun.layers.registry import PerExampleGradients
from inrun.optim import rule_for

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).double()


def test_norms_keep_per_example_gradients_and_values_stay_exact() -> None:
    """AdamW over two micro-batches: the norm layers' kept captures are their per-example gradients;
    the values equal η-free Adam-aware values from per-example gradients by plain autograd."""
    model = tiny_gpt2()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    val = torch.randint(0, 20, (1, 6), generator=torch.Generator().manual_seed(1))
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss)
    gen = torch.Generator().manual_seed(2)
    rule = rule_for(opt)
    for step in range(2):
        batch = torch.randint(0, 20, (4, 6), generator=gen)
        shift = rule.data_free_step(params) or [torch.zeros_like(p) for p in params]
        here, moved = tiny_gpt2(), tiny_gpt2()  # at θ (the examples' gradients) and θ + f(0) (g_val's)
        with torch.no_grad():
            for p, a, b, s in zip(params, here.parameters(), moved.parameters(), shift):
                a.copy_(p)
                b.copy_(p + s)
        g_val = torch.autograd.grad(moved(input_ids=val, labels=val).loss, list(moved.parameters()))
        per_example = []
        for z in range(4):
            logits = here(input_ids=batch[z : z + 1]).logits
            share = F.cross_entropy(logits[0, :-1], batch[z, 1:], reduction="sum") / (2 * 2 * 5)
            per_example.append(torch.autograd.grad(share, list(here.parameters())))
        for k in range(2):
            with tracker.step([4 * step + 2 * k, 4 * step + 2 * k + 1]):
                (model(input_ids=batch[2 * k : 2 * k + 2], labels=batch[2 * k : 2 * k + 2]).loss / 2).backward()
        kept = [c for mb in tracker._engine.window.micro for c in mb.captures if "ln_" in c.entry.name]
        assert kept and all(isinstance(c.grad, PerExampleGradients) and c.saved is None for c in kept)
        slopes = rule.slopes(params, [p.grad for p in params])
        expected = [-sum(float((g * s * v).sum()) for g, s, v in zip(ge, slopes, g_val)) for ge in per_example]
        scale = [sum(float((g * g).sum()) for g in ge) ** 0.5 * sum(float(((s * v) ** 2).sum()) for s, v in zip(slopes, g_val)) ** 0.5
                 for ge in per_example]
        opt.step()
        opt.zero_grad()
        got = tracker.values()
        for z in range(4):
            assert abs(got[4 * step + z] - expected[z]) <= 1e-8 * scale[z]
    tracker.close()


def test_autocast_keeps_linear_inputs_at_the_autocast_dtype() -> None:
    """Under CPU autocast (bfloat16) the kept inputs of linear layers are bfloat16 (what their
    weight gradients were made of: half the bytes), norms' per-example gradients float32; the
    values stay within bfloat16 rounding of per-example gradients taken under autocast alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    xv, yv = torch.randn(3, 12), torch.tensor([0, 1, 2])

    def val_loss(m: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(m(xv).float(), yv)

    # bf16's check tolerance: the row verification otherwise judges bf16 products by the float32
    # parameters' tolerance and values the whole model at the root (by the fallback)
    tracker = InRunShapley(model, opt, val_loss=val_loss, check_rtol=5e-2)
    x, y = torch.randn(6, 12, generator=torch.Generator().manual_seed(3)), torch.randint(0, 3, (6,))
    g_val = torch.autograd.grad(val_loss(model), params)
    per_example = []
    for z in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            share = F.cross_entropy(model(x[z : z + 1]).float(), y[z : z + 1], reduction="sum") / 6
        per_example.append(torch.autograd.grad(share, params))
    for k in range(2):
        with tracker.step(list(range(3 * k, 3 * k + 3))), torch.autocast("cpu", dtype=torch.bfloat16):
            (F.cross_entropy(model(x[3 * k : 3 * k + 3]).float(), y[3 * k : 3 * k + 3]) / 2).backward()
    captures = [c for mb in tracker._engine.window.micro for c in mb.captures]
    assert {c.saved.dtype for c in captures if c.entry.handler.name == "linear"} == {torch.bfloat16}
    assert all(g.dtype == torch.float32 for c in captures if isinstance(c.grad, PerExampleGradients) for g in c.grad.values())
    slopes = rule_for(opt).slopes(params, [p.grad for p in params])
    opt.step()
    got = tracker.values()
    for z in range(6):
        u = [s * v for s, v in zip(slopes, g_val)]
        expected = -sum(float((g * w).sum()) for g, w in zip(per_example[z], u))
        scale = sum(float((g * g).sum()) for g in per_example[z]) ** 0.5 * sum(float((w * w).sum()) for w in u) ** 0.5
        assert abs(got[z] - expected) <= 2e-2 * scale
    tracker.close()


def held_bytes(root: object, exclude: set[int]) -> int:
    """Bytes of the tensor storages reachable from ``root``'s attributes, except ``exclude``."""
    seen_objects, seen_storages, total = set(), set(), 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, (nn.Module, torch.optim.Optimizer, type)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude and storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.extend(vars(obj).values())
    return total


@pytest.mark.parametrize("order", [1, 2])
def test_between_steps_an_adam_tracker_holds_two_gradients(order: int) -> None:
    """Between two AdamW steps (order 1), the tracker holds the validation gradient and the gradient
    map's reference, plus a few per-parameter scalars: no settled window's multipliers (three
    gradients' worth were held by the drop rows and the id check on GPT-2) and no validation Gram
    factors, which an elementwise rule never reads. With the trapezoid the pending step (its factors
    and Adam's slope, which wait for g_val(θ_t+1)) is held too, and nothing else."""
    model = tiny_gpt2()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    val = torch.randint(0, 20, (1, 6), generator=torch.Generator().manual_seed(1))
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss, order=order)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        batch = torch.randint(0, 20, (4, 6), generator=gen)
        for k in range(2):
            with tracker.step([4 * step + 2 * k, 4 * step + 2 * k + 1]):
                (model(input_ids=batch[2 * k : 2 * k + 2], labels=batch[2 * k : 2 * k + 2]).loss / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    engine = tracker._engine
    assert engine.validation.current.gram == {}
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {v.untyped_storage().data_ptr() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
    gradient = sum(p.numel() * p.element_size() for p in params)
    pending = 0
    if order == 2:
        pending = held_bytes(engine.pending, exclude)
        assert pending > held_bytes(engine.pending.micro, exclude) > 0
    assert 2 * gradient <= held_bytes(engine, exclude) - pending <= 2 * gradient + 4096
    tracker.close()
