"""Padding: a position whose label is ignored (-100) and that the attention mask hides adds
nothing to the loss, so nothing of it is valued; unmasked padding labels are trained on and valued."""

from __future__ import annotations

import numpy as np
import torch

from inrun import InRunShapley


def values_of(pad_token: int, mask_labels: bool) -> np.ndarray:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(3)
    lengths = [10, 6, 3]
    ids = torch.randint(1, 50, (3, 10), generator=g)
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100)) if mask_labels else ids.clone()
    val = torch.randint(1, 50, (2, 8), generator=g)
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss)
    with tracker.step(["long", "mid", "short"]):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    return tracker.values().value


def test_masked_padding_is_not_valued() -> None:
    a, b = values_of(pad_token=0, mask_labels=True), values_of(pad_token=49, mask_labels=True)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14 * np.abs(a).max())
    c = values_of(pad_token=0, mask_labels=False)
    assert np.abs(c - a).max() > 1e-3 * np.abs(a).max(), "unmasked padding labels are trained on: valued"
