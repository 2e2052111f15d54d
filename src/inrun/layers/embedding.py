"""``nn.Embedding``: the per-example gradient is a scatter of output gradients into token rows,
so ``<g_z, U> = Σ_t D_z,t · U[id_z,t]`` (gather the contraction vector's rows at z's tokens).

A position embedding called on ``arange(T)`` (no batch dimension, nanoGPT) or on ``[1, T]``
(Hugging Face GPT-2) is shared by the batch; its per-example gradient is example z's own
output-gradient rows, which the tracker obtains by expanding the output to the batch where the
row verification showed that this changes nothing the model computes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .registry import LayerHandler, as_float, first_input, register_handler


class EmbeddingHandler(LayerHandler):
    name = "embedding"
    param_names = ("weight",)
    row_sparse = True
    traceable = True

    def check(self, module: nn.Module) -> None:
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                "Embedding with scale_grad_by_freq=True divides each token's gradient by its "
                "frequency in the whole batch, so examples interact and have no per-example "
                "gradient. Use scale_grad_by_freq=False."
            )
        if module.sparse:
            raise UnsupportedModuleError(
                "Embedding(sparse=True) is not supported; use a dense embedding."
            )

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        return first_input(module, args, kwargs).detach()

    def dot(
        self, module: nn.Module, saved: Tensor, grad_out: Tensor, vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        U = vectors["weight"]  # (K, num_embeddings, dim)
        batch = grad_out.shape[0]
        ids = saved.reshape(saved.shape[0], -1)  # (B|1, T)
        D = as_float(grad_out, U).reshape(batch, -1, U.shape[-1])  # (B, T, dim)
        if module.padding_idx is not None:
            D = D * (ids != module.padding_idx).unsqueeze(-1).to(D.dtype)
        rows = U[:, ids]  # (K, B|1, T, dim)
        return {"weight": (rows * D.unsqueeze(0)).sum(dim=(2, 3)).T}

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() >= 2

    def gradient_rows(self, module: nn.Module, saved: Tensor) -> Tensor:
        """The looked-up ids (the padding row gets no gradient)."""
        ids = saved.reshape(-1)
        return ids if module.padding_idx is None else ids[ids != module.padding_idx]


register_handler(nn.Embedding, handler=EmbeddingHandler())


class EmbeddingBagHandler(LayerHandler):
    """``nn.EmbeddingBag`` (``sum`` or ``mean``): bag ``b``'s gradient puts ``c_i · δ_b`` into the
    row of each of its ids, ``c_i`` the per-sample weight (sum) or ``1/|bag|`` (mean), so
    ``<g_b, U> = Σ_{i ∈ b} c_i <δ_b, U[id_i]>``. Bags are rows (a 2-D input, or a 1-D input cut by
    ``offsets``); ``padding_idx`` ids are left out, of the mean's count too, as torch does."""

    name = "embedding_bag"
    param_names = ("weight",)

    def check(self, module: nn.Module) -> None:
        if module.mode == "max":
            raise UnsupportedModuleError(
                "EmbeddingBag(mode='max') is not supported (its gradient picks one id per dimension); "
                "use mode='sum' or 'mean'"
            )
        if module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                "EmbeddingBag with scale_grad_by_freq=True or sparse=True is not supported: use the defaults"
            )

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        values = dict(zip(("input", "offsets", "per_sample_weights"), args), **kwargs)
        ids, offsets, weights = values["input"], values.get("offsets"), values.get("per_sample_weights")
        if ids.dim() == 2:
            bags = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
            ids = ids.reshape(-1)
        else:
            starts = offsets[:-1] if module.include_last_offset else offsets
            bags = torch.bucketize(torch.arange(ids.numel(), device=ids.device), starts, right=True) - 1
        dtype = module.weight.dtype
        coef = (torch.ones(ids.numel(), device=ids.device, dtype=dtype) if weights is None
                else weights.detach().reshape(-1).to(dtype))
        keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
        coef = coef * keep
        if module.mode == "mean":
            bag_count = int(bags.max()) + 1 if bags.numel() else 0
            count = torch.zeros(bag_count, device=ids.device, dtype=dtype).index_add_(0, bags, keep.to(dtype))
            coef = coef / count.clamp_min(1)[bags]
        return ids.detach(), bags, coef

    def dot(
        self, module: nn.Module, saved: tuple[Tensor, Tensor, Tensor | None], grad_out: Tensor,
        vectors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        ids, bags, coef = saved
        U = vectors["weight"]  # (K, num_embeddings, dim)
        D = as_float(grad_out, U)  # (B, dim)
        per_id = (U[:, ids] * D[bags].unsqueeze(0)).sum(dim=-1) * coef.to(U.dtype)  # (K, M)
        out = torch.zeros(D.shape[0], U.shape[0], dtype=U.dtype, device=U.device)
        return {"weight": out.index_add_(0, bags, per_id.T)}


register_handler(nn.EmbeddingBag, handler=EmbeddingBagHandler())
