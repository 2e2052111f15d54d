"""``DistributedDataParallel``: what the tracker does differently when the model is DDP-wrapped.

Semantics. With DDP every rank runs the forward/backward of its own local batch and DDP's
reducer averages the gradients over the ``W`` ranks of its process group, so the update of a
step is ``−η · (1/W) Σ_r g_{B_r}``: the *global* batch (the union of the ranks' local batches,
over all micro-batches of the step) makes one update, and the step's utility is the change of
validation loss that this global update causes. Example ``z`` on rank ``r`` contributes
``g_z / W`` to it (``g_z``: the gradient of ``z``'s share of the loss rank ``r`` back-propagates),
so its coefficient is ``η/W``. With a batch-mean loss of ``b`` examples per rank this is exactly
one process with batch ``W·b`` and a mean loss.

What each rank computes. Every rank runs the validation pass on its own replica (the
parameters are identical across ranks, so ``g_val`` is too): no communication, at the cost of
one validation forward/backward per rank. Each rank values its own examples against it, during
its own backward, and adds them to its *local* ledger. DDP's gradient all-reduce is untouched.

Communication per optimizer step: one ``all_reduce`` of ``2·P`` float64 numbers (``P`` =
number of trainable parameter tensors) for the consistency check, and nothing else. The check
compares ``(1/W) Σ_r Σ_{z∈B_r} <g_z, g_val>`` with ``<p.grad, g_val>`` per parameter, where
``p.grad`` is DDP's averaged gradient, so it also catches a gradient that was not averaged
(a custom communication hook that sums, a last micro-batch left inside ``no_sync()``).

Gradient accumulation with ``model.no_sync()`` for the first ``k−1`` micro-batches: inside
``no_sync`` the gradients are local and unaveraged; the last micro-batch's backward all-reduces
the accumulated sum, so after it ``p.grad = (1/W) Σ_r Σ_micro g``. The tracker copies the
gradients (the reference the step's clipping is judged against, :mod:`inrun.tracking.gradmap`) and
reads the check's ``<p.grad, g_val>`` at the end of every micro-batch but only the last reading is
used, which is the synchronized one: clip factors are those of the global gradient, identical on
all ranks, and the coefficients stay ``η·clip/W``.
Accumulating *without* ``no_sync`` (an all-reduce every micro-batch) gives the same averaged
sum and the same values.

The global ledger. Values are *not* exchanged at every step: each rank keeps its own examples,
and the ledgers are merged by example id only when they are read (:func:`gather_ledger`,
called by ``tracker.values()``, ``tracker.per_validation()`` and ``tracker.global_ledger()``).
This costs one all-gather of the ledgers per read instead of one per step, and the
per-step path stays a single small all-reduce. Every rank receives the global ledger (an
example seen on several ranks, e.g. in different epochs, gets the sum of its values and
counts), or only one rank does (``tracker.global_ledger(rank=0)``: a gather, not an all-gather;
the Trainer's and Lightning's writes take it, so the table is held once per job, not once per
rank). Reading is therefore a *collective*: call it on every rank of the group, like
``dist.barrier()``; calling it on rank 0 alone blocks. With NCCL the gather uses the current
CUDA device: call ``torch.cuda.set_device(local_rank)`` on each rank first (as DDP setups
usually do).

Clean exit. With gloo, every collective the tracker issues returns only once the process
group's worker thread has released its tensors (:func:`all_reduce_settled`,
:func:`all_gather_bytes`): otherwise the tracker's last collective of a job could leave that
thread freeing a Python-owned tensor while the interpreter shuts down, which aborts the process
after its work is done.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InRunError
from .state import Ledger

logger = logging.getLogger(__name__)

DDP_CHECK_HINT = (
    " Under DDP the check compares the ranks' summed dots with DDP's averaged gradient: the "
    "last micro-batch of a step must run its backward outside model.no_sync(), and a "
    "communication hook must average (not sum) the gradients."
)


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in ``DistributedDataParallel``."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


@dataclass(frozen=True)
class DDPSync:
    """The process group of a DDP-wrapped model and the few collectives the tracker needs."""

    group: Any
    world_size: int
    rank: int
    sharded: bool = False
    """Whether gradients are sharded over the ranks (FSDP2: :mod:`inrun.tracking.fsdp`)."""
    check_hint: str = DDP_CHECK_HINT
    """What a failed consistency check adds to its message."""

    @classmethod
    def of(cls, model: nn.Module) -> DDPSync:
        """The sync object of a DDP-wrapped ``model`` (its own process group)."""
        if not is_ddp(model):
            raise InRunError(f"expected a DistributedDataParallel model, got {type(model).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise InRunError(
                "the model is wrapped in DistributedDataParallel but torch.distributed is not "
                "initialized; call torch.distributed.init_process_group() first (torchrun does "
                "not do it for you)"
            )
        group = getattr(model, "process_group", None)
        return cls(group=group, world_size=dist.get_world_size(group), rank=dist.get_rank(group))

    def reduce_check_terms(self, terms: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Consistency-check terms of the whole group from this rank's terms: one all-reduce.

        ``terms`` are per parameter: this rank's ``Σ_z <g_z, g_val>``, the averaged gradient's
        ``<p.grad, g_val>`` (identical on every rank) and the tolerance scale (a part identical
        on every rank plus this rank's ``Σ_z |dot|``). Returned: ``(1/W) Σ_r`` of the first and
        the third, which compare with the unchanged second because DDP averaged ``p.grad``.
        """
        ours, theirs, scale = terms
        both = torch.stack([ours, scale.to(ours.device)])  # (2, P) float64
        all_reduce_settled(both, self.group)
        both /= self.world_size
        return both[0], theirs, both[1].to(scale.device)

    def agreement(self, engine: Any) -> Callable[[], None] | None:
        """What the ranks must agree on after each model call: nothing under DDP (a replay of the
        model inside DDP needs no collective)."""
        return None

    def release(self) -> None:
        """After the tracker's own forwards (and before the update): nothing to do under DDP."""

    def agree(self, smap: Any) -> None:
        """Make the gradients' map (:class:`~inrun.tracking.gradmap.StepMap`) the group's: DDP's
        gradients are whole and equal on every rank, so each rank's map is already."""

    def gathered(self, tensors: Sequence[Any]) -> list[Any]:
        """Whole tensors from per-rank pieces: DDP's are whole already."""
        return list(tensors)

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """``Σ_r t`` over the group (one all-reduce; ``t`` is not modified)."""
        out = t.clone()
        all_reduce_settled(out, self.group)
        return out

    def gather_ledger(self, ledger: Ledger, rank: int | None = None) -> Ledger | None:
        """Merge the ledgers of every rank by example id; every rank gets the result, or only
        ``rank`` (the others get ``None``)."""
        return gather_ledger(ledger, group=self.group, rank=rank)


def gather_ledger(ledger: Ledger, group: Any = None, rank: int | None = None) -> Ledger | None:
    """The ledgers of all ranks of ``group`` merged by example id (a collective call).

    Every rank must call it. Every rank returns the merged ledger; with ``rank`` (a global rank),
    only that one does and the others return ``None``: neither the table nor the other ranks'
    ledgers are copied to them, which is what a job whose rank 0 alone writes the results needs.
    Only ids and numbers travel.
    """
    payload = pickle.dumps(_portable_state(ledger))
    gathered = all_gather_bytes(payload, group) if rank is None else gather_bytes(payload, rank, group)
    if gathered is None:
        return None
    return type(ledger).from_states([pickle.loads(b) for b in gathered])


# Gloo runs each collective on a worker thread of the process group, and that thread drops its
# references to the collective's tensors only after the caller has been woken. A tensor that
# Python has already let go of is then freed by the worker thread, which must take the GIL to do
# it; if the interpreter is shutting down by then (the tracker's collective was the last one of
# the job), the thread is torn down mid-destructor and the process aborts with "terminate called
# without an active exception" (seen at exit in about 1 of 8 two-rank runs). Every collective the
# tracker issues therefore keeps its tensors alive until the worker has released them.
_SETTLE_TIMEOUT_S = 10.0


def _settle(tensors: Sequence[Tensor], group: Any) -> None:
    """Return once no process-group worker still holds a reference to ``tensors``.

    Only gloo hands tensors to worker threads this way; other backends return at once.
    """
    if dist.get_backend(group) != "gloo":
        return
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while any(t._use_count() > 1 for t in tensors):
        if time.monotonic() > deadline:
            logger.warning("a gloo worker still holds a collective's tensors after %.0f s", _SETTLE_TIMEOUT_S)
            return
        time.sleep(1e-4)  # releases the GIL the worker needs to drop its references


def all_reduce_settled(t: Tensor, group: Any = None) -> None:
    """``dist.all_reduce(t)`` (a sum, in place) that returns only once gloo has let go of ``t``.

    ``t`` must be a tensor this module created (no views of it alive), so that its only other
    owner is the collective.
    """
    dist.all_reduce(t, group=group)
    _settle([t], group)


def all_gather_bytes(payload: bytes, group: Any = None) -> list[bytes]:
    """Every rank's ``payload``, in rank order (a collective call; sizes may differ by rank)."""
    gathered = _gather_bytes(payload, None, group)
    assert gathered is not None
    return gathered


def gather_bytes(payload: bytes, rank: int, group: Any = None) -> list[bytes] | None:
    """Every rank's ``payload`` in rank order, on global rank ``rank`` only (``None`` on the others;
    a collective call). The sizes travel to every rank (one integer each), the bytes to ``rank``."""
    return _gather_bytes(payload, rank, group)


def _gather_bytes(payload: bytes, rank: int | None, group: Any) -> list[bytes] | None:
    """The payloads padded to the longest (whose length every rank learns first), then all-gathered
    (``rank`` None) or gathered to ``rank``."""
    world = dist.get_world_size(group)
    device = _collective_device(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    _settle([size, *sizes], group)
    lengths = [int(s.item()) for s in sizes]  # one host transfer per rank, once per read
    longest = max(lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if payload:
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    mine = mine.to(device)
    receiving = rank is None or dist.get_rank() == rank
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)] if receiving else None
    if rank is None:
        dist.all_gather(gathered, mine, group=group)
    else:
        dist.gather(mine, gathered, dst=rank, group=group)
    _settle([mine, *(gathered or [])], group)
    if gathered is None:
        return None
    return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, lengths)]


def _collective_device(group: Any) -> torch.device:
    """Where a collective's tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _portable_state(ledger: Ledger) -> dict[str, Any]:
    state = ledger.state()
    trace = state["trace"]
    if trace is not None:
        state["trace"] = {k: (list(v) if k == "id" else np.asarray(v)) for k, v in trace.items()}
    return state
