"""One product for every loop: a plain PyTorch loop (RunWriter), InRunTrainer and the Lightning
callback each write a run directory on which ``inrun report`` (rendered in Chromium), ``inrun
inspect`` and ``inrun curate`` work; a crashed run resumed gives bit-identical values; the
TensorBoard event files hold the values' metrics."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from browser import assert_renders, chromium
from torch import nn

from inrun import InRunShapley, RunWriter
from inrun.cli import main
from inrun.integrations.metrics import TensorBoardWriter, ValueMonitor
from inrun.store.rundir import RunDir
from inrun.tracking.drop import decompose

ALL_PLOTS = ("drop", "distribution", "sources", "stages", "cumulative", "loss")
N, BATCH, STEPS, EVERY = 96, 16, 12, 4


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data[: N + 24] / 16.0), torch.tensor(d.target[: N + 24])


X, Y = digits()
XV, YV = X[N:], Y[N:]
TABLE = pd.DataFrame({"id": [f"d{i}" for i in range(N)], "source": [f"digit-{int(y)}" for y in Y[:N]],
                      "text": [f"digit {int(y)} (row {i})" for i, y in enumerate(Y[:N])]})


def batch_rows(step: int) -> list[int]:
    """The data order: a function of the step alone, so a resumed loop replays the same batches."""
    perm = np.random.default_rng([7, step // (N // BATCH)]).permutation(N)
    k = step % (N // BATCH)
    return perm[k * BATCH : (k + 1) * BATCH].tolist()


def build() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 10)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)


def library_loop(path: Path, crash_after: int | None = None, tb: Path | None = None) -> dict[str, Any]:
    """The loop of docs/guide-pytorch.md: checkpoints every EVERY steps; a "crash" abandons the
    process's state after ``crash_after`` steps (nothing saved since the last checkpoint)."""
    model, opt, sched = build()
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(XV), YV), keep_trace=True)
    monitor = ValueMonitor(tracker, [TensorBoardWriter(tb)], every=2) if tb is not None else None
    run = RunWriter(path, tracker, examples=TABLE, resume="auto",
                    state={"model": model, "optimizer": opt, "scheduler": sched})
    for step in range(run.start_step, STEPS):
        rows = batch_rows(step)
        with tracker.step([f"d{r}" for r in rows]):
            loss = F.cross_entropy(model(X[rows]), Y[rows])
            loss.backward()
        opt.step()
        opt.zero_grad()
        run.log(loss.item())
        sched.step()
        if (step + 1) % EVERY == 0:
            run.checkpoint()
        if crash_after is not None and step + 1 == crash_after:
            run.close()
            tracker.close()
            return {"resumed": run.resumed}
    run.finish()
    if monitor is not None:
        monitor.close()
    tracker.close()
    return {"values": tracker.values(), "trace": tracker.ledger.trace(), "params": [p.detach().clone() for p in model.parameters()],
            "resumed": run.resumed, "start": run.start_step}


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    va, vb = a["values"], b["values"]
    assert va.ids() == vb.ids()
    assert np.array_equal(va.value, vb.value) and np.array_equal(va.counts, vb.counts)
    for c in ("step", "first_order", "second_order", "lr"):
        assert np.array_equal(a["trace"][c], b["trace"][c]), c
    assert list(a["trace"]["id"]) == list(b["trace"]["id"])
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)


def check_run_dir(path: Path, tmp_path: Path, capsys: Any, plots: tuple[str, ...], ids: list) -> None:
    """``inrun report`` (and Chromium), ``inspect`` and ``curate`` on a run directory of any loop."""
    assert main(["report", str(path)]) == 0
    page = (path / "report.html").read_text()
    values = RunDir(path).ledger().values()
    top = values.top(1)[0][0]
    assert f"<td class='num id'>{top}</td>" in page, "the report shows the example ids"
    # every loop records each step's drop: its decomposition adds up to the run's measured drop
    rows = RunDir(path).drops()
    d = decompose(rows)
    assert len(rows) == RunDir(path).ledger().steps and d.measured == pytest.approx(
        d.data_free + d.utility + d.untracked, rel=1e-9, abs=1e-12)
    assert 'class="headline"' in page and "What the values explain" in page
    browser = chromium()
    if browser is not None:
        assert_renders(browser, path / "report.html", tmp_path, plots)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Routes" in out and "not reached" not in out and "Drop: Validation loss" in out
    assert main(["curate", str(path), "--drop", "negative"]) == 0
    out = capsys.readouterr().out
    dropped = pd.read_parquet(path / "curate" / "negative" / "dropped_ids.parquet")
    kept = pd.read_parquet(path / "curate" / "negative" / "kept_ids.parquet")
    assert len(dropped) + len(kept) == len(values) and (dropped["value"] < 0).all() and len(dropped) > 0
    assert set(kept["id"]) | set(dropped["id"]) >= set(ids)
    assert main(["curate", str(path), "--drop", "negative", "--retrain"]) == 1
    assert "cannot train it again" in capsys.readouterr().err
    assert RunDir(path).verify() == []


# -- the library ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("library")
    whole = library_loop(root / "whole", tb=root / "tb")
    assert library_loop(root / "crashed", crash_after=10)["resumed"] is False
    assert RunDir(root / "crashed").status()["stale"]  # killed: nobody holds the lock
    resumed = library_loop(root / "crashed")
    return {"root": root, "whole": whole, "resumed": resumed}


def test_library_loop_resumed_after_a_crash_gives_identical_values(library_runs: dict[str, Any]) -> None:
    resumed = library_runs["resumed"]
    assert resumed["resumed"] and resumed["start"] == 8  # the newest checkpoint before the crash
    assert_identical(library_runs["whole"], resumed)
    saved = RunDir(library_runs["root"] / "crashed").ledger().values()
    assert np.array_equal(saved.value, library_runs["whole"]["values"].value)
    assert RunDir(library_runs["root"] / "crashed").status()["state"] == "complete"


def test_library_run_directory_works_with_report_inspect_curate(library_runs, tmp_path, capsys) -> None:
    path = library_runs["root"] / "whole"
    meta = RunDir(path).meta()
    assert meta["kind"] == "library" and meta["n_train"] == N
    metrics = RunDir(path).metrics()
    assert metrics.step[0] == 0 and metrics.step[-1] == STEPS and np.isfinite(metrics.val_loss[-1])
    assert np.isfinite(metrics.train_loss[1:]).all()
    check_run_dir(path, tmp_path, capsys, ALL_PLOTS, TABLE["id"].tolist())


def test_library_tensorboard_event_file_holds_the_metrics(library_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(library_runs["root"] / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"inrun/negative_share", "inrun/value_p50", "inrun/examples_valued", "inrun/source/digit-3/total"} <= set(tags["scalars"])
    assert "inrun/values" in tags["histograms"]
    steps = [e.step for e in events.Scalars("inrun/negative_share")]
    assert steps == list(range(2, STEPS + 1, 2))
    last = library_runs["whole"]["values"]
    assert events.Scalars("inrun/examples_valued")[-1].value == float((last.counts > 0).sum())


# -- the Hugging Face Trainer ------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _trainer(out: Path, **args: Any) -> Any:
    from test_hf import N_TRAIN, make_trainer
    from transformers import TrainerCallback

    from inrun.integrations.hf import InRunArguments

    class CrashAt(TrainerCallback):
        def __init__(self, step: int | None) -> None:
            self.step = step

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.step is not None and state.global_step == self.step:
                raise _Crash

    crash = args.pop("crash_at", None)
    trainer = make_trainer(out, [f"ex{i}" for i in range(N_TRAIN)],
                           inrun_args=InRunArguments(val_batch_size=2, tracker_options={"keep_trace": True}),
                           args={"report_to": "tensorboard", "logging_strategy": "steps", "logging_steps": 1, **args})
    trainer.add_callback(CrashAt(crash))
    return trainer


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trainer")
    whole = _trainer(root / "whole")
    whole.train()
    crashed = _trainer(root / "crashed", crash_at=2)
    with pytest.raises(_Crash):
        crashed.train()
    assert RunDir(root / "crashed" / "inrun").status()["state"] == "failed"
    resumed = _trainer(root / "crashed")
    resumed.train(resume_from_checkpoint=str(root / "crashed" / "checkpoint-2"))
    return {"root": root, "whole": whole, "resumed": resumed}


def test_trainer_resumed_after_a_crash_gives_identical_values(trainer_runs) -> None:
    a, b = trainer_runs["whole"].inrun_values(), trainer_runs["resumed"].inrun_values()
    assert a.ids() == b.ids() and np.array_equal(a.value, b.value) and np.array_equal(a.counts, b.counts)
    saved = RunDir(trainer_runs["root"] / "crashed" / "inrun")
    assert np.array_equal(saved.ledger().values().value, a.value)
    trace_a = RunDir(trainer_runs["root"] / "whole" / "inrun").ledger().trace()
    trace_b = saved.ledger().trace()
    assert np.array_equal(trace_a["first_order"], trace_b["first_order"]) and list(trace_a["id"]) == list(trace_b["id"])
    assert saved.status()["state"] == "complete" and saved.verify() == []


def test_trainer_run_directory_works_with_report_inspect_curate(trainer_runs, tmp_path, capsys) -> None:
    path = trainer_runs["root"] / "whole" / "inrun"
    rd = RunDir(path)
    assert rd.meta()["kind"] == "trainer"
    assert rd.examples()["preview"].str.startswith("row ").all()  # the dataset's text column
    check_run_dir(path, tmp_path, capsys, ALL_PLOTS, [f"ex{i}" for i in range(12)])


def test_trainer_logs_the_metrics_to_tensorboard(trainer_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(trainer_runs["root"] / "whole" / "runs" / "**" / "events.*"), recursive=True)
    assert files
    tags = set(EventAccumulator(str(Path(files[0]).parent)).Reload().Tags()["scalars"])
    assert {"train/inrun/negative_share", "train/inrun/value_p50", "train/inrun/validation_cost_ratio"} <= tags


# -- Lightning --------------------------------------------------------------------------------------
def lightning_fit(root: Path, epochs: int, ckpt: str | None = None) -> Any:
    import lightning.pytorch as pl

    from inrun.integrations.lightning import InRunCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"id": f"d{i}", "x": X[i], "y": Y[i]}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: dict, i: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

    callback = InRunCallback(val_loss=lambda m: F.cross_entropy(m(XV), YV), examples=TABLE, keep_trace=True, log_every=1)
    trainer = pl.Trainer(default_root_dir=str(root), callbacks=[callback], max_epochs=epochs, accumulate_grad_batches=2,
                         gradient_clip_val=0.5, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, deterministic=True)
    trainer.fit(Module(), torch.utils.data.DataLoader(Rows(), batch_size=8, shuffle=False), ckpt_path=ckpt)
    return callback


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    root = tmp_path_factory.mktemp("lightning")
    whole = lightning_fit(root / "whole", 2)
    lightning_fit(root / "resumed", 1)
    ckpt = glob.glob(str(root / "resumed" / "lightning_logs" / "*" / "checkpoints" / "*.ckpt"))
    assert len(ckpt) == 1
    resumed = lightning_fit(root / "resumed", 2, ckpt=ckpt[0])
    return {"root": root, "whole": whole, "resumed": resumed}


def test_lightning_equals_the_plain_loop_and_resumes_identically(lightning_runs) -> None:
    a, b = lightning_runs["whole"].values(), lightning_runs["resumed"].values()
    assert a.ids() == b.ids() and np.array_equal(a.value, b.value) and np.array_equal(a.counts, b.counts)
    # the same training in a plain loop: accumulation over 2 batches (each loss / 2), clipping
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    tracker = InRunShapley(net, opt, val_loss=lambda m: F.cross_entropy(m(XV), YV))
    for _ in range(2):
        for start in range(0, N, 16):
            for micro in (start, start + 8):
                rows = list(range(micro, micro + 8))
                with tracker.step([f"d{r}" for r in rows]):
                    (F.cross_entropy(net(X[rows]), Y[rows]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    plain = tracker.values()
    assert plain.ids() == a.ids() and np.allclose(plain.value, a.value, rtol=1e-12, atol=1e-15 * np.abs(a.value).max())
    assert set(a.counts) == {2}


def test_lightning_run_directory_works_with_report_inspect_curate(lightning_runs, tmp_path, capsys) -> None:
    path = lightning_runs["root"] / "whole" / "inrun"
    assert RunDir(path).meta()["kind"] == "lightning"
    resumed = RunDir(lightning_runs["root"] / "resumed" / "inrun")
    assert [s for s, _ in resumed.checkpoints()] == [6, 12]
    assert np.array_equal(resumed.ledger().values().value, RunDir(path).ledger().values().value)
    check_run_dir(path, tmp_path, capsys, ALL_PLOTS, TABLE["id"].tolist())


def test_lightning_tensorboard_event_file_holds_the_metrics(lightning_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = glob.glob(str(lightning_runs["root"] / "whole" / "lightning_logs" / "version_0"))[0]
    events = EventAccumulator(folder, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert {"inrun/negative_share", "inrun/value_p90", "inrun/validation_cost_ratio"} <= set(events.Tags()["scalars"])
    assert "inrun/values" in events.Tags()["histograms"]
    assert [e.step for e in events.Scalars("inrun/negative_share")] == list(range(1, 13))


def test_run_directories_are_refused_by_train_resume(library_runs, capsys) -> None:
    assert main(["train", "--resume", str(library_runs["root"] / "whole")]) == 1
    assert "only that loop can continue it" in capsys.readouterr().err
    shutil.rmtree(library_runs["root"] / "whole" / "curate", ignore_errors=True)


def test_lightning_on_several_processes_is_refused_with_what_to_do_instead() -> None:
    """Lightning's DDP calls the module's training_step as its forward and each rank would value
    only its own examples: refused at the start, naming the alternatives (it used to fail at the
    first step, telling the user to return per-example outputs from their forward)."""
    from types import SimpleNamespace

    from inrun import InRunError
    from inrun.integrations.lightning import InRunCallback

    model, opt, _ = build()
    callback = InRunCallback(val_loss=lambda m: F.cross_entropy(m(XV), YV))
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(), optimizers=[opt], global_step=0)
    with pytest.raises(InRunError, match="InRunCallback values a run of one process; this Trainer runs 2.*InRunTrainer"):
        callback.on_train_start(trainer, model)
    assert callback.tracker is None
