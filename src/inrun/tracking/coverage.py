"""Which route valued each trainable parameter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .entries import Entry
from .params import ParamTable


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


def coverage_of(entries: list[Entry], table: ParamTable, route_of: Callable[[Entry], str]) -> Coverage:
    """Routes by parameter; a parameter shared by several modules (a tied embedding and LM head)
    is listed under the routes of all its uses joined by ``+``."""
    by_param: dict[int, list[str]] = {}
    for e in entries:
        route = route_of(e)
        for i in e.param_index:
            if route not in by_param.setdefault(i, []):
                by_param[i].append(route)
    routes: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for i, used in sorted(by_param.items()):
        label = "+".join(used)
        routes.setdefault(label, []).append(table.names[i])
        numel[label] = numel.get(label, 0) + table.params[i].numel()
    return Coverage(routes, numel)
