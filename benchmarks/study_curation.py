"""Case study 1 (paper §5.3.1): is a well-curated corpus clean, and does removing its
negatively valued data speed up training?

A small GPT-2 trains on chunks of Python's standard library while ``InRunShapley`` (order 2,
trapezoid) values every chunk against held-out modules (7 columns: 6 packages + the rest), twice:
with SGD (cosine lr 1.0 → 0.1, the theory's exact case) and with AdamW (warm-up, cosine decay,
Adam-aware values; the paper's SGD proxy from a third run of the same trajectory); every valued
run audited. Then, for each optimizer:

1. the fraction of chunks with a negative value (order 1 and order 2), by package, and the most
   negative chunks;
2. retraining, as the author asked in GhostSuite issue #4: every run samples *only* from the
   chunks the valued run saw, minus the removed ones, for the same number of steps (so all runs
   see the same number of tokens); "minus negative" removes every chunk with a negative
   order-2 value, "minus random" removes a random subset of the same size, "full" removes
   nothing. Same seed = same initialization and data-order generator. 3 seeds. The loss is
   measured on held-out chunks *disjoint* from the valuation columns ("test") and on the
   valuation columns themselves ("valuation set"). The AdamW runs retrain with AdamW, without
   the Adam-aware negatives and without the SGD proxy's negatives, each against a random removal
   of the same size.

    PYTHONPATH=src python benchmarks/study_curation.py            # full settings
    PYTHONPATH=src python benchmarks/study_curation.py --quick    # smoke test
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import common  # noqa: I001  (first: sets the OpenMP wait policy before torch loads)

import numpy as np
import torch

from studies import fidelity, lm, plots

SEEDS = (0, 1, 2)


def negatives(label: str, cfg: lm.LMConfig, base: lm.LMRun, data: lm.CodeData, proxy: lm.LMRun | None) -> list[str]:
    """How many chunks have a negative value, by package, and the most negative and positive ones."""
    chunks = data.train.chunks
    seen = base.count > 0
    v2, v1 = base.value, base.first
    sources = np.array([c.source for c in chunks])
    out = [
        f"\n### {label}\n",
        f"Valued run: {cfg.steps} steps ({lm.describe(cfg)}) × {cfg.batch} chunks of {cfg.length} bytes, {seen.sum()} of "
        f"{len(chunks)} training chunks seen; final test loss {base.evals['test'][-1]:.3f} nats/byte.",
        f"Negative values: order 2 {np.mean(v2[seen] < 0):.1%}, order 1 {np.mean(v1[seen] < 0):.1%} of seen chunks"
        + (f", SGD proxy {np.mean(proxy.value[seen] < 0):.1%}" if proxy is not None else "")
        + " (the paper: ~16% at order 2 on the Pile; GhostSuite issue #4: ~34% at order 1).",
    ]
    rows = []
    n_neg = max(1, int((v2[seen] < 0).sum()))
    for s in sorted(set(sources[seen]), key=lambda s: -np.mean(v2[seen & (sources == s)] < 0)):
        m = seen & (sources == s)
        rows.append([
            s, int(m.sum()), f"{m.sum() / seen.sum():.1%}", f"{np.mean(v1[m] < 0):.0%}", f"{np.mean(v2[m] < 0):.0%}",
            *([f"{np.mean(proxy.value[m] < 0):.0%}"] if proxy is not None else []),
            f"{(m & (v2 < 0)).sum() / n_neg:.1%}", f"{v2[m].sum() / v2[seen].sum():+.1%}",
        ])
    out.append("\n**Negative values by package** (seen chunks)\n")
    out.append(common.table(
        ["package", "chunks", "share of data", "negative (order 1)", "negative (order 2)"]
        + (["negative (SGD proxy)"] if proxy is not None else [])
        + ["share of all order-2 negatives", "share of total value"],
        rows,
    ))
    order = np.argsort(v2)
    for title, picks in (("The 8 most negative chunks", [r for r in order if seen[r]][:8]),
                         ("The 4 most positive chunks", [r for r in order[::-1] if seen[r]][:4])):
        rows = [[f"{v2[r]:.2e}", chunks[r].source, f"`{chunks[r].location}`", f"`{common.preview(chunks[r].text, 70)}`"]
                for r in picks]
        out.append(f"\n**{title}** (order 2)\n")
        out.append(common.table(["value", "package", "file@byte", "text"], rows))
    return out


def retrain(
    cfg: lm.LMConfig, data: lm.CodeData, pool: np.ndarray, removals: dict[str, np.ndarray], seeds: tuple[int, ...],
    fresh: bool, tag: str,
) -> dict[str, list[lm.LMRun]]:
    """Retrain from scratch on ``pool`` minus each removal (per seed a random removal of the same
    size as each rule's, drawn from the seed), for ``cfg.steps`` steps with ``cfg``'s recipe."""
    ids = [c.id for c in data.train.chunks]
    val_all = torch.cat(list(data.columns))
    runs: dict[str, list[lm.LMRun]] = {}
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        arms = {"full": np.zeros(0, dtype=np.int64)}
        for name, removed in removals.items():
            arms[name] = removed
            random_name = f"minus random (size of {name[6:]})" if len(removals) > 1 else "minus random"
            arms[random_name] = rng.choice(pool, size=len(removed), replace=False)
        for arm, removed in arms.items():
            keep = np.setdiff1d(pool, removed)
            settings = {"cfg": dataclasses.asdict(cfg), "seed": seed, "keep": common.key(keep.tolist()), "kind": "retrain-v3"}
            run = lm.cached_run(
                f"retrain-{tag}", settings, fresh,
                lambda keep=keep, seed=seed: lm.train_lm(
                    cfg, data.train.tokens, ids, seed=seed, pool=keep,
                    evals={"test": data.test, "valuation set": val_all}, keep_state=False,
                ),
            )
            run.meta["kept"] = len(keep)
            runs.setdefault(arm, []).append(run)
            common.log(f"{tag} seed {seed} {arm:>30}: {len(keep)} chunks kept, final test loss {run.evals['test'][-1]:.4f}")
    return runs


def retrain_tables(runs: dict[str, list[lm.LMRun]], cfg: lm.LMConfig, pool: np.ndarray, label: str, n_test: int) -> list[str]:
    steps = runs["full"][0].eval_steps
    at = int(np.searchsorted(steps, 3 * cfg.steps // 4))
    targets = {
        f"full-data loss at step {steps[at]}": float(np.mean([r.evals["test"][at] for r in runs["full"]])),
        "full-data final loss": float(np.mean([r.evals["test"][-1] for r in runs["full"]])),
    }

    def reach(curve: np.ndarray, level: float) -> float:
        hit = np.flatnonzero(curve <= level)
        return float(steps[hit[0]]) if hit.size else np.nan

    rows = []
    for arm, rs in runs.items():
        cells = []
        for level in targets.values():
            hits = [reach(r.evals["test"], level) for r in rs]
            cells.append(common.mean_std(hits, 0) + (f" ({sum(np.isnan(hits))} of {len(hits)} never)" if any(np.isnan(hits)) else ""))
        rows.append([arm, rs[0].meta["kept"], common.mean_std([r.evals["test"][-1] for r in rs], 4),
                     common.mean_std([r.evals["valuation set"][-1] for r in rs], 4), *cells])
    out = [
        f"\n**Retraining, {label}** ({len(runs['full'])} seeds; {cfg.steps} steps each, {lm.describe(cfg)}; every run samples "
        f"only from the {len(pool)} chunks the valued run saw, minus the removed ones; test loss every {cfg.eval_every} steps "
        f"on {n_test} held-out chunks; targets: "
        + ", ".join(f"{k} = {v:.4f}" for k, v in targets.items()) + ")\n",
        common.table(["run", "chunks sampled from", "final test loss", "final valuation-set loss"]
                     + [f"first step at {k} (mean (std) over seeds)" for k in targets], rows),
    ]
    for arm in runs:
        if not arm.startswith("minus negative"):
            continue
        rnd = "minus random" if "minus random" in runs else f"minus random (size of {arm[6:]})"
        for key in ("test", "valuation set"):
            for other in (rnd, "full"):
                paired = [r.evals[key][-1] - q.evals[key][-1] for r, q in zip(runs[arm], runs[other])]
                out.append(
                    f"\nPaired difference of final {key} loss, {arm} − {other} (same seed): "
                    f"{common.mean_std(paired, 4)}; per seed {', '.join(f'{x:+.4f}' for x in paired)}."
                )
    return out


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="retraining seeds (default 3)")
    args, clock = common.start(p)
    cfg = lm.study_config(args.quick)
    acfg = lm.adamw(cfg)
    seeds = SEEDS[: args.seeds] if not args.quick else (0, 1)
    data = lm.load_code_data(cfg)
    sgd = lm.base_run(cfg, data, order=2, fresh=args.fresh)
    adam = lm.base_run(acfg, data, order=2, fresh=args.fresh)
    proxy = lm.base_run(acfg, data, order=1, fresh=args.fresh, proxy="sgd")
    out: list[str] = [
        "**What the audit measured** (at steps 1, 5, 10, 25 and every 50: the exact Shapley values of the step's game for "
        f"{lm.AUDIT['players']} chunks of the batch against the tracker's values of the same game)\n",
        fidelity.table({"SGD, order 2": (sgd.audit, sgd.meta["seconds"]),
                        "AdamW, Adam-aware, order 2": (adam.audit, adam.meta["seconds"]),
                        "AdamW, SGD proxy (the paper's way)": (proxy.audit, proxy.meta["seconds"])}),
    ]
    out += negatives("SGD (cosine lr 1.0 → 0.1)", cfg, sgd, data, None)
    out += negatives("AdamW (warm-up, cosine decay), Adam-aware values", acfg, adam, data, proxy)

    results = {}
    for label, c, base, removals in (
        ("SGD", cfg, sgd, lambda pool: {"minus negative": pool[sgd.value[pool] < 0]}),
        ("AdamW", acfg, adam, lambda pool: {"minus negative (Adam-aware)": pool[adam.value[pool] < 0],
                                            "minus negative (SGD proxy)": pool[proxy.value[pool] < 0]}),
    ):
        pool = np.flatnonzero(base.count > 0)
        rem = removals(pool)
        runs = retrain(c, data, pool, rem, seeds, args.fresh, c.optimizer)
        results[label] = runs
        out.append(f"\n### Retraining without the negatively valued chunks: {label}\n")
        out.append("Removed: " + "; ".join(f"{k[6:]} {len(v)} chunks ({len(v) / len(pool):.0%})" for k, v in rem.items()) + ".")
        out += retrain_tables(runs, c, pool, label, len(data.test))

    # ---------------------------------------------------------------- plot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    palette = ["k", "tab:red", "tab:blue", "tab:orange", "tab:cyan"]
    for row, (label, runs) in zip(axes, results.items()):
        steps = runs["full"][0].eval_steps
        colors = dict(zip(runs, palette))
        for ax, key in zip(row[:2], ("test", "valuation set")):
            for arm, rs in runs.items():
                curves = np.stack([r.evals[key] for r in rs])
                mu, sd = curves.mean(0), curves.std(0)
                ax.plot(steps, mu, color=colors[arm], label=arm, lw=1.2)
                ax.fill_between(steps, mu - sd, mu + sd, color=colors[arm], alpha=0.12)
            ax.set_xlabel("step")
            ax.set_ylabel(f"{key} loss (nats/byte)")
            ax.set_ylim(None, float(np.mean([r.evals[key][len(steps) // 6] for r in runs["full"]])))
            ax.legend(fontsize=7)
            ax.set_title(f"{label}: {key} loss, mean ± std over {len(runs['full'])} seeds")
        ax = row[2]
        for arm, rs in runs.items():
            if arm == "full":
                continue
            diff = np.stack([r.evals["test"] - f.evals["test"] for r, f in zip(rs, runs["full"])])
            ax.plot(steps, diff.mean(0), color=colors[arm], label=f"{arm} − full", lw=1.2)
            ax.fill_between(steps, diff.mean(0) - diff.std(0), diff.mean(0) + diff.std(0), color=colors[arm], alpha=0.12)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylim(-0.15, 0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss difference (nats/byte)")
        ax.set_title(f"{label}: paired with the full-data run of the same seed")
        ax.legend(fontsize=7)
    all_runs = [sgd, adam, proxy] + [r for runs in results.values() for rs in runs.values() for r in rs]
    n_cached = sum(bool(r.meta.get("cached")) for r in all_runs)
    note = f" ({n_cached} of {len(all_runs)} training runs loaded from cache)" if n_cached else ""
    plots.publish("curation", fig, "\n".join(out), clock.summary() + note, args)


if __name__ == "__main__":
    main()
