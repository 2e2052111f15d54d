"""``inrun curate``: drop low-value training data, and the paper's curation experiment.

:func:`curate` chooses the examples to keep (``negative``: drop every valued example whose value
is below 0; ``bottom:F``: drop the lowest-valued fraction ``F`` of the training set) and writes,
under ``RUN_DIR/curate/<drop>/``: ``kept_ids.parquet``, ``dropped_ids.parquet``,
``random_ids.parquet`` (a random subset of the same size, drawn from the whole training set),
``kept.toml`` / ``random.toml`` (the run's config restricted to each id list with
``data.subset``), and for file data a filtered copy of the file.

:func:`retrain` then trains both configs, with the same seed, steps and hyperparameters as the
original run, and compares their validation-loss curves (the paper's Sec. 5.3.1 protocol: the
curated run samples only from the kept examples; the control samples as many random ones).
Values are not computed in these runs (``values.enabled = false``); training is the same with
or without the tracker.

Examples never in a valued step (count 0) have no value: they are kept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig, dumps_toml
from .ledger import atomic_write
from .rundir import RunDir, RunDirError
from .storage import write_json
from .summary import value_frame

CURATE_DIR = "curate"
KEPT, RANDOM, ORIGINAL = "kept (curated)", "random subset", "original (all data)"


@dataclass
class Selection:
    """What :func:`curate` chose and wrote."""

    run_dir: RunDir
    drop: str
    out_dir: Path
    total: int
    kept: int
    dropped: int
    unvalued: int
    kept_path: Path
    random_path: Path
    kept_config: Path
    random_config: Path
    filtered_data: Path | None
    config: RunConfig


def parse_drop(spec: str) -> tuple[str, float | None]:
    """``'negative'`` or ``'bottom:F'`` with ``0 < F < 1``."""
    if spec == "negative":
        return "negative", None
    if spec.startswith("bottom:"):
        try:
            fraction = float(spec.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0 < fraction < 1:
            return "bottom", fraction
    raise ConfigError("--drop", f"{spec!r} is not 'negative' or 'bottom:FRACTION' with 0 < FRACTION < 1")


def curate(run_dir: str | Path, drop: str) -> Selection:
    """Choose the kept examples of a run and write the id lists and configs."""
    kind, fraction = parse_drop(drop)
    rd = RunDir(run_dir)
    meta = rd.meta()
    config = RunConfig.from_dict(meta["config"])
    frame = value_frame(rd)
    valued = frame["count"].to_numpy() > 0
    values = frame["value"].to_numpy()
    if kind == "negative":
        drop_mask = valued & (values < 0)
    else:
        n_drop = round(fraction * len(frame))
        candidates = np.flatnonzero(valued)
        order = candidates[np.argsort(values[candidates], kind="stable")]
        drop_mask = np.zeros(len(frame), dtype=bool)
        drop_mask[order[:n_drop]] = True
    kept_rows = np.flatnonzero(~drop_mask)
    if len(kept_rows) < config.training.batch_size:
        raise RunDirError(
            f"drop {drop} keeps {len(kept_rows)} examples, fewer than one batch ({config.training.batch_size})"
        )
    rng = np.random.default_rng([config.seed, 1])
    random_rows = np.sort(rng.choice(len(frame), size=len(kept_rows), replace=False))

    tag = drop.replace(":", "-")
    out = rd.path / CURATE_DIR / tag
    out.mkdir(parents=True, exist_ok=True)
    cols = ["id", "value", "count", "source"]
    kept_path, dropped_path, random_path = out / "kept_ids.parquet", out / "dropped_ids.parquet", out / "random_ids.parquet"
    _write_frame(frame.iloc[kept_rows][cols], kept_path)
    _write_frame(frame.iloc[np.flatnonzero(drop_mask)][cols], dropped_path)
    _write_frame(frame.iloc[random_rows][["id"]], random_path)

    def variant(ids_path: Path, name: str) -> Path:
        cfg = config.replace(
            data=dataclasses.replace(config.data, subset=str(ids_path.resolve())),
            values=dataclasses.replace(config.values, enabled=False),
            checkpoint=dataclasses.replace(config.checkpoint, every=0, keep=1),
            output=str((out / name).resolve()),
        )
        path = out / f"{name}.toml"
        atomic_write(path, lambda p: Path(p).write_text(dumps_toml(cfg)))
        return path

    filtered = _filter_file(config, set(frame["id"].iloc[kept_rows].tolist()), out)
    return Selection(
        run_dir=rd, drop=drop, out_dir=out, total=len(frame), kept=len(kept_rows),
        dropped=int(drop_mask.sum()), unvalued=int((~valued).sum()), kept_path=kept_path,
        random_path=random_path, kept_config=variant(kept_path, "kept"),
        random_config=variant(random_path, "random"), filtered_data=filtered, config=config,
    )


def retrain(
    selection: Selection, progress_for: Callable[[str, int], Any] | None = None
) -> dict[str, Any]:
    """Train on the kept and on the random ids; write ``curation.json``, a plot and the report.

    Args:
        progress_for: ``progress_for(name, steps)`` returns a context manager yielding a
            progress callback (the CLI's progress bars), or ``None``.
    """
    from .config import load_config
    from .report import build_report
    from .report.plots import curation_curves
    from .runner import train

    rd = selection.run_dir
    original = rd.metrics()
    curves: dict[str, dict[str, Any]] = {ORIGINAL: _curve(original, selection.total)}
    for name, cfg_path, count in (
        (KEPT, selection.kept_config, selection.kept),
        (RANDOM, selection.random_config, selection.kept),
    ):
        cfg = load_config(cfg_path)
        out = Path(cfg.output)
        if out.exists() and RunDir(out).exists:
            RunDir(out).refuse_if_in_use("replace")
            shutil.rmtree(out)  # an earlier retrain of the same selection
        if progress_for is None:
            train(cfg, out)
        else:
            with progress_for(name, cfg.training.steps) as progress:
                train(cfg, out, progress=progress)
        curves[name] = _curve(RunDir(out).metrics(), count)
    result = {
        "drop": selection.drop,
        "total": selection.total,
        "kept": selection.kept,
        "dropped": selection.dropped,
        "curves": curves,
        "final_val_loss": {k: v["val_loss"][-1] for k, v in curves.items()},
    }
    plot = selection.out_dir / "val_loss.png"
    png = curation_curves({k: (np.array(v["steps"]), np.array(v["val_loss"])) for k, v in curves.items()})
    atomic_write(plot, lambda p: Path(p).write_bytes(png))
    result["plot"] = str(plot)
    write_json(selection.out_dir / "curation.json", result)
    if rd.has_values():
        result["report"] = str(build_report(rd.path).resolve())
    return result


def _curve(metrics: Any, examples: int) -> dict[str, Any]:
    pairs = [(s, v) for s, v in zip(metrics.step, metrics.val_loss) if np.isfinite(v)]
    return {"steps": [int(s) for s, _ in pairs], "val_loss": [float(v) for _, v in pairs], "examples": examples}


def _write_frame(frame: Any, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    atomic_write(path, lambda p: pq.write_table(table, p))


def _filter_file(config: RunConfig, kept_ids: set[Any], out: Path) -> Path | None:
    """For file data: the same file with only the kept rows (held-out validation rows stay)."""
    if config.data.kind != "file" or config.data.path is None:
        return None
    src = Path(config.data.path)
    if not src.exists():
        return None
    target = out / f"kept{src.suffix}"
    id_field = config.data.id_field
    from .data.base import is_held_out

    def keep(example_id: Any) -> bool:
        held = config.validation.path is None and is_held_out(example_id, config.validation.fraction)
        return held or example_id in kept_ids

    if src.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(src)
        mask = [keep(i) for i in table.column(id_field).to_pylist()]
        atomic_write(target, lambda p: pq.write_table(table.filter(mask), p))
        return target
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    kept_lines = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        example_id = n if src.suffix == ".txt" else json.loads(line).get(id_field)
        if keep(example_id):
            kept_lines.append(line)
    atomic_write(target, lambda p: Path(p).write_text("".join(kept_lines), encoding="utf-8"))
    return target
