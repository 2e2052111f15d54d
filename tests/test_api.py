"""The tracker's surface: every option in help(), "did you mean", coverage under AdamW, exports
(pandas, Parquet, CSV, a datasets.Dataset column), the labelled per-validation table, repeated
ids refused, the Trainer passing Hugging Face's own error through for a compiled model."""

from __future__ import annotations

import dataclasses
import pydoc

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun import BatchMismatchError, InRunShapley, TrackerConfig


def tiny(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


XV, YV = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))


def per_example_val(m: nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(XV), YV, reduction="none")


def train(tracker: InRunShapley, model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        x, y = torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g)
        with tracker.step([f"e{s * 4 + i}" for i in range(4)]):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_help_lists_every_option() -> None:
    text = pydoc.render_doc(InRunShapley, renderer=pydoc.plaintext)
    init = next(line for line in text.splitlines() if "__init__(self, model" in line)
    for f in dataclasses.fields(TrackerConfig):
        default = repr(f.default)
        assert f"{f.name}: " in init and f"= {default}" in init.split(f"{f.name}: ", 1)[1].split(",")[0], \
            f"{f.name} is not a keyword with its default in InRunShapley's signature"
        assert f"    {f.name}: " in text, f"{f.name} is not documented under Args"
    for extra in ("ledger", "validation_ids"):
        assert f"{extra}: " in init and f"    {extra}: " in text
    model, opt = tiny()
    with pytest.raises(TypeError, match="unknown tracker option 'ordr'; did you mean 'order'"):
        InRunShapley(model, opt, val_loss=per_example_val, ordr=2)


def test_coverage_under_adamw_names_a_route_for_every_trainable_parameter() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    val = torch.randint(0, 40, (2, 8))
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss)
    x = torch.randint(0, 40, (3, 8))
    for _ in range(2):
        with tracker.step([0, 1, 2]):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    coverage = tracker.coverage()
    named = {n for n, p in model.named_parameters() if p.requires_grad}
    covered = [n for names in coverage.routes.values() for n in names]
    assert sorted(covered) == sorted(named)
    assert not any("not reached" in r for r in coverage.routes), coverage.routes
    assert sum(coverage.numel.values()) == sum(p.numel() for p in model.parameters())


def test_exports_pandas_parquet_csv_and_a_dataset_column(tmp_path) -> None:
    import datasets

    model, opt = tiny()
    tracker = InRunShapley(model, opt, val_loss=per_example_val)
    train(tracker, model, opt)
    values = tracker.values()
    frame = values.to_pandas()
    assert list(frame.columns) == ["id", "value", "first_order", "second_order", "count", "source"]
    back = pd.read_parquet(values.to_parquet(tmp_path / "v.parquet"))
    assert back["id"].tolist() == values.ids() and np.array_equal(back["value"].to_numpy(), values.value)
    csv = pd.read_csv(values.to_csv(tmp_path / "v.csv"))
    assert np.array_equal(csv["value"].to_numpy(), values.value), "CSV keeps every bit of the float64 values"
    ds = datasets.Dataset.from_dict({"id": ["e3", "nope", "e0"], "text": ["a", "b", "c"]})
    out = values.to_dataset(ds)
    assert out["inrun_value"][0] == values["e3"] and np.isnan(out["inrun_value"][1]) and out["inrun_count"] == [1, 0, 1]
    assert ds.column_names == ["id", "text"]
    with pytest.raises(KeyError, match="no 'key' column"):
        values.to_dataset(ds, id_column="key")


def test_per_validation_is_a_labelled_table_that_still_unpacks() -> None:
    model, opt = tiny()
    tracker = InRunShapley(model, opt, val_loss=per_example_val, validation_ids=[f"v{k}" for k in range(7)])
    train(tracker, model, opt)
    table = tracker.per_validation()
    ids, matrix = table  # the pair it always was
    assert ids == tracker.values().ids() and matrix.shape == (12, 7)
    frame = table.to_pandas()
    assert list(frame.columns) == [f"v{k}" for k in range(7)] and frame.index.name == "id"
    np.testing.assert_allclose(frame.sum(axis=1).to_numpy(), tracker.values().value, rtol=1e-12)
    assert table.column("v2")["e5"] == frame.loc["e5", "v2"]


def test_repeated_ids_in_a_step_are_refused() -> None:
    model, opt = tiny()
    tracker = InRunShapley(model, opt, val_loss=per_example_val)
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(BatchMismatchError, match="'a' appears twice in this batch"), tracker.step(["a", "b", "a"]):
        pass
    with tracker.step(["a", "b", "c"]):  # a micro-batch, then the same id in the next one
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(BatchMismatchError, match="'c' appears twice in this optimizer step"), tracker.step(["c", "d", "e"]):
        F.cross_entropy(model(x), y).backward()


def test_trainer_values_a_compiled_model_past_the_trainers_own_error(tmp_path) -> None:
    import datasets
    from test_hf import TRAIN, VAL, gpt2, sgd, training_args

    from inrun.integrations.hf import InRunTrainer

    ds = datasets.Dataset.from_dict({"id": list(range(len(TRAIN))), "input_ids": TRAIN.tolist(), "labels": TRAIN.tolist()})

    def trainer(model: nn.Module, **args) -> InRunTrainer:
        args = {"max_steps": 1, "save_strategy": "no", **args}
        return InRunTrainer(model=model, args=training_args(tmp_path, **args),
                            train_dataset=ds, optimizers=sgd(model),
                            inrun_val_loss=lambda m: m(input_ids=VAL, labels=VAL).loss)

    # A compiled model's forward(*args, **kwargs) matches no column: the Trainer's own error, as
    # the plain Trainer raises it (the id column kept for the tracker used to hide it, and the
    # collator then failed with KeyError: 'input_ids').
    with pytest.raises(ValueError, match="No columns in the dataset match the model's forward method signature"):
        trainer(torch.compile(gpt2())).train()
    # Past it, the compiled model is valued: every example of the two steps.
    model = gpt2()
    model.loss_type = "ForCausalLM"  # unset, transformers warns inside forward: a graph break per call
    tr = trainer(torch.compile(model, backend="aot_eager"), remove_unused_columns=False, max_steps=2)
    tr.train()
    assert sorted(tr.inrun_values().keys()) == list(range(8))  # 2 steps of 2 micro-batches of 2


def test_public_names() -> None:
    for name in ("RunWriter", "PerValidation", "StepCost"):
        assert name in inrun.__all__ and hasattr(inrun, name)
