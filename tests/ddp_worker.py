"""DDP scenarios on a tiny GPT-2, run by ``torchrun`` from ``tests/test_ddp.py``.

Usage::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR

Every rank writes ``OUT_DIR/rank{r}.json``: per scenario, the *gathered* table that
``tracker.values()`` returned on that rank (ids, values, counts...) or the error it raised. The
scenario table, the data and the model are defined here and imported by the test, which replays
the same global batches in one process.

Data layout of a scenario with ``W`` ranks, ``k`` micro-batches per step and ``b`` rows per
micro-batch: the global batch of step ``t`` is ids ``[t·G, (t+1)·G)`` with ``G = W·k·b``; rank
``r`` takes, for micro-batch ``i``, the ``b`` ids starting at ``t·G + (r·k + i)·b``. Each rank
back-propagates its micro-batch's token-mean loss divided by ``k``; DDP averages over ranks, so
the update is that of one process on the ``G`` rows with a token-mean loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, SEQ, N_VAL = 40, 8, 3
BASE_LR = 0.2


@dataclass(frozen=True)
class Scenario:
    """One DDP run; every field changes one thing the tracker must get right."""

    name: str
    dtype: str = "float64"
    local_batch: int = 2
    micro: int = 1
    """Micro-batches per optimizer step and rank (gradient accumulation)."""
    no_sync: bool = True
    """Run the first ``micro - 1`` backward passes inside ``ddp.no_sync()``."""
    steps: int = 2
    clip: float | None = None
    order: int = 1
    second_order: str = "trapezoid"
    val_vector: bool = False
    """``val_loss`` returns one loss per validation sequence (per-validation table)."""
    sum_hook: bool = False
    """A DDP communication hook that sums instead of averaging: the check must fail."""
    keep_trace: bool = False

    def global_batch(self, world: int) -> int:
        return world * self.micro * self.local_batch

    def local_ids(self, step: int, micro: int, rank: int, world: int) -> list[int]:
        start = step * self.global_batch(world) + (rank * self.micro + micro) * self.local_batch
        return list(range(start, start + self.local_batch))

    def global_ids(self, step: int, world: int) -> list[int]:
        g = self.global_batch(world)
        return list(range(step * g, (step + 1) * g))


SCENARIOS = [
    Scenario("f64", steps=3, keep_trace=True),
    Scenario("f64 no_sync clip per-validation", micro=2, clip=0.3, val_vector=True),
    Scenario("f64 accumulate without no_sync", micro=2, no_sync=False),
    Scenario("f32 no_sync clip", dtype="float32", micro=2, clip=0.3),
    Scenario("f64 trapezoid no_sync", micro=2, order=2),
    Scenario("f64 hessian", order=2, second_order="hessian"),
    Scenario("sum hook", steps=1, sum_hook=True),
]


def data(n: int = 256) -> Tensor:
    """``[n, SEQ]`` token ids; row ``i`` is the example with id ``i``."""
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(3))


def val_tokens() -> Tensor:
    return torch.randint(0, VOCAB, (N_VAL, SEQ), generator=torch.Generator().manual_seed(99))


def make_model(dtype: torch.dtype) -> nn.Module:
    """A 2-layer GPT-2 (tied embeddings), identical on every rank and in the reference.

    Eager attention: it has the double backward a Hessian-vector product needs (CPU
    scaled-dot-product attention has none) and ``vmap`` batches it (the oracle is faster).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).to(dtype)


def lr_factor(step: int) -> float:
    """A schedule, so that the coefficient changes from step to step."""
    return 1.0 / (1 + step)


def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """``[rows, SEQ-1]`` next-token losses."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


def train_loss(model: nn.Module, x: Tensor) -> Tensor:
    """Token-mean next-token loss in the model's dtype (HF's ``labels=`` loss upcasts to float32
    only, which would make a float64 run differ from the float64 oracle at ~1e-8)."""
    return token_losses(model(input_ids=x).logits, x).mean()


def make_val_loss(vector: bool):
    val = val_tokens()

    def val_loss(m: nn.Module) -> Tensor:
        losses = token_losses(m(input_ids=val).logits, val)
        return losses.mean(dim=1) if vector else losses.mean()

    return val_loss


def table_of(tracker: Any) -> dict[str, Any]:
    values = tracker.values()
    per_val = tracker.per_validation()
    return {
        "ids": values.ids(),
        "value": values.value.tolist(),
        "first_order": values.first_order.tolist(),
        "second_order": values.second_order.tolist(),
        "count": values.counts.tolist(),
        "per_validation": None if per_val is None else per_val[1].tolist(),
        "local_ids": tracker.ledger.values().ids(),
        "drop_values": [r["values"] for r in tracker.drops()],
        "on_rank_0_only": _ids_values(tracker.global_ledger(rank=0)),
    }


def _ids_values(ledger: Any) -> Any:
    """``[ids, values]`` of a ledger, ``None`` for none (a rank that did not receive it)."""
    if ledger is None:
        return None
    values = ledger.values()
    return [values.ids(), values.value.tolist()]


def sum_allreduce_hook(state, bucket):  # DDP checks the annotations: leave them out
    """A DDP communication hook that sums the gradients over ranks (DDP's default averages)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def run_ddp(s: Scenario, rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from inrun import InRunShapley

    model = DDP(make_model(getattr(torch, s.dtype)))
    if s.sum_hook:
        model.register_comm_hook(None, sum_allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    tracker = InRunShapley(
        model, opt, val_loss=make_val_loss(s.val_vector), order=s.order,
        second_order=s.second_order, keep_trace=s.keep_trace,
    )
    rows = data()
    for t in range(s.steps):
        for i in range(s.micro):
            ids = s.local_ids(t, i, rank, world)
            x = rows[ids]
            quiet = s.no_sync and i < s.micro - 1
            with model.no_sync() if quiet else contextlib.nullcontext(), tracker.step(ids):
                (train_loss(model, x) / s.micro).backward()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    result = table_of(tracker)
    ledger = tracker.global_ledger()
    if rank == 0 and s.keep_trace:
        ledger.save(out / f"ledger-{s.name.replace(' ', '_')}")
    tracker.close()
    return result


TRAINER_BATCH = 1
"""Per-device batch of the DDP Trainer run: with 2 ranks it matches test_hf's one-process batch 2."""


def run_trainer(rank: int, world: int, out: Path) -> dict[str, Any]:
    """``InRunTrainer`` under torchrun: accelerate wraps the model in DDP, accumulation uses no_sync."""
    from test_hf import N_TRAIN, make_trainer

    ids = [f"ex{i}" for i in range(N_TRAIN)]
    trainer = make_trainer(out / "trainer", ids, args={"per_device_train_batch_size": TRAINER_BATCH})
    trainer.train()
    values = trainer.inrun_values()
    tracker = trainer.inrun_tracker
    return {
        "ids": values.ids(),
        "value": values.value.tolist(),
        "count": values.counts.tolist(),
        "local_ids": tracker.ledger.values().ids(),
        "wrapped": type(tracker.model).__name__,
        "num_items": trainer.num_items,
    }


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {"world": world}
    for s in SCENARIOS:
        try:
            results[s.name] = run_ddp(s, rank, world, out)
        except Exception as exc:
            results[s.name] = {"error": type(exc).__name__, "message": str(exc)}
            if not s.sum_hook:
                traceback.print_exc()
        results[s.name]["scenario"] = asdict(s)
        dist.barrier()
    results["trainer"] = run_trainer(rank, world, out)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(Path(sys.argv[1]))
