"""Launch a two-rank tracker job repeatedly and fail on any abort at exit.

A job that finishes its work and then dies at exit (``terminate called without an active
exception``, SIGABRT) is a failed job for its user and a failed CI run for us; it happened by
chance (about 1 in 8 runs) before the tracker's collectives waited for gloo's worker threads
to release their tensors (``inrun.tracking.ddp``). Run this before resolving any change to
the distributed code::

    python benchmarks/ddp_exit.py            # 10 launches of tests/ddp_exit_worker.py
    python benchmarks/ddp_exit.py --runs 20 --worker tests/ddp_worker.py OUT_DIR

Prints one line per launch and a summary; exits 1 if any launch failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(worker: Path, args: list[str], nproc: int) -> tuple[int, float, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(worker), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return proc.returncode, time.perf_counter() - start, proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", type=Path, default=ROOT / "tests" / "ddp_exit_worker.py")
    parser.add_argument("worker_args", nargs="*", help="arguments passed to the worker")
    args = parser.parse_args()
    failed = 0
    for i in range(1, args.runs + 1):
        rc, seconds, stderr = launch(args.worker, args.worker_args, args.nproc)
        aborted = "terminate called" in stderr or "SIGABRT" in stderr
        failed += rc != 0
        print(f"run {i:2d}/{args.runs}: exit {rc}{' (abort at exit)' if aborted else ''}, {seconds:.1f} s",
              flush=True)
        if rc != 0:
            print(stderr[-3000:], file=sys.stderr)
    print(f"{args.runs - failed} of {args.runs} launches exited cleanly", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
