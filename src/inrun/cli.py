"""The ``inrun`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[rate]:.0f} ex/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(steps=args.steps, order=args.order, seed=args.seed)
    out = Path(args.out)
    console.print(
        f"[bold]inrun demo[/]: GPT-2 ({cfg.n_layer} layers, d={cfg.n_embd}) on chunks of Python's "
        f"standard library, {cfg.steps} steps x {cfg.batch_size}, order {cfg.order}"
    )
    with _progress_bar(console) as bar:
        task = bar.add_task("train", total=cfg.steps, loss=float("nan"), rate=0.0)

        def progress(step: int, total: int, loss: float, rate: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=rate)

        summary = run_demo(cfg, out, progress=progress)
    print_summary(summary, console)
    console.print(f"\nRun directory: [bold]{out.resolve()}[/] (values.parquet, chunks.parquet, summary.json)")
    return 0


def print_summary(summary: dict[str, Any], console: Console) -> None:
    console.print(
        f"\n{summary['examples_valued']} chunks valued in {summary['seconds']:.0f} s; train loss "
        f"{summary['train_loss_first']:.2f} -> {summary['train_loss_last']:.2f}, validation loss "
        f"{summary['val_loss_final']:.2f}; {summary['negative_share']:.1%} of chunks have a negative value."
    )
    for title, key in (("Most helpful chunks", "most_helpful"), ("Most harmful chunks", "most_harmful")):
        table = Table(title=title, title_justify="left")
        table.add_column("value", justify="right")
        table.add_column("source")
        table.add_column("file@offset")
        table.add_column("text")
        for r in summary[key]:
            table.add_row(f"{r['value']:+.2e}", r["source"], r["location"], r["preview"])
        console.print(table)
    table = Table(title="Value per source", title_justify="left")
    for col in ("source", "chunks", "total", "mean", "negative"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for source, s in summary["per_source"].items():
        table.add_row(source, str(s["chunks"]), f"{s['total']:+.3e}", f"{s['mean']:+.2e}", f"{s['negative_share']:.0%}")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inrun", description="In-Run Data Shapley from the command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="value a small GPT-2 trained on Python's standard library")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    demo.add_argument("--order", type=int, choices=(1, 2), default=1, help="value order (default: 1)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    console = Console()
    return int(args.func(args, console) or 0)


if __name__ == "__main__":
    sys.exit(main())
