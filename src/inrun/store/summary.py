"""A run's headline numbers: totals, most helpful and harmful examples, value per source.

When the examples have a length (``examples.parquet``'s ``length`` column: tokens that count in
the loss), the Spearman correlation between length and value is reported, with a warning from
|ρ| ≥ 0.3: with a token-mean loss an example's share of the loss grows with its length, so its
value does too, and a ranking by value is then partly a ranking by length.

Examples that never were in a valued step (count 0) have no value and are left out of shares
and rankings; they are counted separately. "Most helpful" lists only positive values and "most
harmful" only negative ones, so a run with few negative values shows a short harmful list.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..files import write_json
from ..tracking.drop import decompose
from .rundir import SUMMARY_FILE, RunDir

NO_SOURCE = "(no source)"
LENGTH_WARNING = 0.3  # |Spearman ρ| between length and value from which the summary warns
MIN_FOR_LENGTH = 20

logger = logging.getLogger(__name__)


def value_frame(rd: RunDir) -> Any:
    """``pandas.DataFrame``: one row per training example with value, count, source, preview."""
    import pandas as pd

    v = rd.ledger().values()
    values = pd.DataFrame(
        {
            "id": v.ids(),
            "value": v.value,
            "first_order": v.first_order,
            "second_order": v.second_order,
            "count": v.counts,
            "ledger_source": v.sources,
        }
    )
    examples = rd.examples()
    if len(examples):
        frame = examples.merge(values, on="id", how="outer")
    else:
        frame = values.assign(source=None, location="", preview="")
    frame["source"] = frame["source"].fillna(frame["ledger_source"]).fillna(NO_SOURCE)
    for col in ("value", "first_order", "second_order"):
        frame[col] = frame[col].fillna(0.0)
    frame["count"] = frame["count"].fillna(0).astype(np.int64)
    frame["location"] = frame["location"].fillna("")
    frame["preview"] = frame["preview"].fillna("")
    return frame.drop(columns=["ledger_source"])


def summarize(rd: RunDir, top: int = 8) -> dict[str, Any]:
    """The summary dict of a run (also written to ``summary.json`` at the end of a run)."""
    frame = value_frame(rd)
    valued = frame[frame["count"] > 0]
    metrics = rd.metrics()
    ledger = rd.ledger()
    train = [x for x, s in zip(metrics.train_loss, metrics.skipped) if not s and np.isfinite(x)]
    vals = [x for x in metrics.val_loss if np.isfinite(x)]
    status = rd.status()

    def rows(part: Any) -> list[dict[str, Any]]:
        return [
            {
                "id": _plain(r.id), "value": float(r.value), "count": int(r["count"]),
                "source": r.source, "location": r.location, "preview": r.preview,
            }
            for _, r in part.iterrows()
        ]

    ranked = valued.sort_values("value", kind="stable")
    per_source = {}
    for source, g in valued.groupby("source", sort=False):
        per_source[str(source)] = {
            "examples": len(g),
            "total": float(g["value"].sum()),
            "mean": float(g["value"].mean()),
            "negative_share": float((g["value"] < 0).mean()),
        }
    per_source = dict(sorted(per_source.items(), key=lambda kv: -kv[1]["total"]))
    audit = rd.audit()
    drops = rd.drops()
    rho = length_correlation(valued)
    warnings = []
    packed = _packed(rd.meta(), len(frame))
    if rho is not None and abs(rho) >= LENGTH_WARNING and packed:
        warnings.append(
            f"values correlate with the documents' lengths (Spearman {rho:+.2f} over {len(valued):,} documents): "
            "a packed batch's loss is a mean over its tokens, so a document's share grows with its tokens; "
            "compare value / length (the value per token) to rank documents alike"
        )
    elif rho is not None and abs(rho) >= LENGTH_WARNING:
        warnings.append(
            f"values correlate with the examples' lengths (Spearman {rho:+.2f} over {len(valued):,} examples): "
            "with a token-mean loss an example's share of the loss grows with its length; average each "
            "example's own tokens first to value examples alike (docs/guide-pytorch.md, Padding)"
        )
    return {
        **packed,
        "run_dir": str(rd.path),
        "state": status.get("state"),
        "steps": int(metrics.step[-1]) if metrics.step else 0,
        "seconds": status.get("seconds"),
        "examples": len(frame),
        "examples_valued": len(valued),
        "total_value": float(valued["value"].sum()),
        "negative_share": float((valued["value"] < 0).mean()) if len(valued) else 0.0,
        "skipped_steps": ledger.skipped,
        "train_loss_first": float(np.mean(train[:10])) if train else float("nan"),
        "train_loss_last": float(np.mean(train[-10:])) if train else float("nan"),
        "val_loss_first": vals[0] if vals else float("nan"),
        "val_loss_final": vals[-1] if vals else float("nan"),
        "most_helpful": rows(ranked[ranked["value"] > 0].iloc[::-1].head(top)),
        "most_harmful": rows(ranked[ranked["value"] < 0].head(top)),
        "per_source": per_source,
        "audit": None if audit is None else _finite(audit.summary()),
        "drop": None if drops is None else _finite(decompose(drops).to_dict()),
        "length_correlation": rho,
        "warnings": warnings,
    }


def _packed(meta: dict[str, Any], documents: int) -> dict[str, Any]:
    """``{"packed": {documents, rows, length}}`` for a run of packed documents (``data.pack``),
    so that what reads the summary says documents; ``{}`` otherwise."""
    rows = meta.get("packed_rows")
    if not rows:
        return {}
    length = ((meta.get("config") or {}).get("data") or {}).get("length")
    return {"packed": {"documents": documents, "rows": int(rows), "length": length}}


def unit(summary: dict[str, Any]) -> str:
    """What a run values: ``"documents"`` (packed several to a row) or ``"examples"``."""
    return "documents" if summary.get("packed") else "examples"


def packed_line(summary: dict[str, Any]) -> str:
    """How the documents of a packed run were laid out (``""``: not packed)."""
    p = summary.get("packed")
    if not p:
        return ""
    return (f"{p['documents']:,} documents packed into {p['rows']:,} rows of {p['length']} tokens, each document "
            "valued on its own (position_ids restart per document, so each attends only to itself)")


def length_correlation(valued: Any) -> float | None:
    """Spearman ρ between the ``length`` and ``value`` of valued examples (``None`` without lengths)."""
    if "length" not in valued or valued["length"].notna().sum() < MIN_FOR_LENGTH:
        return None
    both = valued[["length", "value"]].dropna()
    if both["length"].nunique() < 2 or both["value"].nunique() < 2:
        return None
    ranks = both.rank(method="average")
    return float(np.corrcoef(ranks["length"], ranks["value"])[0, 1])


def write_summary(rd: RunDir) -> dict[str, Any]:
    """Compute the summary and write ``summary.json``."""
    summary = summarize(rd)
    for warning in summary["warnings"]:
        logger.warning("%s: %s", rd.path, warning)
    write_json(rd.file(SUMMARY_FILE), summary)
    return summary


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN as ``None``, so summary.json stays strict JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x
