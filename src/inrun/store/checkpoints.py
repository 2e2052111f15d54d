"""A run's checkpoints (``checkpoints/step-N/``): everything needed to continue after step N,
in the one schema every loop writes, written atomically and checked on every read.

Each checkpoint is a directory ``step-000100/`` holding ``state.pt`` (format 3: ``step``,
``tracker``, ``objects``: state dicts by name, ``rng``, ``extra``: the loop's own data; loaded
with ``torch.load(weights_only=True)``), ``ledger/``, ``metrics.parquet`` and ``manifest.json``
(SHA-256 and size of each). It is written into a hidden temporary directory and renamed into
place, so a ``kill -9`` at any moment leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LedgerError, RunDirError
from ..files import (
    IntegrityError,
    atomic_write,
    file_digest,
    fsync_dir,
    read_json,
    verify_file,
    write_json,
)
from .ledger import LEDGER_META_FILE, ValueLedger
from .metrics import METRICS_FILE, Metrics

RUN_FORMAT = 2  # the layout of run directories and of checkpoints' manifests
CHECKPOINT_FORMAT = 3  # state.pt: step, tracker, objects, rng, extra (format 2: inrun train's own keys)
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.pt"
DAMAGED_PREFIX = "damaged-"


@dataclass
class Restored:
    """What :meth:`Checkpoints.restore` found: the checkpoint used and those it set aside."""

    step: int
    path: Path | None
    state: dict[str, Any] | None
    ledger: ValueLedger | None
    metrics: Metrics
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, why)


class Checkpoints:
    """The checkpoints of the run directory ``run`` (in ``root``, its ``checkpoints/``)."""

    def __init__(self, root: Path, run: Path) -> None:
        self.root, self.run = root, run

    def listed(self) -> list[tuple[int, Path]]:
        """Checkpoints, oldest first (a temporary, unfinished one is never listed)."""
        root = self.root
        out = []
        if root.exists():
            for p in root.iterdir():
                if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                    out.append((int(p.name[5:]), p))
        return sorted(out)

    def write(
        self, step: int, state: Mapping[str, Any], ledger: ValueLedger | None, metrics: Metrics, keep: int
    ) -> Path:
        """Write everything needed to continue after ``step`` steps, atomically, then prune."""
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # Every file is synced, each directory once, before the rename makes it a checkpoint:
        # the checkpoint is what a resume trusts.
        atomic_write(tmp / CHECKPOINT_STATE, lambda p: torch.save(dict(state), p), sync_dir=False)
        files = {CHECKPOINT_STATE: file_digest(tmp / CHECKPOINT_STATE)}
        if ledger is not None:
            ledger.save(tmp / "ledger")
            files[f"ledger/{LEDGER_META_FILE}"] = file_digest(tmp / "ledger" / LEDGER_META_FILE)
        metrics.save(tmp / METRICS_FILE, sync_dir=False)
        files[METRICS_FILE] = file_digest(tmp / METRICS_FILE)
        write_json(tmp / "manifest.json", {"format": RUN_FORMAT, "step": step, "files": files}, sync_dir=False)
        fsync_dir(tmp)
        if final.exists():  # the same step again (a resumed run that had finished): replace it
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in self.listed()[:-keep]:
            _discard(old)
        return final

    def verify(self, path: Path) -> dict[str, Any]:
        """The checkpoint's manifest, after checking it and every file it lists.

        Raises:
            IntegrityError: something is missing, damaged or inconsistent (the message says what).
        """
        manifest = read_json(path / "manifest.json", "the checkpoint's file list")
        step, files = manifest.get("step"), manifest.get("files")
        if not isinstance(files, dict) or CHECKPOINT_STATE not in files or METRICS_FILE not in files:
            raise IntegrityError(f"{path / 'manifest.json'} is damaged: its file list is incomplete")
        if not isinstance(step, int) or path.name != f"step-{step:06d}":
            raise IntegrityError(f"{path / 'manifest.json'} says step {step!r}, the directory is {path.name}")
        for name, digest in files.items():
            verify_file(path / name, digest, f"listed in {path / 'manifest.json'}")
        return manifest

    def load(
        self, path: Path, device: torch.device, trace_dir: Path | None = None
    ) -> tuple[dict[str, Any], ValueLedger | None, Metrics]:
        """``(state, ledger, metrics)`` of a checkpoint, every file verified first; tensors are
        loaded with ``weights_only=True``.

        Raises:
            IntegrityError: the checkpoint is damaged (the message says which file and how).
        """
        manifest = self.verify(path)
        try:
            state = torch.load(path / CHECKPOINT_STATE, map_location=device, weights_only=True)
        except Exception as exc:  # a file with the right checksum that torch cannot read
            raise IntegrityError(f"{path / CHECKPOINT_STATE} cannot be loaded ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("step") != manifest["step"]:
            raise IntegrityError(f"{path / CHECKPOINT_STATE} does not hold step {manifest['step']}")
        ledger = None
        state = _one_schema(state)
        if f"ledger/{LEDGER_META_FILE}" in manifest["files"]:
            ledger = ValueLedger.load(path / "ledger", trace_dir=trace_dir)
        elif state.get("tracker") is not None:
            raise IntegrityError(f"{path} has tracker state but no ledger/")
        return state, ledger, Metrics.load(path / METRICS_FILE)

    def restore(self, device: torch.device, max_step: int | None = None, trace_dir: Path | None = None) -> Restored:
        """The newest intact checkpoint (at most ``max_step``), its files verified; damaged
        newer ones are moved aside as ``checkpoints/damaged-step-N`` and listed in ``skipped``.

        With no checkpoint at all, the run starts from step 0 (nothing was lost: the values of
        a run are a function of its config and data). Checkpoints that all fail verification
        cannot restore the values exactly: refused.

        Raises:
            RunDirError: every checkpoint is damaged.
        """
        candidates = [(s, p) for s, p in self.listed() if max_step is None or s <= max_step]
        problems: list[tuple[Path, str]] = []
        for step, path in reversed(candidates):
            try:
                state, ledger, metrics = self.load(path, device, trace_dir=trace_dir)
                if trace_dir is not None and state.get("tracker") is not None and ledger is None:
                    raise IntegrityError(f"{path} has no ledger")
            except LedgerError as exc:
                problems.append((path, str(exc)))
                continue
            skipped = [(p.name, why) for p, why in problems]
            for p, _ in problems:
                self._set_aside(p)
            return Restored(step, path, state, ledger, metrics, skipped)
        if problems:
            first = problems[0][1]
            raise RunDirError(
                f"cannot resume {self.run}: none of its {len(problems)} checkpoint(s) is intact, so its "
                f"values cannot be restored exactly (newest: {first}). Restore the files from a "
                f"backup, or delete {self.root} to recompute the run from step 0"
            )
        return Restored(0, None, None, None, Metrics())

    def _set_aside(self, path: Path) -> None:
        target = path.with_name(DAMAGED_PREFIX + path.name)
        k = 1
        while target.exists():
            target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{k}")
            k += 1
        os.replace(path, target)
        fsync_dir(path.parent)

    def discard_after(self, step: int) -> None:
        for s, p in self.listed():
            if s > step:
                _discard(p)

    def clean(self) -> None:
        """Remove unfinished checkpoints a killed writer left (only under the run's lock)."""
        if self.root.exists():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)


def _one_schema(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state in the one schema every loop writes (format 3): ``step``, ``tracker``,
    ``objects`` (state dicts by name), ``rng``, ``extra``. Format 2 checkpoints of ``inrun train``
    kept ``model``, ``optimizer`` and ``schedule`` at the top and ``data``, ``forced_skips`` beside."""
    if "objects" in state:
        return state
    objects = {k: state[k] for k in ("model", "optimizer", "schedule") if k in state}
    extra = {k: state[k] for k in ("data", "forced_skips") if k in state}
    return {"format": state.get("format"), "step": state.get("step"), "tracker": state.get("tracker"),
            "objects": objects, "rng": state.get("rng"), "extra": extra}


def _discard(path: Path) -> None:
    """Delete a directory so that a kill half-way never leaves a checkpoint-looking remnant."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
