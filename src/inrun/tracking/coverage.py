"""Which route valued each trainable parameter, and the tracker described (``tracker.json``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from torch import nn

from .entries import Entry
from .params import ParamTable


@dataclass
class Coverage:
    """Which route valued each trainable parameter, by name and as a fraction of parameters."""

    routes: dict[str, list[str]]
    numel: dict[str, int]
    valued_at: dict[str, list[str]] = field(default_factory=dict)
    """Parameter -> the module(s) whose calls value it: its own module, or an enclosing *site*
    when the row verification moved it there (a name ending in ``(site)``)."""
    documents: str | None = None
    """How documents packed into rows (``tracker.step(ids, segments=...)``) were valued; ``None``
    when every player was a row."""

    def per_parameter(self) -> list[tuple[str, str, str]]:
        """``(parameter, route, module level)`` for every trainable parameter."""
        route_of = {n: r for r, names in self.routes.items() for n in names}
        return [(n, route_of[n], ", ".join(self.valued_at.get(n, []))) for n in sorted(route_of)]

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
        if self.documents is not None:
            lines.append(f"documents: {self.documents}")
        moved = [(n, r, m) for n, r, m in self.per_parameter() if "(site)" in m]
        if moved:
            lines.append("valued at an enclosing module (its rows are not its examples):")
            lines += [f"  {n} -> {m}" for n, _, m in moved]
        return "\n".join(lines)


def coverage_of(entries: list[Entry], table: ParamTable, route_of: Callable[[Entry], str]) -> Coverage:
    """Routes by parameter; a parameter shared by several modules (a tied embedding and LM head)
    is listed under the routes of all its uses joined by ``+``."""
    by_param: dict[int, list[str]] = {}
    where: dict[int, list[str]] = {}
    for e in entries:
        if not e.active:
            continue
        route = route_of(e)
        for i in e.param_index:
            if route not in by_param.setdefault(i, []):
                by_param[i].append(route)
            where.setdefault(i, []).append(f"{e.name} (site)" if e.site_of else e.name)
    routes: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for i, used in sorted(by_param.items()):
        label = "+".join(used)
        routes.setdefault(label, []).append(table.names[i])
        numel[label] = numel.get(label, 0) + table.params[i].numel()
    return Coverage(routes, numel, {table.names[i]: m for i, m in where.items()})


class Described(Protocol):
    """What :func:`describe` reads of the engine (:class:`~inrun.tracking.engine.StepEngine`)."""

    module: nn.Module
    entries: list[Entry]
    table: ParamTable
    config: Any
    optimizer: Any
    update: Any  # the optimizer's rule
    rule: Any  # the value rule
    ddp: Any
    cost: Any
    log: Any

    def coverage(self) -> Coverage: ...


def describe(engine: Described) -> dict[str, Any]:
    """Settings, the route of every parameter and the valued modules: what ``tracker.json`` holds
    and ``inrun inspect RUN_DIR`` prints."""
    coverage = engine.coverage()
    route_of = {p: r for r, names in coverage.routes.items() for p in names}
    modules = []
    for e in engine.entries:
        names = [engine.table.names[i] for i in e.param_index]
        try:
            d_in, d_out = e.handler.feature_sizes(e.module)
        except Exception:  # a handler without fixed feature sizes (the fallback)
            d_in, d_out = 0, 0
        modules.append({
            "name": e.name or type(e.module).__name__, "type": type(e.module).__name__,
            "route": "+".join(sorted({route_of.get(n, "not reached yet") for n in names})),
            "params": list(e.paths), "numel": int(sum(engine.table.params[i].numel() for i in e.param_index)),
            "d_in": int(d_in), "d_out": int(d_out),
        })
    unique = {id(p): p for p in engine.module.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    element = next((p.element_size() for p in unique.values() if p.requires_grad), 4)
    return {
        "step_count": engine.log.count,
        "config": asdict(engine.config),
        "optimizer": type(engine.optimizer).__name__,
        "rule": type(engine.update).__name__,
        "keeps_factors": bool(engine.rule.keeps_factors),
        "world_size": 1 if engine.ddp is None else engine.ddp.world_size,
        "coverage": {"routes": coverage.routes, "numel": coverage.numel},
        "modules": modules,
        "parameters": {"total": int(total), "trainable": int(trainable), "frozen": int(total - trainable),
                       "element_size": int(element), "tensors": sum(1 for p in unique.values() if p.requires_grad)},
        "cost": engine.cost.as_dict(),
    }
