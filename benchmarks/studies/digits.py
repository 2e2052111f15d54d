"""scikit-learn's bundled digits with 10% flipped training labels, an MLP, and every value used by
the mislabel (Table 4) and selection (Table 5) studies.

Split per seed: 1000 training points (100 of them relabelled to a random *other* class), 200
clean validation points (the valuation set, also the KNN-Shapley test points) and 597 clean test
points. The MLP is 64 → 128 → 64 → 10 (ReLU); its "learned features" are the 64 activations
before the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun import InRunShapley
from inrun.analysis.baselines import knn_shapley


@dataclass(frozen=True)
class DigitsConfig:
    n_train: int = 1000
    n_val: int = 200
    noise: float = 0.1
    epochs: int = 30
    batch: int = 32
    sgd_lr: float = 0.1
    adamw_lr: float = 3e-3
    """AdamW's peak learning rate (weight decay 0.01, warm-up over 5% of the steps, cosine decay to a tenth)."""
    adamw_weight_decay: float = 0.01
    k: int = 5


AUDIT = {"every": 50, "at": (1, 5, 10, 25), "players": 8}
"""The audit of every valued digits run (8 of the 32 points of a batch: 256 validation losses each)."""


def lr_schedule(cfg: DigitsConfig, steps: int) -> list[float]:
    """AdamW's learning rate per step: linear warm-up over 5% of the steps, cosine decay to a tenth."""
    import math

    warm = max(1, steps // 20)
    peak, low = cfg.adamw_lr, cfg.adamw_lr / 10
    out = []
    for t in range(steps):
        if t < warm:
            out.append(peak * (t + 1) / warm)
        else:
            out.append(low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (t - warm) / max(1, steps - 1 - warm))))
    return out


def study_config(quick: bool) -> DigitsConfig:
    """The studies' settings, or with ``quick`` a smoke test of 3 epochs."""
    return DigitsConfig(epochs=3) if quick else DigitsConfig()


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor  # noisy labels (what training sees)
    y_clean: Tensor
    flipped: np.ndarray  # bool [n_train]
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def make_split(cfg: DigitsConfig, seed: int) -> Split:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    tr, va, te = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_val], perm[cfg.n_train + cfg.n_val :]
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    y_tr = y[tr].clone()
    n_flip = round(cfg.noise * cfg.n_train)
    flip = rng.choice(cfg.n_train, size=n_flip, replace=False)
    shift = torch.tensor(rng.integers(1, 10, size=n_flip), dtype=torch.long)
    y_tr[flip] = (y_tr[flip] + shift) % 10
    flipped = np.zeros(cfg.n_train, dtype=bool)
    flipped[flip] = True
    return Split(X[tr], y_tr, y[tr], flipped, X[va], y[va], X[te], y[te])


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def batches(n: int, epochs: int, batch: int, seed: int) -> list[np.ndarray]:
    """Epoch-wise permutations, remainder dropped (so every step has ``batch`` points)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        out.extend(perm[: (n // batch) * batch].reshape(-1, batch))
    return out


def train(
    cfg: DigitsConfig, split: Split, seed: int, *, rows: np.ndarray | None = None, optimizer: str = "sgd",
    tracker_options: dict | None = None,
) -> tuple[nn.Module, InRunShapley | None]:
    """Train a fresh MLP on ``rows`` (default all) of the noisy training set; optionally valued.

    ``optimizer``: ``"sgd"`` (constant lr) or ``"adamw"`` (warm-up and cosine decay, :func:`lr_schedule`).
    """
    torch.manual_seed(seed)
    model = MLP()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.adamw_lr, weight_decay=cfg.adamw_weight_decay)
    rows = np.arange(len(split.x_train)) if rows is None else np.asarray(rows)
    tracker = None
    if tracker_options is not None:
        tracker = InRunShapley(
            model, opt, val_loss=lambda m: F.cross_entropy(m(split.x_val), split.y_val), **tracker_options
        )
    plan = batches(len(rows), cfg.epochs, min(cfg.batch, len(rows)), seed)
    schedule = lr_schedule(cfg, len(plan)) if optimizer == "adamw" else None
    for step, b in enumerate(plan):
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = schedule[step]
        idx = rows[b]
        x, y = split.x_train[idx], split.y_train[idx]
        if tracker is not None:
            with tracker.step(idx.tolist()):
                F.cross_entropy(model(x), y).backward()
        else:
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model, tracker


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@dataclass
class Scores:
    """Per training point, higher = more valuable (so mislabeled points should score low)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    test_acc: dict[str, float] = field(default_factory=dict)
    audits: dict[str, tuple[list[dict], float]] = field(default_factory=dict)
    """valued run -> (its audit rows, the seconds it took)."""


def all_scores(cfg: DigitsConfig, split: Split, seed: int) -> Scores:
    """In-Run values (SGD order 1 and 2; AdamW Adam-aware order 1 and 2, and the SGD proxy on the
    same trajectory), every valued run audited, and the baselines."""
    import time

    from inrun.exact import per_example_gradients, trainable_parameters

    out = Scores()
    n = len(split.x_train)

    def by_index(tracker: InRunShapley, part: str = "value") -> np.ndarray:
        table = tracker.values()
        v = np.zeros(n)
        arr = table.value if part == "value" else table.first_order
        for i, val in zip(table.ids(), arr):
            v[int(i)] = val
        return v

    audit = {**AUDIT, "seed": seed}
    t0 = time.perf_counter()
    sgd, t = train(cfg, split, seed, tracker_options={"order": 2, "audit": audit})
    out.audits["SGD, order 2"] = (t.audit.steps, time.perf_counter() - t0)
    out.values["In-Run, order 1 (SGD)"] = by_index(t, "first")
    out.values["In-Run, order 2 (SGD)"] = by_index(t, "value")
    out.test_acc["SGD"] = accuracy(sgd, split.x_test, split.y_test)
    t0 = time.perf_counter()
    adam, t = train(cfg, split, seed, optimizer="adamw", tracker_options={"order": 2, "audit": audit})
    out.audits["AdamW, Adam-aware, order 2"] = (t.audit.steps, time.perf_counter() - t0)
    out.values["In-Run, Adam-aware order 1 (AdamW)"] = by_index(t, "first")
    out.values["In-Run, Adam-aware order 2 (AdamW)"] = by_index(t, "value")
    out.test_acc["AdamW"] = accuracy(adam, split.x_test, split.y_test)
    t0 = time.perf_counter()
    _, t = train(cfg, split, seed, optimizer="adamw", tracker_options={"order": 1, "proxy": "sgd", "audit": audit})
    out.audits["AdamW, SGD proxy"] = (t.audit.steps, time.perf_counter() - t0)
    out.values["In-Run, SGD proxy (AdamW)"] = by_index(t)

    with torch.no_grad():
        for name, m in (("SGD", sgd), ("AdamW", adam)):
            loss = F.cross_entropy(m(split.x_train), split.y_train, reduction="none").numpy()
            out.values[f"final loss ({name} model), low first"] = -loss
    # gradient similarity at the final checkpoint (SGD model)
    params = trainable_parameters(sgd)
    live = dict(sgd.named_parameters())
    g_val = torch.autograd.grad(F.cross_entropy(sgd(split.x_val), split.y_val), [live[k] for k in params])
    gv = torch.cat([g.flatten() for g in g_val]).double()
    per = per_example_gradients(
        sgd, lambda fn, x, y: F.cross_entropy(fn(x), y), [split.x_train, split.y_train]
    )
    G = torch.cat([per[k].flatten(1) for k in params], 1).double()
    out.values["grad·grad, final checkpoint (SGD)"] = (G @ gv).numpy()
    out.values["grad cosine, final checkpoint (SGD)"] = ((G @ gv) / (G.norm(dim=1) * gv.norm() + 1e-30)).numpy()
    with torch.no_grad():
        f_tr, f_va = sgd.body(split.x_train).numpy(), sgd.body(split.x_val).numpy()
    out.values["KNN-Shapley, K=5, learned features (SGD)"] = knn_shapley(f_tr, split.y_train.numpy(), f_va, split.y_val.numpy(), k=cfg.k)
    out.values["KNN-Shapley, K=5, raw pixels"] = knn_shapley(
        split.x_train.numpy(), split.y_train.numpy(), split.x_val.numpy(), split.y_val.numpy(), k=cfg.k
    )
    return out
