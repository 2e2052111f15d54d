"""``InRunTrainer``: ``Trainer.train()`` gives the same values as the plain-loop tracker.

Same tiny GPT-2, same SGD and LambdaLR schedule, the same batches in the same order (sequential
sampler), gradient accumulation over 2 micro-batches and ``max_grad_norm`` clipping that bites.
The plain loop reproduces what the Trainer back-propagates: the model's loss normalized by the
``num_items_in_batch`` the Trainer computed for the step (recorded by a spy subclass: in
transformers 5.24 it counts GPT-2's unshifted labels, 32 tokens where the loss sums 28).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from inrun import BatchMismatchError, InRunShapley, ValueLedger
from inrun.integrations.hf import InRunArguments, InRunTrainer

VOCAB, SEQ = 40, 8
N_TRAIN, BATCH, ACCUM, CLIP, LR = 12, 2, 2, 0.3, 0.5


class Rows(torch.utils.data.Dataset):
    """A plain map-style dataset of feature dicts with an id and two columns the model does not take."""

    def __init__(self, tokens: torch.Tensor, ids: list[Any], with_id: bool = True) -> None:
        self.tokens, self.ids, self.with_id = tokens, ids, with_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {"input_ids": self.tokens[i].tolist(), "labels": self.tokens[i].tolist(), "text": f"row {i}", "n_chars": 7}
        if self.with_id:
            row["id"] = self.ids[i]
        return row


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


TRAIN, VAL = tokens(N_TRAIN, 3), tokens(3, 99)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double()


def schedule(step: int) -> float:
    return 1.0 / (1 + step)


def sgd(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def training_args(out: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        num_train_epochs=1, max_grad_norm=CLIP, train_sampling_strategy="sequential",
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to="none",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class SpyTrainer(InRunTrainer):
    """Records the loss normalization the Trainer passes to each micro-batch."""

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        self.num_items.append(None if num_items_in_batch is None else int(num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def make_trainer(out: Path, ids: list[Any], model: nn.Module | None = None, **kwargs: Any) -> SpyTrainer:
    model = model if model is not None else gpt2()
    inrun_args = kwargs.pop("inrun_args", InRunArguments(val_batch_size=2))
    SpyTrainer.num_items = []
    return SpyTrainer(
        model=model, args=training_args(out, **kwargs.pop("args", {})), train_dataset=Rows(TRAIN, ids),
        optimizers=sgd(model), inrun_val_dataset=Rows(VAL, ["v0", "v1", "v2"]), inrun_args=inrun_args,
        **kwargs,
    )


def plain_loop(
    model: nn.Module, ids: list[Any], num_items: list[int], make_opt: Any = sgd, steps: int = N_TRAIN // (BATCH * ACCUM)
) -> tuple[dict, dict, list[float]]:
    """The same training with the tracker in an ordinary loop: final values, after-step-2 values."""
    opt, sched = make_opt(model)
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=VAL, labels=VAL).loss)
    norms, at_step_2 = [], {}
    per_step = BATCH * ACCUM
    for t in range(steps):
        rows = range(t * per_step, (t + 1) * per_step)
        for micro in range(ACCUM):
            idx = list(rows)[micro * BATCH : (micro + 1) * BATCH]
            x = TRAIN[idx]
            n_items = num_items[t * ACCUM + micro]
            with tracker.step([ids[i] for i in idx]):
                model(input_ids=x, labels=x, num_items_in_batch=n_items).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        sched.step()
        opt.zero_grad()
        if t == 1:
            at_step_2 = dict(tracker.values())
    values = dict(tracker.values())
    tracker.close()
    return values, at_step_2, norms


def assert_same(got: dict, expected: dict, what: str) -> float:
    assert set(got) == set(expected), f"{what}: ids differ"
    keys = sorted(expected, key=str)
    a, b = np.array([got[k] for k in keys]), np.array([expected[k] for k in keys])
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * scale, err_msg=what)
    return float(np.abs(a - b).max() / scale)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hf")
    ids = [f"ex{i}" for i in range(N_TRAIN)]
    trainer = make_trainer(out, ids)
    trainer.train()
    ref_model = gpt2()
    assert len(trainer.num_items) == N_TRAIN // BATCH and None not in trainer.num_items
    values, at_step_2, norms = plain_loop(ref_model, ids, trainer.num_items)
    return {"out": out, "ids": ids, "trainer": trainer, "values": values, "at_step_2": at_step_2,
            "norms": norms, "ref_model": ref_model}


def test_trainer_equals_plain_loop(trained: dict[str, Any]) -> None:
    trainer = trained["trainer"]
    assert max(trained["norms"]) > CLIP, "clipping never happened"
    for (name, a), b in zip(trainer.model.named_parameters(), trained["ref_model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name}: training differs")
    values = trainer.inrun_values()
    err = assert_same(dict(values), trained["values"], "Trainer vs plain loop")
    assert set(values.counts) == {1}
    print(f"Trainer vs plain loop: max |Δ| / max |value| = {err:.2e}")


def test_trainer_writes_the_ledger(trained: dict[str, Any]) -> None:
    out = trained["out"]
    final = ValueLedger.load(out / "inrun").values()
    assert_same(dict(final), trained["values"], "saved at the end")
    checkpoint = ValueLedger.load(out / "checkpoint-2" / "inrun").values()
    assert_same(dict(checkpoint), trained["at_step_2"], "saved at checkpoint-2")
    state = json.loads((out / "inrun" / "tracker.json").read_text())
    assert state["step_count"] == 3 and state["world_size"] == 1
    covered = [n for names in state["coverage"]["routes"].values() for n in names]
    assert "transformer.wte.weight" in covered


def test_trainer_resumes_from_checkpoint(trained: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained["out"] / "checkpoint-2", out / "checkpoint-2")
    trainer = make_trainer(out, trained["ids"])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert_same(dict(trainer.inrun_values()), trained["values"], "resumed run")


def test_trainer_evaluates_with_the_id_column(trained: dict[str, Any]) -> None:
    metrics = trained["trainer"].evaluate(eval_dataset=Rows(VAL, [0, 1, 2]))
    assert np.isfinite(metrics["eval_loss"])


def test_trainer_needs_the_id_column(tmp_path: Path) -> None:
    model = gpt2()
    trainer = InRunTrainer(
        model=model, args=training_args(tmp_path, max_steps=1), train_dataset=Rows(TRAIN, list(range(N_TRAIN)), with_id=False),
        optimizers=sgd(model), inrun_val_loss=lambda m: m(input_ids=VAL, labels=VAL).loss,
    )
    with pytest.raises(BatchMismatchError, match="'id' column"):
        trainer.train()


def test_inrun_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="tracker_options"):
        InRunArguments(tracker_options={"nope": 1})
    with pytest.raises(ValueError, match="order"):
        InRunArguments(order=3)
    with pytest.raises(ValueError, match="exactly one"):
        InRunTrainer(model=gpt2(), args=None)


def test_trainer_int_ids_through_the_accelerated_optimizer(tmp_path: Path) -> None:
    """Int ids come back as ints; the AcceleratedOptimizer wrapper is unwrapped (hooks fire)."""
    trainer = make_trainer(tmp_path, list(range(100, 100 + N_TRAIN)), args={"max_steps": 1, "save_strategy": "no"})
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    values = trainer.inrun_values()
    assert sorted(values) == list(range(100, 104))
    assert trainer.inrun_tracker.step_count == 1


def test_trainer_default_adamw_equals_plain_loop(tmp_path: Path) -> None:
    """The Trainer's own AdamW (decay / no-decay groups, linear schedule), valued by the Adam-aware
    rule, gives the values of the plain loop with the same optimizer groups and schedule."""
    from transformers import get_linear_schedule_with_warmup

    ids = list(range(N_TRAIN))
    SpyTrainer.num_items = []
    trainer = SpyTrainer(
        model=gpt2(), args=training_args(tmp_path, max_steps=2, save_strategy="no", learning_rate=3e-3, weight_decay=0.1),
        train_dataset=Rows(TRAIN, ids), inrun_val_loss=lambda m: m(input_ids=VAL, labels=VAL).loss,
    )
    trainer.train()
    assert type(trainer.inrun_tracker.rule).__name__ == "AdamRule"
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [
        ({k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} | {"lr": g["initial_lr"]},
         [name_of[id(p)] for p in g["params"]])
        for g in trainer.inrun_tracker.optimizer.param_groups
    ]
    assert {g["weight_decay"] for g, _ in groups} == {0.0, 0.1}, "the Trainer's decay / no-decay groups"

    def adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        named = dict(model.named_parameters())
        opt = torch.optim.AdamW([{**h, "params": [named[n] for n in names]} for h, names in groups])
        return opt, get_linear_schedule_with_warmup(opt, 0, 2)

    ref_model = gpt2()
    values, _, norms = plain_loop(ref_model, ids, trainer.num_items, make_opt=adamw, steps=2)
    assert max(norms) > CLIP, "clipping never happened"
    for (name, a), b in zip(trainer.model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name}: training differs")
    err = assert_same(dict(trainer.inrun_values()), values, "Trainer AdamW vs plain loop")
    print(f"Trainer AdamW vs plain loop: max |Δ| / max |value| = {err:.2e}")


def test_trainer_bf16_with_accumulation_equals_fp32_within_the_bound(tmp_path: Path) -> None:
    """``bf16=True``: Accelerate runs the forward under autocast and returns ``logits.float()``
    copies while the model's own loss reads the bf16 logits. Every example is valued, and the
    values equal the fp32 run's within the documented bound (docs/precision.md: relative L2 error
    ≤ 2 eps of bf16 and Pearson ≥ 0.9995 for a short run; measured 4.5e-3 and 0.99999)."""
    ids = [f"ex{i}" for i in range(N_TRAIN)]
    runs = []
    for bf16 in (False, True):
        trainer = make_trainer(tmp_path / str(bf16), ids, model=gpt2().float(), args={
            "bf16": bf16, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "save_strategy": "no"})
        trainer.train()
        values = trainer.inrun_values()
        assert sorted(values) == sorted(ids) and set(values.counts) == {1}
        runs.append(np.array([values[i] for i in ids]))
    fp32, bf16 = runs
    eps = torch.finfo(torch.bfloat16).eps
    err = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 1e-6 < err <= 2 * eps, err
    assert np.corrcoef(bf16, fp32)[0, 1] >= 0.9995
    print(f"Trainer bf16 vs fp32: relative L2 {err:.1e}")


@pytest.mark.parametrize(("plugin", "deepspeed", "what"), [(1, False, "FSDP1"), (None, True, "DeepSpeed")])
def test_trainer_refuses_fsdp1_and_deepspeed_naming_fsdp2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          plugin: Any, deepspeed: bool, what: str) -> None:
    """FSDP1 and DeepSpeed need an accelerator to run, so the Trainer's view of them is set by hand."""
    from types import SimpleNamespace

    from inrun import InRunError

    trainer = make_trainer(tmp_path, list(range(N_TRAIN)), args={"max_steps": 1, "save_strategy": "no"})
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin",
                        None if plugin is None else SimpleNamespace(fsdp_version=plugin), raising=False)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", deepspeed)
    with pytest.raises(InRunError, match=f"{what} partitions.*fsdp_version': 2"):
        trainer._tracker_for(trainer.model)
