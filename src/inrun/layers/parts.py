"""Linear parts: parameters a module applies as linear maps inside its own forward, valued per call
by the routes of ``nn.Linear`` without re-running anything.

A *part* is a weight (and its bias) of a module. Its per-example gradient is ``Σ_calls D_zᵀ A_z``
over the calls that applied it, so each call is contracted as an ``nn.Linear`` call would be, with
the contraction vector cut to what the call used:

* ``F.linear(x, W[a:b], b[a:b])``: rows ``a:b`` of a 2-D weight (``nn.MultiheadAttention``'s
  packed in-projection, :mod:`inrun.layers.attention`);
* ``torch._grouped_mm(x, W_experts, offs)``: a 3-D weight ``[E, ...]``, expert ``e`` applied to
  the rows ``offs[e-1]:offs[e]`` of ``x`` (mixture-of-experts layers, :mod:`inrun.layers.experts`);
  row ``r`` belongs to the module input's row ``index[r]`` (the tokens were gathered by expert).

How the calls are seen: while a tracked call of the module runs, :class:`LinearTaps` (a
torch-function mode) watches the torch functions the forward calls and reports the ones above
with their input and output; the tracker hooks the output's gradient. Nothing the module computes
changes. A call that is not reported leaves its part's parameters with gradient and no values,
which the row verification sees (the parameters are then valued by the fallback at an enclosing
module), so a library that stops calling these functions is refused or valued slowly, never wrong.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .linear import GramFactors, LinearHandler, gram_dot, rows_of_calls


@dataclass(frozen=True)
class LinearPart:
    """A weight and its bias of a module: ``[P, d]`` (output-by-input) applied with ``F.linear``,
    or ``[E, P, d]`` / ``[E, d, P]`` (``transposed``) applied per expert with a grouped matmul."""

    name: str
    weight: str
    """The weight's path relative to the module (``"in_proj_weight"``, ``"out_proj.weight"``)."""
    bias: str | None
    grouped: bool = False
    transposed: bool = False
    sequence_first: bool = True
    """Where an ``F.linear`` call's rows come from: sequence-first tensors (``nn.MultiheadAttention``:
    ``[S, B, ·]`` or ``[S·B, ·]``), or the rows of an ordinary call (``[B, ·]``, ``[B·T, ·]``: a router)."""


class PartCall(NamedTuple):
    """What one call of a part used: rows ``a:b`` of its weight and whether its bias (``F.linear``),
    or, for a grouped call, the end row of each expert's group (``offs``) and the module input's row
    each row of the call came from (``index``, length ``rows_total``)."""

    rows: tuple[int, int]
    bias: bool
    offs: Tensor | None = None
    index: Tensor | None = None
    rows_total: int = 0


class PartInput(NamedTuple):
    """A validation call of a part: its input and :class:`PartCall`."""

    x: Tensor
    call: PartCall


@dataclass
class SlicedGram:
    """The Gram route's validation factors of a part: one :class:`GramFactors` per row slice of the
    weight (``F.linear`` calls) or per expert (grouped calls); a slice or an expert used by several
    calls has their rows concatenated."""

    slices: dict[Any, GramFactors]
    width: int
    """Rows of the whole weight (``P``) for slices; experts for grouped parts."""
    grouped: bool = False

    @property
    def tokens(self) -> int:
        """Validation positions one training position meets on this route (for the cost model): for
        slices, as if every slice were the whole weight; for experts, the mean per expert."""
        if self.grouped:
            return -(-sum(f.tokens for f in self.slices.values()) // max(1, len(self.slices)))
        d = next(iter(self.slices.values())).A.shape[1]
        cost = sum(f.tokens * (d + b - a) for (a, b), f in self.slices.items())
        return -(-cost // (d + self.width))

    @property
    def residual_rows(self) -> int:
        return 0


class PartHandler(LinearHandler):
    """One :class:`LinearPart` of a module, by the routes of ``nn.Linear`` per call.

    The tracker names the part's parameters ``weight`` and ``bias``; :meth:`part_dots` cuts the
    contraction vectors to the call's rows; the feature sizes come from the call's tensors.
    """

    name = "linear_part"
    supports_bookkeeping = False

    def __init__(self, part: LinearPart) -> None:
        self.part = part

    def in_out_features(self, module: nn.Module) -> tuple[int, int]:  # type: ignore[override]
        p, d = module.get_parameter(self.part.weight).shape
        return d, p

    def part_dots(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor], gram: Any,
        call: PartCall,
    ) -> dict[str, Tensor]:
        """``{name: [rows, K]}`` dots of one call (rows as the call's, before the row map)."""
        a, b = call.rows
        names = [n for n in vectors if n != "bias" or call.bias]
        cut = {n: vectors[n][:, a:b] for n in names}
        out: dict[str, Tensor] = {}
        if gram is not None:
            out["weight"] = self.gram_dots(module, saved, grad_out, gram, call).unsqueeze(1)
            cut.pop("weight", None)
        if cut:
            out.update(self.dot(module, saved, grad_out, cut))
        return out

    def validation_gram(self, module: nn.Module, calls: list[tuple[Any, Tensor]]) -> SlicedGram:
        dtype = module.get_parameter(self.part.weight).dtype
        by_rows: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for saved, g in calls:
            by_rows.setdefault(saved.call.rows, []).append((saved.x, g))
        return SlicedGram({rows: _factors(pairs, dtype) for rows, pairs in by_rows.items()},
                          self.in_out_features(module)[1])

    def gram_dots(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, factors: Any, part: PartCall | None = None,
    ) -> Tensor:
        """``[B]``: ``Σ_slices <D_zᵀ A_z, D_valᵀ A_val>`` over the rows the training call and each
        validation slice share (the weight's validation gradient in those rows is the sum of the
        slices covering them)."""
        A, D = self.gram_factors(module, saved, grad_out)
        start, stop = part.rows if part is not None else (0, factors.width)
        total: Tensor | None = None
        for (a, b), f in factors.slices.items():
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            mine = D[..., lo - start : hi - start]
            theirs = f if (lo, hi) == (a, b) else GramFactors(f.A, f.D[:, lo - a : hi - a])
            part_dots = gram_dot(A, mine, theirs)
            total = part_dots if total is None else total + part_dots
        return total if total is not None else A.new_zeros(A.shape[0])

    def gram_cost(self, module: nn.Module, n_val_tokens: int, residual_rows: int = 0) -> float:
        d, p = self.in_out_features(module)
        return float(n_val_tokens * (d + p + 1))

    def gram_residual(self, module: nn.Module, total_grad: Tensor, factors: Any, rows: Tensor) -> Any:
        raise NotImplementedError("a part's weight is not shared with embeddings")


class GroupedPartHandler(PartHandler):
    """A 3-D expert weight applied by a grouped matmul: each expert's rows of a call are an
    ``nn.Linear`` call of that expert's matrix; a row's dots go to the module input's row it was
    gathered from (``PartCall.index``), so they come out per row of the module's input."""

    name = "expert_part"
    autocast_input = False  # the grouped matmul is not autocast: transformers casts its input itself

    def in_out_features(self, module: nn.Module) -> tuple[int, int]:  # type: ignore[override]
        _, a, b = module.get_parameter(self.part.weight).shape
        return (a, b) if self.part.transposed else (b, a)

    def vector_cost(self, module: nn.Module) -> float:
        d, p = self.in_out_features(module)
        return float(d * p)

    @staticmethod
    def groups(call: PartCall) -> list[tuple[int, int, int]]:
        """``(expert, first row, end row)`` of the call's non-empty groups (one host read of ``offs``)."""
        ends = call.offs.tolist()
        out, start = [], 0
        for e, end in enumerate(ends):
            if end > start:
                out.append((e, start, int(end)))
            start = int(end)
        return out

    def part_dots(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor], gram: Any,
        call: PartCall,
    ) -> dict[str, Tensor]:
        U = vectors["weight"]  # (K, E, *matrix)
        K = U.shape[0]
        x, delta = saved.to(U.dtype), grad_out.to(U.dtype)
        rows = torch.zeros(x.shape[0], K, dtype=U.dtype, device=x.device)
        for e, lo, hi in self.groups(call):
            xe, de = x[lo:hi], delta[lo:hi]
            factors = gram.slices.get(e) if gram is not None else None
            if gram is not None:
                if factors is not None:
                    rows[lo:hi, 0] = gram_dot(xe.unsqueeze(1), de.unsqueeze(1), factors)
                continue  # an expert no validation token reached has no validation gradient
            Ue = U[:, e].transpose(-1, -2) if self.part.transposed else U[:, e]  # (K, p, d)
            for k in range(K):
                rows[lo:hi, k] = ((xe @ Ue[k].T) * de).sum(dim=-1)
        out = torch.zeros(call.rows_total, K, dtype=U.dtype, device=x.device)
        return {"weight": out.index_add_(0, call.index, rows)}

    def validation_gram(self, module: nn.Module, calls: list[tuple[Any, Tensor]]) -> SlicedGram:
        dtype = module.get_parameter(self.part.weight).dtype
        by_expert: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for saved, g in calls:
            for e, lo, hi in self.groups(saved.call):
                by_expert.setdefault(e, []).append((saved.x[lo:hi], g[lo:hi]))
        return SlicedGram({e: _factors(pairs, dtype) for e, pairs in by_expert.items()},
                          module.get_parameter(self.part.weight).shape[0], grouped=True)


def _factors(pairs: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> GramFactors:
    return GramFactors(rows_of_calls([a for a, _ in pairs], dtype), rows_of_calls([g for _, g in pairs], dtype))


def row_slice(t: Tensor, whole: Tensor) -> tuple[int, int] | None:
    """``(a, b)`` if ``t`` is ``whole`` or its rows ``a:b`` (a view: ``split``, ``chunk``, slicing)."""
    if t is whole:
        return 0, whole.shape[0]
    if (
        t.dim() != whole.dim() or t.shape[1:] != whole.shape[1:] or t.stride() != whole.stride()
        or t.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
    ):
        return None
    offset = t.storage_offset() - whole.storage_offset()
    step = whole.stride(0)
    if step <= 0 or offset % step:
        return None
    a = offset // step
    b = a + t.shape[0]
    return (a, b) if a >= 0 and b <= whole.shape[0] else None


def same_matrix_stack(t: Tensor, whole: Tensor, transposed: bool) -> bool:
    """Whether ``t`` is the 3-D ``whole`` as a grouped matmul takes it (``[E, d, P]``): the tensor
    itself (``transposed`` storage) or its view with the last two dimensions swapped."""
    if t is whole:
        return transposed
    return (
        not transposed and t.dim() == 3 and t.shape == whole.transpose(-1, -2).shape
        and t.stride() == whole.transpose(-1, -2).stride() and t.storage_offset() == whole.storage_offset()
        and t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    )


def _clone(fn: Callable, namespace: dict[str, Any]) -> Callable:
    """``fn`` with its global names looked up in ``namespace`` (the same code)."""
    out = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


class LinearTaps(TorchFunctionMode):
    """While entered, reports the linear maps a module's forward applies and computes nothing else:

    * ``on_linear(x, weight, bias, y)`` for every ``F.linear`` call, direct or inside
      ``F.multi_head_attention_forward`` (run as torch's own code with ``linear`` reporting);
    * ``on_grouped(x, weight, offs, y)`` for every ``torch._grouped_mm`` call;
    * ``on_gather(source, index, y)`` for every ``source[index]`` with an integer tensor index.
    """

    def __init__(
        self, on_linear: Callable[[Tensor, Tensor, Tensor | None, Tensor], None],
        on_grouped: Callable[[Tensor, Tensor, Tensor, Tensor], None] | None = None,
        on_gather: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_linear, self.on_grouped, self.on_gather = on_linear, on_grouped, on_gather
        namespace = dict(F.multi_head_attention_forward.__globals__)
        namespace["linear"] = self._linear
        for name in ("_in_projection_packed", "_in_projection"):
            namespace[name] = _clone(getattr(F, name), namespace)
        self._attention = _clone(F.multi_head_attention_forward, namespace)

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        y = F.linear(input, weight, bias)
        self.on_linear(input, weight, bias, y)
        return y

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._attention(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is torch._grouped_mm and self.on_grouped is not None and kwargs.get("bias") is None:
            self.on_grouped(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None), out)
        elif (
            func is Tensor.__getitem__ and self.on_gather is not None and len(args) == 2
            and isinstance(args[1], Tensor) and not args[1].is_floating_point() and args[1].dtype != torch.bool
        ):
            self.on_gather(args[0], args[1], out)
        return out
