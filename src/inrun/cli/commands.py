"""The ``inrun`` command line: demo, train, report, baselines, curate, inspect, bench.

Every command that runs for long shows a progress bar (step, loss, examples/s, ETA). Errors
that inrun raises on purpose (bad config, data, run directory...) and errors of the system
(a full disk, a read-only directory) are printed on stderr as one line of bounded length,
sometimes followed by a ``hint:`` line, and exit with status 1; a bad command line exits with
2; a run stopped by a NaN/Inf step exits with 3; SIGINT / SIGTERM with 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..analysis.baseline_run import compute_baselines
from ..analysis.curate import curate, retrain
from ..analysis.inspect.run_dir import audit_line, drop_line, inspect_run, is_run_dir, parse_window
from ..analysis.inspect.target import inspect_run_dir, inspect_target
from ..analysis.report import build_report
from ..errors import InRunError, cause, one_line
from ..files import read_json
from ..run.config import (
    RunConfig,
    demo_config,
    demo_config_text,
    load_config,
    saved_config,
)
from ..run.runner import RunInterrupted, RunStopped, train
from ..store.rundir import SUMMARY_FILE, RunDir, config_diff
from ..store.summary import packed_line, unit
from ..tracking.config import TrackerConfig, option
from .args import (
    EXIT_ERROR,
    EXIT_STOPPED,
    Parser,
    non_negative_int,
    positive_int,
    print_error,
)
from .bench import build_parser as bench_arguments
from .bench import run

ORDER = option(TrackerConfig, "order")  # the library's default and choices


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[rate]:.0f} ex/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


@contextmanager
def training_progress(console: Console, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar; yields the ``progress(step, total, loss, rate)`` callback."""
    with _progress_bar(console) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"), rate=0.0)

        def progress(step: int, total: int, loss: float, rate: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=rate)

        yield progress


# -- commands -----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    if args.print_config:
        sys.stdout.write(demo_config_text())  # verbatim: no wrapping, so it can be saved as a file
        return 0
    overrides = list(args.set)
    for flag, key in ((args.steps, "training.steps"), (args.order, "values.order"), (args.seed, "seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    config = demo_config(overrides)
    out = Path(args.out or config.output)

    if RunDir(out).exists:
        RunDir(out).refuse_if_in_use("replace the demo run in")
        console.print(f"Replacing the previous demo run in {out}")
        shutil.rmtree(out)
    m, t = config.model, config.training
    console.print(
        f"[bold]inrun demo[/]: {m.hf_type} ({(m.hf_config or {}).get('n_layer')} layers, d="
        f"{(m.hf_config or {}).get('n_embd')}) on chunks of Python's standard library, "
        f"{t.steps} steps x {t.batch_size}, value order {config.values.order}"
    )
    result = _train(config, out, resume=False, console=console)
    return _finish_run(result, console, report=not args.no_report)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    if args.list_keys:
        _print_keys(console)
        return 0
    if args.config is None and args.resume is None:
        raise InRunError("give --config FILE for a new run, or --resume RUN_DIR to continue one")
    if args.resume is not None:
        rd = RunDir(args.resume)
        if rd.exists and not rd.rerunnable:
            raise InRunError(
                f"{rd.path} was written by {rd.kind} (not `inrun train`), so only that loop can continue "
                "it: open it again there with resume=True (inrun.RunWriter), or resume the Trainer or "
                "Lightning from their checkpoint"
            )
        saved = saved_config(rd)[0] if rd.exists else None
        if args.config is not None:
            config = load_config(args.config, args.set)
            if saved is not None and config.to_dict() != saved.to_dict():
                keys = config_diff(saved.to_dict(), config.to_dict())
                raise InRunError(
                    f"--config {args.config} differs from the config of {rd.path} in {', '.join(keys)}; "
                    "a resumed run must use the config it started with (leave out --config to use it)"
                )
        elif saved is None:
            raise InRunError(f"cannot resume {rd.path}: it is not a run directory (no run.json)")
        else:
            config = saved.with_overrides(args.set) if args.set else saved
        result = _train(config, rd.path, resume=True, console=console)
    else:
        config = load_config(args.config, args.set)
        result = _train(config, Path(args.out or config.output), resume=False, console=console)
    return _finish_run(result, console, report=args.report)


def _train(config: Any, out: Path, resume: bool, console: Console) -> Any:
    with training_progress(console, "train", config.training.steps) as progress:
        return train(config, out, resume=resume, progress=progress)


def _finish_run(result: Any, console: Console, report: bool) -> int:
    rd = result.run_dir
    if result.resumed_from:
        console.print(f"Resumed from step {result.resumed_from}.")
    if not rd.has_values():
        console.print(f"\nRun directory: [bold]{rd.path.resolve()}[/] (values.enabled = false: no values)")
        return 0

    summary = read_json(rd.file(SUMMARY_FILE), "the run's summary")
    print_summary(summary, console)
    if report:
        with console.status("writing the report"):
            path = build_report(rd.path)
        console.print(f"\nReport: [bold]{path.resolve()}[/]")
    else:
        console.print(f"\nWrite the report with: inrun report {rd.path}")
    console.print(f"Run directory: {rd.path.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    window = _window(args.window, parse_window)
    with console.status("writing the report"):
        path = build_report(args.run_dir, out=args.out, top=args.top, stages=args.stages, window=window)
    console.print(f"Report: [bold]{path.resolve()}[/]")
    return 0


def cmd_baselines(args: argparse.Namespace, console: Console) -> int:
    with console.status("final-checkpoint loss, gradient cosine and KNN-Shapley of every training example"):
        path = compute_baselines(args.run_dir)
    console.print(f"Baselines: [bold]{path.resolve()}[/] (shown by `inrun report`)")
    return 0


def cmd_curate(args: argparse.Namespace, console: Console) -> int:
    selection = curate(args.run_dir, args.drop)
    console.print(
        f"drop {selection.drop}: keeping {selection.kept:,} of {selection.total:,} training examples "
        f"({selection.dropped:,} dropped, {selection.unvalued:,} never valued are kept)"
    )
    console.print(f"Kept ids: {selection.kept_path}\nDropped ids: {selection.dropped_path}")
    if selection.kept_config is not None:
        console.print(f"Config for the kept data: {selection.kept_config}")
    if selection.filtered_data is not None:
        console.print(f"Filtered data file: {selection.filtered_data}")
    if not selection.run_dir.rerunnable:
        if args.retrain:
            retrain(selection, seeds=args.seeds)  # refused, with what to do instead
        console.print(
            f"This run was written by {selection.run_dir.kind}, not `inrun train`: train your loop on "
            f"the kept ids and on {selection.random_path} (a random subset of the same size) to compare."
        )
        return 0
    if not args.retrain:
        console.print("Add --retrain to compare training on the kept data with a random subset of the same size.")
        return 0

    def progress_for(name: str, steps: int) -> Any:
        return training_progress(console, name, steps)

    result = retrain(selection, progress_for=progress_for, seeds=args.seeds)
    seeds = len(result["seeds"])
    title = f"Curation (drop {selection.drop}): final validation loss" + (f", mean ± sd over {seeds} seeds" if seeds > 1 else "")
    table = Table(title=title, title_justify="left")
    for col in ("run", "training examples", "final validation loss"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, curve in result["curves"].items():
        final = f"{curve['final_mean']:.4f}" + (f" ± {curve['final_std']:.4f}" if seeds > 1 else "")
        table.add_row(name, f"{curve['examples']:,}", final)
    console.print(table)
    console.print(f"Plot: {result['plot']}")
    if result.get("report"):
        console.print(f"Report (with a curation section): [bold]{result['report']}[/]")
    return 0


def _window(text: str | None, parse: Callable[[str | None], Any]) -> Any:
    try:
        return parse(text)
    except ValueError as exc:
        raise InRunError(str(exc)) from None


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    if is_run_dir(args.target):
        window = _window(args.window, parse_window)
        inspect_run(args.target, console, top=args.top, stages=args.stages, window=window)
        inspect_run_dir(args.target).print(console, modules=args.modules)
        return 0

    report = inspect_target(
        args.target, overrides=args.set, batch_size=args.batch_size, length=args.length,
        val_tokens=args.val_tokens, order=args.order,
    )
    report.print(console, modules=args.modules)
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    return run(args)


# -- output ---------------------------------------------------------------------------------------
def print_summary(summary: dict[str, Any], console: Console, rows: int = 5) -> None:
    """The short summary a run ends with: headline numbers, top and bottom examples, sources."""
    seconds = summary.get("seconds")
    took = f" in {seconds:.0f} s" if seconds else ""
    console.print(
        f"\n{summary['examples_valued']:,} {unit(summary)} valued{took}; training loss "
        f"{summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f}, validation loss "
        f"{summary['val_loss_first']:.3f} -> {summary['val_loss_final']:.3f}; "
        f"{summary['negative_share']:.1%} of the {unit(summary)} have a negative value."
    )
    if summary.get("packed"):
        console.print(escape(packed_line(summary) + "."))
    if summary["skipped_steps"]:
        console.print(f"[yellow]{len(summary['skipped_steps'])} step(s) skipped (non-finite loss or gradient)[/]")
    for title, key in (("Most helpful", "most_helpful"), ("Most harmful", "most_harmful")):
        if not summary[key]:
            console.print(f"{title}: none ({'no positive' if key == 'most_helpful' else 'no negative'} values)")
            continue
        table = Table(title=title, title_justify="left")
        table.add_column("value", justify="right", no_wrap=True, min_width=9)
        table.add_column("source", no_wrap=True, overflow="ellipsis", min_width=6, max_width=12)
        table.add_column("where", no_wrap=True, overflow="ellipsis", min_width=10, max_width=22)
        # value + source + where + borders take about 56 columns; the text gets the rest.
        table.add_column("text", no_wrap=True, overflow="ellipsis", max_width=max(16, console.width - 56))
        for r in summary[key][:rows]:
            table.add_row(f"{r['value']:+.2e}", escape(str(r["source"])), escape(str(r["location"])), escape(one_line(r["preview"], 56)))
        console.print(table)
    if summary["per_source"]:
        table = Table(title="Value per source", title_justify="left")
        for col in ("source", "examples", "total", "mean", "negative"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for source, s in summary["per_source"].items():
            table.add_row(escape(source), str(s["examples"]), f"{s['total']:+.3e}", f"{s['mean']:+.2e}", f"{s['negative_share']:.0%}")
        console.print(table)
    if summary.get("drop") is not None:
        console.print(escape(drop_line(summary["drop"])), soft_wrap=True)
    if "audit" in summary:
        console.print(escape(audit_line(summary["audit"], summary.get("seconds"))), soft_wrap=True)


def _print_keys(console: Console) -> None:
    import dataclasses
    import typing

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(tp) or inner:
                walk(tp if dataclasses.is_dataclass(tp) else inner[0], f"{prefix}{f.name}.")
                continue
            default = repr(f.default) if f.default is not dataclasses.MISSING else "(required)"
            console.print(f"[bold]{prefix}{f.name}[/] = {escape(default)}  {escape(f.metadata.get('help', ''))}")

    walk(RunConfig, "")


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="inrun", description="In-Run Data Shapley from the command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    set_help = "override a config key, e.g. --set training.steps=100 (repeatable; value in TOML syntax)"

    demo = sub.add_parser("demo", help="value a small GPT-2 trained on Python's standard library, then report")
    demo.add_argument("--out", default=None, help="run directory (default: runs/demo; a previous demo there is replaced)")
    demo.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: 400)")
    demo.add_argument("--order", type=int, choices=ORDER.choices, default=None, help=f"value order (default: {ORDER.default})")
    demo.add_argument("--seed", type=non_negative_int, default=None)
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.add_argument("--print-config", action="store_true", help="print the embedded demo config (a template) and exit")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="a run from a TOML config, with checkpoints; or --resume one")
    train.add_argument("--config", help="the run's TOML config (see `inrun demo --print-config`)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    train.add_argument("--out", help="run directory (default: the config's output)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    train.add_argument("--report", action="store_true", help="write the HTML report at the end")
    train.add_argument("--list-keys", action="store_true", help="list every config key with its default and help")
    train.set_defaults(func=cmd_train)

    _add_reading_commands(sub, set_help)

    bench = sub.add_parser(
        "bench", help="time plain training vs each method side by side (ratios, FLOP floors, memory)"
    )
    bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def _add_reading_commands(sub: Any, set_help: str) -> None:
    """The commands that read a run: report, baselines, curate, inspect."""
    report = sub.add_parser("report", help="write the self-contained HTML report of a run")
    report.add_argument("run_dir")
    report.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    report.add_argument("--top", type=positive_int, default=10, help="examples in the helpful/harmful tables")
    report.add_argument("--stages", type=positive_int, default=8, help="training stages in the per-source plot")
    report.add_argument("--window", metavar="START:STOP", help="also list the values over steps START..STOP-1 (a view)")
    report.set_defaults(func=cmd_report)

    baselines = sub.add_parser("baselines", help="final-checkpoint loss, gradient cosine and KNN-Shapley beside the values")
    baselines.add_argument("run_dir")
    baselines.set_defaults(func=cmd_baselines)

    curate = sub.add_parser("curate", help="drop low-value examples; --retrain compares with a random subset")
    curate.add_argument("run_dir")
    curate.add_argument("--drop", required=True, help="'negative' (value < 0) or 'bottom:FRACTION' (e.g. bottom:0.1)")
    curate.add_argument("--retrain", action="store_true", help="retrain on the kept data and on a random subset of the same size")
    curate.add_argument("--seeds", type=positive_int, default=1, help="with --retrain: seeds per arm, for a mean and a spread (default 1)")
    curate.set_defaults(func=cmd_curate)

    inspect = sub.add_parser(
        "inspect", help="a run directory: its values, audit and views; a config or model type: routes and memory"
    )
    inspect.add_argument("target", metavar="RUN_DIR_MODEL_OR_CONFIG",
                         help="a run directory, a run config (.toml) or a Hugging Face model type (gpt2, llama...)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help + " (config only)")
    inspect.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default: the config's, or 16)")
    inspect.add_argument("--length", type=positive_int, default=None, help="tokens per example for a model type (default 128)")
    inspect.add_argument("--val-tokens", type=positive_int, default=None, help="validation tokens for a model type (default 1024)")
    inspect.add_argument("--order", type=int, choices=ORDER.choices, default=None,
                         help=f"value order (default: the config's, or {ORDER.default})")
    inspect.add_argument("--modules", action="store_true", help="list every valued module")
    inspect.add_argument("--top", type=positive_int, default=5, help="run directory: examples in each view's table")
    inspect.add_argument("--stages", type=positive_int, default=4, help="run directory: training stages in the per-source view")
    inspect.add_argument("--window", metavar="START:STOP", help="run directory: also the values over steps START..STOP-1")
    inspect.set_defaults(func=cmd_inspect)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    console = Console()

    try:
        return int(args.func(args, console) or 0)
    except RunStopped as exc:
        print_error(str(exc), label="run stopped")
        return EXIT_STOPPED
    except RunInterrupted as exc:
        print_error(str(exc), label="interrupted")
        return 128 + int(exc.signum)
    except InRunError as exc:
        print_error(str(exc), getattr(exc, "hint", None))
        return EXIT_ERROR
    except OSError as exc:  # the system's: a full disk, a read-only or missing directory
        what = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{what}{exc.strerror or exc}", _os_hint(exc, args))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print_error("stopped by Ctrl-C", label="interrupted")
        return 130
    except (MemoryError, torch.OutOfMemoryError) as exc:  # the machine's: said in one line, like a full disk
        print_error(f"out of memory: {cause(exc)}", "lower training.batch_size, data.length or the model's size; "
                    "`inrun inspect CONFIG` predicts the memory the values add")
        return EXIT_ERROR


def _os_hint(exc: OSError, args: argparse.Namespace) -> str | None:
    import errno

    if exc.errno == errno.ENOSPC:
        return "free some disk space, then `inrun train --resume RUN_DIR` continues from the last checkpoint"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        if args.command == "report":
            return "the run directory is not writable: write the report elsewhere with --out FILE"
        return "the directory is not writable: check its permissions, or copy the run somewhere writable"
    return None


if __name__ == "__main__":
    sys.exit(main())
