"""Row verification: which rows of each tracked call belong to which example is *proven* on the
user's own model, not inferred from a size that can coincide.

When a micro-batch has a call the plan has not proven (the first step, a new row layout, a call
that could not be captured), the tracker replays the model's own call (:mod:`.replay`: the same
inputs and random numbers) and checks the fast routes against an independent exact route:

1. the replay's outputs must equal the user's outputs bit for bit: expanding a shared call
   (positions, a bias table) to the batch must not change what the model computes;
2. with random example weights ``w``, per parameter ``p``:
   ``Σ_z w_z <ghost dot of z>_p == <Σ_z w_z g_z, v>_p`` with ``v = g_val`` and ``Σ_z w_z g_z``
   by plain autograd through the replay (the user's output gradients, row ``z`` weighted by
   ``w_z``). Rows credited to the wrong example (a permuted batch, a sequence-first layer whose
   length equals the batch size, routed tokens) change the left side and not the right, for
   almost every ``w``; a gradient that flows outside the module's call (a weight read by its
   parent) is missing from the left side.

Why a coincidence cannot pass it: the right side never looks at a layer's rows or sizes, only at
the model's outputs, whose row ``z`` is example ``z`` by the id contract; the weights are drawn
afresh at each verification, so no fixed arrangement of rows can match them by construction. A
reordering that depends on the data and is the identity on the verified batch is caught by the
same proof on a shuffled copy of the batch (:mod:`.probes`, with the interaction probes).

A call that fails is moved to a *site*: the smallest enclosing module whose inputs and outputs
carry the batch, where the fallback (:mod:`inrun.layers.fallback`) values its parameters by a
directional derivative; then the micro-batch is replayed and verified again. Once it passes, the
replay's values are the micro-batch's values, and calls of the same kinds need no verification.
Examples that interact inside the model (batch statistics, a capacity over the batch) are
refused: every verification also runs parts of the batch alone (:func:`.probes.refuse_interactions`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import InRunError, UnsupportedModuleError
from ..layers import FALLBACK
from ..layers.parts import PartHandler
from .check import STEP_FLOOR, column_sum, refuse_hooks
from .entries import Entry, joint_groups
from .probes import refuse_interactions, shuffled
from .replay import ReplayMismatch, RootCall, buffers_kept, replayed_targets
from .routes import contract_window
from .rows import declared_batch_dim
from .segments import Segments, mixed_documents, refuse_undocumented_gradient
from .state import MicroBatch, Window

MAX_ROUNDS = 16


class VerifiedEngine(Protocol):
    """What the verification uses of the engine (:class:`~inrun.tracking.engine.StepEngine`):
    its model, parameter table, tracked modules and hooks, plan, rule and validation pass, and
    three of its operations. Moving a call to a site adds an entry and its hooks."""

    module: nn.Module
    table: Any
    entries: list[Entry]
    hooks: Any
    plan: Any
    rule: Any
    validation: Any
    config: Any

    def make_recorder(self, mb: MicroBatch, keep_factors: bool, expand_shared: Any) -> Any: ...

    def zero_dots(self, mb: MicroBatch, device: torch.device) -> Tensor: ...


class RowVerifier:
    def __init__(self, engine: VerifiedEngine) -> None:
        self.engine = engine
        self.names = {id(m): n for n, m in engine.module.named_modules()}
        self.parent: dict[int, nn.Module] = {}
        for m in engine.module.modules():
            for child in m.children():
                self.parent.setdefault(id(child), m)
        self.generator = torch.Generator().manual_seed(0)
        self._carries: dict[int, bool] = {}  # module -> its calls in the last replay carried the batch

    # ------------------------------------------------------------------ the loop
    def verify(self, mb: MicroBatch, calls: list[RootCall]) -> MicroBatch:
        """The micro-batch replayed under a plan whose rows are proven; raises if none is."""
        engine = self.engine
        if not calls or not any(g is not None for c in calls for g in c.grads):
            raise UnsupportedModuleError(
                "the tracker proves which rows of each layer belong to which example by replaying "
                "the model's call, and the model itself was not called (with a gradient reaching "
                "its outputs) inside tracker.step(): call the model you gave the tracker, or give "
                "the tracker the module you call"
            )
        kept = [t for c in calls for t in (*c.outputs, *(g for g in c.grads if g is not None))]
        if not all(bool(torch.isfinite(t).all()) for t in kept):
            return mb  # not a step to prove anything on: its values are refused or skipped at the step
        if mb.segments is not None:
            refuse_undocumented_gradient([g for c in calls for g in c.grads], mb.segments)
        if mb.rows > 1:
            engine.plan.interactions_tested |= refuse_interactions(engine, calls[0])
        history: list[str] = []
        for _ in range(MAX_ROUNDS):
            replayed, moves = self._round(mb, calls)
            if moves is None:  # expanding a shared call broke the replay: again without expanding it
                continue
            if not moves and mb.rows > 1 and mb.segments is None:
                moves = self._shuffled_round(mb, calls)
            if not moves:
                engine.plan.verified.update(k for k in replayed.signature if k[1] is not None)
                engine.plan.verified.update(mb.layout)
                return replayed  # with every layer's factors, kept until the step
            history += [f"{engine.entries[i].name}: {why}" for i, why in moves.items()]
            self._move(moves, documents=mb.segments is not None)
        raise UnsupportedModuleError("rows could not be verified after moving: " + "; ".join(history[-5:]))

    def _shuffled_round(self, mb: MicroBatch, calls: list[RootCall]) -> dict[int, str]:
        """The proof on a shuffled copy of the batch (:mod:`.probes`): a reordering by the data that
        is the identity on the batch shows there. A shuffle the model cannot run proves nothing."""
        try:
            probe, moves = self._round(mb, shuffled(calls, self.generator), same_outputs=False)
        except InRunError:
            raise
        except Exception:
            return {}
        probe.captures.clear()
        return {i: why.replace("(its rows", "on a shuffled copy of the batch (its rows") for i, why in (moves or {}).items()}

    def _round(
        self, mb: MicroBatch, calls: list[RootCall], same_outputs: bool = True,
    ) -> tuple[MicroBatch, dict[int, str] | None]:
        engine = self.engine
        new = mb.replica()
        expanded: set[int] = set()

        def may_expand(e: Entry) -> bool:
            if e.index in engine.plan.shared_unsafe:
                return False
            expanded.add(e.index)
            return True

        recorder = engine.make_recorder(new, keep_factors=True, expand_shared=may_expand)
        with buffers_kept(engine.module):
            return self._replayed_round(mb, calls, new, recorder, expanded, same_outputs)

    def _replayed_round(
        self, mb: MicroBatch, calls: list[RootCall], new: MicroBatch, recorder: Any, expanded: set[int],
        same_outputs: bool,
    ) -> tuple[MicroBatch, dict[int, str] | None]:
        engine = self.engine
        carries: dict[int, bool] = {}
        observers = [m.register_forward_hook(self._observer(carries, mb.rows, mb.segments), with_kwargs=True)
                     for m in engine.module.modules()]
        outputs: list[Tensor] = []
        grads_out: list[Tensor] = []
        weighs: list[Any] = []  # per output: its call's player weights (rows, or documents' positions)
        try:
            with engine.hooks.recording(recorder), torch.enable_grad():
                for call in calls:
                    targets, replayed = replayed_targets(call)
                    for t, g in targets:
                        outputs.append(t)
                        grads_out.append(g)
                        weighs.append(call.player_weights)
                    if same_outputs and not all(_same(t, o) for t, o in zip(replayed, call.outputs)):
                        raise ReplayMismatch("the outputs differ")
        except Exception as exc:
            if not expanded:
                if isinstance(exc, ReplayMismatch):
                    raise UnsupportedModuleError(
                        "replaying the model's call with the same inputs and random numbers gave other "
                        "outputs (a nondeterministic op, or a model that keeps state between calls), so "
                        "its rows cannot be verified"
                    ) from None
                raise
            # Expanding a shared call changed what the model computes: the next round leaves it as
            # it is (uncaptured), and moves it to a site with the enclosing calls observed whole
            # (this round stopped before the calls around the expanded one ended).
            engine.plan.shared_unsafe.update(expanded)
            return new, None
        finally:
            for h in observers:
                h.remove()
            self._carries = carries
        params = engine.table.compute_params()  # under FSDP2, the whole parameters the replay gathered
        with torch.enable_grad():
            grads = torch.autograd.grad(outputs, params, grad_outputs=grads_out, retain_graph=True, allow_unused=True)
        recorder.open = False
        recorder.muted = True
        moves = dict(new.unresolved)
        moves.update(self._uncalled(new, grads))
        if moves:
            return new, moves
        if new.dots is None:
            new.dots = engine.zero_dots(new, engine.table.device)
        w = torch.randn(mb.size, generator=self.generator, dtype=torch.float64)
        with torch.enable_grad():
            weighted = torch.autograd.grad(
                outputs, params, allow_unused=True,
                grad_outputs=[g * weigh(w, g) for g, weigh in zip(grads_out, weighs)],
            )
        moves = self._compare(new, weighted, w)
        if new.segments is not None:
            moves.update(mixed_documents(new.captures, new.segments, w, self._mixing_tolerance()))
        if not moves:
            engine.plan.shared_safe.update(expanded)
        return new, moves

    # ------------------------------------------------------------------ the checks
    def _uncalled(self, new: MicroBatch, grads: tuple[Tensor | None, ...]) -> dict[int, str]:
        """Entries whose parameters got gradient in the replay although no call of theirs was
        captured: the parameter is used outside its module's forward."""
        engine = self.engine
        called = {k[0] for k in new.signature}
        held = {i for e in engine.entries if e.active and e.index in called for i in e.param_index}
        out = {}
        for e in engine.entries:
            if not e.active or e.index in called:
                continue
            if any(grads[i] is not None and bool(grads[i].abs().sum() > 0) and i not in held for i in e.param_index):
                out[e.index] = "its parameters get gradient but its forward is never called (used by another module)"
        return out

    def _compare(self, new: MicroBatch, weighted: tuple[Tensor | None, ...], w: Tensor) -> dict[int, str]:
        engine = self.engine
        val = engine.validation.current
        n = len(engine.table)
        window = Window(step=-1, micro=[new])
        if engine.rule.immediate:
            ghost = new.dots + contract_window(window, n, val.grads, joint=True)
        else:
            ghost = contract_window(window, n, val.grads, gram=val.gram, coef=torch.ones(n, dtype=torch.float64))
        ghost = ghost.sum(dim=2)  # [P, B]
        ours = (ghost * w.to(ghost)).sum(dim=1)
        spread = (ghost * w.to(ghost)).abs().sum(dim=1)
        theirs = torch.zeros_like(ours)
        scale = spread.clone()
        for i, g in enumerate(weighted):
            if g is None:
                continue
            v = column_sum(val.grads[i]).to(torch.float64)
            theirs[i] = (g.to(torch.float64) * v).sum()
            scale[i] += g.to(torch.float64).norm() * v.norm()
        groups = joint_groups(engine.entries)
        for g in groups:  # modules valued jointly are judged as one
            for v in (ours, theirs, scale):
                v[g[0]] = v[g].sum()
                v[g[1:]] = 0
        rtol = torch.as_tensor(engine.check.tolerances(window), dtype=scale.dtype, device=scale.device)
        bad = (ours - theirs).abs() > rtol * (scale + STEP_FLOOR * scale.sum()) + 1e-300
        refuse_hooks(engine.table, torch.nonzero(bad).flatten().tolist())
        moves = {}
        called = {k[0] for k in new.signature}
        for i in torch.nonzero(bad).flatten().tolist():
            for e in engine.entries:
                if e.active and e.index in called and i in e.param_index:
                    moves[e.index] = (
                        f"its per-example values of {engine.table.names[i]} do not match the exact "
                        "per-example gradients (its rows are not its examples)" if new.segments is None else
                        f"its per-document values of {engine.table.names[i]} do not match the exact "
                        "per-document gradients (its output positions carry other documents' losses: "
                        "documents attend to each other)"
                    )
        return moves

    def _mixing_tolerance(self) -> float:
        """Relative tolerance of the documents' gradient comparison: rounding of two backward
        passes that differ only by per-position weights."""
        dtype = self.engine.table.dtype
        return 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2

    # ------------------------------------------------------------------ sites
    def _observer(self, carries: dict[int, bool], batch: int, segments: Segments | None) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            dim = declared_batch_dim(module) or 0
            ins, _ = tree_flatten((args, kwargs))
            outs, _ = tree_flatten(output)
            fin = [t for t in outs if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
            ok = (any(isinstance(t, Tensor) and t.dim() > dim and t.shape[dim] == batch for t in ins)
                  and bool(fin) and all(t.dim() > dim and t.shape[dim] == batch for t in fin))
            if segments is not None:  # a site must show every token's position too
                ok = ok and any(segments.matches(t, dim) for t in fin)
            carries[id(module)] = carries.get(id(module), True) and ok

        return hook

    def _move(self, moves: dict[int, str], documents: bool = False) -> None:
        engine = self.engine
        for index, why in moves.items():
            entry = engine.entries[index]
            if not entry.active:
                continue
            if isinstance(entry.handler, PartHandler) and not entry.handler.part.grouped \
                    and next(entry.module.children(), None) is None:
                self._value_in_place(entry)
                continue
            site = self._site_for(entry)
            if site is None and documents:
                raise UnsupportedModuleError(
                    f"{entry.name} ({type(entry.module).__name__}): {why}, and even the whole model's "
                    "outputs do not give each document its own terms: per-document values need the loss "
                    "to be a sum of per-token terms of the model's outputs [rows, tokens, ...] (each "
                    "token's term belonging to the document segments gives it). Compute the loss per "
                    "token, or pass one id per row without segments."
                )
            if site is None:
                raise UnsupportedModuleError(
                    f"{entry.name} ({type(entry.module).__name__}): {why}, and no enclosing module up to the "
                    "whole model shows which example its rows belong to. Freeze its parameters or "
                    "register a handler for it (inrun.layers.register_handler)."
                )
            self._move_to_site(entry, site)

    def _value_in_place(self, entry: Entry) -> None:
        """A leaf module's linear part whose call was not seen (a router that applies a cast copy of
        its weight) is valued by the fallback at the module itself, as a module without a handler
        is; if that fails too, the fallback's entry moves to a site."""
        engine = self.engine
        target = Entry(index=len(engine.entries), name=self.names[id(entry.module)] or type(entry.module).__name__,
                       module=entry.module, handler=FALLBACK, param_names=entry.paths,
                       param_index=entry.param_index, gram_capable=False)
        engine.entries.append(target)
        engine.hooks.add(target)
        entry.active, entry.gram_capable = False, False

    def _move_to_site(self, entry: Entry, site: nn.Module) -> None:
        """Value ``entry``'s parameters at the enclosing module ``site`` by the fallback. The site's
        directional derivative covers every use of a parameter inside it, so other entries inside
        the site stop valuing it (a tied embedding read by an encoder and a decoder is valued
        once at the module holding both)."""
        engine = self.engine
        site_name, own_name = self.names[id(site)], self.names[id(entry.module)]
        prefix = own_name[len(site_name) + 1:] if site_name else own_name
        target = next((e for e in engine.entries if e.module is site and e.active and e.handler is FALLBACK), None)
        if target is None:
            target = Entry(index=len(engine.entries), name=site_name or type(site).__name__, module=site,
                           handler=FALLBACK, param_names=(), param_index=(), gram_capable=False)
            engine.entries.append(target)
            engine.hooks.add(target)
        for name, row in zip(entry.paths, entry.param_index):
            if row not in target.param_index:
                target.param_names += (f"{prefix}.{name}" if prefix else name,)
                target.param_index += (row,)
        target.site_of += (*entry.site_of, entry.name)
        inside = f"{site_name}." if site_name else ""
        for e in engine.entries:
            if e is target or not e.active or not self.names.get(id(e.module), "").startswith(inside):
                continue
            if e.module is site and e.handler is not FALLBACK:
                continue
            keep = [(n, p, r) for n, p, r in zip(e.param_names, e.paths, e.param_index) if r not in target.param_index]
            e.param_names, e.param_index = tuple(n for n, _, _ in keep), tuple(r for _, _, r in keep)
            if e.param_paths:
                e.param_paths = tuple(p for _, p, _ in keep)
            if not keep:
                e.active, e.gram_capable, e.residual_from = False, False, ()
        for e in engine.entries:
            if any(not engine.entries[i].active for i in e.residual_from):
                e.gram_capable, e.residual_from = False, ()  # a tied head lost its embedding's rows

    def _site_for(self, entry: Entry) -> nn.Module | None:
        """The smallest module strictly enclosing ``entry`` whose calls carry the batch (the whole
        model does, by the id contract); an entry already valued at a site moves above it."""
        module = self.parent.get(id(entry.module))
        while module is not None:
            if self._carries.get(id(module), module is self.engine.module):
                return module
            module = self.parent.get(id(module))
        return None

def _same(a: Tensor, b: Tensor) -> bool:
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-6, atol=1e-7 * float(b.abs().max()))
