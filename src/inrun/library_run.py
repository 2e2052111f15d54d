"""Run directories from any training loop: the format ``inrun train`` writes, from your own loop,
the Hugging Face ``Trainer`` (:mod:`inrun.integrations.hf`) and Lightning
(:mod:`inrun.integrations.lightning`), so that ``inrun report``, ``inrun inspect`` and
``inrun curate`` work on every run.

:class:`RunWriter` writes the same files as the CLI (:mod:`inrun.rundir`): ``values.parquet``,
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

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .ledger import ValueLedger, check_ids
from .modes import evaluating
from .rundir import RUN_FORMAT, Metrics, RunDir, RunDirError
from .storage import read_json, write_json

if TYPE_CHECKING:
    from .tracker import InRunShapley

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "TRACKER_FILE", "Examples", "RunWriter", "examples_from", "read_tracker_info", "tracker_info"]

KINDS = ("cli", "library", "trainer", "lightning")
TRACKER_FILE = "tracker.json"
PREVIEW_CHARS = 240
# What must match for a run of your own loop to be resumed: anything else mixes runs.
RESUME_KEYS = ("format", "kind", "inrun_version", "tracker_config", "model_fingerprint")


@dataclass
class Examples:
    """What the report shows of each training example (``examples.parquet``)."""

    ids: list
    sources: list[str | None]
    locations: list[str]
    previews: list[str]
    lengths: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """SHA-256 of ids and sources: a resumed run must describe the same examples."""
        return hashlib.sha256(json.dumps([[i, s] for i, s in zip(self.ids, self.sources)]).encode()).hexdigest()

    def columns(self) -> tuple[list, list, list, list, list | None]:
        return self.ids, self.sources, self.locations, self.previews, self.lengths


def examples_from(
    data: Any,
    *,
    id_column: str = "id",
    source_column: str = "source",
    text_columns: Sequence[str] = ("preview", "text"),
    location_column: str = "location",
    length_column: str = "length",
) -> Examples | None:
    """Describe the training examples for the report, from a table with an id column.

    Args:
        data: ``None``; a ``pandas.DataFrame``, a ``datasets.Dataset`` or a mapping of columns
            (``{"id": [...], "source": [...], "text": [...]}``); or a plain sequence of ids.
            Columns used when present: the id (required), ``source`` (grouping in the report
            and in ``summary.json``), ``preview`` or else ``text`` (cut to 240 characters),
            ``location`` (where the example comes from), ``length`` (tokens; checked against
            the values, see :func:`inrun.summary.summarize`).

    Raises:
        TypeError: ids that are not ``int``/``str``, or a table without the id column.
        ValueError: an id that appears twice.
    """
    if data is None:
        return None
    if isinstance(data, (list, tuple)) or (hasattr(data, "tolist") and not hasattr(data, "columns")):
        ids = check_ids(data)
        return _examples(ids, {}, id_column)
    names = _column_names(data)
    if id_column not in names:
        raise TypeError(
            f"the examples table has no {id_column!r} column (it has {sorted(names)[:12]}); give "
            "every training example an id column, or name it with id_column="
        )

    def column(name: str) -> list | None:
        return list(data[name]) if name in names else None

    cols = {
        "source": column(source_column),
        "preview": next((column(c) for c in text_columns if c in names), None),
        "location": column(location_column),
        "length": column(length_column),
    }
    return _examples(check_ids(column(id_column)), cols, id_column)


def _column_names(data: Any) -> set[str]:
    if hasattr(data, "column_names"):  # datasets.Dataset
        return set(data.column_names)
    if hasattr(data, "columns"):  # pandas.DataFrame
        return {str(c) for c in data.columns}
    if isinstance(data, Mapping):
        return set(data)
    raise TypeError(
        f"examples must be a table (pandas.DataFrame, datasets.Dataset, a mapping of columns) or a "
        f"sequence of ids, got {type(data).__name__}"
    )


def _examples(ids: list, cols: Mapping[str, list | None], id_column: str) -> Examples:
    seen: set = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"example id {i!r} appears more than once in the examples table; ids must be unique")
        seen.add(i)
    n = len(ids)

    def text(values: list | None, default: str = "") -> list[str]:
        if values is None:
            return [default] * n
        out = []
        for v in values:
            s = "" if v is None else str(v)
            out.append(s if len(s) <= PREVIEW_CHARS else s[: PREVIEW_CHARS - 1] + "…")
        return out

    sources = cols.get("source")
    lengths = cols.get("length")
    return Examples(
        ids=ids,
        sources=[None if s is None else str(s) for s in sources] if sources is not None else [None] * n,
        locations=text(cols.get("location")),
        previews=text(cols.get("preview")),
        lengths=[None if x is None else int(x) for x in lengths] if lengths is not None else None,
    )


def tracker_info(tracker: InRunShapley) -> dict[str, Any]:
    """What ``tracker.json`` holds: settings, the route of every parameter, the valued modules."""
    engine = tracker._engine
    coverage = tracker.coverage()
    route_of = {p: r for r, names in coverage.routes.items() for p in names}
    modules = []
    for e in engine.entries:
        names = [engine.table.names[i] for i in e.param_index]
        try:
            d_in, d_out = e.handler.feature_sizes(e.module)
        except Exception:  # a handler without fixed feature sizes (the fallback)
            d_in, d_out = 0, 0
        modules.append({
            "name": e.name or type(e.module).__name__, "type": type(e.module).__name__,
            "route": "+".join(sorted({route_of.get(n, "not reached yet") for n in names})),
            "params": list(e.paths), "numel": int(sum(engine.table.params[i].numel() for i in e.param_index)),
            "d_in": int(d_in), "d_out": int(d_out),
        })
    unique = {id(p): p for p in tracker.module.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    element = next((p.element_size() for p in unique.values() if p.requires_grad), 4)
    return {
        "step_count": tracker.step_count,
        "config": asdict(tracker.config),
        "optimizer": type(tracker.optimizer).__name__,
        "rule": type(tracker.rule).__name__,
        "keeps_factors": bool(tracker.value_rule.keeps_factors),
        "world_size": tracker.world_size,
        "coverage": {"routes": coverage.routes, "numel": coverage.numel},
        "modules": modules,
        "parameters": {"total": int(total), "trainable": int(trainable), "frozen": int(total - trainable),
                       "element_size": int(element), "tensors": sum(1 for p in unique.values() if p.requires_grad)},
        "cost": tracker.cost().as_dict(),
    }


class RunWriter:
    """A run directory written from your own training loop (see the module docstring).

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
        tracker: InRunShapley,
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
        self.rd = RunDir(path)
        self.tracker = tracker
        self.kind = kind
        self.examples = examples if isinstance(examples, Examples) or examples is None else examples_from(examples)
        self.state_objects = dict(state) if state is not None else {"model": tracker.module, "optimizer": tracker.optimizer}
        self.keep = keep
        self.total_steps = total_steps
        self.evaluate = evaluate
        self.rng = rng
        self.extra: dict[str, Any] = {}
        self.info: dict[str, Any] = {}  # more facts for tracker.json (the integrations' settings)
        self.start_step = 0
        self._external = restored
        self._at_step = at_step
        self.resumed = False
        self._rows: dict[int, list[float]] = {}  # step -> [train_loss, lr, val_loss]
        self._t0 = time.perf_counter()
        self._finished = False
        self._lock = None
        resuming = resume is True or (resume == "auto" and self.rd.exists)
        if resume is True and not self.rd.exists:
            raise RunDirError(f"cannot resume {self.rd.path}: it holds no run (no run.json); start a new one with resume=False")
        self._lock = self.rd.lock()
        try:
            if resuming:
                self._resume(metadata)
            else:
                self._create(description, metadata)
        except BaseException:
            self._lock.release()
            self._lock = None
            raise

    # -- opening ------------------------------------------------------------------------------------
    def _meta(self, description: str, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        from . import __version__
        from .models import model_fingerprint

        t = self.tracker
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

    def _create(self, description: str, metadata: Mapping[str, Any] | None) -> None:
        rd = self.rd
        if rd.exists:
            raise RunDirError(
                f"{rd.path} already holds a run. Continue it with RunWriter(..., resume=True), or "
                "choose another directory"
            )
        if rd.checkpoints() or rd.trace_store.exists():
            raise RunDirError(f"{rd.path} holds checkpoints or a trace but no run.json; choose another directory, or delete it")
        meta = self._meta(description, metadata)
        ledger = self.tracker.ledger
        if ledger.keep_trace and ledger.trace_dir is None and not ledger.trace_part_names():
            ledger.trace_dir = rd.trace_store  # trace parts are written once, then linked
            rd.trace_store.mkdir(parents=True, exist_ok=True)
        self._describe_sources(ledger)
        rd.create_run(meta, self.examples.columns() if self.examples is not None else None)
        self.start_step = self.tracker.step_count
        if self._external is not None:
            self._rows = _rows_of(self._external)
        if self.evaluate and self.start_step == 0:
            self.log(val_loss=self._validation_loss(), step=0)
        rd.write_status("running", self.start_step, self.total_steps or 0)

    def _describe_sources(self, ledger: ValueLedger) -> None:
        if self.examples is not None:
            sources = {i: s for i, s in zip(self.examples.ids, self.examples.sources) if s is not None}
            if sources:
                ledger.set_sources(sources)

    def _resume(self, metadata: Mapping[str, Any] | None) -> None:
        rd = self.rd
        saved = rd.meta()
        if saved.get("kind", "cli") == "cli":
            raise RunDirError(f"{rd.path} is a run of `inrun train`; continue it with `inrun train --resume {rd.path}`")
        expected = self._meta("", metadata)
        problems = [
            f"{key} was {_short(saved.get(key))}, now {_short(expected.get(key))}"
            for key in RESUME_KEYS if saved.get(key) != expected.get(key)
        ]
        if saved.get("examples_hash") and expected["examples_hash"] and saved["examples_hash"] != expected["examples_hash"]:
            problems.append("the examples (ids or sources) changed")
        if problems:
            raise RunDirError(
                f"cannot resume {rd.path}: " + "; ".join(problems) + ". Resuming would mix values of "
                "different runs: resume with the same tracker settings, model and examples, or start "
                "a new run in another directory."
            )
        rd.clean_temporary()
        if self._external is not None:  # the loop restored the tracker from its own checkpoint
            self.resumed = True
            self._rows = {s: r for s, r in _rows_of(self._external).items() if s <= self.tracker.step_count}
            self.start_step = self.tracker.step_count
            self.rd.save_results(self.tracker.ledger, self._metrics(), prune_trace=True, audit=self.tracker.audit)
            rd.write_status("running", self.start_step, self.total_steps or 0)
            return
        restored = rd.restore(torch.device("cpu"), max_step=self._at_step, values=True)
        if self._at_step is not None and restored.step != self._at_step:
            raise RunDirError(
                f"cannot resume {rd.path} at step {self._at_step}: it has no intact checkpoint of that step "
                f"(the newest before it is step {restored.step}), so its values cannot be restored exactly. "
                "Resume from the checkpoint of a step it has, or start a new run in another directory"
            )
        if self._at_step is not None:
            rd.discard_checkpoints_after(self._at_step)
        for name, why in restored.skipped:
            logger.warning("skipped damaged checkpoint %s (%s); it was moved aside as damaged-%s", name, why, name)
        self.resumed = True
        if restored.state is None:  # killed before the first checkpoint: the run starts again
            self._rows = {}
            self._describe_sources(self.tracker.ledger)
            if self.tracker.ledger.keep_trace and self.tracker.ledger.trace_dir is None:
                self.tracker.ledger.trace_dir = rd.trace_store
            rd.save_results(None, Metrics(), prune_trace=True, audit=self.tracker.audit)
            self.start_step = 0
            if self.evaluate:
                self.log(val_loss=self._validation_loss(), step=0)
        else:
            self._restore(restored)
        rd.write_status("running", self.start_step, self.total_steps or 0)

    def _restore(self, restored: Any) -> None:
        state = restored.state
        missing = sorted(set(self.state_objects) - set(state.get("objects", {})))
        if missing:
            raise RunDirError(f"{restored.path} has no saved state for {missing}; checkpoint them with state={{...}}")
        for name, obj in self.state_objects.items():
            obj.load_state_dict(state["objects"][name])
        self.tracker.load_state_dict(state["tracker"], restored.ledger)
        rng = state.get("rng")
        if self.rng and rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.extra = dict(state.get("extra") or {})
        self._rows = _rows_of(restored.metrics)
        self.start_step = int(state["step"])
        self.rd.save_results(restored.ledger, self._metrics(), prune_trace=True, audit=self.tracker.audit)
        logger.info("resuming %s from step %d", self.rd.path, self.start_step)

    # -- while training -------------------------------------------------------------------------------
    def log(self, train_loss: float | None = None, *, val_loss: float | None = None, step: int | None = None,
            lr: float | None = None) -> None:
        """Record the loss of a step for the report's curves (call it after ``optimizer.step()``).

        Args:
            train_loss: the step's training loss (a number or a 0-d tensor).
            val_loss: a validation loss measured at the parameters after ``step`` steps.
            step: steps done (default: the tracker's step count, i.e. after the last optimizer step).
            lr: the step's learning rate (default: the first parameter group's, now).
        """
        step = self.tracker.step_count if step is None else int(step)
        row = self._rows.get(step)
        if row is None:
            rate = lr if lr is not None else float(self.tracker.optimizer.param_groups[0]["lr"])
            row = self._rows[step] = [math.nan, float(rate), math.nan]
        if train_loss is not None:
            row[0] = float(train_loss)
        if val_loss is not None:
            row[2] = float(val_loss)

    def checkpoint(self, extra: Mapping[str, Any] | None = None, ledger: ValueLedger | None = None) -> Path:
        """Everything needed to continue after the steps done so far, written atomically.

        Args:
            extra: plain data (numbers, strings, tensors, lists and dicts of them) restored as
                :attr:`extra` on resume: an epoch counter, a sampler's position.
            ledger: the ledger to save (default ``tracker.ledger``; under DDP the integrations
                pass the merged one).
        """
        t = self.tracker
        state = {
            "format": RUN_FORMAT,
            "step": t.step_count,
            "tracker": t.state_dict(),  # completes a pending order-2 step first
            "objects": {name: obj.state_dict() for name, obj in self.state_objects.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            } if self.rng else None,
            "extra": dict(extra or {}),
        }
        ledger = ledger if ledger is not None else t.ledger
        step = t.step_count
        self._evaluate_at(step)
        ledger.commit()
        keep = self.keep if self.keep is not None else 1 << 30
        path = self.rd.write_checkpoint(step, state, ledger, self._metrics(ledger), keep)
        self.rd.save_results(ledger, self._metrics(ledger), audit=self.tracker.audit)
        self._write_tracker()
        self.rd.write_status("running", step, self.total_steps or 0)
        return path

    def save(self, ledger: ValueLedger | None = None) -> None:
        """The values and curves so far at the top of the run directory (no checkpoint): what
        ``inrun report`` reads. Between optimizer steps only."""
        ledger = ledger if ledger is not None else self.tracker.ledger
        self._evaluate_at(self.tracker.step_count)
        ledger.commit()
        self.rd.save_results(ledger, self._metrics(ledger), audit=self.tracker.audit)
        self._write_tracker()
        self.rd.write_status("running", self.tracker.step_count, self.total_steps or 0)

    def metrics(self) -> Metrics:
        """The curves recorded so far (as ``metrics.parquet`` holds them)."""
        return self._metrics()

    def _evaluate_at(self, step: int) -> None:
        if self.evaluate and not math.isfinite(self._rows.get(step, [0, 0, math.nan])[2]):
            self.log(val_loss=self._validation_loss(), step=step)

    def _validation_loss(self) -> float:
        """``tracker.val_loss`` at the current parameters: no gradient, validation mode, own RNG."""
        t = self.tracker
        devices = sorted({p.device.index or 0 for p in t.module.parameters() if p.device.type == "cuda"})
        with evaluating(t.module, t.config.val_mode == "eval"), torch.no_grad(), torch.random.fork_rng(devices=devices):
            loss = t.val_loss(t.module)
        return float(loss.detach().double().sum()) if isinstance(loss, torch.Tensor) else float(loss)

    def _metrics(self, ledger: ValueLedger | None = None) -> Metrics:
        ledger = ledger if ledger is not None else self.tracker.ledger
        skipped = {int(s["step"]) + 1 for s in ledger.skipped}
        m = Metrics()
        for step in sorted(self._rows):
            train_loss, lr, val_loss = self._rows[step]
            m.append(step, train_loss, lr, val_loss, step in skipped)
        return m

    def _write_tracker(self) -> None:
        write_json(self.rd.file(TRACKER_FILE), {**tracker_info(self.tracker), **self.info}, fsync=False)

    # -- the end --------------------------------------------------------------------------------------
    def finish(self, checkpoint: bool = True, ledger: ValueLedger | None = None) -> RunDir:
        """Complete the run: final values and curves, ``summary.json``, status ``complete``, and
        (with ``checkpoint``) a last checkpoint, so that a longer run can resume from it."""
        from .summary import write_summary

        if self._finished:
            return self.rd
        try:
            t = self.tracker
            t.flush()
            if checkpoint:
                self.checkpoint(ledger=ledger)
            ledger = ledger if ledger is not None else t.ledger
            self._evaluate_at(t.step_count)
            ledger.commit()
            self.rd.save_results(ledger, self._metrics(ledger), audit=self.tracker.audit)
            self._write_tracker()
            self.rd.write_status("complete", t.step_count, self.total_steps or t.step_count,
                                 seconds=time.perf_counter() - self._t0)
            write_summary(self.rd)
        finally:
            self._finished = True
            self._release()
        return self.rd

    def fail(self, exc: BaseException, ledger: ValueLedger | None = None) -> None:
        """End the run as ``failed`` (or ``interrupted`` for Ctrl-C), values of the steps done saved."""
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        step = self.tracker.step_count
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        try:
            ledger = ledger if ledger is not None else self.tracker.ledger
            if not self.tracker._engine.mid_step():
                self.tracker.flush()
            ledger.commit()
            self.rd.save_results(ledger, self._metrics(ledger), audit=self.tracker.audit)
        except Exception as again:  # the error that ended the run is what the caller sees
            logger.warning("could not save the values after the failure: %s", again)
        try:
            self.rd.write_status(state, step, self.total_steps or 0,
                                 f"{state} at step {step}: {cause}. Resume from your loop with RunWriter(..., resume=True).")
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


def _rows_of(metrics: Metrics) -> dict[int, list[float]]:
    return {int(s): [float(a), float(lr), float(v)] for s, a, lr, v in
            zip(metrics.step, metrics.train_loss, metrics.lr, metrics.val_loss)}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:119] + "…"
