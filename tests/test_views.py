"""Views of the ledger (step-normalized, a window of steps, per source over stages) against sums
written out by hand from the per-step trace, and the audit and views in a run directory: the
report's fidelity panel, ``inrun inspect RUN_DIR``, the line a run ends with, and a resume."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import digits_config, run_in_process
from torch import nn

from inrun import InRunShapley, LedgerError
from inrun.analysis import views
from inrun.cli import main
from inrun.run.config import parse_config
from inrun.run.runner import RunInterrupted, train
from inrun.store.auditlog import load_audit
from inrun.store.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tracked():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(X[1500:1560]), y[1500:1560]), keep_trace=True)
    tracker.ledger.set_sources({i: f"class-{int(y[i]) % 3}" for i in range(200)})
    rng = np.random.default_rng(0)
    for _ in range(30):
        rows = rng.choice(200, size=8, replace=False).tolist()
        with tracker.step(rows):
            F.cross_entropy(model(X[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()
    return tracker


def by_hand(tracker):
    tr = tracker.ledger.trace()
    value = tr["first_order"] + tr["second_order"]
    return tr["step"], list(tr["id"]), value


def test_step_normalized_view_by_hand(tracked) -> None:
    steps, ids, value = by_hand(tracked)
    want: dict = {}
    for t in set(steps.tolist()):
        m = steps == t
        total = abs(value[m].sum())
        for i, v in zip(np.array(ids, dtype=object)[m], value[m]):
            want[i] = want.get(i, 0.0) + v / total
    got = views.step_normalized(tracked)
    assert set(got["id"]) == set(want)
    for i, v in zip(got["id"], got["normalized"]):
        assert math.isclose(v, want[i], rel_tol=1e-12, abs_tol=1e-15)
    assert list(got["normalized"]) == sorted(got["normalized"], reverse=True)
    plain = tracked.values()
    for i, v in zip(got["id"], got["value"]):
        assert math.isclose(v, plain[i], rel_tol=1e-12, abs_tol=1e-18)  # the plain value rides along, unchanged


def test_window_and_stage_views_add_up_to_the_value(tracked) -> None:
    steps, ids, value = by_hand(tracked)
    w = views.window_values(tracked, 10, 20)
    want: dict = {}
    for t, i, v in zip(steps, ids, value):
        if 10 <= t < 20:
            want[i] = want.get(i, 0.0) + v
    assert dict(zip(w["id"], w["value"])) == pytest.approx(want, rel=1e-12)
    whole = views.window_values(tracked, 0)
    plain = tracked.values()
    assert all(math.isclose(v, plain[i], rel_tol=1e-12, abs_tol=1e-18) for i, v in zip(whole["id"], whole["value"]))
    stages = views.source_stages(tracked, stages=3)
    assert list(stages.columns) == ["0–9", "10–19", "20–29"]
    per_source = plain.to_pandas().groupby("source")["value"].sum()
    np.testing.assert_allclose(stages.sum(axis=1).to_numpy(), per_source.loc[stages.index].to_numpy(), rtol=1e-12)
    share = views.source_stages(tracked, stages=3, share=True)
    np.testing.assert_allclose(share.fillna(0).sum(axis=0).to_numpy(), 1.0)
    with pytest.raises(ValueError, match="empty"):
        views.window_values(tracked, 5, 5)


def test_views_need_the_trace() -> None:
    model = nn.Linear(3, 2)
    tracker = InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), val_loss=lambda m: m(torch.ones(1, 3)).sum())
    with pytest.raises(LedgerError, match="keep_trace=True"):
        views.step_normalized(tracker)
    with pytest.raises(LedgerError, match="without an audit"):
        views.audit_frames(tracker)


# ----------------------------------------------------------------------------- run directories
AUDITED = ("audit.every=10", "audit.players=4", "audit.budget=1.0")


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    return run_in_process(digits_config(out, steps=40, every=10), overrides=AUDITED).run_dir


def test_run_directory_holds_the_audit(audited_run) -> None:
    log = load_audit(audited_run.path)
    assert [r["step"] for r in log.steps] == [10, 20, 30] and all(r["status"] == "ok" for r in log.steps)
    assert len(log.values) == 12 and log.config.players == 4 and log.config.seed == 3  # the run's seed
    summary = json.loads(audited_run.file("summary.json").read_text())
    assert summary["audit"]["audited_steps"] == 3
    assert summary["audit"]["median_pearson"] == pytest.approx(log.summary()["median_pearson"])
    steps, values = views.audit_frames(audited_run.path)
    assert list(steps["step"]) == [10, 20, 30] and set(values["step"]) == {10, 20, 30}
    # SGD, order 1: the tracker's side is the ledger's value of the example at that step
    trace = views.trace_frame(audited_run.path)
    for _, v in values.iterrows():
        row = trace[(trace["step"] == v["step"]) & (trace["id"] == v["id"])]
        assert math.isclose(float(row["value"].iloc[0]), v["tracker"], rel_tol=1e-4, abs_tol=1e-9)


def test_report_shows_the_fidelity_panel_and_the_views(audited_run) -> None:
    assert main(["report", str(audited_run.path), "--window", "20:40"]) == 0
    page = audited_run.file("report.html").read_text()
    assert re.search(r'id="plot-fidelity"[^>]*src="data:image/png;base64,', page)
    assert "Fidelity: the run&#x27;s audit" in page and "median Pearson" in page
    assert 'id="plot-drop"' in page and 'class="headline"' in page  # the drop, decomposed
    assert "Views of the values (not the value)" in page and "step-normalized view" in page
    assert "Values over steps 20–39 only" in page


def test_report_of_an_unaudited_run_says_so(tmp_path) -> None:
    rd = run_in_process(digits_config(tmp_path / "run", steps=12, every=0), overrides=("audit.enabled=false",)).run_dir
    assert main(["report", str(rd.path)]) == 0
    page = rd.file("report.html").read_text()
    assert "This run was not audited" in page and 'id="plot-fidelity"' not in page


def test_inspect_a_run_directory(audited_run, capsys) -> None:
    assert main(["inspect", str(audited_run.path), "--window", "30:", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Audit: 3 step(s) checked against exact Shapley values (sub-games of 4 of 16 examples" in out
    assert "Drop: Validation loss" in out and "The drop by stage" in out  # the decomposition, one line and by stage
    assert "of the run's time" in out  # the audit's cost as a share of the run (status.json's seconds)
    assert "Audited steps" in out and "Step-normalized view" in out and "Value per source and stage" in out
    assert "Values over steps 30-end only" in out
    assert main(["inspect", str(audited_run.path), "--window", "9:3"]) == 1
    assert "START:STOP" in capsys.readouterr().err


def test_the_audit_of_a_run_resumes_where_it_stopped(tmp_path) -> None:
    """Interrupted after step 25 (checkpoint at 20) and resumed: the audit's rows are those of the
    uninterrupted run (timings aside)."""
    whole = run_in_process(digits_config(tmp_path / "whole", steps=40, every=10), overrides=AUDITED).run_dir
    config = parse_config(digits_config(tmp_path / "cut", steps=40, every=10), overrides=AUDITED)

    def stop_after_25(step, total, loss, rate):
        if step == 25:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    try:
        with pytest.raises(RunInterrupted):
            train(config, progress=stop_after_25)
        # the checkpoint after 20 steps (0-19) holds the audit of step 10; step 20 is audited again on resume
        assert [r["step"] for r in load_audit(tmp_path / "cut").steps] == [10]
        train(config, resume=True)
    finally:
        torch.set_num_threads(threads)

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]

    a, b = load_audit(whole.path), load_audit(RunDir(tmp_path / "cut").path)
    assert strip(a.steps) == strip(b.steps) and a.values == b.values
    # each step's drop row too: the resumed run starts from the L(θ_t) its checkpoint saved
    rows_whole, rows_cut = whole.drops(), RunDir(tmp_path / "cut").drops()
    assert [r["step"] for r in rows_cut] == list(range(40))
    assert json.dumps(rows_cut) == json.dumps(rows_whole)  # NaN-safe, bit for bit


def test_a_runs_drop_adds_up_to_the_validation_loss_it_measured(audited_run) -> None:
    """The CLI run's drop rows, decomposed, against the validation loss the run itself logged at
    its start and end (metrics.parquet): plain SGD, so no data-free part; the steps' games sum to
    the drop, and the values to the games less the Taylor remainder."""
    from inrun.tracking.drop import decompose

    rows = audited_run.drops()
    metrics = audited_run.metrics()
    logged = [v for v in metrics.val_loss if math.isfinite(v)]
    d = decompose(rows)
    assert d.steps == 40 and d.data_free == 0.0 and d.untracked == 0.0
    assert d.loss_first == pytest.approx(logged[0], rel=1e-6) and d.loss_last == pytest.approx(logged[-1], rel=1e-6)
    assert d.utility == pytest.approx(d.measured, rel=1e-9)
    assert d.values + d.remainder == pytest.approx(d.utility_valued, rel=1e-9)
    trace = views.trace_frame(audited_run.path)
    assert d.values == pytest.approx(float(trace["value"].sum()), rel=1e-6)  # every step counted (SGD: none left out)
