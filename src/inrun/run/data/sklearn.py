"""Datasets bundled inside scikit-learn (no download): digits, iris, wine, breast cancer.

Ids are row indices in the dataset; the data source of an example is its class (``class 3``),
so the report shows which classes the run valued. Validation rows are chosen by a stable hash
of the id. Digits keep their 8x8 image shape (for the CNN) and are scaled to [0, 1]; other
features are standardized with the training rows' mean and deviation.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ExampleSet, cap_per_source, is_held_out, spread

SHADES = " .:-=+*#%@"


def load_sklearn_dataset(
    name: str, val_fraction: float, max_val: int | None, max_per_source: int | None = None
) -> tuple[ExampleSet, ExampleSet]:
    """Training and validation splits of ``sklearn.datasets.load_<name>()``."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    names = [str(n) for n in bunch.target_names]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [])] or [f"x{k}" for k in range(X.shape[1])]
    ids = list(range(len(y)))
    held = np.array([is_held_out(i, val_fraction) for i in ids])
    train_rows = [r for r in ids if not held[r]]
    val_rows = [r for r in ids if held[r]]
    sources = [f"class {names[t]}" for t in y]
    train_rows = [train_rows[k] for k in cap_per_source([sources[r] for r in train_rows], max_per_source)]
    val_rows = [val_rows[k] for k in spread(len(val_rows), max_val)]
    image_shape = None
    if name == "digits":
        X = X / 16.0
        image_shape = (1, 8, 8)
    else:
        mean = X[train_rows].mean(axis=0)
        std = X[train_rows].std(axis=0)
        X = (X - mean) / np.where(std > 0, std, 1.0)

    def split(rows: list[int]) -> ExampleSet:
        if name == "digits":
            previews = [f"digit {names[y[r]]}\n" + ascii_image(bunch.data[r].reshape(8, 8) / 16.0) for r in rows]
        else:
            previews = [
                f"{names[y[r]]}: " + ", ".join(f"{f}={v:.3g}" for f, v in zip(feature_names, bunch.data[r]))
                for r in rows
            ]
        return ExampleSet(
            ids=rows,
            sources=[sources[r] for r in rows],
            inputs=torch.tensor(X[rows], dtype=torch.float32),
            targets=torch.tensor(y[rows], dtype=torch.long),
            previews=previews,
            locations=[f"{name}[{r}]" for r in rows],
            task="classify",
            num_classes=len(names),
            image_shape=image_shape,
        )

    return split(train_rows), split(val_rows)


def ascii_image(image: np.ndarray) -> str:
    """A grey image in [0, 1] as lines of characters (two per pixel, so it looks square)."""
    levels = np.clip((image * (len(SHADES) - 1)).round().astype(int), 0, len(SHADES) - 1)
    return "\n".join("".join(SHADES[v] * 2 for v in row) for row in levels)
