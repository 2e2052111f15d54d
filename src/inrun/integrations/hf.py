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
* under ``torchrun`` the Trainer wraps the model in DDP; the tracker is built on that wrapped
  model at the first training step, so each rank values its own examples and the saved ledger
  is the global one (see :mod:`inrun.integrations.ddp`).

Example ids. The training dataset keeps a column of ids (``int`` or ``str``, default name
``"id"``). It survives ``remove_unused_columns=True`` (the Trainer's default): the column is
added to the Trainer's signature columns, taken out of the features before your data collator
runs (so any collator works), put back into the batch as a plain list, and removed from the
inputs before the model's forward. Evaluation batches may carry the column too.

Output. At the end of ``train()`` the global ledger is written to ``<output_dir>/inrun/``
(``values.parquet``, ``ledger.json`` and friends, see :meth:`inrun.ValueLedger.save`) together
with ``tracker.json`` (step count, settings, which route valued each parameter), and the same
at every checkpoint to ``<checkpoint-N>/inrun/``. ``train(resume_from_checkpoint=...)`` reloads
the checkpoint's ledger and continues adding to it.

Example:
    >>> from inrun.integrations.hf import InRunArguments, InRunTrainer       # doctest: +SKIP
    >>> trainer = InRunTrainer(model=model, args=training_args,              # doctest: +SKIP
    ...                        train_dataset=train_ds,   # has an "id" column
    ...                        inrun_val_dataset=val_ds, inrun_args=InRunArguments())
    >>> trainer.train()                                                     # doctest: +SKIP
    >>> trainer.inrun_values().top(10)                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import BatchMismatchError, InRunError, ValidationLossError
from ..ledger import ValueLedger, ValueTable, atomic_write
from ..tracker import InRunShapley, TrackerConfig

logger = logging.getLogger(__name__)

TRACKER_FILE = "tracker.json"


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
    """Also write the ledger into every checkpoint directory."""
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
        self._inrun_resume: str | None = None

    # ------------------------------------------------------------------ Trainer overrides
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.inrun_args.id_column not in self._signature_columns:
            self._signature_columns.append(self.inrun_args.id_column)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, then the global ledger is written to ``<output_dir>/<subdir>``.

        The tracker's hooks are removed when it returns; a later ``train()`` call continues the
        same ledger (or the checkpoint's, when resuming).
        """
        self._inrun_resume = None
        try:
            output = super().train(*args, **kwargs)
            self._save_inrun(Path(self.args.output_dir) / self.inrun_args.subdir)
        finally:
            if self.inrun_tracker is not None:
                self.inrun_tracker.close()
        return output

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
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Tensor | Any], *args: Any, **kwargs: Any) -> Any:
        inputs, _ = self._pop_ids(inputs)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.inrun_args.save_on_checkpoint and self.inrun_tracker is not None:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._save_inrun(Path(self._get_output_dir(trial=trial)) / folder / self.inrun_args.subdir)

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
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise InRunError(
                "FSDP and DeepSpeed shard the parameters and are not supported yet (see "
                "docs/scaling.md); use DDP, or LoRA with DDP for large models"
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
        return tracker

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
        return ValueLedger.load(path)

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

    def _save_inrun(self, directory: Path) -> None:
        """Gather the global ledger (collective) and write it with the tracker's state."""
        tracker = self.inrun_tracker
        if tracker is None:
            logger.warning("no training step was valued: nothing written to %s", directory)
            return
        ledger = tracker.global_ledger()
        if not self.args.should_save:
            return
        ledger.save(directory)
        coverage = tracker.coverage()
        state = {
            **tracker.state_dict(),
            "world_size": tracker.world_size,
            "inrun_args": {**asdict(self.inrun_args), "tracker_options": dict(self.inrun_args.tracker_options)},
            "coverage": {"routes": coverage.routes, "numel": coverage.numel},
        }
        atomic_write(directory / TRACKER_FILE, lambda p: Path(p).write_text(json.dumps(state, indent=2, default=str)))
        logger.info("In-Run Data Shapley values of %d examples written to %s", len(ledger), directory)
