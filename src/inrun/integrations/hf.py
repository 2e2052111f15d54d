"""Hugging Face ``Trainer`` integration: In-Run Data Shapley of every example of ``train()``.

:class:`InRunTrainer` is a thin ``Trainer`` subclass. A callback cannot do this job: the backward
pass happens inside ``Trainer.training_step``, and a callback never sees the batch, so it cannot
know which examples to credit. The subclass wraps each micro-batch's ``training_step`` in
``tracker.step(ids)``; everything else is the tracker's ordinary machinery:

* the optimizer is the Trainer's own (accelerate's ``AcceleratedOptimizer`` is unwrapped; the
  tracker's step hooks fire on the torch optimizer inside it), so learning rates are read from
  the parameter groups at every optimizer step and the Trainer's schedulers just work;
* gradient accumulation: one ``tracker.step`` per micro-batch, values are finalized at the
  optimizer step; ``max_grad_norm`` clipping is detected from the gradient norms and scales the
  step's values; the loss normalization the Trainer chose (``num_items_in_batch`` or a division
  by the accumulation steps) is whatever reaches the gradients, so it is what is valued;
* under ``torchrun`` the Trainer wraps the model in DDP, or shards it with FSDP2 (``fsdp_version=2``);
  the tracker is built on that model at the first training step, so each rank values its own
  examples and the saved ledger is the global one (see :mod:`inrun.tracking.ddp`,
  :mod:`inrun.tracking.fsdp`). FSDP1 and DeepSpeed are refused;
* ``bf16=True``: Accelerate returns float32 copies of the model's outputs; the gradient the
  outputs received is read from the bf16 tensors they were cast from (see
  :func:`inrun.tracking.replay.cast_source`).

Example ids. The training dataset keeps a column of ids (``int`` or ``str``, default name
``"id"``). It survives ``remove_unused_columns=True`` (the Trainer's default): the column is
added to the Trainer's signature columns, taken out of the features before your data collator
runs (so any collator works), put back into the batch as a plain list, and removed from the
inputs before the model's forward. Evaluation batches may carry the column too.

Output. ``<output_dir>/inrun/`` is a run directory in the format ``inrun train`` writes
(:mod:`inrun.store.writer`): values, trace, examples (ids, ``source`` and ``text`` columns when the
dataset has them, else the decoded ``input_ids`` when the Trainer has a tokenizer), curves,
``tracker.json`` (settings, the route of every parameter), ``summary.json`` and ``status.json``, so
``inrun report``, ``inrun inspect`` and ``inrun curate`` work on it. It is updated at every
checkpoint and completed at the end of ``train()``. The tracker's state lives with the Trainer's
own checkpoints: ``<checkpoint-N>/inrun/`` holds the ledger (``ValueLedger.load`` reads it), the
curves and ``tracker.json``; ``train(resume_from_checkpoint=...)`` reloads it and continues, and
the values then equal those of an uninterrupted run.

Logs. At every logging step the Trainer's logs get the values' scalars
(:func:`inrun.integrations.metrics.value_scalars`: quantiles, share of negative values, per-source
totals), so ``report_to="tensorboard"`` plots them. Once, after the third step, the measured cost
of the validation pass is logged (``inrun/validation_cost_ratio``, and a line on the ``inrun``
logger: a warning when it costs more than the training batch itself).

Example:
    >>> from inrun.integrations.hf import InRunArguments, InRunTrainer       # doctest: +SKIP
    >>> trainer = InRunTrainer(model=model, args=training_args,              # doctest: +SKIP
    ...                        train_dataset=train_ds,   # has an "id" column
    ...                        inrun_val_dataset=val_ds, inrun_args=InRunArguments())
    >>> trainer.train()                                                     # doctest: +SKIP
    >>> trainer.inrun_values().top(10)                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import BatchMismatchError, InRunError, ValidationLossError
from ..files import write_json
from ..store.examples import Examples, examples_from
from ..store.ledger import ValueLedger, ValueTable
from ..store.rundir import METRICS_FILE, Metrics, RunDir
from ..store.writer import TRACKER_FILE, RunWriter, tracker_info
from ..tracker import InRunShapley, TrackerConfig
from ..tracking.fsdp import FSDP2_HINT
from .metrics import value_scalars

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InRunArguments:
    """Settings of the Trainer integration; validated on creation."""

    id_column: str = "id"
    """Name of the training dataset's column of example ids (``int`` or ``str``)."""
    subdir: str = "inrun"
    """Subdirectory of the output directory (and of each checkpoint) that receives the ledger."""
    order: int = 1
    """Passed to :class:`inrun.InRunShapley`: 1 or 2."""
    second_order: str = "trapezoid"
    """Passed to :class:`inrun.InRunShapley`: ``"trapezoid"`` or ``"hessian"``."""
    val_batch_size: int | None = None
    """Validation rows per forward when a validation dataset is given (default: the Trainer's
    ``per_device_eval_batch_size``). All chunks are in one autograd graph per step."""
    save_on_checkpoint: bool = True
    """Also write the ledger into every checkpoint directory (needed to resume the values)."""
    source_column: str = "source"
    """Column of the training dataset with each example's data source (used when present)."""
    text_column: str = "text"
    """Column with each example's text for the report (used when present; else the decoded
    ``input_ids`` if the Trainer has a tokenizer)."""
    log_values: bool = True
    """Add the values' scalars to the Trainer's logs at every logging step."""
    tracker_options: Mapping[str, Any] = field(default_factory=dict)
    """Any other :class:`inrun.TrackerConfig` field (``route``, ``check``, ``keep_trace``...)."""

    def __post_init__(self) -> None:
        if not self.id_column or not isinstance(self.id_column, str):
            raise ValueError(f"id_column={self.id_column!r} must be a non-empty string")
        if not self.subdir or os.path.isabs(self.subdir):
            raise ValueError(f"subdir={self.subdir!r} must be a non-empty relative path")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"val_batch_size={self.val_batch_size!r} must be a positive integer")
        known = set(TrackerConfig.__dataclass_fields__) - {"order", "second_order"}
        unknown = set(self.tracker_options) - known
        if unknown:
            raise ValueError(
                f"tracker_options has unknown field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        # Validates order, second_order and every option with TrackerConfig's own messages.
        TrackerConfig(order=self.order, second_order=self.second_order, **self.tracker_options)


class _IdCollator:
    """Takes the id column out of the features, runs the user's collator, puts ids back as a list."""

    def __init__(self, collator: Callable[[list], Any], id_column: str) -> None:
        self.collator = collator
        self.id_column = id_column

    def __call__(self, features: list) -> Any:
        if not features or not isinstance(features[0], Mapping) or self.id_column not in features[0]:
            return self.collator(features)
        ids = [f[self.id_column] for f in features]
        rest = [{k: v for k, v in f.items() if k != self.id_column} for f in features]
        batch = self.collator(rest)
        batch[self.id_column] = [i.item() if isinstance(i, Tensor) else i for i in ids]
        return batch


class InRunTrainer(Trainer):
    """A ``transformers.Trainer`` that values every training example with In-Run Data Shapley.

    Args:
        *args, **kwargs: everything ``Trainer`` takes.
        inrun_val_dataset: validation examples (a dataset of feature dicts, like
            ``train_dataset``; an id column in it is ignored). The utility is the validation
            loss ``Σ_c (n_c/N) · model(**chunk).loss`` over chunks of
            ``InRunArguments.val_batch_size`` rows collated by the Trainer's data collator: the
            example-weighted mean of the model's own loss. Every rank computes it in full.
        inrun_val_loss: instead of a dataset, ``val_loss(model) -> Tensor`` as for
            :class:`inrun.InRunShapley` (inputs on the model's device are up to you).
        inrun_args: :class:`InRunArguments`.

    After ``train()``: :attr:`inrun_tracker` (the tracker, closed), :meth:`inrun_values`, and the
    ledger in ``<output_dir>/<inrun_args.subdir>/``.
    """

    def __init__(
        self,
        *args: Any,
        inrun_val_dataset: Any = None,
        inrun_val_loss: Callable[[nn.Module], Tensor] | None = None,
        inrun_args: InRunArguments | None = None,
        **kwargs: Any,
    ) -> None:
        if (inrun_val_dataset is None) == (inrun_val_loss is None):
            raise ValueError("pass exactly one of inrun_val_dataset and inrun_val_loss")
        if inrun_val_dataset is not None and len(inrun_val_dataset) == 0:
            raise ValidationLossError("inrun_val_dataset is empty")
        super().__init__(*args, **kwargs)
        self.inrun_args = inrun_args if inrun_args is not None else InRunArguments()
        self._inrun_val_dataset = inrun_val_dataset
        self._inrun_val_loss = inrun_val_loss
        self._inrun_val_chunks: list[tuple[dict[str, Any], int]] | None = None
        self._user_collator = self.data_collator
        self.data_collator = _IdCollator(self.data_collator, self.inrun_args.id_column)
        self.inrun_tracker: InRunShapley | None = None
        self.inrun_run: RunWriter | None = None
        self._inrun_resume: str | None = None
        self._inrun_metrics: Metrics | None = None
        self._inrun_step_loss = 0.0
        self._inrun_cost_logged = False
        self.add_callback(_InRunSteps(self))

    # ------------------------------------------------------------------ Trainer overrides
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.inrun_args.id_column not in self._signature_columns and not getattr(self, "_inrun_hide_id", False):
            self._signature_columns.append(self.inrun_args.id_column)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        # The id column is kept among the signature columns; it must not hide the Trainer's own
        # error when no *model* input matches (a torch.compile'd model's forward(*args, **kwargs)).
        if self.args.remove_unused_columns and hasattr(dataset, "column_names"):
            self._set_signature_columns_if_needed()
            column = self.inrun_args.id_column
            model_columns = [c for c in self._signature_columns if c != column]
            if not any(c in dataset.column_names for c in model_columns):
                kept = self._signature_columns
                self._signature_columns, self._inrun_hide_id = model_columns, True
                try:
                    return super()._remove_unused_columns(dataset, description)  # raises its ValueError
                finally:
                    self._signature_columns, self._inrun_hide_id = kept, False
        return super()._remove_unused_columns(dataset, description)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the run directory ``<output_dir>/<subdir>`` is completed at the end.

        The tracker's hooks are removed when it returns; a later ``train()`` call continues the
        same ledger (or the checkpoint's, when resuming).
        """
        self._inrun_resume = None
        try:
            output = super().train(*args, **kwargs)
            self._finish_inrun()
        except BaseException as exc:
            if self.inrun_run is not None:
                self.inrun_run.fail(exc)
                self.inrun_run = None
            raise
        finally:
            if self.inrun_tracker is not None:
                self.inrun_tracker.close()
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        tracker = self.inrun_tracker
        if tracker is not None and "loss" in logs and self.inrun_args.log_values:
            logs = {**logs, **value_scalars(tracker.ledger.values())}
        super().log(logs, *args, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        inputs, ids = self._pop_ids(inputs)
        if ids is None:
            raise BatchMismatchError(
                f"the training batch has no {self.inrun_args.id_column!r} column: give every "
                "example of train_dataset an id (int or str) under that name, or set "
                "InRunArguments(id_column=...) to the column that has them"
            )
        tracker = self._tracker_for(model)
        with tracker.step(ids):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._inrun_step_loss += float(loss)
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Tensor | Any], *args: Any, **kwargs: Any) -> Any:
        inputs, _ = self._pop_ids(inputs)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.inrun_args.save_on_checkpoint and self.inrun_tracker is not None:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            ledger = self._save_inrun(Path(self._get_output_dir(trial=trial)) / folder / self.inrun_args.subdir)
            if self.inrun_run is not None:
                self.inrun_run.save(ledger)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self._inrun_resume = checkpoint

    # ------------------------------------------------------------------ public
    def inrun_values(self) -> ValueTable:
        """The global values so far (a collective call under DDP: call it on every rank)."""
        if self.inrun_tracker is None:
            raise InRunError("no training step has been valued yet: call train() first")
        return self.inrun_tracker.values()

    # ------------------------------------------------------------------ internals
    def _pop_ids(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        column = self.inrun_args.id_column
        if column not in inputs:
            return inputs, None
        rest = {k: v for k, v in inputs.items() if k != column}
        return rest, inputs[column]

    def _tracker_for(self, model: nn.Module) -> InRunShapley:
        tracker = self.inrun_tracker
        if tracker is not None and tracker.enabled and tracker.model is model:
            return tracker
        if isinstance(model, nn.DataParallel):
            raise InRunError(
                "the Trainer wrapped the model in DataParallel (several GPUs in one process); "
                "per-example values need one replica per process: launch with torchrun (DDP)"
            )
        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
        if getattr(self, "is_deepspeed_enabled", False) or fsdp_version == 1:
            raise InRunError(
                f"{'DeepSpeed' if fsdp_version is None else 'FSDP1'} partitions the parameters in a way the "
                f"tracker cannot read per layer: {FSDP2_HINT} (TrainingArguments(fsdp='full_shard', "
                "fsdp_config={'fsdp_version': 2})), or use DDP (docs/scaling.md)"
            )
        ledger = self._resume_ledger(tracker)
        tracker = InRunShapley(
            model,
            self.optimizer,
            val_loss=self._make_val_loss(),
            order=self.inrun_args.order,
            second_order=self.inrun_args.second_order,
            ledger=ledger,
            **dict(self.inrun_args.tracker_options),
        )
        tracker.step_count = self.state.global_step  # steps are numbered as the Trainer's
        self.inrun_tracker = tracker
        logger.info("InRunTrainer: valuing examples of %s", type(tracker.module).__name__)
        if self.args.should_save:
            self._open_run(tracker)
        return tracker

    def _open_run(self, tracker: InRunShapley) -> None:
        """The run directory ``<output_dir>/<subdir>``: new, or continued after a resume."""
        if self.inrun_run is not None:
            self.inrun_run.close()
        n_val = len(self._inrun_val_dataset) if self._inrun_val_dataset is not None else None
        self.inrun_run = RunWriter(
            Path(self.args.output_dir) / self.inrun_args.subdir, tracker, examples=self._inrun_examples(),
            resume="auto", state={}, rng=False, keep=None, kind="trainer",
            total_steps=self.state.max_steps or None, restored=self._inrun_metrics if tracker.step_count else None,
            description=f"{type(tracker.module).__name__} trained with the Hugging Face Trainer",
            metadata={"validation_examples": n_val, "per_device_train_batch_size": self.args.per_device_train_batch_size,
                      "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                      "learning_rate": self.args.learning_rate},
        )
        self.inrun_run.info = {"inrun_args": self._inrun_args_dict()}

    def _inrun_examples(self) -> Examples | None:
        """Ids, sources and texts of the training dataset, for the report (``None`` when the
        dataset cannot be listed, e.g. an IterableDataset)."""
        args, dataset = self.inrun_args, self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            return None
        try:
            if hasattr(dataset, "column_names"):  # datasets.Dataset: column access, no row loop
                names = set(dataset.column_names)
                cols = {c: dataset[c] for c in (args.id_column, args.source_column, args.text_column) if c in names}
                tokens = dataset["input_ids"] if "input_ids" in names else None
            else:
                rows = [dataset[i] for i in range(len(dataset))]
                names = set(rows[0]) if rows and isinstance(rows[0], Mapping) else set()
                cols = {c: [r[c] for r in rows] for c in (args.id_column, args.source_column, args.text_column) if c in names}
                tokens = [r["input_ids"] for r in rows] if "input_ids" in names else None
        except (KeyError, TypeError, IndexError):
            return None
        if args.id_column not in cols:
            return None
        table: dict[str, Any] = {"id": [i.item() if isinstance(i, Tensor) else i for i in cols[args.id_column]]}
        if args.source_column in cols:
            table["source"] = cols[args.source_column]
        if args.text_column in cols:
            table["text"] = cols[args.text_column]
        elif tokens is not None and self.processing_class is not None and hasattr(self.processing_class, "decode"):
            table["text"] = [self.processing_class.decode(list(t)[:256]) for t in tokens]
        if tokens is not None:
            table["length"] = [len(t) for t in tokens]
        return examples_from(table)

    def _inrun_args_dict(self) -> dict[str, Any]:
        return {**asdict(self.inrun_args), "tracker_options": dict(self.inrun_args.tracker_options)}

    def _finish_inrun(self) -> None:
        """The global ledger (collective under DDP), then the run directory completed (rank 0)."""
        tracker = self.inrun_tracker
        if tracker is None:
            logger.warning("no training step was valued: nothing written to %s", Path(self.args.output_dir) / self.inrun_args.subdir)
            return
        ledger = tracker.global_ledger(rank=self._inrun_writer_rank())
        drops = tracker.drops()  # also a collective under DDP: every rank's values of each step
        if self.inrun_run is not None:
            self.inrun_run.finish(checkpoint=False, ledger=ledger, drops=drops)
            self.inrun_run = None
            logger.info("In-Run Data Shapley values of %d examples written to %s", len(ledger),
                        Path(self.args.output_dir) / self.inrun_args.subdir)

    def _after_optimizer_step(self, step: int) -> None:
        """Called at the end of every optimizer step: the curve's row; the cost, once."""
        tracker, run = self.inrun_tracker, self.inrun_run
        if run is not None:
            run.log(self._inrun_step_loss, step=step)
        self._inrun_step_loss = 0.0
        if tracker is not None and not self._inrun_cost_logged and tracker.cost().steps >= 2:
            self._inrun_cost_logged = True
            self._log_validation_cost(tracker)

    def _log_validation_cost(self, tracker: InRunShapley) -> None:
        cost = tracker.cost()
        n_val = len(self._inrun_val_dataset) if self._inrun_val_dataset is not None else "the"
        rows = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        message = (
            f"inrun: the validation pass ({n_val} rows) takes {cost.ratio:.2f}x the time of the "
            f"training forward and backward ({rows} rows per step): "
            f"{cost.validation_seconds / cost.steps * 1e3:.0f} ms against "
            f"{cost.train_seconds / cost.steps * 1e3:.0f} ms per step, measured over {cost.steps} steps. "
            "It runs at every optimizer step; fewer validation rows make every step cheaper."
        )
        (logger.warning if cost.ratio >= 1 else logger.info)(message)
        super().log({"inrun/validation_cost_ratio": cost.ratio})

    def _resume_ledger(self, previous: InRunShapley | None) -> ValueLedger | None:
        """The ledger to continue: the resumed checkpoint's, else the previous ``train()``'s."""
        if previous is not None:
            previous.close()
        if self._inrun_resume is None:
            return None if previous is None else previous.ledger
        path = Path(self._inrun_resume) / self.inrun_args.subdir
        if not (path / "ledger.json").exists():
            logger.warning("checkpoint %s has no %s/: values start from zero", self._inrun_resume, self.inrun_args.subdir)
            return None
        # The saved ledger is global: under DDP one rank carries it on, the others start empty,
        # so that merging by id at read time counts it once.
        if self.args.process_index != 0:
            return None
        logger.info("resuming the values saved in %s", path)
        store = RunDir(Path(self.args.output_dir) / self.inrun_args.subdir).trace_store if self.args.should_save else None
        metrics = path / METRICS_FILE
        self._inrun_metrics = Metrics.load(metrics) if metrics.exists() else Metrics()
        return ValueLedger.load(path, trace_dir=store)

    def _make_val_loss(self) -> Callable[[nn.Module], Tensor]:
        if self._inrun_val_loss is not None:
            return self._inrun_val_loss

        def val_loss(model: nn.Module) -> Tensor:
            chunks = self._validation_chunks()
            total_rows = sum(n for _, n in chunks)
            total: Tensor | None = None
            for inputs, n in chunks:
                out = model(**inputs)
                loss = out["loss"] if isinstance(out, Mapping) else out[0]
                if loss is None:
                    raise ValidationLossError(
                        "the model returned no loss on the validation dataset: its collated "
                        "batches need labels (e.g. a 'labels' column or a collator that adds them)"
                    )
                term = loss * (n / total_rows)
                total = term if total is None else total + term
            return total

        return val_loss

    def _validation_chunks(self) -> list[tuple[dict[str, Any], int]]:
        """The validation dataset collated once, in chunks, on the model's device."""
        if self._inrun_val_chunks is None:
            dataset = self._inrun_val_dataset
            size = self.inrun_args.val_batch_size or self.args.per_device_eval_batch_size
            self._set_signature_columns_if_needed()
            keep = set(self._signature_columns) - {self.inrun_args.id_column}
            rows = [dataset[i] for i in range(len(dataset))]
            if self.args.remove_unused_columns:
                rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
            else:
                rows = [{k: v for k, v in r.items() if k != self.inrun_args.id_column} for r in rows]
            chunks = []
            for start in range(0, len(rows), size):
                part = rows[start : start + size]
                chunks.append((self._prepare_inputs(self._user_collator(part)), len(part)))
            self._inrun_val_chunks = chunks
        return self._inrun_val_chunks

    def _inrun_writer_rank(self) -> int | None:
        """The rank that receives the global ledger to write it: rank 0, which alone saves; every
        rank when each node's first process saves too (``save_on_each_node``)."""
        return None if self.args.save_on_each_node else 0

    def _save_inrun(self, directory: Path) -> ValueLedger | None:
        """Gather the global ledger (collective) and write it with the tracker's state and the
        curves into a checkpoint's directory; returns the ledger."""
        tracker = self.inrun_tracker
        assert tracker is not None
        ledger = tracker.global_ledger(rank=self._inrun_writer_rank())
        if not self.args.should_save or ledger is None:
            return ledger
        ledger.save(directory)
        if self.inrun_run is not None:
            self.inrun_run.metrics().save(directory / METRICS_FILE)
        write_json(directory / TRACKER_FILE, {**tracker_info(tracker), **tracker.state_dict(),
                                              "inrun_args": self._inrun_args_dict()})
        logger.info("In-Run Data Shapley values of %d examples written to %s", len(ledger), directory)
        return ledger


class _InRunSteps(TrainerCallback):
    """Tells the trainer when an optimizer step ended (a callback sees it; a subclass does not)."""

    def __init__(self, trainer: InRunTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._after_optimizer_step(state.global_step)
