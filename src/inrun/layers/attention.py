"""Modules whose parameters are linear maps applied through ``F.linear`` inside their own forward:
``nn.MultiheadAttention`` (and so ``nn.TransformerEncoder/Decoder`` and ``nn.Transformer``).

Its packed in-projection is one linear map ``[q; k; v] = x W_inᵀ + b_in`` with raw parameters
(``in_proj_weight [3E, E]``): one ``F.linear`` call on the whole weight for self-attention, two on
row slices of it (``W_in[:E]`` for the query, ``W_in[E:]`` for key and value) for encoder-decoder
attention. Its out-projection is ``F.linear(context, out_proj.weight, out_proj.bias)``: the
``out_proj`` submodule's forward is never called. Each of the two is a *part*: a weight (and its
bias) whose per-example gradient is ``Σ_calls D_zᵀ A_z`` over the ``F.linear`` calls that used it,
so every route of ``nn.Linear`` (vector, Gram) applies to each call, with the contraction vector
cut to the rows of the weight the call used.

How the calls are seen: while a tracked call runs, :class:`LinearTaps` (a torch-function mode) sees
``F.multi_head_attention_forward`` and runs torch's own code for it with one name changed:
``linear`` is a function that calls the real ``F.linear`` and reports ``(x, weight, bias, y)``.
Nothing the module computes changes (the same code on the same tensors: the same bits), and a call
whose weight is none of the part's parameters (or a torch whose attention stopped calling
``linear`` by that name) is simply not reported: the row verification then sees the part's
parameters get gradient without a call and values them by the fallback at an enclosing module.

Rows: inside the attention, tensors are sequence-first. An in-projection call's input is
``[S, B, E]`` (the batch at dimension 1); the out-projection's is ``[S·B, E]``, row ``s·B + b``
of example ``b`` (*strided* rows). The tracker's row verification proves both on the user's model.
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

from .linear import GramFactors, LinearHandler, gram_dot
from .registry import LayerHandler, register_handler


class PartCall(NamedTuple):
    """Which rows of a part's weight (and whether its bias) one ``F.linear`` call used."""

    rows: tuple[int, int]
    bias: bool


class SlicedInput(NamedTuple):
    """A validation call's input and the rows of the weight it was multiplied with."""

    x: Tensor
    rows: tuple[int, int]


@dataclass(frozen=True)
class LinearPart:
    """A weight (``[P, d]``, output-by-input) and its bias of a module, used through ``F.linear``."""

    name: str
    weight: str
    """The weight's path relative to the module (``"in_proj_weight"``, ``"out_proj.weight"``)."""
    bias: str | None


@dataclass
class SlicedGram:
    """The Gram route's validation factors of a part: one :class:`GramFactors` per row slice of the
    weight its validation calls used (a slice used by several calls has their rows concatenated)."""

    slices: dict[tuple[int, int], GramFactors]
    width: int
    """Rows of the whole weight (``P``)."""

    @property
    def tokens(self) -> int:
        """Validation positions, counted as if every slice were the whole weight (for the cost model)."""
        d = next(iter(self.slices.values())).A.shape[1]
        cost = sum(f.tokens * (d + b - a) for (a, b), f in self.slices.items())
        return -(-cost // (d + self.width))

    @property
    def residual_rows(self) -> int:
        return 0


class PartHandler(LinearHandler):
    """One :class:`LinearPart` of a module: the routes of ``nn.Linear`` per ``F.linear`` call.

    The tracker names the part's parameters ``weight`` and ``bias`` and cuts the contraction
    vectors to each call's rows before :meth:`dot`; the feature sizes come from the call's tensors.
    """

    name = "linear_part"
    supports_bookkeeping = False

    def __init__(self, part: LinearPart) -> None:
        self.part = part

    def in_out_features(self, module: nn.Module) -> tuple[int, int]:  # type: ignore[override]
        p, d = module.get_parameter(self.part.weight).shape
        return d, p

    def validation_gram(self, module: nn.Module, calls: list[tuple[Any, Tensor]]) -> SlicedGram:
        dtype = module.get_parameter(self.part.weight).dtype
        by_rows: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for saved, g in calls:
            by_rows.setdefault(saved.rows, []).append((saved.x, g))
        slices = {
            rows: GramFactors(
                torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in pairs]).to(dtype),
                torch.cat([g.reshape(-1, g.shape[-1]) for _, g in pairs]).to(dtype),
            )
            for rows, pairs in by_rows.items()
        }
        return SlicedGram(slices, self.in_out_features(module)[1])

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


class MultiheadAttentionHandler(LayerHandler):
    """``nn.MultiheadAttention`` as two linear parts (see the module docstring). Valued by its parts;
    a configuration whose parameters are not all linear maps (``add_bias_kv``: learned key and
    value rows; separate ``q/k/v_proj_weight``) takes the fallback."""

    name = "multihead_attention"

    def parts(self, module: nn.Module) -> list[LinearPart] | None:
        if module.bias_k is not None or not module._qkv_same_embed_dim:
            return None
        return [
            LinearPart("in_proj", "in_proj_weight", "in_proj_bias" if module.in_proj_bias is not None else None),
            LinearPart("out_proj", "out_proj.weight", "out_proj.bias" if module.out_proj.bias is not None else None),
        ]


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


def _clone(fn: Callable, namespace: dict[str, Any]) -> Callable:
    """``fn`` with its global names looked up in ``namespace`` (the same code)."""
    out = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


class LinearTaps(TorchFunctionMode):
    """While entered, reports every ``F.linear`` call of a module's forward (direct, or inside
    ``F.multi_head_attention_forward``) to ``on_linear(x, weight, bias, y)``; computes nothing else
    and changes no result."""

    def __init__(self, on_linear: Callable[[Tensor, Tensor, Tensor | None, Tensor], None]) -> None:
        super().__init__()
        self.on_linear = on_linear
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
        return func(*args, **kwargs)


register_handler(nn.MultiheadAttention, handler=MultiheadAttentionHandler())
