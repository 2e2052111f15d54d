"""Mixed precision (docs/precision.md): bf16 autocast, a bf16 model and fp16 autocast against a
float64 oracle within the documented bound, a consistency check whose tolerance follows each
parameter's precision, and Accelerate's output wrapper (``convert_outputs_to_fp32``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun import ConsistencyError, InRunShapley, exact

VOCAB, SEQ, BATCH, LR = 48, 10, 6, 0.5


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def tokens(n: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


VAL = tokens(3, 99)


def token_losses(logits: Tensor, x: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1),
                           reduction="none").view(x.shape[0], -1)


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


PRECISIONS = {  # name: (parameter dtype, autocast dtype, the epsilon of the bound)
    "bf16 autocast": (torch.float32, torch.bfloat16, torch.finfo(torch.bfloat16).eps),
    "bf16 model": (torch.bfloat16, None, torch.finfo(torch.bfloat16).eps),
    "fp16 autocast": (torch.float32, torch.float16, torch.finfo(torch.float16).eps),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_low_precision_within_the_documented_bound_of_float64(precision: str) -> None:
    """Documented bound: |φ_z − φ*_z| ≤ eps · η‖g_z‖‖g_val‖ (eps of the 16-bit type) and Pearson
    ≥ 0.9999, φ* from float64 per-example gradients at the run's own parameters. Measured
    (benchmarks/precision.py): 0.13-0.22 eps; the check never fires on the unmodified run."""
    param_dtype, amp, eps = PRECISIONS[precision]
    model = gpt2().to(param_dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def val_loss(m: nn.Module) -> Tensor:
        with autocast(amp):
            return token_losses(m(input_ids=VAL).logits, VAL).mean()

    tracker = InRunShapley(model, opt, val_loss=val_loss)
    got, truth, scale = [], [], []
    for t in range(2):
        x = tokens(BATCH, t)
        ref = copy.deepcopy(model).double()
        pe = exact.per_example_gradients(
            ref, lambda f, xr: token_losses(f(input_ids=xr).logits, xr).sum() / (BATCH * (SEQ - 1)), (x,))
        g_val = exact.validation_gradient(ref, lambda m: token_losses(m(input_ids=VAL).logits, VAL).mean())
        truth.append(exact.first_order_values(pe, g_val, LR).numpy())
        scale.append((LR * exact.dot_scale(pe, g_val)).numpy())
        ids = list(range(t * BATCH, (t + 1) * BATCH))
        with tracker.step(ids):
            with autocast(amp):
                logits = model(input_ids=x).logits
            token_losses(logits, x).mean().backward()
        opt.step()
        opt.zero_grad()
        values = tracker.values()
        got.append(np.array([values[i] for i in ids]))
    tracker.close()
    got, truth, scale = np.concatenate(got), np.concatenate(truth), np.concatenate(scale)
    worst = float(np.max(np.abs(got - truth) / scale))
    assert worst <= eps, f"{precision}: max error {worst / eps:.2f} eps of η‖g_z‖‖g_val‖"
    assert worst > 1e-4 * eps, "the run was not in low precision"
    assert np.corrcoef(got, truth)[0, 1] >= 0.9999
    print(f"{precision}: max error {worst / eps:.2f} eps of η‖g_z‖‖g_val‖")


def nudged_step(amp: torch.dtype | None, name: str, size: float) -> None:
    """One tracked step whose gradient of ``name`` gets ``size · ‖g‖ · ĝ_val`` added after
    backward: a change along the validation gradient, worth ``size`` of the check's scale."""
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def val_loss(m: nn.Module) -> Tensor:
        with autocast(amp):
            return token_losses(m(input_ids=VAL).logits, VAL).mean()

    direction = exact.validation_gradient(model, val_loss)[name]
    param = dict(model.named_parameters())[name]
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    x = tokens(BATCH, 0)
    with tracker.step(range(BATCH)):
        with autocast(amp):
            logits = model(input_ids=x).logits
        token_losses(logits, x).mean().backward()
        with torch.no_grad():
            param.grad.add_(size * param.grad.norm() * direction / direction.norm())
    try:
        opt.step()
    finally:
        tracker.close()


def test_check_tolerance_follows_each_parameters_precision() -> None:
    """Under bf16 autocast the position embedding's gradient never passes through bf16 (autocast
    leaves embeddings and their output gradients in float32), so it keeps float32's tolerance
    (1e-3): a mismatch of 1e-2 of its scale is caught, where a tolerance widened for the whole
    step (5e-2) hid it. A layer whose output gradient came in bf16 gets 4 eps = 3.1e-2 (measured
    drift ≤ 1.9e-3): 0.1 is caught. Unmodified runs pass in every precision (the bound's test)."""
    with pytest.raises(ConsistencyError, match="wpe.weight"):
        nudged_step(torch.bfloat16, "transformer.wpe.weight", 1e-2)
    with pytest.raises(ConsistencyError, match=r"h\.0\.mlp\.c_fc\.weight"):
        nudged_step(torch.bfloat16, "transformer.h.0.mlp.c_fc.weight", 0.1)


def test_accelerate_bf16_output_wrapper_values_every_example() -> None:
    """``Accelerator(mixed_precision="bf16")`` returns ``logits.float()`` copies while the model's
    own loss reads the bf16 logits: the gradient the model's outputs got is taken from the tensor
    the copy was cast from. Values equal the fp32 loop within the bound of the Trainer test."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    results = []
    for mixed in ("no", "bf16"):
        # a Trainer run earlier in the process can leave sync_gradients off, which skips opt.step()
        GradientState._reset_state()
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=mixed, cpu=True)
        model = gpt2()
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=VAL, labels=VAL).loss)
        for t in range(2):
            x = tokens(BATCH, t)
            with tracker.step(range(t * BATCH, (t + 1) * BATCH)):
                accelerator.backward(model(input_ids=x, labels=x).loss)
            opt.step()
            opt.zero_grad()
        values = tracker.values()
        tracker.close()
        assert sorted(values) == list(range(2 * BATCH)) and set(values.counts) == {1}
        results.append(np.array([values[i] for i in range(2 * BATCH)]))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    fp32, bf16 = results
    eps = torch.finfo(torch.bfloat16).eps
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) <= 2 * eps
    assert np.corrcoef(bf16, fp32)[0, 1] >= 0.9995
