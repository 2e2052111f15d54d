"""Issue 26's targets read from the tables ``inrun bench`` printed (benchmarks/perf_tables.sh's file).

    python benchmarks/targets.py perf_tables.md

One row per goal: the measured time ratio (and the CPU-time ratio beside it), the FLOP floor of
the method's route (for a memory goal: its memory floor), the ratio over the floor (the goal
"within 5% of the floor" is <= 1.05), and whether the goal is met. A goal whose workload is not in the file is listed as not measured.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

GOALS = [  # (workload, method, column, bound, what)
    ("R", "order 1", "time", 1.20, "R: GPT-2 4x256, 16x128, order 1"),
    ("R", "order 1 + book-keeping", "time", 1.20, "R, order 1 with book-keeping"),
    ("S", "order 1", "time", 1.10, "S: GPT-2 2x768, 8x256, order 1"),
    ("S", "order 1 + book-keeping", "time", 1.10, "S, order 1 with book-keeping"),
    ("A", "Adam-aware order 1", "time", 1.15, "A: AdamW, 4 micro-batches of 8x128, Adam-aware order 1"),
    ("T", "order 1", "time", 1.35, "T: nn.TransformerEncoder 4x256, order 1"),
    ("E", "order 1", "time", 1.40, "E: Mixtral-style MoE, order 1"),
    ("A", "order 2 trapezoid", "memory", 1.30, "memory A: trapezoid (of plain SGD)"),
    ("A", "Adam-aware order 1", "memory", 1.30, "memory A: Adam-aware (of plain AdamW)"),
]

ROW = re.compile(
    r"^\| (?P<method>[^|]+?) \| (?P<ms>\d+) \| (?P<time>[\d.]+)x \| (?P<cpu>[\d.]+)x \| (?P<floor>[\d.]+)x \| "
    r"(?P<over>[\d.]+) \| (?P<faults>\d+) \| (?P<mib>[\w.]+) \| (?P<memory>[\w.]+?)x? \| "
    r"(?P<mfloor>[\w.]+?)x? \| (?P<mover>[\w.]+) \|$"
)


def parse(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """``workload -> method -> column -> value`` from every ``### Workload X`` table."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    workload = None
    for line in text.splitlines():
        head = re.match(r"^### Workload (\w+):", line)
        if head:
            workload = head.group(1)
            out.setdefault(workload, {})
            continue
        row = ROW.match(line.strip())
        if row and workload is not None:
            out[workload][row.group("method")] = row.groupdict()
    return out


def table(tables: dict[str, dict[str, dict[str, str]]]) -> str:
    lines = ["| goal | target | measured (CPU-time ratio) | FLOP floor | measured / floor | met? |",
             "|---|---:|---|---:|---:|---|"]
    for workload, method, column, bound, what in GOALS:
        row = tables.get(workload, {}).get(method)
        if row is None:
            lines.append(f"| {what} | {bound:.2f}x | not measured | | | |")
            continue
        if column == "memory":
            value, floor = row["memory"], row["mfloor"]
            met = "yes" if value not in ("nan", "") and float(value) <= bound else (
                "no: the target is below the route's memory floor" if floor != "nan" and float(floor) > bound else "no")
            over = f"{float(value) / float(floor):.2f}" if "nan" not in (value, floor) else ""
            lines.append(f"| {what} | {bound:.2f}x | {value}x | {floor}x | {over} | {met} |")
            continue
        value, floor = float(row["time"]), float(row["floor"])
        met = "yes" if value <= bound else ("no: the target is below the route's floor" if floor > bound else "no")
        lines.append(f"| {what} | {bound:.2f}x | {value:.2f}x ({row['cpu']}x) | {floor:.2f}x | {value / floor:.2f} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python benchmarks/targets.py TABLES.md")
    print(table(parse(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
