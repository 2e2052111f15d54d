"""Case study 3 (paper §5.3.3, Table 2): does a training chunk contribute to text that only
paraphrases it?

Source functions are picked from training modules of Python's standard library (undecorated
functions of 129–256 bytes with at least 3 statements whose restructured version differs; one
per package, in a fixed hash order). Each becomes one training chunk (its 256 bytes from the
``def``; the regular chunks overlapping it are removed). For each source, four validation items:

1. identical: the function's exact text (a part of the training chunk);
2. renamed: every name the function binds replaced consistently (tokenize);
3. renamed + restructured: also docstring and comments dropped, layout normalized, if/else
   inverted, ``x += y`` expanded, independent adjacent statements swapped (ast);
4. same topic: the nearest other function of the same module, not inside the source chunk.

A small GPT-2 trains on all chunks with ``InRunShapley`` valuing every chunk for each item (one
validation column per item): with SGD (order 1 and order 2 in two runs with the same seed) and
with AdamW (warm-up, cosine decay; Adam-aware order 2, and the paper's SGD proxy in a run of the
same trajectory); every valued run audited. The metric is the rank of the source chunk among all
training chunks for each item (1 = most valuable), averaged over the sources, for: the In-Run
values, gradient similarity at each final checkpoint only (dot and cosine), and BM25.

    PYTHONPATH=src python benchmarks/study_paraphrase.py
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import common  # noqa: I001

import numpy as np
import torch

from inrun.analysis.baselines import BM25, code_terms
from inrun.run.data.stdlib import is_validation_file, iter_source_files, load_stdlib_corpus, stdlib_root
from studies import fidelity, lm, plots
from studies import paraphrase as para

LEVELS = ("identical", "renamed", "renamed + restructured", "same topic")
CONFIG = lm.LMConfig(length=256, batch=8, steps=350, max_train_per_source=150, eval_every=50, n_test=64)
N_SOURCES = 4
MAX_SIMILARITY = 0.8  # restructured vs original (difflib ratio): keep "significant" paraphrases


def pick_sources(cfg: lm.LMConfig, n: int) -> list[dict]:
    """Source functions with their four validation texts, deterministic."""
    root = stdlib_root()
    L = cfg.length
    cands = []
    for rel, source in iter_source_files(root):
        if source not in cfg.packages or is_validation_file(rel, 0.1):
            continue
        data = (root / rel).read_bytes()
        fns = para.find_functions(data, rel.as_posix())
        for f in fns:
            size = len(f.text.encode())
            if not (129 <= size <= L and f.statements >= 3) or f.start + L > len(data):
                continue
            try:
                if para.has_fstring(f.text):
                    continue
                seed = int(hashlib.sha1(f"{rel}:{f.start}".encode()).hexdigest()[:8], 16)
                mapping = para.rename_map(f.text, seed)
                renamed = para.rename(f.text, mapping)
                restructured, changes = para.restructure(f.text, mapping)
            except (SyntaxError, ValueError, IndentationError):
                continue
            ratio = difflib.SequenceMatcher(None, f.text, restructured).ratio()
            if not changes or ratio > MAX_SIMILARITY:
                continue
            window = (f.start, f.start + L)
            partners = [
                g for g in fns
                if g is not f and 60 <= len(g.text.encode()) <= L
                and (g.start >= window[1] or g.start + len(g.text.encode()) <= window[0])
            ]
            if not partners:
                continue
            topic = min(partners, key=lambda g: abs(g.start - f.start))
            cands.append({
                "key": hashlib.sha1(f"{rel}:{f.start}".encode()).hexdigest(), "source": source, "path": rel.as_posix(),
                "start": f.start, "name": f.name, "chunk": data[f.start : f.start + L], "changes": changes,
                "texts": [f.text, renamed, restructured, topic.text], "topic": f"{topic.name} (line {topic.lineno})",
            })
    picked, used = [], set()
    for c in sorted(cands, key=lambda c: c["key"]):
        if c["source"] in used:
            continue
        picked.append(c)
        used.add(c["source"])
        if len(picked) == n:
            break
    common.log(f"{len(cands)} candidate functions, picked {len(picked)}")
    return picked


def rank_of(scores: np.ndarray, row: int) -> float:
    """1-based rank of ``row`` by descending score; ties share the mean rank."""
    s = scores[row]
    return 1 + float((scores > s).sum()) + float((scores == s).sum() - 1) / 2


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=N_SOURCES)
    args, clock = common.start(p)
    cfg = CONFIG
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=30, max_train_per_source=20, eval_every=10)
    sources = pick_sources(cfg, args.sources if not args.quick else 2)
    train, held = load_stdlib_corpus(cfg.packages, length=cfg.length, max_train_per_source=cfg.max_train_per_source)
    # the regular chunks overlapping a source chunk are removed; the source chunk is added
    drop = set()
    for s in sources:
        for c in train.chunks:
            if c.path == s["path"] and s["start"] - cfg.length < c.start < s["start"] + cfg.length:
                drop.add(c.id)
    keep = [r for r, c in enumerate(train.chunks) if c.id not in drop]
    ids = [train.chunks[r].id for r in keep] + [2_000_000 + k for k in range(len(sources))]
    texts = [train.chunks[r].text for r in keep] + [s["chunk"].decode("utf-8", errors="replace") for s in sources]
    [train.chunks[r].source for r in keep] + [s["source"] for s in sources]
    tokens = torch.cat([train.tokens[keep], torch.tensor([list(s["chunk"]) for s in sources], dtype=torch.long)])
    src_rows = [len(keep) + k for k in range(len(sources))]

    def tok(text: str) -> torch.Tensor:
        return torch.tensor([list(text.encode()[: cfg.length])], dtype=torch.long)

    columns = [tok(t) for s in sources for t in s["texts"]]
    acfg = lm.adamw(cfg)
    runs = {}
    for key, c, order, proxy in (("SGD o1", cfg, 1, None), ("SGD o2", cfg, 2, None), ("AdamW o2", acfg, 2, None),
                                 ("AdamW proxy", acfg, 1, "sgd")):
        settings = {"cfg": dataclasses.asdict(c), "sources": [s["key"] for s in sources], "order": order, "proxy": proxy,
                    "audit": lm.AUDIT, "kind": "paraphrase-v3"}
        runs[key] = lm.cached_run(
            f"paraphrase-{c.optimizer}-o{order}" + ("-proxy" if proxy else ""), settings, args.fresh,
            lambda c=c, order=order, proxy=proxy, key=key: lm.train_lm(
                c, tokens, ids, seed=0, order=order, columns=columns, proxy=proxy, audit=lm.AUDIT,
                evals={"test": held.tokens[: cfg.n_test]}, progress=f"paraphrase run ({key})",
            ),
        )
    scores = {
        "In-Run, order 1 (SGD run)": runs["SGD o1"].per_val, "In-Run, order 2 (SGD run)": runs["SGD o2"].per_val,
        "In-Run, Adam-aware order 2 (AdamW run)": runs["AdamW o2"].per_val,
        "In-Run, SGD proxy (AdamW run)": runs["AdamW proxy"].per_val,
    }
    for label, key, c in (("SGD", "SGD o2", cfg), ("AdamW", "AdamW o2", acfg)):
        t0 = clock.wall()
        dot, cos = lm.final_gradient_similarity(runs[key].model(c), tokens, columns, batch=16)
        common.log(f"final-checkpoint gradients of {len(ids)} chunks ({label} model): {clock.wall() - t0:.0f} s")
        scores[f"grad·grad, final checkpoint ({label} model)"] = dot
        scores[f"grad cosine, final checkpoint ({label} model)"] = cos
    bm = BM25([code_terms(t) for t in texts])
    scores["BM25"] = np.stack([bm.scores(code_terms(t)) for s in sources for t in s["texts"]], axis=1)
    # diagnostic, not the paper's value: each step's values divided by the absolute sum of that
    # step's values (per item), the per-iteration normalization suggested in GhostSuite issue #1
    for label, key in (("order 1 (SGD run)", "SGD o1"), ("order 2 (SGD run)", "SGD o2"), ("Adam-aware (AdamW run)", "AdamW o2")):
        scores[f"In-Run, {label}, each step normalized (diagnostic)"] = runs[key].per_val_normalized

    ranks = {m: np.zeros((len(sources), len(LEVELS))) for m in scores}
    for m, sc in scores.items():
        for k, row in enumerate(src_rows):
            for j in range(len(LEVELS)):
                ranks[m][k, j] = rank_of(sc[:, 4 * k + j], row)
    count = runs["SGD o2"].count[src_rows]
    plan = lm.batch_order(len(ids), cfg.steps, cfg.batch, 0)  # the data order of every run (seed 0)
    visits = [np.flatnonzero((plan == row).any(axis=1)).tolist() for row in src_rows]
    out = [
        "**What the audit measured** (at steps 1, 5, 10, 25 and every 50: the exact Shapley values of the step's game for "
        f"{lm.AUDIT['players']} chunks of the batch against the tracker's values of the same game)\n",
        fidelity.table({k: (r.audit, r.meta["seconds"]) for k, r in runs.items()}),
        f"\n{len(ids)} training chunks of {cfg.length} bytes; {cfg.steps} steps of {cfg.batch} chunks, with SGD ({lm.describe(cfg)}; "
        f"final test loss {runs['SGD o2'].evals['test'][-1]:.3f} nats/byte) and with AdamW ({lm.describe(acfg)}; final test loss "
        f"{runs['AdamW o2'].evals['test'][-1]:.3f}); the same data order. "
        f"Each source chunk was in {', '.join(str(int(c)) for c in count)} batch(es).",
    ]
    out.append(f"\n**Mean rank of the source chunk among all {len(ids)} training chunks** (1 = top; mean over {len(sources)} sources)\n")
    out.append(common.table(
        ["validation item", *list(scores)],
        [[lvl] + [f"{ranks[m][:, j].mean():.1f}" for m in scores] for j, lvl in enumerate(LEVELS)],
    ))
    out.append("\n**Per source** (ranks for SGD order 2 / AdamW Adam-aware / grad cosine at the AdamW final checkpoint / BM25)\n")
    rows = []
    for k, s in enumerate(sources):
        rows.append([f"`{s['path']}` `{s['name']}`", ", ".join(s["changes"]), s["topic"], ", ".join(map(str, visits[k]))] + [
            f"{ranks['In-Run, order 2 (SGD run)'][k, j]:.0f} / {ranks['In-Run, Adam-aware order 2 (AdamW run)'][k, j]:.0f} / "
            f"{ranks['grad cosine, final checkpoint (AdamW model)'][k, j]:.0f} / {ranks['BM25'][k, j]:.0f}"
            for j in range(len(LEVELS))
        ])
    out.append(common.table(["source function", "restructuring applied", "same-topic function", "trained on at step(s)", *list(LEVELS)], rows))
    s = sources[0]
    out.append(f"\n**The four validation items of the first source** (`{s['path']}`)\n")
    for lvl, t in zip(LEVELS, s["texts"]):
        out.append(f"{lvl}:\n\n```python\n{t}\n```\n")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    w = 0.8 / len([m for m in scores if "diagnostic" not in m])
    x = np.arange(len(LEVELS))
    for i, (m, r) in enumerate((m, r) for m, r in ranks.items() if "diagnostic" not in m):
        ax.bar(x + i * w, r.mean(0), width=w, label=m)
        ax.scatter(np.repeat(x + i * w, len(sources)), r.T.ravel(), color="k", s=6, zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x + 0.4 - w / 2, LEVELS)
    ax.set_ylabel(f"rank of the source chunk (of {len(ids)})")
    ax.set_title("mean rank (bars) and each source (dots); lower is better")
    ax.legend(fontsize=7)
    cached = all(r.meta.get("cached") for r in runs.values())
    plots.publish("paraphrase", fig, "\n".join(out), clock.summary() + (" (valued runs loaded from cache)" if cached else ""), args)


if __name__ == "__main__":
    main()
