"""Row layouts and interactions that change with the data: probed when a layout is proven, and one
example checked alone at every optimizer step.

The row verification (:mod:`.plan`) proves, on the batch it replays, that every tracked call's rows
belong to their examples. Two things can still change with the data after that batch:

* **a reordering that depends on the data** (a model that sorts its batch by a per-row key, runs a
  layer, and unsorts): the identity on the verified batch, another permutation on the next. Probe:
  the proof is also run on a *shuffled copy* of the batch (rows permuted by a permutation drawn
  afresh, output gradients permuted with them). A reordering by the rows' own data is not the
  identity on both the batch and its shuffle unless it ignores the rows' order; a layer whose
  rows follow such a reordering is then valued at the enclosing module where the rows are the
  examples again (:mod:`inrun.layers.fallback`), which is exact for every later permutation.
* **examples that interact** (statistics over the batch, an expert capacity counted over the whole
  batch that only some batches fill): :func:`refuse_interactions` runs, in eval mode, parts of the
  batch alone (even and odd rows, each half), the first and the last example alone, and a batch
  made of copies of one example (it fills a per-batch capacity the way the batch never may: every
  row routed where that example goes); each part's outputs must be its rows of the batch's
  outputs, with the same shape (a ``[B, B]`` similarity matrix computed inside the model is an
  interaction). Run at every verification, not only the first.

Every optimizer step after that (``verify="on_change"``, the default), :meth:`RowProbes.alone` runs
one example of one micro-batch, both drawn by a generator seeded with the step (the same ones when
the run is repeated), alone through the model with the call's own random-number state, and
compares its outputs with its row of the batch's: an interaction that touches that example at that
step raises then. The micro-batch is drawn among as many as the last step had (the first of a
resumed run's steps takes its first). A call that drew random numbers (dropout) cannot be compared
this way and is left to the probes. Once per step, not per micro-batch: with accumulation over
``m`` micro-batches the check at each one took about ``m`` times a forward of one example (5% of
an Adam-aware step of four micro-batches of 8x128, ``inrun bench`` workload A). And after the
first :data:`EVERY_STEP_UNTIL` steps, at a share of the steps (drawn by the same generator) that
keeps its expected cost near :data:`CHECK_SHARE` of a step's FLOPs: every step of 34 or more
examples, one in four of 8 (the check had been the largest part of order 1's time above its FLOP
floor: 3-5% of a step on ``inrun bench``'s R, S and T, 8% on E, whose steps have 8-16 examples).

What can still go unseen (use ``verify="every_step"``, which proves every micro-batch, probes
included): a reordering that is the identity on the verified batch *and* on its shuffle; an
interaction that no probe part triggers and that, at a later step, touches few examples (it is seen
at a checked step with probability the share of the step's examples it touches, by the one example
checked; past the first steps, a step of fewer than 34 examples is checked with probability
:func:`check_rate`);
any interaction in a model whose forward draws random numbers, after the verified batches.

Cost: the probes add one replay (a forward and two backward passes) and a few forwards of parts of
the batch to each verification; the per-step check is the forward of one example (about
``1 / (3B)`` of a step of ``B`` examples in FLOPs, more on a small model where a call's overhead
dominates). Measured
by ``benchmarks/loop_checks.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UnsupportedModuleError
from ..modes import evaluating
from .replay import ReplayingEngine, RootCall, batched_leaves, buffers_kept

INTERACTION = (
    "examples interact inside the model: the outputs of an example change when the other examples of "
    "its batch change, or when it sits at another position in the batch ({what}: statistics over the "
    "batch such as batch-mean centering or BatchNorm in training mode, an expert capacity counted over "
    "the whole batch, a similarity between the rows of the batch, one example's data used for the "
    "others), so an example's own gradient is not defined and per-example values would be wrong. "
    "Compute everything within each example (a capacity per example, or none)"
)


def rows_of(rows: Tensor, batch: int) -> Callable[[Any], Any]:
    """Select ``rows`` of every tensor in a structure whose leading dimension is the batch."""

    def pick(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[rows.to(value.device)]
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(pick(v) for v in value)
        return value

    return pick


def shuffled(calls: list[RootCall], generator: torch.Generator) -> list[RootCall]:
    """The calls on a shuffled copy of the batch: inputs, outputs and output gradients permuted
    alike (the same permutation for every call of the micro-batch)."""
    batch = calls[0].outputs[0].shape[0]
    perm = torch.randperm(batch, generator=generator)
    if batch > 1 and bool((perm == torch.arange(batch)).all()):
        perm = perm.roll(1)
    pick = rows_of(perm, batch)
    return [replace(c, args=pick(c.args), kwargs=pick(c.kwargs), outputs=pick(c.outputs), grads=pick(c.grads))
            for c in calls]


def _compare(full: list[Tensor], part: list[Tensor], rows: Tensor, tol: float, what: str) -> None:
    """The part's outputs must be its rows of the batch's; an output with a dimension that follows
    the batch size (a ``[B, B]`` similarity) is an interaction too."""
    if len(full) != len(part):
        return  # the outputs cannot be paired (a leaf whose size equals the part's by chance)
    batch = full[0].shape[0] if full else 0
    for f, a in zip(full, part):
        f = f[rows.to(f.device)]
        if f.shape != a.shape:
            if any(d == batch and e == len(rows) for d, e in zip(f.shape[1:], a.shape[1:])):
                raise UnsupportedModuleError(INTERACTION.format(what=what + ", an output dimension follows the batch"))
            continue
        scale = float(f.abs().max()) if f.numel() else 0.0
        if not torch.allclose(f, a, rtol=tol, atol=tol * scale):
            raise UnsupportedModuleError(INTERACTION.format(what=what))


def tolerance(dtype: torch.dtype) -> float:
    """Outputs of the same rows computed in another batch agree to about this (other GEMM blocking)."""
    return 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2


def refuse_interactions(engine: ReplayingEngine, call: RootCall) -> bool:
    """The probes of interactions (see the module docstring), in eval mode (no dropout). Returns
    whether a probe could run (a part too small for the model is left out)."""
    B = call.outputs[0].shape[0]
    index = torch.arange(B)
    parts = [("even and odd rows apart", index[0::2]), ("even and odd rows apart", index[1::2]),
             ("each half apart", index[: B // 2]), ("each half apart", index[B // 2 :]),
             ("the first example alone", index[:1]), ("the last example alone", index[-1:])]
    tol = tolerance(engine.table.dtype)
    tested = False
    with buffers_kept(engine.module), engine.hooks.paused(), torch.no_grad(), evaluating(engine.module):
        full = batched_leaves(call.module(*call.args, **call.kwargs), B)
        for what, rows in parts:
            if 0 < len(rows) < B:
                part = _run(call, rows, B)
                if part is not None:
                    tested = True
                    _compare(full, part, rows, tol, what)
        if B > 1 and (single := _run(call, index[:1], B)) is not None:
            copies = _run(call, torch.zeros(B, dtype=torch.long), B)
            if copies is not None:
                _compare([s.expand(B, *s.shape[1:]) for s in single], copies, index, tol,
                         "a batch of copies of one example")
    return tested


def _run(call: RootCall, rows: Tensor, batch: int, rerun: bool = False) -> list[Tensor] | None:
    """The model on ``rows`` of the call's inputs (``rerun``: as the call ran, its random numbers and
    buffers; else as the module is now)."""
    pick = rows_of(rows, batch)
    try:
        out = call.rerun(pick(call.args), pick(call.kwargs)) if rerun else call.module(*pick(call.args), **pick(call.kwargs))
        return batched_leaves(out, len(rows))
    except Exception:
        return None  # a part the model cannot run (a norm over one value, a fixed batch size)


EVERY_STEP_UNTIL = 8
"""The check runs at every step of a run's first steps (an interaction that appears early, batch
centring switched on at step 2, is refused at that step)."""

CHECK_SHARE = 0.01
"""After those, the check runs at a share of the steps that keeps its expected cost near this share
of a step's FLOPs: one example's forward is about ``1 / (3E)`` of a step of ``E`` examples, so steps
of ``E ≥ 34`` examples are all checked and a step of 8 one time in four."""


def check_rate(examples: int) -> float:
    """The share of steps checked past :data:`EVERY_STEP_UNTIL`, for steps of ``examples`` examples."""
    return min(1.0, 3 * max(1, examples) * CHECK_SHARE)


class RowProbes:
    """The per-step check of one example alone (see the module docstring)."""

    def __init__(self, engine: ReplayingEngine, seed: int = 0) -> None:
        self.engine = engine
        self.seed = seed
        self.refused: str | None = None
        """Why the model cannot run one example alone (the check is then left out)."""
        self._step = -1
        self._micro_seen = 0  # micro-batches of the step being recorded (its last index + 1)
        self._examples_seen = 0  # examples of its micro-batches the check was offered
        self._micro_per_step = 1  # of the last step: the draw's range
        self._rate = 1.0  # the share of steps checked, from the last step's examples

    def _drawn(self, step: int, micro: int) -> np.random.Generator | None:
        """The step's generator when ``micro`` is the micro-batch the check runs on this step
        (``micro``: its index in the step), else ``None``."""
        if step != self._step:
            if self._step >= 0:
                self._micro_per_step = max(1, self._micro_seen)
                self._rate = check_rate(self._examples_seen)
            self._step, self._micro_seen, self._examples_seen = step, 0, 0
        self._micro_seen = max(self._micro_seen, micro + 1)
        draw = np.random.default_rng([self.seed, step])
        if micro != int(draw.integers(self._micro_per_step)):
            return None
        return draw if step < EVERY_STEP_UNTIL or draw.random() < self._rate else None

    def reads(self, window: Any) -> bool:
        """Whether the check will read the outputs of the micro-batch being recorded in ``window``
        (the model's outputs are kept until the block ends only then, or for a verification)."""
        if window is None or self.refused is not None or self.engine.config.verify != "on_change":
            return False
        return self._drawn(window.step, len(window.micro)) is not None

    def alone(self, calls: list[RootCall], step: int, micro: int) -> None:
        """At the step's drawn micro-batch, run one of its examples alone and compare its outputs
        with its row (``micro``: the micro-batch's index in the step)."""
        draw = self._drawn(step, micro)
        B = calls[0].outputs[0].shape[0] if calls and calls[0].outputs else 0
        self._examples_seen += B
        if self.refused is not None or draw is None or B < 2:
            return
        z = int(draw.integers(B))
        rows = torch.tensor([z])
        tol = tolerance(self.engine.table.dtype)
        engine = self.engine
        with buffers_kept(engine.module), engine.hooks.paused(), torch.no_grad():
            for call in calls:
                if call.random:
                    continue  # the call drew random numbers: one example alone gets other ones
                part = _run(call, rows, B, rerun=True)
                if part is None:
                    self.refused = "the model cannot run one example alone"
                    return
                _compare(call.outputs, part, rows, tol, f"step {step}, example {z} alone")
