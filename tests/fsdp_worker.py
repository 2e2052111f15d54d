"""FSDP2 scenarios on the tiny GPT-2 of ``ddp_worker``, run by ``torchrun`` from ``tests/test_fsdp.py``.

Usage::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR

Each block and the root are sharded with ``fully_shard`` (gloo, CPU). The data layout, model,
losses and schedule are ``ddp_worker``'s: rank ``r`` back-propagates the token-mean loss of its
micro-batch divided by the number of micro-batches, FSDP2 averages over the ranks, so the update
is one process's on the global batch. Every rank writes ``OUT_DIR/rank{r}.json``: per scenario
the global table ``tracker.values()`` returned, or the error the tracker raised.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from ddp_worker import (
    BASE_LR,
    Scenario,
    data,
    lr_factor,
    make_model,
    make_val_loss,
    table_of,
    train_loss,
)


@dataclass(frozen=True)
class FSDPScenario(Scenario):
    """A DDP scenario, plus what only FSDP2 or the tracker's routes change."""

    route: str = "auto"
    bookkeeping: str = "off"
    optimizer: str = "sgd"
    output_dtype: str | None = None
    """``MixedPrecisionPolicy(output_dtype=...)``: the model returns cast copies of its outputs."""
    model_loss: bool = False
    """The loss the model computes itself (``labels=``): from the logits before FSDP2's cast."""
    layout: str = "blocks"
    """``"blocks"``: ``fully_shard`` on each block and the root; ``"accelerate"``: Accelerate's own
    FSDP2 preparation (``fsdp2_prepare_model``: blocks, one group for the tied embedding, LM head and
    final norm, then the root)."""
    divide_factor: float | None = None
    """``set_gradient_divide_factor``: 1.0 sums the gradients over the ranks (the check must fail)."""
    value_clip: float | None = None
    """``clip_grad_value_`` before the step: a per-coordinate map, refused under FSDP2."""

    @property
    def refused(self) -> bool:
        return self.divide_factor is not None or self.value_clip is not None


SCENARIOS = [
    FSDPScenario("f64 gram", steps=3, keep_trace=True, route="gram"),
    FSDPScenario("f64 no-sync clip per-validation", micro=2, clip=0.3, val_vector=True),
    FSDPScenario("f64 accumulate with sync vector book-keeping", micro=2, no_sync=False, route="vector",
                 bookkeeping="always"),
    FSDPScenario("f64 trapezoid no-sync", micro=2, order=2),
    FSDPScenario("f64 adamw clip", optimizer="adamw", clip=0.3),
    FSDPScenario("f32 output cast model loss", dtype="float32", output_dtype="float64", model_loss=True),
    FSDPScenario("f64 accelerate layout no-sync", micro=2, layout="accelerate"),
    FSDPScenario("sum", steps=1, divide_factor=1.0),
    FSDPScenario("value clip", steps=1, value_clip=1e-3),
]


def loss_of(model: nn.Module, x: torch.Tensor, s: FSDPScenario) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss if s.model_loss else train_loss(model, x)


def shard(model: nn.Module, s: FSDPScenario) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if s.layout == "accelerate":
        return accelerate_fsdp2(model)
    for block in model.transformer.h:
        fully_shard(block)
    root: dict[str, Any] = {}
    if s.output_dtype is not None:
        root["mp_policy"] = MixedPrecisionPolicy(output_dtype=getattr(torch, s.output_dtype))
    fully_shard(model, **root)
    if s.divide_factor is not None:
        model.set_gradient_divide_factor(s.divide_factor)
    return model


def accelerate_fsdp2(model: nn.Module) -> nn.Module:
    """Accelerate's FSDP2 preparation of ``model`` (what ``Accelerator.prepare`` and the Trainer run
    with ``fsdp_version=2``). Accelerate enables FSDP only on accelerator devices (on CPU it falls
    back to DDP), so its preparation function is called with the settings it reads."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["GPT2Block"])
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=True, device=torch.device("cpu"), parallelism_config=None)
    return fsdp2_prepare_model(accelerator, model)


def refusals() -> dict[str, Any]:
    """What FSDP2 does not support is refused when the tracker is made: the error of each."""
    from inrun import InRunShapley

    model = shard(make_model(torch.float64), SCENARIOS[0])
    out = {}
    for name, options in (("hessian", {"order": 2, "second_order": "hessian"}), ("audit", {"audit": True}),
                          ("carry", {"carry": "momentum"})):
        try:
            InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), val_loss=make_val_loss(False),
                         **options).close()
            out[name] = {}
        except Exception as exc:
            out[name] = {"error": type(exc).__name__, "message": str(exc)}
    return out


def make_optimizer(s: FSDPScenario, params: Any) -> torch.optim.Optimizer:
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(params, lr=BASE_LR)


def run_scenario(s: FSDPScenario, rank: int, world: int, out: Path, plain: bool = False) -> dict[str, Any]:
    """One scenario; ``plain``: the same training without the tracker (timed, for the docs)."""
    from inrun import InRunShapley

    model = shard(make_model(getattr(torch, s.dtype)), s)
    opt = make_optimizer(s, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    tracker = None if plain else InRunShapley(
        model, opt, val_loss=make_val_loss(s.val_vector), order=s.order, second_order=s.second_order,
        keep_trace=s.keep_trace, route=s.route, bookkeeping=s.bookkeeping,
    )
    rows = data()
    step_seconds = []
    for t in range(s.steps):
        start = time.perf_counter()
        for i in range(s.micro):
            ids = s.local_ids(t, i, rank, world)
            model.set_requires_gradient_sync(not (s.no_sync and i < s.micro - 1))
            if tracker is None:
                (loss_of(model, rows[ids], s) / s.micro).backward()
                continue
            with tracker.step(ids):
                (loss_of(model, rows[ids], s) / s.micro).backward()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        if s.value_clip is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), s.value_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        step_seconds.append(time.perf_counter() - start)
    if tracker is None:
        return {"step_seconds": step_seconds}
    result = table_of(tracker)
    result["step_seconds"] = step_seconds
    ledger = tracker.global_ledger()
    if rank == 0 and s.keep_trace:
        ledger.save(out / f"ledger-{s.name.replace(' ', '_')}")
    tracker.close()
    return result


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {"world": world}
    for s in SCENARIOS:
        try:
            results[s.name] = run_scenario(s, rank, world, out)
        except Exception as exc:
            results[s.name] = {"error": type(exc).__name__, "message": str(exc)}
            if not s.refused:
                traceback.print_exc()
        results[s.name]["scenario"] = asdict(s)
        dist.barrier()
    results["refused"] = refusals()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
