"""A new user's pass over the product (issue 22): each finding, with the behaviour it now has.

A complete run resumed keeps what its own steps recorded; ``save_run`` draws the validation-loss
curve the tracker measured; ids of two kinds, or of a megabyte, are refused at the first step;
an optimizer that holds some of the trainable parameters, a NaN learning rate and a meta-device
model are named for what they are; a run that fails before any value does not say values were
saved; ``inspect RUN_DIR`` predicts the memory ``inspect config.toml`` does; a full disk names
the file it could not write.
"""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import digits_config, gpt2_config, run_in_process
from torch import nn

from inrun import BatchMismatchError, InRunShapley, NonFiniteError, RunDir, UnsupportedModuleError
from inrun.cli import main
from inrun.errors import StepOrderError

XV, YV = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])


def tiny(lr: float = 0.1, momentum: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def val_loss(m: nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(XV), YV)


def step(tracker: InRunShapley, model: nn.Module, opt: torch.optim.Optimizer, ids: list, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(len(ids), 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (len(ids),), generator=g)
    with tracker.step(ids):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_resuming_a_complete_run_keeps_what_its_steps_recorded(tmp_path) -> None:
    """tracker.json (routes, cost) and the session's seconds are the run's own, not a new empty
    tracker's: a resume that runs no step rewrites neither."""
    run_in_process(digits_config(tmp_path / "run", steps=6, every=3))
    rd = RunDir(tmp_path / "run")
    tracker_json = json.loads(rd.file("tracker.json").read_text())
    seconds = rd.status()["seconds"]
    assert "not reached yet" not in json.dumps(tracker_json["coverage"])
    assert main(["train", "--resume", str(rd.path)]) == 0
    assert json.loads(rd.file("tracker.json").read_text()) == tracker_json
    assert rd.status()["state"] == "complete" and rd.status()["seconds"] == seconds
    assert rd.verify() == []


def test_save_run_draws_the_validation_loss_curve_the_tracker_measured(tmp_path) -> None:
    """Plain SGD: every step's validation pass runs at θ_t, so the curve has a point per step,
    each equal to val_loss at those parameters; the report's first and last points differ."""
    model, opt = tiny(lr=0.5)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    expected = {}
    for s in range(5):
        with torch.no_grad():
            expected[s] = float(val_loss(model))
        step(tracker, model, opt, [f"e{s}{k}" for k in range(4)], seed=s)
    with torch.no_grad():
        expected[5] = float(val_loss(model))
    rd = tracker.save_run(tmp_path / "saved")
    metrics = rd.metrics()
    curve = {s: v for s, v in zip(metrics.step, metrics.val_loss) if not math.isnan(v)}
    assert sorted(curve) == list(range(6))
    for s, v in expected.items():
        assert curve[s] == pytest.approx(v, rel=1e-12, abs=1e-12)
    summary = json.loads(rd.file("summary.json").read_text())
    assert summary["val_loss_first"] == pytest.approx(expected[0]) and summary["val_loss_final"] == pytest.approx(expected[5])
    assert summary["val_loss_first"] != summary["val_loss_final"]
    tracker.close()


def test_ids_of_two_kinds_are_refused_at_the_step_that_mixes_them() -> None:
    model, opt = tiny()
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    step(tracker, model, opt, [0, 1, 2])
    with pytest.raises(BatchMismatchError, match="mix int and str") as info:
        step(tracker, model, opt, ["a", "b", "c"])
    assert "step 1" in str(info.value)
    with pytest.raises(BatchMismatchError, match="mix int and str"):
        InRunShapley(*tiny(), val_loss=val_loss).step([0, "a"]).__enter__()


def test_an_id_of_a_megabyte_is_refused_with_what_to_do() -> None:
    model, opt = tiny()
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    huge = "x" * (1 << 20)
    with pytest.raises(ValueError, match=r"1,048,576 characters") as info:
        step(tracker, model, opt, [huge, "b"])
    assert len(str(info.value)) < 400  # the message quotes the id's start, not the megabyte
    from inrun.store.examples import examples_from

    with pytest.raises(ValueError, match="at most 1000 characters"):
        examples_from({"id": [huge], "text": ["t"]})


def test_an_optimizer_holding_some_trainable_parameters_is_named_as_such() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # model[2] is trainable, not held
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    step(tracker, model, opt, [0, 1, 2])
    with pytest.raises(StepOrderError, match=r"not held by the optimizer \(2\.weight, 2\.bias\)") as info:
        step(tracker, model, opt, [3, 4, 5])
    assert "requires_grad=False" in str(info.value)


def test_a_nan_learning_rate_is_reported_as_one_before_the_update() -> None:
    model, opt = tiny(lr=float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    with pytest.raises(NonFiniteError, match="learning rate of parameter group 0 is nan"):
        step(tracker, model, opt, [0, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not applied


def test_a_meta_device_model_is_refused_when_the_tracker_is_made() -> None:
    with torch.device("meta"):
        model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModuleError, match="weight is on the meta device.*to_empty"):
        InRunShapley(model, opt, val_loss=lambda m: m(torch.zeros(1, 5)).sum())


def test_a_run_that_fails_before_any_value_does_not_say_values_were_saved(tmp_path, monkeypatch, capsys) -> None:
    """Out of memory at the first step: one line on stderr, and a status that names it and says
    no step was valued."""
    import inrun.run.runner

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(inrun.run.runner, "_grad_norm", out_of_memory)
    cfg = tmp_path / "run.toml"
    cfg.write_text(digits_config(tmp_path / "run", steps=4, every=2))
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: OutOfMemoryError: CUDA out of memory") and len(err.splitlines()) == 2
    status = RunDir(tmp_path / "run").status()
    assert status["state"] == "failed" and "out of memory" in status["message"]
    assert "No step was valued" in status["message"] and "are saved" not in status["message"]


def test_inspect_of_a_run_directory_predicts_the_memory_of_its_config(tmp_path) -> None:
    """AdamW keeps each layer's per-example factors until optimizer.step(): both inspections
    count them (the run directory used to count the validation gradient alone)."""
    from inrun.analysis.inspect import inspect_run_dir, inspect_target

    run_in_process(gpt2_config(tmp_path / "run", steps=2), overrides=("optimizer.name='adamw'", "optimizer.lr=0.01",
                                                                       "audit.enabled=false"))
    from_dir = inspect_run_dir(tmp_path / "run")
    from_config = inspect_target(str(tmp_path / "run" / "config.toml"))
    assert from_dir.extra_bytes == from_config.extra_bytes
    assert any("kept per-example" in name for name, _ in from_dir.memory)


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys) -> None:
    """pyarrow reports a full disk without the path: the error that reaches the user names it."""
    import pyarrow.parquet as pq

    real = pq.write_table

    def full(table, where, *args, **kwargs):
        if "metrics" in str(where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full)
    cfg = tmp_path / "run.toml"
    cfg.write_text(digits_config(tmp_path / "run", steps=4, every=2))
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "metrics.parquet" in err
    assert "metrics.parquet" in RunDir(tmp_path / "run").status()["message"]
