"""``InRunShapley``: In-Run Data Shapley values computed inside the user's own training loop.

One optimizer step, as the tracker sees it::

    tracker.step(ids).__enter__   validation pass if the parameters changed: g_val at θ_t + f(0),
                                  where the step lands with no data (θ_t for plain SGD; momentum,
                                  Adam's first moment and weight decay move it), and the Gram
                                  factors of layers that use the Gram route
    user's forward                forward hooks keep each tracked layer's inputs
    user's backward               output-gradient hooks form per-example dot products per layer
    tracker.step(ids).__exit__    consistency data: gradient norms, Σ_z dots vs <grad, g_val>
    optimizer.step() pre-hook     learning rates, clip factors; checks (one host sync per step)
    optimizer.step() post-hook    values added to the ledger by example id

All state lives in the tracker, keyed by module: nothing is stored on the user's modules,
parameters or optimizer, and :meth:`InRunShapley.close` leaves them exactly as they were.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import shapley
from .errors import (
    BatchMismatchError,
    ConsistencyError,
    InRunError,
    NonFiniteError,
    StepOrderError,
    UnsupportedModuleError,
    ValidationLossError,
)
from .integrations.ddp import DDP_CHECK_HINT, DDPSync
from .layers import FALLBACK, LayerHandler, Layout, handler_for
from .layers.linear import GramFactors, gram_dot, residual_rows
from .layers.norm import batchnorm_message
from .layers.registry import expand_leading
from .ledger import ValueLedger, ValueTable, check_ids
from .modes import evaluating
from .optim import ADAM_LINEARIZATIONS, UpdateRule, rule_for, unwrap_optimizer

logger = logging.getLogger(__name__)

ORDERS = (1, 2)
SECOND_ORDER_VARIANTS = ("trapezoid", "hessian")
ROUTES = ("auto", "vector", "gram", "bookkeeping")
VAL_MODES = ("eval", "train")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class TrackerConfig:
    """Settings of an :class:`InRunShapley` tracker; every field is validated on creation."""

    order: int = 1
    """1: first order ``η g_val·g_z``; 2: adds the interaction with the rest of the batch."""
    second_order: str = "trapezoid"
    """Order-2 variant: ``"trapezoid"`` (g_val at θ_t and θ_t+1) or ``"hessian"`` (one HVP)."""
    route: str = "auto"
    """Per-layer route: ``"auto"`` picks the cheapest allowed route per layer and call; or force
    ``"vector"``, ``"gram"`` or ``"bookkeeping"`` wherever a layer supports it (for tests)."""
    check: bool = True
    """Check every step that Σ_z of the per-example dots equals ``<grad, g_val>`` per parameter."""
    check_rtol: float | None = None
    """Relative tolerance of that check; default by dtype (float64 1e-6, float32 1e-3, else 5e-2)."""
    on_nonfinite: str = "raise"
    """NaN/Inf gradient or value at ``optimizer.step()``: ``"raise"`` (from the pre-step hook, so
    the update is not applied), or ``"skip"``: the step's values are dropped and the skip is
    recorded, but the optimizer still applies the step. To drop the update too, check the loss
    in your loop and call :meth:`InRunShapley.skip_step` instead of ``optimizer.step()``."""
    val_mode: str = "eval"
    """Module mode during the validation pass: ``"eval"`` (no dropout) or ``"train"``."""
    keep_trace: bool = False
    """Keep one row per (step, example) with both value parts and the learning rate."""
    bookkeeping: bool = False
    """Allow the book-keeping route for Linear/Conv1D layers where it is cheaper: per-example
    weight gradients formed instead of autograd's weight-gradient GEMM (no extra FLOPs). The
    update then equals the untracked one within float32 rounding instead of bit for bit."""
    adam: str = "secant"
    """Adam/AdamW linearization: ``"secant"`` (actual step / gradient) or ``"fixed_state"``."""
    proxy: str | None = None
    """``"sgd"``: value every step with ``η g_val·g_z`` whatever the optimizer (the paper's proxy)."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: Sequence[Any]) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is not one of {tuple(allowed)}")

        if self.order not in ORDERS:
            raise bad("order", ORDERS)
        if self.second_order not in SECOND_ORDER_VARIANTS:
            raise bad("second_order", SECOND_ORDER_VARIANTS)
        if self.route not in ROUTES:
            raise bad("route", ROUTES)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise bad("on_nonfinite", NONFINITE_POLICIES)
        if self.val_mode not in VAL_MODES:
            raise bad("val_mode", VAL_MODES)
        if self.adam not in ADAM_LINEARIZATIONS:
            raise bad("adam", ADAM_LINEARIZATIONS)
        if self.proxy not in (None, "sgd"):
            raise bad("proxy", (None, "sgd"))
        if self.check_rtol is not None and not (0 < self.check_rtol < 1):
            raise ValueError(f"check_rtol={self.check_rtol!r} must be in (0, 1)")


@dataclass
class _Entry:
    """A tracked module: its handler and where its parameters sit in the tracker's list."""

    index: int
    name: str
    module: nn.Module
    handler: LayerHandler
    param_names: tuple[str, ...]
    param_index: tuple[int, ...]
    gram_capable: bool
    route: str = "unused"
    residual_from: tuple[int, ...] = ()  # embeddings sharing this layer's weight (tied LM head)


@dataclass
class _Capture:
    """One forward call of a tracked module inside a step."""

    entry: _Entry
    saved: Any
    microbatch: _MicroBatch
    grad: Tensor | None = None
    fired: bool = False
    versions: list[tuple[Tensor, int]] = field(default_factory=list)


@dataclass
class _MicroBatch:
    ids: list
    size: int
    dots: Tensor | None = None  # [P, B, K] float64: dots with g_val(θ_t)
    captures: list[_Capture] = field(default_factory=list)
    fired: int = 0
    batched_seen: bool = False
    low_precision: bool = False


@dataclass
class _Window:
    """Everything between two optimizer steps (one or several micro-batches)."""

    step: int
    micro: list[_MicroBatch] = field(default_factory=list)
    poisoned: str | None = None
    exit_norms: Tensor | None = None
    check_terms: tuple[Tensor, Tensor, Tensor] | None = None
    coef: Tensor | None = None
    multipliers: list[Any] = field(default_factory=list)  # per parameter: c_p, or −ratio·D_p
    base_values: Tensor | None = None  # order 2 trapezoid: the values at the data part's start
    first: np.ndarray | None = None
    second: np.ndarray | None = None
    skip_reason: str | None = None
    lr: float | None = None

    @property
    def ids(self) -> list:
        return [i for mb in self.micro for i in mb.ids]

    def dots(self) -> Tensor:
        return torch.cat([mb.dots for mb in self.micro], dim=1)


@dataclass
class _Validation:
    version: int
    shifted: bool  # computed at θ + f(0) (the step's data-free point) rather than at θ
    loss: Tensor
    grads: list[Tensor]  # per parameter [K, *shape]
    gram: dict[int, GramFactors]  # entry index -> validation factors of the Gram route

    @property
    def columns(self) -> int:
        return self.grads[0].shape[0] if self.grads else 1


@dataclass
class Coverage:
    """Which route valued each trainable parameter, by name and as a fraction of parameters."""

    routes: dict[str, list[str]]
    numel: dict[str, int]

    @property
    def fraction(self) -> dict[str, float]:
        total = sum(self.numel.values()) or 1
        return {r: n / total for r, n in self.numel.items()}

    def __str__(self) -> str:
        lines = [f"{'route':<22}{'params':>8}{'elements':>14}{'share':>9}"]
        for r in sorted(self.routes):
            lines.append(
                f"{r:<22}{len(self.routes[r]):>8}{self.numel[r]:>14,}{self.fraction[r]:>9.1%}"
            )
        return "\n".join(lines)


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel."""
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    return inner


class InRunShapley:
    """In-Run Data Shapley values of every training example, computed during training.

    Wrap the forward and backward of each step in ``with tracker.step(ids):`` and call your own
    ``optimizer.step()`` as usual. At every optimizer step each example in the batch gets
    ``φ_z = η · g_val · g_z`` (order 1, helpful = positive), where ``g_z`` is the gradient of the
    example's share of the loss you back-propagated and ``g_val`` the gradient of ``val_loss`` at
    the same parameters; values add up by id over the run. Per-example gradients of the whole
    model are never formed: each layer contributes exact dot products from its inputs and
    output gradients.

    Args:
        model: the model being trained (may be wrapped in DistributedDataParallel).
        optimizer: its optimizer (see :mod:`inrun.optim` for what is supported).
        val_loss: ``val_loss(model) -> Tensor``: a scalar validation loss, or a vector of
            per-validation-example losses (their sum is the utility, and a per-(train,
            validation) table is kept). Called in ``eval`` mode at the current parameters.
        order: 1 or 2.
        second_order: ``"trapezoid"`` or ``"hessian"`` (order 2 only).
        **options: any other :class:`TrackerConfig` field.

    Example:
        >>> tracker = InRunShapley(model, opt, val_loss=lambda m: loss_fn(m(xv), yv))  # doctest: +SKIP
        >>> for ids, x, y in loader:                                                  # doctest: +SKIP
        ...     with tracker.step(ids):
        ...         loss_fn(model(x), y).backward()
        ...     opt.step(); opt.zero_grad()
        >>> tracker.values().top(5)                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        val_loss: Callable[[nn.Module], Tensor],
        *,
        order: int = 1,
        second_order: str = "trapezoid",
        ledger: ValueLedger | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(val_loss):
            raise TypeError("val_loss must be a callable taking the model and returning a loss")
        self.config = TrackerConfig(order=order, second_order=second_order, **options)
        self.model = model
        self.module = _unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        self.rule: UpdateRule = rule_for(self.optimizer, proxy=self.config.proxy, adam=self.config.adam)
        if self.rule.elementwise and self.config.order == 2 and self.config.second_order == "hessian":
            raise ValueError(
                f"second_order='hessian' is defined for SGD-type steps; for {type(self.optimizer).__name__} "
                "use second_order='trapezoid' (g_val averaged at θ + f(0) and at θ_t+1)"
            )
        self.val_loss = val_loss
        self.ledger = ledger if ledger is not None else ValueLedger(keep_trace=self.config.keep_trace)
        self._enabled = True

        self._params: list[nn.Parameter] = []
        self._param_names: list[str] = []
        index: dict[int, int] = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                index[id(p)] = len(self._params)
                self._params.append(p)
                self._param_names.append(name)
        if not self._params:
            raise InRunError("the model has no trainable parameters (requires_grad=True)")
        self._index = index
        self._entries = self._build_entries()
        self._check_optimizer_covers_params()
        self._batchnorms = [
            m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._distributed = isinstance(model, nn.parallel.DistributedDataParallel)
        # DDP (see inrun.integrations.ddp): its process group; None for a single process.
        self._ddp: DDPSync | None = DDPSync.of(model) if self._distributed else None

        self._mode: str | None = None  # None | "train" | "val"
        self._microbatch: _MicroBatch | None = None
        self._window: _Window | None = None
        self._pending: _Window | None = None  # trapezoid: waits for g_val(θ_t+1)
        self._val: _Validation | None = None
        self._val_gram: dict[int, list[tuple[Tensor, Tensor | None]]] = {}
        self._val_hooks: list[Any] = []
        self._version = 0
        self.step_count = 0

        self._bookkeeping_calls: set[int] = set()
        self._residual_sources = {i for e in self._entries for i in e.residual_from}
        self._val_ids: dict[int, list[Tensor]] = {}
        self._bookkeeping_entries: dict[int, _Entry] = {}
        self._forward_overrides: list[tuple[nn.Module, Any]] = []
        if self.config.bookkeeping or self.config.route == "bookkeeping":
            for entry in self._entries:
                if entry.handler.supports_bookkeeping:
                    self._install_bookkeeping(entry)

        self._handles: list[Any] = []
        for entry in self._entries:
            self._handles.append(
                entry.module.register_forward_hook(
                    self._make_forward_hook(entry), with_kwargs=True
                )
            )
        self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._post_step))

    # ------------------------------------------------------------------ setup
    def _build_entries(self) -> list[_Entry]:
        owners: dict[int, list[nn.Module]] = {}
        for m in self.module.modules():
            for _, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(m)
        entries = []
        for name, module in self.module.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            handler = handler_for(module) or FALLBACK
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                handler.check(module)  # BatchNorm's mode is checked at every step instead
            weight = dict(own).get("weight")
            entries.append(
                _Entry(
                    index=len(entries),
                    name=name or type(module).__name__,
                    module=module,
                    handler=handler,
                    param_names=tuple(n for n, _ in own),
                    param_index=tuple(self._index[id(p)] for _, p in own),
                    gram_capable=handler.supports_gram and weight is not None and len(owners[id(weight)]) == 1,
                )
            )
            if handler is FALLBACK:
                logger.info("no handler for %s (%s): using the torch.func fallback", name, type(module).__name__)
        # A weight shared only with embeddings (a tied LM head) can use the Gram route too: the
        # embeddings add validation gradient only in the rows of the validation tokens.
        by_module = {id(e.module): e for e in entries}
        for e in entries:
            weight = getattr(e.module, "weight", None)
            if not e.handler.supports_gram or weight is None or "weight" not in e.param_names or e.gram_capable:
                continue
            others = [by_module.get(id(m)) for m in owners[id(weight)] if m is not e.module]
            if others and all(o is not None and o.handler.name == "embedding" for o in others):
                e.gram_capable = True
                e.residual_from = tuple(o.index for o in others)
        return entries

    def _check_optimizer_covers_params(self) -> None:
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in zip(self._param_names, self._params) if id(p) not in in_opt]
        if missing:
            logger.warning(
                "%d trainable parameters are not in the optimizer and get no value: %s",
                len(missing),
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )

    # ------------------------------------------------------------------ public API
    @contextlib.contextmanager
    def step(self, ids: Any) -> Iterator[InRunShapley]:
        """Value the examples of one (micro-)batch: run its forward and backward inside.

        Args:
            ids: one id (``int`` or ``str``) per row of the batch, in batch order.
        """
        if not self.enabled:
            yield self
            return
        if self._microbatch is not None:
            raise StepOrderError("tracker.step() blocks cannot be nested")
        id_list = check_ids(ids)
        if not id_list:
            raise BatchMismatchError("tracker.step() needs at least one id")
        for bn in self._batchnorms:
            if bn.training:
                raise UnsupportedModuleError(batchnorm_message(bn))
        self._begin_microbatch(id_list)
        mb = self._microbatch
        try:
            self._mode = "train"
            yield self
        except BaseException as exc:
            self._mode = None
            self._microbatch = None
            if self._window is not None:
                self._window.poisoned = f"{type(exc).__name__} inside tracker.step()"
            raise
        self._mode = None
        self._microbatch = None
        self._end_microbatch(mb)

    @property
    def enabled(self) -> bool:
        """While ``False``, steps are not valued (``tracker.step`` does nothing) and
        ``optimizer.step()`` needs no ``tracker.step`` block: e.g. warm-up steps left out."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self._enabled and not value:
            if self._microbatch is not None or (self._window is not None and self._window.micro):
                raise StepOrderError("tracking can only be switched off between optimizer steps")
            self.flush()
        self._enabled = bool(value)

    def skip_step(self, reason: str) -> None:
        """Drop the current step without valuing it, recorded with ``reason`` in the ledger.

        Call it between the ``tracker.step`` block(s) and where ``optimizer.step()`` would be,
        when your loop decides not to apply this step (NaN loss, a ``GradScaler`` overflow),
        then zero the gradients yourself. The step number is consumed, as the step was.
        """
        if self._microbatch is not None:
            raise StepOrderError("skip_step() must be called after the tracker.step() block, not inside it")
        window = self._window
        self._window = None
        self.ledger.record_skip(window.step if window is not None else self.step_count, reason)
        self.step_count += 1

    def values(self) -> ValueTable:
        """id -> accumulated value (float64). Completes a pending order-2 step first.

        With a DDP model this is the global table, merged over ranks by example id, and a
        collective call: every rank must call it (see :meth:`global_ledger`).
        """
        return self.global_ledger().values()

    def per_validation(self) -> tuple[list, np.ndarray] | None:
        """``(ids, [N, V])`` per-(train, validation) values when ``val_loss`` returns a vector.

        With a DDP model: global, and a collective call like :meth:`values`.
        """
        return self.global_ledger().per_validation()

    def global_ledger(self) -> ValueLedger:
        """The ledger of the whole run: ``self.ledger`` in one process; with a DDP model, the
        ledgers of every rank merged by example id (``self.ledger`` holds only this rank's
        examples). Under DDP this is a collective: call it on every rank (each gets the merged
        ledger), e.g. ``ledger = tracker.global_ledger()`` then save it on rank 0.
        """
        self.flush()
        if self._ddp is None:
            return self.ledger
        return self._ddp.gather_ledger(self.ledger)

    def flush(self) -> None:
        """Finish a step still waiting for ``g_val(θ_t+1)`` (trapezoid) at the current parameters."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish_trapezoid(pending, self._plain_validation())

    def coverage(self) -> Coverage:
        """Which route (Gram, vector by layer family, book-keeping, fallback) valued each trainable
        parameter. A parameter shared by several modules (a tied embedding and LM head) is listed
        under the routes of all its uses joined by ``+``."""
        by_param: dict[int, list[str]] = {}
        for e in self._entries:
            route = e.route if e.route != "unused" else "not reached yet"
            for i in e.param_index:
                if route not in by_param.setdefault(i, []):
                    by_param[i].append(route)
        routes: dict[str, list[str]] = {}
        numel: dict[str, int] = {}
        for i, used in sorted(by_param.items()):
            label = "+".join(used)
            routes.setdefault(label, []).append(self._param_names[i])
            numel[label] = numel.get(label, 0) + self._params[i].numel()
        return Coverage(routes, numel)

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings to checkpoint beside ``self.ledger`` (saved as Parquet).

        Only valid between optimizer steps; a pending order-2 step is completed first (at the
        current parameters, which the resumed run would use anyway, so values are unchanged).
        """
        if self._microbatch is not None or (self._window is not None and self._window.micro):
            raise StepOrderError("a checkpoint must be taken between optimizer steps, not inside one")
        self.flush()
        return {"step_count": self.step_count, "config": asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any], ledger: ValueLedger | None = None) -> None:
        """Restore :meth:`state_dict` (and optionally the ledger saved with it)."""
        saved = TrackerConfig(**state["config"])
        if saved != self.config:
            raise InRunError(f"checkpoint was made with {saved}, this tracker has {self.config}")
        self.step_count = int(state["step_count"])
        if ledger is not None:
            self.ledger = ledger
        self._val = None

    def close(self) -> None:
        """Finish pending work and remove every hook; the model and optimizer are left as found."""
        with contextlib.suppress(InRunError):
            self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, previous in self._forward_overrides:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._forward_overrides.clear()
        self._enabled = False

    def __enter__(self) -> InRunShapley:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ step lifecycle
    @property
    def _defer(self) -> bool:
        """Keep per-example factors until a vector known only later (order 2, Adam) arrives."""
        return self.config.order == 2 or self.rule.elementwise

    @property
    def _immediate(self) -> bool:
        """Dot products with the step's validation gradient during backward (SGD-type rules)."""
        return not self.rule.elementwise

    def _begin_microbatch(self, ids: list) -> None:
        window = self._window
        if window is not None and window.micro and self._grads_all_none():
            # The previous micro-batches were zeroed away without an optimizer step
            # (e.g. GradScaler skipped it): nothing they computed was applied.
            self._skip_window(window, "gradients were zeroed without an optimizer step")
            window = self._window = None
        if window is None:
            self._ensure_validation()
            self._check_grads_zero()
            window = self._window = _Window(step=self.step_count)
        self._microbatch = _MicroBatch(ids=ids, size=len(ids))

    def _end_microbatch(self, mb: _MicroBatch) -> None:
        window = self._window
        assert window is not None
        if mb.fired == 0:
            window.poisoned = "no backward pass reached a tracked layer inside tracker.step()"
            raise StepOrderError(
                "no backward pass reached a tracked layer inside tracker.step(ids): call "
                "loss.backward() inside the `with tracker.step(ids):` block"
            )
        if mb.dots is None:
            mb.dots = torch.zeros(
                len(self._params), mb.size, self._val.columns, dtype=torch.float64,
                device=self._params[0].device,
            )
        window.micro.append(mb)
        grads = [p.grad for p in self._params]
        with torch.no_grad():
            window.exit_norms = _norms(grads, self._params)
            if self.config.check and self._immediate:
                window.check_terms = self._check_terms(window, grads)

    def _check_terms(self, window: _Window, grads: list[Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
        """Per parameter: Σ_z dots, <grad, g_val> and a scale for the tolerance (no host sync)."""
        ours = torch.stack([mb.dots.sum(dim=(1, 2)) for mb in window.micro]).sum(dim=0)
        spread = torch.stack([mb.dots.sum(dim=2).abs().sum(dim=1) for mb in window.micro]).sum(0)
        present = [i for i, g in enumerate(grads) if g is not None]
        theirs = torch.zeros_like(ours)
        scale = torch.zeros_like(ours)
        if present:
            g_list = [grads[i].reshape(-1) for i in present]
            v_list = [_column_sum(self._val.grads[i]).reshape(-1).to(g_list[k].dtype) for k, i in enumerate(present)]
            dots = torch.stack([torch.dot(g, v) for g, v in zip(g_list, v_list)]).to(ours)
            index = torch.tensor(present, device=ours.device)
            # the gradients' norms were just taken for clip detection (window.exit_norms)
            norms = window.exit_norms.to(ours)[index] * torch.stack(torch._foreach_norm(v_list)).to(ours)
            theirs[index] = dots
            scale[index] = norms
        return ours, theirs, scale + spread

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.enabled:
            return
        window = self._window
        if self._microbatch is not None:
            raise StepOrderError("optimizer.step() was called inside a tracker.step() block")
        if window is None or not window.micro:
            if window is not None and window.poisoned:
                window.skip_reason = window.poisoned
                return
            raise StepOrderError(
                "optimizer.step() was called with no `with tracker.step(ids):` block since the "
                "last step, so the update has no examples to credit. Wrap the forward/backward "
                "in tracker.step(ids), or set tracker.enabled = False to train untracked."
            )
        if window.poisoned:
            window.skip_reason = window.poisoned
            return
        grads = [p.grad for p in self._params]
        with torch.no_grad():
            # Clipping or unscaling between backward and the step multiplies each gradient by a
            # factor: the optimizer sees x_S = ratio · Σ_S g_z.
            ratio = _ratios(_norms(grads, self._params), window.exit_norms)
            if self._ddp is not None:
                # DDP averages over ranks: each rank's example adds g_z / W to the update.
                ratio = ratio / self._ddp.world_size
            base = None
            if self.rule.elementwise:
                slopes = self.rule.slopes(self._params, grads)
                window.multipliers = [
                    None if s is None else s * (-ratio[i]).to(s.dtype) for i, s in enumerate(slopes)
                ]
                dots = self._contract(window, self._weighted(window.multipliers, self._val.grads))
                window.check_terms = self._deferred_check_terms(dots, grads, ratio, window.multipliers)
                first = dots.sum(dim=0)
            else:
                base = self.rule.scalar_coefficients(self._params).to(ratio.device)
                window.coef = base * ratio
                window.multipliers = list(window.coef)
                if self._ddp is not None and window.check_terms is not None:
                    # the check's terms become the group's: one all-reduce per step
                    window.check_terms = self._ddp.reduce_check_terms(window.check_terms)
                first = shapley.first_order(window.coef, window.dots())
        second = None
        if self.config.order == 2:
            if self.config.second_order == "hessian":
                second = self._hessian_correction(window, base, grads)
            else:
                window.base_values = first  # the data part's start: g_val at θ_t + f(0)
        self._finalize_checks(window, first, second)

    def _weighted(self, multipliers: list[Any], vectors: list[Tensor]) -> list[Tensor]:
        """Per parameter ``multiplier ⊙ vector``, ``[K, *shape]``: the multiplier is a 0-dim tensor
        (SGD-type coefficient), a per-coordinate tensor (Adam's slope) or ``None`` (no step).
        Stays on the device: no host sync."""
        out = []
        for m, v in zip(multipliers, vectors):
            if m is None:
                out.append(torch.zeros_like(v))
            else:
                m = m.to(device=v.device, dtype=v.dtype)
                out.append((m.unsqueeze(0) if m.dim() > 0 else m) * v)
        return out

    def _deferred_check_terms(
        self, dots: Tensor, grads: list[Tensor | None], ratio: Tensor, multipliers: list[Tensor | None]
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The consistency check for values contracted at the step: Σ_z dots vs <g_B, W>.

        ``p.grad / ratio`` is the sum of the per-example gradients over the (global) batch, so
        under DDP this rank's sums are added over the ranks (one all-reduce)."""
        if not self.config.check:
            return None
        ours = dots.sum(dim=(1, 2))
        spread = dots.sum(dim=2).abs().sum(dim=1)
        theirs, scale = torch.zeros_like(ours), torch.zeros_like(ours)
        present = [i for i, (g, m) in enumerate(zip(grads, multipliers)) if g is not None and m is not None]
        if present:
            # <p.grad / ratio, W> in the parameter dtype (the check's tolerance is far above its rounding)
            g_list = [grads[i].reshape(-1) for i in present]
            w_list = [(multipliers[i].to(self._val.grads[i].dtype) * _column_sum(self._val.grads[i])).reshape(-1).to(g_list[k].dtype)
                      for k, i in enumerate(present)]
            r = ratio[present].to(ours)
            inv = torch.where(r > 0, 1 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
            index = torch.tensor(present, device=ours.device)
            theirs[index] = torch.stack([torch.dot(g, w) for g, w in zip(g_list, w_list)]).to(ours) * inv
            scale[index] = (torch.stack(torch._foreach_norm(g_list)).to(ours) * inv
                            * torch.stack(torch._foreach_norm(w_list)).to(ours))
        if self._ddp is not None:
            ours, spread = self._ddp.sum_over_ranks(torch.stack([ours, spread]))
        return ours, theirs, scale + spread

    def _finalize_checks(self, window: _Window, first: Tensor, second: Tensor | None) -> None:
        """One host transfer per step: values, and the flags that say whether to keep them."""
        parts = [first, second, *(window.check_terms or ()), torch.isfinite(window.exit_norms).all()]
        present = [t for t in parts if t is not None]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in present]).cpu().numpy()
        pieces, start = [], 0
        for t in present:
            pieces.append(flat[start : start + t.numel()].reshape(t.shape))
            start += t.numel()
        host = [pieces.pop(0)]
        if second is not None:
            host.append(pieces.pop(0))
        norms_finite = bool(pieces.pop())
        if window.check_terms is not None:
            ours, theirs, scale = pieces
            low = any(mb.low_precision for mb in window.micro)
            rtol = self.config.check_rtol or _default_rtol(torch.bfloat16 if low else self._params[0].dtype)
            bad = np.abs(ours - theirs) > rtol * scale + 1e-30
            finite = np.isfinite(ours).all() and np.isfinite(theirs).all()
        else:
            bad = np.zeros(0, dtype=bool)
            finite = True
        finite = finite and norms_finite and all(np.isfinite(h).all() for h in host)
        if not finite:
            reason = "non-finite gradient or value"
            if self.config.on_nonfinite == "raise":
                window.poisoned = reason
                raise NonFiniteError(
                    f"step {window.step}: {reason} (NaN/Inf in the loss or gradients). The "
                    "parameters were not updated by this tracker's step hook. Pass "
                    "on_nonfinite='skip' to record such steps as skipped and continue."
                )
            window.skip_reason = reason
            return
        if bad.any():
            names = [self._param_names[i] for i in np.flatnonzero(bad)[:5]]
            raise ConsistencyError(
                f"step {window.step}: the per-example values of parameter(s) {names} do not add "
                "up to the gradient autograd computed. A parameter is used outside the forward "
                "of the module that owns it, examples interact inside the model, or the "
                "gradients were modified (e.g. zero_grad(set_to_none=False) between micro-batches)."
                + (DDP_CHECK_HINT if self._ddp is not None else "")
            )
        window.first = host[0]
        window.second = host[1] if second is not None else None
        window.lr = float(self.optimizer.param_groups[0]["lr"])

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._version += 1  # the parameters changed: any cached validation gradient is stale
        window = self._window
        if not self.enabled or window is None:
            return
        self._window = None
        self.step_count += 1
        if window.skip_reason is not None:
            self.ledger.record_skip(window.step, window.skip_reason)
            return
        if self.config.order == 2 and self.config.second_order == "trapezoid":
            self._pending = window
            return
        self.ledger.add(window.step, window.ids, window.first, window.second, lr=window.lr)
        window.micro.clear()

    def _skip_window(self, window: _Window, reason: str) -> None:
        self.ledger.record_skip(window.step, reason)
        self.step_count += 1
        logger.warning("step %d not valued: %s", window.step, reason)

    # ------------------------------------------------------------------ validation pass
    def _ensure_validation(self) -> None:
        """The validation gradient the coming step's values use, at θ_t + f(0).

        ``f(0)`` is the step the optimizer would take with no data (momentum, Adam's first
        moment, weight decay). It depends only on the optimizer's state, so it is known before
        the batch: linearizing the step's data part there instead of at θ_t costs nothing and
        removes the error of the data-free move. For plain SGD ``f(0) = 0``.
        """
        self.flush()
        shift = self.rule.data_free_step(self._params)
        if shift is None:
            self._val = self._plain_validation()
        elif not (self._val is not None and self._val.version == self._version and self._val.shifted):
            self._val = self._validation_pass(shift)

    def _plain_validation(self) -> _Validation:
        """The validation gradient at the current parameters (cached until they change)."""
        if self._val is None or self._val.version != self._version or self._val.shifted:
            self._val = self._validation_pass()
        return self._val

    def _validation_gradients(self, capture_gram: bool) -> tuple[Tensor, list[Tensor]]:
        """``(loss, per parameter [K, *shape])`` at the current parameters (eval mode)."""
        params = self._params
        self._val_gram = {}
        with evaluating(self.module, self.config.val_mode == "eval"), _fork_rng(params):
            self._mode = "val" if capture_gram else None
            try:
                loss = self.val_loss(self.module)
            finally:
                self._mode = None
            loss = _check_val_loss(loss)
            if loss.dim() == 1:
                # Per-validation columns use the vector route: drop the Gram captures.
                for handle in self._val_hooks:
                    handle.remove()
                self._val_gram = {}
            self._val_hooks = []
            if loss.dim() == 0:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [
                    (g if g is not None else torch.zeros_like(p)).unsqueeze(0)
                    for g, p in zip(grads, params)
                ]
            else:
                grads = _per_validation_grads(loss, params)
        return loss.detach(), [g.detach() for g in grads]

    def _validation_pass(self, shift: list[Tensor] | None = None) -> _Validation:
        """Validation gradients (and Gram factors) at θ, or at θ + shift with the parameters
        restored bit for bit afterwards."""
        with _parameters_shifted(self._params, shift):
            loss, grads = self._validation_gradients(capture_gram=self.config.route != "vector")
        gram: dict[int, GramFactors] = {}
        if grads[0].shape[0] == 1:
            for idx, calls in self._val_gram.items():
                if any(d is None for _, d in calls):
                    continue
                entry = self._entries[idx]
                dtype = entry.module.weight.dtype  # autocast leaves 16-bit activations and gradients
                A = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in calls]).to(dtype)
                D = torch.cat([d.reshape(-1, d.shape[-1]) for _, d in calls]).to(dtype)
                gram[idx] = GramFactors(A, D)
                if entry.residual_from:
                    gram[idx] = self._with_residual(entry, gram[idx], grads)
        self._val_gram, self._val_ids = {}, {}
        for entry in self._entries:
            if self._choose_route(entry, gram) != "gram":
                gram.pop(entry.index, None)
        return _Validation(self._version, shift is not None, loss, grads, gram)

    def _with_residual(self, entry: _Entry, factors: GramFactors, grads: list[Tensor]) -> GramFactors:
        """Complete a tied weight's factors with its embeddings' rows (the validation tokens)."""
        ids = []
        for src in entry.residual_from:
            emb = self._entries[src].module
            for t in self._val_ids.get(src, []):
                t = t.reshape(-1)
                ids.append(t if emb.padding_idx is None else t[t != emb.padding_idx])
        rows = torch.unique(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.long)
        total = grads[entry.param_index[entry.param_names.index("weight")]][0]
        return residual_rows(entry.handler, entry.module, total, factors, rows.to(total.device))

    def _choose_route(self, entry: _Entry, gram: dict[int, GramFactors]) -> str:
        if entry.index not in gram:
            return "vector"
        if self.config.route == "gram":
            return "gram"
        d, p = entry.handler.in_out_features(entry.module)
        return "gram" if gram[entry.index].cost(d, p) < entry.handler.vector_cost(entry.module) else "vector"

    def _hessian_correction(self, window: _Window, base: Tensor, grads: list[Tensor | None]) -> Tensor:
        """Second-order term with one Hessian-vector product.

        The step is ``Δ(S) = δ0 − c ⊙ g_S`` (``c`` = learning rate × clip factor, ``δ0 = f(0)``
        the data-free part). Expanded around ``θ + δ0``, where the first-order term's validation
        gradient is taken, the Shapley value of the quadratic Taylor utility is
        ``<c ⊙ g_z, g_val(θ + δ0)> − ½ <c ⊙ g_z, H (c ⊙ g_B)>``; ``c ⊙ g_B`` equals
        ``base ⊙ p.grad`` at the step (the clip factor is already in ``p.grad``). ``H`` is taken
        at ``θ + δ0`` too.
        """
        params = self._params
        with torch.no_grad():
            direction = []
            for i, (g, p) in enumerate(zip(grads, params)):
                direction.append((g if g is not None else torch.zeros_like(p)) * base[i].to(p.dtype))
        # Fused attention kernels have no double backward: the math backend computes the same
        # attention and can be differentiated twice.
        shift = self.rule.data_free_step(params)
        with evaluating(self.module, self.config.val_mode == "eval"), _fork_rng(params), _math_attention(), \
                _parameters_shifted(params, shift):
            loss = _check_val_loss(self.val_loss(self.module))
            columns = [loss] if loss.dim() == 0 else list(loss)
            hvps: list[list[Tensor]] = []
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
                hvps.append([
                    (h if h is not None else torch.zeros_like(p)).detach() for h, p in zip(hv, params)
                ])
        vectors = [torch.stack([col[i] for col in hvps]) for i in range(len(params))]
        return shapley.hessian_correction(self._contract(window, self._weighted(window.multipliers, vectors)))

    def _finish_trapezoid(self, window: _Window, val_next: _Validation) -> None:
        """``φ = ½ (values at θ_t + f(0) + values with g_val(θ_t+1))``, now that g_val(θ_t+1) is known."""
        with torch.no_grad():
            vectors = self._weighted(window.multipliers, val_next.grads)
            if window.coef is not None:
                # SGD-type step: g_val(θ_t+1) is a validation gradient, so the layers on the Gram
                # route use the factors its pass captured, as order 1 does.
                end = self._contract(window, vectors, gram=val_next.gram, coef=window.coef).sum(0)
            else:
                end = self._contract(window, vectors).sum(0)
            trapezoid = (window.base_values + end) / 2
        second_host = trapezoid.cpu().numpy() - window.first
        if not np.isfinite(second_host).all():
            self.ledger.record_skip(window.step, "non-finite trapezoid correction")
            return
        self.ledger.add(window.step, window.ids, window.first, second_host, lr=window.lr)
        window.micro.clear()

    def _contract(
        self,
        window: _Window,
        vectors: list[Tensor],
        gram: dict[int, GramFactors] | None = None,
        coef: Tensor | None = None,
    ) -> Tensor:
        """``[P, B, K]`` dots of the window's per-example gradients with per-parameter vectors.

        With ``gram`` (validation factors by layer) and ``coef`` (``vectors[p] = coef[p] · g``),
        a layer with factors takes its weight's dots by the Gram route instead, times ``coef``.
        """
        K = vectors[0].shape[0]
        parts = []
        with self._paused(), torch.no_grad():
            for mb in window.micro:
                out = torch.zeros(len(self._params), mb.size, K, dtype=torch.float64, device=mb.dots.device)
                for cap in mb.captures:
                    if cap.grad is None:
                        continue
                    if any(t._version != v for t, v in cap.versions):
                        raise InRunError(
                            f"the input of {cap.entry.name} was modified in place after its forward, "
                            "before the step's values were complete (order 2 and Adam read each "
                            "layer's input at the optimizer step or the next tracker.step)"
                        )
                    e = cap.entry
                    names = list(e.param_names)
                    if gram is not None and e.index in gram and K == 1:
                        A, D = e.handler.gram_factors(e.module, cap.saved, cap.grad)
                        w = e.param_index[names.index("weight")]
                        out[w] += gram_dot(A, D, gram[e.index]).to(out.dtype).unsqueeze(1) * coef[w].to(out.dtype)
                        names.remove("weight")
                    vecs = {n: vectors[e.param_index[e.param_names.index(n)]] for n in names}
                    if vecs:
                        for n, d in e.handler.dot(e.module, cap.saved, cap.grad, vecs).items():
                            out[e.param_index[e.param_names.index(n)]] += d.to(out.dtype)
                parts.append(out)
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, entry: _Entry) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            mode = self._mode
            if mode is None:
                return None
            if mode == "val":
                return self._capture_validation(entry, args, kwargs, output)
            return self._capture_train(entry, args, kwargs, output)

        return hook

    def _capture_train(self, entry: _Entry, args: tuple, kwargs: dict, output: Any) -> Any:
        if entry.index in self._bookkeeping_calls:
            self._bookkeeping_calls.discard(entry.index)  # this call went through the Function
            return None
        if not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"{entry.name} ({type(entry.module).__name__}) has trainable parameters and "
                f"returns {type(output).__name__}, not a tensor; no handler knows it and the "
                "fallback needs a single tensor output. Register a handler or freeze it."
            )
        if not output.requires_grad:
            return None
        mb = self._microbatch
        layout = entry.handler.layout(entry.module, args, output, mb.size)
        if layout is Layout.BATCHED:
            mb.batched_seen = True
        elif not mb.batched_seen:
            # A broadcast call (positions, a shared prefix) only makes sense once the batch
            # itself has gone through a tracked layer; before that, the ids and rows disagree.
            raise BatchMismatchError(
                f"{entry.name} ({type(entry.module).__name__}) saw {output.shape[0]} row(s) but "
                f"the step has {mb.size} ids: pass exactly one id per row of the batch"
            )
        saved = entry.handler.capture(entry.module, args, kwargs)
        if layout is Layout.UNBATCHED and isinstance(saved, Tensor):
            saved = saved.unsqueeze(0)
        if self._defer:
            # The factors are read again after the step: copy inputs that are the user's data
            # (a loop may refill one input buffer in place) and remember activations' versions.
            saved = _own_leaf_tensors(saved)
        cap = _Capture(entry=entry, saved=saved, microbatch=mb)
        if self._defer:
            cap.versions = _versions(saved)
            mb.captures.append(cap)
        new_output = None
        if layout is not Layout.BATCHED:
            output = new_output = expand_leading(output, layout, mb.size)
        output.register_hook(lambda grad: self._on_grad(cap, grad))
        return new_output

    def _capture_validation(self, entry: _Entry, args: tuple, kwargs: dict, output: Any) -> None:
        if entry.index in self._residual_sources:
            self._val_ids.setdefault(entry.index, []).append(entry.handler.capture(entry.module, args, kwargs))
        if not entry.gram_capable or not isinstance(output, Tensor) or not output.requires_grad:
            return None
        A = entry.handler.capture(entry.module, args, kwargs)
        calls = self._val_gram.setdefault(entry.index, [])
        slot = len(calls)
        calls.append((A, None))

        def keep(grad: Tensor) -> None:
            calls[slot] = (calls[slot][0], grad.detach())

        self._val_hooks.append(output.register_hook(keep))
        return None

    def _accept_gradient(self, cap: _Capture, grad: Tensor) -> _MicroBatch:
        """Checks shared by every route when a tracked call's output gradient arrives."""
        if cap.fired:
            raise StepOrderError(
                "a second backward pass went through the same forward inside one "
                "tracker.step(ids) block; each example's gradient would be counted twice"
            )
        if self._microbatch is not cap.microbatch:
            raise StepOrderError(
                "backward() ran after its `with tracker.step(ids):` block had ended; call "
                "loss.backward() inside the block"
            )
        cap.fired = True
        mb = cap.microbatch
        mb.fired += 1
        if grad.dtype in (torch.float16, torch.bfloat16):
            mb.low_precision = True
        if self._immediate and mb.dots is None:
            mb.dots = torch.zeros(
                len(self._params), mb.size, self._val.columns, dtype=torch.float64, device=grad.device
            )
        return mb

    def _add_dots(self, mb: _MicroBatch, entry: _Entry, dots: dict[str, Tensor]) -> None:
        for name, d in dots.items():
            mb.dots[entry.param_index[entry.param_names.index(name)]] += d.to(torch.float64)

    def _on_grad(self, cap: _Capture, grad: Tensor) -> None:
        mb = self._accept_gradient(cap, grad)
        with self._paused(), torch.no_grad():
            if self._immediate:
                self._add_dots(mb, cap.entry, self._first_order_dots(cap.entry, cap.saved, grad))
        if self._defer:
            cap.grad = grad.detach()
        else:
            cap.saved = None

    # ------------------------------------------------------------------ book-keeping route
    def _install_bookkeeping(self, entry: _Entry) -> None:
        """Route the module's calls through :meth:`_bookkeeping_call` when that is cheapest.

        The override is a method bound to the module, so a deep copy of the model rebinds it to
        the copy, which is not tracked and runs its class's own forward.
        """
        module = entry.module
        previous = module.__dict__.get("forward")
        by_module = self._bookkeeping_entries

        def forward(module_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            tracked = by_module.get(id(module_self))
            if tracked is not None and tracked.module is module_self and self._use_bookkeeping(tracked, args, kwargs):
                return self._bookkeeping_call(tracked, args[0])
            if previous is not None and module_self is module:
                return previous(*args, **kwargs)
            return type(module_self).forward(module_self, *args, **kwargs)

        by_module[id(module)] = entry
        module.forward = types.MethodType(forward, module)
        self._forward_overrides.append((module, previous))

    def _use_bookkeeping(self, entry: _Entry, args: tuple, kwargs: dict) -> bool:
        """Book-keeping for this call: tracking a batched call, no autocast, and cheapest."""
        mb = self._microbatch
        if (
            self._mode != "train" or mb is None or not self._immediate or kwargs or len(args) != 1
            or not torch.is_grad_enabled() or torch.is_autocast_enabled()
        ):
            return False
        x, weight = args[0], entry.module.weight
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != mb.size or x.dtype != weight.dtype:
            return False
        if "weight" not in entry.param_names or self._val.columns > 4:
            return False
        if self.config.route == "bookkeeping":
            return True
        d, p = entry.handler.in_out_features(entry.module)
        tokens = x[0].numel() // d
        cost = bookkeeping_cost(d, p)
        vector = tokens * entry.handler.vector_cost(entry.module)
        gram = tokens * self._val.gram[entry.index].cost(d, p) if entry.index in self._val.gram else float("inf")
        return cost < min(vector, gram)

    def _bookkeeping_call(self, entry: _Entry, x: Tensor) -> Tensor:
        from .layers.linear import BookkeepingLinear

        mb = self._microbatch
        cap = _Capture(entry=entry, saved=None, microbatch=mb)
        if self._defer:
            mb.captures.append(cap)
        vectors = {n: self._val.grads[i] for n, i in zip(entry.param_names, entry.param_index)}

        def sink(dots: dict[str, Tensor], x: Tensor, grad_out: Tensor) -> None:
            batch = self._accept_gradient(cap, grad_out)
            entry.route = "bookkeeping"
            self._add_dots(batch, entry, dots)
            if self._defer:
                cap.saved, cap.grad = _own_leaf_tensors(x.detach()), grad_out.detach()
                cap.versions = _versions(cap.saved)

        self._bookkeeping_calls.add(entry.index)
        module = entry.module
        return BookkeepingLinear.apply(x, module.weight, module.bias, (entry.handler.transposed, vectors, sink))

    def _first_order_dots(self, entry: _Entry, saved: Any, grad: Tensor) -> dict[str, Tensor]:
        val = self._val
        handler = entry.handler
        if entry.index in val.gram:
            entry.route = "gram"
            A, D = handler.gram_factors(entry.module, saved, grad)
            out = {"weight": gram_dot(A, D, val.gram[entry.index]).unsqueeze(1)}
            rest = {
                n: val.grads[i] for n, i in zip(entry.param_names, entry.param_index) if n != "weight"
            }
            if rest:
                out.update(handler.dot(entry.module, saved, grad, rest))
            return out
        entry.route = f"vector:{handler.name}" if handler is not FALLBACK else "fallback"
        vectors = {n: val.grads[i] for n, i in zip(entry.param_names, entry.param_index)}
        return handler.dot(entry.module, saved, grad, vectors)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Suspend capture while handlers re-run modules (fallback, norms)."""
        mode, self._mode = self._mode, None
        try:
            yield
        finally:
            self._mode = mode

    # ------------------------------------------------------------------ small checks
    def _grads_all_none(self) -> bool:
        return all(p.grad is None for p in self._params)

    def _check_grads_zero(self) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        with torch.no_grad():
            nonzero = bool(torch.stack(torch._foreach_norm(grads)).any())
        if nonzero:
            raise StepOrderError(
                "gradients are not zero at the start of a step: call optimizer.zero_grad() "
                "after each optimizer.step(), so the update is exactly the valued examples' "
                "gradients"
            )


# ---------------------------------------------------------------------- helpers
def _column_sum(v: Tensor) -> Tensor:
    """``[K, *shape] -> [*shape]``: the summed validation gradient (a view when ``K = 1``)."""
    return v[0] if v.shape[0] == 1 else v.sum(dim=0)


def _own_leaf_tensors(saved: Any) -> Any:
    """Copies of the tensors in ``saved`` that are user data (no autograd history)."""
    if isinstance(saved, Tensor):
        return saved.clone() if saved.grad_fn is None and not saved.requires_grad else saved
    if isinstance(saved, (list, tuple)):
        items = [_own_leaf_tensors(x) for x in saved]
        return type(saved)(items) if isinstance(saved, tuple) else items
    return saved


def _versions(saved: Any) -> list[tuple[Tensor, int]]:
    if isinstance(saved, Tensor):
        return [(saved, saved._version)]
    if isinstance(saved, (list, tuple)):
        return [tv for x in saved for tv in _versions(x)]
    return []


def _norms(grads: list[Tensor | None], params: list[nn.Parameter]) -> Tensor:
    """``[P]`` float64 gradient norms (0 for a missing gradient)."""
    device = params[0].device
    present = [g for g in grads if g is not None]
    values = iter(torch._foreach_norm(present)) if present else iter(())
    out = [
        next(values).double().to(device) if g is not None else torch.zeros((), dtype=torch.float64, device=device)
        for g in grads
    ]
    return torch.stack(out)


def _ratios(now: Tensor, before: Tensor) -> Tensor:
    """Per-parameter factor applied to the gradient between backward and the step (clipping,
    unscaling): ``‖grad now‖ / ‖grad after backward‖``, 1 where the gradient was zero."""
    safe = torch.where(before > 0, before, torch.ones_like(before))
    return torch.where(before > 0, now / safe, torch.ones_like(before))


BOOKKEEPING_COST_PER_ELEMENT = 64.0
"""Per-example cost of the book-keeping route, in multiply-add equivalents per weight element:
writing, reading and adding each example's gradient is memory-bound. Measured on a 2-core CPU
(benchmarks/overhead.py shapes): 40-90 for layers of 0.06-1M weights at 128 tokens. So the route
wins for sequences (vector costs T per element) and loses for one position per example (T = 1)."""


def bookkeeping_cost(d: int, p: int) -> float:
    return BOOKKEEPING_COST_PER_ELEMENT * d * p


def _default_rtol(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-3
    return 5e-2


def _check_val_loss(loss: Any) -> Tensor:
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
    if not loss.requires_grad:
        raise ValidationLossError(
            "val_loss(model) returned a tensor without a gradient: compute it from the model's "
            "output without torch.no_grad() (the tracker needs its gradient)"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValidationLossError(f"val_loss(model) is not finite: {loss.detach()}")
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
