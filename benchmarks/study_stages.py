"""Case study 2 (paper §5.3.2): does a source's contribution depend on the stage of training?

The valued runs of the curation study (same cache): a small GPT-2 on Python's standard library,
trained with SGD (order-2 values) and, with the same seed, with AdamW (warm-up, cosine decay;
Adam-aware order-2 values, and the paper's SGD proxy in a third run of the same trajectory),
valued against held-out modules, one validation column per package (email, asyncio, xml,
unittest, logging, encodings) plus "other"; every run audited. Training is cut into stages of
equal length; per stage:

* from the per-step trace, each package's share of the stage's total value for the whole
  validation set (signed: a negative share means the package's chunks raised the validation loss
  in that stage), next to the package's share of the chunks trained on in that stage;
* from snapshots of the per-column values, for each package's own validation column, the share
  of that column's value that comes from the same package (the analogue of the paper's math
  text drawing its value from ArXiv);
* the mean value per chunk visit (the paper's Fig. 11: it shrinks as training proceeds).

    PYTHONPATH=src python benchmarks/study_stages.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import common  # noqa: I001

import numpy as np

from studies import fidelity, lm, plots

STAGES = 6


def positive_share(value: np.ndarray) -> np.ndarray:
    """The paper's Fig. 3 metric over the last axis: a source's total over the sum of the positive
    totals; sources whose total is negative are excluded (NaN)."""
    pos = np.where(value > 0, value, 0.0).sum(-1, keepdims=True)
    return np.where(value > 0, value / np.where(pos > 0, pos, 1.0), np.nan)


def pct(x: float) -> str:
    return "excl. (<0)" if np.isnan(x) else f"{x:.1%}"


def stage_tables(run: lm.LMRun, cfg: lm.LMConfig, data: lm.CodeData, label: str, full: bool) -> tuple[list[str], dict]:
    """The study's tables for one valued run (``full``: also the whole-validation-set table and the
    top-two table), and the series the plot needs."""
    chunks = data.train.chunks
    sources = np.array([c.source for c in chunks])
    names = sorted(set(sources))
    src_index = {s: i for i, s in enumerate(names)}
    src_of_row = np.array([src_index[s] for s in sources])
    stage_len = cfg.steps // STAGES
    bounds = [(k * stage_len, (k + 1) * stage_len) for k in range(STAGES)]
    labels = [f"{a}–{b}" for a, b in bounds]
    tr = run.trace
    val = tr["first"] + tr["second"]
    stage_of = np.minimum(tr["step"] // stage_len, STAGES - 1)
    S = len(names)
    value = np.zeros((STAGES, S))
    visits = np.zeros((STAGES, S))
    np.add.at(value, (stage_of, src_of_row[tr["row"]]), val)
    np.add.at(visits, (stage_of, src_of_row[tr["row"]]), 1)
    total = value.sum(1, keepdims=True)
    share = positive_share(value)
    data_share = visits / visits.sum(1, keepdims=True)

    out: list[str] = [
        f"\n### {label}\n",
        f"{lm.describe(cfg)}; {STAGES} stages of {stage_len} steps; final test loss {run.evals['test'][-1]:.3f} "
        f"nats/byte. Stage totals of value (= the values' estimate of the validation-loss decrease in the stage): "
        f"{', '.join(f'{t:.3f}' for t in total[:, 0])}; the first stage holds {total[0, 0] / total.sum():.0%} of the run's value.",
    ]
    order = np.argsort(-value.sum(0))
    if full:
        rows = [[names[s]] + [f"{pct(share[k, s])} ({data_share[k, s]:.0%})" for k in range(STAGES)] for s in order]
        out.append(
            "\n**Share of each stage's value for the whole validation set, by package** (the paper's Fig. 3 "
            "metric: a package's total over the sum of the positive package totals; packages with a negative total "
            "are excluded; in parentheses the package's share of the chunks trained on in that stage)\n"
        )
        out.append(common.table(["package"] + [f"steps {lab}" for lab in labels], rows))

    # per-column own-package share from snapshots
    snap_steps = list(run.snap_steps)
    idx = [snap_steps.index(b) for _, b in bounds]
    cum = run.snapshots[idx].astype(np.float64)  # [STAGES, N, K]
    per_stage = np.diff(np.concatenate([np.zeros_like(cum[:1]), cum]), axis=0)  # [STAGES, N, K]
    by_src = np.zeros((STAGES, S, per_stage.shape[2]))
    np.add.at(by_src, (slice(None), src_of_row, slice(None)), per_stage)
    col_share = positive_share(np.moveaxis(by_src, 1, 2))  # [STAGES, K, S]
    rows = []
    own_share = {}
    for k, col in enumerate(data.column_names):
        if col not in src_index:
            continue
        s = src_index[col]
        own_share[col] = col_share[:, k, s]
        rows.append([col] + [pct(own_share[col][j]) for j in range(STAGES)] + [f"{data_share[:, s].mean():.1%}"])
    out.append(
        "\n**Share of a package's own validation column's value that comes from the same package, per stage** "
        "(same metric), and the package's share of the training data\n"
    )
    out.append(common.table(["validation column"] + [f"steps {lab}" for lab in labels] + ["data share"], rows))
    if full:
        rows = []
        for k, col in enumerate(data.column_names):
            ranks = []
            for j in range(STAGES):
                o = np.argsort(-by_src[j, :, k])[:2]
                ranks.append(", ".join(f"{names[x]} {col_share[j, k, x]:.0%}" for x in o))
            rows.append([col, *ranks])
        out.append("\n**Top two packages by value for each validation column, per stage**\n")
        out.append(common.table(["validation column"] + [f"steps {lab}" for lab in labels], rows))

    # mean value per visit (Fig. 11)
    mean_visit = value.sum(1) / visits.sum(1)
    absval = np.zeros(STAGES)
    np.add.at(absval, stage_of, np.abs(val))
    neg = np.zeros(STAGES)
    np.add.at(neg, stage_of, (val < 0).astype(float))
    rows = [[labels[k], f"{mean_visit[k]:.2e}", f"{absval[k] / visits[k].sum():.2e}", f"{neg[k] / visits[k].sum():.1%}",
             f"{run.evals['test'][np.searchsorted(run.eval_steps, bounds[k][1])]:.3f}"] for k in range(STAGES)]
    out.append("\n**Value per chunk visit by stage** (whole validation set)\n")
    out.append(common.table(["steps", "mean value per visit", "mean |value| per visit", "visits with negative value",
                             "test loss at stage end"], rows))
    series = {"labels": labels, "names": names, "order": order, "share": share, "own": own_share,
              "absval": absval / visits.sum(1), "mean": mean_visit}
    return out, series


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--order", type=int, default=2, choices=(1, 2), help="which valued run (default 2)")
    args, clock = common.start(p)
    cfg = lm.study_config(args.quick, size=60)  # six stages of 10 steps
    acfg = lm.adamw(cfg)
    data = lm.load_code_data(cfg)
    runs = {
        f"SGD, order {args.order}": (lm.base_run(cfg, data, order=args.order, fresh=args.fresh), cfg),
        f"AdamW, Adam-aware, order {args.order}": (lm.base_run(acfg, data, order=args.order, fresh=args.fresh), acfg),
        "AdamW, SGD proxy (the paper's way)": (lm.base_run(acfg, data, order=1, fresh=args.fresh, proxy="sgd"), acfg),
    }
    out: list[str] = [
        "**What the audit measured** (at steps 1, 5, 10, 25 and every 50: the exact Shapley values of the step's game for "
        f"{lm.AUDIT['players']} chunks of the batch against the tracker's values of the same game)\n",
        fidelity.table({k: (r.audit, r.meta["seconds"]) for k, (r, _) in runs.items()}),
    ]
    series = {}
    for k, (label, (run, c)) in enumerate(runs.items()):
        lines, series[label] = stage_tables(run, c, data, label, full=k < 2)
        out += lines

    import matplotlib.pyplot as plt

    shown = list(runs)[:2]
    fig, axes = plt.subplots(len(shown), 3, figsize=(17, 4.5 * len(shown)), gridspec_kw={"width_ratios": [1.2, 1, 1]},
                             squeeze=False)
    for row, label in zip(axes, shown):
        sr = series[label]
        x = np.arange(STAGES)
        ax = row[0]
        pos_bottom, neg_bottom = np.zeros(STAGES), np.zeros(STAGES)
        cmap = plt.get_cmap("tab20")
        for i, s in enumerate(sr["order"]):
            h = np.nan_to_num(sr["share"][:, s])
            bottom = np.where(h >= 0, pos_bottom, neg_bottom)
            ax.bar(x, h, bottom=bottom, color=cmap(i % 20), label=sr["names"][s])
            pos_bottom += np.where(h >= 0, h, 0)
            neg_bottom += np.where(h < 0, h, 0)
        ax.set_xticks(x, sr["labels"], rotation=30)
        ax.set_ylabel("share of the stage's positive value")
        ax.set_title(f"{label}: value share by package")
        ax.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax = row[1]
        for col, sh in sr["own"].items():
            ax.plot(x, sh, marker="o", label=f"{col} column ← {col} chunks")
        ax.axhline(1 / len(sr["names"]), color="gray", ls=":", label="equal share")
        ax.set_ylim(0, 1)
        ax.set_xticks(x, sr["labels"], rotation=30)
        ax.set_ylabel("own-package share of the column's value")
        ax.set_title(f"{label}: each package's own column")
        ax.legend(fontsize=7)
        ax = row[2]
        ax.semilogy(x, sr["absval"], marker="o", label="mean |value| per visit")
        ax.semilogy(x, np.maximum(sr["mean"], 1e-12), marker="s", label="mean value per visit")
        ax.set_xticks(x, sr["labels"], rotation=30)
        ax.set_title(f"{label}: value per chunk visit")
        ax.legend()
    cached = " (valued runs loaded from cache)" if all(r.meta.get("cached") for r, _ in runs.values()) else ""
    plots.publish(f"stages{'' if args.order == 2 else '-order1'}", fig, "\n".join(out), clock.summary() + cached, args)


if __name__ == "__main__":
    main()
