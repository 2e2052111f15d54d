"""The run directory cannot lose values: checksums, fallback to an intact checkpoint, the lock,
every ending written to status.json (stopped, failed, interrupted), files with the umask.

Every storage fault is either refused (an error naming the file, and the fix) or healed (a
resume rewrites what is damaged and ends with exactly the values of an untouched run); none
reads back as different values. ``fault_injection.py`` flips bytes at random to check the same.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import digits_config, run_in_process
from fault_injection import files_of, make_run, same, snapshot, sweep

from inrun import ValueLedger
from inrun.cli import main
from inrun.files import IntegrityError
from inrun.run.runner import RunStopped
from inrun.store.rundir import RunDir, RunDirError, RunInUseError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A finished run: digits MLP, order 2, checkpoints at 15 and 20 kept, report written."""
    return make_run(tmp_path_factory.mktemp("pristine") / "run", steps=STEPS, every=EVERY)


@pytest.fixture(scope="module")
def reference(pristine) -> dict:
    return snapshot(pristine)


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A plain copy of the pristine run (no hard link shared with it) to damage."""
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def resume(path: Path, capsys=None) -> int:
    return main(["train", "--resume", str(path)])


def values_of(path: Path) -> dict:
    """What must be identical after a heal: the top-level values, trace, metrics."""
    snap = snapshot(path)
    return {k: snap[k] for k in ("ids", "value", "count", "trace", "metrics", "skipped", "steps")}


def flip(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


# -- the fault-injection sample -------------------------------------------------------------------
def test_flipped_bytes_are_detected_or_harmless(pristine) -> None:
    """A seeded sample of the full sweep (``python tests/fault_injection.py``): one random byte
    of 12 random files, each in a fresh copy."""
    files = files_of(pristine)
    sample = random.Random(15).sample(files, 12)
    rows = sweep(pristine, sample, flips=1, seed=15)
    outcomes = Counter(o for _, o, _ in rows)
    silent = [r for r in rows if r[1] == "silent"]
    assert not silent, f"read back silently different: {silent}"
    assert outcomes["detected"] >= 10, rows


# -- storage faults: refused or healed ------------------------------------------------------------
def _newest(run: Path) -> Path:
    return RunDir(run).checkpoints()[-1][1]


# (name, damage(run), what `inrun report` says, or None when it still works)
FAULTS = [
    ("values.parquet deleted", lambda r: (r / "values.parquet").unlink(), "values.parquet is missing"),
    ("values.parquet flipped", lambda r: flip(r / "values.parquet"), "values.parquet is damaged"),
    ("trace part deleted", lambda r: next((r / "trace").glob("part-*")).unlink(), "is missing"),
    ("trace part truncated", lambda r: _truncate(sorted((r / "trace").glob("part-*"))[-1]), "is damaged"),
    ("ledger.json truncated", lambda r: _truncate(r / "ledger.json"), "ledger.json is damaged"),
    ("manifest.json deleted", lambda r: (r / "manifest.json").unlink(), "manifest.json is missing"),
    ("metrics.parquet flipped", lambda r: flip(r / "metrics.parquet"), "metrics.parquet is damaged"),
    ("run.json truncated", lambda r: _truncate(r / "run.json"), "run.json is damaged"),
    ("status.json truncated", lambda r: _truncate(r / "status.json"), None),
    ("config.toml deleted", lambda r: (r / "config.toml").unlink(), None),
    ("newest checkpoint's ledger/ deleted", lambda r: shutil.rmtree(_newest(r) / "ledger"), None),
    ("newest state.pt truncated", lambda r: _truncate(_newest(r) / "state.pt"), None),
    ("newest checkpoint's values flipped", lambda r: flip(_newest(r) / "ledger" / "values.parquet"), None),
    ("newest checkpoint's trace part flipped", lambda r: flip(sorted((_newest(r) / "ledger" / "trace").glob("part-*"))[-1]), None),
]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("name", "damage", "refusal"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_storage_fault_is_refused_on_read_and_healed_by_resume(run, reference, capsys, name, damage, refusal) -> None:
    damage(run)
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    if refusal is None:
        assert code == 0, err
    else:
        assert code == 1 and refusal in err and len(err.strip().splitlines()) == 1, err
        assert "--resume" in err or "run.json" in name  # the fix is named
    code = resume(run)
    err = capsys.readouterr().err
    if name == "run.json truncated":  # the metadata that a resume checks: refused, nothing changed
        assert code == 1 and "run.json is damaged" in err
        return
    assert code == 0, err
    assert same(values_of(run), {k: reference[k] for k in values_of(run)}), name
    assert RunDir(run).verify() == [], name  # everything healed


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_which_it_skipped(run, reference, caplog) -> None:
    flip(_newest(run) / "state.pt", offset=len((_newest(run) / "state.pt").read_bytes()) // 2)
    with caplog.at_level("WARNING", logger="inrun.run.runner"):  # `inrun` prints it on stderr
        assert resume(run) == 0
    assert "skipped damaged checkpoint step-000020" in caplog.text and "state.pt is damaged" in caplog.text
    assert (run / "checkpoints" / "damaged-step-000020").is_dir()  # kept aside, for inspection
    assert [s for s, _ in RunDir(run).checkpoints()] == [15, 20]
    assert same(values_of(run), {k: reference[k] for k in values_of(run)})


def test_resume_refuses_when_no_checkpoint_is_intact(run, capsys) -> None:
    for _, path in RunDir(run).checkpoints():
        flip(path / "metrics.parquet")
    before = (run / "values.parquet").read_bytes()
    assert resume(run) == 1
    err = capsys.readouterr().err
    assert "none of its 2 checkpoint(s) is intact" in err and "cannot be restored exactly" in err
    assert (run / "values.parquet").read_bytes() == before  # nothing was touched
    assert [s for s, _ in RunDir(run).checkpoints()] == [15, 20]


def test_ledger_load_refuses_damage_and_missing_files(tmp_path) -> None:
    ledger = ValueLedger(keep_trace=True)
    ledger.add(0, ["a", "b"], np.ones((2, 1)), lr=0.1)
    ledger.save(tmp_path)
    flip(tmp_path / "values.parquet")
    with pytest.raises(IntegrityError, match="values.parquet is damaged"):
        ValueLedger.load(tmp_path)
    ledger.save(tmp_path)
    next((tmp_path / "trace").glob("part-*")).unlink()
    with pytest.raises(IntegrityError, match="is missing"):
        ValueLedger.load(tmp_path)


# -- the lock --------------------------------------------------------------------------------------
# Another process holding the lock as inrun.files.DirLock does (flock, then who it is), without
# importing inrun (torch): a quick start. The kill -9 test has two real `inrun train --resume`.
HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                         "command": "inrun train --resume"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_frees_the_lock(run, reference, capsys) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(files_of(run))
        t0 = time.monotonic()
        assert resume(run) == 1
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 5  # at once: before the data is even loaded
        assert f"is in use by pid {holder.pid} on " in err and "since" in err and err.count("\n") == 2
        assert "hint:" in err
        with pytest.raises(RunInUseError):
            RunDir(run).refuse_if_in_use("replace")
        assert sorted(files_of(run)) == before  # the refused process changed nothing
    finally:
        holder.kill()  # SIGKILL: the kernel releases the flock, no stale lock is left
        holder.wait()
    assert resume(run) == 0
    assert same(values_of(run), {k: reference[k] for k in values_of(run)})


# -- non-finite updates ----------------------------------------------------------------------------
def test_a_blown_up_update_stops_the_run_with_exit_3_and_the_values_before_it(tmp_path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(digits_config(tmp_path / "run", steps=STEPS, every=EVERY).replace("lr = 0.3", "lr = 1e30"))
    assert main(["train", "--config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("run stopped: the update of step 0 made the validation loss non-finite")
    assert len(err.strip().splitlines()) == 1
    rd = RunDir(tmp_path / "run")
    status = rd.status()
    assert status["state"] == "stopped" and status["step"] == 0 and "step 0" in status["message"]
    ledger = rd.ledger()
    assert ledger.skipped == [{"step": 0, "reason": "the update of step 0 made the validation loss non-finite (nan)"}]
    assert sum(ledger.values().counts) == 0 and len(ledger.trace()["step"]) == 0  # its values taken out
    assert rd.verify() == []
    assert resume(tmp_path / "run") == 3  # the same config stops at the same step again
    assert RunDir(tmp_path / "run").status()["state"] == "stopped"


@pytest.mark.parametrize("order", [1, 2])
def test_the_values_of_a_blown_up_step_are_taken_out_exactly(tmp_path, monkeypatch, order) -> None:
    """Parameters found non-finite after step 7's update: the stopped run holds exactly the
    values of a run of 7 steps (bit for bit: the step's sums are restored, not subtracted)."""
    import inrun.run.runner

    monkeypatch.setattr(inrun.run.runner._Runner, "_parameters_finite", lambda self, step: step != 7)
    with pytest.raises(RunStopped, match="the update of step 7 made the parameters non-finite"):
        run_in_process(digits_config(tmp_path / "stopped", steps=STEPS, order=order, every=EVERY))
    monkeypatch.undo()
    run_in_process(digits_config(tmp_path / "short", steps=7, order=order, every=EVERY))
    a, b = RunDir(tmp_path / "stopped").ledger(), RunDir(tmp_path / "short").ledger()
    va, vb = a.values(), b.values()
    assert list(va) == list(vb)
    np.testing.assert_array_equal(va.value, vb.value)
    np.testing.assert_array_equal(va.counts, vb.counts)
    ta, tb = a.trace(), b.trace()
    for col in tb:
        np.testing.assert_array_equal(ta[col], tb[col])
    assert [s["step"] for s in a.skipped] == [7]


def test_skip_drops_a_blown_up_update_and_continues(tmp_path, monkeypatch) -> None:
    import inrun.run.runner

    monkeypatch.setattr(inrun.run.runner._Runner, "_parameters_finite", lambda self, step: step != 7)
    result = run_in_process(digits_config(tmp_path / "run", steps=STEPS, order=2, every=EVERY, on_nonfinite="skip"))
    rd = result.run_dir
    ledger = rd.ledger()
    assert [s["step"] for s in ledger.skipped] == [7] and rd.status()["state"] == "complete"
    assert sum(ledger.values().counts) == (STEPS - 1) * 16
    assert 7 not in set(ledger.trace()["step"].tolist())
    assert rd.metrics().skipped[8] is True  # the row after step 7
    assert rd.verify() == []


def test_skip_with_every_update_blowing_up_skips_them_all(tmp_path) -> None:
    text = digits_config(tmp_path / "run", steps=8, every=4, on_nonfinite="skip").replace("lr = 0.3", "lr = 1e30")
    result = run_in_process(text)
    ledger = result.run_dir.ledger()
    assert [s["step"] for s in ledger.skipped] == list(range(8))
    assert sum(ledger.values().counts) == 0 and result.run_dir.status()["state"] == "complete"


# -- other endings: a full disk, SIGTERM -------------------------------------------------------------
def test_a_full_disk_fails_the_run_in_status_json_and_resume_continues(tmp_path, capsys, monkeypatch) -> None:
    import inrun.store.rundir

    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(digits_config(out, steps=STEPS, every=EVERY))
    real = inrun.store.rundir.RunDir.write_checkpoint

    def full_at_10(self, step, *a, **k):
        if step == 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.file("checkpoints")))
        return real(self, step, *a, **k)

    monkeypatch.setattr(inrun.store.rundir.RunDir, "write_checkpoint", full_at_10)
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "hint: free some disk space" in err and len(err.splitlines()) == 2
    status = RunDir(out).status()
    assert status["state"] == "failed" and status["step"] == 9 and "No space left on device" in status["message"]
    assert RunDir(out).ledger().steps == 10  # the values of the steps done are saved
    monkeypatch.undo()
    assert resume(out) == 0
    run_in_process(digits_config(tmp_path / "ref", steps=STEPS, every=EVERY))
    assert same(values_of(out), values_of(tmp_path / "ref"))


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """Deliver ``signums`` to this process right after the update of ``step``."""
    import inrun.run.runner

    real = inrun.run.runner._Runner._parameters_finite

    def check(self, s):
        if s == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(self, s)

    monkeypatch.setattr(inrun.run.runner._Runner, "_parameters_finite", check)


def test_sigterm_is_handled_like_sigint_values_saved_then_resume(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    (tmp_path / "run.toml").write_text(digits_config(out, steps=STEPS, order=2, every=EVERY))
    _signal_at(monkeypatch, 7, signal.SIGTERM)
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.startswith("interrupted: interrupted by SIGTERM before step 8") and len(err.splitlines()) == 1
    rd = RunDir(out)
    status = rd.status()
    assert status["state"] == "interrupted" and status["step"] == 8 and "--resume" in status["message"]
    assert rd.ledger().steps == 8 and sum(rd.ledger().values().counts) == 8 * 16  # every step done
    assert rd.verify() == []
    monkeypatch.undo()
    assert resume(out) == 0
    run_in_process(digits_config(tmp_path / "ref", steps=STEPS, order=2, every=EVERY))
    assert same(values_of(out), values_of(tmp_path / "ref"))


def test_a_second_signal_stops_at_once(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    (tmp_path / "run.toml").write_text(digits_config(out, steps=STEPS, every=EVERY))
    _signal_at(monkeypatch, 7, signal.SIGINT, signal.SIGINT)
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 128 + signal.SIGINT
    status = RunDir(out).status()
    assert status["state"] == "interrupted" and status["step"] == 7 and "last checkpoint" in status["message"]
    assert RunDir(out).ledger().steps == EVERY  # mid-step: the values stay those of the checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# -- files honour the umask ------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_created_with_the_users_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        run_in_process(digits_config(tmp_path / "run", steps=5, every=5))
    finally:
        os.umask(old)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes == {oct(0o666 & ~umask)}
    dirs = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*") if p.is_dir()}
    assert dirs == {oct(0o777 & ~umask)}


def test_read_only_run_directory_is_a_one_line_error_with_a_hint(run, capsys, monkeypatch) -> None:
    import inrun.analysis.report

    def denied(path, write, fsync=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(inrun.analysis.report, "atomic_write", denied)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'report.html'}: Permission denied") and "--out" in err
    assert len(err.splitlines()) == 2


def test_status_and_manifests_check_themselves(run) -> None:
    RunDir(run).write_status("running", 12, STEPS)  # as a run killed by kill -9 leaves it
    status = RunDir(run).status()
    assert status["state"] == "running" and status["stale"] and "it was killed" in status["message"]
    RunDir(run).write_status("complete", STEPS, STEPS)
    text = (run / "status.json").read_text()
    (run / "status.json").write_text(text.replace('"complete"', '"running"'))
    status = RunDir(run).status()
    assert status["state"] == "unknown" and status["damaged"]
    assert any("status.json" in p for p in RunDir(run).verify())
    data = json.loads((run / "manifest.json").read_text())
    data["step"] += 1  # valid JSON, consistent-looking, but not what was written
    (run / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="manifest.json is damaged"):
        RunDir(run).ledger()
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir(run / "nothing").ledger()
    state = torch.load(_newest(run) / "state.pt", weights_only=True)
    assert state["step"] == STEPS


def test_a_nonfinite_error_raised_after_the_update_blames_the_update(tmp_path, monkeypatch) -> None:
    """The tracker may raise NonFiniteError from optimizer.step() once the parameters are bad:
    the runner checks them itself and takes the step out, as for any blown-up update."""
    import inrun.run.runner
    from inrun.errors import NonFiniteError

    real = inrun.run.runner.build_optimizer

    def build(cfg, model):
        optimizer = real(cfg, model)
        calls = []

        def blow_up(opt, args, kwargs):  # after the update, as a tracker hook would see it
            calls.append(1)
            if len(calls) == 8:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
                raise NonFiniteError("the parameters are not finite")

        optimizer.register_step_post_hook(blow_up)
        return optimizer

    monkeypatch.setattr(inrun.run.runner, "build_optimizer", build)
    with pytest.raises(RunStopped, match="the update of step 7 made the parameters non-finite"):
        run_in_process(digits_config(tmp_path / "run", steps=STEPS, every=EVERY))
    ledger = RunDir(tmp_path / "run").ledger()
    assert ledger.steps == 8 and sum(ledger.values().counts) == 7 * 16


def test_a_refusal_waits_for_the_holder_to_record_who_it_is(tmp_path) -> None:
    """The holder takes the flock, then writes its record: a process refused in between waits for
    the record instead of naming nobody (two resumes started at once raced there)."""
    import fcntl
    import threading

    from inrun.files import DirLock, LockedError

    path = tmp_path / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, nothing recorded yet
    record = json.dumps({"pid": 4242, "host": "elsewhere", "since": time.time(), "command": "inrun train"})
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, record.encode(), 0))
    writer.start()
    try:
        with pytest.raises(LockedError, match="in use by pid 4242 on elsewhere since"):
            DirLock(path, "the run directory").acquire()
    finally:
        writer.join()
        os.close(fd)
