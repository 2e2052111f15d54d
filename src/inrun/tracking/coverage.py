"""Which route valued each trainable parameter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
