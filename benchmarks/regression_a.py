"""Workload A's Adam-aware ratio, two commits side by side or against a stored reference.

Workload A: GPT-2 4x256 (vocab 4096) trained with AdamW on 32 x 128 tokens per optimizer step as
4 micro-batches of 8, 1 validation sequence of 128; "Adam-aware order 1" against "plain AdamW".
Each measurement is a fresh process that builds both methods on the same model and batches and
runs them in alternation (A B B A ...), so drift cancels inside it; it prints, per method, the
median wall time, CPU time and minor page faults of a step. The ratio of the medians is the
measurement. CPU time does not grow when other processes take the cores (the wall time does), so
on a shared machine its ratio is the steadier one; the wall ratio is what a user waits for.

    python benchmarks/regression_a.py                      # this tree: 4 processes
    python benchmarks/regression_a.py --against 2ad8569    # alternate with another commit
    python benchmarks/regression_a.py --save-reference benchmarks/reference_a.json
    python benchmarks/regression_a.py --reference benchmarks/reference_a.json   # exit 1 if slower

``--against REV`` checks REV out into a temporary git worktree and alternates the processes of
both trees (this tree, REV, REV, this tree, ...), with the same harness for both: only
``InRunShapley(model, optimizer, val_loss=..., check=True)`` and ``tracker.step(ids)``, which every
commit since the first has. The verdict compares the medians over processes of the gated ratio
(``--gate cpu``, the default, or ``wall``): this tree slower by more than ``--tolerance``
(relative) exits 1. A reference file holds one tree's medians, the machine (cores, CPU model,
torch) and the commit; comparing against a reference taken on another machine is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("plain AdamW", "Adam-aware order 1")


# ----------------------------------------------------------------------------- one process
def child(steps: int, warmup: int, tiny: bool) -> dict:
    """Time both methods in this process (``inrun`` from ``PYTHONPATH``)."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    import inrun
    from inrun import InRunShapley

    vocab, layers, dim, heads, batch, seq, micro = (64, 1, 32, 2, 8, 16, 4) if tiny else (4096, 4, 256, 4, 32, 128, 4)
    cfg = GPT2Config(n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=seq, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(4)]
    val = torch.randint(0, vocab, (1, seq), generator=gen)

    def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def method(tracked: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.loss_type = "ForCausalLM"
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = InRunShapley(model, opt, val_loss=lambda m: loss(m, val), check=True) if tracked else None
        part = batch // micro

        def step(i: int) -> None:
            ids = batches[i % len(batches)]
            for k in range(micro):
                rows = ids[k * part : (k + 1) * part]
                if tracker is None:
                    (loss(model, rows) / micro).backward()
                else:
                    with tracker.step(list(range(i * batch + k * part, i * batch + (k + 1) * part))):
                        (loss(model, rows) / micro).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    runs = {name: method(name != "plain AdamW") for name in METHODS}
    for name in METHODS:
        for i in range(warmup):
            runs[name](i)
    record = {name: {"wall": [], "cpu": [], "faults": []} for name in METHODS}
    for r in range(steps):
        for name in (METHODS if r % 2 == 0 else reversed(METHODS)):
            before = resource.getrusage(resource.RUSAGE_SELF)
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name](warmup + r)
            record[name]["wall"].append(time.perf_counter() - wall)
            record[name]["cpu"].append(time.process_time() - cpu)
            record[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt)
    med = {name: {k: statistics.median(v) for k, v in rec.items()} for name, rec in record.items()}
    plain, aware = med["plain AdamW"], med["Adam-aware order 1"]
    return {
        "inrun": str(Path(inrun.__file__).resolve().parents[1]),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
        "medians": med,
        "wall": aware["wall"] / plain["wall"],
        "cpu": aware["cpu"] / plain["cpu"],
    }


# ----------------------------------------------------------------------------- the parent
def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__}


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def measure(tree: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if res.returncode != 0:
        raise SystemExit(f"the measurement of {tree} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summary(label: str, results: list[dict]) -> dict:
    out = {"label": label, "runs": len(results)}
    for key in ("wall", "cpu"):
        values = sorted(r[key] for r in results)
        out[key] = statistics.median(values)
        out[f"{key}_all"] = values
    out["plain_faults"] = statistics.median(r["medians"]["plain AdamW"]["faults"] for r in results)
    out["aware_faults"] = statistics.median(r["medians"]["Adam-aware order 1"]["faults"] for r in results)
    return out


def print_table(rows: list[dict]) -> None:
    print("| tree | processes | Adam-aware / plain AdamW, wall | CPU | minor faults per step (plain, Adam-aware) |")
    print("|---|---:|---|---|---:|")
    for s in rows:
        walls = ", ".join(f"{v:.3f}" for v in s["wall_all"])
        cpus = ", ".join(f"{v:.3f}" for v in s["cpu_all"])
        print(f"| {s['label']} | {s['runs']} | **{s['wall']:.3f}** ({walls}) | **{s['cpu']:.3f}** ({cpus}) "
              f"| {s['plain_faults']:.0f}, {s['aware_faults']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="another commit, alternated with this tree")
    parser.add_argument("--reference", type=Path, help="a stored reference of this machine to compare with")
    parser.add_argument("--save-reference", type=Path, help="store this tree's medians as the reference")
    parser.add_argument("--runs", type=int, default=4, help="processes per tree")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method and process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: CPU time free of spin-waits)")
    parser.add_argument("--gate", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative slowdown that fails the check")
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT-2 (the suite runs the harness with it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.steps, args.warmup, args.tiny)))
        return 0

    here = ROOT
    print(f"workload A, {args.threads} thread(s), {args.steps} steps per method in each of {args.runs} processes per "
          f"tree; load average {os.getloadavg()[0]:.2f} at the start\n", flush=True)
    trees = [(f"this tree ({commit_of(here)})", here)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            other = Path(tmp) / "other"
            subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(other), args.against],
                           check=True, capture_output=True)
            trees.append((f"{args.against} ({commit_of(other)})", other))
        results: dict[str, list[dict]] = {label: [] for label, _ in trees}
        try:
            for r in range(args.runs):
                for label, tree in (trees if r % 2 == 0 else list(reversed(trees))):
                    results[label].append(measure(tree, args))
                    print(f"  {label}: process {len(results[label])}: wall {results[label][-1]['wall']:.3f}, "
                          f"CPU {results[label][-1]['cpu']:.3f}", file=sys.stderr, flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(other)], capture_output=True)
    rows = [summary(label, results[label]) for label, _ in trees]
    print_table(rows)
    print(f"\n(load average {os.getloadavg()[0]:.2f} at the end)")
    mine = rows[0]
    status = 0
    if args.save_reference:
        payload = {"machine": machine(), "commit": commit_of(here), "threads": args.threads, "steps": args.steps,
                   "tiny": args.tiny, **{k: mine[k] for k in ("wall", "cpu", "wall_all", "cpu_all")}}
        args.save_reference.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"reference written to {args.save_reference}")
    baseline = None
    if args.reference:
        ref = json.loads(args.reference.read_text())
        if ref["machine"] != machine() or ref["threads"] != args.threads or ref["tiny"] != args.tiny:
            raise SystemExit(f"{args.reference} was measured on {ref['machine']} with {ref['threads']} thread(s); "
                             f"this is {machine()} with {args.threads}: store a reference of this machine first "
                             "(--save-reference)")
        baseline = (f"the reference ({ref['commit']})", ref[args.gate])
    elif len(rows) > 1:
        baseline = (rows[1]["label"], rows[1][args.gate])
    if baseline is not None:
        label, value = baseline
        change = mine[args.gate] / value - 1
        verdict = "slower" if change > args.tolerance else "not slower"
        print(f"{args.gate} ratio {mine[args.gate]:.3f} against {value:.3f} of {label}: {100 * change:+.1f}% "
              f"({verdict} beyond {100 * args.tolerance:.0f}%)")
        status = 1 if change > args.tolerance else 0
    return status


if __name__ == "__main__":
    sys.exit(main())
