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

How the calls are seen (:mod:`inrun.layers.parts`): while a tracked call runs, a torch-function
mode sees ``F.multi_head_attention_forward`` and runs torch's own code for it with one name changed:
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

from torch import nn

from .parts import LinearPart
from .registry import LayerHandler, register_handler


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


register_handler(nn.MultiheadAttention, handler=MultiheadAttentionHandler())
