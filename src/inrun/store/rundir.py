"""The run directory: values, trace, metrics, metadata and checkpoints of one run, on disk.

Layout (every file written atomically: to a temporary name, flushed to disk, then renamed)::

    run.json           metadata, validated when the run is resumed or reopened: format,
                       library version, config, model fingerprint, training and validation hashes
    config.toml        the config (edit and rerun it; a resume checks it against run.json)
    status.json        running | complete | stopped | interrupted | failed, step, message
    examples.parquet   training examples: id, source, location, preview (for reports)
    values.parquet     id, value, first_order, second_order, count, source   (ValueLedger.save)
    trace/             part-A-B.parquet: step, lr, id, first_order, second_order of steps A..B
    ledger.json        ledger metadata (steps, skipped steps) and checksums of the ledger files
    metrics.parquet    step, train_loss, lr, val_loss, skipped
    audit.parquet      the audit: one row per audited step; audit_values.parquet: per audited
                       example; audit.json: its settings (inrun.store.auditlog)
    drops.parquet      one row per optimizer step: L(θ_t), L(θ_t + f(0)), L(θ_t+1), data-free
                       part, the step game's utility, Σ values, remainder, efficiency, flags
    carried.parquet    carry="momentum": id, carried value, steps (inrun.store.drops)
    manifest.json      SHA-256 and size of ledger.json, metrics.parquet, examples.parquet, the
                       audit's files, drops.parquet and carried.parquet
    summary.json       totals, top and bottom examples, per-source table (end of run)
    checkpoints/step-000100/   state.pt (model, optimizer, schedule, RNG, data position; loaded
                               with torch.load(weights_only=True)), ledger/, metrics.parquet,
                               manifest.json (SHA-256 and size of each)

**Integrity.** Every JSON file carries the checksum of its own content; every other file is
listed with its SHA-256 in a manifest, and every reader (``inrun report``, ``curate``,
``ValueLedger.load``, a resume) verifies what it reads, so a damaged or missing file is an
error that names it, never different values. A checkpoint is written into a hidden temporary
directory and renamed into place, so a ``kill -9`` at any moment leaves either the previous
checkpoint or the new one, never half of one. Values are stored as Parquet numbers, never
pickled. Trace parts are written once and hard-linked into each checkpoint's ``ledger/trace``.

**One writer.** A training or resumed run holds an exclusive lock (``flock`` on ``.lock``) for
its whole life; a second one is refused at once with who holds it. The kernel releases the lock
when its process dies, ``kill -9`` included, so a lock is never stale. Readers wait on a
second, short lock (``.results.lock``) while the top-level results are being replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import LedgerError, RunDirError, RunInUseError, one_line
from ..files import (
    DirLock,
    IntegrityError,
    LockedError,
    atomic_write,
    describe_holder,
    exclusive_lock,
    file_digest,
    is_locked,
    json_text,
    read_json,
    shared_lock,
    verify_file,
    write_json,
)
from .auditlog import AUDIT_FILE, AUDIT_FILES, load_audit, save_audit
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_STATE,
    CHECKPOINTS,
    DAMAGED_PREFIX,
    RUN_FORMAT,
    Checkpoints,
    Restored,
)
from .drops import CARRIED_FILE, DROPS_FILE, load_carried, load_drops, save_carried, save_drops
from .ledger import LEDGER_META_FILE, TRACE_DIR, VALUES_FILE, ValueLedger
from .metrics import METRICS_FILE, Metrics, read_parquet

logger = logging.getLogger(__name__)

__all__ = [  # what readers import from here; checkpoints and curves live in their own modules
    "CHECKPOINTS", "CHECKPOINT_FORMAT", "CHECKPOINT_STATE", "DAMAGED_PREFIX", "METRICS_FILE", "RUN_FORMAT",
    "Checkpoints", "Metrics", "Restored", "RunDir", "RunDirError", "RunInUseError", "config_diff",
    "model_fingerprint",
]

READABLE_FORMATS = (1, 2)  # format 1: before checksums (read unverified, never resumed)
META_FILE = "run.json"
CONFIG_FILE = "config.toml"
STATUS_FILE = "status.json"
EXAMPLES_FILE = "examples.parquet"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
LOCK_FILE = ".lock"
RESULTS_LOCK_FILE = ".results.lock"
# Metadata that must match for a run to be resumed: anything else means different values.
CHECKED_KEYS = ("format", "inrun_version", "config", "model_fingerprint", "train_hash", "validation_hash")


def _resume_hint(path: Path) -> str:
    return f"`inrun train --resume {path}` rewrites the results from the newest intact checkpoint"


class RunDir:
    """One run's directory (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._examples_digest: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exists(self) -> bool:
        return self.file(META_FILE).exists()

    @property
    def trace_store(self) -> Path:
        return self.file(TRACE_DIR)

    # -- locking -------------------------------------------------------------------------------
    def lock(self) -> DirLock:
        """The exclusive lock of a writer (use as a context manager; creates the directory).

        Raises:
            RunInUseError: another process holds it (the message says which).
            RunDirError: the directory cannot be created or written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"{self.path} exists and is not a directory; choose another output directory") from None
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {self.path}: {exc.strerror or exc}") from None
        lock = DirLock(self.file(LOCK_FILE), f"run directory {self.path}")
        try:
            return lock.acquire()
        except LockedError as exc:
            raise RunInUseError(str(exc), exc.holder) from None
        except OSError as exc:
            raise RunDirError(
                f"cannot lock {self.path} ({exc.strerror or exc}): a run directory must be writable to train in it"
            ) from None

    def holder(self) -> dict[str, Any] | None:
        """Who trains in this directory now (pid, host, since, command), or ``None``."""
        return is_locked(self.file(LOCK_FILE))

    def refuse_if_in_use(self, doing: str) -> None:
        holder = self.holder()
        if holder is not None:
            raise RunInUseError(f"cannot {doing} {self.path}: it is in use by {describe_holder(holder)}", holder)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the readers' lock: the top-level results are not replaced meanwhile."""
        with shared_lock(self.file(RESULTS_LOCK_FILE)):
            yield

    # -- metadata ------------------------------------------------------------------------------
    def create(self, meta: Mapping[str, Any], examples: tuple[list, list, list, list, Any] | None = None,
               config_toml: str | None = None) -> None:
        """Start a new run here (the caller holds :meth:`lock`): ``config.toml`` (a run of
        ``inrun train``) and ``examples.parquet`` when given, then ``run.json``, last: until it is
        there, a failure leaves a directory that a new run may use again."""
        if self.exists:
            raise RunDirError(f"{self.path} already holds a run")
        if config_toml is not None:
            atomic_write(self.file(CONFIG_FILE), lambda p: Path(p).write_text(config_toml, encoding="utf-8"))
        if examples is not None:
            self.write_examples(*examples)
        write_json(self.file(META_FILE), meta)

    def meta(self) -> dict[str, Any]:
        """The run's metadata (``run.json``), its checksum verified."""
        path = self.file(META_FILE)
        if not path.exists():
            if not self.path.exists():
                raise RunDirError(f"{self.path} is not a run directory (it does not exist)")
            raise RunDirError(f"{self.path} is not a run directory (no {META_FILE})")
        meta = read_json(path, "the run's metadata", require_checksum=False)
        fmt = meta.get("format")
        if fmt not in READABLE_FORMATS:
            raise RunDirError(f"{path}: unknown run format {fmt!r} (this inrun reads {RUN_FORMAT})")
        if fmt != 1:
            meta = read_json(path, "the run's metadata")
        return meta

    @property
    def kind(self) -> str:
        """Who wrote the run: ``"cli"`` (``inrun train``), ``"library"`` (:class:`inrun.RunWriter`
        in your own loop), ``"trainer"`` (``InRunTrainer``) or ``"lightning"``."""
        return str(self.meta().get("kind", "cli"))

    @property
    def rerunnable(self) -> bool:
        """Whether inrun can run this run again (``inrun train --resume``, ``curate --retrain``)."""
        return self.kind == "cli"

    @property
    def legacy(self) -> bool:
        """Written by an inrun before checksums (format 1): readable, not verified."""
        return self.meta().get("format") == 1

    def check_meta(self, expected: Mapping[str, Any], keys: tuple[str, ...] = CHECKED_KEYS,
                   same: str = "config, data and inrun version") -> None:
        """Refuse to resume unless the saved metadata matches what this run would produce in
        ``keys`` (``inrun train``'s by default; a library run checks its tracker, model and
        examples); ``same`` says what a resume must keep."""
        saved = self.meta()
        if saved.get("format") == 1:
            raise RunDirError(
                f"cannot resume {self.path}: it was written by an older inrun without checksums "
                f"(format 1); resume it with that version, or start a new run"
            )
        problems = []
        for key in keys:
            if saved.get(key) == expected.get(key):
                continue
            if key == "config":
                differ = config_diff(saved.get("config", {}), expected.get("config", {}))
                problems.append(f"config differs in {', '.join(differ)}")
            elif key in ("train_hash", "validation_hash"):
                which = "training" if key == "train_hash" else "validation"
                problems.append(f"the {which} data changed ({key} {str(saved.get(key, ''))[:12]} -> {str(expected.get(key, ''))[:12]})")
            else:
                problems.append(f"{key} was {_short(saved.get(key))}, now {_short(expected.get(key))}")
        if saved.get("examples_hash") and expected.get("examples_hash") and saved["examples_hash"] != expected["examples_hash"]:
            problems.append("the examples (ids or sources) changed")
        if problems:
            raise RunDirError(
                f"cannot resume {self.path}: " + "; ".join(problems) + ". Resuming would mix values "
                f"of different runs: resume with the same {same}, or start a new run in another directory."
            )
        if saved.get("torch_version") != expected.get("torch_version"):
            logger.warning(
                "resuming a run started with torch %s under torch %s: values may differ in the "
                "last bits from an uninterrupted run", saved.get("torch_version"), expected.get("torch_version"),
            )

    def write_status(self, state: str, step: int, steps: int, message: str = "", **extra: Any) -> None:
        """``status.json``; on a full disk it is rewritten in place, so the state still says
        what happened (the file is small, and its blocks are its own)."""
        status = {"state": state, "step": step, "steps": steps, "message": message, "updated": time.time(), **extra}
        try:
            write_json(self.file(STATUS_FILE), status, fsync=False)  # informational, rewritten often
        except OSError:
            text = json_text(status)
            fd = os.open(self.file(STATUS_FILE), os.O_WRONLY | os.O_CREAT, 0o666)
            try:
                os.pwrite(fd, text.encode(), 0)
                os.ftruncate(fd, len(text.encode()))
                os.fsync(fd)
            finally:
                os.close(fd)

    def status(self) -> dict[str, Any]:
        """``status.json``; ``{"state": "unknown", ...}`` when it is missing or damaged."""
        path = self.file(STATUS_FILE)
        if not path.exists():
            return {"state": "unknown"}
        try:
            status = read_json(path, "the run's status", require_checksum=not self._is_legacy_quiet())
        except IntegrityError as exc:
            return {"state": "unknown", "message": str(exc), "damaged": True}
        if status.get("state") == "running" and self.holder() is None:
            # Nobody holds the lock: the process that wrote "running" is gone (kill -9, power).
            status["stale"] = True
            how = (f"`inrun train --resume {self.path}`" if self._kind_quiet() == "cli"
                   else "your loop, opening it with resume=True")
            status["message"] = f"no process is training in it (it was killed); continue with {how}"
        return status

    def _kind_quiet(self) -> str:
        try:
            return self.kind
        except LedgerError:
            return "cli"

    def _is_legacy_quiet(self) -> bool:
        try:
            return self.legacy
        except LedgerError:
            return False

    # -- results -------------------------------------------------------------------------------
    def write_examples(
        self, ids: list, sources: list, locations: list, previews: list, lengths: list | None = None
    ) -> None:
        """``examples.parquet``; ``lengths`` (tokens per example, for the length check of
        :func:`inrun.store.summary.summarize`) adds a ``length`` column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        id_type = pa.string() if ids and isinstance(ids[0], str) else pa.int64()
        columns = {
            "id": pa.array(list(ids), type=id_type),
            "source": pa.array(sources, type=pa.string()),
            "location": pa.array(locations, type=pa.string()),
            "preview": pa.array(previews, type=pa.string()),
        }
        if lengths is not None:
            columns["length"] = pa.array(lengths, type=pa.int64())
        table = pa.table(columns)
        atomic_write(self.file(EXAMPLES_FILE), lambda p: pq.write_table(table, p))
        self._examples_digest = file_digest(self.file(EXAMPLES_FILE))

    def save_results(
        self, ledger: ValueLedger | None, metrics: Metrics, prune_trace: bool = False, audit: Any = None,
        drops: Any = None, carried: Any = None,
    ) -> None:
        """Values (if any) and curves at the top of the run directory, then the manifest that
        lists them; readers wait meanwhile (:meth:`reading`). Atomic but not synced to disk:
        they are copies of the newest checkpoint's, which is, and a resume rewrites them if a
        crash lost them (a reader meanwhile is refused by their checksums, never misled).

        Args:
            prune_trace: first remove the trace parts ``ledger`` does not list (after a restore:
                rows of steps past its checkpoint, which the resumed run writes again).
            audit: the tracker's audit (:class:`inrun.tracking.audit.StepAudit`), if any: its
                rows are written and listed too.
            drops: the tracker's drop rows (:meth:`inrun.InRunShapley.drops`), if any; and
            carried: its carried table (``carry="momentum"``), if any: written and listed too.
        """
        with exclusive_lock(self.file(RESULTS_LOCK_FILE)):
            if prune_trace:
                self._prune_trace(ledger)
            files: dict[str, Any] = {}
            if ledger is not None:
                ledger.save(self.path, fsync=False)
                files[LEDGER_META_FILE] = file_digest(self.file(LEDGER_META_FILE))
            metrics.save(self.file(METRICS_FILE), fsync=False)
            files[METRICS_FILE] = file_digest(self.file(METRICS_FILE))
            if self._examples_digest is None and self.file(EXAMPLES_FILE).exists():
                self._examples_digest = file_digest(self.file(EXAMPLES_FILE))
            if self._examples_digest is not None:
                files[EXAMPLES_FILE] = self._examples_digest
            if audit is not None:
                save_audit(self.path, audit, fsync=False)
                files.update({name: file_digest(self.file(name)) for name in AUDIT_FILES})
            if drops is not None:
                files[DROPS_FILE] = file_digest(save_drops(self.path, drops, fsync=False))
            if carried is not None:
                files[CARRIED_FILE] = file_digest(save_carried(self.path, carried, fsync=False))
            steps = metrics.step[-1] if metrics.step else 0
            write_json(self.file(MANIFEST_FILE), {"format": RUN_FORMAT, "step": steps, "files": files}, fsync=False)

    def heal_examples(self, ids: list, sources: list, locations: list, previews: list, lengths: list | None = None) -> bool:
        """Rewrite ``examples.parquet`` from the data unless it matches the manifest; ``True``
        when it was rewritten."""
        try:
            digest = self._manifest()["files"].get(EXAMPLES_FILE)
            if digest is not None:
                verify_file(self.file(EXAMPLES_FILE), digest, "the training examples")
                self._examples_digest = dict(digest)
                return False
        except (IntegrityError, KeyError, TypeError, AttributeError):
            pass
        self.write_examples(ids, sources, locations, previews, lengths)
        return True

    def _manifest(self) -> dict[str, Any]:
        data = read_json(self.file(MANIFEST_FILE), "the list of the run's result files")
        if not isinstance(data.get("files"), dict):
            raise IntegrityError(f"{self.file(MANIFEST_FILE)} is damaged: no file list")
        return data

    def _verified(self, name: str) -> Path:
        """``name`` checked against the manifest (format 1 runs: unchecked)."""
        path = self.file(name)
        if self.legacy:
            return path
        try:
            digest = self._manifest()["files"].get(name)
            if digest is None:
                raise IntegrityError(f"{path} is not listed in {self.file(MANIFEST_FILE)}")
            verify_file(path, digest, f"listed in {MANIFEST_FILE}")
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; {_resume_hint(self.path)}") from None
        return path

    def has_values(self) -> bool:
        if self.legacy:
            return self.file(VALUES_FILE).exists()
        try:
            return LEDGER_META_FILE in self._manifest()["files"]
        except IntegrityError:
            return self.file(VALUES_FILE).exists() or self.file(LEDGER_META_FILE).exists()

    def ledger(self) -> ValueLedger:
        """The saved values (``values.parquet`` and friends), verified."""
        with self.reading():
            self.meta()
            if not self.has_values():
                raise RunDirError(
                    f"{self.path} has no values ({VALUES_FILE}); it was run with values.enabled = false "
                    "or has not reached its first checkpoint"
                )
            self._verified(LEDGER_META_FILE)
            try:
                return ValueLedger.load(self.path)
            except IntegrityError as exc:
                raise IntegrityError(f"{exc}; {_resume_hint(self.path)}") from None

    def audit(self) -> Any:
        """The run's audit (:class:`inrun.store.auditlog.AuditLog`), verified; ``None`` if it had none."""
        with self.reading():
            if self.legacy:
                return load_audit(self.path)
            try:
                listed = AUDIT_FILE in self._manifest()["files"]
            except IntegrityError:
                if not self.file(AUDIT_FILE).exists():
                    return None
                raise
            if not listed:
                if self.file(AUDIT_FILE).exists():
                    raise IntegrityError(f"{self.file(AUDIT_FILE)} is not listed in {self.file(MANIFEST_FILE)}; {_resume_hint(self.path)}")
                return None
            for name in AUDIT_FILES:
                self._verified(name)
            return load_audit(self.path)

    def drops(self) -> list[dict[str, Any]] | None:
        """Each step's drop rows (:mod:`inrun.store.drops`), verified; ``None`` for a run without them."""
        path = self._listed(DROPS_FILE)
        return None if path is None else load_drops(path)

    def carried(self) -> Any:
        """The carried values (``pandas.DataFrame``: id, carried, steps), verified; ``None`` without carry."""
        path = self._listed(CARRIED_FILE)
        return None if path is None else load_carried(path)

    def _listed(self, name: str) -> Path | None:
        """An optional result file, verified against the manifest; ``None`` when the run has none."""
        with self.reading():
            if self.legacy:
                return self.file(name) if self.file(name).exists() else None
            try:
                listed = name in self._manifest()["files"]
            except IntegrityError:
                if not self.file(name).exists():
                    return None
                raise
            if not listed:
                if self.file(name).exists():
                    raise IntegrityError(f"{self.file(name)} is not listed in {self.file(MANIFEST_FILE)}; {_resume_hint(self.path)}")
                return None
            return self._verified(name)

    def metrics(self) -> Metrics:
        with self.reading():
            if not self.legacy and not self.file(MANIFEST_FILE).exists() and not self.file(METRICS_FILE).exists():
                return Metrics()  # killed before its first checkpoint: no curves yet
            path = self._verified(METRICS_FILE)
            return Metrics.load(path) if path.exists() else Metrics()

    def examples(self) -> Any:
        """``pandas.DataFrame`` of the training examples (id, source, location, preview)."""
        import pandas as pd

        with self.reading():
            if not self.legacy and not self.file(MANIFEST_FILE).exists():
                path = self.file(EXAMPLES_FILE)
            elif (not self.legacy and not self.file(EXAMPLES_FILE).exists()
                  and EXAMPLES_FILE not in self._manifest()["files"]):
                path = self.file(EXAMPLES_FILE)  # a run of another loop whose examples were not described
            else:
                path = self._verified(EXAMPLES_FILE)
            if not path.exists():
                return pd.DataFrame({"id": [], "source": [], "location": [], "preview": []})
            return read_parquet(path).to_pandas()

    # -- checkpoints (store/checkpoints.py) -------------------------------------------------------
    @property
    def checkpoint_store(self) -> Checkpoints:
        return Checkpoints(self.file(CHECKPOINTS), self.path)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Checkpoints, oldest first (a temporary, unfinished one is never listed)."""
        return self.checkpoint_store.listed()

    def write_checkpoint(
        self, step: int, state: Mapping[str, Any], ledger: ValueLedger | None, metrics: Metrics, keep: int
    ) -> Path:
        """Write everything needed to continue after ``step`` steps, atomically, then prune."""
        return self.checkpoint_store.write(step, state, ledger, metrics, keep)

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint's manifest, after checking it and every file it lists."""
        return self.checkpoint_store.verify(path)

    def load_checkpoint(
        self, path: Path, device: torch.device, trace_dir: Path | None = None
    ) -> tuple[dict[str, Any], ValueLedger | None, Metrics]:
        """``(state, ledger, metrics)`` of a checkpoint, every file verified first."""
        return self.checkpoint_store.load(path, device, trace_dir)

    def restore(self, device: torch.device, max_step: int | None = None, values: bool = True) -> Restored:
        """The newest intact checkpoint (at most ``max_step``): :meth:`Checkpoints.restore`."""
        return self.checkpoint_store.restore(device, max_step, trace_dir=self.trace_store if values else None)

    def discard_checkpoints_after(self, step: int) -> None:
        self.checkpoint_store.discard_after(step)

    def _prune_trace(self, ledger: ValueLedger | None) -> None:
        store = self.trace_store
        if not store.is_dir():
            return
        keep = set(ledger.trace_part_names()) if ledger is not None else set()
        for part in store.glob("part-*.parquet"):
            if part.name not in keep:
                part.unlink(missing_ok=True)

    def clean_temporary(self) -> None:
        """Remove what a killed writer left behind (unfinished checkpoints, temp files); only
        under :meth:`lock`, so that no live writer's files are touched."""
        self.checkpoint_store.clean()
        for folder in (self.path, self.trace_store):
            for p in folder.glob(".*.tmp") if folder.is_dir() else ():
                p.unlink(missing_ok=True)

    # -- checking everything ------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every problem found in the run directory, one line each (empty: all intact).

        Reads and checks run.json, config.toml against it, status.json, summary.json, the
        top-level results (manifest, ledger with every trace part, metrics, examples) and every
        checkpoint. It changes nothing.
        """
        problems: list[str] = []

        def check(what: str, fn: Any) -> Any:
            try:
                return fn()
            except (LedgerError, OSError) as exc:
                problems.append(f"{what}: {exc}")
                return None

        meta = check(META_FILE, self.meta)
        if meta is None:
            return problems
        if self.file(CONFIG_FILE).exists():

            def config_matches() -> None:  # config.toml is the config's TOML form (RunConfig.to_toml)
                try:
                    data = tomllib.loads(self.file(CONFIG_FILE).read_bytes().decode("utf-8"))
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                    raise IntegrityError(f"{self.file(CONFIG_FILE)} cannot be read ({exc})") from None
                if data != meta.get("config"):
                    raise IntegrityError(f"{self.file(CONFIG_FILE)} differs from the config in {META_FILE}")

            check(CONFIG_FILE, config_matches)
        status = self.status()
        if status.get("damaged"):
            problems.append(f"{STATUS_FILE}: {status['message']}")
        if self.file(SUMMARY_FILE).exists():
            check(SUMMARY_FILE, lambda: read_json(self.file(SUMMARY_FILE), "the run's summary"))
        if self.file(MANIFEST_FILE).exists() or meta.get("format") == 1:
            check(METRICS_FILE, self.metrics)
            check(EXAMPLES_FILE, self.examples)
            if self.has_values():
                ledger = check("values", self.ledger)
                if ledger is not None:
                    check("trace", ledger.trace)
            check("audit", self.audit)
        for _, path in self.checkpoints():
            check(f"{CHECKPOINTS}/{path.name}", lambda p=path: self.load_checkpoint(p, torch.device("cpu")))
        return problems


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, sort_keys=True) if not isinstance(value, str) else repr(value)
    return one_line(text, 120)


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(config_diff(va, vb, dotted))
        elif va != vb:
            out.append(dotted)
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the architecture: class, and every parameter's name, shape, dtype, trainability."""
    desc = [type(model).__module__ + "." + type(model).__qualname__]
    for name, p in model.named_parameters():
        desc.append([name, list(p.shape), str(p.dtype), p.requires_grad])
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()
