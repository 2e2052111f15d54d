"""inrun curate (kept ids, retraining against a random subset) and inrun inspect (routes, LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import digits_config, gpt2_config, run_in_process

from inrun.analysis.inspect import inspect_target
from inrun.cli import main
from inrun.run.config import load_config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curate") / "run"
    return run_in_process(digits_config(out, steps=40, every=0)).run_dir


def test_curate_negative_writes_kept_and_dropped_ids(digits_run, capsys) -> None:
    assert main(["curate", str(digits_run.path), "--drop", "negative"]) == 0
    out = capsys.readouterr().out
    assert "keeping" in out and "--retrain" in out
    folder = digits_run.path / "curate" / "negative"
    kept = pd.read_parquet(folder / "kept_ids.parquet")
    dropped = pd.read_parquet(folder / "dropped_ids.parquet")
    rand = pd.read_parquet(folder / "random_ids.parquet")
    values = pd.read_parquet(digits_run.file("values.parquet"))
    assert len(kept) + len(dropped) == len(values) and len(dropped) > 0
    assert (dropped["value"] < 0).all() and ((kept["value"] >= 0) | (kept["count"] == 0)).all()
    assert len(rand) == len(kept) and rand["id"].is_unique
    cfg = load_config(folder / "kept.toml")
    assert cfg.data.subset == str((folder / "kept_ids.parquet").resolve())
    assert cfg.training == load_config(digits_run.file("config.toml")).training
    assert cfg.values.enabled is False


def test_curate_bottom_fraction_and_bad_spec(digits_run, capsys) -> None:
    assert main(["curate", str(digits_run.path), "--drop", "bottom:0.25"]) == 0
    folder = digits_run.path / "curate" / "bottom-0.25"
    dropped = pd.read_parquet(folder / "dropped_ids.parquet")
    kept = pd.read_parquet(folder / "kept_ids.parquet")
    assert len(dropped) == round(0.25 * (len(kept) + len(dropped)))
    assert (dropped["count"] > 0).all()  # only valued examples can be dropped
    assert dropped["value"].max() <= kept.loc[kept["count"] > 0, "value"].min()
    capsys.readouterr()
    assert main(["curate", str(digits_run.path), "--drop", "worst"]) == 1
    assert "'--drop'" in capsys.readouterr().err


def test_curate_retrain_compares_kept_with_a_random_subset(digits_run, capsys) -> None:
    assert main(["curate", str(digits_run.path), "--drop", "negative", "--retrain"]) == 0
    out = capsys.readouterr().out
    assert "kept (curated)" in out and "random subset" in out
    result = json.loads((digits_run.path / "curate" / "negative" / "curation.json").read_text())
    curves = result["curves"]
    assert set(curves) == {"original (all data)", "kept (curated)", "random subset"}
    assert curves["kept (curated)"]["examples"] == curves["random subset"]["examples"] == result["kept"]
    for curve in curves.values():
        assert curve["steps"][0] == 0 and curve["steps"][-1] == 40 and np.isfinite(curve["val_loss"]).all()
    assert (digits_run.path / "curate" / "negative" / "val_loss.png").exists()
    assert 'id="plot-curation-negative"' in digits_run.file("report.html").read_text()


def test_inspect_lora_config_values_only_the_adapters(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # module names unwrapped
    cfg = tmp_path / "lora.toml"
    cfg.write_text(gpt2_config(tmp_path / "run", lora=True))
    report = inspect_target(str(cfg))
    assert report.valued_params and all("lora_" in n for n in report.valued_params)
    assert report.frozen_params > report.trainable_params > 0
    assert main(["inspect", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "lora_A" in out and "lora_B" in out and "frozen" in out and "Predicted extra memory" in out


def test_inspect_config_and_model_type(tmp_path, capsys) -> None:
    cfg = tmp_path / "digits.toml"
    cfg.write_text(digits_config(tmp_path / "run"))
    report = inspect_target(str(cfg))
    assert sum(report.numel.values()) == report.trainable_params == report.total_params
    assert "vector:linear" in report.routes or "gram" in report.routes
    assert main(["inspect", "gpt2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 parameters" in out and "vector:hf_conv1d" in out and "validation gradient" in out
    assert main(["inspect", "no-such-model"]) == 1
    assert "MODEL_OR_CONFIG" in capsys.readouterr().err
