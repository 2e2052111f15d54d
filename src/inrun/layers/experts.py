"""Mixture-of-experts layers of Hugging Face transformers (Mixtral, OLMoE, Qwen-MoE...): experts
stored as 3-D parameters ``[E, out, in]`` and applied to the tokens the router sends them.

The call is ``experts(hidden [N, d], top_k_index [N, k], top_k_weights [N, k]) -> [N, d]``: each
token ``t`` goes through its ``k`` experts, ``y = W_down[e] · g(W_gate_up[e] · x_t)``, and the
outputs are summed with the routing weights. The route uses the routing indices: per expert, the
tokens routed to it, their inputs ``x``, the expert's hidden ``h`` and the output gradient
``δ = w · ∂L/∂out_t`` (recomputed with one small backward through that expert: no grouped matmul,
so it also runs in float64), then the vector route of each of its two linear maps:
``<δ, U_down[e] h>`` and ``<δ_gate_up, U_gate_up[e] x>`` per token, summed into the token's row.
The tracker's row map then gives each token to its example (rows are batch × sequence, flattened).

That route re-runs each expert on its tokens (about 7 of the 9 multiply-adds per routed token and
weight element that training spends). With transformers' default ``grouped_mm`` implementation the
experts are instead valued as two *linear parts* (:mod:`inrun.layers.parts`): the grouped matmuls
of ``gate_up_proj`` and ``down_proj`` are seen as they run, each expert's rows contracted like an
``nn.Linear`` call (vector route, or Gram against the validation tokens routed to that expert),
nothing re-run. Experts with biases (added in place to the grouped output) keep the re-running route.

The router in front of the experts (``MixtralTopKRouter`` and its kin: a module of its own whose
one weight ``[E, d]``, and bias, give the routing logits ``F.linear(x, W, b)``) is one linear part
of blocked rows (``[B·T, E]``, row ``b·T + t``), valued on the routes of ``nn.Linear`` where it ran,
not by the fallback's directional derivative and its contraction at the step. A router that
applies its weight any other way (a cast copy, a matmul) is not reported by the taps: the row
verification then sees its weight's gradient without values and values it at a site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .parts import LinearPart
from .registry import LayerHandler, register_predicate


def _is_hf_experts(module: nn.Module) -> bool:
    return (
        hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "_apply_gate")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3
        and not getattr(module, "has_post_expert_norm", False)
    )


class ExpertsHandler(LayerHandler):
    name = "experts"

    def check(self, module: nn.Module) -> None:
        if getattr(module, "_is_expert_parallel", False):
            raise UnsupportedModuleError(
                f"{type(module).__name__} runs expert-parallel (experts sharded over ranks): per-example "
                "values of sharded experts are not supported"
            )

    def parts(self, module: nn.Module) -> list[LinearPart] | None:
        """The grouped matmuls' weights as linear parts, when transformers runs them (``grouped_mm``)."""
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) != "grouped_mm" or module.has_bias:
            return None
        up = "gate_up_proj" if module.has_gate else "up_proj"
        return [LinearPart(name, name, None, grouped=True, transposed=bool(module.is_transposed))
                for name in (up, "down_proj")]

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index, weights = values[:3]
        return hidden.detach(), index.detach(), weights.detach()

    def keep(self, module: nn.Module, saved: Any) -> Any:
        """After the optimizer step the experts' weights have moved: keep them as they were."""
        snapshot = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
        return (*saved, snapshot)

    def dot(
        self, module: nn.Module, saved: Any, grad_out: Tensor, vectors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        hidden, top_index, top_weights = saved[:3]
        weights = saved[3] if len(saved) > 3 else {n: p.detach() for n, p in module.named_parameters(recurse=False)}
        up_name = "gate_up_proj" if module.has_gate else "up_proj"
        N, k = top_index.shape
        K = next(iter(vectors.values())).shape[0]
        like = next(iter(vectors.values()))
        out = {n: torch.zeros(N, K, dtype=like.dtype, device=like.device) for n in vectors}
        experts = top_index.reshape(-1)
        tokens = torch.arange(N, device=top_index.device).repeat_interleave(k)
        routed = top_weights.reshape(-1)
        G = grad_out.to(like.dtype)
        for e in torch.unique(experts).tolist():
            if e >= module.num_experts:
                continue
            sel = experts == e
            t = tokens[sel]
            x = hidden[t].to(like.dtype)  # (S_e, d)
            delta = routed[sel].to(like.dtype).unsqueeze(-1) * G[t]  # (S_e, d): gradient of y
            with torch.enable_grad():
                a = self._linear(module, x, weights[up_name][e].to(like.dtype), weights, up_name, e).requires_grad_()
                h = module._apply_gate(a) if module.has_gate else module.act_fn(a)
                y = self._linear(module, h, weights["down_proj"][e].to(like.dtype), weights, "down_proj", e)
                (delta_a,) = torch.autograd.grad((y * delta).sum(), a)
            h = h.detach()
            for name, U in vectors.items():
                base = name[: -len("_bias")] if name.endswith("_bias") else name
                inputs, grads = (h, delta) if base == "down_proj" else (x, delta_a)
                for c in range(K):
                    if name.endswith("_bias"):
                        val = (grads * U[c, e]).sum(dim=-1)
                    else:
                        val = (grads * self._linear(module, inputs, U[c, e], None, name, e)).sum(dim=-1)
                    out[name][:, c].index_add_(0, t, val)
        return out

    @staticmethod
    def _linear(module: nn.Module, x: Tensor, W: Tensor, weights: Mapping[str, Tensor] | None, name: str,
                e: int) -> Tensor:
        """One expert's linear map, in the module's weight layout (``[out, in]`` or transposed)."""
        y = x @ W if module.is_transposed else F.linear(x, W)
        bias = None if weights is None else weights.get(f"{name}_bias")
        return y if bias is None else y + bias[e].to(y.dtype)

    def vector_cost(self, module: nn.Module) -> float:
        return float(module.down_proj[0].numel() * 3)


register_predicate(_is_hf_experts, ExpertsHandler())


def _is_router(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.get("weight"), own.get("bias")
    return (
        type(module).__name__.endswith("Router") and next(module.children(), None) is None
        and set(own) <= {"weight", "bias"} and weight is not None and weight.dim() == 2
        and (bias is None or bias.dim() == 1)
    )


class RouterHandler(LayerHandler):
    """A mixture-of-experts router whose weight (and bias) make the routing logits by ``F.linear``."""

    name = "router"

    def parts(self, module: nn.Module) -> list[LinearPart] | None:
        bias = "bias" if isinstance(getattr(module, "bias", None), nn.Parameter) else None
        return [LinearPart("logits", "weight", bias, sequence_first=False)]


register_predicate(_is_router, RouterHandler())
