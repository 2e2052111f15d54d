"""The run directory: values, trace, metrics, metadata and checkpoints of one run, on disk.

Layout (every file written atomically: to a temporary name, then renamed)::

    run.json           metadata, validated when the run is resumed or reopened: format,
                       library version, config, model fingerprint, training and validation hashes
    config.toml        the config (edit and rerun it)
    status.json        running | complete | stopped | interrupted, step, message
    examples.parquet   training examples: id, source, location, preview (for reports)
    values.parquet     id, value, first_order, second_order, count, source   (ValueLedger.save)
    trace.parquet      step, lr, id, first_order, second_order             (per step and example)
    ledger.json        ledger metadata (steps, skipped steps)
    metrics.parquet    step, train_loss, lr, val_loss, skipped
    summary.json       totals, top and bottom examples, per-source table (end of run)
    checkpoints/step-000100/   state.pt (model, optimizer, schedule, RNG, data position; loaded
                               with torch.load(weights_only=True)), ledger/, metrics.parquet

A checkpoint is written into a hidden temporary directory and renamed into place, so a
``kill -9`` at any moment leaves either the previous checkpoint or the new one, never half of
one. Values are stored as Parquet numbers, never pickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LedgerError
from .ledger import VALUES_FILE, ValueLedger, atomic_write

logger = logging.getLogger(__name__)

RUN_FORMAT = 1
META_FILE = "run.json"
CONFIG_FILE = "config.toml"
STATUS_FILE = "status.json"
EXAMPLES_FILE = "examples.parquet"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.pt"
# Metadata that must match for a run to be resumed: anything else means different values.
CHECKED_KEYS = ("format", "inrun_version", "config", "model_fingerprint", "train_hash", "validation_hash")


class RunDirError(LedgerError):
    """A directory is not a run, or does not match the run it is combined with."""


@dataclass
class Metrics:
    """Per-step training curves: one row per step; ``val_loss`` is NaN where not evaluated."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)

    COLUMNS = ("step", "train_loss", "lr", "val_loss", "skipped")

    def append(self, step: int, train_loss: float, lr: float, val_loss: float, skipped: bool) -> None:
        self.step.append(step)
        self.train_loss.append(train_loss)
        self.lr.append(lr)
        self.val_loss.append(val_loss)
        self.skipped.append(skipped)

    def save(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "step": pa.array(self.step, type=pa.int64()),
                "train_loss": pa.array(self.train_loss, type=pa.float64()),
                "lr": pa.array(self.lr, type=pa.float64()),
                "val_loss": pa.array(self.val_loss, type=pa.float64()),
                "skipped": pa.array(self.skipped, type=pa.bool_()),
            }
        )
        atomic_write(path, lambda p: pq.write_table(table, p))

    @classmethod
    def load(cls, path: Path) -> Metrics:
        import pyarrow.parquet as pq

        t = pq.read_table(path).to_pydict()
        return cls(**{c: list(t[c]) for c in cls.COLUMNS})

    def final_val_loss(self) -> float:
        vals = [v for v in self.val_loss if not np.isnan(v)]
        return vals[-1] if vals else float("nan")


class RunDir:
    """One run's directory (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exists(self) -> bool:
        return self.file(META_FILE).exists()

    # -- metadata ------------------------------------------------------------------------------
    def create(self, meta: Mapping[str, Any], config_toml: str) -> None:
        """Start a new run here; refuses a directory that already holds one."""
        if self.exists:
            raise RunDirError(
                f"{self.path} already holds a run. Continue it with `inrun train --resume "
                f"{self.path}`, or choose another output directory (config key 'output')."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.file(CONFIG_FILE), lambda p: Path(p).write_text(config_toml))
        atomic_write(self.file(META_FILE), lambda p: Path(p).write_text(json.dumps(meta, indent=2)))

    def meta(self) -> dict[str, Any]:
        """The run's metadata (``run.json``)."""
        path = self.file(META_FILE)
        if not path.exists():
            raise RunDirError(f"{self.path} is not a run directory (no {META_FILE})")
        meta = json.loads(path.read_text())
        if meta.get("format") != RUN_FORMAT:
            raise RunDirError(f"{path}: unknown run format {meta.get('format')!r} (this inrun reads {RUN_FORMAT})")
        return meta

    def check_meta(self, expected: Mapping[str, Any]) -> None:
        """Refuse to resume unless the saved metadata matches what this run would produce."""
        from .config import config_diff

        saved = self.meta()
        problems = []
        for key in CHECKED_KEYS:
            if saved.get(key) == expected.get(key):
                continue
            if key == "config":
                keys = config_diff(saved.get("config", {}), expected.get("config", {}))
                problems.append(f"config differs in {', '.join(keys)}")
            elif key in ("train_hash", "validation_hash"):
                which = "training" if key == "train_hash" else "validation"
                problems.append(f"the {which} data changed ({key} {saved.get(key, '')[:12]} -> {expected.get(key, '')[:12]})")
            else:
                problems.append(f"{key} was {saved.get(key)!r}, now {expected.get(key)!r}")
        if problems:
            raise RunDirError(
                f"cannot resume {self.path}: " + "; ".join(problems) + ". Resuming would mix values "
                "of different runs. Resume with the same config, data and inrun version, or start "
                "a new run in another directory."
            )
        if saved.get("torch_version") != expected.get("torch_version"):
            logger.warning(
                "resuming a run started with torch %s under torch %s: values may differ in the "
                "last bits from an uninterrupted run", saved.get("torch_version"), expected.get("torch_version"),
            )

    def write_status(self, state: str, step: int, steps: int, message: str = "", **extra: Any) -> None:
        status = {"state": state, "step": step, "steps": steps, "message": message, "updated": time.time(), **extra}
        atomic_write(self.file(STATUS_FILE), lambda p: Path(p).write_text(json.dumps(status, indent=2)))

    def status(self) -> dict[str, Any]:
        path = self.file(STATUS_FILE)
        return json.loads(path.read_text()) if path.exists() else {"state": "unknown"}

    # -- results -------------------------------------------------------------------------------
    def write_examples(self, ids: list, sources: list, locations: list, previews: list) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        id_type = pa.string() if ids and isinstance(ids[0], str) else pa.int64()
        table = pa.table(
            {
                "id": pa.array(list(ids), type=id_type),
                "source": pa.array(sources, type=pa.string()),
                "location": pa.array(locations, type=pa.string()),
                "preview": pa.array(previews, type=pa.string()),
            }
        )
        atomic_write(self.file(EXAMPLES_FILE), lambda p: pq.write_table(table, p))

    def save_results(self, ledger: ValueLedger | None, metrics: Metrics) -> None:
        """Values (if any) and curves at the top of the run directory."""
        if ledger is not None:
            ledger.save(self.path)
        metrics.save(self.file(METRICS_FILE))

    def has_values(self) -> bool:
        return self.file(VALUES_FILE).exists()

    def ledger(self) -> ValueLedger:
        """The saved values (``values.parquet`` and friends)."""
        if not self.has_values():
            raise RunDirError(
                f"{self.path} has no values ({VALUES_FILE}); it was run with values.enabled = false "
                "or has not reached its first checkpoint"
            )
        return ValueLedger.load(self.path)

    def metrics(self) -> Metrics:
        path = self.file(METRICS_FILE)
        return Metrics.load(path) if path.exists() else Metrics()

    def examples(self) -> Any:
        """``pandas.DataFrame`` of the training examples (id, source, location, preview)."""
        import pandas as pd

        path = self.file(EXAMPLES_FILE)
        if not path.exists():
            return pd.DataFrame({"id": [], "source": [], "location": [], "preview": []})
        return pd.read_parquet(path)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a temporary, unfinished one is never listed)."""
        root = self.file(CHECKPOINTS)
        out = []
        if root.exists():
            for p in root.iterdir():
                if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                    out.append((int(p.name[5:]), p))
        return sorted(out)

    def write_checkpoint(
        self, step: int, state: Mapping[str, Any], ledger: ValueLedger | None, metrics: Metrics, keep: int
    ) -> Path:
        """Write everything needed to continue after ``step`` steps, atomically, then prune."""
        root = self.file(CHECKPOINTS)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        atomic_write(tmp / CHECKPOINT_STATE, lambda p: torch.save(dict(state), p))
        if ledger is not None:
            ledger.save(tmp / "ledger")
        metrics.save(tmp / METRICS_FILE)
        manifest = {"step": step, "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())}
        atomic_write(tmp / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest)))
        if final.exists():  # the same step again (a resumed run that had finished): replace it
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in self.checkpoints()[:-keep]:
            _discard(old)
        return final

    def load_checkpoint(self, path: Path, device: torch.device) -> tuple[dict[str, Any], ValueLedger | None, Metrics]:
        """``(state, ledger, metrics)`` of a checkpoint; tensors are loaded with ``weights_only=True``."""
        state = torch.load(path / CHECKPOINT_STATE, map_location=device, weights_only=True)
        ledger = ValueLedger.load(path / "ledger") if (path / "ledger").exists() else None
        return state, ledger, Metrics.load(path / METRICS_FILE)

    def clean_temporary(self) -> None:
        """Remove what a killed writer left behind (unfinished checkpoints, temp files)."""
        root = self.file(CHECKPOINTS)
        if root.exists():
            for p in root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    """Delete a directory so that a kill half-way never leaves a checkpoint-looking remnant."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
