"""Ground truth for one training step, independent of the tracker's ghost routes.

Use it to audit a run: take one step's parameters, batch and learning rate, and compare what
the tracker credited to each example with the exact Shapley value of that step.

Building blocks:

* :func:`per_example_gradients`: true per-example gradients of the whole model by
  ``torch.func`` (``vmap`` over ``grad`` of a functional call);
* :func:`validation_gradient`: the gradient of the validation loss at the current parameters;
* :func:`first_order_values`: ``η · g_val · g_z`` from those two, the quantity the tracker's
  order-1 values must equal;
* :class:`StepGame`: the exact local utility of one step,
  ``U(S) = L_val(θ) − L_val(θ + Δ(S))`` with a pluggable update ``Δ(S) = f(Σ_{z∈S} g_z)``
  (plain SGD ``Δ(S) = −η Σ_{z∈S} g_z`` by default, per-parameter learning rates allowed);
* :func:`enumerate_shapley` (every subset, batches up to ~12) and :func:`monte_carlo_shapley`
  (permutation sampling with a standard error per example) for any such game;
* :func:`taylor_game`: the second-order Taylor expansion of an SGD step's utility, a
  :class:`QuadraticGame` whose Shapley values have a closed form;
* :func:`exact_step_values`: all of the above in one call, what a user calls to audit a step.

Conventions: values are *helpful = positive* (a loss reduction), in float64. ``g_z`` is the
gradient of example ``z``'s *share* of the training loss (with a batch-mean loss over ``B``
examples, its own loss divided by ``B``), so ``Σ_z g_z`` is the batch gradient the optimizer
sees. Use float64 models for audits: ``U(S)`` is a difference of two nearby losses, and float32
cancellation error (~1e-7 of the loss) would swamp the small steps one wants to check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .modes import evaluating

logger = logging.getLogger(__name__)

ExampleLoss = Callable[..., Tensor]
"""``example_loss(model_fn, *rows) -> scalar``: one example's share of the training loss.

``model_fn`` behaves like the model (call it as you call the model); ``rows`` are that example's
slices of the batch tensors, each with a leading dimension of 1. With a batch-mean loss over
``B`` examples, return the example's loss divided by ``B``.
"""

ValLoss = Callable[[nn.Module], Tensor]
"""``val_loss(model) -> Tensor``: a scalar, or a vector of per-validation-example losses (summed)."""

UpdateFn = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]
"""``update(summed) -> delta``: the parameter change a subset's summed gradient causes.

``summed`` maps each trainable parameter name to ``[S, *param.shape]``: the sums
``Σ_{z∈S} g_z`` of ``S`` subsets at once. Return the change ``Δ(S)`` with the same shapes. An
elementwise rule ``Δ_j(S) = f_j(Σ_{z∈S} g_zj)`` (SGD, Adam with its state fixed at the step)
broadcasts over the leading dimension for free. See :func:`sgd_update`.
"""

Utility = Callable[[Tensor], Tensor]
"""``utility(masks) -> values``: ``masks`` is ``[S, n]`` bool (row ``s`` says which players are
in subset ``s``), the result ``[S]`` float64 utilities."""

MAX_ENUMERATION = 20
"""Largest number of players :func:`enumerate_shapley` accepts (2^20 utility evaluations)."""


# ----------------------------------------------------------------------------- gradients
def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Name -> detached tensor of every parameter with ``requires_grad`` (tied ones once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module,
    example_loss: ExampleLoss,
    batch: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-example gradients ``[B, *param.shape]`` of every trainable parameter.

    Args:
        model: the model at the parameters of the step (its mode is used as is).
        example_loss: see :data:`ExampleLoss`.
        batch: tensors with the examples along dim 0.
        chunk_size: examples per ``vmap`` chunk (bounds memory).
    """
    params = trainable_parameters(model)

    def loss_of_one(p: Mapping[str, Tensor], *row: Tensor) -> Tensor:
        def model_fn(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, dict(p), args, kwargs)

        return example_loss(model_fn, *(r.unsqueeze(0) for r in row))

    in_dims = (None, *([0] * len(batch)))
    return vmap(grad(loss_of_one), in_dims=in_dims, chunk_size=chunk_size)(params, *batch)


def validation_gradient(
    model: nn.Module, val_loss: ValLoss, *, eval_mode: bool = True
) -> dict[str, Tensor]:
    """Gradient of ``val_loss(model).sum()`` for every trainable parameter (eval mode by default)."""
    params = trainable_parameters(model)
    with evaluating(model, eval_mode):
        loss = val_loss(model).sum()
        names = list(params)
        live = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [live[n] for n in names], allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(params[n])).detach()
        for n, g in zip(names, grads)
    }


def hessian_vector_products(
    model: nn.Module,
    val_loss: ValLoss,
    vectors: Mapping[str, Tensor],
    *,
    eval_mode: bool = True,
) -> dict[str, Tensor]:
    """``H v`` for each of ``K`` vectors, ``H = ∇² val_loss(model).sum()`` at the current parameters.

    Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), one product per vector.
    Attention runs on PyTorch's math backend here: the fused CPU/GPU kernels have no forward-mode
    or double-backward derivative.

    Args:
        vectors: trainable parameter name -> ``[K, *param.shape]`` (names missing: zero).

    Returns:
        name -> ``[K, *param.shape]`` products, for every trainable parameter.
    """
    params = trainable_parameters(model)
    K = next(iter(vectors.values())).shape[0]
    loss_module = LossModule(model, val_loss)

    def loss_of(p: Mapping[str, Tensor]) -> Tensor:
        return functional_call(loss_module, {"model." + n: t for n, t in p.items()}, ())

    out: dict[str, list[Tensor]] = {n: [] for n in params}
    with evaluating(model, eval_mode), sdpa_kernel([SDPBackend.MATH]):
        for k in range(K):
            tangent = {
                n: vectors[n][k].to(p.dtype) if n in vectors else torch.zeros_like(p)
                for n, p in params.items()
            }
            _, hv = jvp(grad(loss_of), (params,), (tangent,))
            for n in params:
                out[n].append(hv[n].detach())
    return {n: torch.stack(v) for n, v in out.items()}


def first_order_values(
    per_example: Mapping[str, Tensor],
    val_grad: Mapping[str, Tensor],
    lr: float | Mapping[str, float],
) -> Tensor:
    """``[B]`` values ``Σ_p η_p <g_z,p, g_val,p>`` in float64.

    ``lr`` is one learning rate, or one per parameter name (per-group learning rates).
    """
    total: Tensor | None = None
    for name, g in per_example.items():
        eta = lr[name] if isinstance(lr, Mapping) else lr
        term = eta * (g.flatten(1).double() @ val_grad[name].flatten().double())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("per_example holds no parameters")
    return total


def dot_scale(per_example: Mapping[str, Tensor], val_grad: Mapping[str, Tensor]) -> Tensor:
    """``[B]`` ``‖g_z‖·‖g_val‖``: the natural scale of a per-example dot product's error."""
    gz = torch.sqrt(sum((g.flatten(1).double() ** 2).sum(1) for g in per_example.values()))
    gv = torch.sqrt(sum((v.double() ** 2).sum() for v in val_grad.values()))
    return gz * gv


# ----------------------------------------------------------------------------- updates
def sgd_update(lr: float | Mapping[str, float]) -> UpdateFn:
    """Plain SGD's data part ``Δ(S) = −η Σ_{z∈S} g_z`` (see :data:`UpdateFn`).

    Args:
        lr: one learning rate, or parameter name -> learning rate (every trainable parameter
            must be named; see :func:`learning_rates`).
    """

    def update(summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: -_lr_of(lr, n) * g for n, g in summed.items()}

    return update


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grad_factor: float | Mapping[str, float] = 1.0,
    start: Mapping[str, Tensor] | None = None,
) -> UpdateFn:
    """The *real* step of ``optimizer`` as an update rule: for each subset, the change a scratch
    copy of the optimizer (its state restored every time) makes with gradient
    ``grad_factor · Σ_{z∈S} g_z``. Exact for any torch optimizer (momentum, Adam's moments, weight
    decay, amsgrad...); ``grad_factor`` is a clip factor or gradient scale applied before the step,
    one for all parameters or one per parameter name. ``Δ(∅)`` is the optimizer's data-free step,
    which shifts every subset alike and so leaves the Shapley values unchanged.

    Call it before the real step (it copies the optimizer's state at that moment). One optimizer
    step per subset: fine for audits of small batches.

    Args:
        start: the parameter values to step from, by name (default: the model's own). Give a
            float64 copy of them to evaluate a float32 run's step in float64: the optimizer's
            state tensors are cast to each parameter's dtype.
    """
    named = trainable_parameters(model) if start is None else {n: t.detach() for n, t in start.items()}
    name_of = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    scratch = {n: nn.Parameter(t.clone()) for n, t in named.items()}
    groups, state = [], {}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in name_of or name_of[id(p)] not in scratch:
                continue
            q = scratch[name_of[id(p)]]
            params.append(q)
            state[q] = {k: _state_copy(k, v, q) for k, v in optimizer.state.get(p, {}).items()}
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    opt = type(optimizer)(groups)
    order = list(state)

    def factor(n: str) -> float:
        return float(grad_factor[n]) if isinstance(grad_factor, Mapping) else float(grad_factor)

    def update(summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        S = next(iter(summed.values())).shape[0]
        out = {n: torch.empty_like(g) for n, g in summed.items()}
        for s in range(S):
            with torch.no_grad():
                for n, p in scratch.items():
                    p.copy_(named[n])
                    p.grad = (factor(n) * summed[n][s]).to(p.dtype).clone() if n in summed else None
            for q in order:
                opt.state[q] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state[q].items()}
            opt.step()
            with torch.no_grad():
                for n in out:
                    out[n][s] = scratch[n] - named[n]
        return out

    return update


def _state_copy(key: str, value: Any, param: Tensor) -> Any:
    """An optimizer state entry copied for a scratch parameter: tensors shaped like the parameter
    (moments, momentum buffers) in its dtype; counters (Adam's ``step``) as they are."""
    if not torch.is_tensor(value):
        return value
    value = value.detach().clone()
    if key != "step" and value.shape == param.shape and value.is_floating_point():
        value = value.to(param.dtype)
    return value


def learning_rates(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Trainable parameter name -> learning rate of its optimizer parameter group.

    Raises:
        ValueError: if a trainable parameter is in no parameter group.
    """
    lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in lr_of:
            raise ValueError(f"parameter {n!r} is trainable but in no group of the optimizer")
        out[n] = lr_of[id(p)]
    return out


def _lr_of(lr: float | Mapping[str, float], name: str) -> float:
    if not isinstance(lr, Mapping):
        return float(lr)
    if name not in lr:
        raise KeyError(f"no learning rate for parameter {name!r}; lr names {sorted(lr)[:5]}...")
    return float(lr[name])


# ----------------------------------------------------------------------------- Shapley
def all_subsets(n: int, device: torch.device | str | None = None) -> Tensor:
    """``[2^n, n]`` bool masks; row ``s`` holds player ``i`` iff bit ``i`` of ``s`` is set."""
    s = torch.arange(2**n, device=device)
    return ((s.unsqueeze(1) >> torch.arange(n, device=device)) & 1).bool()


def shapley_weights(n: int) -> Tensor:
    """``[n]`` float64: ``w[k] = k! (n−1−k)! / n!``, the weight of a marginal ``U(S∪i) − U(S)``
    with ``|S| = k``."""
    return torch.tensor(
        [1.0 / (n * math.comb(n - 1, k)) for k in range(n)], dtype=torch.float64
    )


def shapley_from_table(table: Tensor) -> Tensor:
    """Exact Shapley values ``[n]`` from the utilities ``[2^n]`` of every subset.

    ``table[s]`` is the utility of the subset whose members are the set bits of ``s`` (the
    order of :func:`all_subsets`). Each subset is read once per player, vectorized.
    """
    size = table.shape[0]
    n = size.bit_length() - 1
    if size != 2**n or table.dim() != 1:
        raise ValueError(f"table must have 2^n entries, got shape {tuple(table.shape)}")
    table = table.double()
    s = torch.arange(size, device=table.device)
    popcount = all_subsets(n, table.device).sum(dim=1)
    weights = shapley_weights(n).to(table.device)
    values = []
    for i in range(n):
        without = s[(s >> i) & 1 == 0]  # (2^(n-1),) subsets not containing i
        marginal = table[without | (1 << i)] - table[without]
        values.append((weights[popcount[without]] * marginal).sum())
    return torch.stack(values)


def enumerate_shapley(utility: Utility, n: int, *, chunk: int = 1024) -> Tensor:
    """Exact Shapley values ``[n]`` of a game: every subset's utility once (2^n calls' worth).

    Args:
        utility: see :data:`Utility`.
        n: number of players.
        chunk: subsets per ``utility`` call.

    Example:
        >>> import torch
        >>> a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> enumerate_shapley(lambda m: m.double() @ a, 3)  # an additive game: φ = a
        tensor([ 1.0000, -2.0000,  0.5000], dtype=torch.float64)
    """
    if not 1 <= n <= MAX_ENUMERATION:
        raise ValueError(
            f"n={n}: enumeration needs 1 <= n <= {MAX_ENUMERATION}; use monte_carlo_shapley"
        )
    masks = all_subsets(n)
    table = torch.cat([utility(masks[i : i + chunk]).double() for i in range(0, 2**n, chunk)])
    return shapley_from_table(table)


@dataclass(frozen=True)
class ShapleyEstimate:
    """Shapley values of one game, exact or sampled.

    Attributes:
        values: ``[n]`` float64 values, in player (batch row) order.
        stderr: ``[n]`` standard error of each value (zeros when exact).
        method: ``"enumeration"``, ``"monte_carlo"``, ``"monte_carlo_antithetic"`` or ``"closed_form"``.
        total: ``U(all players) − U(∅)``; the values add up to it (efficiency; for Monte Carlo
            exactly too, since every permutation's marginals telescope).
        evaluations: utility evaluations spent.
        permutations: permutations sampled (0 when exact).
    """

    values: Tensor
    stderr: Tensor
    method: str
    total: float
    evaluations: int
    permutations: int = 0


def monte_carlo_shapley(
    utility: Utility,
    n: int,
    permutations: int,
    *,
    seed: int = 0,
    chunk: int = 1024,
    antithetic: bool = False,
) -> ShapleyEstimate:
    """Permutation-sampling Shapley estimates with a standard error per player.

    Each sampled permutation adds the players one at a time; a player's estimate is the mean
    of its marginal contributions ``U(prefix ∪ z) − U(prefix)`` over the permutations, its
    standard error their standard deviation over ``sqrt(permutations)``. Costs
    ``permutations · n + 1`` utility evaluations.

    ``antithetic=True`` samples permutations in pairs, each with its reverse, and takes the
    statistics over the pairs' means. In the reversed order a player's predecessors are the
    others it did not follow, so for a game with interactions of at most two players (a quadratic
    utility) a pair's mean marginal *is* the Shapley value: only the higher-order part of the game
    is sampled. A step's game is close to quadratic (it is its second-order Taylor expansion plus
    a remainder), so its error bars shrink by orders of magnitude at the same cost.

    Args:
        utility: see :data:`Utility`.
        n: number of players.
        permutations: permutations to sample (at least 2, for a standard error; with
            ``antithetic``, an even number: ``permutations / 2`` pairs, at least 2).
        seed: seed of the permutations (the result is deterministic given it).
        chunk: subsets per ``utility`` call.
        antithetic: sample each permutation with its reverse (see above).
    """
    if permutations < 2:
        raise ValueError(f"permutations={permutations} must be at least 2")
    if antithetic and (permutations % 2 or permutations < 4):
        raise ValueError(f"permutations={permutations}: antithetic sampling needs an even number, at least 4")
    gen = torch.Generator().manual_seed(seed)
    empty = float(utility(torch.zeros(1, n, dtype=torch.bool)).double()[0])
    group = 2 if antithetic else 1  # permutations per sample
    samples = permutations // group
    per_chunk = max(1, chunk // (n * group))
    # Running mean and sum of squared deviations per player, merged chunk by chunk (Chan et
    # al.), so the variance does not cancel when the marginals barely vary.
    count = 0
    mean = torch.zeros(n, dtype=torch.float64)
    m2 = torch.zeros(n, dtype=torch.float64)
    full = None
    for start in range(0, samples, per_chunk):
        m = min(per_chunk, samples - start)
        order = torch.stack([torch.randperm(n, generator=gen) for _ in range(m)])  # (m, n)
        if antithetic:
            order = torch.stack([order, order.flip(1)], dim=1).reshape(2 * m, n)  # each then its reverse
        rank = torch.argsort(order, dim=1)  # rank[p, i]: position of player i in permutation p
        # Prefix k of permutation p holds the players of rank < k: masks (p, n, n) over k = 1..n.
        masks = rank.unsqueeze(1) < torch.arange(1, n + 1).view(1, n, 1)
        u = utility(masks.reshape(group * m * n, n)).double().reshape(group * m, n)
        before = torch.cat([torch.full((group * m, 1), empty, dtype=torch.float64), u[:, :-1]], dim=1)
        marginal_by_position = u - before  # (p, n)
        marginal = torch.gather(marginal_by_position, 1, rank)  # (p, n) by player
        marginal = marginal.reshape(m, group, n).mean(dim=1)  # (m, n): one sample each
        chunk_mean = marginal.mean(dim=0)
        delta = chunk_mean - mean
        mean = mean + delta * (m / (count + m))
        m2 = m2 + ((marginal - chunk_mean) ** 2).sum(dim=0) + delta**2 * (count * m / (count + m))
        count += m
        full = float(u[0, -1])
    var = m2 / (samples - 1)
    assert full is not None
    return ShapleyEstimate(
        values=mean,
        stderr=torch.sqrt(var / samples),
        method="monte_carlo_antithetic" if antithetic else "monte_carlo",
        total=full - empty,
        evaluations=permutations * n + 1,
        permutations=permutations,
    )


# ----------------------------------------------------------------------------- step game
class StepGame:
    """The exact local utility of one training step, as a cooperative game over its batch.

    ``U(S) = L_val(θ) − L_val(θ + Δ(S))`` with ``Δ(S) = update(Σ_{z∈S} g_z)``: the validation
    loss reduction had only the examples in ``S`` made this step (helpful = positive). Each
    evaluation is one validation forward at perturbed parameters (``functional_call``: the
    model itself is never modified). Buffers and frozen parameters stay as they are.

    Args:
        model: the model at the step's parameters θ.
        val_loss: ``val_loss(model)``; a vector of per-validation losses is summed.
        per_example: name -> ``[n, *param.shape]`` per-example gradients (shares of the batch
            loss, as from :func:`per_example_gradients`), for every trainable parameter.
        update: see :data:`UpdateFn`; e.g. ``sgd_update(lr)``.
        eval_mode: evaluate the validation loss in eval mode (the tracker's default).
        chunk_size: subsets evaluated together under ``torch.func.vmap`` (about 3x faster than
            one at a time for a small MLP on a CPU, no gain for a small GPT-2); ``None``
            evaluates one subset at a time. A model that ``vmap`` cannot batch (data-dependent
            control flow, random ops) falls back to one at a time.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> share = lambda f, xr, yr: F.cross_entropy(f(xr), yr) / 4
        >>> val = lambda m: F.cross_entropy(m(x), y)
        >>> game = StepGame(model, val, per_example_gradients(model, share, (x, y)), sgd_update(0.5))
        >>> phi = enumerate_shapley(game.utility, game.n)
        >>> bool(torch.isclose(phi.sum(), game.utility(torch.ones(1, 4, dtype=torch.bool))[0]))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        val_loss: ValLoss,
        per_example: Mapping[str, Tensor],
        update: UpdateFn,
        *,
        eval_mode: bool = True,
        chunk_size: int | None = 32,
    ) -> None:
        params = trainable_parameters(model)
        missing = set(params) - set(per_example)
        if missing:
            raise ValueError(f"per_example lacks trainable parameters: {sorted(missing)[:5]}")
        sizes = {g.shape[0] for g in per_example.values()}
        if len(sizes) != 1:
            raise ValueError(f"per_example gradients disagree on the batch size: {sizes}")
        self.model = model
        self.val_loss = val_loss
        self.update = update
        self.eval_mode = eval_mode
        self.chunk_size = chunk_size
        self.n: int = sizes.pop()
        """Number of players (examples in the batch)."""
        self._theta = params
        self._grads = {n: per_example[n].detach() for n in params}
        self._loss_module = LossModule(model, val_loss)
        with torch.no_grad(), evaluating(model, eval_mode):
            self.base_loss = float(self._loss_at(params))
            """``L_val(θ)``."""

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        example_loss: ExampleLoss,
        batch: Sequence[Tensor],
        val_loss: ValLoss,
        lr: float | Mapping[str, float] | None = None,
        *,
        update: UpdateFn | None = None,
        eval_mode: bool = True,
        chunk_size: int | None = 32,
    ) -> StepGame:
        """The game of one step from a batch: per-example gradients by ``torch.func``.

        Give ``lr`` (SGD, :func:`sgd_update`) or an ``update``, not both.
        """
        update = _resolve_update(lr, update)
        per_example = per_example_gradients(model, example_loss, batch)
        return cls(model, val_loss, per_example, update, eval_mode=eval_mode, chunk_size=chunk_size)

    def parameters_after(self, mask: Tensor) -> dict[str, Tensor]:
        """``θ + Δ(S)`` for one ``[n]`` bool mask: name -> tensor, every trainable parameter."""
        delta = self._deltas(mask.reshape(1, self.n))
        return {n: self._theta[n] + d[0] for n, d in delta.items()}

    def utility(self, masks: Tensor) -> Tensor:
        """``[S]`` float64 utilities of the subsets in ``masks`` (``[S, n]`` bool)."""
        if masks.dim() != 2 or masks.shape[1] != self.n:
            raise ValueError(f"masks must be [S, {self.n}], got {tuple(masks.shape)}")
        out = []
        step = self.chunk_size or 1
        with torch.no_grad(), evaluating(self.model, self.eval_mode):
            for start in range(0, masks.shape[0], step):
                delta = self._deltas(masks[start : start + step])
                out.append(self._losses(delta))
        return self.base_loss - torch.cat(out).double()

    def _losses(self, delta: Mapping[str, Tensor]) -> Tensor:
        """``[S]`` validation losses at ``θ + delta[:, ...]``."""
        if self.chunk_size is not None:
            try:
                params = {n: self._theta[n] + delta[n] for n in self._theta}
                return vmap(self._loss_at)(params)
            except (RuntimeError, NotImplementedError) as exc:
                logger.info("vmap cannot batch this validation loss (%s); one subset at a time", exc)
                self.chunk_size = None
        S = next(iter(delta.values())).shape[0]
        return torch.stack([
            self._loss_at({n: self._theta[n] + delta[n][s] for n in self._theta}) for s in range(S)
        ])

    def _deltas(self, masks: Tensor) -> Mapping[str, Tensor]:
        summed = {
            n: torch.einsum("sb,b...->s...", masks.to(g.dtype).to(g.device), g)
            for n, g in self._grads.items()
        }
        delta = self.update(summed)
        if set(delta) != set(summed):
            raise ValueError("update() must return a change for every parameter it was given")
        return delta

    def _loss_at(self, params: Mapping[str, Tensor]) -> Tensor:
        return functional_call(self._loss_module, {"model." + n: t for n, t in params.items()}, ())


@dataclass(frozen=True)
class QuadraticGame:
    """``U(S) = Σ_{z∈S} a_z − ½ Σ_{z,z'∈S} M_zz'``: a game whose Shapley value is closed-form.

    The second-order Taylor utility of an SGD step is one (see :func:`taylor_game`). Its Shapley
    value gives the diagonal ``M_zz`` to ``z`` and splits each cross term evenly:
    ``φ_z = a_z − ½ Σ_{z'∈B} M_zz'``.

    Attributes:
        a: ``[n]`` float64 linear terms.
        M: ``[n, n]`` float64 symmetric interaction matrix.
    """

    a: Tensor
    M: Tensor

    @property
    def n(self) -> int:
        return self.a.shape[0]

    def utility(self, masks: Tensor) -> Tensor:
        """``[S]`` utilities of ``[S, n]`` bool masks."""
        m = masks.to(self.a.dtype)
        return m @ self.a - 0.5 * ((m @ self.M) * m).sum(dim=1)

    def shapley(self) -> Tensor:
        """``[n]`` closed-form Shapley values ``a − ½ M 1``."""
        return self.a - 0.5 * self.M.sum(dim=1)


def taylor_game(
    model: nn.Module,
    val_loss: ValLoss,
    per_example: Mapping[str, Tensor],
    lr: float | Mapping[str, float],
    *,
    eval_mode: bool = True,
) -> QuadraticGame:
    """The second-order Taylor expansion in the step of an SGD step's utility.

    With ``u_z = η ⊙ g_z`` (per-parameter learning rates allowed), ``g_val`` and ``H`` the
    validation gradient and Hessian at θ::

        U₂(S) = g_val · Σ_{z∈S} u_z − ½ (Σ_{z∈S} u_z)ᵀ H (Σ_{z∈S} u_z)

    so ``a_z = g_val·u_z`` and ``M_zz' = u_zᵀ H u_z'``; ``n`` Hessian-vector products. Its
    Shapley value ``φ_z = g_val·u_z − ½ u_zᵀ H Σ_{z'} u_z'`` is the tracker's ``order=2,
    second_order="hessian"`` value, and the values add up to ``U₂(B)``.
    """
    names = list(trainable_parameters(model))
    u = {n: _lr_of(lr, n) * per_example[n].double() for n in names}
    g_val = validation_gradient(model, val_loss, eval_mode=eval_mode)
    hu = hessian_vector_products(model, val_loss, u, eval_mode=eval_mode)
    a = sum(u[n].flatten(1) @ g_val[n].double().flatten() for n in names)
    M = sum(u[n].flatten(1) @ hu[n].double().flatten(1).T for n in names)
    return QuadraticGame(a=a, M=0.5 * (M + M.T))


# ----------------------------------------------------------------------------- audit
def exact_step_values(
    model: nn.Module,
    example_loss: ExampleLoss,
    batch: Sequence[Tensor],
    val_loss: ValLoss,
    lr: float | Mapping[str, float] | None = None,
    *,
    update: UpdateFn | None = None,
    max_exact: int = 12,
    permutations: int = 1000,
    seed: int = 0,
    eval_mode: bool = True,
    chunk_size: int | None = 32,
) -> ShapleyEstimate:
    """The exact Shapley values of one training step: what to compare a tracker's values with.

    Call it *before* the optimizer step, with the model at the step's parameters and the batch
    the step uses. Batches of up to ``max_exact`` examples are enumerated (2^B validation
    forwards); larger ones are estimated by ``permutations`` Monte-Carlo permutations, with a
    standard error per example.

    Args:
        model: the model at θ_t (float64 recommended).
        example_loss: each example's share of the training loss; see :data:`ExampleLoss`.
        batch: tensors with the examples along dim 0.
        val_loss: ``val_loss(model)``; what the tracker was given.
        lr: SGD learning rate, or name -> learning rate (see :func:`learning_rates`).
        update: instead of ``lr``, any update rule; see :data:`UpdateFn`.
        max_exact: largest batch that is enumerated.
        permutations: permutations for larger batches.
        seed: seed of the permutations.
        eval_mode: evaluate the validation loss in eval mode (the tracker's default).
        chunk_size: see :class:`StepGame`.

    Returns:
        a :class:`ShapleyEstimate`; ``values[i]`` belongs to batch row ``i``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        >>> xv, yv = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        >>> share = lambda f, xr, yr: F.cross_entropy(f(xr), yr) / 6  # batch-mean loss
        >>> result = exact_step_values(model, share, (x, y), lambda m: F.cross_entropy(m(xv), yv), lr=0.1)
        >>> result.method, tuple(result.values.shape)
        ('enumeration', (6,))
        >>> bool(torch.isclose(result.values.sum(), torch.tensor(result.total, dtype=torch.float64)))
        True
    """
    game = StepGame.from_batch(
        model, example_loss, batch, val_loss, lr,
        update=update, eval_mode=eval_mode, chunk_size=chunk_size,
    )
    if game.n > max_exact:
        return monte_carlo_shapley(game.utility, game.n, permutations, seed=seed)
    values = enumerate_shapley(game.utility, game.n)
    full = game.utility(torch.ones(1, game.n, dtype=torch.bool))[0]
    empty = game.utility(torch.zeros(1, game.n, dtype=torch.bool))[0]
    return ShapleyEstimate(
        values=values,
        stderr=torch.zeros_like(values),
        method="enumeration",
        total=float(full - empty),
        evaluations=2**game.n,
    )


# ----------------------------------------------------------------------------- helpers
class LossModule(nn.Module):
    """``forward() = val_loss(model).sum()``, so ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, val_loss: ValLoss) -> None:
        super().__init__()
        self.model = model
        self.val_loss = val_loss

    def forward(self) -> Tensor:
        return self.val_loss(self.model).sum()


def _resolve_update(
    lr: float | Mapping[str, float] | None, update: UpdateFn | None
) -> UpdateFn:
    if (lr is None) == (update is None):
        raise ValueError("give exactly one of lr (plain SGD) and update (any rule)")
    return update if update is not None else sgd_update(lr)
