"""The one table of layer families. Each row feeds every layer-level oracle test:

* the registry picks the row's handler (test_oracle.py);
* the handler's dots with K = 1 and 3 random vectors equal torch.func per-example gradients
  dotted with them (test_second_order.py: the factors the deferred contractions use);
* a whole SGD step of a small classifier around the layer, valued at order 1 (float64, float32;
  test_oracle.py) and order 2 (Hessian and trapezoid; test_second_order.py), equals the oracle.

Adding a layer family means: its handler file, one registry line, and one row here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from helpers import DEVICE, Case, with_dtype
from torch import Tensor, nn


class Layout(enum.Enum):
    """How the row's layer call relates to the batch (for the oracle's per-example functions)."""

    BATCHED = "batched"  # the batch is dim 0 of input and output
    BROADCAST = "broadcast"  # leading dim 1, shared by the batch
    UNBATCHED = "unbatched"  # no batch dim (positions ``arange(T)``)


# ----------------------------------------------------------------------------- small modules
class Pool(nn.Module):
    """Averages every non-batch, non-feature position: [B, *, F] -> [B, F]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


class ChannelPool(nn.Module):
    """[B, C, *spatial] -> [B, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)


class GatedScale(nn.Module):
    """A module no handler knows, nonlinear in its own parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim) * 0.5 + 1)
        self.gate = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + torch.tanh(x * self.gate) * self.scale**2


class SelfAttend(nn.Module):
    """``nn.MultiheadAttention`` on ``[B, T, d]``: self-attention, or attention from the first
    ``queries`` positions to all (``query`` is not ``key``: the in-projection's weight in two row
    slices, as in encoder-decoder attention). Its output only."""

    def __init__(self, dim: int, heads: int, bias: bool = True, queries: int | None = None,
                 need_weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)
        self.queries, self.need_weights = queries, need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x if self.queries is None else x[:, : self.queries]
        return self.attn(q, x, x, need_weights=self.need_weights)[0]


def llama_rmsnorm(dim: int) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = LlamaRMSNorm(dim)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
    return m


def hf_conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(nf, nx)
    nn.init.normal_(m.weight, std=0.3)
    nn.init.normal_(m.bias, std=0.3)
    return m


def perturbed(module: nn.Module) -> nn.Module:
    """Random affine parameters, so the norm layers' gradients are not trivially symmetric."""
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            p.normal_(1.0 if name == "weight" else 0.0, 0.3)
    return module


def eval_batchnorm(bn: nn.Module) -> nn.Module:
    perturbed(bn)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    return bn.eval()


# ----------------------------------------------------------------------------- inputs
def floats(*shape: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda gen, B: torch.randn(B, *shape, generator=gen, dtype=torch.float64)


def token_ids(vocab: int, T: int, pad: int | None = None) -> Callable[[torch.Generator, int], Tensor]:
    def make(gen: torch.Generator, B: int) -> Tensor:
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        if pad is not None:
            ids[:, ::3] = pad  # some padding positions in every example
        return ids

    return make


# ----------------------------------------------------------------------------- the table
@dataclass
class LayerRow:
    """One layer family: a module, an input for a batch of B, and how the tracker sees the call."""

    name: str
    handler: str
    make_module: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator, int], Tensor]
    layout: Layout = Layout.BATCHED
    at: str = ""
    """The submodule the row's handler is for (``""``: the module itself)."""


LAYERS: list[LayerRow] = [
    LayerRow("linear 2-d", "linear", lambda: nn.Linear(5, 4), floats(5)),
    LayerRow("linear 4-d input", "linear", lambda: nn.Linear(5, 4), floats(2, 3, 5)),
    LayerRow("linear no bias", "linear", lambda: nn.Linear(5, 7, bias=False), floats(3, 5)),
    LayerRow("linear broadcast [1, T, d]", "linear", lambda: nn.Linear(5, 4),
             lambda gen, B: torch.randn(1, 3, 5, generator=gen, dtype=torch.float64), Layout.BROADCAST),
    LayerRow("hf Conv1D", "hf_conv1d", lambda: hf_conv1d(6, 5), floats(3, 5)),
    LayerRow("embedding", "embedding", lambda: nn.Embedding(11, 4), token_ids(11, 5)),
    LayerRow("embedding padding_idx", "embedding", lambda: nn.Embedding(11, 4, padding_idx=0), token_ids(11, 6, pad=0)),
    LayerRow("embedding positions arange(T)", "embedding", lambda: nn.Embedding(8, 4),
             lambda gen, B: torch.arange(6), Layout.UNBATCHED),
    LayerRow("embedding positions [1, T]", "embedding", lambda: nn.Embedding(8, 4),
             lambda gen, B: torch.arange(6).unsqueeze(0), Layout.BROADCAST),
    LayerRow("layernorm", "layernorm", lambda: perturbed(nn.LayerNorm(6)), floats(3, 6)),
    LayerRow("layernorm no bias", "layernorm", lambda: perturbed(nn.LayerNorm(6, bias=False)), floats(3, 6)),
    LayerRow("torch RMSNorm", "rmsnorm", lambda: perturbed(nn.RMSNorm(6)), floats(3, 6)),
    LayerRow("LlamaRMSNorm", "affine_norm", lambda: llama_rmsnorm(6), floats(3, 6)),
    LayerRow("groupnorm", "groupnorm", lambda: perturbed(nn.GroupNorm(2, 6)), floats(6, 7)),
    LayerRow("conv1d stride padding", "conv", lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1), floats(3, 9)),
    LayerRow("conv2d groups dilation circular", "conv",
             lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="circular"), floats(4, 6, 5)),
    LayerRow("conv2d no bias stride", "conv", lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), bias=False), floats(3, 7, 6)),
    LayerRow("batchnorm1d eval", "batchnorm_eval", lambda: eval_batchnorm(nn.BatchNorm1d(6)), floats(6)),
    LayerRow("batchnorm2d eval", "batchnorm_eval", lambda: eval_batchnorm(nn.BatchNorm2d(3)), floats(3, 4, 4)),
    LayerRow("unknown module (torch.func fallback)", "fallback", lambda: GatedScale(6), floats(3, 6)),
    LayerRow("multihead attention (packed in-projection)", "multihead_attention", lambda: SelfAttend(6, 2),
             floats(4, 6), at="attn"),
    LayerRow("multihead attention no bias, attention weights", "multihead_attention",
             lambda: SelfAttend(6, 3, bias=False, need_weights=True), floats(3, 6), at="attn"),
    LayerRow("multihead attention query != key (in-projection in row slices)", "multihead_attention",
             lambda: SelfAttend(6, 2, queries=2), floats(4, 6), at="attn"),
]

BATCHED_LAYERS = [row for row in LAYERS if row.layout is Layout.BATCHED]
"""Rows whose layer takes the batch itself: each also becomes a whole classifier step."""


class Probe(nn.Module):
    """The layer under test, then ``tanh``, flattened, into a linear head over 4 classes."""

    def __init__(self, layer: nn.Module, n_out: int, classes: int = 4) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(n_out, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def layer_case(row: LayerRow, batch: int = 5, classes: int = 4, lr: float = 0.05) -> Case:
    """A whole training step of a :class:`Probe` around the row's layer (batch-mean cross-entropy)."""
    xv = row.make_input(torch.Generator().manual_seed(7), 3).to(DEVICE)
    yv = (torch.arange(3) % classes).to(DEVICE)

    def make_model() -> nn.Module:
        layer = row.make_module()
        with torch.no_grad():
            n_out = layer.double()(row.make_input(torch.Generator().manual_seed(0), 1))[0].numel()
        return Probe(layer.float(), n_out, classes)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, ...]:
        return row.make_input(gen, batch), torch.randint(0, classes, (batch,), generator=gen)

    def batch_loss(model: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    def example_loss(f: Callable, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        return F.cross_entropy(f(x), y, reduction="sum") / batch_size

    @with_dtype
    def val_loss(model: nn.Module, dtype: torch.dtype) -> Tensor:
        return F.cross_entropy(model(xv.to(dtype) if xv.is_floating_point() else xv), yv)

    return Case(row.name, make_model, make_batch, batch_loss, example_loss, val_loss, lr)
