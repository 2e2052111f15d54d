"""``inrun baselines RUN_DIR``: the simple scores the case studies found strong, beside the values.

For a run ``inrun train`` made (its config and data can be rebuilt), at the final checkpoint:

* ``final_loss``: each training example's loss under the final model (high: not learned, or
  mislabeled: a strong detector of label noise in docs/case-studies.md);
* ``grad_cosine``: the cosine between the example's gradient and the validation gradient at the
  final parameters (one checkpoint's gradient alignment, TracIn-style; negative: its next step
  would raise the validation loss);
* ``knn_shapley``: exact KNN-Shapley (K = 5) of the example for the validation set, on the raw
  features, where the data has features (tabular/image data; not text).

They are written to ``RUN_DIR/baselines.parquet`` (id and one column per score; atomically) and
shown by ``inrun report`` beside the In-Run values: their rank correlations with the values, and
the examples each score flags. They are *baselines*: a different question than the value of an
example to this training run, computed at one checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modes import evaluating
from ..run.config import saved_config
from ..run.data import load_data
from ..run.models import build_model, loss_function
from ..store.ledger import atomic_write
from ..store.rundir import RunDir, RunDirError
from .baselines import knn_shapley

BASELINES_FILE = "baselines.parquet"
SCORES = {
    "final_loss": "final-checkpoint loss (high: not learned or mislabeled)",
    "grad_cosine": "gradient cosine with the validation gradient at the final checkpoint",
    "knn_shapley": "KNN-Shapley, K = 5, raw features",
}


def compute_baselines(run_dir: str | Path, k: int = 5) -> Path:
    """Compute the baselines of a CLI run at its newest intact checkpoint; returns the file.

    Raises:
        RunDirError: the run cannot be rebuilt (not made by ``inrun train``) or has no checkpoint.
    """
    rd = RunDir(run_dir)
    if not rd.rerunnable:
        raise RunDirError(
            f"{rd.path} is a run of your own loop (kind {rd.kind!r}): baselines need the run's config and "
            "data, which only `inrun train` runs record; compute them in your code with inrun.analysis.baselines"
        )
    config, _ = saved_config(rd)
    restored = rd.restore(torch.device("cpu"), values=False)
    if restored.state is None:
        raise RunDirError(f"{rd.path} has no checkpoint: train it first (inrun train --resume {rd.path})")
    train_set, val_set = load_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train_set)
    model.load_state_dict(restored.state["objects"]["model"])
    loss_fn = loss_function(train_set)
    dtype = next(model.parameters()).dtype

    def floats(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    x, y = floats(train_set.inputs), train_set.targets
    vx, vy = floats(val_set.inputs), val_set.targets
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with evaluating(model):
        g_val = torch.autograd.grad(loss_fn(model, vx, vy), list(params.values()))
        g_val_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_val))
        losses, cosines = [], []
        # One example at a time: plain autograd works for every model (vmap does not run HF's
        # loss, which branches on the labels), and this is an offline command.
        for i in range(len(train_set)):
            loss = loss_fn(model, x[i : i + 1], y[i : i + 1])
            g = torch.autograd.grad(loss, list(params.values()))
            losses.append(float(loss))
            dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, g_val))
            norm = math.sqrt(sum(float((a.double() ** 2).sum()) for a in g))
            cosines.append(dot / max(norm * g_val_norm, 1e-300))
    columns: dict[str, Any] = {"id": list(train_set.ids), "final_loss": losses, "grad_cosine": cosines}
    if train_set.task == "classify" and x.dim() == 2 and x.is_floating_point():
        columns["knn_shapley"] = knn_shapley(
            x.double().numpy(), y.numpy(), vx.double().numpy(), vy.numpy(), k=k,
        ).tolist()
    return write_baselines(rd, columns)


def write_baselines(rd: RunDir, columns: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = columns["id"]
    table = pa.table({
        "id": pa.array(ids, type=pa.string() if ids and isinstance(ids[0], str) else pa.int64()),
        **{k: pa.array(np.asarray(v, dtype=np.float64)) for k, v in columns.items() if k != "id"},
    })
    path = rd.file(BASELINES_FILE)
    atomic_write(path, lambda p: pq.write_table(table, p))
    return path


def read_baselines(rd: RunDir) -> Any | None:
    """The run's baselines as a pandas frame indexed by id, or ``None`` if never computed."""
    path = rd.file(BASELINES_FILE)
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas().set_index("id")
    except Exception as exc:  # a damaged optional file: say so, and let it be recomputed
        raise RunDirError(f"{path} cannot be read ({type(exc).__name__}): run `inrun baselines {rd.path}` again") from None
