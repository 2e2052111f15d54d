"""Which example each row of a tracked call belongs to: a *candidate*, from the call's inputs and
shapes and what the module says about itself, that the row verification then proves or refutes
(:mod:`inrun.tracking.plan`). Nothing here is trusted because a size matched.

* A call whose inputs do not depend on the batch (no autograd history, no storage shared with the
  model's own inputs: positions ``arange(T)``, a bias table) is *shared*: its output, leading 1
  (``broadcast``) or without a batch dimension (``unbatched``), may be expanded to the batch so
  that each example's gradient reaches it separately, where the verification showed that this
  changes nothing the model computes.
* A module that declares its layout (``batch_first`` of RNNs, ``nn.MultiheadAttention`` and
  ``nn.Transformer*`` layers, inherited by the layers inside them) has its batch where it says.
* Otherwise dimension 0 of size ``B`` is the batch (``batched``), and ``B · k`` rows are read as
  ``k`` consecutive rows per example (``blocked``: batch and sequence flattened together).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..layers import Rows


def declared_batch_dim(module: nn.Module) -> int | None:
    """The batch dimension a module states for its inputs and outputs (``None``: it does not)."""
    first = getattr(module, "batch_first", None)
    if first is None and isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        first = module.self_attn.batch_first
    if isinstance(first, bool) and isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer,
                                                       nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if first else 1
    return None


def inherited_batch_dims(root: nn.Module) -> dict[int, int]:
    """``id(module) -> batch dim`` for every module inside one that declares a sequence-first
    layout (its ``Linear`` and norm layers see ``[T, B, ...]``)."""
    out: dict[int, int] = {}

    def walk(m: nn.Module, inherited: int | None) -> None:
        own = declared_batch_dim(m)
        dim = own if own is not None else inherited
        if dim:
            out[id(m)] = dim
        for child in m.children():
            walk(child, dim)

    walk(root, None)
    return out


def depends_on_batch(args: tuple, kwargs: dict, root_storages: set[int]) -> bool:
    """Whether any input of a call carries the batch: autograd history, or storage of the model's
    own inputs (token ids are integers: no history, but a view of the batch)."""
    leaves, _ = tree_flatten((args, kwargs))
    for x in leaves:
        if isinstance(x, Tensor) and (
            x.requires_grad or x.grad_fn is not None or x.untyped_storage().data_ptr() in root_storages
        ):
            return True
    return False


def storages_of(args: tuple, kwargs: dict) -> set[int]:
    leaves, _ = tree_flatten((args, kwargs))
    return {x.untyped_storage().data_ptr() for x in leaves if isinstance(x, Tensor)}


def leaf_rows(t: Tensor, batch: int, independent: bool, declared: int | None) -> Rows | None:
    """The candidate row map of one output tensor (``None``: no reading of its rows).

    ``independent``: the call's inputs show no sign of the batch (no autograd history, no storage
    of the model's inputs). That is a hint, not a proof (a frozen network before the call leaves
    no history either): it only decides between readings that the shapes leave open.
    """
    if t.dim() == 0:
        return None
    if declared is not None:
        return Rows("batched", batch, declared) if t.dim() > declared and t.shape[declared] == batch else None
    if t.shape[0] == batch:
        return Rows("batched", batch)
    if t.shape[0] == 1:
        return Rows("broadcast", batch) if independent else None
    if independent:
        return Rows("unbatched", batch)
    if t.shape[0] % batch == 0:
        return Rows("blocked", batch)
    return None


def output_leaves(output: Any) -> tuple[list[Tensor], Any, list[int]]:
    """The output's differentiable tensors, its structure, and their positions among its leaves."""
    leaves, spec = tree_flatten(output)
    index = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
    return [leaves[i] for i in index], spec, index


def row_key(rows: Sequence[Rows | None]) -> tuple:
    """What the verification proves about a call: row kinds and dims, not sizes (a sequence length
    that changes every step keeps its verdict)."""
    return tuple(None if r is None else (r.kind, r.dim) for r in rows)


def outputs_cut(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[bool]:
    """Which of a call's outputs to contract: those no other output was computed from.

    With autograd's gradients, an output ``A`` that another output ``B`` was computed from
    carries ``B``'s gradient too, so contracting both counts ``B``'s part twice; the outputs no
    other depends on form a cut every path to the loss crosses once (an output used both inside
    and outside is then missing its outside part, which the row verification sees). The walk
    stops at the call's inputs.
    """
    stop = {x.grad_fn for x in inputs if x.grad_fn is not None}
    nodes = [t.grad_fn for t in outputs]
    keep = [True] * len(outputs)
    for j, start in enumerate(nodes):
        if start is None:
            continue
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node in seen or node in stop:
                continue
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions if n is not None)
        for i, other in enumerate(nodes):
            if i != j and other is not None and other in seen:
                keep[i] = False
    return keep


def from_strided(t: Tensor, batch: int) -> Tensor:
    """``[S·B, ...]`` rows ``s·B + b`` as ``[B·S, ...]`` rows ``b·S + s`` (the micro-batch's positions)."""
    return t.reshape(-1, batch, *t.shape[1:]).transpose(0, 1).flatten(0, 1)


def sequence_first_rows(t: Tensor, batch: int) -> Rows | None:
    """The candidate rows of a linear part's call inside a sequence-first module: ``[S, B, ...]``
    (the batch at dimension 1) or ``[S·B, ...]`` (row ``s·B + b``: *strided*)."""
    if t.dim() >= 3 and t.shape[1] == batch:
        return Rows("batched", batch, 1)
    if t.dim() == 2 and t.shape[0] % batch == 0:
        return Rows("strided", batch)
    return None


def expand_shared(t: Tensor, rows: Rows) -> Tensor:
    """A shared call's output as a view with the batch in front (no copy), so that the gradient
    of each example reaches it separately."""
    if rows.kind == "broadcast":
        return t.expand(rows.batch, *t.shape[1:])
    return t.unsqueeze(0).expand(rows.batch, *t.shape)
