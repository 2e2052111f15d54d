"""``nn.Embedding``: the per-example gradient is a scatter of output gradients into token rows,
so ``<g_z, U> = Σ_t D_z,t · U[id_z,t]`` (gather the contraction vector's rows at z's tokens).

A position embedding called on ``arange(T)`` (no batch dimension, nanoGPT) or on ``[1, T]``
(Hugging Face GPT-2) is shared by the batch; its per-example gradient is example z's own
output-gradient rows, which the tracker obtains by expanding the output to the batch where the
row verification showed that this changes nothing the model computes.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .registry import LayerHandler, as_float, first_input, register_handler


class EmbeddingHandler(LayerHandler):
    name = "embedding"
    row_sparse = True

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

    def gradient_rows(self, module: nn.Module, saved: Tensor) -> Tensor:
        """The looked-up ids (the padding row gets no gradient)."""
        ids = saved.reshape(-1)
        return ids if module.padding_idx is None else ids[ids != module.padding_idx]


register_handler(nn.Embedding, handler=EmbeddingHandler())
