"""Coupled losses: a loss that couples the examples of a batch (in-batch negatives: InfoNCE, CLIP,
SimCLR; any batch-level loss), declared as a function of the model's outputs and valued by its own
game.

With a loss that is a sum of per-example terms, example ``z``'s gradient is the back-propagation of
its row of the output gradient, and the step's first-order game is additive. A coupled loss has no
per-example term: the gradient the backward sends to row ``z`` depends on every other row, and
splitting the batch gradient by rows is not the Shapley value of the step. Declared with
``tracker.step(ids, coupled_loss=fn)`` (``fn(*outputs)``: one argument per call of the model inside
the block, its output with one row per example), the step's first-order game is

    u(S) = <∇_θ fn(rows S of the outputs), v>,   v = the step's direction (η g_val for SGD, D ⊙ g_val
                                                  for Adam, with clipping factors)

the loss the batch ``S`` alone would have back-propagated, along the validation gradient. Since the
model computes each example's outputs from its own rows (the row verification and its probes prove
it), ``∇_θ fn(o_S) = Σ_i J_iᵀ ∂fn/∂o_i``, so ``u(S) = Σ_i <∂fn(o_S)/∂o_i, (J_i v)_S>``: it needs only
the outputs and their directional derivatives ``J_i v`` (one forward-mode replay of each call of
the model at the step), and each subset costs one evaluation of ``fn`` and its backward on the loss
head alone. Shapley values: exact by enumeration of every subset up to ``exact_up_to`` examples,
else ``permutations`` Monte-Carlo permutations (their standard error is logged); either way they
add up to ``u(B)``, which must equal the split-by-row total (checked).

The declaration is verified at the end of the block: ``∂fn/∂outputs`` at the block's outputs must
be the gradient the backward sent to them, up to one uniform factor (a loss scale, ``1/k`` of an
accumulation), which the game then carries. First order only.

**Undeclared, refused where detectable.** At the first step (and every step under
``verify="every_step"``) :class:`CouplingWatch` follows, with a torch function mode, what the code
inside the block does with the model's outputs after the model returns: a product of two tensors
computed from them that pairs rows of the batch (``a @ b.T``, ``mm``, ``cdist``, an ``einsum``
whose operands' batch letters differ or vanish: a similarity between examples), or a softmax,
log-softmax, logsumexp or normalization over the batch dimension, raises
:class:`~inrun.errors.StepOrderError` naming the op and ``coupled_loss``. Not seen: statistics over
the batch combined with its rows (``o − o.mean(0)``), couplings inside a custom autograd Function or
outside torch's functions, a loss that changes after the watched steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from .. import exact, shapley
from ..errors import ConsistencyError, StepOrderError, UnsupportedModuleError
from .capture import own_leaf_tensors
from .replay import ReplayingEngine, RootCall, batched_leaves, buffers_kept

if TYPE_CHECKING:
    from .state import MicroBatch, Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoupledLoss:
    """A loss that couples the examples of a batch, as a function of the model's outputs.

    Args:
        fn: ``fn(*outputs) -> scalar``: one argument per call of the model inside the block (its
            output tensor, or the tuple of its tensors with one row per example); evaluated on the
            rows of any subset of the batch, it is the loss that subset alone would have given.
        exact_up_to: enumerate every subset up to this many examples in a micro-batch (2^n
            evaluations of ``fn``); above, sample permutations.
        permutations: Monte-Carlo permutations above ``exact_up_to`` (n evaluations each).
        seed: seed of the permutations (with the step: the same ones when the run is repeated).
    """

    fn: Callable[..., Tensor]
    exact_up_to: int = 10
    permutations: int = 64
    seed: int = 0

    @classmethod
    def of(cls, value: Any) -> CoupledLoss | None:
        if value is None or isinstance(value, CoupledLoss):
            return value
        if not callable(value):
            raise TypeError(f"coupled_loss must be a callable or an inrun.CoupledLoss, got {type(value).__name__}")
        return cls(value)


@dataclass
class CoupledBlock:
    """What one micro-batch with a coupled loss keeps until the step."""

    loss: CoupledLoss
    calls: list[RootCall]
    outputs: list[list[Tensor]]
    scale: float


def outputs_of(calls: Sequence[RootCall]) -> list[list[Tensor]]:
    return [[t.detach() for t in c.outputs] for c in calls]


def _arguments(outputs: Sequence[Sequence[Tensor]]) -> list[Any]:
    return [o[0] if len(o) == 1 else tuple(o) for o in outputs]


def _head_gradients(loss: CoupledLoss, outputs: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    """``∂fn/∂outputs`` at ``outputs`` (the loss head alone)."""
    leaves = [[t.detach().requires_grad_() for t in o] for o in outputs]
    with torch.enable_grad():
        value = loss.fn(*_arguments(leaves))
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise StepOrderError("coupled_loss must return a scalar tensor (the batch's loss)")
        flat = [t for o in leaves for t in o]
        grads = torch.autograd.grad(value, flat, allow_unused=True)
    it = iter(grads)
    return [[torch.zeros_like(t) if (g := next(it)) is None else g for t in o] for o in leaves]


def declare(loss: CoupledLoss, calls: list[RootCall]) -> CoupledBlock:
    """Check at the end of the block that ``loss`` is what was back-propagated (up to one factor)."""
    if not calls or any(g is None for c in calls for g in c.grads):
        raise StepOrderError(
            "a coupled_loss is declared but the model's outputs did not all get a gradient inside the block: "
            "back-propagate the declared loss of the model's outputs inside tracker.step(ids, coupled_loss=...)"
        )
    outputs = outputs_of(calls)
    head = [g for o in _head_gradients(loss, outputs) for g in o]
    sent = [g for c in calls for g in c.grads]
    num = sum(float((a.double() * b.double()).sum()) for a, b in zip(sent, head))
    den = sum(float((b.double() ** 2).sum()) for b in head)
    scale = num / den if den > 0 else 0.0
    tol = 1e-9 if sent[0].dtype == torch.float64 else 1e-4
    err = math.sqrt(sum(float(((a.double() - scale * b.double()) ** 2).sum()) for a, b in zip(sent, head)))
    norm = math.sqrt(sum(float((a.double() ** 2).sum()) for a in sent))
    if den == 0 or err > tol * norm + 1e-300:
        raise StepOrderError(
            "the coupled_loss declared for this block does not give the gradient its backward sent to the "
            f"model's outputs (relative difference {err / max(norm, 1e-300):.2e}): declare the loss you "
            "back-propagate, as a function of the outputs of the model's calls in the block, in call order"
        )
    for c in calls:  # the inputs are read again at the step: copy those that are the user's data
        c.args, c.kwargs = own_leaf_tensors(c.args), own_leaf_tensors(c.kwargs)
    return CoupledBlock(loss, calls, outputs, scale)


def _tangents(engine: ReplayingEngine, call: RootCall, vectors: list[Tensor], k: int) -> list[Tensor]:
    """``J v`` of the call's batched outputs along column ``k`` of the step's direction."""
    names, params = engine.table.names, engine.table.params
    module = engine.module
    batch = call.outputs[0].shape[0]
    primal = {n: p.detach() for n, p in zip(names, params)}
    tangent = {n: v[k].to(p.dtype) for n, p, v in zip(names, params, vectors)}

    def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        out = call.rerun(call.args, call.kwargs, lambda *a, **k: functional_call(module, p, a, k, strict=False))
        return tuple(batched_leaves(out, batch)[i] for i in call.positions)

    with buffers_kept(module), engine.hooks.paused():
        try:
            _, out = jvp(f, (primal,), (tangent,))
        except (NotImplementedError, RuntimeError) as exc:
            raise UnsupportedModuleError(
                "a coupled loss is valued with the forward-mode derivative of the model's outputs, and an op "
                f"of this model has none ({str(exc).splitlines()[0]})"
            ) from exc
    return list(out)


def block_values(engine: ReplayingEngine, block: CoupledBlock, vectors: list[Tensor], step: int) -> Tensor:
    """``[B, K]`` Shapley values of the block's first-order game along ``vectors`` (per parameter
    ``[K, *shape]``: the step's weighted validation gradient)."""
    K = vectors[0].shape[0]
    B = block.outputs[0][0].shape[0]
    out = torch.zeros(B, K, dtype=torch.float64)
    for k in range(K):
        utility = _utility(block, [_tangents(engine, c, vectors, k) for c in block.calls])
        if block.loss.exact_up_to >= B:
            out[:, k] = exact.enumerate_shapley(utility, B)
        else:
            est = exact.monte_carlo_shapley(utility, B, block.loss.permutations,
                                            seed=block.loss.seed * 1_000_003 + step)
            out[:, k] = est.values
            logger.info("step %d: coupled loss valued by %d permutations, standard error up to %.3g",
                        step, est.permutations, float(est.stderr.max()))
    return out


def _utility(block: CoupledBlock, tangents: list[list[Tensor]]) -> Callable[[Tensor], Tensor]:
    """``u(S)`` of each subset mask: the declared loss on the rows of ``S``, along the tangents."""

    def utility(masks: Tensor) -> Tensor:
        values = torch.zeros(masks.shape[0], dtype=torch.float64)
        for s, mask in enumerate(masks):
            rows = torch.nonzero(mask).flatten()
            if len(rows) == 0:
                continue
            picked = [[t[rows.to(t.device)] for t in o] for o in block.outputs]
            grads = _head_gradients(block.loss, picked)
            values[s] = block.scale * sum(
                float((g.double() * t[rows.to(t.device)].double()).sum())
                for gs, ts in zip(grads, tangents) for g, t in zip(gs, ts))
        return values

    return utility


def value_coupled(engine: ReplayingEngine, window: Window, first: Tensor) -> Tensor:
    """The step's values with every coupled micro-batch valued by its own game (its split-by-row
    values, which add up to the same total, are the check)."""
    if not any(mb.coupled is not None for mb in window.micro):
        return first
    vectors = shapley.weighted(window.multipliers, engine.validation.current.grads)
    parts, start = [], 0
    for mb in window.micro:
        split = first[start : start + mb.size]
        start += mb.size
        if mb.coupled is None:
            parts.append(split)
            continue
        game = block_values(engine, mb.coupled, vectors, window.step).to(split)
        _check_total(game, split, window.step)
        parts.append(game)
    return torch.cat(parts)


def _check_total(game: Tensor, split: Tensor, step: int) -> None:
    tol = 1e-9 if split.dtype == torch.float64 else 1e-4
    total, check = game.sum(dim=0), split.sum(dim=0)
    if bool(((total - check).abs() > tol * (split.abs().sum(dim=0) + total.abs()) + 1e-300).any()):
        raise ConsistencyError(
            f"step {step}: the coupled loss's game adds up to {total.tolist()}, the step's gradient to "
            f"{check.tolist()}: a parameter gets gradient outside the model's outputs (the loss head's own "
            "parameters, e.g. a learned temperature, must be part of the model's call)"
        )


PAIRING = {"matmul", "mm", "cdist", "inner", "tensordot", "__matmul__", "__rmatmul__"}
OVER_ROWS = {"softmax", "log_softmax", "logsumexp", "normalize", "cumsum", "logcumsumexp"}


class CouplingWatch(TorchFunctionMode):
    """Refuses a loss that couples the rows of the model's outputs (see the module docstring)."""

    def __init__(self, inside_model: Callable[[], bool], batch: int) -> None:
        super().__init__()
        self.inside_model, self.batch = inside_model, batch
        self.derived = WeakTensorKeyDictionary()  # tensors computed from the model's outputs

    def output(self, t: Tensor) -> None:
        """A batched output of the model (the watch starts from it)."""
        self.derived[t] = True

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_model() or not torch.is_grad_enabled():
            return out
        flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        ours = [x for x in flat if x in self.derived and x.requires_grad]
        if not ours:
            return out
        name = getattr(func, "__name__", str(func))
        self._refuse(name, args, kwargs, ours)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.derived[t] = True
        return out

    def _refuse(self, name: str, args: tuple, kwargs: dict, ours: list[Tensor]) -> None:
        pairs = name in PAIRING and len(ours) >= 2 and all(t.dim() == 2 for t in ours)
        if name == "einsum":
            pairs = _einsum_pairs(args, ours)
        position = 2 if name == "normalize" else 1  # normalize(input, p, dim)
        dim = kwargs.get("dim", args[position] if len(args) > position and isinstance(args[position], int) else
                         1 if name == "normalize" else None)
        rows = name in OVER_ROWS and isinstance(dim, int) and ours[0].dim() > 0 and dim % ours[0].dim() == 0 \
            and ours[0].shape[0] == self.batch
        if pairs or rows:
            what = "pairs the rows of the batch (a similarity between examples)" if pairs else \
                "runs over the batch dimension"
            raise StepOrderError(
                f"the loss couples the examples of the batch: torch.{name} on the model's outputs {what}, so "
                "an example's share of the loss is not defined and splitting the batch gradient by rows is "
                "not its value. Declare the loss as a function of the model's outputs, "
                "tracker.step(ids, coupled_loss=fn), and the step is valued by that loss's own game "
                "(docs/optimizers.md)"
            )


def _einsum_pairs(args: tuple, ours: list[Tensor]) -> bool:
    """An einsum over two of the outputs whose batch letters differ, or whose batch letter is summed."""
    if not args or not isinstance(args[0], str) or "->" not in args[0] or len(ours) < 2:
        return False
    inputs, output = args[0].replace(" ", "").split("->")
    operands = [x for x in args[1:] if isinstance(x, Tensor)]
    letters = {sub[0] for sub, x in zip(inputs.split(","), operands) if sub and any(x is t for t in ours)}
    return len(letters) > 1 or not letters <= set(output)


def attach(mb: MicroBatch, loss: CoupledLoss | None, calls: list[RootCall]) -> None:
    """At the end of a block: verify and keep what the step needs."""
    if loss is not None:
        mb.coupled = declare(loss, calls)
