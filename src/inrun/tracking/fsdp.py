"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the tracker on a model whose parameters are
sharded ``DTensor``\\ s.

Semantics: those of DDP (:mod:`inrun.tracking.ddp`). Every rank runs its own examples, FSDP2
reduce-scatters the gradients with an average over the ``W`` ranks, so the update is that of the
global batch and a local example's coefficient is ``η·clip/W``; values are local to the rank that
holds the example and the ledgers are merged by id when read.

What differs, and where it is handled (everything else is the single-process code):

* **The tensors a module computes with.** Between steps a module holds its shard (a ``DTensor``);
  inside its forward and backward FSDP2 swaps in the all-gathered, whole parameter (a plain
  tensor, the same object every step). Activations and output gradients are whole on each rank,
  so the per-example routes run unchanged on them. :class:`ShardedParams` records, by forward
  pre-hooks, the whole parameter each module computed with: the validation pass and the row
  verification differentiate with respect to those (``torch.autograd.grad`` does not touch
  ``.grad``, so FSDP2's reduce-scatter has nothing to do, and the user's gradients are left alone).
* **The validation gradient is whole on every rank.** Every rank runs the whole validation pass
  (its forward all-gathers each unit, as a training forward does; its backward all-gathers again
  and reduce-scatters nothing). The gradient with respect to the whole parameters is then the
  whole ``g_val``, computed locally: the vector route needs no gather, and the Gram route needs
  only its validation factors, which each rank's own pass produced. The cost is memory: a whole
  ``g_val`` per rank, as under DDP (docs/scaling.md).
* **The gradient is sharded.** ``p.grad`` is this rank's shard of the averaged gradient. The
  check's ``<p.grad, g_val>`` and the gradient norms (clip detection) are sums over shards: each
  rank computes its part on its shard (:meth:`ShardedParams.shard` cuts ``g_val`` the same way)
  and they travel in the check's all-reduce. A per-coordinate update (Adam's slope) is computed on
  the shards and all-gathered once per step, one gradient-sized gather.
* **Collectives stay in step.** A micro-batch that needs the row verification on one rank is
  replayed on every rank (its forward all-gathers), decided by one small all-reduce.

Not supported under FSDP2 (refused when the tracker is made): ``second_order="hessian"`` (a double
backward through FSDP2's hooks), the audit, a 2-D device mesh (HSDP) and parameters outside
``fully_shard``. FSDP1 (``FullyShardedDataParallel``) and DeepSpeed are refused with a pointer here
(:func:`refuse_other_sharding`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import GradientChangeError, UnsupportedModuleError, UnsupportedOptimizerError
from .ddp import DDPSync, all_reduce_settled

if TYPE_CHECKING:
    from .config import TrackerConfig
    from .params import ParamTable

FSDP2_HINT = (
    "Shard the model with FSDP2 instead: torch.distributed.fsdp.fully_shard on each block and on "
    "the root module (with the Hugging Face Trainer or Accelerate: fsdp_version=2)"
)

FSDP2_CHECK_HINT = (
    " Under FSDP2 the check compares the ranks' summed dots with the averaged, reduce-scattered "
    "gradient: the last micro-batch of a step must run with set_requires_gradient_sync(True), and "
    "the gradients must be averaged over the ranks (FSDP2's default reduction)."
)


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) is sharded by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def refuse_other_sharding(model: nn.Module) -> None:
    """FSDP1 and DeepSpeed hold parameters the tracker cannot read per layer: refused, naming FSDP2.

    FSDP1 flattens each unit's parameters into one ``FlatParameter`` (the modules' own weights are
    views that are empty between forward calls); DeepSpeed ZeRO partitions them into its own
    buffers and runs its own backward through the engine.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            raise UnsupportedModuleError(
                f"{name or 'the model'} is wrapped in FSDP1 (FullyShardedDataParallel), whose flat "
                f"parameters hide each layer's weight from the tracker. {FSDP2_HINT}."
            )
        if type(m).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            raise UnsupportedModuleError(
                f"{name or 'the model'} is managed by DeepSpeed, whose engine partitions the parameters "
                f"and runs the backward itself. {FSDP2_HINT}."
            )


@dataclass(frozen=True)
class FSDP2Sync(DDPSync):
    """The process group of an FSDP2 model; the check's terms are summed over shards too."""

    sharded: bool = True
    check_hint: str = FSDP2_CHECK_HINT
    units: tuple[nn.Module, ...] = ()
    """The ``fully_shard``-ed modules."""

    @classmethod
    def of(cls, model: nn.Module) -> FSDP2Sync:  # type: ignore[override]
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        meshes = set()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise UnsupportedModuleError(
                    f"{name} is not sharded by fully_shard while other parameters are: apply "
                    "fully_shard to the root module too, so that every parameter is averaged over the ranks"
                )
            if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
                raise UnsupportedModuleError(
                    f"{name} is placed {p.placements} on a {p.device_mesh.ndim}-D mesh: the tracker "
                    "supports FSDP2 on a 1-D mesh (one Shard placement per parameter), not HSDP"
                )
            meshes.add(p.device_mesh)
        if len(meshes) != 1:
            raise UnsupportedModuleError("the model's parameters are sharded over several device meshes")
        group = meshes.pop().get_group()
        units = tuple(m for m in model.modules() if isinstance(m, FSDPModule))
        return cls(group=group, world_size=dist.get_world_size(group), rank=dist.get_rank(group), units=units)

    def release(self) -> None:
        """Reshard what the tracker's own forwards left gathered. FSDP2 keeps the root's whole
        parameters after a forward without backward (the probes', a drop row's loss); the user's
        ``clip_grad_norm_(model.parameters())`` would then see those, without gradients, and skip
        them, and after ``optimizer.step()`` (which updates the shards) the next forward would reuse
        them stale. Called after each block and before each update; local, no collective."""
        for unit in self.units:
            unit.reshard()

    def reduce_check_terms(self, terms: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`DDPSync.reduce_check_terms`, with ``<p.grad, g_val>`` summed over the shards."""
        ours, theirs, scale = terms
        both = torch.stack([ours, scale.to(ours.device), theirs.to(ours.device)])  # (3, P) float64
        all_reduce_settled(both, self.group)
        return both[0] / self.world_size, both[2].to(theirs.device), (both[1] / self.world_size).to(scale.device)

    def agreement(self, engine: Any) -> Callable[[], None]:
        """After each model call inside ``tracker.step``: the row verification replays the model,
        whose forward all-gathers, so when one rank verifies the micro-batch every rank does (one
        all-reduce of a flag, once the model's forward has ended)."""

        def agree() -> None:
            if engine.recorder is not None:
                flag = torch.tensor([int(engine._verifying())], dtype=torch.int64, device=engine.table.device)
                all_reduce_settled(flag, self.group)  # a sum: any rank's 1 makes it positive
                if flag.item() > 0:  # replayed and verified here too, as if off the plan
                    engine.recorder.microbatch.off_plan = True

        return agree

    def agree(self, smap: Any) -> None:
        """Each rank classified its own shards (:mod:`inrun.tracking.gradmap`); a norm clip's factor
        is the group's: the mean over the ranks whose shard is nonzero (a zero shard says nothing
        about it), one all-reduce. A per-coordinate map (value clipping, unattributed gradients) is
        refused on every rank together: its factors are shard-shaped and the whole gradient's rule
        would need them gathered."""
        rows = len(smap.ratio)
        seen = torch.zeros(rows, dtype=torch.float64, device=smap.ratio.device)
        present = [i for i, b in enumerate(smap.batch) if b is not None]
        if present:
            norms = torch._foreach_norm([ShardedParams.local(smap.batch[i]) for i in present])
            seen[present] = (torch.stack(norms).double().to(seen.device) > 0).double()
        odd = torch.zeros_like(seen)
        odd[list(set(smap.coordinate) | set(smap.offset))] = 1.0
        both = torch.stack([smap.ratio * seen, seen, odd])
        all_reduce_settled(both, self.group)
        if bool(both[2].any()):
            raise GradientChangeError(
                "under FSDP2 the tracker values gradients rescaled as a whole (norm clipping, loss scaling) but "
                "not value clipping or tracker.unattributed() blocks: clip by norm (clip_grad_norm_), or train "
                "that loop under DDP"
            )
        smap.ratio = torch.where(both[1] > 0, both[0] / both[1].clamp(min=1), smap.ratio)

    def gathered(self, tensors: Sequence[Any]) -> list[Any]:
        """Whole tensors from sharded ones (one all-gather each): Adam's per-coordinate slopes."""
        from torch.distributed.tensor import DTensor

        if any(callable(t) for t in tensors):
            raise UnsupportedOptimizerError(
                "an optimizer whose step is a map of the whole gradient (Muon, Adafactor) computes it on "
                "each rank's shard under FSDP2, which the tracker does not value: use AdamW or SGD under FSDP2"
            )
        return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


class ShardedParams:
    """The parameter table's view of FSDP2's shards: local pieces, whole parameters, summed norms.

    ``params`` are the sharded parameters (``DTensor``), in the table's order. Forward pre-hooks
    on every module that holds one record the whole parameter it computes with.
    """

    def __init__(self, module: nn.Module, params: Sequence[Tensor], group: Any) -> None:
        self.params = list(params)
        self.group = group
        row_of = {id(p): i for i, p in enumerate(self.params)}
        self.whole: list[Tensor | None] = [None] * len(self.params)
        self.handles = []
        for m in module.modules():
            slots = [(name, row_of[id(p)]) for name, p in m._parameters.items() if p is not None and id(p) in row_of]
            if slots:
                self.handles.append(m.register_forward_pre_hook(self._recorder(slots)))

    def _recorder(self, slots: list[tuple[str, int]]) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            for name, row in slots:
                self.whole[row] = module._parameters[name]

        return hook

    def compute_params(self) -> list[Tensor]:
        """The whole parameters the last forward computed with (a stand-in leaf, whose gradient
        autograd reports as unused, for a parameter no forward has touched)."""
        return [
            w if w is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device, requires_grad=True)
            for w, p in zip(self.whole, self.params)
        ]

    def any_whole_grad(self) -> bool:
        """Gradients FSDP2 holds unreduced (``set_requires_gradient_sync(False)``) count as present."""
        return any(w is not None and w.grad is not None for w in self.whole)

    @staticmethod
    def local(t: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    def shard(self, whole: Tensor, row: int) -> Tensor:
        """This rank's piece of a whole parameter-shaped tensor, cut as the parameter's shard is
        (FSDP2: ``torch.chunk`` along the sharded dimension)."""
        p = self.params[row]
        dim = p.placements[0].dim
        world = p.device_mesh.size()
        rank = p.device_mesh.get_local_rank()
        offset = whole.dim() - p.dim()  # leading dimensions of ``whole`` (validation columns)
        chunks = torch.chunk(whole, world, dim=dim + offset)
        local_shape = self.local(p).shape
        if rank < len(chunks) and chunks[rank].shape[offset:] == local_shape:
            return chunks[rank]
        return whole.new_zeros((*whole.shape[:offset], *local_shape))  # a rank past the last chunk

    def squared_norms(self, grads: Sequence[Tensor | None]) -> Tensor:
        """``[P]`` float64 squared norms of this rank's shards (0 for a missing gradient)."""
        out = torch.zeros(len(grads), dtype=torch.float64, device=self.params[0].device)
        present = [(i, self.local(g)) for i, g in enumerate(grads) if g is not None]
        if present:
            norms = torch._foreach_norm([g for _, g in present])
            out[[i for i, _ in present]] = torch.stack(norms).double().to(out.device) ** 2
        return out

    def norms(self, grads: Sequence[Tensor | None]) -> Tensor:
        """``[P]`` float64 norms of the whole gradients (one all-reduce of the shards' squares)."""
        squares = self.squared_norms(grads)
        all_reduce_settled(squares, self.group)
        return squares.sqrt()



def data_parallel_sync(
    model: nn.Module, ddp: nn.parallel.DistributedDataParallel | None, table: ParamTable, config: TrackerConfig,
    handles: list[Any],
) -> DDPSync | None:
    """The sync of a DDP (``ddp``: its wrapper, met inside a compiled one or not) or FSDP2 model
    (``None`` for a single process); for FSDP2 the table gets its view of the shards (whose hooks
    join ``handles``, removed with the tracker's), and what FSDP2 does not support is refused here."""
    if ddp is not None:
        return DDPSync.of(ddp)
    if not is_fsdp2(model):
        return None
    if config.order == 2 and config.second_order == "hessian":
        raise UnsupportedModuleError(
            "second_order='hessian' needs a double backward, which FSDP2's hooks do not support: "
            "use second_order='trapezoid' (no Hessian) under FSDP2"
        )
    if config.carry != "off":
        raise UnsupportedModuleError(
            "carry='momentum' keeps parameter-sized accumulators the tracker does not shard: use carry='off' under FSDP2"
        )
    sync = FSDP2Sync.of(model)
    table.shards = ShardedParams(model, table.params, sync.group)
    handles.extend(table.shards.handles)
    return sync
