"""The audit's game and its numbers: the players, the exact values' comparison with the tracker's,
the float64 twin of the model, gradients and Hessian-vector products of the validation loss.

**The game** of an audited step ``t`` over the players ``P``, for ``S ⊆ P``::

    U(S) = L_val(θ_t) − L_val(θ_t + Δ(S)),   Δ(S) = F_t(r ⊙ Σ_{z∈S} g_z)

* ``g_z``: example ``z``'s exact gradient at ``θ_t`` (the gradient of its share of the loss the
  user back-propagated), by replaying the model's own calls of the micro-batch
  (:mod:`inrun.tracking.replay`: same inputs, same dropout masks) and plain autograd, independent
  of the tracker's per-layer routes. A completeness check refuses the audit when the players'
  gradients cannot be exact: ``Σ_z g_z`` over the micro-batch must equal the gradient autograd
  accumulated (it does not when a loss term bypasses the model's outputs, e.g. a penalty on the
  parameters).
* ``r``: the per-parameter factor the loop applied between backward and the step (gradient
  clipping, unscaling), as the step saw it.
* ``F_t``: the *real* optimizer step from the optimizer's state before step ``t`` (learning rate
  of the schedule at ``t``, momentum, Adam's moments, weight decay): a scratch copy of the
  optimizer, its state restored for every subset (:func:`inrun.exact.optimizer_update`).
  ``Δ(∅) = F_t(0)`` is the data-free move (momentum, weight decay); it shifts every subset alike
  and leaves the Shapley values unchanged.
* ``L_val``: the tracker's ``val_loss`` (summed over columns), in the tracker's validation mode.

**The players** are every example of the step when the batch has at most ``players`` of them (the
default 32): this is the step's own game, whose utility ``U(B) − U(∅)`` is the ``U_t(B)`` of the
step's drop row, and its exact Shapley values are those the ledger's values approximate. Exact by
enumeration of all ``2^m`` subsets for ``m ≤ max_exact``, else estimated from ``permutations``
Monte-Carlo permutations in antithetic pairs with a standard error per value
(:func:`inrun.exact.monte_carlo_shapley`; the efficiency ``Σ φ = U(B) − U(∅)`` holds exactly for
them too).

With a larger batch, ``players`` examples are drawn and the others are *absent*: a sub-game, the
step as it would have been taken with only the players' gradients (each still its share of the
full batch's loss). It is shorter than the real step (about ``m/B`` of it with SGD), so its Taylor
error is smaller and it can be optimistic; its distance to the full game is shown beside it: the
whole step's ``U_t(B)`` and Σ of the ledger's values of the step (``step_utility``,
``step_values``, from the drop row, :mod:`inrun.tracking.drop`). The game cannot see the step's
data-free part (momentum, decay): it is shown beside too (``data_free``).

**The tracker's side** of the comparison is the tracker's own value rule applied to *the same
game*: the same order and variant (first order; trapezoid with ``g_val`` at ``θ_t + F_t(0)`` and at
``θ_t + Δ(P)``; Hessian), the same update rule (SGD coefficient; Adam's secant or fixed-state slope
at ``x_P = r ⊙ Σ_{z∈P} g_z``; the SGD proxy), from the players' exact gradients. In the full game
this *is* the ledger's value of each example for the step (stored beside it: an independent check
of the ghost routes), and so it is for first-order values of SGD-type rules in any game.

**Numbers per audited step**: Pearson and Spearman correlation of the tracker's values with the
exact ones, relative RMSE ``‖φ̂ − φ‖ / ‖φ‖``, the Monte-Carlo noise on that scale
``‖stderr‖ / ‖φ‖``, the efficiency gap ``(Σ φ̂ − Σ φ) / Σ |φ|`` (``Σ φ = U(P) − U(∅)``), and the
cost (utility evaluations, seconds). A step is *unfaithful* when the relative RMSE exceeds
``warn_rmse`` by more than twice the noise, whatever the correlation: values uniformly 40% too
large rank well and still misstate what the step did. The first one is logged as a warning, once,
with the numbers.

"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...layers.fallback import inline_checkpoints
from .config import AuditConfig

logger = logging.getLogger(__name__)


def fidelity(exact_values: np.ndarray, approx: np.ndarray, stderr: np.ndarray | None = None) -> dict[str, float]:
    """Pearson, Spearman, relative RMSE and efficiency gap of ``approx`` against ``exact_values``,
    and ``noise``: the exact values' Monte-Carlo standard error on the scale of the relative RMSE."""
    e, a = np.asarray(exact_values, np.float64), np.asarray(approx, np.float64)
    scale = float(np.sqrt(np.mean(e**2)))
    abs_sum = float(np.abs(e).sum())
    se = np.zeros_like(e) if stderr is None else np.asarray(stderr, np.float64)
    return {
        "pearson": pearson(e, a),
        "spearman": pearson(ranks(e), ranks(a)),
        "rel_rmse": float(np.sqrt(np.mean((a - e) ** 2)) / scale) if scale > 0 else math.nan,
        "noise": float(np.sqrt(np.mean(se**2)) / scale) if scale > 0 else math.nan,
        "efficiency_gap": float((a.sum() - e.sum()) / abs_sum) if abs_sum > 0 else math.nan,
        "rms_exact": scale,
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx**2).sum()) * float((dy**2).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank (as Spearman needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    end = np.cumsum(counts)
    return ((end - counts + end - 1) / 2.0)[inverse]


# ----------------------------------------------------------------------------- the players
@dataclass
class Player:
    position: int  # row in the step (over its micro-batches, in order)
    id: Any
    grads: list[Tensor] | None = None  # per trainable parameter, the example's exact gradient


@dataclass
class Sample:
    """The players of one audited step: a uniform reservoir over the step's rows."""

    step: int
    size: int
    rng: np.random.Generator
    seen: int = 0
    slots: list[Player] = field(default_factory=list)
    refused: str | None = None
    skipped: str | None = None  # not audited at all (over the time budget)
    seconds: float = 0.0

    def offer(self, ids: Sequence[Any]) -> list[Player]:
        """Let a micro-batch's rows into the reservoir; the players that entered and stayed."""
        entered: dict[int, Player] = {}
        for i in ids:
            player = Player(self.seen, i)
            if len(self.slots) < self.size:
                self.slots.append(player)
                entered[id(player)] = player
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.size:
                    entered.pop(id(self.slots[j]), None)
                    self.slots[j] = player
                    entered[id(player)] = player
            self.seen += 1
        return list(entered.values())


# ----------------------------------------------------------------------------- the audit


class Refused(Exception):
    """The audit of a step cannot be exact; the message says why."""


def audit_summary(steps: Sequence[Mapping[str, Any]], config: AuditConfig | None = None) -> dict[str, Any]:
    """Headline numbers of an audit: how many steps, how faithful, what it cost."""
    ok = [r for r in steps if r["status"] == "ok"]
    skipped = [r["step"] for r in steps if r["status"] == "skipped"]

    def median(key: str) -> float:
        xs = [r[key] for r in ok if r[key] is not None and np.isfinite(r[key])]
        return float(np.median(xs)) if xs else math.nan

    def worst(key: str) -> float:
        xs = [r[key] for r in ok if r[key] is not None and np.isfinite(r[key])]
        return float(min(xs)) if xs else math.nan

    flagged = [r["step"] for r in ok if r["flagged"]]
    return {
        "audited_steps": len(ok),
        "refused_steps": len(steps) - len(ok) - len(skipped),
        "skipped_steps": skipped,
        "flagged_steps": flagged,
        "median_pearson": median("pearson"),
        "median_spearman": median("spearman"),
        "median_rel_rmse": median("rel_rmse"),
        "worst_pearson": worst("pearson"),
        "worst_step": min(ok, key=lambda r: r["pearson"] if np.isfinite(r["pearson"]) else math.inf)["step"] if ok else None,
        "evaluations": int(sum(r["evaluations"] for r in steps)),
        "seconds": float(sum(r["seconds_gradients"] + r["seconds_game"] for r in steps)),
        "full_games": sum(1 for r in ok if r.get("game") == "full"),
        "players": max((int(r["players"]) for r in ok), default=0),
        "batch": max((int(r["batch"]) for r in ok), default=0),
        "config": None if config is None else config.to_dict(),
    }


def unfaithful_message(row: Mapping[str, Any], nonlinear: str | None, warn_below: float) -> str:
    """The warning for the first unfaithful audited step, with advice for its case (``nonlinear``:
    why no linearization follows the step, if none does; ``warn_below``: the Pearson under which
    the ranking is named)."""
    what = f"order-{row['order']} values"
    if row["rule"] == "sgd_proxy":
        what += " (SGD proxy)"
    elif row["rule"] == "adam":
        what += " (Adam-aware)"
    if row["rule"] == "sgd_proxy":
        advice = "the SGD proxy does not follow this optimizer's step; value it with its own rule (proxy=None)"
    elif nonlinear:
        advice = f"{nonlinear}; later steps are audited as they come"
    elif row["order"] == 1:
        advice = "use order=2 or a smaller learning rate"
    else:
        advice = "use a smaller learning rate"
    players = (f"all {row['players']} examples of the step" if row["game"] == "full"
               else f"{row['players']} of the step's {row['batch']} examples")
    how = "rank them poorly" if row["pearson"] < warn_below else "are off in scale"
    return (
        f"{what} {how} against the exact Shapley values of step {row['step']}'s game (relative RMSE "
        f"{row['rel_rmse']:.2f}, Pearson {row['pearson']:.2f}, Spearman {row['spearman']:.2f}, efficiency gap "
        f"{row['efficiency_gap']:+.2f}; {players}, lr {row['lr']:.3g}): {advice}"
    )


# ----------------------------------------------------------------------------- helpers
def cuda_devices(params: Sequence[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def float64_twin(module: nn.Module) -> nn.Module:
    """A float64 copy of the model (gradients dropped), whose root casts floating inputs to float64.

    The copy keeps the model's own hooks (a user's hook may be part of its forward); the
    tracker's hooks in it do nothing while the tracker's capture is paused, as it is during the
    audit. Hooks that the copy's root needs for the inputs are added to the copy only.
    """
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.grad = None
    twin.to(torch.float64)

    def cast(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return cast_floats(args), cast_floats(kwargs)

    twin.register_forward_pre_hook(cast, with_kwargs=True)
    return twin


def cast_floats(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(cast_floats(v) for v in value)
    if isinstance(value, list):
        return [cast_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: cast_floats(v) for k, v in value.items()}
    return value


def gradient(loss_module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``∇ L_val`` at ``params`` (by name), functionally: the model's own parameters untouched."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    with torch.enable_grad(), inline_checkpoints():  # a reentrant checkpoint refuses autograd.grad
        loss = functional_call(loss_module, {"model." + n: t for n, t in leaves.items()}, ())
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])).detach() for n, g in zip(leaves, grads)}


def hessian_vector(loss_module: nn.Module, params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``H v`` of ``L_val`` at ``params``: forward-over-reverse, attention on its math backend."""

    def loss_of(p: Mapping[str, Tensor]) -> Tensor:
        return functional_call(loss_module, {"model." + n: t for n, t in p.items()}, ())

    primal = {n: t.detach() for n, t in params.items()}
    tangent = {n: vector[n].to(t.dtype) for n, t in primal.items()}
    with sdpa_kernel([SDPBackend.MATH]), inline_checkpoints():
        _, hv = jvp(grad(loss_of), (primal,), (tangent,))
    return {n: t.detach() for n, t in hv.items()}
