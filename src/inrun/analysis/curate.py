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

With ``seeds = N`` each arm (kept, random, all data) is trained N times (seeds ``seed``...
``seed + N - 1``, each with its own random subset), and the results are the mean and the spread.

Examples never in a valued step (count 0) have no value: they are kept.

A run of your own loop, the Trainer or Lightning (``run.json`` kind other than ``"cli"``) gets
the id lists; inrun cannot train it again, so :func:`retrain` refuses it and says what to do.
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

from ..files import write_json
from ..run.config import ConfigError, RunConfig, dumps_toml, load_config
from ..run.data.base import is_held_out
from ..run.runner import train
from ..store.ledger import atomic_write
from ..store.rundir import RunDir, RunDirError
from ..store.summary import value_frame
from .report import build_report
from .report.plots import curation_curves

CURATE_DIR = "curate"
KEPT, RANDOM, ORIGINAL = "kept (curated)", "random subset", "original (all data)"


@dataclass
class Selection:
    """What :func:`curate` chose and wrote; the configs are ``None`` for a run that inrun cannot
    train again (one of your own loop, the Trainer or Lightning)."""

    run_dir: RunDir
    drop: str
    out_dir: Path
    total: int
    kept: int
    dropped: int
    unvalued: int
    kept_path: Path
    random_path: Path
    kept_config: Path | None
    random_config: Path | None
    filtered_data: Path | None
    config: RunConfig | None
    dropped_path: Path | None = None


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
    """Choose the kept examples of a run and write the id lists (and, for a run of
    ``inrun train``, the configs that restrict it to them)."""
    kind, fraction = parse_drop(drop)
    rd = RunDir(run_dir)
    meta = rd.meta()
    config = RunConfig.from_dict(meta["config"]) if rd.rerunnable else None
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
    if config is not None and len(kept_rows) < config.training.batch_size:
        raise RunDirError(
            f"drop {drop} keeps {len(kept_rows)} examples, fewer than one batch ({config.training.batch_size})"
        )
    if len(kept_rows) == 0:
        raise RunDirError(f"drop {drop} keeps no example")
    seed = config.seed if config is not None else 0
    random_rows = _random_rows(len(frame), len(kept_rows), seed, 0)

    tag = drop.replace(":", "-")
    out = rd.path / CURATE_DIR / tag
    out.mkdir(parents=True, exist_ok=True)
    cols = ["id", "value", "count", "source"]
    kept_path, dropped_path, random_path = out / "kept_ids.parquet", out / "dropped_ids.parquet", out / "random_ids.parquet"
    _write_frame(frame.iloc[kept_rows][cols], kept_path)
    _write_frame(frame.iloc[np.flatnonzero(drop_mask)][cols], dropped_path)
    _write_frame(frame.iloc[random_rows][["id"]], random_path)
    selection = Selection(
        run_dir=rd, drop=drop, out_dir=out, total=len(frame), kept=len(kept_rows),
        dropped=int(drop_mask.sum()), unvalued=int((~valued).sum()), kept_path=kept_path,
        random_path=random_path, kept_config=None, random_config=None, filtered_data=None, config=config,
        dropped_path=dropped_path,
    )
    if config is not None:
        selection.kept_config = _variant(config, kept_path, out, "kept")
        selection.random_config = _variant(config, random_path, out, "random")
        selection.filtered_data = _filter_file(config, set(frame["id"].iloc[kept_rows].tolist()), out)
    return selection


def _random_rows(n: int, size: int, seed: int, k: int) -> np.ndarray:
    """The random control subset of seed number ``k`` (``k = 0``: the one always drawn)."""
    rng = np.random.default_rng([seed, 1] if k == 0 else [seed, 1, k])
    return np.sort(rng.choice(n, size=size, replace=False))


def _variant(config: RunConfig, ids_path: Path | None, out: Path, name: str, seed: int | None = None) -> Path:
    """A config of the run restricted to ``ids_path`` (all data: ``None``), values off."""
    cfg = config.replace(
        data=dataclasses.replace(config.data, subset=str(ids_path.resolve()) if ids_path is not None else None),
        values=dataclasses.replace(config.values, enabled=False),
        checkpoint=dataclasses.replace(config.checkpoint, every=0, keep=1),
        output=str((out / name).resolve()),
        **({"seed": seed} if seed is not None else {}),
    )
    path = out / f"{name}.toml"
    atomic_write(path, lambda p: Path(p).write_text(dumps_toml(cfg)))
    return path


def retrain(
    selection: Selection, progress_for: Callable[[str, int], Any] | None = None, seeds: int = 1,
) -> dict[str, Any]:
    """Train on the kept and on the random ids; write ``curation.json``, a plot and the report.

    Args:
        progress_for: ``progress_for(name, steps)`` returns a context manager yielding a
            progress callback (the CLI's progress bars), or ``None``.
        seeds: training seeds per arm (``seed``, ``seed + 1``...). Each seed also draws its own
            random subset, and seeds after the first retrain the original config on all data,
            so every arm has a mean and a spread (sample standard deviation) over ``seeds`` runs.

    Raises:
        RunDirError: the run was not made by ``inrun train`` (inrun cannot train it again).
    """
    rd = selection.run_dir
    if selection.config is None:
        raise RunDirError(
            f"{rd.path} was written by {_who(rd.kind)}: inrun cannot train it again. To run the "
            f"curation experiment, train your loop on the ids in {selection.kept_path} and on those "
            f"in {selection.random_path} (a random subset of the same size), with the same seed and "
            "steps, and compare their validation losses"
        )
    if seeds < 1:
        raise ConfigError("--seeds", f"must be at least 1, got {seeds}")
    config = selection.config
    frame = value_frame(rd)
    runs: dict[str, list[dict[str, Any]]] = {ORIGINAL: [dict(_curve(rd.metrics(), selection.total), seed=config.seed)],
                                             KEPT: [], RANDOM: []}

    def run(name: str, cfg_path: Path, count: int, seed: int) -> None:
        cfg = load_config(cfg_path)
        out = Path(cfg.output)
        if out.exists() and RunDir(out).exists:
            RunDir(out).refuse_if_in_use("replace")
            shutil.rmtree(out)  # an earlier retrain of the same selection
        label = name if len(runs[KEPT]) == 0 or seeds == 1 else f"{name} (seed {seed})"
        if progress_for is None:
            train(cfg, out)
        else:
            with progress_for(label, cfg.training.steps) as progress:
                train(cfg, out, progress=progress)
        runs[name].append(dict(_curve(RunDir(out).metrics(), count), seed=seed))

    for k in range(seeds):
        seed = config.seed + k
        if k == 0:
            kept_cfg, random_cfg = selection.kept_config, selection.random_config
        else:
            random_ids = selection.out_dir / f"random_ids-seed{k}.parquet"
            _write_frame(frame.iloc[_random_rows(len(frame), selection.kept, config.seed, k)][["id"]], random_ids)
            kept_cfg = _variant(config, selection.kept_path, selection.out_dir, f"kept-seed{k}", seed)
            random_cfg = _variant(config, random_ids, selection.out_dir, f"random-seed{k}", seed)
            run(ORIGINAL, _variant(config, None, selection.out_dir, f"original-seed{k}", seed), selection.total, seed)
        assert kept_cfg is not None and random_cfg is not None
        run(KEPT, kept_cfg, selection.kept, seed)
        run(RANDOM, random_cfg, selection.kept, seed)
    curves = {name: _summarize_runs(r) for name, r in runs.items()}
    result = {
        "drop": selection.drop,
        "total": selection.total,
        "kept": selection.kept,
        "dropped": selection.dropped,
        "seeds": [config.seed + k for k in range(seeds)],
        "curves": curves,
        "final_val_loss": {k: v["final_mean"] for k, v in curves.items()},
    }
    plot = selection.out_dir / "val_loss.png"
    png = curation_curves(
        {k: (np.array(v["steps"]), np.array(v["val_loss"])) for k, v in curves.items()},
        spread={k: np.array(v["val_loss_std"]) for k, v in curves.items()} if seeds > 1 else None,
    )
    atomic_write(plot, lambda p: Path(p).write_bytes(png))
    result["plot"] = str(plot)
    write_json(selection.out_dir / "curation.json", result)
    if rd.has_values():
        result["report"] = str(build_report(rd.path).resolve())
    return result


def _who(kind: str) -> str:
    return {"library": "your own training loop (RunWriter)", "trainer": "the Hugging Face Trainer (InRunTrainer)",
            "lightning": "Lightning (InRunCallback)"}.get(kind, kind)


def _summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean curve and spread of the runs of one arm (their evaluation steps are the same)."""
    steps = runs[0]["steps"]
    for r in runs[1:]:
        if r["steps"] != steps:
            raise RunDirError(f"the retrained runs were evaluated at different steps ({r['steps'][:5]}... vs {steps[:5]}...)")
    losses = np.array([r["val_loss"] for r in runs], dtype=np.float64)  # [seeds, evals]
    final = losses[:, -1]
    std = losses.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(losses.shape[1])
    return {
        "steps": steps,
        "val_loss": losses.mean(axis=0).tolist(),
        "val_loss_std": std.tolist(),
        "examples": runs[0]["examples"],
        "runs": runs,
        "final": final.tolist(),
        "final_mean": float(final.mean()),
        "final_std": float(final.std(ddof=1)) if len(runs) > 1 else 0.0,
    }


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
