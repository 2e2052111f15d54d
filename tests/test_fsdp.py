"""FSDP2 under ``torchrun`` (2 ranks, gloo, CPU) == one process on the same global batches.

``tests/fsdp_worker.py`` runs every scenario of its table in one ``torchrun`` launch (each block
and the root ``fully_shard``-ed, or Accelerate's own FSDP2 layout); each rank writes the global
table its ``tracker.values()`` returned. Here the same global batches run in one process: for SGD
with the tracker and the ``torch.func`` oracle (``test_ddp.reference``), else with the tracker.
FSDP1 and DeepSpeed are refused when the tracker is made.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from ddp_worker import data, lr_factor, make_model, make_val_loss
from fsdp_worker import SCENARIOS, FSDPScenario, loss_of, make_optimizer
from test_ddp import ROOT, TOLERANCE, WORLD, launch_torchrun, reference

from inrun import InRunShapley, UnsupportedModuleError, ValueLedger


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    launch_torchrun(ROOT / "tests" / "fsdp_worker.py", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    return {"ranks": ranks, "dir": out}

def one_process(s: FSDPScenario) -> dict[str, Any]:
    """The tracker in one process on the global batches, with the scenario's optimizer and loss."""
    model = make_model(getattr(torch, s.dtype))
    opt = make_optimizer(s, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    tracker = InRunShapley(model, opt, val_loss=make_val_loss(s.val_vector), order=s.order,
                           second_order=s.second_order)
    rows = data()
    for t in range(s.steps):
        ids = s.global_ids(t, WORLD)
        with tracker.step(ids):
            loss_of(model, rows[ids], s).backward()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    values, per_validation = tracker.values(), tracker.per_validation()
    tracker.close()
    largest = float(np.abs(values.value).max())
    return {"values": values, "per_validation": per_validation, "scale": dict.fromkeys(values, largest)}

VALUED = [s for s in SCENARIOS if not s.refused]

@pytest.mark.parametrize("s", VALUED, ids=lambda s: s.name)
def test_fsdp2_equals_single_process(fsdp_results: dict[str, Any], s: FSDPScenario) -> None:
    """Relative to ``η‖g_z‖‖g_val‖`` (the first scenario, against the oracle too) or to the
    largest value."""
    rank0, rank1 = (r[s.name] for r in fsdp_results["ranks"])
    assert "error" not in rank0, rank0.get("message")
    by_rank = ("local_ids", "step_seconds", "on_rank_0_only")
    assert {k: v for k, v in rank0.items() if k not in by_rank} == \
        {k: v for k, v in rank1.items() if k not in by_rank}, "ranks disagree"
    assert rank0["on_rank_0_only"] == [rank0["ids"], rank0["value"]] and rank1["on_rank_0_only"] is None
    all_ids = [i for t in range(s.steps) for i in s.global_ids(t, WORLD)]
    assert sorted(rank0["ids"]) == all_ids and set(rank0["count"]) == {1}
    assert sorted(rank0["local_ids"] + rank1["local_ids"]) == all_ids, "each rank values its own"

    with_oracle = s is VALUED[0]  # the one-process tracker is checked against the oracle elsewhere
    ref = reference(s) if with_oracle else one_process(s)
    single, tol = ref["values"], TOLERANCE[s.dtype]
    worst = 0.0
    for i, value, first, second in zip(rank0["ids"], rank0["value"], rank0["first_order"], rank0["second_order"]):
        err = abs(value - single[i])
        if with_oracle:
            err = max(err, abs(first - ref["oracle"][i][0]), abs(second - ref["oracle"][i][1]))
        assert err <= tol * ref["scale"][i], f"{s.name} id {i}: FSDP2 {value!r} vs one process {single[i]!r}"
        worst = max(worst, err / ref["scale"][i])
    if s.val_vector:
        ids_ref, table_ref = ref["per_validation"]
        table = np.asarray(rank0["per_validation"])
        bounds = np.asarray([tol * ref["scale"][i] for i in rank0["ids"]])[:, None]
        assert (np.abs(table - table_ref[[ids_ref.index(i) for i in rank0["ids"]]]) <= bounds).all()
    print(f"{s.name}: max error / scale vs one process{' and oracle' if with_oracle else ''}: {worst:.1e}")

def test_fsdp2_check_catches_summed_gradients(fsdp_results: dict[str, Any]) -> None:
    """``set_gradient_divide_factor(1.0)`` on the root sums its gradients over the ranks: the
    check (dots summed over ranks vs the shards' ``<p.grad, g_val>``) fails on every rank."""
    for r in fsdp_results["ranks"]:
        assert r["sum"].get("error") == "ConsistencyError", r["sum"]
        assert "transformer.wte.weight" in r["sum"]["message"]
        assert "set_requires_gradient_sync" in r["sum"]["message"]

def test_fsdp2_refuses_value_clipping_on_every_rank(fsdp_results: dict[str, Any]) -> None:
    """Value clipping's per-coordinate factors are shard-shaped: refused together by every rank
    (one rank's shard may be clipped where the other's is not), naming norm clipping."""
    for r in fsdp_results["ranks"]:
        assert r["value clip"].get("error") == "GradientChangeError", r["value clip"]
        assert "clip_grad_norm_" in r["value clip"]["message"]


def test_fsdp2_refuses_the_hessian_the_audit_and_carry(fsdp_results: dict[str, Any]) -> None:
    for r in fsdp_results["ranks"]:
        assert r["refused"]["carry"]["error"] == "UnsupportedModuleError"
        assert "carry='off'" in r["refused"]["carry"]["message"]
        assert r["refused"]["hessian"]["error"] == "UnsupportedModuleError"
        assert "trapezoid" in r["refused"]["hessian"]["message"]
        assert r["refused"]["audit"]["error"] == "AuditError" and "FSDP2" in r["refused"]["audit"]["message"]


def test_fsdp2_saved_ledger_is_global(fsdp_results: dict[str, Any]) -> None:
    rank0 = fsdp_results["ranks"][0]["f64 gram"]
    values = ValueLedger.load(fsdp_results["dir"] / "ledger-f64_gram").values()
    assert values.ids() == rank0["ids"]
    np.testing.assert_array_equal(values.value, rank0["value"])

def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2() -> None:
    """FSDP1 needs an accelerator to be built, and DeepSpeed is not installed: the refusal reads
    the model's structure, so an uninitialised ``FullyShardedDataParallel`` around the model and a
    model whose parameters carry ZeRO-3's partition attribute stand in for them."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fsdp1)
    fsdp1._modules["_fsdp_wrapped_module"] = make_model(torch.float32)
    zero3 = make_model(torch.float32)
    zero3.lm_head.weight.ds_id = 0
    for model, inner, what in ((fsdp1, fsdp1._fsdp_wrapped_module, "FSDP1"), (zero3, zero3, "DeepSpeed")):
        with pytest.raises(UnsupportedModuleError, match=f"{what}.*fully_shard.*fsdp_version=2"):
            InRunShapley(model, torch.optim.SGD(inner.parameters(), lr=0.1), val_loss=make_val_loss(False))
