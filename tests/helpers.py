"""Shared test machinery: one training step valued by the tracker vs the torch.func oracle.

A *case* builds a model, a batch, the loss the user back-propagates, each example's share of
that loss (for the oracle), and a validation loss. ``compare_with_oracle`` runs a few SGD steps
with the tracker and, before each step, computes the oracle values ``η g_val·g_z`` from true
per-example gradients (``inrun.exact``) in float64.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun import InRunShapley, exact


def forced_route(route: str) -> dict[str, str]:
    """Tracker options that force one route wherever a layer has it (book-keeping is its own setting)."""
    return {"bookkeeping": "always"} if route == "bookkeeping" else {"route": route}


DEVICE = torch.device(os.environ.get("INRUN_TEST_DEVICE", "cpu"))
"""Where the oracle comparisons run (benchmarks/gpu_check.sh sets ``INRUN_TEST_DEVICE=cuda``);
the cases' data are drawn on the CPU either way, so the values compared are the same inputs."""

# One table of tolerances, relative to η·‖g_z‖·‖g_val‖ (the natural scale of a dot product).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class Case:
    """One row of the oracle table."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[Tensor, ...]]
    batch_loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    example_loss: Callable[..., Tensor]  # (model_fn, *rows, batch_size) -> share
    val_loss: Callable[[nn.Module], Tensor]
    lr: float = 0.05


def cast_floats(batch: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def compare_with_oracle(
    case: Case,
    dtype: torch.dtype = torch.float64,
    steps: int = 2,
    batch_size_hint: int | None = None,
    **tracker_options: Any,
) -> dict[str, float]:
    """Run ``steps`` tracked SGD steps; assert each step's values equal the oracle's."""
    torch.manual_seed(0)
    model = case.make_model().to(DEVICE, dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    val_loss = _cast_val_loss(case.val_loss, dtype)
    tracker = InRunShapley(model, opt, val_loss=val_loss, **tracker_options)
    gen = torch.Generator().manual_seed(1)
    expected: dict[int, float] = {}
    scale: dict[int, float] = {}
    next_id = 0
    for _ in range(steps):
        batch = cast_floats(tuple(t.to(DEVICE) for t in case.make_batch(gen)), dtype)
        B = batch[0].shape[0]
        ids = list(range(next_id, next_id + B))
        next_id += B
        ref, ref_scale = _oracle(case, model, batch, val_loss)
        for i, r, s in zip(ids, ref.tolist(), ref_scale.tolist()):
            expected[i] = r
            scale[i] = s
        with tracker.step(ids):
            case.batch_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    got = tracker.values()
    tol = TOLERANCE[dtype]
    worst = 0.0
    for i, ref_value in expected.items():
        err = abs(got[i] - ref_value)
        bound = tol * scale[i] + 1e-300
        worst = max(worst, err / bound * tol)
        assert err <= bound, (
            f"{case.name} [{dtype}] id {i}: tracker {got[i]!r} vs oracle {ref_value!r} "
            f"(error {err:.3e}, allowed {bound:.3e})"
        )
    tracker.close()
    return {"relative_error": worst}


def _oracle(case: Case, model: nn.Module, batch: tuple[Tensor, ...], val_loss: Callable) -> tuple[Tensor, Tensor]:
    """Oracle values and error scales, computed on a float64 copy of the model."""
    ref_model = copy.deepcopy(model).double()
    ref_batch = cast_floats(batch, torch.float64)
    B = ref_batch[0].shape[0]
    per_example = exact.per_example_gradients(
        ref_model, lambda f, *rows: case.example_loss(f, *rows, batch_size=B), ref_batch
    )
    vg = exact.validation_gradient(ref_model, _cast_val_loss(case.val_loss, torch.float64))
    values = exact.first_order_values(per_example, vg, case.lr)
    return values, case.lr * exact.dot_scale(per_example, vg)


def _cast_val_loss(val_loss: Callable, dtype: torch.dtype) -> Callable:
    def wrapped(model: nn.Module) -> Tensor:
        return val_loss(model, dtype) if _takes_dtype(val_loss) else val_loss(model)

    return wrapped


def _takes_dtype(fn: Callable) -> bool:
    return getattr(fn, "takes_dtype", False)


def with_dtype(fn: Callable) -> Callable:
    """Mark a validation loss that needs the model's dtype for its inputs."""
    fn.takes_dtype = True
    return fn


# ----------------------------------------------------------------------------- loss helpers
def classification_case(
    name: str,
    make_model: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    n_classes: int,
    batch: int = 5,
    reduction: str = "mean",
    lr: float = 0.05,
) -> Case:
    """A classifier trained with cross-entropy (mean or sum over the batch)."""
    xv = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    yv = (torch.arange(3) % n_classes).to(DEVICE)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, ...]:
        x = torch.randn(batch, *input_shape, generator=gen)
        y = torch.randint(0, n_classes, (batch,), generator=gen)
        return x, y

    def batch_loss(model: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1], reduction=reduction)

    def example_loss(f: Callable, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        loss = F.cross_entropy(f(x), y, reduction="sum")
        return loss / batch_size if reduction == "mean" else loss

    @with_dtype
    def val_loss(model: nn.Module, dtype: torch.dtype) -> Tensor:
        return F.cross_entropy(model(xv.to(dtype)), yv)

    return Case(name, make_model, make_batch, batch_loss, example_loss, val_loss, lr)


def lm_case(
    name: str,
    make_model: Callable[[], nn.Module],
    vocab: int,
    seq: int = 6,
    batch: int = 3,
    hf: bool = True,
    lr: float = 0.05,
) -> Case:
    """A causal LM trained with the token-mean next-token loss (Hugging Face convention)."""
    val_ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def logits_of(f: Callable, ids: Tensor) -> Tensor:
        out = f(input_ids=ids) if hf else f(ids)
        return out.logits if hasattr(out, "logits") else out

    def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )

    def make_batch(gen: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randint(0, vocab, (batch, seq), generator=gen),)

    def batch_loss(model: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return token_losses(logits_of(model, b[0]), b[0]).mean()

    def example_loss(f: Callable, ids: Tensor, batch_size: int) -> Tensor:
        return token_losses(logits_of(f, ids), ids).sum() / (batch_size * (seq - 1))

    def val_loss(model: nn.Module) -> Tensor:
        return token_losses(logits_of(model, val_ids), val_ids).mean()

    return Case(name, make_model, make_batch, batch_loss, example_loss, val_loss, lr)


def microbatch_values(
    model: nn.Module, opt: torch.optim.Optimizer, val_loss: Callable, x: Tensor, y: Tensor, chunks: int,
    **tracker_options: Any,
) -> list[float]:
    """Values of one optimizer step over ``x, y`` cut into ``chunks`` micro-batches (each
    micro-batch's summed cross-entropy over the whole batch size: together, the batch mean)."""
    tracker = InRunShapley(model, opt, val_loss=val_loss, **tracker_options)
    B = len(x)
    for idx in torch.arange(B).chunk(chunks):
        with tracker.step(idx):
            (F.cross_entropy(model(x[idx]), y[idx], reduction="sum") / B).backward()
    opt.step()
    values = tracker.values()
    return [values[i] for i in range(B)]
