"""The validation pass: ``g_val`` at the step's linearization point, Hessian-vector products,
and the Gram factors of the layers on the Gram route, cached by parameter version.

Every call of the user's ``val_loss`` goes through :meth:`ValidationPass._evaluate`: eval mode
(or the user's choice), its own random-number stream (the pass must not consume the numbers of
the user's training), and the parameters moved to ``θ + shift`` and restored bit for bit.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NonFiniteValidationLossError, UnsupportedModuleError, ValidationLossError
from ..layers.fallback import inline_checkpoints
from ..layers.linear import GramFactors
from ..modes import evaluating
from ..optim import UpdateRule
from .capture import Hooks, ValidationRecorder
from .config import TrackerConfig
from .entries import Entry
from .params import ParamTable
from .routes import RoutePolicy


@dataclass
class Validation:
    """``g_val`` at one parameter version, per parameter ``[K, *shape]`` (``K`` columns)."""

    version: int
    shifted: bool  # computed at θ + f(0) (the step's data-free point) rather than at θ
    loss: Tensor
    grads: list[Tensor]
    gram: dict[int, GramFactors]  # entry index -> validation factors of the Gram route
    shift: list[Tensor] | None = None  # f(0), kept when a later pass of this step needs it

    @property
    def columns(self) -> int:
        return self.grads[0].shape[0] if self.grads else 1


class ThreadChoice:
    """The intra-op thread count of the validation pass on CPU, chosen by its measured wall time.

    Candidates: torch's current count and one thread. The first passes alternate between them;
    then the faster (median of its last :data:`WINDOW` timings) runs, and every
    :data:`PROBE_EVERY` passes the other is timed once more, so a change of the machine's load
    changes the choice. Why it matters: one validation sequence is ~a thousand small kernels, each
    an OpenMP parallel region that on two threads waits until both are scheduled; with one other
    busy thread on a two-core machine a region waits for a scheduler time slice, and the pass took
    1.5 s on two threads against 60 ms on one (workload R; docs/performance.md).
    """

    WINDOW = 3
    PROBE_EVERY = 16

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.timings: dict[int, list[float]] = {}
        self.passes = 0
        self.last: int | None = None  # the count the last pass ran on (for inspect and the docs)

    def pick(self, device: torch.device) -> int | None:
        """The thread count the next pass runs on (``None``: leave torch's setting alone)."""
        full = torch.get_num_threads()
        if device.type != "cpu" or full == 1 or self.mode == "all":
            return None
        if self.mode == "one":
            return 1
        candidates = (full, 1)
        unmeasured = [c for c in candidates if len(self.timings.get(c, [])) < 2]
        if unmeasured:
            return unmeasured[0]
        best = min(candidates, key=lambda c: statistics.median(self.timings[c][-self.WINDOW:]))
        if self.passes % self.PROBE_EVERY == self.PROBE_EVERY - 1:
            return candidates[1] if best == candidates[0] else candidates[0]
        return best

    @contextlib.contextmanager
    def applied(self, device: torch.device, timed: bool = True) -> Iterator[None]:
        threads = self.pick(device)
        if threads is None:
            yield
            return
        full = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            torch.set_num_threads(full)
        self.last = threads
        if timed and self.mode == "auto":
            self.passes += 1
            key = full if threads == full else 1
            self.timings.setdefault(key, []).append(elapsed)
            del self.timings[key][: -self.WINDOW]


class ValidationPass:
    """Runs ``val_loss`` and keeps its gradient until the parameters change."""

    def __init__(
        self, module: nn.Module, table: ParamTable, entries: list[Entry], hooks: Hooks,
        val_loss: Callable[[nn.Module], Tensor], config: TrackerConfig, rule: UpdateRule, policy: RoutePolicy,
    ) -> None:
        self.module, self.table, self.entries, self.hooks = module, table, entries, hooks
        self.val_loss, self.config, self.rule, self.policy = val_loss, config, rule, policy
        self.captures_gram = policy.captures_gram
        self.version = 0
        self.current: Validation | None = None
        self.threads = ThreadChoice(config.val_threads)
        self._plain_loss: tuple[int, Tensor] | None = None  # (version, L_val summed) at θ unshifted

    def parameters_changed(self) -> None:
        self.version += 1

    def forget(self) -> None:
        self.current = None
        self._plain_loss = None

    def at_step_start(self, step: int) -> Validation:
        """The validation gradient the coming step's values use, at θ_t + f(0).

        ``f(0)`` is the step the optimizer would take with no data (momentum, Adam's first
        moment, weight decay). It depends only on the optimizer's state, so it is known before
        the batch: linearizing the step's data part there instead of at θ_t costs nothing and
        removes the error of the data-free move. For plain SGD ``f(0) = 0``.
        """
        shift = self.rule.data_free_step(self.table.params)
        if shift is None:
            return self.plain(step)
        val = self.current
        if not (val is not None and val.version == self.version and val.shifted):
            self.current = self._pass(shift, step)
        return self.current

    def plain(self, step: int) -> Validation:
        """The validation gradient at the current parameters (cached until they change)."""
        val = self.current
        if val is None or val.version != self.version or val.shifted:
            self.current = self._pass(None, step)
        return self.current

    def loss_here(self, step: int) -> Tensor:
        """``L_val`` summed over its columns at the current parameters (a 0-d tensor on the device):
        from a pass already run at them, else one forward without gradient (cached by version).
        A non-finite loss is a measurement here (the drop row of an update that blew up), not an
        error: the step's own validation pass refuses it."""
        if self._plain_loss is not None and self._plain_loss[0] == self.version:
            return self._plain_loss[1]
        with self.threads.applied(self.table.device, timed=False), torch.no_grad(), \
                self._evaluate(None, None, step, measuring=True) as loss:
            total = loss.detach().sum()
        self._plain_loss = (self.version, total)
        return total

    def _pass(self, shift: list[Tensor] | None, step: int) -> Validation:
        params = self.table.params
        recorder = ValidationRecorder(self.entries) if self.captures_gram else None
        with self.threads.applied(self.table.device), self._evaluate(shift, recorder, step) as loss:
            if loss.dim() == 1 and recorder is not None:
                recorder.discard()  # per-validation columns use the vector route
                recorder = None
            if loss.dim() == 0:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [(g if g is not None else torch.zeros_like(p)).unsqueeze(0) for g, p in zip(grads, params)]
            else:
                grads = _per_validation_grads(loss, params)
            grads = [g.detach() for g in grads]
        if shift is None:
            self._plain_loss = (self.version, loss.detach().sum())
        gram: dict[int, GramFactors] = {}
        if recorder is not None:
            for idx, calls in recorder.complete_calls().items():
                entry = self.entries[idx]
                factors = entry.handler.validation_gram(entry.module, calls)
                if entry.residual_from:
                    rows = recorder.rows_of(entry.residual_from, self.entries)
                    total = grads[entry.row("weight")][0]
                    factors = entry.handler.gram_residual(entry.module, total, factors, rows.to(total.device))
                if self.policy.keep_gram(entry, factors):
                    gram[idx] = factors
        keep_shift = self.config.order == 2 and self.config.second_order == "hessian"
        return Validation(self.version, shift is not None, loss.detach(), grads, gram, shift if keep_shift else None)

    def hessian_vector_products(self, direction: list[Tensor], shift: list[Tensor] | None, step: int) -> list[Tensor]:
        """Per parameter ``[K, *shape]``: ``H_k · direction`` for each validation column ``k``,
        with ``H`` at ``θ + shift`` (where the step's first-order term is linearized)."""
        params = self.table.params
        hvps: list[list[Tensor]] = []
        # Fused attention kernels have no double backward: the math backend computes the same
        # attention and can be differentiated twice.
        with self.threads.applied(self.table.device, timed=False), _math_attention(), \
                self._evaluate(shift, None, step) as loss:
            columns = [loss] if loss.dim() == 0 else list(loss)
            for k, column in enumerate(columns):
                g = torch.autograd.grad(column, params, create_graph=True, allow_unused=True)
                used = [(gi, d) for gi, d in zip(g, direction) if gi is not None and gi.requires_grad]
                try:
                    hv = torch.autograd.grad(
                        [gi for gi, _ in used], params, grad_outputs=[d for _, d in used],
                        retain_graph=k + 1 < len(columns), allow_unused=True,
                    )
                except RuntimeError as exc:
                    if "not implemented" not in str(exc):
                        raise
                    raise UnsupportedModuleError(
                        f"second_order='hessian' needs a double backward through the validation "
                        f"loss, and an op of this model has none ({exc}). Use "
                        "second_order='trapezoid' (no Hessian), or an implementation with a double "
                        "backward, e.g. attn_implementation='eager' for Hugging Face attention."
                    ) from exc
                hvps.append([(h if h is not None else torch.zeros_like(p)).detach() for h, p in zip(hv, params)])
        return [torch.stack([col[i] for col in hvps]) for i in range(len(params))]

    @contextlib.contextmanager
    def _evaluate(
        self, shift: list[Tensor] | None, recorder: ValidationRecorder | None, step: int, measuring: bool = False,
    ) -> Iterator[Tensor]:
        """``val_loss`` of the model at ``θ + shift``, checked, in the validation mode and RNG."""
        params = self.table.params
        with _parameters_shifted(params, shift), evaluating(self.module, self.config.val_mode == "eval"), \
                _fork_rng(params):
            with self.hooks.recording(recorder), inline_checkpoints():
                loss = self.val_loss(self.module)
            yield _check_val_loss(loss, step, measuring)


def _check_val_loss(loss: Any, step: int, measuring: bool = False) -> Tensor:
    """``measuring``: a loss read without gradient for the drop rows, which record NaN as it is."""
    if not isinstance(loss, Tensor):
        raise ValidationLossError(
            f"val_loss(model) must return a tensor (a scalar, or a vector of per-validation-"
            f"example losses), got {type(loss).__name__}"
        )
    if loss.dim() > 1:
        raise ValidationLossError(
            f"val_loss(model) returned shape {tuple(loss.shape)}; expected a scalar or a 1-D "
            "vector of per-validation-example losses"
        )
    if loss.dim() == 1 and loss.numel() == 0:
        raise ValidationLossError("val_loss(model) returned an empty vector")
    if not measuring and not loss.requires_grad:
        raise ValidationLossError(
            "val_loss(model) returned a tensor without a gradient: compute it from the model's "
            "output without torch.no_grad() (the tracker needs its gradient)"
        )
    if not measuring and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteValidationLossError(
            f"step {step}: val_loss(model) is not finite: {loss.detach()}. The parameters or the "
            "validation data hold NaN/Inf (a learning rate too large diverges)."
        )
    return loss


def _per_validation_grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """Per parameter ``[V, *shape]``: the gradient of each validation loss."""
    V = loss.shape[0]
    try:
        eye = torch.eye(V, dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(
            loss, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=True
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(loss[v], params, retain_graph=v + 1 < V, allow_unused=True)
            for v in range(V)
        ]
        # A column may not reach every parameter another column reaches: its row is zero there.
        grads = tuple(
            None
            if all(r[i] is None for r in rows)
            else torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows])
            for i, p in enumerate(params)
        )
    return [
        g if g is not None else torch.zeros((V, *p.shape), dtype=p.dtype, device=p.device)
        for g, p in zip(grads, params)
    ]


@contextlib.contextmanager
def _parameters_shifted(params: list[nn.Parameter], shift: list[Tensor] | None) -> Iterator[None]:
    """Parameters moved to ``θ + shift`` inside the block, restored bit for bit after it."""
    if shift is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.add_(s.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` restricted to its math backend (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to restrict
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _fork_rng(params: list[nn.Parameter]) -> Iterator[None]:
    """The validation pass must not consume the random numbers of the user's training."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield
