"""One training run from a config, with values, checkpoints and resume: what ``inrun train`` runs.

The loop is an ordinary PyTorch loop with the tracker's one extra line. What makes it durable:

* **Data order** is a function of ``(seed, step)`` alone: epoch ``e`` uses the permutation drawn
  from ``numpy.random.default_rng([seed, e])``, cut into full batches (the remainder of an epoch
  is not used). Nothing about the order needs to be replayed on resume.
* **Checkpoints** (every ``checkpoint.every`` steps and at the end) hold the model, optimizer,
  schedule, torch RNG state, tracker counters and the value ledger, written atomically
  (:mod:`inrun.rundir`). ``resume`` restores the newest one and continues.
* **Identical after resume** means *bit-identical*: every value, count, trace row, loss and
  parameter of a run that was killed and resumed equals that of an uninterrupted run with the
  same config, on the same machine, torch build, device and thread count. Nothing is re-summed
  in a different order: the ledger's float64 sums are restored exactly from Parquet and the
  following steps add the same numbers in the same order. (On different hardware or thread
  counts, floating-point kernels may differ in the last bits; the run's metadata records the
  torch version and a resume under another one logs a warning.)
* **NaN/Inf**: a step whose loss or gradient is not finite never reaches the optimizer or the
  values. It is recorded as a skipped step; by default the run then stops (:class:`RunStopped`)
  with the values up to the previous step saved, or with ``values.on_nonfinite = "skip"`` the
  step is dropped and training continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RunConfig, check_model_config
from .data import ExampleSet, load_data
from .errors import InRunError, NonFiniteError
from .models import build_model, build_optimizer, build_schedule, loss_function, model_fingerprint
from .modes import evaluating
from .rundir import RUN_FORMAT, Metrics, RunDir, RunDirError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float, float], None]
"""``progress(step, total_steps, train_loss, examples_per_second)`` after every step."""


class RunStopped(InRunError, RuntimeError):
    """The run stopped before its last step (e.g. a NaN loss); its values so far are saved."""

    def __init__(self, message: str, run_dir: Path, step: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.step = step


@dataclass
class RunResult:
    """What :func:`train` did."""

    run_dir: RunDir
    steps: int
    resumed_from: int
    seconds: float
    final_val_loss: float


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
        from .config import ConfigError

        raise ConfigError("training.device", "'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def run_metadata(config: RunConfig, model: nn.Module, train_set: ExampleSet, val_set: ExampleSet) -> dict[str, Any]:
    """What ``run.json`` records (and a resume checks)."""
    from . import __version__

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
        resume: continue the run in ``run_dir`` from its newest checkpoint (or from the start if
            it was killed before the first one). Its metadata must match ``config``.
        progress: called after every step (see :data:`ProgressFn`).

    Raises:
        RunDirError: ``run_dir`` holds another run (new run), or does not match (resume).
        RunStopped: a non-finite loss or gradient stopped the run (values so far are saved).
    """
    t0 = time.perf_counter()
    rd = RunDir(run_dir if run_dir is not None else config.output)
    tc = config.training
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    if resume and not rd.exists:
        raise RunDirError(f"cannot resume {rd.path}: it is not a run directory (no run.json)")

    check_model_config(config)  # before anything is built or written
    train_set, val_set = load_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train_set).to(device)
    model.train()
    meta = run_metadata(config, model, train_set, val_set)
    if resume:
        rd.check_meta(meta)
        rd.clean_temporary()
    else:
        rd.create(meta, config.to_toml())
    if not resume or not rd.file("examples.parquet").exists():
        rd.write_examples(train_set.ids, train_set.sources, train_set.locations, train_set.previews)

    loss_fn = loss_function(train_set)
    val_x, val_y = val_set.inputs.to(device), val_set.targets.to(device)
    if val_x.is_floating_point():
        val_x = val_x.to(next(model.parameters()).dtype)
    optimizer = build_optimizer(config.optimizer, model)
    schedule = build_schedule(config.schedule, optimizer, tc.steps)
    tracker = _make_tracker(config, model, optimizer, lambda m: loss_fn(m, val_x, val_y), train_set)
    order = DataOrder(len(train_set), tc.batch_size, config.seed)
    params = [p for p in model.parameters() if p.requires_grad]

    start, metrics = 0, Metrics()
    checkpoints = rd.checkpoints() if resume else []
    if checkpoints:
        _, path = checkpoints[-1]
        state, ledger, metrics = rd.load_checkpoint(path, torch.device("cpu"))
        if state["data"] != order.state():
            raise RunDirError(f"{path}: its data order {state['data']} does not match this run's {order.state()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if tracker is not None:
            tracker.load_state_dict(state["tracker"], ledger)
        start = int(state["step"])
        logger.info("resuming %s from step %d", rd.path, start)

    def evaluate() -> float:
        return _evaluate(model, loss_fn, val_x, val_y)

    def checkpoint(step: int) -> None:
        state = {
            "format": RUN_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            },
            "tracker": tracker.state_dict() if tracker is not None else None,
            "data": order.state(),
        }
        ledger = tracker.ledger if tracker is not None else None
        rd.write_checkpoint(step, state, ledger, metrics, config.checkpoint.keep)
        rd.save_results(ledger, metrics)
        rd.write_status("running" if step < tc.steps else "complete", step, tc.steps)

    rd.write_status("running", start, tc.steps)
    if start == 0:
        metrics.append(0, float("nan"), optimizer.param_groups[0]["lr"], evaluate(), False)
    every = config.checkpoint.every
    due = False  # a checkpoint waits while a skipped step leaves the tracker mid-window
    skip_reason: str | None = None
    session_start, done_here = time.perf_counter(), 0
    if progress is not None:
        progress(start, tc.steps, float("nan"), 0.0)
    try:
        for step in range(start, tc.steps):
            rows = order.rows(step)
            x = train_set.inputs[rows].to(device)
            y = train_set.targets[rows].to(device)
            if x.is_floating_point():
                x = x.to(params[0].dtype)
            ids = [train_set.ids[r] for r in rows]
            lr = float(optimizer.param_groups[0]["lr"])
            with tracker.step(ids) if tracker is not None else contextlib.nullcontext():
                loss = loss_fn(model, x, y)
                loss.backward()
            loss_value = float(loss.detach())
            norm = _grad_norm(params, tc.clip_grad_norm)
            skip_reason = None
            if not math.isfinite(loss_value) or not math.isfinite(norm):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                skip_reason = f"non-finite {what} ({loss_value if what == 'loss' else norm}) at step {step}"
            else:
                try:
                    optimizer.step()
                except NonFiniteError as exc:
                    skip_reason = f"non-finite values at step {step} ({exc})"
            if skip_reason is not None:
                metrics.append(step + 1, loss_value, lr, float("nan"), True)
                if tracker is not None:
                    tracker.skip_step(skip_reason)
                if config.values.on_nonfinite == "stop":
                    _stop(rd, tracker, metrics, step, tc.steps, skip_reason)
                optimizer.zero_grad(set_to_none=True)
                logger.warning("%s: step skipped (values.on_nonfinite = 'skip')", skip_reason)
                due = due or (every > 0 and (step + 1) % every == 0)
                continue
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            last = step + 1 == tc.steps
            evaluated = last or (tc.eval_every > 0 and (step + 1) % tc.eval_every == 0)
            metrics.append(step + 1, loss_value, lr, evaluate() if evaluated else float("nan"), False)
            done_here += 1
            if progress is not None:
                rate = done_here * tc.batch_size / max(time.perf_counter() - session_start, 1e-9)
                progress(step + 1, tc.steps, loss_value, rate)
            due = due or (every > 0 and (step + 1) % every == 0) or last
            if due:
                checkpoint(step + 1)
                due = False
    except KeyboardInterrupt:
        rd.write_status("interrupted", metrics.step[-1] if metrics.step else start, tc.steps,
                        f"interrupted; continue with `inrun train --resume {rd.path}`")
        raise
    if tracker is not None:
        tracker.flush()
        tracker.close()
    if start == tc.steps or skip_reason is not None:  # nothing trained now, or no final checkpoint
        rd.save_results(tracker.ledger if tracker is not None else None, metrics)
    seconds = time.perf_counter() - t0
    rd.write_status("complete", tc.steps, tc.steps, seconds=seconds)
    if tracker is not None:
        from .summary import write_summary

        write_summary(rd)
    return RunResult(rd, tc.steps, start, seconds, metrics.final_val_loss())


def _make_tracker(
    config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
    val_loss: Callable[[nn.Module], torch.Tensor], train_set: ExampleSet,
) -> Any:
    if not config.values.enabled:
        return None
    from .tracker import InRunShapley

    v = config.values
    tracker = InRunShapley(
        model, optimizer, val_loss=val_loss, order=v.order, second_order=v.second_order,
        route=v.route, check=v.check, on_nonfinite="raise", keep_trace=v.trace,
    )
    tracker.ledger.set_sources({i: s for i, s in zip(train_set.ids, train_set.sources) if s is not None})
    return tracker


def _grad_norm(params: list[nn.Parameter], clip: float | None) -> float:
    """Total gradient norm before clipping (clipping to ``clip`` if set)."""
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _evaluate(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    """Validation loss in eval mode, without gradients; every module's mode is restored."""
    with evaluating(model), torch.no_grad():
        return float(loss_fn(model, x, y))


def _stop(rd: RunDir, tracker: Any, metrics: Metrics, step: int, steps: int, reason: str) -> None:
    ledger = tracker.ledger if tracker is not None else None
    rd.save_results(ledger, metrics)
    message = (
        f"{reason}. The run stopped before this step changed the model; values of steps "
        f"0-{step - 1} are saved in {rd.path}. Lower optimizer.lr, enable "
        "training.clip_grad_norm or clean the data; or set values.on_nonfinite = \"skip\" to "
        "drop such steps and continue."
    )
    rd.write_status("stopped", step, steps, message)
    if tracker is not None:
        tracker.close()
    raise RunStopped(message, rd.path, step)
