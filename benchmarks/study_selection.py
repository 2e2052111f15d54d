"""Case study 6 (paper App. E.6, Table 5): does training on the top-valued data beat random data?

The digits setting of the mislabel study (1000 training points, 10% of labels flipped, MLP). Per
seed, every training point is scored once (In-Run values from the SGD run: order 1 and order 2;
Adam-aware values (orders 1 and 2) and the SGD proxy from AdamW runs with warm-up and cosine
decay; KNN-Shapley K=5 on learned features; the final training loss, lowest first); then a fresh
MLP is trained with the recipe of the run that scored (SGD, or AdamW), same number of epochs, on
the top 20/40/60/80% by each score, or on a random subset of the same size (with each recipe),
and its accuracy on the 597 clean test points is reported. 5 seeds (split, corruption, initialization, data order,
random subset); mean (std).

    PYTHONPATH=src python benchmarks/study_selection.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import common  # noqa: I001

import numpy as np

from studies import digits, fidelity, plots

SEEDS = (0, 1, 2, 3, 4)
FRACTIONS = (0.2, 0.4, 0.6, 0.8)
METHODS = (
    "In-Run, order 1 (SGD)",
    "In-Run, order 2 (SGD)",
    "KNN-Shapley, K=5, learned features (SGD)",
    "final loss (SGD model), low first",
)
ADAMW_METHODS = (
    "In-Run, Adam-aware order 1 (AdamW)",
    "In-Run, Adam-aware order 2 (AdamW)",
    "In-Run, SGD proxy (AdamW)",
    "final loss (AdamW model), low first",
)
"""Selected by the AdamW run's scores and retrained with AdamW (same recipe), against a random
subset retrained with AdamW."""


BALANCED = ("In-Run, order 1 (SGD)", "In-Run, order 2 (SGD)", "In-Run, Adam-aware order 2 (AdamW)")


def balanced_top(score: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` by score with each (observed) label's share kept as in the whole set."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(k * counts / counts.sum()).astype(int)
    picked = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        picked.extend(idx[np.argsort(-score[idx], kind="stable")[:q]])
    rest = [i for i in np.argsort(-score, kind="stable") if i not in set(picked)]
    picked.extend(rest[: k - len(picked)])
    return np.asarray(picked)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    args, clock = common.start(p)
    cfg = digits.study_config(args.quick)
    seeds = SEEDS[: args.seeds] if not args.quick else SEEDS[:2]
    names = ("random", *METHODS, "random (AdamW retraining)", *ADAMW_METHODS,
             *(f"{m}, class-balanced (diagnostic)" for m in BALANCED))
    acc: dict[str, dict[float, list[float]]] = {m: {f: [] for f in FRACTIONS} for m in names}
    full: list[float] = []
    full_adamw: list[float] = []
    audits: dict[str, tuple[list, float]] = {}
    flips: dict[str, dict[float, list[float]]] = {m: {f: [] for f in FRACTIONS} for m in names}
    thin: dict[str, dict[float, list[float]]] = {m: {f: [] for f in FRACTIONS} for m in names}
    for seed in seeds:
        split = digits.make_split(cfg, seed)
        sc = digits.all_scores(cfg, split, seed)
        full.append(sc.test_acc["SGD"])
        full_adamw.append(sc.test_acc["AdamW"])
        for m, (rows, seconds) in sc.audits.items():
            prev_rows, prev_seconds = audits.get(m, ([], 0.0))
            audits[m] = (prev_rows + rows, prev_seconds + seconds)
        rng = np.random.default_rng(10_000 + seed)
        n = len(split.x_train)
        for f in FRACTIONS:
            k = round(f * n)
            picks = {"random": rng.choice(n, size=k, replace=False)}
            picks["random (AdamW retraining)"] = picks["random"]
            for m in (*METHODS, *ADAMW_METHODS):
                picks[m] = np.argsort(-sc.values[m], kind="stable")[:k]
            for m in BALANCED:
                picks[f"{m}, class-balanced (diagnostic)"] = balanced_top(sc.values[m], split.y_train.numpy(), k)
            for m, rows in picks.items():
                recipe = "adamw" if "AdamW" in m else "sgd"
                model, _ = digits.train(cfg, split, seed, rows=np.sort(rows), optimizer=recipe)
                acc[m][f].append(digits.accuracy(model, split.x_test, split.y_test))
                flips[m][f].append(float(split.flipped[rows].mean()))
                per_class = np.bincount(split.y_clean.numpy()[rows], minlength=10)
                thin[m][f].append(float(per_class.min() / (k / 10)))
        common.log(f"seed {seed}: " + ", ".join(f"{m.split(',')[0][:12]}@20% {acc[m][0.2][-1]:.3f}" for m in acc))
    out = [
        f"Digits MLP, {cfg.epochs} epochs on each subset, batch {cfg.batch}: SGD lr {cfg.sgd_lr} for the SGD-valued selections "
        f"and random, AdamW (peak lr {cfg.adamw_lr}, warm-up, cosine decay) for the AdamW-valued selections and "
        f"\"random (AdamW retraining)\"; {cfg.noise:.0%} of {cfg.n_train} training labels flipped; {len(seeds)} seeds. "
        f"Trained on all 1000 points: test accuracy {common.mean_std(full)} (SGD), {common.mean_std(full_adamw)} (AdamW).",
        f"\n**What the audit measured during the valued runs** ({len(seeds)} seeds pooled; see the mislabel study)\n",
        fidelity.table(audits),
        "\n**Test accuracy when training on the top-valued fraction** (mean (std))\n",
    ]
    rows = [[m] + [common.mean_std(acc[m][f]) for f in FRACTIONS] for m in acc]
    out.append(common.table(["selection"] + [f"{f:.0%}" for f in FRACTIONS], rows))
    out.append("\n**Share of flipped labels in the selected subset** (mean over seeds; 10% = none removed)\n")
    rows = [[m] + [f"{np.mean(flips[m][f]):.1%}" for f in FRACTIONS] for m in acc]
    out.append(common.table(["selection"] + [f"{f:.0%}" for f in FRACTIONS], rows))
    out.append(
        "\n**Diversity: the rarest true class in the selected subset, as a fraction of an even share** "
        "(mean over seeds; 100% = every class equally represented, 0% = a class missing)\n"
    )
    rows = [[m] + [f"{np.mean(thin[m][f]):.0%}" for f in FRACTIONS] for m in acc]
    out.append(common.table(["selection"] + [f"{f:.0%}" for f in FRACTIONS], rows))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in acc:
        mu = [np.mean(acc[m][f]) for f in FRACTIONS]
        sd = [np.std(acc[m][f]) for f in FRACTIONS]
        ls = "--" if m.startswith("random") else (":" if "diagnostic" in m else "-")
        ax.errorbar([f * 100 for f in FRACTIONS], mu, yerr=sd, marker="o", capsize=3, label=m,
                    color={"random": "k", "random (AdamW retraining)": "gray"}.get(m), ls=ls)
    ax.axhline(np.mean(full), color="gray", ls=":", label="all 1000 points")
    ax.set_xlabel("% of training data kept (top by score)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"data selection on noisy digits, mean ± std over {len(seeds)} seeds")
    ax.legend(fontsize=7)
    plots.publish("selection", fig, "\n".join(out), clock.summary(), args)


if __name__ == "__main__":
    main()
