"""`inrun baselines`: final-checkpoint loss, gradient cosine and KNN-Shapley of every training
example, checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import digits_config, gpt2_config, run_in_process

from inrun.analysis.baseline_run import compute_baselines, read_baselines
from inrun.analysis.baselines import knn_shapley
from inrun.cli import main
from inrun.errors import InRunError
from inrun.run.config import saved_config
from inrun.run.data import load_data
from inrun.run.models import build_model
from inrun.store.rundir import RunDir


def test_baselines_of_a_digits_run_equal_direct_computations(tmp_path) -> None:
    result = run_in_process(digits_config(tmp_path / "run", steps=12, every=6))
    assert main(["baselines", str(result.run_dir.path)]) == 0
    frame = read_baselines(RunDir(result.run_dir.path))
    rd = RunDir(result.run_dir.path)
    config, _ = saved_config(rd)
    train_set, val_set = load_data(config)
    model = build_model(config.model, train_set)
    model.load_state_dict(rd.restore(torch.device("cpu"), values=False).state["objects"]["model"])
    model.eval()
    x, y = train_set.inputs.float(), train_set.targets
    i = 7  # one example, directly
    with torch.no_grad():
        assert frame.loc[train_set.ids[i], "final_loss"] == pytest.approx(float(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])), rel=1e-6)
    params = [p for p in model.parameters()]
    g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
    v = torch.autograd.grad(F.cross_entropy(model(val_set.inputs.float()), val_set.targets), params)
    cos = sum(float((a * b).sum()) for a, b in zip(g, v)) / math.sqrt(sum(float((a**2).sum()) for a in g) * sum(float((b**2).sum()) for b in v))
    assert frame.loc[train_set.ids[i], "grad_cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    knn = knn_shapley(x.double().numpy(), y.numpy(), val_set.inputs.double().numpy(), val_set.targets.numpy(), k=5)
    np.testing.assert_allclose(frame.loc[train_set.ids, "knn_shapley"].to_numpy(), knn, rtol=1e-12)
    assert len(frame) == len(train_set) and frame["grad_cosine"].between(-1, 1).all()


def test_baselines_of_text_have_no_knn_column(tmp_path) -> None:
    result = run_in_process(gpt2_config(tmp_path / "run", steps=4))
    compute_baselines(result.run_dir.path)
    frame = read_baselines(RunDir(result.run_dir.path))
    assert list(frame.columns) == ["final_loss", "grad_cosine"] and frame.notna().all().all()


def test_baselines_need_a_run_that_can_be_rebuilt(tmp_path) -> None:
    with pytest.raises(InRunError):
        compute_baselines(tmp_path / "nothing")


def test_the_report_shows_the_baselines(tmp_path) -> None:
    from inrun.analysis.report import build_report

    result = run_in_process(digits_config(tmp_path / "run", steps=12, every=6))
    before = build_report(result.run_dir.path).read_text()
    assert "inrun baselines RUN_DIR" in before and 'id="baselines"' not in before
    compute_baselines(result.run_dir.path)
    after = build_report(result.run_dir.path).read_text()
    assert 'id="baselines"' in after and "Spearman with the In-Run value" in after and "KNN-Shapley" in after
