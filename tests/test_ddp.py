"""DDP under ``torchrun`` (2 ranks, gloo, CPU) == one process on the same global batches == oracle.

``tests/ddp_worker.py`` runs every scenario of its table in one ``torchrun`` launch; each rank
writes the global table its ``tracker.values()`` returned. Here the same global batches are
replayed in one process, with the tracker and with the ``torch.func`` oracle (per-example
gradients of the whole model, the clip factor of ``clip_grad_norm_`` applied explicitly).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ddp_worker import (
    BASE_LR,
    SCENARIOS,
    SEQ,
    Scenario,
    data,
    lr_factor,
    make_model,
    make_val_loss,
    token_losses,
    train_loss,
)

from inrun import InRunShapley, ValueLedger, exact
from inrun.store.ledger import merge_states
from inrun.tracking.ddp import all_gather_bytes, all_reduce_settled, gather_bytes

WORLD = 2
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}  # relative to η·‖g_z‖·‖g_val‖
ROOT = Path(__file__).resolve().parent.parent


def launch_torchrun(script: Path, out: Path, nproc: int = WORLD, timeout: float = 600) -> None:
    """Run ``script OUT`` under ``torchrun --standalone`` (a free port is picked) with ``src`` importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(script), str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    launch_torchrun(ROOT / "tests" / "ddp_worker.py", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    return {"ranks": ranks, "dir": out}


# ----------------------------------------------------------------------------- the reference
def reference(s: Scenario) -> dict[str, Any]:
    """One process, batch ``G = W·k·b`` per step, token-mean loss: tracker values and oracle."""
    dtype = getattr(torch, s.dtype)
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    val_loss = make_val_loss(s.val_vector)
    tracker = InRunShapley(model, opt, val_loss=val_loss, order=s.order, second_order=s.second_order)
    rows = data()
    oracle: dict[int, list[float]] = {}
    scale: dict[int, float] = {}
    clipped = False
    for t in range(s.steps):
        ids = s.global_ids(t, WORLD)
        x = rows[ids]
        ref = copy.deepcopy(model).double()
        n_tokens = len(ids) * (SEQ - 1)
        pe = exact.per_example_gradients(
            ref, lambda f, xr, n=n_tokens: token_losses(f(input_ids=xr).logits, xr).sum() / n, (x,)
        )
        g_val = exact.validation_gradient(ref, val_loss)
        c = opt.param_groups[0]["lr"]
        if s.clip is not None:
            norm = torch.sqrt(sum((g.sum(0) ** 2).sum() for g in pe.values())).item()
            c *= min(1.0, s.clip / (norm + 1e-6))
            clipped |= norm > s.clip
        first = exact.first_order_values(pe, g_val, c)
        second = torch.zeros_like(first)
        if s.order == 2 and s.second_order == "hessian":
            second = -0.5 * c * c * _dot(pe, _hvp(ref, val_loss, {n: g.sum(0) for n, g in pe.items()}))
        ref_scale = c * exact.dot_scale(pe, g_val)

        with tracker.step(ids):
            train_loss(model, x).backward()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        sched.step()
        opt.zero_grad()

        if s.order == 2 and s.second_order == "trapezoid":
            g_next = exact.validation_gradient(copy.deepcopy(model).double(), val_loss)
            diff = {n: g_next[n] - g_val[n] for n in g_val}
            second = 0.5 * c * _dot(pe, diff)
        for i, f, sc, r in zip(ids, first.tolist(), second.tolist(), ref_scale.tolist()):
            oracle[i] = [f, sc]
            scale[i] = r
    assert s.clip is None or clipped, f"{s.name}: the clip threshold never clipped"
    values = tracker.values()
    per_val = tracker.per_validation()
    tracker.close()
    return {"values": values, "per_validation": per_val, "oracle": oracle, "scale": scale}


def _dot(per_example: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(g.flatten(1).double() @ vectors[n].flatten().double() for n, g in per_example.items())


def _hvp(model: torch.nn.Module, val_loss: Any, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``H v`` of the validation loss at the model's parameters (eval mode)."""
    model.eval()
    params = dict(model.named_parameters())
    names = list(vectors)
    grads = torch.autograd.grad(val_loss(model).sum(), [params[n] for n in names], create_graph=True)
    hv = torch.autograd.grad(grads, [params[n] for n in names], grad_outputs=[vectors[n] for n in names])
    return {n: h.detach() for n, h in zip(names, hv)}


# ----------------------------------------------------------------------------- the tests
VALUED = [s for s in SCENARIOS if not s.sum_hook]


@pytest.mark.parametrize("s", VALUED, ids=lambda s: s.name)
def test_ddp_equals_single_process_and_oracle(ddp_results: dict[str, Any], s: Scenario) -> None:
    rank0, rank1 = (r[s.name] for r in ddp_results["ranks"])
    assert "error" not in rank0, rank0.get("message")
    own = {"local_ids": rank0["local_ids"], "on_rank_0_only": rank0["on_rank_0_only"]}  # by rank
    assert rank0 == {**rank1, **own}, "ranks disagree on the global table"
    all_ids = [i for t in range(s.steps) for i in s.global_ids(t, WORLD)]
    assert sorted(rank0["ids"]) == all_ids and set(rank0["count"]) == {1}
    assert sorted(rank0["local_ids"] + rank1["local_ids"]) == all_ids, "each rank values its own"
    # each step's drop row sums the values of every rank's examples of the step
    assert len(rank0["drop_values"]) == s.steps
    assert math.isclose(sum(rank0["drop_values"]), sum(rank0["value"]), rel_tol=1e-9, abs_tol=1e-12)

    ref = reference(s)
    tol = TOLERANCE[s.dtype]
    got = {i: (v, f, sc) for i, v, f, sc in zip(rank0["ids"], rank0["value"], rank0["first_order"], rank0["second_order"])}
    single = ref["values"]
    worst_single = worst_oracle = 0.0
    for i in all_ids:
        value, first, second = got[i]
        bound = tol * ref["scale"][i]
        err_single = max(abs(value - single[i]), abs(first - single.first_order[single.ids().index(i)]))
        err_oracle = max(abs(first - ref["oracle"][i][0]), abs(second - ref["oracle"][i][1]))
        assert err_single <= bound, f"{s.name} id {i}: DDP {value!r} vs one process {single[i]!r}"
        assert err_oracle <= bound, f"{s.name} id {i}: DDP {(first, second)} vs oracle {ref['oracle'][i]}"
        worst_single = max(worst_single, err_single / ref["scale"][i])
        worst_oracle = max(worst_oracle, err_oracle / ref["scale"][i])
    if s.order == 2:
        assert any(abs(got[i][2]) > 1e3 * tol * ref["scale"][i] for i in all_ids), "order 2 did nothing"
    if s.val_vector:
        ids_ref, table_ref = ref["per_validation"]
        table = np.asarray(rank0["per_validation"])
        rows = [ids_ref.index(i) for i in rank0["ids"]]
        bounds = np.asarray([tol * ref["scale"][i] for i in rank0["ids"]])[:, None]
        assert table.shape == (len(all_ids), 3)
        assert (np.abs(table - table_ref[rows]) <= bounds).all()
    print(f"{s.name}: max error / (η‖g_z‖‖g_val‖): vs one process {worst_single:.2e}, vs oracle {worst_oracle:.2e}")


def test_ddp_check_catches_unaveraged_gradients(ddp_results: dict[str, Any]) -> None:
    """A communication hook that sums instead of averaging: the all-reduced check fails on every rank."""
    for r in ddp_results["ranks"]:
        assert r["sum hook"].get("error") == "ConsistencyError", r["sum hook"]
        assert "no_sync" in r["sum hook"]["message"]


def test_ddp_saved_ledger_is_global(ddp_results: dict[str, Any]) -> None:
    rank0 = ddp_results["ranks"][0]["f64"]
    ledger = ValueLedger.load(ddp_results["dir"] / "ledger-f64")
    values = ledger.values()
    assert values.ids() == rank0["ids"]
    np.testing.assert_array_equal(values.value, rank0["value"])
    trace = ledger.trace()
    assert sorted(trace["id"].tolist()) == sorted(rank0["ids"])
    assert list(trace["step"]) == sorted(trace["step"])


def test_merge_states_sums_by_id() -> None:
    a, b = ValueLedger(keep_trace=True), ValueLedger(keep_trace=True)
    a.add(0, [1, 2], np.array([[1.0, 2.0], [3.0, 4.0]]), lr=0.1)
    b.add(0, [3, 4], np.array([[5.0, 6.0], [7.0, 8.0]]), lr=0.1)
    b.add(1, [1], np.array([[10.0, 20.0]]), np.array([[0.5, 0.5]]), lr=0.05)
    a.record_skip(2, "non-finite")
    b.record_skip(2, "non-finite")
    a.set_sources({1: "pkg"})
    merged = merge_states([a.state(), b.state()]).values()
    assert merged.ids() == [1, 2, 3, 4]
    np.testing.assert_array_equal(merged.value, [34.0, 7.0, 11.0, 15.0])
    np.testing.assert_array_equal(merged.counts, [2, 1, 1, 1])
    assert merged.sources[0] == "pkg"
    ledger = merge_states([a.state(), b.state()])
    np.testing.assert_array_equal(ledger.per_validation()[1][0], [11.5, 22.5])
    assert ledger.skipped == [{"step": 2, "reason": "non-finite"}]
    assert list(ledger.trace()["step"]) == [0, 0, 0, 0, 1]


@pytest.fixture
def gloo_alone(tmp_path: Path):
    """A one-rank gloo process group in this process (its collectives still run on gloo's threads)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_hold_their_tensors_until_gloo_lets_go(gloo_alone: None) -> None:
    """The cause of the abort at exit: gloo's worker thread releases a collective's tensors after
    the caller has woken (a plain ``all_reduce`` returned with the worker still holding its tensor
    in about a quarter of 500 calls here); when Python has already dropped the tensor, the worker
    must take the GIL to free it, and at interpreter shutdown that kills the process. The
    tracker's collectives return only once the worker has let go."""
    for _ in range(200):
        t = torch.ones(4, dtype=torch.float64)
        all_reduce_settled(t)
        assert t._use_count() == 1
        assert t.tolist() == [1.0] * 4
    assert all_gather_bytes(b"ledger") == [b"ledger"]
    assert all_gather_bytes(b"") == [b""]
    assert gather_bytes(b"ledger", 0) == [b"ledger"]


def test_the_global_ledger_gathered_to_one_rank_only(ddp_results: dict[str, Any]) -> None:
    """``global_ledger(rank=0)``: rank 0 gets the same global table every rank gets from
    ``values()``; the other ranks get nothing (no copy of the table on them)."""
    for name in ("f64", "f64 trapezoid no_sync"):
        rank0, rank1 = (r[name] for r in ddp_results["ranks"])
        assert rank0["on_rank_0_only"] == [rank0["ids"], rank0["value"]], name
        assert rank1["on_rank_0_only"] is None, name


def test_ddp_trainer_equals_one_process(ddp_results: dict[str, Any]) -> None:
    """``InRunTrainer`` under torchrun (2 ranks x batch 1, accumulation 2 with no_sync, clipping)
    == the plain-loop tracker in one process with batch 2 on the same global batches (which
    ``test_hf`` shows equal to the one-process ``InRunTrainer``)."""
    from test_hf import gpt2, plain_loop

    rank0, rank1 = (r["trainer"] for r in ddp_results["ranks"])
    assert rank0["wrapped"] == "DistributedDataParallel"
    assert (rank0["ids"], rank0["value"]) == (rank1["ids"], rank1["value"])
    assert not set(rank0["local_ids"]) & set(rank1["local_ids"])
    assert rank0["num_items"] == rank1["num_items"], "the Trainer normalizes by the global token count"
    ids = sorted(rank0["ids"], key=lambda i: int(i[2:]))
    expected, at_step_2, _ = plain_loop(gpt2(), ids, rank0["num_items"])
    got = dict(zip(rank0["ids"], rank0["value"]))
    scale = max(abs(v) for v in expected.values())
    assert sorted(got) == sorted(expected) and set(rank0["count"]) == {1}
    err = max(abs(got[i] - expected[i]) for i in ids) / scale
    assert err <= 1e-9, f"DDP Trainer vs one process: {err:.2e} of the largest value"
    saved = ValueLedger.load(ddp_results["dir"] / "trainer" / "inrun").values()
    assert dict(saved) == got
    checkpoint = ValueLedger.load(ddp_results["dir"] / "trainer" / "checkpoint-2" / "inrun").values()
    assert max(abs(checkpoint[i] - at_step_2[i]) for i in at_step_2) <= 1e-9 * scale
    assert sorted(checkpoint) == sorted(at_step_2)
    print(f"DDP Trainer vs one process: max |Δ| / max |value| = {err:.2e}")
