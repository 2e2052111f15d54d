"""Case study 4 (paper App. E.5.1, Table 3): do the values find the validation data's domain?

For each package with held-out modules (email, asyncio, xml, unittest, logging, encodings), a
validation column of 4 held-out chunks of that package. Training chunks are ranked by their
value for that column; the metric is the paper's normalized recall@k: the fraction of the top k
that come from the same package, divided by that package's share of the training chunks (1 =
no better than random). Methods: In-Run values of an SGD run (order 1 and order 2: two valued
runs, same seed, so the same trajectory) and of an AdamW run (Adam-aware order 2, and the
paper's SGD proxy on the same trajectory), gradient similarity at each final checkpoint only
(dot and cosine; per-example gradients by ``inrun.exact``), and BM25 (k1 = 1.5, b = 0.75) on
code terms with the column's text as the query. Every valued run is audited.

    PYTHONPATH=src python benchmarks/study_domains.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import common  # noqa: I001

import numpy as np

from inrun.analysis.baselines import BM25, code_terms
from studies import fidelity, lm, plots

KS = (25, 100)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    args, clock = common.start(p)
    cfg = lm.study_config(args.quick)
    data = lm.load_code_data(cfg)
    chunks = data.train.chunks
    sources = np.array([c.source for c in chunks])
    runs = {o: lm.base_run(cfg, data, order=o, fresh=args.fresh) for o in (2, 1)}
    acfg = lm.adamw(cfg)
    adam = lm.base_run(acfg, data, order=2, fresh=args.fresh)
    proxy = lm.base_run(acfg, data, order=1, fresh=args.fresh, proxy="sgd")
    for a, b, what in ((runs[1], runs[2], "SGD order-1 and order-2"), (adam, proxy, "AdamW Adam-aware and SGD-proxy")):
        drift = float(np.max([np.abs(a.state[k] - b.state[k]).max() for k in a.state]))
        common.log(f"final parameters of the {what} runs differ by at most {drift:.1e}")
    scores: dict[str, np.ndarray] = {
        "In-Run, order 1 (SGD run)": runs[1].per_val,
        "In-Run, order 2 (SGD run)": runs[2].per_val,
        "In-Run, Adam-aware order 2 (AdamW run)": adam.per_val,
        "In-Run, SGD proxy (AdamW run)": proxy.per_val,
    }
    # Diagnostics (not the paper's method): the run's early steps carry most of the value (see the
    # stages study), so also rank by the value of the last third of training only, and by values
    # with every step's values divided by the absolute sum of that step's values (per column), the
    # per-iteration normalization the author suggested in GhostSuite issue #1.
    snaps = runs[2].snapshots.astype(np.float64)
    last = int(np.searchsorted(runs[2].snap_steps, 2 * cfg.steps // 3))
    asnaps = adam.snapshots.astype(np.float64)
    diag = {
        f"In-Run, order 2 (SGD run), steps {runs[2].snap_steps[last]}–{cfg.steps} only (diagnostic)": snaps[-1] - snaps[last],
        "In-Run, order 2 (SGD run), each step normalized (diagnostic)": runs[2].per_val_normalized,
        f"In-Run, Adam-aware (AdamW run), steps {adam.snap_steps[last]}–{cfg.steps} only (diagnostic)": asnaps[-1] - asnaps[last],
        "In-Run, Adam-aware (AdamW run), each step normalized (diagnostic)": adam.per_val_normalized,
    }
    for label, run, c in (("SGD", runs[2], cfg), ("AdamW", adam, acfg)):
        t0 = clock.wall()
        dot, cos = lm.final_gradient_similarity(run.model(c), data.train.tokens, data.columns)
        common.log(f"final-checkpoint gradients of {len(chunks)} chunks ({label} model): {clock.wall() - t0:.0f} s")
        scores[f"grad·grad, final checkpoint ({label} model)"] = dot
        scores[f"grad cosine, final checkpoint ({label} model)"] = cos
    bm = BM25([code_terms(c.text) for c in chunks])
    scores["BM25"] = np.stack(
        [bm.scores(code_terms("\n".join(c.text for c in col))) for col in data.column_chunks], axis=1
    )
    scores.update(diag)
    domains = [d for d in data.column_names if d in set(sources)]
    share = {d: np.mean(sources == d) for d in domains}
    out: list[str] = [
        "**What the audit measured** (at steps 1, 5, 10, 25 and every 50: the exact Shapley values of the step's game for "
        f"{lm.AUDIT['players']} chunks of the batch against the tracker's values of the same game)\n",
        fidelity.table({"SGD, order 1": (runs[1].audit, runs[1].meta["seconds"]),
                        "SGD, order 2": (runs[2].audit, runs[2].meta["seconds"]),
                        "AdamW, Adam-aware, order 2": (adam.audit, adam.meta["seconds"]),
                        "AdamW, SGD proxy": (proxy.audit, proxy.meta["seconds"])}),
        f"\nSGD run: {lm.describe(cfg)}, final test loss {runs[2].evals['test'][-1]:.3f}; AdamW run: {lm.describe(acfg)}, "
        f"final test loss {adam.evals['test'][-1]:.3f} nats/byte.\n",
        f"{len(chunks)} training chunks; package shares: "
        + ", ".join(f"{d} {share[d]:.1%}" for d in domains)
        + f" (so the best possible normalized recall is {1 / max(share.values()):.1f}–{1 / min(share.values()):.1f})."
    ]
    results: dict[int, dict[str, list[float]]] = {}
    for k in KS:
        rows = []
        results[k] = {}
        for method, sc in scores.items():
            rec = []
            for d in domains:
                col = data.column_names.index(d)
                top = np.argsort(-sc[:, col], kind="stable")[:k]
                rec.append(np.mean(sources[top] == d) / share[d])
            results[k][method] = rec
            rows.append([method] + [f"{r:.1f}" for r in rec] + [f"**{np.mean(rec):.1f}**"])
        out.append(f"\n**Normalized recall@{k}** (top {k} of {len(chunks)} = {k / len(chunks):.1%}; 1.0 = random)\n")
        out.append(common.table(["method", *domains, "mean"], rows))
    # what the top of each ranking looks like, for one column
    col = data.column_names.index(domains[0])
    out.append(f"\n**Top 5 chunks for the `{domains[0]}` column** (package, text)\n")
    rows = []
    for method in ("In-Run, order 2 (SGD run)", "In-Run, Adam-aware order 2 (AdamW run)", "grad cosine, final checkpoint (AdamW model)", "BM25"):
        top = np.argsort(-scores[method][:, col], kind="stable")[:5]
        rows.append([method, "<br>".join(f"{sources[r]}: `{common.preview(chunks[r].text, 50)}`" for r in top)])
    out.append(common.table(["method", "top 5"], rows))

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KS), figsize=(8 * len(KS), 4.6))
    for ax, k in zip(np.atleast_1d(axes), KS):
        w = 0.8 / len([m for m in scores if "diagnostic" not in m])
        x = np.arange(len(domains))
        for i, (method, rec) in enumerate((m, r) for m, r in results[k].items() if "diagnostic" not in m):
            ax.bar(x + i * w, rec, width=w, label=method)
        ax.axhline(1, color="k", lw=0.8, ls=":")
        ax.set_xticks(x + 0.4 - w / 2, domains)
        ax.set_ylabel(f"normalized recall@{k}")
        ax.set_title(f"same-package share of the top {k}, over the package's data share")
        ax.legend(fontsize=7)
    cached = all(r.meta.get("cached") for r in [*runs.values(), adam, proxy])
    plots.publish("domains", fig, "\n".join(out), clock.summary() + (" (valued runs loaded from cache)" if cached else ""), args)


if __name__ == "__main__":
    main()
