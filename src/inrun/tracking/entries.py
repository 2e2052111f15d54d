"""Tracked modules: each module with trainable parameters of its own, its handler, and which
rows of the parameter table it values; parameters shared between modules are detected here."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..layers import FALLBACK, LayerHandler, handler_for
from ..layers.parts import GroupedPartHandler, LinearPart, PartHandler
from .params import ParamTable
from .rows import inherited_batch_dims

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """A tracked module: its handler and where its parameters sit in the parameter table."""

    index: int
    name: str
    module: nn.Module
    handler: LayerHandler
    param_names: tuple[str, ...]
    param_index: tuple[int, ...]
    gram_capable: bool
    residual_from: tuple[int, ...] = ()
    """Entries whose row-sparse gradients share this layer's weight (the tied LM head's
    embedding): the Gram route adds their validation gradient in the rows they touch."""
    route: str = "unused"
    """The route that last valued this module's parameters (for :meth:`coverage`)."""
    batch_dim: int | None = None
    """The batch dimension of its calls when an enclosing module declares a sequence-first layout."""
    active: bool = True
    """``False`` once every parameter was moved to an enclosing site."""
    site_of: tuple[str, ...] = ()
    """For a site: the modules whose parameters it values (their qualified names)."""
    param_paths: tuple[str, ...] = ()
    """A part of a module (:mod:`inrun.layers.attention`): the paths of ``param_names`` relative
    to ``module`` (its parameters are named ``weight`` and ``bias`` for the routes)."""

    @property
    def paths(self) -> tuple[str, ...]:
        """The parameters' paths relative to ``module``."""
        return self.param_paths or self.param_names

    def row(self, param_name: str) -> int:
        """The parameter table row of one of this module's parameters."""
        return self.param_index[self.param_names.index(param_name)]


def build_entries(module: nn.Module, table: ParamTable) -> list[Entry]:
    """One entry per module that owns trainable parameters, in ``named_modules`` order.

    A parameter owned by a module and by one inside it is valued at the inner one only (if the
    outer one used it too, the step's checks see the missing part and refuse). A weight owned by
    one module can take the Gram route; a weight shared with modules whose
    gradients touch only some rows (embeddings: a tied LM head) can too, with those rows added
    as a residual. Any other sharing leaves the vector route, which is exact for any sharing
    because it dots with the *total* validation gradient.
    """
    owners: dict[int, list[nn.Module]] = {}
    owner_names: dict[int, list[str]] = {}
    for name, m in module.named_modules():
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
            owner_names.setdefault(id(p), []).append(name)
    seq_first = inherited_batch_dims(module)
    parts_of, claimed = _linear_parts(module)
    entries: list[Entry] = []
    for name, mod in module.named_modules():
        if id(mod) in parts_of:
            entries += _part_entries(name, mod, parts_of[id(mod)], table, owners, len(entries))
        own = [
            (n, p) for n, p in mod.named_parameters(recurse=False)
            if p.requires_grad and not _owned_below(name, owner_names[id(p)]) and id(p) not in claimed
        ]
        if not own:
            continue
        handler = handler_for(mod) or FALLBACK
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            handler.check(mod)  # BatchNorm's mode is checked at every step instead
        weight = dict(own).get("weight")
        entries.append(
            Entry(
                index=len(entries),
                name=name or type(mod).__name__,
                module=mod,
                handler=handler,
                param_names=tuple(n for n, _ in own),
                param_index=tuple(table.row(p) for _, p in own),
                gram_capable=handler.supports_gram and weight is not None and len(owners[id(weight)]) == 1,
                batch_dim=seq_first.get(id(mod)),
            )
        )
        if handler is FALLBACK:
            logger.info("no handler for %s (%s): using the torch.func fallback", name, type(mod).__name__)
    by_module = {id(e.module): e for e in entries}
    for e in entries:
        weight = getattr(e.module, "weight", None)
        if not e.handler.supports_gram or weight is None or "weight" not in e.param_names or e.gram_capable:
            continue
        others = [by_module.get(id(m)) for m in owners[id(weight)] if m is not e.module]
        if others and all(o is not None and o.handler.row_sparse for o in others):
            e.gram_capable = True
            e.residual_from = tuple(o.index for o in others)
    return entries


def _linear_parts(module: nn.Module) -> tuple[dict[int, list[LinearPart]], set[int]]:
    """Modules valued by their linear parts (``id(module) -> parts``) and the parameters the parts
    claim (a submodule's too: ``nn.MultiheadAttention`` applies ``out_proj``'s weight itself)."""
    parts_of: dict[int, list[LinearPart]] = {}
    claimed: set[int] = set()
    for _, mod in module.named_modules():
        handler = handler_for(mod)
        parts = handler.parts(mod) if handler is not None else None
        if not parts:
            continue
        parts_of[id(mod)] = parts
        for part in parts:
            claimed.update(id(mod.get_parameter(path)) for path in (part.weight, part.bias) if path is not None)
    return parts_of, claimed


def _part_entries(
    name: str, mod: nn.Module, parts: list[LinearPart], table: ParamTable, owners: dict[int, list[nn.Module]],
    start: int,
) -> list[Entry]:
    out = []
    for part in parts:
        named = [(alias, path, mod.get_parameter(path)) for alias, path in (("weight", part.weight), ("bias", part.bias))
                 if path is not None]
        named = [(alias, path, p) for alias, path, p in named if p.requires_grad]
        if not named:
            continue
        weight = mod.get_parameter(part.weight)
        out.append(Entry(
            index=start + len(out),
            name=f"{name}.{part.name}" if name else part.name,
            module=mod,
            handler=GroupedPartHandler(part) if part.grouped else PartHandler(part),
            param_names=tuple(alias for alias, _, _ in named),
            param_index=tuple(table.row(p) for _, _, p in named),
            gram_capable=weight.requires_grad and len(owners[id(weight)]) == 1,
            param_paths=tuple(path for _, path, _ in named),
        ))
    return out


def _owned_below(name: str, owners: list[str]) -> bool:
    """Whether a module inside ``name`` also owns the parameter (BERT's MLM head and its decoder
    share one bias): the parameter is valued once, where it is used, at the innermost owner."""
    prefix = f"{name}." if name else ""
    return any(o != name and o.startswith(prefix) for o in owners)


def joint_groups(entries: list[Entry]) -> list[list[int]]:
    """Parameter rows valued together (the fallback values a module's parameters jointly): the
    per-step check and the row verification judge each group as one. Groups that share a row (a
    tied parameter) are merged."""
    groups: list[set[int]] = []
    for e in entries:
        if e.active and e.handler.multi_output and len(e.param_index) > 1:
            rows = set(e.param_index)
            for g in [g for g in groups if g & rows]:
                rows |= g
                groups.remove(g)
            groups.append(rows)
    return [sorted(g) for g in groups]
