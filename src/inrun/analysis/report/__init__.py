"""``inrun report RUN_DIR``: one self-contained HTML page about a run's values.

The page has no external resources (no scripts, fonts or stylesheets; the PNG plots are embedded
as base64), so it can be mailed or archived as one file. Sections:

* headline numbers: examples valued, share of negative values, validation loss, and the run's
  measured drop decomposed in one line (data-free parts + the steps' games; games = values +
  Taylor remainder);
* what the values explain: a waterfall from the values to the measured drop, each step's
  efficiency against its band, the decomposition by stage;
* value distribution;
* the most helpful and most harmful examples, with previews of their text;
* value per data source, and how each source's share changes over training stages (the
  paper's Fig. 3: per stage, the share of value among sources with a positive total);
* cumulative value over steps next to the measured drop of validation loss;
* training and validation loss; curation results when ``inrun curate --retrain`` ran;
* fidelity: the run's audit (exact Shapley values of the full game of sampled steps against the
  tracker's) over training steps, with a table of the audited steps and, beside each, what its
  game cannot see (the step's data-free part) and the whole step's U_t(B);
* views (not the value): the step-normalized view's top and bottom examples, value per source
  and stage as numbers, and the value of a window of steps (``--window``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...files import IntegrityError, read_json
from ...run.config import ConfigError, RunConfig
from ...store.auditlog import AuditLog
from ...store.ledger import atomic_write
from ...store.rundir import REPORT_FILE, RunDir
from ...store.summary import NO_SOURCE, packed_line, summarize, unit, value_frame
from ...tracking.drop import decompose
from .. import views
from ..baseline_run import SCORES, read_baselines
from . import plots
from .dropplot import drop_figure, drop_section

logger = logging.getLogger(__name__)

__all__ = ["PLOT_IDS", "build_report"]

PLOT_IDS = ("distribution", "sources", "stages", "cumulative", "loss", "fidelity")  # + "curation-<drop>" per curation
MAX_SOURCES_IN_STAGE_PLOT = 16


def build_report(
    run_dir: str | Path, out: str | Path | None = None, top: int = 10, stages: int = 8,
    window: tuple[int, int | None] | None = None,
) -> Path:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/report.html``) and return its path.

    ``window``: also list the examples' values over the steps ``[start, stop)`` (a view).

    Raises:
        RunDirError: not a run directory, or a run without values.
    """
    rd = RunDir(run_dir)
    meta = rd.meta()
    frame = value_frame(rd)
    valued = frame[frame["count"] > 0]
    summary = summarize(rd, top=top)
    metrics = rd.metrics()
    trace = _trace(rd, frame)
    figures: dict[str, tuple[str, bytes, str]] = {}

    figures["distribution"] = (
        "Value distribution", plots.value_distribution(valued["value"].to_numpy()),
        "Each example's value summed over the steps it was in. Positive: the example lowered the "
        "validation loss; negative: it raised it.",
    )
    per_source = summary["per_source"]
    if per_source:
        names = list(per_source)
        figures["sources"] = (
            "Value per data source",
            plots.source_values(names, [per_source[s]["total"] for s in names], [per_source[s]["mean"] for s in names]),
            "Sum and mean of the values of each source's examples.",
        )
    if trace is not None and len(trace):
        total_steps = max(int(metrics.step[-1]) if metrics.step else 0, int(trace["step"].max()) + 1)
        labels, names, table = _stage_table(trace, total_steps, stages)
        figures["stages"] = (
            "Value by training stage (the paper's Fig. 3)", plots.source_shares(labels, names, table),
            "Left: per stage of training, each source's share of the value among sources whose "
            "total in that stage is positive (sources with a negative total are left out, as in "
            "the paper). Right: each source's signed value per stage.",
        )
        steps, cumulative, by_source = _cumulative(trace)
        eval_steps, val_loss = _evals(metrics)
        figures["cumulative"] = (
            "Cumulative value over steps",
            plots.cumulative_value(steps, cumulative, eval_steps, val_loss[0] - val_loss if len(val_loss) else val_loss, by_source),
            "Left: the sum of all values up to each step next to the measured drop of validation "
            "loss since the start. Each step's values add up to a Taylor approximation of that "
            "step's drop; at a large learning rate the first-order sum can be far above the "
            "measured drop (curvature is left out; order 2 adds it). Right: the same sum per source.",
        )
    eval_steps, val_loss = _evals(metrics)
    train_steps = np.array([s for s, sk in zip(metrics.step, metrics.skipped) if s > 0 and not sk])
    train_loss = np.array([x for s, x, sk in zip(metrics.step, metrics.train_loss, metrics.skipped) if s > 0 and not sk])
    figures["loss"] = (
        "Loss", plots.loss_curves(train_steps, train_loss, eval_steps, val_loss),
        "Training loss of each batch and validation loss at the evaluation steps.",
    )
    drops = rd.drops()
    drop_html: list[str] = []
    if drops:
        decomposition = decompose(drops)
        drop_html = drop_section(decomposition, drops, drop_figure(decomposition, drops), stages=min(stages, 4))
    audit = rd.audit()
    if audit is not None:
        figure = _fidelity_figure(audit)
        if figure is not None:
            figures["fidelity"] = figure
    curation = _curations(rd)
    for result in curation:
        curves = {k: (np.array(v["steps"]), np.array(v["val_loss"])) for k, v in result["curves"].items()}
        figures[_curation_key(result)] = (
            f"Curation: drop {result['drop']}", plots.curation_curves(curves),
            f"The same config retrained on the {result['kept']:,} kept examples and on a random "
            f"subset of the same size (same seed and steps); the original run for reference.",
        )
    config_text = _config_text(meta)
    views_html = _views_html(rd, trace, total_steps if trace is not None and len(trace) else 0, top, window)
    page = _page(rd, meta, summary, figures, curation, config_text, audit, views_html, drop_html)
    path = Path(out) if out is not None else rd.file(REPORT_FILE)
    atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path


# -- data preparation -----------------------------------------------------------------------------
def _config_text(meta: dict[str, Any]) -> str:
    """The run's config as TOML, from run.json (checked), not from the editable config.toml; for
    a run of another loop, the tracker's settings and the run's metadata."""
    if meta.get("kind", "cli") != "cli":
        return json.dumps({"tracker": meta.get("tracker_config"), "optimizer": meta.get("optimizer"),
                           "model": meta.get("model"), "metadata": meta.get("metadata")}, indent=2, default=str)
    try:
        return RunConfig.from_dict(meta.get("config", {})).to_toml()
    except ConfigError:
        return json.dumps(meta.get("config"), indent=2)


def _trace(rd: RunDir, frame: Any) -> Any:
    import pandas as pd

    columns = rd.ledger().trace()  # verified against ledger.json, part by part
    if columns is None:
        return None
    trace = pd.DataFrame(columns)
    trace["value"] = trace["first_order"] + trace["second_order"]
    sources = dict(zip(frame["id"], frame["source"]))
    trace["source"] = trace["id"].map(sources).fillna(NO_SOURCE)
    return trace


def _stage_table(trace: Any, total_steps: int, stages: int) -> tuple[list[str], list[str], np.ndarray]:
    import pandas as pd

    stages = max(1, min(stages, total_steps))
    edges = np.linspace(0, total_steps, stages + 1).round().astype(int)
    stage = np.searchsorted(edges, trace["step"].to_numpy(), side="right") - 1
    stage = np.clip(stage, 0, stages - 1)
    pivot = trace.assign(stage=stage).pivot_table(index="source", columns="stage", values="value", aggfunc="sum", fill_value=0.0)
    pivot = pivot.reindex(columns=range(stages), fill_value=0.0)
    order = pivot.abs().sum(axis=1).sort_values(ascending=False).index
    pivot = pivot.loc[order]
    if len(pivot) > MAX_SOURCES_IN_STAGE_PLOT:
        head = pivot.iloc[: MAX_SOURCES_IN_STAGE_PLOT - 1]
        rest = pivot.iloc[MAX_SOURCES_IN_STAGE_PLOT - 1 :].sum(axis=0).rename("(other sources)")
        pivot = pd.concat([head, rest.to_frame().T])
    labels = [f"{edges[k]}-{edges[k + 1] - 1}" for k in range(stages)]
    return labels, [str(s) for s in pivot.index], pivot.to_numpy()


def _cumulative(trace: Any, n_sources: int = 8) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    per_step = trace.groupby("step")["value"].sum().sort_index()
    steps = per_step.index.to_numpy() + 1  # value of step t is realized after it
    cumulative = per_step.cumsum().to_numpy()
    by = trace.pivot_table(index="step", columns="source", values="value", aggfunc="sum", fill_value=0.0)
    by = by.reindex(per_step.index, fill_value=0.0).cumsum()
    largest = by.iloc[-1].abs().sort_values(ascending=False).index[:n_sources]
    return steps, cumulative, {str(s): by[s].to_numpy() for s in largest}


def _evals(metrics: Any) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(s, v) for s, v in zip(metrics.step, metrics.val_loss) if np.isfinite(v)]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pairs)
    return np.array(steps), np.array(vals)


def _curation_key(result: dict[str, Any]) -> str:
    return "curation-" + "".join(c if c.isalnum() else "-" for c in result["drop"])


def _curations(rd: RunDir) -> list[dict[str, Any]]:
    out = []
    for path in sorted(rd.path.glob("curate/*/curation.json")):
        try:
            result = read_json(path, "curation results", require_checksum=False)
        except IntegrityError as exc:  # a side result: the report goes on without it
            logger.warning("left out of the report: %s", exc)
            continue
        if result.get("curves"):
            out.append(result)
    return out


# -- HTML ---------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px;margin-bottom:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px;margin:12px 0}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px}.card b{display:block;font-size:20px}
.card span{color:#666;font-size:12px}
figure{margin:8px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px;margin-top:4px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{margin:0;font-size:11px;line-height:1.25;white-space:pre-wrap;word-break:break-all;max-height:12.5em;overflow:hidden}
.pos{color:#1e7a46}.neg{color:#b3263a}
.headline{font-size:15px;background:#eef4fb;border-left:4px solid #4c72b0;padding:8px 12px}
.warn{background:#fff4e0;border-left:4px solid #e0a030;padding:6px 10px;font-size:13px}
details pre{max-height:none;background:#f6f6f6;padding:8px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
@media (max-width:900px){.cols{grid-template-columns:1fr}}
"""


def _page(
    rd: RunDir, meta: dict[str, Any], summary: dict[str, Any], figures: dict[str, tuple[str, bytes, str]],
    curation: list[dict[str, Any]], config_text: str, audit: AuditLog | None = None, views_html: str = "",
    drop_html: Sequence[str] = (),
) -> str:
    e = html.escape
    cfg = meta.get("config", {})
    model, data, opt, tr = cfg.get("model", {}), cfg.get("data", {}), cfg.get("optimizer", {}), cfg.get("training", {})
    model_desc = model.get("hf_type") or model.get("kind", "?")
    if model.get("lora"):
        model_desc += " + LoRA"
    data_desc = data.get("dataset") or (Path(data["path"]).name if data.get("path") else data.get("kind", "?"))
    order = cfg.get("values", {}).get("order", 1)
    header = (
        f'{e(str(model_desc))} on {e(str(data_desc))}; {e(str(opt.get("name", "?")))} '
        f'lr {e(str(opt.get("lr", "?")))}, {tr.get("steps", "?")} steps x {tr.get("batch_size", "?")}'
    )
    if meta.get("kind", "cli") != "cli":  # a run of the user's own loop, the Trainer or Lightning
        tracker = meta.get("tracker_config") or {}
        order = tracker.get("order", 1)
        loop = {"library": "your training loop", "trainer": "the Hugging Face Trainer", "lightning": "Lightning"}
        header = (f'{e(str(meta.get("description") or (meta.get("model") or {}).get("class", "model")))}; '
                  f'{e(str(meta.get("optimizer", "?")))} in {e(loop.get(meta["kind"], meta["kind"]))}, {summary["steps"]:,} steps')
    what = unit(summary)
    if summary.get("packed"):
        header += f"; {e(packed_line(summary))}"
    cards = [
        (f"{summary['examples_valued']:,} / {summary['examples']:,}", f"{what} valued / in training set"),
        (f"{summary['negative_share']:.1%}", f"of valued {what} are negative"),
        (f"{summary['total_value']:+.4g}", "sum of all values (every step)"),
        (f"{summary['val_loss_first']:.4g} → {summary['val_loss_final']:.4g}", "validation loss, start → end"),
        (f"{summary['steps']:,}", f"steps ({summary['state']})"),
        (f"{len(summary['skipped_steps'])}", "skipped steps (NaN/Inf)"),
    ]
    drop = summary.get("drop")
    if drop is not None and drop["explained"] is not None:
        cards.insert(3, (f"{drop['explained']:.0%}", "values / their steps' games Σ U_t (the drop they attribute)"))
    fidelity = audit.summary() if audit is not None else None
    if fidelity is not None and fidelity["audited_steps"]:
        cards.append((f"{fidelity['median_pearson']:.3f}", f"median Pearson with exact Shapley ({fidelity['audited_steps']} audited steps)"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>inrun report: {e(rd.path.name)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>In-Run Data Shapley: {e(rd.path.name)}</h1>",
        f'<div class="sub">{header}; '
        f'value order {order}. inrun {e(str(meta.get("inrun_version")))}, '
        f'run created {e(str(meta.get("created", "")))}.</div>',
        '<div class="cards">' + "".join(f"<div class=card><b>{e(v)}</b><span>{e(k)}</span></div>" for v, k in cards) + "</div>",
    ]
    for warning in summary.get("warnings", []):
        parts.append(f'<p class="warn" id="warning-length"><b>Warning:</b> {e(warning)}</p>')
    if drop is not None:
        parts.append(f'<p class="headline" id="headline">{e(drop["headline"])}</p>')
    parts += drop_html
    parts += _figure_html("distribution", figures)
    parts += _fidelity_html(audit, figures)
    parts.append('<h2>Most helpful and most harmful examples</h2><div class="cols">')
    parts.append("<div><h3>Most helpful</h3>" + _examples_table(summary["most_helpful"]) + "</div>")
    parts.append("<div><h3>Most harmful</h3>" + _examples_table(summary["most_harmful"]) + "</div></div>")
    n_negative = round(summary["negative_share"] * summary["examples_valued"])
    if n_negative < len(summary["most_helpful"]):
        parts.append(f'<p class="sub">Only {n_negative} valued example(s) have a negative value.</p>')
    parts += _figure_html("sources", figures)
    if summary["per_source"]:
        parts.append(_source_table(summary["per_source"]))
    for key in ("stages", "cumulative"):
        parts += _figure_html(key, figures)
    if "stages" not in figures:
        parts.append("<h2>Value by training stage</h2><p>This run kept no per-step trace (values.trace = false).</p>")
    parts += _figure_html("loss", figures)
    if views_html:
        parts.append(views_html)
    parts += _baseline_section(rd, summary)
    for result in curation:
        parts += _figure_html(_curation_key(result), figures)
    if curation:
        parts.append(_curation_table(curation))
    if summary["skipped_steps"]:
        rows = "".join(f"<tr><td class=num>{s['step']}</td><td>{e(s['reason'])}</td></tr>" for s in summary["skipped_steps"])
        parts.append(f"<h2>Skipped steps</h2><table><tr><th>step</th><th>reason</th></tr>{rows}</table>")
    parts.append(f"<details><summary>Config</summary><pre>{e(config_text)}</pre></details>")
    parts.append(
        '<p class="sub">A value is the example\'s contribution to the drop of validation loss, summed '
        "over the steps it was in: φ = η·g_val·g_z per step (first order), where g_z is the gradient "
        "of the example's share of the batch loss. Wang et al., Data Shapley in One Training Run "
        "(ICLR 2025).</p>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _baseline_section(rd: RunDir, summary: dict[str, Any]) -> list[str]:
    """Baselines beside the values (``inrun baselines`` wrote them): how each ranks the examples
    against the values, and the ids each flags first."""
    baselines = read_baselines(rd)
    if baselines is None:
        return ['<h2>Baselines</h2><p class="sub">Not computed: <code>inrun baselines RUN_DIR</code> adds the '
                "final-checkpoint loss, gradient cosine and KNN-Shapley of every example here.</p>"]
    e = html.escape
    values = value_frame(rd)
    values = values[values["count"] > 0].set_index("id")["value"]
    joined = baselines.join(values, how="inner")
    # Flag first what each score says is worst: high loss, a gradient against validation, low KNN value.
    worst = {"final_loss": False, "grad_cosine": True, "knn_shapley": True}
    rows = []
    for col in baselines.columns:
        rho = joined["value"].rank().corr(joined[col].rank())
        flagged = joined[col].sort_values(ascending=worst.get(col, True)).index[:5]
        rows.append(f"<tr><td>{e(SCORES.get(col, col))}</td><td class=num>{rho:+.3f}</td>"
                    f"<td>{e(', '.join(str(i) for i in flagged))}</td></tr>")
    return [
        '<h2 id="baselines">Baselines beside the values</h2>',
        "<table><tr><th>score</th><th>Spearman with the In-Run value</th><th>ids it flags first</th></tr>"
        + "".join(rows) + "</table>",
        '<p class="sub">One checkpoint\'s scores (the final model), a different question than an '
        "example's value to this run; docs/case-studies.md compares them on mislabel detection and "
        "data selection.</p>",
    ]


def _figure_html(key: str, figures: dict[str, tuple[str, bytes, str]]) -> list[str]:
    if key not in figures:
        return []
    title, png, caption = figures[key]
    data = base64.b64encode(png).decode()
    return [
        f'<h2 id="{key}">{html.escape(title)}</h2>',
        f'<figure><img id="plot-{key}" class="plot" alt="{html.escape(title)}" src="data:image/png;base64,{data}">',
        f"<figcaption>{html.escape(caption)}</figcaption></figure>",
    ]


def _examples_table(rows: list[dict[str, Any]]) -> str:
    e = html.escape
    if not rows:
        return "<p>none</p>"
    body = "".join(
        f"<tr><td class='num {'pos' if r['value'] >= 0 else 'neg'}'>{r['value']:+.3e}</td>"
        f"<td class='num id'>{e(str(r['id']))}</td>"
        f"<td class=num>{r['count']}</td><td>{e(str(r['source']))}<br><small>{e(str(r['location']))}</small></td>"
        f"<td><pre>{e(str(r['preview']))}</pre></td></tr>"
        for r in rows
    )
    return f"<table><tr><th>value</th><th>id</th><th>seen</th><th>source</th><th>text</th></tr>{body}</table>"


def _source_table(per_source: dict[str, dict[str, float]]) -> str:
    e = html.escape
    body = "".join(
        f"<tr><td>{e(s)}</td><td class=num>{v['examples']}</td><td class=num>{v['total']:+.3e}</td>"
        f"<td class=num>{v['mean']:+.2e}</td><td class=num>{v['negative_share']:.0%}</td></tr>"
        for s, v in per_source.items()
    )
    return (
        "<table><tr><th>source</th><th>examples</th><th>total</th><th>mean</th><th>negative</th></tr>"
        f"{body}</table>"
    )


def _curation_table(curation: list[dict[str, Any]]) -> str:
    rows = []
    for result in curation:
        for name, curve in result["curves"].items():
            rows.append(
                f"<tr><td>{html.escape(result['drop'])}</td><td>{html.escape(name)}</td>"
                f"<td class=num>{curve['examples']:,}</td><td class=num>{curve['val_loss'][-1]:.4f}</td></tr>"
            )
    return (
        "<table><tr><th>drop</th><th>run</th><th>training examples</th><th>final validation loss</th></tr>"
        + "".join(rows) + "</table>"
    )


# -- fidelity and views ---------------------------------------------------------------------------
def _fidelity_figure(audit: AuditLog) -> tuple[str, bytes, str] | None:
    ok = [r for r in audit.steps if r["status"] == "ok"]
    if not ok:
        return None
    steps = np.array([r["step"] for r in ok])
    value_rows = [v for v in audit.values if np.isfinite(v["exact"])]
    warn = audit.config.warn_rmse if audit.config is not None else 0.3
    png = plots.fidelity_panel(
        steps, np.array([r["pearson"] for r in ok], dtype=float), np.array([r["spearman"] for r in ok], dtype=float),
        np.array([r["rel_rmse"] for r in ok], dtype=float), np.array([bool(r["flagged"]) for r in ok]),
        np.array([v["exact"] for v in value_rows]), np.array([v["tracker"] for v in value_rows]),
        np.array([v["step"] for v in value_rows]), warn,
    )
    first = ok[0]
    full = all(r.get("game") == "full" for r in ok)
    players = (f"all {first['players']} examples of the step (its full game)" if full else
               f"{first['players']} of the step's {first['batch']} examples (a sub-game, which can be optimistic: "
               "the whole step's U_t(B) and Σ values are in the table)")
    return (
        "Fidelity: the run's audit against exact Shapley values", png,
        f"At each audited step the players are {players}, and the exact Shapley values of that step's game are "
        "computed (U(S) = L_val(θ_t) − L_val(θ_t + Δ(S)), Δ the real optimizer step on the players' summed "
        "gradients; every subset enumerated, or Monte Carlo in antithetic pairs with its noise), next to the "
        f"tracker's value rule on the same game ({_rule_label(first)}). A step is unfaithful when the relative RMSE "
        "exceeds 0.3 beyond twice the noise, whatever the correlation (values uniformly too large rank well and "
        "still misstate the step). No game sees the step's data-free part D_t (momentum, decay): it is shown beside.",
    )


def _rule_label(row: dict[str, Any]) -> str:
    rule = {"sgd": "SGD", "adam": "Adam-aware", "sgd_proxy": "the SGD proxy"}.get(row["rule"], row["rule"])
    variant = "first order" if row["order"] == 1 else f"order 2, {row['variant']}"
    return f"{variant}, {rule}"


def _fidelity_html(audit: AuditLog | None, figures: dict[str, tuple[str, bytes, str]]) -> list[str]:
    e = html.escape
    if audit is None:
        return ["<h2 id=fidelity>Fidelity: the run's audit</h2><p>This run was not audited ([audit] enabled = false): "
                "nothing says here how close its values are to the steps' exact Shapley values.</p>"]
    parts = _figure_html("fidelity", figures) if "fidelity" in figures else ["<h2 id=fidelity>Fidelity: the run's audit</h2>"]
    s = audit.summary()
    if s["audited_steps"]:
        flagged = ", ".join(map(str, s["flagged_steps"])) or "none"
        parts.append(
            f"<p>{s['audited_steps']} audited step(s): median Pearson {s['median_pearson']:.3f}, median Spearman "
            f"{s['median_spearman']:.3f}, median relative RMSE {s['median_rel_rmse']:.3f}; worst Pearson "
            f"{s['worst_pearson']:.3f} at step {s['worst_step']}. Unfaithful steps: {e(flagged)}. Cost: "
            f"{s['evaluations']:,} utility evaluations, {s['seconds']:.1f} s.</p>"
        )
    else:
        parts.append("<p>No step was audited successfully.</p>")
    head = ("step", "players / batch", "method", "Pearson", "Spearman", "rel. RMSE", "noise", "efficiency gap",
            "Σ exact φ", "D_t (no game's)", "U_t(B) of the step", "Σ values of the step", "evaluations", "seconds", "")
    rows = []
    for r in audit.steps:
        if r["status"] != "ok":
            rows.append(f"<tr><td class=num>{r['step']}</td><td colspan={len(head) - 1}>{e(r['status'])}: {e(r['reason'])}</td></tr>")
            continue
        cells = [
            str(r["step"]), f"{r['players']} / {r['batch']}", e(r["method"].replace("_", " ")),
            f"{r['pearson']:.3f}", f"{r['spearman']:.3f}", f"{r['rel_rmse']:.3f}", _num(r.get("noise"), ".3f"),
            f"{r['efficiency_gap']:+.3f}", f"{r['utility']:+.3e}", _num(r.get("data_free"), "+.3e"),
            _num(r.get("step_utility"), "+.3e"), _num(r.get("step_values"), "+.3e"), f"{r['evaluations']:,}",
            f"{r['seconds_gradients'] + r['seconds_game']:.1f}", "<span class=neg>unfaithful</span>" if r["flagged"] else "",
        ]
        rows.append("<tr>" + "".join(f"<td class=num>{c}</td>" for c in cells) + "</tr>")
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")
    return parts


def _num(x: Any, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def _views_html(rd: RunDir, trace: Any, total_steps: int, top: int, window: tuple[int, int | None] | None) -> str:
    e = html.escape
    if trace is None or not len(trace):
        return ""
    parts = [
        "<h2 id=views>Views of the values (not the value)</h2>",
        '<p class="sub">The same per-step values read another way. A value is the plain sum over the steps an '
        "example was in; the <b>step-normalized view</b> divides each step's values by the magnitude of that "
        "step's total first, so that every step weighs alike (early steps otherwise dominate).</p>",
    ]
    normalized = views.step_normalized(rd.path)
    examples = rd.examples().set_index("id") if len(rd.examples()) else None

    def table(frame: Any, key: str, label: str) -> str:
        body = []
        for _, r in frame.iterrows():
            preview = "" if examples is None or r["id"] not in examples.index else str(examples.loc[r["id"], "preview"])
            body.append(f"<tr><td class=num>{r[key]:+.3e}</td><td class=num>{r['value']:+.3e}</td>"
                        f"<td>{e(str(r['source']))}</td><td><pre>{e(preview)}</pre></td></tr>")
        return (f"<table><tr><th>{e(label)}</th><th>value</th><th>source</th><th>text</th></tr>"
                + "".join(body) + "</table>")

    parts.append('<div class="cols"><div><h3>Highest, step-normalized view</h3>'
                 + table(normalized.head(min(top, 5)), "normalized", "view") + "</div>")
    parts.append("<div><h3>Lowest, step-normalized view</h3>"
                 + table(normalized.tail(min(top, 5)).iloc[::-1], "normalized", "view") + "</div></div>")
    stages = views.source_stages(rd.path, stages=4, steps=total_steps)
    head = "".join(f"<th>steps {e(c)}</th>" for c in stages.columns)
    body = "".join(
        f"<tr><td>{e(str(s))}</td>" + "".join(f"<td class=num>{v:+.3e}</td>" for v in row) + "</tr>"
        for s, row in zip(stages.index, stages.to_numpy())
    )
    parts.append(f"<h3>Value per source and stage (sums)</h3><table><tr><th>source</th>{head}</tr>{body}</table>")
    if window is not None:
        start, stop = window
        w = views.window_values(rd.path, start, stop)
        label = f"steps {start}–{'end' if stop is None else stop - 1}"
        parts.append(f'<h3>Values over {e(label)} only</h3><div class="cols"><div><h4>Highest</h4>'
                     + table(w.head(min(top, 5)), "value", label) + "</div><div><h4>Lowest</h4>"
                     + table(w.tail(min(top, 5)).iloc[::-1], "value", label) + "</div></div>")
    return "\n".join(parts)
