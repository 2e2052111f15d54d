"""Lightning integration: :class:`InRunCallback` values every training example of ``Trainer.fit``.

Add the callback to Lightning's ``Trainer``; the LightningModule, its ``training_step`` and
``configure_optimizers`` stay as they are. What the callback does, and why:

* **The step.** Every training batch is one micro-batch: the callback opens ``tracker.step(ids)``
  in ``on_train_batch_start`` and closes it in ``on_after_backward``, so the forward and the
  backward of ``training_step`` are inside it and gradient clipping (``gradient_clip_val``,
  applied after the backward) is seen as clipping. With automatic optimization Lightning runs
  ``training_step`` *inside* ``optimizer.step(closure)``, after the optimizer's step hooks would
  fire; a step pre-hook of the callback, registered before the tracker's, runs the closure first
  and hands the optimizer its result, which is what the optimizer would have done first itself
  (SGD, Adam and AdamW call the closure once). Manual optimization and mixed precision (where
  Lightning runs the closure before ``optimizer.step``) need nothing of this.
* **Zeroing.** Lightning zeroes the gradients after ``training_step``'s forward; the tracker
  needs them zero when a step opens, so the callback zeroes them at each step's first batch,
  where nothing reads them before Lightning's own zeroing.
* **Gradient accumulation** (``accumulate_grad_batches``): one ``tracker.step`` per batch, the
  values finalized at the optimizer step, as in any loop.
* **Ids.** ``ids="id"`` (default) reads ``batch["id"]`` of a dict batch; an ``int`` reads that
  position of a tuple batch; a function ``batch -> ids`` anything else. Your
  ``training_step`` must ignore them (a dict batch: take what the model needs).
* **Run directory.** ``run_dir`` (default ``<default_root_dir>/inrun``) is a run directory in the
  format ``inrun train`` writes (:mod:`inrun.store.writer`), so ``inrun report``, ``inspect`` and
  ``curate`` work on it; it is updated at each Lightning checkpoint and completed at the end.
* **Checkpoints and resume.** When Lightning saves a checkpoint, the callback writes
  ``run_dir/checkpoints/step-N`` (the tracker's state and ledger; every one is kept, since
  Lightning may resume from any of its checkpoints) and stores ``{"run_dir", "step"}`` in
  Lightning's checkpoint. ``trainer.fit(..., ckpt_path=...)`` restores the run directory at that
  step, so the values equal those of an uninterrupted run as long as Lightning replays the same
  batches (a checkpoint at the end of an epoch, a deterministic sampler).
* **Metrics.** Every ``log_every`` optimizer steps the values' scalars
  (:func:`inrun.integrations.metrics.value_scalars`) go to every logger of the Trainer (with a
  histogram of the values for a ``TensorBoardLogger``); the cost of the validation pass is logged
  once, after the third step.

Example:
    >>> from inrun.integrations.lightning import InRunCallback                    # doctest: +SKIP
    >>> callback = InRunCallback(val_loss=lambda m: F.cross_entropy(m(xv), yv))   # doctest: +SKIP
    >>> L.Trainer(callbacks=[callback], max_epochs=2).fit(module, loader)         # doctest: +SKIP
    >>> callback.values().top(10)                                                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from ..errors import InRunError, StepOrderError
from ..store.ledger import ValueTable
from ..store.writer import RunWriter
from ..tracker import InRunShapley, TrackerConfig
from .metrics import value_scalars

logger = logging.getLogger(__name__)

__all__ = ["InRunCallback"]

STATE_FORMAT = 1


class InRunCallback(pl.Callback):
    """In-Run Data Shapley values of every training example of ``Trainer.fit`` (see the module
    docstring).

    Args:
        val_loss: ``val_loss(module) -> Tensor``, as for :class:`inrun.InRunShapley` (a scalar,
            or a vector of per-validation-example losses), on the module's device.
        ids: where a batch keeps its example ids: a key of a dict batch, a position of a tuple
            batch, or a function ``batch -> ids``.
        run_dir: the run directory (default ``<trainer.default_root_dir>/inrun``); ``None`` with
            ``write_run=False`` writes nothing.
        examples: what the report shows of each example (a table with an ``id`` column and
            optional ``source``, ``text``, ``location``, ``length``; see
            :func:`inrun.store.writer.examples_from`).
        log_every: optimizer steps between two reports of the values' scalars to the loggers.
        write_run: write the run directory (and its checkpoints).
        **tracker_options: any option of :class:`inrun.InRunShapley` (``order``, ``keep_trace``,
            ``route``...), checked here with a "did you mean" for a misspelt one.
    """

    def __init__(
        self,
        val_loss: Callable[[nn.Module], Tensor],
        *,
        ids: str | int | Callable[[Any], Any] = "id",
        run_dir: str | Path | None = None,
        examples: Any = None,
        log_every: int = 50,
        write_run: bool = True,
        **tracker_options: Any,
    ) -> None:
        if not callable(val_loss):
            raise TypeError("val_loss must be a callable taking the module and returning a loss")
        if log_every < 1:
            raise ValueError(f"log_every={log_every!r} must be at least 1")
        self.config = TrackerConfig.from_options(tracker_options)  # "did you mean" for a typo
        self.val_loss = val_loss
        self.ids = ids
        self.run_dir = run_dir
        self.examples = examples
        self.log_every = log_every
        self.write_run = write_run
        self.tracker_options = dict(tracker_options)
        self.tracker: InRunShapley | None = None
        self.run: RunWriter | None = None
        self._block: Any = None
        self._resume_state: dict[str, Any] | None = None
        self._hook: Any = None
        self._losses: list[float] = []
        self._cost_logged = False

    # -- results ------------------------------------------------------------------------------------
    def values(self) -> ValueTable:
        """id -> value of every example valued so far."""
        if self.tracker is None:
            raise InRunError("no training step has been valued yet: call trainer.fit() first")
        return self.tracker.values()

    # -- setting up ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning restored a checkpoint (its global_step and the optimizer's state).
        if trainer.world_size > 1:
            raise InRunError(
                f"InRunCallback values a run of one process; this Trainer runs {trainer.world_size} "
                f"({type(trainer.strategy).__name__}), which it does not support yet (Lightning's DDP calls "
                "the module's training_step as its forward, and each rank's values would need the others'). "
                "Train on one device with the callback, or use InRunShapley on the DDP-wrapped model in a "
                "torchrun loop, or InRunTrainer (docs/scaling.md)"
            )
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise InRunError(
                f"InRunCallback values a module trained by one optimizer; configure_optimizers returned {len(optimizers)}"
            )
        optimizer = optimizers[0]
        if self.tracker is not None:
            self.tracker.close()
        if self._hook is not None:
            self._hook.remove()
        # Registered before the tracker's own hooks, so that it runs first (see the module docstring).
        self._hook = optimizer.register_step_pre_hook(self._run_closure_first)
        self.tracker = InRunShapley(pl_module, optimizer, val_loss=self.val_loss, **self.tracker_options)
        self.tracker.step_count = trainer.global_step
        if self.write_run and trainer.is_global_zero:
            self._open_run(trainer)

    def _open_run(self, trainer: pl.Trainer) -> None:
        path = Path(self.run_dir) if self.run_dir is not None else Path(trainer.default_root_dir) / "inrun"
        state = self._resume_state
        if state is not None and Path(state["run_dir"]).resolve() != path.resolve():
            logger.warning("the checkpoint's values are in %s; continuing them there", state["run_dir"])
            path = Path(state["run_dir"])
        assert self.tracker is not None
        self.run = RunWriter(
            path, self.tracker, examples=self.examples, resume=state is not None, state={}, rng=False,
            keep=None, kind="lightning", at_step=int(state["step"]) if state is not None else None,
            total_steps=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
            description=f"{type(self.tracker.module).__name__} trained with Lightning",
            metadata={"accumulate_grad_batches": trainer.accumulate_grad_batches,
                      "gradient_clip_val": trainer.gradient_clip_val},
        )
        if state is not None and self.tracker.step_count != int(state["step"]):
            raise InRunError(
                f"Lightning resumed at step {self.tracker.step_count}, its inrun state is of step {state['step']}"
            )

    # -- one batch ----------------------------------------------------------------------------------
    def _ids_of(self, batch: Any) -> Any:
        key = self.ids
        if callable(key):
            return key(batch)
        try:
            return batch[key]
        except (KeyError, IndexError, TypeError):
            raise InRunError(
                f"the training batch has no ids at {key!r} (a {type(batch).__name__}): put each example's "
                "id in the batch (a dict batch: batch['id']) or pass ids= a key, a position or a function"
            ) from None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.tracker is None:
            return
        ids = self._ids_of(batch)
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        if not self.tracker.in_step:
            # Lightning zeroes the gradients between training_step's forward and its backward,
            # so the previous step's are still there: zeroed now, at the step's first batch, as
            # Lightning is about to (nothing before the backward reads them).
            for optimizer in trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
        block = self.tracker.step(ids)
        block.__enter__()
        self._block = block

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_block()

    def _close_block(self, exc: BaseException | None = None) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        if exc is None:
            block.__exit__(None, None, None)
        else:
            block.__exit__(type(exc), exc, exc.__traceback__)

    def _run_closure_first(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None or self._block is None:
            return None
        result = closure()  # training_step and backward, inside the tracker.step block
        if self._block is not None:  # training_step returned no loss: nothing to credit
            self._close_block(StepOrderError("training_step returned no loss, so no backward ran"))

        def done() -> Any:
            return result

        rest = args[1:] if args and "closure" not in kwargs else args
        return rest, {**kwargs, "closure": done}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.tracker is None:
            return
        if self._block is not None:
            self._close_block(StepOrderError("no backward pass in this training batch"))
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(float(loss.detach()))
        step = trainer.global_step
        if step == self.tracker.step_count and self._losses and not self.tracker.in_step:
            if self.run is not None and not self.run.logged(step):
                self.run.log(sum(self._losses) / len(self._losses), step=step)
                self._losses = []
            if step % self.log_every == 0:
                self._log_values(trainer, step)
            if not self._cost_logged and self.tracker.cost().steps >= 2:
                self._cost_logged = True
                self._log_cost(trainer, step)

    def _log_values(self, trainer: pl.Trainer, step: int) -> None:
        assert self.tracker is not None
        values = self.tracker.ledger.values()
        scalars = value_scalars(values)
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=step)
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "add_histogram") and (values.counts > 0).any():
                experiment.add_histogram("inrun/values", values.value[values.counts > 0], step)

    def _log_cost(self, trainer: pl.Trainer, step: int) -> None:
        assert self.tracker is not None
        cost = self.tracker.cost()
        message = (
            f"inrun: the validation pass takes {cost.ratio:.2f}x the time of the training forward and "
            f"backward: {cost.validation_seconds / cost.steps * 1e3:.0f} ms against "
            f"{cost.train_seconds / cost.steps * 1e3:.0f} ms per step, measured over {cost.steps} steps. "
            "It runs at every optimizer step; fewer validation rows make every step cheaper."
        )
        (logger.warning if cost.ratio >= 1 else logger.info)(message)
        for lg in trainer.loggers:
            lg.log_metrics({"inrun/validation_cost_ratio": cost.ratio}, step=step)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None or self.run is None:
            return {}
        if self.tracker.in_step:
            raise StepOrderError(
                "Lightning saves a checkpoint in the middle of an accumulated step; the values can "
                "only be checkpointed between optimizer steps (checkpoint every N optimizer steps)"
            )
        path = self.run.checkpoint()
        return {"format": STATE_FORMAT, "run_dir": str(self.run.rd.path), "step": self.tracker.step_count,
                "checkpoint": str(path)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict) if state_dict.get("run_dir") else None

    # -- the end ------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker is None:
            return
        if self.run is not None:
            self.run.finish(checkpoint=False)
            self.run = None
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_block(exception)
        if self.run is not None:
            self.run.fail(exception)
            self.run = None
        self._release()

    def _release(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._resume_state = None
