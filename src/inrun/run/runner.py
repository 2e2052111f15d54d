"""One training run from a config, with values, checkpoints and resume: what ``inrun train`` runs.

The loop is an ordinary PyTorch loop with the tracker's one extra line. What makes it durable:

* **Data order** is a function of ``(seed, step)`` alone: epoch ``e`` uses the permutation drawn
  from ``numpy.random.default_rng([seed, e])``, cut into full batches (the remainder of an epoch
  is not used). Nothing about the order needs to be replayed on resume.
* **Checkpoints** (every ``checkpoint.every`` steps and at the end) hold the model, optimizer,
  schedule, torch RNG state, tracker counters and the value ledger, written atomically and
  checksummed (:mod:`inrun.store.rundir`). ``resume`` restores the newest *intact* one (damaged ones
  are set aside and named) and continues; if none is intact the resume is refused, since the
  values could not be restored exactly. A checkpoint is only written after the validation loss
  at its parameters was found finite.
* **One writer**: the run directory is locked for the whole run (a second ``train --resume``
  is refused at once, naming the holder). Everything is validated (config, ``hf_config``, data)
  before anything is written.
* **Identical after resume** means *bit-identical*: every value, count, trace row, loss and
  parameter of a run that was killed and resumed equals that of an uninterrupted run with the
  same config, on the same machine, torch build, device and thread count. Nothing is re-summed
  in a different order: the ledger's float64 sums are restored exactly from Parquet and the
  following steps add the same numbers in the same order. (On different hardware or thread
  counts, floating-point kernels may differ in the last bits; the run's metadata records the
  torch version and a resume under another one logs a warning.)
* **NaN/Inf**: a step whose loss or gradient is not finite never reaches the optimizer or the
  values; it is recorded as a skipped step. A step whose *update* makes the parameters or the
  validation loss non-finite (a learning rate far too large) has its values taken out again,
  exactly (:meth:`ValueLedger.rollback`). Then, by ``values.on_nonfinite``: ``"stop"`` (default)
  ends the run (:class:`RunStopped`, status ``stopped``, ``inrun`` exits with 3) with the values
  of every step before it saved; ``"skip"`` drops the step and continues: a skipped update is
  undone by restarting from the newest checkpoint before it and replaying to it (the replay is
  deterministic, so the result is that of a run in which the step was skipped), and a
  checkpoint is written right after it so that the next such step costs no replay.
* **Every other ending** is written to ``status.json``: ``failed`` with the step and a one-line
  cause (an error, a full disk), ``interrupted`` for SIGINT or SIGTERM (handled alike: the run
  stops at the end of the current step, its values saved; a second signal stops it at once).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InRunError, NonFiniteError, ValidationLossError, cause
from ..modes import evaluating
from ..store.examples import Examples
from ..store.ledger import ValueLedger
from ..store.rundir import (
    CHECKPOINTS,
    RUN_FORMAT,
    TRACE_DIR,
    RunDir,
    RunDirError,
    model_fingerprint,
)
from ..store.writer import RunWriter
from ..tracker import InRunShapley
from ..version import __version__
from .config import ConfigError, RunConfig, heal_config, saved_config
from .data import ExampleSet, load_data
from .data.packing import document_lengths, packed_batch
from .hf_config import check_model_config
from .models import build_model, build_optimizer, build_schedule, loss_function, packed_lm_loss

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float, float], None]
"""``progress(step, total_steps, train_loss, examples_per_second)`` after every step."""


class RunStopped(InRunError, RuntimeError):
    """The run stopped before its last step (e.g. a NaN loss); its values so far are saved."""

    def __init__(self, message: str, run_dir: Path, step: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.step = step


class RunInterrupted(InRunError):
    """SIGINT or SIGTERM stopped the run; ``status.json`` says ``interrupted``."""

    def __init__(self, message: str, run_dir: Path, step: int, signum: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.step = step
        self.signum = signum


@dataclass
class RunResult:
    """What :func:`train` did."""

    run_dir: RunDir
    steps: int
    resumed_from: int
    seconds: float
    final_val_loss: float
    skipped_checkpoints: list[tuple[str, str]] = field(default_factory=list)


class DataOrder:
    """Which training rows each step uses: a pure function of ``(seed, step)``."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise ValueError(f"{n} examples cannot fill a batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def rows(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]

    def state(self) -> dict[str, int]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device", "'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def run_metadata(config: RunConfig, model: nn.Module, train_set: ExampleSet, val_set: ExampleSet) -> dict[str, Any]:
    """What ``run.json`` records (and a resume checks)."""
    packed = {} if train_set.packed is None else {"packed_rows": len(train_set.packed)}
    return {
        "format": RUN_FORMAT,
        "inrun_version": __version__,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
        "model_fingerprint": model_fingerprint(model),
        "train_hash": train_set.fingerprint(),
        "validation_hash": val_set.fingerprint(),
        "n_train": len(train_set),
        "n_validation": len(val_set),
        **packed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def train(
    config: RunConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> RunResult:
    """Train as ``config`` says, valuing every example, into ``run_dir`` (default ``config.output``).

    Args:
        config: the run.
        run_dir: where results and checkpoints go.
        resume: continue the run in ``run_dir`` from its newest intact checkpoint (or from the
            start if it was killed before the first one). Its metadata must match ``config``.
        progress: called after every step (see :data:`ProgressFn`).

    Raises:
        RunDirError: ``run_dir`` holds another run (new run), does not match or has no intact
            checkpoint (resume), or another process trains in it (:class:`RunInUseError`).
        ConfigError, DataError: bad config or data, found before anything is written.
        RunStopped: a non-finite loss, gradient or update stopped the run (values so far saved).
        RunInterrupted: SIGINT or SIGTERM (values so far saved).
    """
    t0 = time.perf_counter()
    rd = RunDir(run_dir if run_dir is not None else config.output)
    writer: RunWriter | None = None
    tc = config.training
    device = pick_device(tc.device)
    if resume:
        if not rd.exists:
            raise RunDirError(f"cannot resume {rd.path}: it is not a run directory (no run.json)")
        lock = rd.lock()  # before anything else, so that a second resume is refused at once
    else:
        _check_new_output(rd)
        lock = None
    try:
        if tc.threads:
            torch.set_num_threads(tc.threads)
        check_model_config(config)
        train_set, val_set = load_data(config)
        torch.manual_seed(config.seed)
        model = _build_model(config, train_set, device)
        meta = run_metadata(config, model, train_set, val_set)
        examples = Examples(train_set.ids, train_set.sources, train_set.locations, train_set.previews, _lengths(train_set))
        if resume:
            _check_resumable(rd, config, meta, examples)
        else:
            lock = rd.lock()
        writer = RunWriter.for_config(rd, lock, examples=examples, keep=config.checkpoint.keep, total_steps=tc.steps)
        lock = None  # the writer holds it now, and releases it when the run ends
        if not resume:
            writer.create(meta, config.to_toml())
        result = _sessions(_Runner(config, writer, train_set, val_set, device, progress), model, resume)
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        if lock is not None:
            lock.release()
        if writer is not None:
            writer.close()


def _check_resumable(rd: RunDir, config: RunConfig, meta: dict[str, Any], examples: Examples) -> None:
    """A resume continues the run it finds: same metadata; what a killed writer left removed;
    the examples and config files healed when damaged."""
    rd.check_meta(meta)
    rd.clean_temporary()
    rd.heal_examples(*examples.columns())
    problem = saved_config(rd)[1]
    if problem is not None:  # run.json holds the config: write the file again
        logger.warning("%s; rewriting it from the config saved in run.json", problem)
        heal_config(rd, config)


def _sessions(runner: _Runner, model: nn.Module | None, resume: bool) -> RunResult:
    """Run the loop; a step whose update blew up under ``on_nonfinite = 'skip'`` rewinds it to
    the newest checkpoint before that step, which is then skipped (forced)."""
    forced: dict[int, str] = {}
    restore, max_step = resume, None
    while True:
        try:
            return runner.session(model, forced, restore=restore, max_step=max_step)
        except _Rewind as rewind:
            if rewind.step in forced:  # pragma: no cover - would loop forever: a bug
                raise InRunError(f"step {rewind.step} was skipped and still fails: {rewind.reason}") from None
            forced[rewind.step] = rewind.reason
            runner.rd.discard_checkpoints_after(rewind.step)
            logger.warning(
                "step %d: %s; restarting from the newest checkpoint before it to skip it "
                "(values.on_nonfinite = 'skip')", rewind.step, rewind.reason,
            )
            model, restore, max_step = None, True, rewind.step


def _check_new_output(rd: RunDir) -> None:
    """Refuse an output directory that cannot become a new run, before anything is written."""
    path = rd.path
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output {path} exists and is not a directory; choose another output directory")
    if rd.exists:
        raise RunDirError(
            f"{path} already holds a run. Continue it with `inrun train --resume {path}`, or "
            "choose another output directory (config key 'output')."
        )
    if path.is_dir() and ((path / CHECKPOINTS).exists() or (path / TRACE_DIR).exists()):
        raise RunDirError(
            f"{path} holds checkpoints or a trace but no run.json: it is not a run this inrun can "
            "continue or overwrite; choose another output directory, or delete it"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"cannot create the output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create the output {path}: {parent} is not writable")


def _build_model(config: RunConfig, train_set: ExampleSet, device: torch.device) -> nn.Module:
    try:
        model = build_model(config.model, train_set).to(device)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        key = "model.hf_config" if config.model.kind == "hf" else "model"
        raise ConfigError(key, f"the model cannot be built from this config: {text[:240]}") from None
    model.train()
    return model


class _Rewind(Exception):
    """Internal: restart from the newest checkpoint at most ``step`` and skip ``step``."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


@dataclass
class _Update:
    """The last optimizer step of this session that a later check may still blame."""

    step: int
    loss: float
    lr: float


class _Signals:
    """SIGINT and SIGTERM alike: the first asks the loop to stop after the current step, a
    second one stops at once (``KeyboardInterrupt``). Only in the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, old in self._old.items():
                signal.signal(s, old)


def _is_nonfinite(exc: BaseException) -> bool:
    """The tracker's way to say the validation loss or the parameters are NaN/Inf: a
    :class:`NonFiniteError`, or (before it raised that) a ``ValidationLossError`` saying so."""
    return isinstance(exc, NonFiniteError) or (isinstance(exc, ValidationLossError) and "not finite" in str(exc))


def _params_finite(params: list[nn.Parameter]) -> bool:
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


class _Runner:
    """The training loop of one run; :meth:`session` runs it from a restore point. What it writes
    goes through the run's one writer (:class:`~inrun.store.writer.RunWriter`): checkpoints,
    restores, curves and endings; the loop keeps the data order, the schedule, forced skips and
    rewinds."""

    def __init__(
        self, config: RunConfig, writer: RunWriter, train_set: ExampleSet, val_set: ExampleSet,
        device: torch.device, progress: ProgressFn | None,
    ) -> None:
        self.config, self.writer, self.rd = config, writer, writer.rd
        self.train_set, self.val_set = train_set, val_set
        self.device, self.progress = device, progress

    # -- one session ------------------------------------------------------------------------------
    def session(self, model: nn.Module | None, forced: dict[int, str], restore: bool, max_step: int | None) -> RunResult:
        config, rd, writer, tc = self.config, self.rd, self.writer, self.config.training
        if model is None:  # a restart: the same initial model, from the seed
            torch.manual_seed(config.seed)
            model = _build_model(config, self.train_set, self.device)
        self.model = model
        self.loss_fn = loss_function(self.train_set)
        self.val_x, self.val_y = self.val_set.inputs.to(self.device), self.val_set.targets.to(self.device)
        if self.val_x.is_floating_point():
            self.val_x = self.val_x.to(next(model.parameters()).dtype)
        self.optimizer = build_optimizer(config.optimizer, model)
        self.schedule = build_schedule(config.schedule, self.optimizer, tc.steps)
        packed = self.train_set.packed
        self.order = DataOrder(len(packed) if packed is not None else len(self.train_set), tc.batch_size, config.seed)
        self.lengths = document_lengths(self.train_set) if packed is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forced = forced
        self.update: _Update | None = None
        self.last_val = (-1, float("nan"))  # (step, validation loss) last measured and logged
        self.tracker = self._make_tracker() if config.values.enabled else None
        objects = {"model": model, "optimizer": self.optimizer, "schedule": self.schedule}
        restored = writer.begin(self.tracker, objects, restore=restore, max_step=max_step)
        self.ledger = writer.ledger
        start = writer.start_step
        if restored.state is not None:
            if writer.extra.get("data") != self.order.state():
                raise RunDirError(f"{restored.path}: its data order {writer.extra.get('data')} does not match this run's {self.order.state()}")
            forced.update({int(k): v for k, v in (writer.extra.get("forced_skips") or {}).items()})
        self.step = start
        with _Signals().installed() as signals:
            try:
                self._loop(start, signals)
            except (RunStopped, RunInterrupted, _Rewind):
                raise
            except KeyboardInterrupt:  # a second signal: stop now, mid-step; values stay at the last checkpoint
                message = (f"interrupted at step {self.step}; values are those of the last checkpoint; "
                           f"continue with {writer.resume_hint()}")
                writer.stop("interrupted", self.step, message)
                raise RunInterrupted(message, rd.path, self.step, signal.SIGINT) from None
            except BaseException as exc:
                self._fail(exc)
                raise
        # the final checkpoint saved them too, unless the last step was skipped
        writer.finish(checkpoint=False, step=tc.steps)
        if self.tracker is not None:
            self.tracker.close()
        return RunResult(rd, tc.steps, start, 0.0, writer.metrics().final_val_loss(), restored.skipped)

    def _make_tracker(self) -> InRunShapley:
        v = self.config.values
        ledger = ValueLedger(keep_trace=v.trace, trace_dir=self.rd.trace_store)
        return InRunShapley(
            self.model, self.optimizer, val_loss=lambda m: self.loss_fn(m, self.val_x, self.val_y),
            order=v.order, second_order=v.second_order, route=v.route, check=v.check,
            on_nonfinite="raise", keep_trace=v.trace, ledger=ledger, carry=v.carry, carry_window=v.carry_window,
            audit=self.config.audit.audit_config(seed=self.config.seed),
        )

    def _parameters_finite(self, step: int) -> bool:
        """After the update of ``step``: are all trainable parameters finite? (One reduction per
        parameter and one host sync: about the cost of reading the parameters once.)"""
        return _params_finite(self.params)

    def evaluate(self) -> float:
        """Validation loss in eval mode, without gradients; every module's mode is restored."""
        with evaluating(self.model), torch.no_grad():
            return float(self.loss_fn(self.model, self.val_x, self.val_y))

    def _log(self, step: int, train_loss: float, lr: float, val_loss: float, skipped: bool) -> None:
        """One row of the curves: after ``step`` steps."""
        self.writer.log(train_loss, val_loss=val_loss, step=step, lr=lr, skipped=skipped)
        if math.isfinite(val_loss):
            self.last_val = (step, val_loss)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self, start: int, signals: _Signals) -> None:
        tc, tracker = self.config.training, self.tracker
        if start == 0:
            val = self.evaluate()
            if not math.isfinite(val):
                self._stop(0, f"the validation loss of the initial model is not finite ({val})", blame_update=False)
            self._log(0, float("nan"), self.optimizer.param_groups[0]["lr"], val, False)
        every = self.config.checkpoint.every
        due = False  # a checkpoint waits while a skipped step leaves the tracker mid-window
        session_start, done_here = time.perf_counter(), 0
        if self.progress is not None:
            self.progress(start, tc.steps, float("nan"), 0.0)
        for step in range(start, tc.steps):
            self.step = step
            if signals.received is not None:
                self._interrupt(step, signals.received)
            lr = float(self.optimizer.param_groups[0]["lr"])
            if step in self.forced:  # an update found to blow up: skipped, then a checkpoint
                self._log(step + 1, float("nan"), lr, float("nan"), True)
                if tracker is not None:
                    tracker.skip_step(self.forced[step])
                self.optimizer.zero_grad(set_to_none=True)
                self._checkpoint(step + 1)
                due = False
                continue
            loss_value, skip_reason = self._train_step(step, lr)
            if skip_reason is not None:
                self._log(step + 1, loss_value, lr, float("nan"), True)
                if tracker is not None:
                    tracker.skip_step(skip_reason)
                if self.config.values.on_nonfinite == "stop":
                    self._stop(step, skip_reason, blame_update=False, recorded=True)
                self.optimizer.zero_grad(set_to_none=True)
                logger.warning("%s: step skipped (values.on_nonfinite = 'skip')", skip_reason)
                due = due or (every > 0 and (step + 1) % every == 0)
                continue
            if not self._parameters_finite(step):
                self._blame_update(f"the update of step {step} made the parameters non-finite")
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            last = step + 1 == tc.steps
            due = due or (every > 0 and (step + 1) % every == 0) or last
            evaluated = due or (tc.eval_every > 0 and (step + 1) % tc.eval_every == 0)
            val = self.evaluate() if evaluated else float("nan")
            if evaluated and not math.isfinite(val):
                self._blame_update(f"the update of step {step} made the validation loss non-finite ({val})")
            self._log(step + 1, loss_value, lr, val, False)
            done_here += 1
            if self.progress is not None:
                rate = done_here * tc.batch_size / max(time.perf_counter() - session_start, 1e-9)
                self.progress(step + 1, tc.steps, loss_value, rate)
            if due:
                self._checkpoint(step + 1)
                due = False
        self.step = tc.steps

    def _train_step(self, step: int, lr: float) -> tuple[float, str | None]:
        """The forward, backward and optimizer step of ``step``: its loss, and why it was skipped
        (``None``: the update was applied)."""
        rows = self.order.rows(step)
        segments = None
        if self.lengths is not None:  # rows of packed documents: one id per document
            batch = packed_batch(self.train_set, rows, self.lengths)
            ids, x, y, segments = batch.ids, batch.inputs.to(self.device), batch.targets.to(self.device), batch.segments
            positions = batch.positions.to(self.device)
            loss_fn: Any = lambda m, x, y: packed_lm_loss(m, x, y, positions)  # noqa: E731
        else:
            x = self.train_set.inputs[rows].to(self.device)
            y = self.train_set.targets[rows].to(self.device)
            if x.is_floating_point():
                x = x.to(self.params[0].dtype)
            ids, loss_fn = [self.train_set.ids[r] for r in rows], self.loss_fn
        try:
            with self.tracker.step(ids, segments=segments) if self.tracker is not None else contextlib.nullcontext():
                loss = loss_fn(self.model, x, y)
                loss.backward()
        except InRunError as exc:
            if not _is_nonfinite(exc):
                raise
            self._nonfinite_now(step, f"the validation pass failed ({cause(exc, 160)})")
        loss_value = float(loss.detach())
        norm = _grad_norm(self.params, self.config.training.clip_grad_norm)
        skip_reason = None
        if not math.isfinite(loss_value) or not math.isfinite(norm):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            skip_reason = f"non-finite {what} ({loss_value if what == 'loss' else norm}) at step {step}"
        else:
            if self.ledger is not None:
                self.ledger.mark()  # so that a later check can take this step out again
            self.update = _Update(step, loss_value, lr)
            try:
                self.optimizer.step()
            except NonFiniteError as exc:
                if not self._parameters_finite(step):  # raised after the update was applied
                    self._blame_update(f"the update of step {step} made the parameters non-finite ({cause(exc, 120)})")
                skip_reason = f"non-finite values at step {step} ({exc})"
                self.update = None
        return loss_value, skip_reason

    # -- non-finite events --------------------------------------------------------------------
    def _nonfinite_now(self, step: int, reason: str) -> None:
        """The tracker found the validation loss (or parameters) non-finite during ``step``:
        blame the last update when the validation loss at the current parameters says so,
        otherwise this step."""
        try:
            val = self.evaluate()
        except Exception:
            val = float("nan")
        if not math.isfinite(val) and self.update is not None:
            self._blame_update(f"the update of step {self.update.step} made the validation loss non-finite ({val})")
        if self.config.values.on_nonfinite == "skip":
            raise _Rewind(step, f"{reason} at step {step}")
        self._log(step + 1, float("nan"), float(self.optimizer.param_groups[0]["lr"]), float("nan"), True)
        self._stop(step, f"{reason} at step {step}", blame_update=False)

    def _blame_update(self, reason: str) -> None:
        """The last update made things non-finite: take its values out, then stop or skip it."""
        update = self.update
        assert update is not None
        if self.config.values.on_nonfinite == "skip":
            raise _Rewind(update.step, reason)
        self._stop(update.step, reason, blame_update=True)

    def _stop(self, step: int, reason: str, blame_update: bool, recorded: bool = False) -> None:
        """End the run as ``stopped`` at ``step`` with the values of every step before it."""
        rd, tracker, ledger, writer = self.rd, self.tracker, self.ledger, self.writer
        if tracker is not None:
            tracker.close()  # (finishing a pending step may add it: the rollback takes it out)
        if blame_update:
            update = self.update
            assert update is not None
            if ledger is not None and ledger.marked:
                ledger.rollback()
            writer.forget_after(update.step)
            self._log(step + 1, update.loss, update.lr, float("nan"), True)
        if ledger is not None and not recorded:
            ledger.record_skip(step, reason)
        writer.save()
        done = f"values of steps 0-{step - 1} are saved in {rd.path}" if step > 0 else f"no step was valued ({rd.path})"
        what = "its update and values were discarded" if blame_update else "it did not change the model"
        message = (
            f"{reason}. The run stopped at step {step} ({what}); {done}. Lower optimizer.lr, enable "
            "training.clip_grad_norm or clean the data in a new run; or set "
            "values.on_nonfinite = \"skip\" to drop such steps and continue."
        )
        writer.stop("stopped", step, message)
        raise RunStopped(message, rd.path, step)

    # -- other endings ----------------------------------------------------------------------------
    def _interrupt(self, step: int, signum: int) -> None:
        """A signal arrived: stop cleanly between steps, values of the steps done saved."""
        if self.tracker is not None:
            self.tracker.close()
        self.writer.save()
        name = signal.Signals(signum).name
        message = (f"interrupted by {name} before step {step}; values of steps 0-{step - 1} are saved; "
                   f"continue with {self.writer.resume_hint()}")
        self.writer.stop("interrupted", step, message)
        raise RunInterrupted(message, self.rd.path, step, signum)

    def _fail(self, exc: BaseException) -> None:
        """Anything else went wrong at ``self.step``: the writer says so in status.json and saves
        the values of the steps done if the disk allows (the error that ended the run is raised)."""
        if self.tracker is not None:
            try:
                self.tracker.close()
            except Exception as again:
                logger.warning("could not finish the tracker after the failure: %s", cause(again))
        self.writer.fail(exc, step=self.step)

    def _checkpoint(self, step: int) -> None:
        """Checkpoint after ``step`` steps; the parameters' validation loss is known finite."""
        if not (self.last_val[0] == step and math.isfinite(self.last_val[1])):
            val = self.evaluate()
            if not math.isfinite(val):  # (after a forced skip: the parameters of a checkpoint)
                if self.update is not None:
                    self._blame_update(f"the update of step {self.update.step} made the validation loss non-finite ({val})")
                self._stop(step, f"the validation loss at step {step} is not finite ({val})", blame_update=False)
        self.update = None
        extra = {"data": self.order.state(), "forced_skips": {str(k): v for k, v in sorted(self.forced.items()) if k < step}}
        self.writer.checkpoint(extra=extra, step=step)


def _lengths(data: ExampleSet) -> list[int] | None:
    """Tokens per example that count in the loss (text), for the length check of the summary."""
    if data.task != "lm":
        return None
    return [int(n) for n in (data.targets != -100).sum(dim=1).tolist()]


def _grad_norm(params: list[nn.Parameter], clip: float | None) -> float:
    """Total gradient norm before clipping (clipping to ``clip`` if set)."""
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
