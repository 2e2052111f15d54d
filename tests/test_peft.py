"""PEFT LoRA: values are for the trainable adapter parameters only, and equal the oracle restricted to them.

The LoRA GPT-2 has random ``lora_B`` (``init_lora_weights=False``), so the adapters' gradients are
not trivially zero. The oracle is ``η g_val·g_z`` from ``torch.func`` per-example gradients of the
adapter parameters; the same oracle over *all* parameters (the frozen base unfrozen on a copy)
differs clearly, so a tracker that valued frozen weights would fail.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import InRunShapley, exact

VOCAB, SEQ, BATCH, LR = 40, 8, 4, 0.5
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative to η·‖g_z‖·‖g_val‖
TARGETS = ["c_attn", "c_proj", "c_fc"]


def lora_gpt2(dtype: torch.dtype = torch.float64) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    base = GPT2LMHeadModel(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(base, lora).to(dtype)


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


VAL = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(99))


def val_loss(m: nn.Module) -> torch.Tensor:
    return token_losses(m(input_ids=VAL).logits, VAL).mean()


def example_share(f, xr: torch.Tensor) -> torch.Tensor:
    return token_losses(f(input_ids=xr).logits, xr).sum() / (BATCH * (SEQ - 1))


def adapter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def oracle(model: nn.Module, x: torch.Tensor, all_parameters: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Values ``η g_val·g_z`` and their error scale, on a float64 copy; adapters only unless asked."""
    ref = copy.deepcopy(model).double()
    if all_parameters:
        for p in ref.parameters():
            p.requires_grad_(True)
    pe = exact.per_example_gradients(ref, example_share, (x,))
    g_val = exact.validation_gradient(ref, val_loss)
    return exact.first_order_values(pe, g_val, LR).numpy(), (LR * exact.dot_scale(pe, g_val)).numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_lora_values_equal_the_adapter_oracle(dtype: torch.dtype) -> None:
    model = lora_gpt2(dtype)
    adapters = adapter_names(model)
    assert adapters and all("lora_A" in n or "lora_B" in n for n in adapters)
    assert len(adapters) == 2 * 2 * 4  # A and B; c_attn, attn.c_proj, c_fc, mlp.c_proj; 2 layers
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    gen = torch.Generator().manual_seed(1)
    expected, scale, full = {}, {}, {}
    for step in range(2):
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        ids = list(range(step * BATCH, (step + 1) * BATCH))
        ref, ref_scale = oracle(model, x)
        expected.update(zip(ids, ref))
        scale.update(zip(ids, ref_scale))
        if dtype == torch.float64:
            full.update(zip(ids, oracle(model, x, all_parameters=True)[0]))
        with tracker.step(ids):
            token_losses(model(input_ids=x).logits, x).mean().backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    got = tracker.values()
    errors = np.array([abs(got[i] - expected[i]) / scale[i] for i in expected])
    assert errors.max() <= TOLERANCE[dtype], f"max relative error {errors.max():.2e}"
    if full:  # the restriction matters: the whole-model oracle is a different quantity
        gap = np.array([abs(full[i] - expected[i]) / scale[i] for i in expected])
        assert gap.max() > 1e-2, gap.max()

    covered = {n: r for r, names in tracker.coverage().routes.items() for n in names}
    assert set(covered) == adapters, "coverage must list exactly the adapter parameters"
    assert all(r.startswith(("gram", "vector")) for r in covered.values()), covered
    tracker.close()
    print(f"LoRA {dtype}: max error / (η‖g_z‖‖g_val‖) = {errors.max():.2e}")


def test_lora_trainer_coverage_file(tmp_path: Path) -> None:
    """The Trainer integration writes the coverage: only adapter parameters."""
    from test_hf import TRAIN, Rows, training_args

    from inrun.integrations.hf import InRunTrainer

    model = lora_gpt2()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    trainer = InRunTrainer(
        model=model, args=training_args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=Rows(TRAIN, list(range(len(TRAIN)))), optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
        inrun_val_loss=val_loss,
    )
    trainer.train()
    state = json.loads((tmp_path / "inrun" / "tracker.json").read_text())
    covered = {n for names in state["coverage"]["routes"].values() for n in names}
    assert covered == adapter_names(model)
    assert len(trainer.inrun_values()) == 4
