"""Run directories: Parquet results, metadata checked on resume, kill -9 and resume, NaN steps.

"Identical after resume" is tested as *bit-identical*: values, counts, trace, losses and the
final parameters of a run killed with SIGKILL at a random moment and resumed equal those of an
uninterrupted run exactly (same machine, torch build and thread count).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import cli, digits_config, run_in_process, tabular_config, tabular_file

from inrun import ValueLedger
from inrun.cli import main
from inrun.files import read_json, write_json
from inrun.run.runner import RunStopped
from inrun.store.rundir import RunDir, RunDirError

RESULT_FILES = ("values.parquet", "metrics.parquet", "examples.parquet", "manifest.json")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("runs") / "digits"
    return run_in_process(digits_config(out, steps=40, every=10)).run_dir


def test_run_directory_holds_parquet_results_and_metadata(digits_run) -> None:
    rd = digits_run
    for name in (*RESULT_FILES, "run.json", "config.toml", "summary.json", "ledger.json"):
        assert rd.file(name).exists(), name
    meta = rd.meta()
    assert meta["inrun_version"] and len(meta["model_fingerprint"]) == 64
    assert len(meta["validation_hash"]) == 64 and meta["config"]["training"]["steps"] == 40
    assert rd.status()["state"] == "complete"
    values = pq.read_table(rd.file("values.parquet"))
    assert values.column_names == ["id", "value", "first_order", "second_order", "count", "source"]
    assert str(values.schema.field("value").type) == "double"
    trace = rd.ledger().trace()
    assert {"step", "lr", "id", "first_order", "second_order"} <= set(trace)
    assert len(trace["step"]) == 40 * 16 and set(trace["step"].tolist()) == set(range(40))
    # The trace is appended one part per checkpoint (every 10 steps), never rewritten.
    parts = sorted(p.name for p in rd.file("trace").glob("part-*.parquet"))
    assert parts == [f"part-{a:09d}-{a + 9:09d}.parquet" for a in (0, 10, 20, 30)]
    assert pq.read_table(rd.file("trace")).num_rows == 40 * 16  # a Parquet dataset as it is
    # Parquet round trip: the saved ledger reads back to the same numbers as the checkpoint's.
    _, last = rd.checkpoints()[-1]
    a, b = rd.ledger().values(), ValueLedger.load(last / "ledger").values()
    assert list(a) == list(b)
    np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert sum(a.counts) == 40 * 16 and np.isfinite(a.value).all()
    assert [s for s, _ in rd.checkpoints()] == [30, 40]  # keep = 2
    assert not list(rd.path.rglob("*.tmp")) and not list(rd.path.rglob(".tmp-*"))
    state = torch.load(last / "state.pt", weights_only=True)
    # The one checkpoint schema of every loop: objects by name, and the loop's own data in extra.
    assert state["step"] == 40 and set(state) == {"format", "step", "tracker", "objects", "rng", "extra"}
    assert set(state["objects"]) == {"model", "optimizer", "schedule"} and set(state["extra"]) == {"data", "forced_skips"}


def test_new_run_refuses_an_existing_run_directory(digits_run, capsys) -> None:
    path = digits_run.path
    assert main(["train", "--config", str(path / "config.toml"), "--out", str(path)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_resume_refuses_a_different_config_or_data(digits_run, tmp_path, capsys) -> None:
    changed = tmp_path / "changed.toml"
    changed.write_text(digits_run.file("config.toml").read_text().replace("lr = 0.3", "lr = 0.5"))
    assert main(["train", "--config", str(changed), "--resume", str(digits_run.path)]) == 1
    assert "optimizer.lr" in capsys.readouterr().err
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in digits_run.path.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    meta = read_json(copy / "run.json", "test")
    for key, value, message in (
        ("validation_hash", "0" * 64, "the validation data changed"),
        ("model_fingerprint", "f" * 64, "model_fingerprint was"),
        ("inrun_version", "0.0.1", "inrun_version was '0.0.1'"),
    ):
        write_json(copy / "run.json", {**meta, key: value})
        with pytest.raises(RunDirError, match=message):
            run_in_process((copy / "config.toml").read_text(), run_dir=copy, resume=True)
    with pytest.raises(RunDirError, match="not a run directory"):
        run_in_process((copy / "config.toml").read_text(), run_dir=tmp_path / "nothing", resume=True)


def test_resume_of_a_finished_run_changes_nothing(digits_run) -> None:
    before = digits_run.file("values.parquet").read_bytes()
    trace = digits_run.ledger().trace()
    result = run_in_process(digits_run.file("config.toml").read_text(), run_dir=digits_run.path, resume=True)
    assert result.resumed_from == 40
    assert digits_run.file("values.parquet").read_bytes() == before
    after = digits_run.ledger().trace()
    for col in trace:
        np.testing.assert_array_equal(trace[col], after[col])


def _wait_for(predicate, proc, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _step_reached(path: Path) -> int:
    try:
        return int(json.loads((path / "status.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("values.parquet", "metrics.parquet"):
        ta, tb = pq.read_table(a / name).to_pandas(), pq.read_table(b / name).to_pandas()
        assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb), f"{name} differs in shape"
        for col in ta.columns:  # exact equality, NaN == NaN (validation loss is NaN between evals)
            np.testing.assert_array_equal(ta[col].to_numpy(), tb[col].to_numpy(), err_msg=f"{name}:{col}")
    la, lb = ValueLedger.load(a), ValueLedger.load(b)
    assert la.skipped == lb.skipped and la.steps == lb.steps
    tra, trb = la.trace(), lb.trace()
    for col in tra:
        np.testing.assert_array_equal(tra[col], trb[col], err_msg=f"trace:{col}")
    assert RunDir(a).verify() == [] and RunDir(b).verify() == []
    sa = torch.load(RunDir(a).checkpoints()[-1][1] / "state.pt", weights_only=True)
    sb = torch.load(RunDir(b).checkpoints()[-1][1] / "state.pt", weights_only=True)
    for k in sa["objects"]["model"]:
        assert torch.equal(sa["objects"]["model"][k], sb["objects"]["model"][k]), k


@pytest.fixture
def poison(monkeypatch):
    """``poison(bad_id)``: the run's training row ``bad_id`` gets a NaN input after loading. A
    data file cannot hold one (that is a DataError naming the row); this is how a non-finite
    loss reaches the loop, e.g. from a data source of the user's own."""
    import inrun.run.runner

    def apply(bad_id: str) -> None:
        original = inrun.run.runner.load_data

        def load(config):
            train, val = original(config)
            train.inputs[train.ids.index(bad_id), 1] = float("nan")
            return train, val

        monkeypatch.setattr(inrun.run.runner, "load_data", load)

    return apply


def test_nan_step_stops_the_run_with_a_clear_message_and_clean_values(tmp_path, capsys, poison) -> None:
    data, bad_id = tabular_file(tmp_path / "data.jsonl")
    poison(bad_id)
    cfg = tmp_path / "run.toml"
    cfg.write_text(tabular_config(data, tmp_path / "run", "stop"))
    assert main(["train", "--config", str(cfg)]) == 3
    out = " ".join(capsys.readouterr().err.split())
    assert "run stopped:" in out and "non-finite loss" in out and 'values.on_nonfinite = "skip"' in out
    rd = RunDir(tmp_path / "run")
    status = rd.status()
    assert status["state"] == "stopped"
    ledger = rd.ledger()
    assert len(ledger.skipped) == 1 and "non-finite" in ledger.skipped[0]["reason"]
    stopped_at = ledger.skipped[0]["step"]
    values = ledger.values()
    assert np.isfinite(values.value).all()
    assert sum(values.counts) == stopped_at * 8  # only the steps before the bad one
    assert rd.metrics().skipped[-1] is True


def test_nan_steps_are_skipped_and_recorded_when_asked(tmp_path, poison) -> None:
    data, bad_id = tabular_file(tmp_path / "data.jsonl")
    poison(bad_id)
    result = run_in_process(tabular_config(data, tmp_path / "run", "skip"))
    rd = result.run_dir
    ledger = rd.ledger()
    metrics = rd.metrics()
    n_skipped = sum(metrics.skipped)
    assert n_skipped >= 1 and len(ledger.skipped) == n_skipped
    values = ledger.values()
    assert np.isfinite(values.value).all()
    assert values.count(bad_id) == 0  # the corrupt row never got a value
    assert sum(values.counts) == (12 - n_skipped) * 8
    assert math.isfinite(result.final_val_loss)
    state = torch.load(rd.checkpoints()[-1][1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["objects"]["model"].values())


def test_stopped_run_without_values_stops_too(tmp_path, poison) -> None:
    data, bad_id = tabular_file(tmp_path / "data.jsonl")
    poison(bad_id)
    with pytest.raises(RunStopped, match="non-finite loss"):
        run_in_process(tabular_config(data, tmp_path / "run", "stop"), overrides=("values.enabled=false",))


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_gives_identical_values(tmp_path) -> None:
    """Killed twice at random moments; after the first kill two resumes start at once."""
    seed = int(os.environ.get("INRUN_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    steps = 80
    full, killed = tmp_path / "full", tmp_path / "killed"
    data, _ = tabular_file(tmp_path / "data.jsonl", n=400)
    # Order 2 (trapezoid) is the harder case: a step's values are finished at the next step.
    for out in (full, killed):
        (tmp_path / f"{out.name}.toml").write_text(
            tabular_config(data, out, "stop", steps=steps, every=5, order=2, batch_size=16)
        )
    reference = cli("train", "--config", str(tmp_path / "full.toml"))

    kills = []
    proc = cli("train", "--config", str(tmp_path / "killed.toml"))
    for round_ in range(2):
        # Wait until a random step has been checkpointed, then kill at a random moment after it
        # (mid-step, mid-validation or mid-checkpoint write: whatever the process is doing).
        # Targets leave 30+ steps to go, so the run is still going when the kill comes.
        low = 0 if round_ == 0 else _step_reached(killed) + 1
        target = rng.randrange(low, max(low + 1, steps // 2 if round_ == 0 else steps - 30))
        reached = _wait_for(lambda t=target: _step_reached(killed) >= t, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, f"the run ended before it could be killed (seed {seed}): {proc.stdout.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((target, reached, _step_reached(killed)))
        assert _step_reached(killed) < steps, f"killed too late to test a resume (seed {seed})"
        if round_ == 0:
            # Two resumes at once: one gets the run directory's lock, the other is refused at
            # once, naming it, and touches nothing (it used to delete the live one's temp files).
            pair = [cli("train", "--resume", str(killed)) for _ in range(2)]
            deadline = time.monotonic() + 120
            while all(p.poll() is None for p in pair) and time.monotonic() < deadline:
                time.sleep(0.01)
            loser = next(p for p in pair if p.poll() is not None)
            proc = next(p for p in pair if p is not loser)
            refusal = loser.communicate()[0]
            assert loser.returncode == 1, refusal
            assert f"is in use by pid {proc.pid} on " in refusal, refusal
        else:
            proc = cli("train", "--resume", str(killed))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    ref_out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, ref_out
    assert "Resumed from step" in out or kills[-1][2] <= 0
    assert RunDir(killed).status()["state"] == "complete"
    try:
        _assert_same_run(full, killed)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (INRUN_KILL_SEED={seed}, kills at {kills})") from None


