"""Run directories from any training loop: the format ``inrun train`` writes, from your own loop,
the Hugging Face ``Trainer`` (:mod:`inrun.integrations.hf`) and Lightning
(:mod:`inrun.integrations.lightning`), so that ``inrun report``, ``inrun inspect`` and
``inrun curate`` work on every run.

:class:`RunWriter` writes the same files as the CLI (:mod:`inrun.store.rundir`): ``values.parquet``,
the trace parts under ``trace/``, ``ledger.json``, ``metrics.parquet``, ``examples.parquet``,
``manifest.json``, ``run.json``, ``status.json``, ``summary.json`` and
``checkpoints/step-N/`` (the tracker's state and ledger, and the state of the objects you
name), with the same checksums, atomic writes and exclusive lock. It adds ``tracker.json``:
the tracker's settings and the route that valued every parameter (what ``inrun inspect
RUN_DIR`` prints).

What differs from a CLI run is in ``run.json``: ``"kind"`` is ``"library"``, ``"trainer"`` or
``"lightning"`` instead of ``"cli"``, and there is no ``config`` (the loop is yours, so inrun cannot
run it again). ``inrun curate`` therefore writes the keep/drop lists and the report, but
``--retrain`` is for CLI runs only.

Resume. A :class:`RunWriter` opened with ``resume=True`` (or ``"auto"`` on a directory that
holds a run) restores the newest intact checkpoint: the tracker's counters and ledger, the
``state_dict`` of every object named in ``state`` (by default the tracker's model and
optimizer), torch's random-number state and your ``extra`` data; :attr:`RunWriter.start_step`
says where to continue. The ledger's float64 sums are restored exactly from Parquet, so a
resumed loop that replays the same batches from that step gives bit-identical values.
Choosing the same batches is your loop's part: make the data order a function of the step
(as ``inrun train`` does) or checkpoint your sampler's state in ``extra``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import one_line
from ..files import DirLock, read_json, write_json
from ..modes import evaluating
from ..version import __version__
from .examples import Examples, examples_from
from .ledger import ValueLedger
from .rundir import (
    CHECKPOINT_FORMAT,
    RUN_FORMAT,
    Metrics,
    Restored,
    RunDir,
    RunDirError,
    model_fingerprint,
)
from .summary import write_summary

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "TRACKER_FILE", "Examples", "RunWriter", "examples_from", "read_tracker_info", "tracker_info"]

KINDS = ("cli", "library", "trainer", "lightning")
TRACKER_FILE = "tracker.json"
# What must match for a run of your own loop to be resumed: anything else mixes runs.
RESUME_KEYS = ("format", "kind", "inrun_version", "tracker_config", "model_fingerprint")


class Tracked(Protocol):
    """What the writer uses of a tracker (:class:`inrun.InRunShapley`): public names only."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    val_loss: Any
    ledger: ValueLedger
    config: Any

    @property
    def step_count(self) -> int: ...

    @property
    def audit(self) -> Any: ...

    @property
    def in_step(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], ledger: ValueLedger | None = None) -> None: ...

    def flush(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    @property
    def world_size(self) -> int: ...

    def drops(self) -> list[dict[str, Any]]: ...

    def carried(self, final: bool = True) -> Any: ...

    def validation_losses(self) -> dict[int, float]: ...


def tracker_info(tracker: Tracked) -> dict[str, Any]:
    """What ``tracker.json`` holds: settings, the route of every parameter, the valued modules
    (:meth:`inrun.InRunShapley.describe`)."""
    return tracker.describe()


class RunWriter:
    """A run directory written from a training loop (see the module docstring): the one writer of
    every run, ``inrun train``'s included (:meth:`for_config`).

    Args:
        path: the run directory (created; a new run refuses a directory that holds one).
        tracker: the :class:`~inrun.InRunShapley` of the loop.
        examples: what the report shows of each example (see :func:`examples_from`): a table
            with an ``id`` column and optional ``source``, ``text``/``preview``, ``location``
            and ``length``, or a plain list of ids. Sources also go into the ledger
            (``values.parquet``'s ``source`` column, the per-source report).
        resume: ``False``: a new run; ``True``: continue the run in ``path`` (refused if there is
            none, or if it was made with other tracker settings, another model architecture, other
            examples or another inrun); ``"auto"``: resume when ``path`` holds a run.
        state: objects whose ``state_dict()`` each checkpoint saves and a resume loads back, by
            name. Default: ``{"model": tracker.module, "optimizer": tracker.optimizer}``; add your
            scheduler or GradScaler here. ``{}`` for loops that checkpoint these themselves.
        keep: checkpoints kept (the newest ones); ``None`` keeps every one.
        total_steps: the planned number of steps, for ``status.json`` (optional).
        evaluate: compute the validation loss (``tracker.val_loss`` under ``no_grad``, in the
            validation mode, with its own random-number stream) at the start, at every checkpoint
            and at the end, for the report's loss curve and its "measured drop" beside the values.
        rng: save and restore torch's random-number state at checkpoints (dropout, a seeded
            ``torch`` sampler).
        kind: written into ``run.json`` (``"library"``; the integrations pass their own).
        description: one line for the report's header (model, data, settings).
        metadata: JSON-serializable facts about the run kept in ``run.json``.
        restored: for loops that restore the tracker from checkpoints of their own (the
            Trainer): the tracker already holds the restored ledger and step count, and these are
            the curves up to then; the run directory continues from there.
        at_step: resume from the checkpoint of exactly this step (the loop's own checkpoint
            says which; later ones are discarded); refused when it is missing or damaged.

    Example:
        >>> with RunWriter("runs/mine", tracker, examples=table) as run:    # doctest: +SKIP
        ...     for step in range(run.start_step, steps):
        ...         ids, x, y = batch(step)
        ...         with tracker.step(ids):
        ...             loss = loss_fn(model(x), y); loss.backward()
        ...         optimizer.step(); optimizer.zero_grad()
        ...         run.log(train_loss=loss.item())
        ...         if (step + 1) % 50 == 0:
        ...             run.checkpoint()
    """

    def __init__(
        self,
        path: str | Path,
        tracker: Tracked,
        *,
        examples: Any = None,
        resume: bool | str = False,
        state: Mapping[str, Any] | None = None,
        keep: int | None = 2,
        total_steps: int | None = None,
        evaluate: bool = True,
        rng: bool = True,
        kind: str = "library",
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        restored: Metrics | None = None,
        at_step: int | None = None,
    ) -> None:
        if kind not in KINDS[1:]:
            raise ValueError(f"kind={kind!r} must be one of {KINDS[1:]}")
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume={resume!r} must be True, False or 'auto'")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep!r} must be at least 1, or None to keep every checkpoint")
        examples = examples if isinstance(examples, Examples) or examples is None else examples_from(examples)
        self._setup(RunDir(path), kind, examples, keep, total_steps, evaluate, rng)
        self._attach(tracker, state)
        resuming = resume is True or (resume == "auto" and self.rd.exists)
        if resume is True and not self.rd.exists:
            raise RunDirError(f"cannot resume {self.rd.path}: it holds no run (no run.json); start a new one with resume=False")
        self._lock = self.rd.lock()
        try:
            if resuming:
                self._resume(metadata, restored, at_step)
            else:
                self._create(description, metadata, restored)
        except BaseException:
            self._release()
            raise

    @classmethod
    def for_config(cls, rd: RunDir, lock: DirLock, *, examples: Examples, keep: int, total_steps: int) -> RunWriter:
        """The writer of an ``inrun train`` run (:mod:`inrun.run.runner`), whose loop evaluates
        the validation loss itself and holds ``rd``'s lock already: it then :meth:`create`s the
        run or checks it, and :meth:`begin`s each session of its loop."""
        self = cls.__new__(cls)
        self._setup(rd, "cli", examples, keep, total_steps, evaluate=False, rng=True)
        self._attach(None, {})
        self._lock = lock
        return self

    def _setup(self, rd: RunDir, kind: str, examples: Examples | None, keep: int | None, total_steps: int | None,
               evaluate: bool, rng: bool) -> None:
        self.rd = rd
        self.kind = kind
        self.examples = examples
        self.keep = keep
        self.total_steps = total_steps
        self.evaluate = evaluate
        self.rng = rng
        self.extra: dict[str, Any] = {}
        self.info: dict[str, Any] = {}  # more facts for tracker.json (the integrations' settings)
        self.start_step = 0
        self.resumed = False
        self._rows: dict[int, list[Any]] = {}  # step -> [train_loss, lr, val_loss, skipped or None]
        self._previous: dict[str, Any] = {}  # the status a resume found
        self._t0 = time.perf_counter()
        self._finished = False
        self._lock: DirLock | None = None
        self._drops: list[dict[str, Any]] | None = None  # under DDP: gathered by the integration

    def _attach(self, tracker: Tracked | None, state: Mapping[str, Any] | None) -> None:
        self.tracker = tracker
        if state is not None:
            self.state_objects = dict(state)
        else:
            assert tracker is not None
            self.state_objects = {"model": tracker.module, "optimizer": tracker.optimizer}

    @property
    def ledger(self) -> ValueLedger | None:
        """The tracker's ledger (``None`` for a run without values)."""
        return None if self.tracker is None else self.tracker.ledger

    # -- opening ------------------------------------------------------------------------------------
    def _meta(self, description: str, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        t = self.tracker
        assert t is not None
        unique = {id(p): p for p in t.module.parameters()}
        return {
            "format": RUN_FORMAT,
            "kind": self.kind,
            "inrun_version": __version__,
            "torch_version": torch.__version__,
            "tracker_config": asdict(t.config),
            "optimizer": type(t.optimizer).__name__,
            "model": {
                "class": f"{type(t.module).__module__}.{type(t.module).__qualname__}",
                "parameters": int(sum(p.numel() for p in unique.values())),
                "trainable": int(sum(p.numel() for p in unique.values() if p.requires_grad)),
            },
            "model_fingerprint": model_fingerprint(t.module),
            "examples_hash": self.examples.fingerprint() if self.examples is not None else None,
            "n_train": len(self.examples) if self.examples is not None else None,
            "description": description,
            "metadata": dict(metadata or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def create(self, meta: Mapping[str, Any], config_toml: str | None = None) -> None:
        """Start a new run: ``config.toml`` (a run of ``inrun train``), the examples, then
        ``run.json``, last (until it is there, a failure leaves a directory a new run may use)."""
        if self.rd.exists:
            how = (f"`inrun train --resume {self.rd.path}`, or choose another output directory (config key 'output')"
                   if self.kind == "cli" else "RunWriter(..., resume=True), or choose another directory")
            raise RunDirError(f"{self.rd.path} already holds a run. Continue it with {how}.")
        if self.rd.checkpoints() or self.rd.trace_store.exists():
            raise RunDirError(f"{self.rd.path} holds checkpoints or a trace but no run.json; choose another directory, or delete it")
        self.rd.create(meta, self.examples.columns() if self.examples is not None else None, config_toml)

    def _create(self, description: str, metadata: Mapping[str, Any] | None, external: Metrics | None) -> None:
        self.create(self._meta(description, metadata))
        self._prepare(self.tracker)
        assert self.tracker is not None
        self.start_step = self.tracker.step_count
        if external is not None:
            self._rows = _rows_of(external)
        elif self.start_step > 0:  # opened after training (tracker.save_run): the losses it measured
            for step, loss in sorted(self.tracker.validation_losses().items()):
                self.log(val_loss=loss, step=step, lr=math.nan)
        if self.evaluate and self.start_step == 0:
            self.log(val_loss=self._validation_loss(), step=0)
        self._status("running", self.start_step)

    def _prepare(self, tracker: Tracked | None) -> None:
        """A new ledger's trace parts go to the run's trace store (written once, then linked);
        its sources are the examples'."""
        if tracker is None:
            return
        ledger = tracker.ledger
        if ledger.keep_trace and ledger.trace_dir is None and not ledger.trace_part_names():
            ledger.trace_dir = self.rd.trace_store
            self.rd.trace_store.mkdir(parents=True, exist_ok=True)
        if self.examples is not None:
            sources = {i: s for i, s in zip(self.examples.ids, self.examples.sources) if s is not None}
            if sources:
                ledger.set_sources(sources)

    def _resume(self, metadata: Mapping[str, Any] | None, external: Metrics | None, at_step: int | None) -> None:
        rd = self.rd
        if rd.kind == "cli":
            raise RunDirError(f"{rd.path} is a run of `inrun train`; continue it with `inrun train --resume {rd.path}`")
        rd.check_meta(self._meta("", metadata), RESUME_KEYS, "tracker settings, model and examples")
        rd.clean_temporary()
        if external is not None:  # the loop restored the tracker from its own checkpoint
            assert self.tracker is not None
            self.resumed = True
            self._rows = {s: r for s, r in _rows_of(external).items() if s <= self.tracker.step_count}
            self.start_step = self.tracker.step_count
            self.rd.save_results(self.tracker.ledger, self._metrics(), prune_trace=True, **self._results())
            self._status("running", self.start_step)
            return
        self.begin(self.tracker, None, restore=True, at_step=at_step)
        if self.start_step == 0 and self.evaluate:
            self.log(val_loss=self._validation_loss(), step=0)

    def begin(self, tracker: Tracked | None, state: Mapping[str, Any] | None, *, restore: bool,
              max_step: int | None = None, at_step: int | None = None) -> Restored:
        """Start a session of the loop with this ``tracker`` (``None``: no values) and these
        objects: with ``restore``, from the newest intact checkpoint (at most ``max_step``, or
        exactly ``at_step``), its objects, tracker, random-number state and :attr:`extra` loaded
        back and the top-level results rewritten from it; otherwise from step 0."""
        self._attach(tracker, state if state is not None else self.state_objects)
        self._prepare(tracker)
        rd = self.rd
        restored = Restored(0, None, None, None, Metrics())
        if restore:
            self._previous = rd.status()
            restored = rd.restore(torch.device("cpu"), max_step=at_step if at_step is not None else max_step,
                                  values=tracker is not None)
            if at_step is not None and restored.step != at_step:
                raise RunDirError(
                    f"cannot resume {rd.path} at step {at_step}: it has no intact checkpoint of that step "
                    f"(the newest before it is step {restored.step}), so its values cannot be restored exactly. "
                    "Resume from the checkpoint of a step it has, or start a new run in another directory"
                )
            if at_step is not None:
                rd.discard_checkpoints_after(at_step)
            for name, why in restored.skipped:
                logger.warning("skipped damaged checkpoint %s (%s); it was moved aside as damaged-%s", name, why, name)
            self.resumed = True
        self.extra = {}
        self._rows = {}
        self.start_step = 0
        if restored.state is not None:
            self._load(restored)
        if restore:  # the top-level results are those of the restored checkpoint again
            rd.save_results(self.ledger, self._metrics(), prune_trace=True, **self._results())
        self._status("running", self.start_step)
        return restored

    def _load(self, restored: Restored) -> None:
        state = restored.state
        assert state is not None
        missing = sorted(set(self.state_objects) - set(state.get("objects", {})))
        if missing:
            raise RunDirError(f"{restored.path} has no saved state for {missing}; checkpoint them with state={{...}}")
        for name, obj in self.state_objects.items():
            obj.load_state_dict(state["objects"][name])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"], restored.ledger)
        rng = state.get("rng")
        if self.rng and rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.extra = dict(state.get("extra") or {})
        self._rows = _rows_of(restored.metrics)
        self.start_step = int(state["step"])
        logger.info("resuming %s from step %d", self.rd.path, self.start_step)

    # -- while training -------------------------------------------------------------------------------
    def log(self, train_loss: float | None = None, *, val_loss: float | None = None, step: int | None = None,
            lr: float | None = None, skipped: bool | None = None) -> None:
        """Record the loss of a step for the report's curves (call it after ``optimizer.step()``).

        Args:
            train_loss: the step's training loss (a number or a 0-d tensor).
            val_loss: a validation loss measured at the parameters after ``step`` steps.
            step: steps done (default: the tracker's step count, i.e. after the last optimizer step).
            lr: the step's learning rate (default: the first parameter group's, now).
            skipped: whether the step was skipped (default: as the ledger recorded it).
        """
        if step is None:
            assert self.tracker is not None, "log(step=...) in a run without values"
            step = self.tracker.step_count
        step = int(step)
        row = self._rows.get(step)
        if row is None:
            if lr is None:
                assert self.tracker is not None, "log(lr=...) in a run without values"
                lr = float(self.tracker.optimizer.param_groups[0]["lr"])
            row = self._rows[step] = [math.nan, float(lr), math.nan, None]
        if train_loss is not None:
            row[0] = float(train_loss)
        if val_loss is not None:
            row[2] = float(val_loss)
        if skipped is not None:
            row[3] = bool(skipped)

    def logged(self, step: int) -> bool:
        """Whether the curves have a row for ``step``."""
        return int(step) in self._rows

    def forget_after(self, step: int) -> None:
        """Drop the curves' rows after ``step`` (a step whose update is taken out again)."""
        self._rows = {s: r for s, r in self._rows.items() if s <= step}

    def checkpoint(self, extra: Mapping[str, Any] | None = None, ledger: ValueLedger | None = None,
                   step: int | None = None) -> Path:
        """Everything needed to continue after the steps done so far, written atomically.

        Args:
            extra: plain data (numbers, strings, tensors, lists and dicts of them) restored as
                :attr:`extra` on resume: an epoch counter, a sampler's position.
            ledger: the ledger to save (default ``tracker.ledger``; under DDP the integrations
                pass the merged one).
            step: steps done (default: the tracker's step count).
        """
        t = self.tracker
        step = t.step_count if step is None and t is not None else int(step)  # type: ignore[arg-type]
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "tracker": t.state_dict() if t is not None else None,  # completes a pending order-2 step first
            "objects": {name: obj.state_dict() for name, obj in self.state_objects.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            } if self.rng else None,
            "extra": dict(extra or {}),
        }
        ledger = ledger if ledger is not None else self.ledger
        self._evaluate_at(step)
        if ledger is not None:
            ledger.commit()  # a checkpointed step is good for good
        keep = self.keep if self.keep is not None else 1 << 30
        path = self.rd.write_checkpoint(step, state, ledger, self._metrics(ledger), keep)
        self.rd.save_results(ledger, self._metrics(ledger), **self._results())
        self._write_tracker(step)
        self._status("running", step)
        return path

    def save(self, ledger: ValueLedger | None = None, step: int | None = None) -> None:
        """The values and curves so far at the top of the run directory (no checkpoint): what
        ``inrun report`` reads. Between optimizer steps only."""
        ledger = ledger if ledger is not None else self.ledger
        step = self.tracker.step_count if step is None and self.tracker is not None else step
        if step is not None:
            self._evaluate_at(step)
        if ledger is not None:
            ledger.commit()
        self.rd.save_results(ledger, self._metrics(ledger), **self._results())
        if step is not None:
            self._write_tracker(step)
            self._status("running", step)

    def metrics(self) -> Metrics:
        """The curves recorded so far (as ``metrics.parquet`` holds them)."""
        return self._metrics()

    def _evaluate_at(self, step: int) -> None:
        if self.evaluate and not math.isfinite(self._rows.get(step, [0, 0, math.nan])[2]):
            self.log(val_loss=self._validation_loss(), step=step)

    def _validation_loss(self) -> float:
        """``tracker.val_loss`` at the current parameters: no gradient, validation mode, own RNG."""
        t = self.tracker
        assert t is not None
        devices = sorted({p.device.index or 0 for p in t.module.parameters() if p.device.type == "cuda"})
        with evaluating(t.module, t.config.val_mode == "eval"), torch.no_grad(), torch.random.fork_rng(devices=devices):
            loss = t.val_loss(t.module)
        return float(loss.detach().double().sum()) if isinstance(loss, torch.Tensor) else float(loss)

    def _metrics(self, ledger: ValueLedger | None = None) -> Metrics:
        ledger = ledger if ledger is not None else self.ledger
        skipped = {int(s["step"]) + 1 for s in ledger.skipped} if ledger is not None else set()
        m = Metrics()
        for step in sorted(self._rows):
            train_loss, lr, val_loss, flag = self._rows[step]
            m.append(step, train_loss, lr, val_loss, step in skipped if flag is None else flag)
        return m

    def _audit(self) -> Any:
        return None if self.tracker is None else self.tracker.audit

    def _results(self, final: bool = False) -> dict[str, Any]:
        """The tracker's audit, drop rows and carried values for the results at the top. Under DDP
        the drop rows are a collective: the integrations gather them on every rank and pass them
        to :meth:`finish` (``drops=``); the writer of one rank writes none of its own."""
        t = self.tracker
        if t is None:
            return {"audit": None}
        one = t.world_size == 1
        carried = t.carried(final=final) if one and t.config.carry != "off" else None
        return {"audit": t.audit, "drops": t.drops() if one else self._drops, "carried": carried}

    def _ran(self, step: int) -> bool:
        """Whether this writer saw steps of its own: a resume that runs none (a complete run
        resumed) keeps what the run's own steps recorded (tracker.json, the session's seconds)."""
        return not self.resumed or step > self.start_step

    def _write_tracker(self, step: int) -> None:
        if self.tracker is not None and (self._ran(step) or not self.rd.file(TRACKER_FILE).exists()):
            write_json(self.rd.file(TRACKER_FILE), {**tracker_info(self.tracker), **self.info}, fsync=False)

    def _status(self, state: str, step: int, message: str = "", **extra: Any) -> None:
        self.rd.write_status(state, step, self.total_steps or 0, message, **extra)

    def resume_hint(self) -> str:
        """How this run continues after it ended early."""
        if self.kind == "cli":
            return f"`inrun train --resume {self.rd.path}`"
        return "your loop, opening it with RunWriter(..., resume=True)"

    # -- the end --------------------------------------------------------------------------------------
    def finish(self, checkpoint: bool = True, ledger: ValueLedger | None = None, step: int | None = None,
               drops: list[dict[str, Any]] | None = None) -> RunDir:
        """Complete the run: final values and curves, ``summary.json``, status ``complete``, and
        (with ``checkpoint``) a last checkpoint, so that a longer run can resume from it.
        ``drops``: under DDP, the drop rows gathered on every rank (:meth:`InRunShapley.drops`)."""
        if self._finished:
            return self.rd
        self._drops = drops
        try:
            t = self.tracker
            if t is not None:
                t.flush()
                step = t.step_count if step is None else step
            assert step is not None
            if checkpoint:
                self.checkpoint(ledger=ledger, step=step)
            ledger = ledger if ledger is not None else self.ledger
            self._evaluate_at(step)
            if ledger is not None:
                ledger.commit()
            self.rd.save_results(ledger, self._metrics(ledger), **self._results(final=True))
            self._write_tracker(step)
            seconds = time.perf_counter() - self._t0
            if not self._ran(step) and self._previous.get("state") == "complete":
                seconds = self._previous.get("seconds", seconds)  # nothing ran: the run's own time
            self.rd.write_status("complete", step, self.total_steps or step, seconds=seconds)
            if ledger is not None:
                write_summary(self.rd)
        finally:
            self._finished = True
            self._release()
        return self.rd

    def fail(self, exc: BaseException, ledger: ValueLedger | None = None, step: int | None = None) -> None:
        """End the run as ``failed`` (or ``interrupted`` for Ctrl-C), the values of the steps
        done saved when the disk allows; the status says whether they were."""
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        step = self.tracker.step_count if step is None and self.tracker is not None else (step or 0)
        saved = ""
        try:
            ledger = ledger if ledger is not None else self.ledger
            if self.tracker is not None and not self.tracker.in_step:
                self.tracker.flush()
            if ledger is not None:
                ledger.commit()
            self.rd.save_results(ledger, self._metrics(ledger), **self._results())
            if ledger is not None:
                saved = f" Values of steps 0-{ledger.steps - 1} are saved." if ledger.steps else " No step was valued."
        except Exception as again:  # the error that ended the run is what the caller sees
            logger.warning("could not save the values after the failure: %s", one_line(again))
        self.stop(state, step, f"{state} at step {step}: {one_line(exc, 300)}.{saved} Fix the cause, then continue "
                               f"with {self.resume_hint()}.")

    def stop(self, state: str, step: int, message: str) -> None:
        """End the run early as ``state`` (``stopped``, ``interrupted``, ``failed``) with
        ``message`` in ``status.json``, and let another process in."""
        try:
            self._status(state, step, message)
        except OSError as exc:
            logger.warning("could not write %s: %s", self.rd.file("status.json"), one_line(exc))
        finally:
            self._finished = True
            self._release()

    def close(self) -> None:
        """Release the directory without completing the run (a later resume continues it)."""
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._finished:
            return
        if exc is None:
            self.finish()
        else:
            self.fail(exc)

    def __del__(self) -> None:  # a writer dropped without finish(): let another process in
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()


def read_tracker_info(rd: RunDir) -> dict[str, Any] | None:
    """``tracker.json`` of a run directory (verified), or ``None`` when the run has none."""
    path = rd.file(TRACKER_FILE)
    if not path.exists():
        return None
    return read_json(path, "the tracker's settings and routes")


def _rows_of(metrics: Metrics) -> dict[int, list[Any]]:
    return {int(s): [float(a), float(lr), float(v), bool(k)] for s, a, lr, v, k in
            zip(metrics.step, metrics.train_loss, metrics.lr, metrics.val_loss, metrics.skipped)}
