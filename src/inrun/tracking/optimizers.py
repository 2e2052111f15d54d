"""Several optimizers in one step: every optimizer that steps trained parameters is part of the
valued update.

The per-optimizer rules (what one optimizer's step means: :mod:`inrun.optim`) stay as they are;
this module only plumbs them together:

* :class:`RuleSet` is the update rule of the whole step: each parameter is valued by the rule of
  the optimizer that holds it (a parameter held by two optimizers is refused), so the body on
  SGD and the head on Adam, or Muon for the matrices and AdamW for the rest, are one update;
* :class:`StepOptimizers` hooks every optimizer and follows one step: the step is valued at the
  *first* ``optimizer.step()`` (every optimizer's rule reads its own state, still untouched, and
  the gradients the blocks left), and it ends when every optimizer whose parameters got a
  gradient has stepped once. What each later optimizer was valued with is remembered (its
  parameters' gradient versions, its hyperparameters, its parameters' versions) and checked at its
  own ``step()``: a change in between (a per-optimizer clip after the first optimizer stepped, a
  scheduler step) is refused, as is an optimizer stepping twice in one step or not at all before
  the next ``tracker.step()`` (a GAN-style loop whose optimizers step at different times: give the
  tracker the optimizer of the model it values, and leave the other's update out of it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import GradientChangeError, StepOrderError, UnsupportedOptimizerError
from ..optim import UpdateRule, rule_for, unwrap_optimizer
from . import segments as docs
from .coupled import value_coupled
from .gradmap import GradientReference, StepMap
from .params import ParamTable
from .rules import MissingFactors
from .state import Window

logger = logging.getLogger(__name__)


def optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """One optimizer, or a list/tuple of them, unwrapped (accelerate's wrapper...)."""
    many = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not many:
        raise UnsupportedOptimizerError("no optimizer given: pass the optimizer (or a list of them) that steps the model")
    return [unwrap_optimizer(o) for o in many]


class RuleSet:
    """The update rule of several optimizers: each parameter valued by its own optimizer's rule."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], **options: Any) -> None:
        self.optimizers = list(optimizers)
        self.rules: list[UpdateRule] = [rule_for(o, **options) for o in self.optimizers]
        owner: dict[int, int] = {}
        for k, opt in enumerate(self.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    if owner.get(id(p), k) != k:
                        raise UnsupportedOptimizerError(
                            f"a parameter of shape {tuple(p.shape)} is held by optimizers {owner[id(p)] + 1} and "
                            f"{k + 1}: its update would be made twice. Give each parameter to one optimizer"
                        )
                    owner[id(p)] = k
        self.owner_of = owner
        self.name = "+".join(r.name for r in self.rules)
        self.elementwise = any(r.elementwise for r in self.rules)
        self.optimizer = self.optimizers[0]

    def _parts(self, params: Sequence[Tensor]) -> list[tuple[UpdateRule, list[int]]]:
        """Each rule with the positions of ``params`` its optimizer holds."""
        parts: list[tuple[UpdateRule, list[int]]] = []
        for k, rule in enumerate(self.rules):
            rows = [i for i, p in enumerate(params) if self.owner_of.get(id(p)) == k]
            if rows:
                parts.append((rule, rows))
        return parts

    def scalar_coefficients(self, params: Sequence[Tensor]) -> Tensor:
        out = torch.zeros(len(params), dtype=torch.float64)
        for rule, rows in self._parts(params):
            out[rows] = rule.scalar_coefficients([params[i] for i in rows])
        return out

    def slopes(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(params)
        for rule, rows in self._parts(params):
            for i, s in zip(rows, rule.slopes([params[i] for i in rows], [grads[i] for i in rows])):
                out[i] = s
        return out

    def pullbacks(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Any]:
        out: list[Any] = [None] * len(params)
        for rule, rows in self._parts(params):
            for i, s in zip(rows, rule.pullbacks([params[i] for i in rows], [grads[i] for i in rows])):
                out[i] = s
        return out

    def data_free_step(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        out = [torch.zeros_like(p) for p in params]
        moved = False
        for rule, rows in self._parts(params):
            steps = rule.data_free_step([params[i] for i in rows])
            if steps is not None:
                moved = True
                for i, s in zip(rows, steps):
                    out[i] = s
        return out if moved else None

    def validate(self) -> None:
        for rule in self.rules:
            rule.validate()

    def nonlinear_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
        for rule, rows in self._parts(params):
            if reason := rule.nonlinear_step([params[i] for i in rows], [grads[i] for i in rows]):
                return reason
        return None


def _hyperparameters(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: (float(v) if isinstance(v, Tensor) and v.numel() == 1 else v) for k, v in g.items() if k != "params"}
            for g in opt.param_groups]


class SteppedEngine(Protocol):
    """What the step hooks read and write of the engine (:class:`~inrun.tracking.engine.StepEngine`,
    which imports this module)."""

    optimizers: list[torch.optim.Optimizer]
    table: ParamTable
    gradients: GradientReference
    window: Window | None
    enabled: bool
    recorder: Any
    rule: Any
    check: Any
    audit: Any
    ddp: Any
    log: Any
    validation: Any
    pending: Any
    accounts: Any
    module: Any
    hooks: Any


class StepOptimizers:
    """The step hooks of every optimizer, and which of them have stepped in the current step."""

    def __init__(self, engine: SteppedEngine) -> None:
        self.engine = engine
        self.optimizers = engine.optimizers
        self.params, self.names = engine.table.params, engine.table.names
        index = {id(p): i for i, p in enumerate(self.params)}
        self.rows = [[index[id(p)] for g in o.param_groups for p in g["params"] if id(p) in index]
                     for o in self.optimizers]
        self.start()
        self.handles = []
        for k, opt in enumerate(self.optimizers):
            self.handles.append(opt.register_step_pre_hook(lambda o, a, kw, k=k: self.pre(k)))
            self.handles.append(opt.register_step_post_hook(lambda o, a, kw, k=k: self.post(k)))

    # ------------------------------------------------------------------ the hooks
    def pre(self, k: int) -> None:
        """Optimizer ``k``'s pre-step hook: the first of a step values the whole update."""
        try:
            self._pre(k)
        finally:
            if self.engine.ddp is not None:
                self.engine.ddp.release()

    def _pre(self, k: int) -> None:
        eng = self.engine
        window = eng.window
        if not eng.enabled:
            return
        if window is not None and self.valued:
            self.check_later(k, eng.gradients.classify)  # a later optimizer of a valued step
            return
        if eng.recorder is not None:
            raise StepOrderError("optimizer.step() was called inside a tracker.step() block")
        if window is None or not window.micro:
            if window is not None and window.doomed:
                window.skip(window.doomed)
                self.value_at(k)
                return
            if window is None and len(self.optimizers) > 1 and not self.has_gradients(k):
                return  # an optimizer with no gradient moves nothing the data caused
            raise StepOrderError(
                "optimizer.step() was called with no `with tracker.step(ids):` block since the "
                "last step, so the update has no examples to credit. Wrap the forward/backward "
                "in tracker.step(ids), or set tracker.enabled = False to train untracked."
            )
        if window.doomed:
            window.skip(window.doomed)
            self.value_at(k)
            return
        lrs = self.learning_rates()  # a NaN one is refused before the update
        try:
            smap = eng.gradients.classify()
            if eng.ddp is not None:
                eng.ddp.agree(smap)  # FSDP2: each rank classified its shards; the factors become the group's
        except GradientChangeError:
            window.doomed = "its gradients were changed in a way no rule values"
            raise
        if eng.ddp is not None:
            smap.share = 1.0 / eng.ddp.world_size  # DDP averages over ranks: each example adds g_z / W
        try:
            first, second = eng.rule.at_step(window, smap)
        except MissingFactors:
            # value clipping under an SGD-type rule, first seen at a step that kept no layer factors
            self.value_at(k)
            window.skip("value clipping seen for the first time; the layers' factors are kept from now on")
            logger.warning("step %d not valued: %s", window.step, window.skip_reason)
            return
        first = value_coupled(eng, window, first)
        window.token_values = docs.token_values_of(window)
        eng.check.finalize(window, first, second, lr=lrs)
        eng.accounts.at_step(window, smap.batch, smap.ratio * smap.share if smap.plain else None,
                             eng.validation.current.grads)
        self.value_at(k, smap)
        if eng.audit is not None:
            # audit: θ_t and the optimizer state before the step
            eng.audit.at_step(window, smap.ratio * smap.share, refused=self._unaudited(smap))

    def _unaudited(self, smap: StepMap) -> str | None:
        if len(self.optimizers) > 1:
            return "the audit's game steps one optimizer; this step has several"
        if not smap.plain:
            return "the audit's game does not cover value clipping or unattributed gradients yet"
        if any(mb.coupled is not None for mb in self.engine.window.micro):
            return "the audit's game does not cover coupled losses yet"
        return None

    def post(self, k: int) -> None:
        """Optimizer ``k``'s post-step hook: the last of a step ends it."""
        eng = self.engine
        eng.validation.parameters_changed()  # any cached validation gradient is stale
        window = eng.window
        if not eng.enabled or window is None or not self.done(k):
            return
        eng.window = None
        eng.accounts.drops.end(window, stepped=True)
        eng.pending = eng.log.end(window, pending=eng.rule.pending)

    # ------------------------------------------------------------------ one step's optimizers
    def label(self, k: int) -> str:
        return f"optimizer {k + 1} ({type(self.optimizers[k]).__name__})" if len(self.optimizers) > 1 \
            else type(self.optimizers[k]).__name__

    def has_gradients(self, k: int) -> bool:
        return any(self.params[i].grad is not None for i in self.rows[k])

    def _fingerprint(self, k: int) -> tuple[Any, ...]:
        return tuple(self.params[i]._version for i in self.rows[k]), _hyperparameters(self.optimizers[k])

    def start(self) -> None:
        """A new step: nobody has stepped."""
        self.expected, self.stepped, self.valued, self._assumed, self._held = set(), set(), False, {}, {}
        self.smap = None

    def value_at(self, k: int, smap: Any = None) -> None:
        """The first ``step()`` of the step (optimizer ``k``): the others are valued as they are now
        (``smap``: the gradients' map they were valued with)."""
        self.valued, self.smap = True, smap
        self.expected = {j for j in range(len(self.optimizers)) if self.has_gradients(j)} | {k}
        self._assumed = {j: self._fingerprint(j) for j in self.expected if j != k}
        self._held = {j: [self.names[i] for i in self.rows[j] if self.params[i].grad is not None] for j in self.expected}

    def check_later(self, k: int, classify: Callable[[list[int]], Any]) -> None:
        """A later optimizer's ``step()`` in a valued step: it must be as it was valued
        (``classify(rows)``: the gradients' map of those parameters now)."""
        if k in self.stepped:
            raise StepOrderError(
                f"{self.label(k)} stepped twice in one tracked step: each optimizer steps once per "
                "optimizer step of the loop (one `tracker.step()` block, or several for accumulation)"
            )
        if k not in self._assumed:
            if self.has_gradients(k):
                raise StepOrderError(
                    f"{self.label(k)} got gradients after the step was valued: every gradient of the step "
                    "must be there at the first optimizer.step()"
                )
            return
        versions, hyper = self._fingerprint(k)
        was_versions, was_hyper = self._assumed[k]
        same_grads = self.smap is None or classify(self.rows[k]).same(self.smap, self.rows[k])
        if not same_grads or versions != was_versions or hyper != was_hyper:
            what = ("its gradients" if not same_grads else "its parameters" if versions != was_versions
                    else "its settings (learning rate...)")
            raise StepOrderError(
                f"{self.label(k)}: {what} changed after the first optimizer.step() of this step, when every "
                "optimizer's update was valued. Clip, scale or schedule every optimizer before the first "
                "optimizer.step() of the step, then step them all"
            )

    def done(self, k: int) -> bool:
        """Optimizer ``k`` finished its step: whether every expected optimizer has now stepped."""
        self.stepped.add(k)
        return self.expected <= self.stepped

    def require_complete(self) -> None:
        """Before the next step's first block: every optimizer valued in this step has stepped."""
        missing = sorted(self.expected - self.stepped)
        if self.valued and missing:
            k = missing[0]
            names = self._held[k][:3]
            raise StepOrderError(
                f"{self.label(k)} held gradients of the last step's examples ({', '.join(names)}) when the step was "
                "valued but did not step before the next tracker.step(): the values counted an update it did not "
                "make. Step every optimizer you gave the tracker once per step, or set those gradients to None "
                "before the first optimizer.step() (e.g. detach what the other model produced), or give the "
                "tracker only the optimizers that step together"
            )

    def learning_rates(self) -> list[float]:
        return ParamTable.learning_rates(self.optimizers)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
