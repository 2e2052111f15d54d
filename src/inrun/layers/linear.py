"""``nn.Linear`` and Hugging Face ``Conv1D`` (GPT-2's transposed linear layer).

Per-example weight gradient of ``s = a Wᵀ + b`` for example z with T positions:
``G_z = D_zᵀ A_z`` with ``A_z [T, d]`` inputs and ``D_z [T, p]`` output gradients.

* vector route: ``<G_z, U> = sum(D_z ⊙ (A_z Uᵀ))``, cost ``T·d·p`` per example;
* Gram route:   ``<G_z, G_val> = sum((A_z A_vᵀ) ⊙ (D_z D_vᵀ))`` over all validation tokens,
  cost ``T·N_val·(d + p)``, cheaper when ``N_val·(d + p) < d·p``;
* bias: ``<Σ_t D_z,t, u_b>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import (
    LayerHandler,
    PerExampleGradients,
    as_float,
    first_input,
    register_handler,
    register_predicate,
)

BOOKKEEPING_COST_PER_ELEMENT = 64.0
"""Per-example cost of the book-keeping route, in multiply-add equivalents per weight element:
writing, reading and adding each example's gradient is memory-bound. Measured on a 2-core CPU
(benchmarks/overhead.py shapes): 40-90 for layers of 0.06-1M weights at 128 tokens. So the route
wins for sequences (vector costs T per element) and loses for one position per example (T = 1)."""


@dataclass
class GramFactors:
    """The validation side of the Gram route for one layer's weight.

    ``A [N, d]``, ``D [N, p]`` hold every validation token of every call of the layer, so
    ``Dᵀ A`` is the part of the validation weight gradient that flows through this layer. A
    weight shared with embeddings (GPT-2's tied LM head) also gets gradient from their lookups,
    only in the rows of the validation tokens: ``rows [R]`` and ``residual [R, d]`` (output-by-input
    layout) hold the total validation gradient minus ``Dᵀ A`` there.
    """

    A: Tensor
    D: Tensor
    rows: Tensor | None = None
    residual: Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.A.shape[0]

    @property
    def residual_rows(self) -> int:
        return 0 if self.rows is None else self.rows.numel()


class LinearHandler(LayerHandler):
    """``nn.Linear`` with any number of leading dimensions ``[B, *, d] -> [B, *, p]``."""

    name = "linear"
    param_names = ("weight", "bias")
    supports_gram = True
    supports_bookkeeping = True
    traceable = True
    autocast_input = True
    transposed = False

    @staticmethod
    def weight_out_in(module: nn.Module, weight_like: Tensor) -> Tensor:
        """A weight-shaped tensor ``[..., *param.shape]`` as ``[..., p, d]``."""
        return weight_like

    @staticmethod
    def in_out_features(module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        return first_input(module, args, kwargs).detach()

    def dot(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        d, p = saved.shape[-1], grad_out.shape[-1]  # a part's call may use some rows of its weight
        out: dict[str, Tensor] = {}
        batch = grad_out.shape[0]
        if "weight" in vectors:
            U = self.weight_out_in(module, vectors["weight"])  # (K, p, d)
            A = as_float(saved, U).reshape(saved.shape[0], -1, d)  # (B|1, T, d)
            D = as_float(grad_out, U).reshape(batch, -1, p)  # (B, T, p)
            K = U.shape[0]
            if K == 1:
                # Multiply on the narrower side so the temporary is [B, T, min(d, p)].
                if d <= p:
                    val = ((D @ U[0]) * A).sum(dim=(1, 2))
                else:
                    val = ((A @ U[0].T) * D).sum(dim=(1, 2))
                out["weight"] = val.unsqueeze(1)
            else:
                proj = (A @ U.reshape(K * p, d).T).unflatten(-1, (K, p))  # (B|1, T, K, p)
                out["weight"] = (proj * D.unsqueeze(2)).sum(dim=(1, 3))
        if "bias" in vectors:
            ub = vectors["bias"]  # (K, p)
            D = as_float(grad_out, ub).reshape(batch, -1, p)
            if ub.shape[0] == 1 and D.is_contiguous():
                # One vector: a matrix-vector product reads D once (1.4 -> 0.7 ms for S's [2048, 3072]),
                # where the sum over positions first writes a [B, p] and then multiplies it.
                out["bias"] = (D.view(-1, p) @ ub[0]).view(batch, -1).sum(dim=1, keepdim=True)
            else:
                out["bias"] = D.sum(dim=1) @ ub.T
        return out

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() >= 3

    def condense(self, module: nn.Module, saved: Any, grad_out: Tensor) -> PerExampleGradients | None:
        """Each row's weight (and bias) gradient, kept for a contraction after the backward in
        place of its input and output gradient when that is smaller: ``d·p`` floats against
        ``T·(d + p)`` (sequences longer than ``d·p / (d + p)``: 576 positions for GPT-2 small's
        attention). One batched product in at least float32, the weight gradient's FLOPs again."""
        d, p = self.in_out_features(module)
        if not isinstance(saved, Tensor) or saved.dim() < 3 or saved.shape[-1] != d or grad_out.shape[-1] != p:
            return None
        batch = grad_out.shape[0]
        T = grad_out[0].numel() // p
        dtype = torch.promote_types(grad_out.dtype, torch.float32)
        kept = T * (d * saved.element_size() + p * grad_out.element_size())
        if d * p * dtype.itemsize >= kept:
            return None
        A = saved.reshape(saved.shape[0], -1, d).to(dtype)
        D = grad_out.reshape(batch, -1, p).to(dtype)
        if A.shape[0] != batch:
            A = A.expand(batch, *A.shape[1:])
        out = PerExampleGradients()
        out["weight"] = self.weight_out_in(module, D.transpose(1, 2) @ A)  # [rows, *weight.shape]
        if getattr(module, "bias", None) is not None:
            out["bias"] = D.sum(dim=1)
        return out

    def vector_cost(self, module: nn.Module) -> float:
        d, p = self.in_out_features(module)
        return float(d * p)

    def feature_sizes(self, module: nn.Module) -> tuple[int, int]:
        return self.in_out_features(module)

    # -- Gram route -------------------------------------------------------------------------
    def gram_factors(self, module: nn.Module, saved: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        """``(A [B, T, d], D [B, T, p])`` with per-example weight gradient ``D_zᵀ A_z``."""
        d, p = saved.shape[-1], grad_out.shape[-1]
        batch = grad_out.shape[0]
        A = saved.reshape(saved.shape[0], -1, d)
        if A.shape[0] != batch:
            A = A.expand(batch, *A.shape[1:])
        return A, grad_out.reshape(batch, -1, p)

    def gram_dots(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, factors: GramFactors, part: Any = None,
    ) -> Tensor:
        """``[B]`` Gram-route dots of one call's per-example weight gradients with the validation's."""
        A, D = self.gram_factors(module, saved, grad_out)
        return gram_dot(A, D, factors)

    def validation_gram(self, module: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> GramFactors:
        """The validation factors from every ``(input, output gradient)`` call of the layer, in
        the weight's dtype (autocast leaves 16-bit activations and gradients)."""
        return GramFactors(rows_of_calls([a for a, _ in calls], module.weight.dtype),
                           rows_of_calls([g for _, g in calls], module.weight.dtype))

    def gram_cost(self, module: nn.Module, n_val_tokens: int, residual_rows: int = 0) -> float:
        """Multiply-adds per training position of the Gram route for the weight."""
        d, p = self.in_out_features(module)
        return float(n_val_tokens * (d + p + 1) + residual_rows * (d + 1))

    def gram_residual(self, module: nn.Module, total_grad: Tensor, factors: GramFactors, rows: Tensor) -> GramFactors:
        """Factors completed with the residual of a weight shared with embeddings looked up at ``rows``."""
        total = self.weight_out_in(module, total_grad)[rows]  # (R, d)
        own = factors.D[:, rows].T @ factors.A  # (R, d): this layer's part at those rows
        return GramFactors(factors.A, factors.D, rows, total - own.to(total.dtype))

    # -- book-keeping route -----------------------------------------------------------------
    def bookkeeping_positions(self, module: nn.Module, x: Tensor, batch: int) -> int | None:
        """Positions per example of a call the book-keeping route can take (``None``: it cannot)."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != batch or x.dtype != module.weight.dtype:
            return None
        return x[0].numel() // self.in_out_features(module)[0]

    def bookkeeping_cost(self, module: nn.Module) -> float:
        """Multiply-add equivalents per example of the book-keeping route."""
        d, p = self.in_out_features(module)
        return BOOKKEEPING_COST_PER_ELEMENT * d * p

    def bookkeeping_call(self, module: nn.Module, x: Tensor, vectors: Mapping[str, Tensor], sink: Any) -> Tensor:
        """The layer's output through :class:`BookkeepingLinear` (see there for ``sink``)."""
        return BookkeepingLinear.apply(x, module.weight, module.bias, (self.transposed, vectors, sink))


class HFConv1DHandler(LinearHandler):
    """Hugging Face ``Conv1D``: ``y = x @ W + b`` with ``W [d, p]`` (transposed ``nn.Linear``)."""

    name = "hf_conv1d"
    transposed = True

    @staticmethod
    def weight_out_in(module: nn.Module, weight_like: Tensor) -> Tensor:
        return weight_like.transpose(-1, -2)

    @staticmethod
    def in_out_features(module: nn.Module) -> tuple[int, int]:
        d, p = module.weight.shape
        return d, p


def rows_of_calls(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``[Σ rows, features]``: the calls' tensors with their positions flattened, one after the other,
    in ``dtype`` (one call's tensor as it is, when it needs no copy)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1, tensors[0].shape[-1]).to(dtype)
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]).to(dtype)


def gram_dot(A: Tensor, D: Tensor, factors: GramFactors, max_elements: int = 1 << 24) -> Tensor:
    """``[B]`` Gram-route dot products ``sum((A_z A_valᵀ) ⊙ (D_z D_valᵀ))`` (+ the residual rows).

    ``A [B, T, d]``, ``D [B, T, p]``: a training example's layer inputs and output gradients. The
    rows are taken in the order ``D`` is stored in: an output gradient stored sequence-first
    (``[T, B, p]`` in memory: ``nn.MultiheadAttention``'s in-projection) is read in place and only
    the narrower ``A`` is copied to match, instead of copying the wide ``D`` into example order.
    """
    A_val, D_val = factors.A, factors.D
    B, T, _ = A.shape
    N = A_val.shape[0]
    A, D = as_float(A, A_val), as_float(D, D_val)
    if B > 1 and T > 1 and not D.is_contiguous() and D.transpose(0, 1).is_contiguous():
        A, D, lead = A.transpose(0, 1), D.transpose(0, 1), T  # rows t·B + z
    else:
        lead = B  # rows z·T + t
    A = A.reshape(B * T, -1)
    D = D.reshape(B * T, -1)
    per_lead = B * T // lead

    def per_example(rows: Tensor) -> Tensor:
        """``[lead·k, M]`` products of ``k`` leading blocks -> ``[B]`` (or ``[k]`` example blocks)."""
        if lead == B:
            return rows.reshape(-1, per_lead * rows.shape[-1]).sum(dim=1)
        return rows.reshape(-1, B, rows.shape[-1]).sum(dim=(0, 2))

    # Whole leading blocks per chunk, with the two [rows, N] products bounded by max_elements each.
    rows_per_chunk = max(per_lead, (max_elements // max(1, N)) // per_lead * per_lead)
    parts = []
    for start in range(0, B * T, rows_per_chunk):
        stop = min(B * T, start + rows_per_chunk)
        prod = A[start:stop] @ A_val.T
        prod *= D[start:stop] @ D_val.T  # (rows, N)
        parts.append(per_example(prod))
    out = torch.cat(parts) if lead == B else torch.stack(parts).sum(dim=0)
    if factors.rows is not None:
        # Σ_t Σ_r D_z[t, r] (A_z[t] · residual[r]) over the residual rows only
        extra = (A @ factors.residual.T) * D[:, factors.rows]  # (B·T, R)
        out = out + per_example(extra)
    return out


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


register_handler(nn.Linear, handler=LinearHandler())
register_predicate(_is_hf_conv1d, HFConv1DHandler())


# ----------------------------------------------------------------------------- book-keeping route
class BookkeepingLinear(torch.autograd.Function):
    """A linear op whose backward forms the per-example weight gradients ``G_z = D_zᵀ A_z``
    (in chunks of examples) *instead of* autograd's weight-gradient GEMM, dots them with the
    contraction vectors, and returns their sum as the ordinary weight gradient (Bu et al. 2023).

    The FLOPs equal the weight-gradient GEMM's; the added cost is one write and two reads of
    each example's ``[p, d]`` gradient, in a buffer reused across examples (cache-resident for
    layers of a few MB), and one GEMM per example instead of one per batch. The weight gradient equals autograd's within
    float32 rounding (it is summed in another order). The forward is the module's own op.

    ``sink(dots_by_name, x, grad_out)`` receives ``{"weight": [B, K], "bias": [B, K]}``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, spec: tuple) -> Tensor:
        transposed = spec[0]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.spec = spec
        if transposed:  # Hugging Face Conv1D: addmm(b, x, W) with W [d, p]
            out_shape = (*x.shape[:-1], weight.shape[1])
            flat = x.reshape(-1, x.shape[-1])
            y = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return y.view(out_shape)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        transposed, vectors, sink = ctx.spec
        batch = grad_out.shape[0]
        p = grad_out.shape[-1]
        d = x.shape[-1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            w_out_in = weight.T if transposed else weight  # [p, d]
            grad_x = (grad_out.reshape(-1, p) @ w_out_in).view(x.shape)
        A = x.reshape(batch, -1, d)  # (B, T, d)
        D = grad_out.reshape(batch, -1, p)  # (B, T, p)
        U = vectors.get("weight")
        U = None if U is None else U.reshape(U.shape[0], -1)  # (K, numel) in the weight's layout
        grad_w = torch.zeros_like(weight)
        # One example at a time into one reused buffer: G_z stays in cache for its dot product and
        # its addition to the weight gradient (a batched [B, p, d] product thrashes the cache).
        G = torch.empty_like(weight)
        flat = G.view(-1)
        dots_w = torch.empty(batch, 0 if U is None else U.shape[0], dtype=U.dtype if U is not None else weight.dtype,
                             device=weight.device)
        for z in range(batch):
            if transposed:
                torch.mm(A[z].T, D[z], out=G)  # [d, p]
            else:
                torch.mm(D[z].T, A[z], out=G)  # [p, d]
            if U is not None:
                torch.mv(U, flat, out=dots_w[z])
            grad_w += G
        dots: dict[str, Tensor] = {}
        if U is not None:
            dots["weight"] = dots_w
        grad_b = None
        if ctx.has_bias:
            per_example_b = D.sum(dim=1)  # (B, p)
            grad_b = per_example_b.sum(dim=0)
            if "bias" in vectors:
                dots["bias"] = per_example_b @ vectors["bias"].T
        sink(dots, x, grad_out)
        return grad_x, grad_w, grad_b, None
