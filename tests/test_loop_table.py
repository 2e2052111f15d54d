"""The training loops people run, one row per pattern: each exact against the float64 oracle of
``tests/loop_oracle.py`` (plain autograd per example, the real optimizers), or refused with a clear
error (an :class:`~inrun.InRunError`, never a traceback from inside inrun).

A row is a loop: what runs inside the ``tracker.step`` block, what runs between the block and the
optimizer step (clipping, scaling, a loss or noise no example caused), which optimizers step, and
the oracle's side of it (each example's share of the loss, the map of the gradients as the loop
writes it). Tiny models in float64, three steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from loop_oracle import (
    Grads,
    assert_close,
    coupled_values,
    first_order_values,
    gradient,
    identity,
    ids_of,
    norm_clipped,
    value_clipped,
)
from torch import Tensor, nn

from inrun import (
    ConsistencyError,
    GradientChangeError,
    InRunError,
    InRunShapley,
    StepOrderError,
    UnsupportedModuleError,
    UnsupportedSettingError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

XV = torch.randn(5, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
YV = torch.tensor([0, 1, 2, 1, 0])


def val_loss(m: nn.Module) -> Tensor:
    return F.cross_entropy(m(XV), YV)


class MLP(nn.Module):
    """``view`` picks a dropout mask that is a function of the row's own values (the same for an
    example alone or in its batch, so the oracle can run it alone; another one per view: R-Drop);
    ``gate`` puts a tensor hook on the hidden activations that rescales their gradient by a function
    of the activation (linear in the gradient, as the row verification's proof needs)."""

    def __init__(self, gate: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.gate = nn.Linear(4, 6), nn.Linear(6, 3), gate

    def forward(self, x: Tensor, view: int | None = None) -> Tensor:
        h = torch.tanh(self.body(x))
        if view is not None and self.training:
            h = h * (torch.sin(997 * h.detach() + view) > -0.3) / 0.6
        if self.gate and h.requires_grad:
            gate = 0.5 + h.detach() ** 2
            h.register_hook(lambda g: g * gate)
        return self.head(h)


class Sorted(nn.Module):
    """Sorts its batch by a per-row key, runs a layer, unsorts: per example, but the layer's rows
    follow the data (the identity on a batch already sorted)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        order = x[:, 0].argsort()
        return self.head(torch.tanh(self.inner(x[order]))[order.argsort()])


class CapacityMoE(nn.Module):
    """Switch-style: one token per example routed by the sign of its first feature to one of two
    experts, each taking at most half the batch's tokens (in batch order); a dropped token passes
    through. The first batch fills no expert, a batch of one sign drops half."""

    def __init__(self) -> None:
        super().__init__()
        self.experts, self.head = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        route, capacity = (x[:, 0] > 0).long(), math.ceil(len(x) / 2)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (route == e).nonzero().flatten()[:capacity]
            y = y.index_add(0, rows, expert(x[rows]))
        return self.head(torch.tanh(x + y))


class LateCentering(MLP):
    """Centres its hidden rows over the batch once ``center`` is set (a loop that switches it on
    at step 2): the examples start to interact after the verified steps."""

    center = False

    def forward(self, x: Tensor, view: int | None = None) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h - h.mean(0) if self.center else h)


@dataclass
class Ctx:
    """One step of a loop: the model, its optimizers, the tracker and the batch."""

    model: nn.Module
    opts: list[torch.optim.Optimizer]
    tracker: InRunShapley
    step: int
    x: Tensor
    y: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return ids_of(self.step, len(self.x))

    def share(self, k: int, denominator: float | None = None, view: int | None = None) -> Callable[[nn.Module], Tensor]:
        """Example ``k``'s share of a batch-mean cross-entropy (``denominator``: the mean's)."""
        d = denominator or len(self.x)
        return lambda m: F.cross_entropy(m(self.x[k : k + 1], view=view) if view is not None else m(self.x[k : k + 1]),
                                         self.y[k : k + 1], reduction="sum") / d


def sgd(m: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)]


def adamw(m: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)]


def groups(m: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD([{"params": m.body.parameters(), "lr": 0.3, "nesterov": True, "momentum": 0.5},
                             {"params": m.head.parameters(), "lr": 0.05, "weight_decay": 0.1}], lr=0.1)]


def two(m: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(m.body.parameters(), lr=0.2, momentum=0.9),
            torch.optim.AdamW(m.head.parameters(), lr=0.01)]


def penalty(m: nn.Module) -> Tensor:
    return 0.05 * sum(p.pow(2).sum() for p in m.parameters())


def noise(c: Ctx) -> Grads:
    gen = torch.Generator().manual_seed(100 + c.step)
    return {n: 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in c.model.named_parameters()}


def add_noise(c: Ctx) -> None:
    for p, e in zip(c.model.parameters(), noise(c).values()):
        p.grad.add_(e)


# ---------------------------------------------------------------- loop bodies
def block(c: Ctx) -> None:
    with c.tracker.step(c.ids):
        F.cross_entropy(c.model(c.x), c.y).backward()


def step_all(c: Ctx) -> None:
    for o in c.opts:
        o.step()
    for o in c.opts:
        o.zero_grad()


def unequal_micro_batches(c: Ctx) -> None:
    for rows in (slice(0, 2), slice(2, 6)):
        with c.tracker.step(c.ids[rows]):
            (F.cross_entropy(c.model(c.x[rows]), c.y[rows]) / 2).backward()


def rdrop(c: Ctx) -> None:
    with c.tracker.step(c.ids):
        a, b = c.model(c.x, view=0), c.model(c.x, view=1)
        kl = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="batchmean")
        (F.cross_entropy(a, c.y) + F.cross_entropy(b, c.y) + kl).backward()


def rdrop_share(c: Ctx, k: int) -> Callable[[nn.Module], Tensor]:
    def share(m: nn.Module) -> Tensor:
        a, b = m(c.x[k : k + 1], view=0), m(c.x[k : k + 1], view=1)
        kl = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="sum")
        return (F.cross_entropy(a, c.y[k : k + 1], reduction="sum") + F.cross_entropy(b, c.y[k : k + 1], reduction="sum")
                + kl) / len(c.x)

    return share


def siamese(c: Ctx) -> None:
    with c.tracker.step(c.ids):
        a, b = c.model(c.x), c.model(c.x.flip(1))
        (F.cross_entropy(a, c.y) + (a - b).pow(2).sum(1).mean()).backward()


def siamese_share(c: Ctx, k: int) -> Callable[[nn.Module], Tensor]:
    def share(m: nn.Module) -> Tensor:
        a, b = m(c.x[k : k + 1]), m(c.x[k : k + 1].flip(1))
        return (F.cross_entropy(a, c.y[k : k + 1], reduction="sum") + (a - b).pow(2).sum()) / len(c.x)

    return share


def info_nce(a: Tensor, b: Tensor) -> Tensor:
    """InfoNCE with in-batch negatives: each row's positive is its other view."""
    return F.cross_entropy(a @ b.T / 0.5, torch.arange(len(a)))


def contrastive(c: Ctx, declared: bool) -> None:
    with c.tracker.step(c.ids, coupled_loss=info_nce if declared else None):
        info_nce(c.model(c.x), c.model(c.x.flip(1))).backward()


def contrastive_game(c: Ctx) -> Callable[[nn.Module, list[int]], Tensor]:
    return lambda m, rows: info_nce(m(c.x[rows]), m(c.x[rows].flip(1)))


def grad_scaler(c: Ctx) -> None:
    scaler = c.extra.setdefault("scaler", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    with c.tracker.step(c.ids):
        loss = F.cross_entropy(c.model(c.x), c.y) * (math.inf if c.step == 1 else 1.0)
        scaler.scale(loss).backward()
    scaler.step(c.opts[0])  # unscales; skips the step when a gradient is not finite (step 1)
    scaler.update()
    c.opts[0].zero_grad()


# ---------------------------------------------------------------- the table
@dataclass
class Loop:
    name: str
    body: Callable[[Ctx], None] = block
    between: Callable[[Ctx], None] | None = None
    optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]] = sgd
    step_map: Callable[[Grads, Grads], tuple[Grads, Grads]] = identity
    unattributed: Callable[[Ctx], None] | None = None
    nobody: Callable[[Ctx], Grads] | None = None
    shares: Callable[[Ctx], list[Callable[[nn.Module], Tensor]]] | None = None
    skipped: tuple[int, ...] = ()
    """Loop steps that get no values and are recorded as skipped."""
    untracked: tuple[int, ...] = ()
    """Loop steps the tracker is switched off for (no values, nothing recorded)."""
    refused: tuple[type[InRunError], str] | None = None
    model: Callable[[], nn.Module] = MLP
    finish: Callable[[Ctx], None] = step_all
    batch: int = 6
    inputs: Callable[[Tensor, int], Tensor] | None = None
    """The loop's batch ``x`` at a step, from a random one."""
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 3
    coupled: Callable[[Ctx], Callable[[nn.Module, list[int]], Tensor]] | None = None
    """A coupled loss: the loss of the rows of a subset, for the oracle's game."""


LOOPS = [
    Loop("plain SGD (momentum, weight decay)"),
    Loop("AdamW", optimizers=adamw),
    Loop("param groups (Nesterov; decay on one group)", optimizers=groups),
    Loop("clip_grad_norm_ SGD", between=lambda c: nn.utils.clip_grad_norm_(c.model.parameters(), 0.05),
         step_map=norm_clipped(0.05)),
    Loop("clip_grad_norm_ AdamW", between=lambda c: nn.utils.clip_grad_norm_(c.model.parameters(), 0.05),
         step_map=norm_clipped(0.05), optimizers=adamw),
    Loop("clip_grad_value_ SGD", between=lambda c: nn.utils.clip_grad_value_(c.model.parameters(), 0.02),
         step_map=value_clipped(0.02)),
    Loop("clip_grad_value_ AdamW", between=lambda c: nn.utils.clip_grad_value_(c.model.parameters(), 0.02),
         step_map=value_clipped(0.02), optimizers=adamw),
    Loop("loss scaled by hand, unscaled before the step", body=lambda c: _scaled_block(c, 1024.0),
         between=lambda c: [p.grad.div_(1024.0) for p in c.model.parameters()]),
    Loop("GradScaler (a step skipped on overflow)", body=grad_scaler, finish=lambda c: None, skipped=(1,)),
    Loop("auxiliary loss after the block", between=lambda c: penalty(c.model).backward(),
         refused=(GradientChangeError, "tracker.unattributed")),
    Loop("auxiliary loss after the block, unattributed", unattributed=lambda c: penalty(c.model).backward(),
         nobody=lambda c: gradient(c.model, penalty)),
    Loop("unattributed auxiliary loss + clip_grad_norm_ AdamW", unattributed=lambda c: penalty(c.model).backward(),
         nobody=lambda c: gradient(c.model, penalty), optimizers=adamw,
         between=lambda c: nn.utils.clip_grad_norm_(c.model.parameters(), 0.05), step_map=norm_clipped(0.05)),
    Loop("unattributed auxiliary loss + clip_grad_value_ SGD", unattributed=lambda c: penalty(c.model).backward(),
         nobody=lambda c: gradient(c.model, penalty),
         between=lambda c: nn.utils.clip_grad_value_(c.model.parameters(), 0.02), step_map=value_clipped(0.02)),
    Loop("p.grad.add_(noise)", between=add_noise, refused=(GradientChangeError, "neither a rescaling")),
    Loop("p.grad.add_(noise), unattributed, AdamW", unattributed=add_noise, nobody=noise, optimizers=adamw),
    Loop("accumulation, unequal micro-batches (2 + 4)", body=unequal_micro_batches,
         shares=lambda c: [c.share(k, 2 * (2 if k < 2 else 4)) for k in range(6)]),
    Loop("skipped steps (skip_step; a warm-up step untracked)", body=lambda c: _skipping(c), finish=lambda c: None,
         untracked=(0,), skipped=(1,)),
    Loop("R-Drop: two forwards of the same batch", body=rdrop, shares=lambda c: [rdrop_share(c, k) for k in range(6)]),
    Loop("siamese: two views of each example", body=siamese, shares=lambda c: [siamese_share(c, k) for k in range(6)]),
    Loop("hooks: a parameter hook that reads, a tensor hook that gates", model=lambda: _hooked(MLP(gate=True))),
    Loop("hooks: a parameter hook that scales the gradient", model=lambda: _hooked(MLP(), scale=0.5),
         refused=(ConsistencyError, "hook")),
    Loop("two optimizers (body SGD, head AdamW), one clip", optimizers=two,
         between=lambda c: nn.utils.clip_grad_norm_(c.model.parameters(), 0.05), step_map=norm_clipped(0.05)),
    Loop("two optimizers, each clipped after the first stepped", optimizers=two, finish=lambda c: _clip_each(c),
         refused=(StepOrderError, "changed after the first optimizer.step()")),
    Loop("two optimizers stepping at different times (GAN-style)", optimizers=two, finish=lambda c: _alternate(c),
         refused=(StepOrderError, r"\(head.weight, head.bias\) when the step was valued but did not step")),
    Loop("a layer on the batch sorted by a key, sorted at the first step", model=Sorted,
         inputs=lambda x, t: x[x[:, 0].argsort()] if t == 0 else x),
    Loop("an expert capacity over the batch, filled from step 1", model=CapacityMoE, inputs=lambda x, t: _signs(x, t),
         refused=(UnsupportedModuleError, "a batch of copies of one example")),
    Loop("batch centring switched on at step 2", model=LateCentering, body=lambda c: _centring(c),
         refused=(UnsupportedModuleError, "step 2, example")),
    Loop("InfoNCE with in-batch negatives, undeclared", body=lambda c: contrastive(c, False),
         refused=(StepOrderError, "coupled_loss=fn")),
    Loop("InfoNCE with in-batch negatives, declared", body=lambda c: contrastive(c, True), coupled=contrastive_game,
         batch=5, steps=2),
    Loop("InfoNCE declared, AdamW, clip_grad_norm_", body=lambda c: contrastive(c, True), coupled=contrastive_game,
         optimizers=adamw, between=lambda c: nn.utils.clip_grad_norm_(c.model.parameters(), 0.05),
         step_map=norm_clipped(0.05), batch=5, steps=2),
    Loop("InfoNCE declared, order 2", body=lambda c: contrastive(c, True), options={"order": 2},
         refused=(UnsupportedSettingError, "make the tracker with order=1")),
]


def _signs(x: Tensor, t: int) -> Tensor:
    """Step 0: the signs +, -, -, +, +, - (no expert, no probe part over capacity alone); then +."""
    sign = torch.tensor([1.0, -1, -1, 1, 1, -1]) if t == 0 else torch.ones(6)
    return torch.cat([x[:, :1].abs() * sign[:, None], x[:, 1:]], dim=1)


def _centring(c: Ctx) -> None:
    c.model.center = c.step >= 2
    block(c)


def _scaled_block(c: Ctx, scale: float) -> None:
    with c.tracker.step(c.ids):
        (scale * F.cross_entropy(c.model(c.x), c.y)).backward()


def _skipping(c: Ctx) -> None:
    c.tracker.enabled = c.step != 0  # a warm-up step left out
    block(c)
    if c.step == 1:
        c.tracker.skip_step("the loop chose not to apply it")
        c.opts[0].zero_grad()
        return
    step_all(c)


def _hooked(model: MLP, scale: float | None = None) -> MLP:
    seen: list[float] = []
    model.head.weight.register_hook(lambda g: seen.append(float(g.norm())) if scale is None else g * scale)
    return model


def _clip_each(c: Ctx) -> None:
    for o in c.opts:
        nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], 0.05)
        o.step()
    step_all(c)


def _alternate(c: Ctx) -> None:
    c.opts[c.step % 2].step()
    for o in c.opts:
        o.zero_grad()


def run(loop: Loop) -> tuple[list[float], list[float]]:
    """The loop with the tracker; returns the tracker's values and the oracle's, by id."""
    torch.manual_seed(0)
    model = loop.model().double()
    opts = loop.optimizers(model)
    tracker = InRunShapley(model, opts if len(opts) > 1 else opts[0], val_loss=val_loss, **loop.options)
    got_ids: list[str] = []
    expected: list[float] = []
    gen = torch.Generator().manual_seed(1)
    extra: dict[str, Any] = {}
    for t in range(loop.steps):
        x = torch.randn(loop.batch, 4, generator=gen, dtype=torch.float64)
        x = loop.inputs(x, t) if loop.inputs is not None else x
        c = Ctx(model, opts, tracker, t, x, torch.randint(0, 3, (loop.batch,), generator=gen), extra)
        valued = t not in loop.skipped + loop.untracked
        if valued and loop.coupled is not None:
            expected += coupled_values(model, opts, loop.coupled(c), loop.batch, val_loss, loop.step_map)
            got_ids += c.ids
        elif valued:
            shares = loop.shares(c) if loop.shares else [c.share(k) for k in range(loop.batch)]
            nobody = loop.nobody(c) if loop.nobody else None
            expected += first_order_values(model, opts, shares, val_loss, loop.step_map, nobody)
            got_ids += c.ids
        loop.body(c)
        if loop.unattributed is not None:
            with tracker.unattributed():
                loop.unattributed(c)
        if loop.between is not None:
            loop.between(c)
        loop.finish(c)
    values = tracker.values()
    assert len(tracker.ledger.skipped) == len(loop.skipped), tracker.ledger.skipped
    return [values[i] for i in got_ids], expected


@pytest.mark.parametrize("loop", LOOPS, ids=lambda loop: loop.name)
def test_training_loop_is_exact_or_refused(loop: Loop) -> None:
    if loop.refused is not None:
        with pytest.raises(loop.refused[0], match=loop.refused[1]):
            run(loop)
        return
    got, expected = run(loop)
    assert_close(got, expected, loop.name)


def test_norm_clip_factor_is_read_exactly_on_a_large_float32_gradient() -> None:
    """Norm clipping of a 1e7-coordinate float32 gradient (an embedding) with some subnormal
    coordinates is a uniform scale: the factor read from the ratio of float32 norms was 5e-5 off and
    the step was refused; the quotient of subnormals is loose and must not refuse it either."""
    from inrun.tracking.gradmap import ROUNDING_UNITS, _uniform_factor

    batch = torch.randn(10_000_000, generator=torch.Generator().manual_seed(3))
    batch[:64] *= 1e-40
    clipped = batch * 0.3127
    tol = ROUNDING_UNITS * torch.finfo(torch.float32).eps
    factor = _uniform_factor(clipped, batch, tol)
    assert factor is not None and abs(factor - 0.3127) < 4 * torch.finfo(torch.float32).eps
    clipped[100] *= 1.001  # one coordinate off the scale is not a scale
    assert _uniform_factor(clipped, batch, tol) is None


def test_gradient_comparison_is_bit_for_bit() -> None:
    """The step's comparison of each gradient with its reference (memcmp on CPU) says unchanged only
    for the same bits: a NaN left as it was is unchanged, -0.0 is not 0.0, one coordinate's last bit
    is a change; a strided view or another dtype takes torch's comparison with the same answers."""
    from inrun.tracking.gradmap import _same_bits

    a = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a[7] = float("nan")
    b = a.clone()
    assert _same_bits(a, b) and _same_bits(a[::2], b[::2]) and _same_bits(a[:0], b[:0])
    b[999] = torch.nextafter(b[999], torch.tensor(float("inf")))
    assert not _same_bits(a, b) and not _same_bits(a[1::2], b[1::2])
    assert not _same_bits(torch.zeros(3), -torch.zeros(3)) and not _same_bits(a, a.double())
    assert _same_bits(a.bfloat16(), a.bfloat16()) and not _same_bits(a[:4], a[:5])
