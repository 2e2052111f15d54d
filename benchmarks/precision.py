"""Mixed precision against a float64 oracle: how far bf16 values are from exact, and how far the
per-step consistency check's two sides drift apart (what its tolerance must allow).

For every step of a short SGD run, a float64 copy of the model at the run's current parameters
gives the exact per-example gradients (``torch.func``) and the exact validation gradient; the
oracle value is ``η g_val·g_z``. The tracked step runs in the scenario's precision:

* ``float32``: the reference precision;
* ``bf16 autocast``: float32 parameters, the training and validation forwards under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``TrainingArguments(bf16=True)`` does);
* ``bf16 model``: the parameters themselves held in bfloat16 (``model.to(torch.bfloat16)``);
* ``fp16 autocast``: float32 parameters, float16 autocast.

Printed per scenario (model, precision, route): relative L2 error ``‖φ − φ*‖ / ‖φ*‖``, the largest
error of one example relative to ``η ‖g_z‖ ‖g_val‖`` (the bound the docs state), Pearson, and the
check's largest drift ``|Σ_z dot_z − <g_B, g_val>| / scale`` per parameter, split by whether the
parameter's gradient came from 16-bit layer gradients (what ``check_tolerance`` must exceed).

    python benchmarks/precision.py            # the table (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun import InRunShapley, exact
from inrun.tracking import check as check_module

PRECISIONS = ("float32", "bf16 autocast", "bf16 model", "fp16 autocast")


@dataclass
class Drift:
    """Largest check drift seen, for parameters with and without 16-bit layer gradients."""

    low: float = 0.0
    full: float = 0.0


def record_check_drift(drift: Drift) -> Callable[[], None]:
    """Patch the consistency check to record its drift before judging; returns the undo."""
    original = check_module.ConsistencyCheck.finalize

    def finalize(self, window, first, second, lr):
        if window.check_terms is not None:
            ours, theirs, scale = (t.detach().double().cpu().numpy() for t in window.check_terms)
            ours, theirs, scale = self.grouped(ours, theirs, scale)
            ratio = np.abs(ours - theirs) / (scale + check_module.STEP_FLOOR * scale.sum() + 1e-300)
            low = self.row_eps(window) > torch.finfo(torch.float32).eps
            for i, r in enumerate(ratio):
                if low[i]:
                    drift.low = max(drift.low, float(r))
                else:
                    drift.full = max(drift.full, float(r))
        return original(self, window, first, second, lr)

    check_module.ConsistencyCheck.finalize = finalize
    return lambda: setattr(check_module.ConsistencyCheck, "finalize", original)


def gpt2(layers: int, width: int, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=64, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def token_losses(logits: Tensor, x: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                           reduction="none").view(x.shape[0], -1)


def run(precision: str, route: str, bookkeeping: str, layers: int = 2, width: int = 32, seq: int = 16,
        steps: int = 3, batch: int = 8, lr: float = 0.5) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 64, (batch, seq), generator=g) for _ in range(steps)]
    val = torch.randint(0, 64, (4, seq), generator=g)
    model = gpt2(layers, width)
    if precision == "bf16 model":
        model = model.to(torch.bfloat16)
    amp = {"bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}.get(precision)

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)

    def val_loss(m: nn.Module) -> Tensor:
        with autocast():
            logits = m(input_ids=val).logits
        return token_losses(logits, val).mean()

    def train_loss(m: nn.Module, x: Tensor) -> Tensor:
        with autocast():
            logits = m(input_ids=x).logits
        return token_losses(logits, x).mean()

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=val_loss, route=route, bookkeeping=bookkeeping)
    got, truth, scale = [], [], []
    for t, x in enumerate(xs):
        ref = copy.deepcopy(model).double()
        n = x.numel() - x.shape[0]
        pe = exact.per_example_gradients(
            ref, lambda f, xr, n=n: token_losses(f(input_ids=xr).logits, xr).sum() / n, (x,))
        g_val = exact.validation_gradient(ref, lambda m: token_losses(m(input_ids=val).logits, val).mean())
        truth.append(exact.first_order_values(pe, g_val, lr).numpy())
        scale.append((lr * exact.dot_scale(pe, g_val)).numpy())
        ids = list(range(t * batch, (t + 1) * batch))
        with tracker.step(ids):
            train_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
        values = tracker.values()
        got.append(np.array([values[i] for i in ids]))
    tracker.close()
    got_all, truth_all, scale_all = np.concatenate(got), np.concatenate(truth), np.concatenate(scale)
    return {
        "rel_l2": float(np.linalg.norm(got_all - truth_all) / np.linalg.norm(truth_all)),
        "max_scaled": float(np.max(np.abs(got_all - truth_all) / scale_all)),
        "pearson": float(np.corrcoef(got_all, truth_all)[0, 1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    routes = [("vector", "off"), ("gram", "off"), ("auto", "always")]
    print(f"GPT-2 {args.layers}x{args.width}, {args.seq} tokens, batch 8, SGD lr 0.5, 3 steps")
    print("| precision | route | rel. L2 error | max err / (η‖g_z‖‖g_val‖) | Pearson | check drift, 16-bit "
          "layers | check drift, other parameters |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        for route, bookkeeping in routes:
            drift = Drift()
            undo = record_check_drift(drift)
            try:
                r = run(precision, route, bookkeeping, args.layers, args.width, args.seq)
            finally:
                undo()
            label = "book-keeping" if bookkeeping == "always" else route
            print(f"| {precision} | {label} | {r['rel_l2']:.1e} | {r['max_scaled']:.1e} | {r['pearson']:.6f} | "
                  f"{drift.low:.1e} | {drift.full:.1e} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
