"""The value store at scale: resident bytes per id, peak memory while saving, save and load time.

    python benchmarks/store_scale.py [--sizes 1e6,1e7] [--kinds int,str] [--via tracker|ledger]

Each size runs in fresh processes (one fills and saves, one loads), so that memory is the
store's own: the resident set after filling, minus before, per id; the peak resident set while
saving (sampled every 5 ms), minus before the save. Ids arrive 4096 per step in a shuffled order
(one epoch over a corpus); ``--via tracker`` fills through ``InRunShapley.step`` on a one-layer
model (every id through the tracker's public API), ``--via ledger`` through ``tracker.ledger.add``
(the same store path without the model's step, for sizes where the model's steps dominate).
Then the figures at 1e9 ids, linear from the two largest sizes. Prints the load average beside
the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STEP = 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident set size seen while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = rss(), False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())


def ids_of(n: int, kind: str, seed: int = 0):
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    for a in range(0, n, STEP):
        chunk = order[a:a + STEP]
        yield chunk.tolist() if kind == "int" else [f"doc-{i:010d}" for i in chunk]


def fill_and_save(n: int, kind: str, via: str, out: str) -> dict:
    import numpy as np
    import torch

    from inrun import InRunShapley

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv, yv = torch.randn(8, 4), torch.randn(8, 1)
    tracker = InRunShapley(model, opt, val_loss=lambda m: ((m(xv) - yv) ** 2).mean(), check=False)
    x, y = torch.randn(STEP, 4), torch.randn(STEP, 1)
    rng = np.random.default_rng(1)
    base = rss()
    t0 = time.perf_counter()
    for step, ids in enumerate(ids_of(n, kind)):
        if via == "tracker":
            with tracker.step(ids):
                ((model(x[: len(ids)]) - y[: len(ids)]) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        else:
            tracker.ledger.add(step, ids, rng.normal(size=(len(ids), 1)))
    fill = time.perf_counter() - t0
    ledger = tracker.ledger
    resident = rss() - base
    before = rss()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        ledger.save(out)
        save = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"n": len(ledger), "fill_s": fill, "resident_per_id": resident / n, "arrays_per_id": ledger.nbytes() / n,
            "save_s": save, "save_peak_bytes": peak.peak - before, "disk_bytes": size}


def load(out: str, probe: object) -> dict:
    from inrun import ValueLedger

    base = rss()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        ledger = ValueLedger.load(out)
        seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = ValueLedger.read(out, [probe])
    read_one = time.perf_counter() - t0
    assert probe in one
    return {"load_s": seconds, "load_resident_per_id": (rss() - base) / len(ledger),
            "load_peak_bytes": peak.peak - base, "read_one_s": read_one}


def child(args: argparse.Namespace) -> None:
    import pyarrow.parquet  # noqa: F401  (the library's own memory is not the store's)

    if args.child == "fill":
        print(json.dumps(fill_and_save(int(args.n), args.kind, args.via, args.out)))
    else:
        print(json.dumps(load(args.out, 17 if args.kind == "int" else "doc-0000000017")))


def run(n: int, kind: str, via: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="inrun-store-") as tmp:
        out = str(Path(tmp) / "ledger")
        result: dict = {"size": n, "kind": kind, "via": via}
        for what in ("fill", "load"):
            done = subprocess.run([sys.executable, __file__, "--child", what, "--n", str(n), "--kind", kind,
                                   "--via", via, "--out", out], capture_output=True, text=True, check=True)
            result.update(json.loads(done.stdout.strip().splitlines()[-1]))
        return result


def extrapolate(kind: str, results: list[dict], n: float = 1e9) -> str:
    """The figures at ``n`` ids, linear from the two largest sizes measured (their difference
    per id, so that what every process holds whatever its size, the libraries' own memory and
    thread pools, does not count per id); from one size, that size's figures per id."""
    b = results[-1]
    a = results[-2] if len(results) > 1 else {"n": 0}

    def total(r: dict, key: str) -> float:
        if r["n"] == 0:
            return 0.0
        return r[key] * r["n"] if key.endswith("per_id") else r[key]

    def at(key: str) -> float:
        return total(b, key) + (total(b, key) - total(a, key)) / (b["n"] - a["n"]) * (n - b["n"])

    sizes = f"{a['n']:,} and {b['n']:,}" if a["n"] else f"{b['n']:,}"
    return (f"{n:.0e} {kind} ids (from {sizes}): resident {at('resident_per_id') / 1e9:.0f} GB "
            f"({at('resident_per_id') / n:.1f} B/id), save {at('save_s') / 60:.0f} min (peak: one partition, "
            f"{b['save_peak_bytes'] / 2**20:.0f} MB at {b['n']:,}), disk {at('disk_bytes') / 2**30:.0f} GiB, "
            f"load {at('load_s') / 60:.0f} min ({at('load_resident_per_id') / 1e9:.0f} GB resident after), "
            f"one id read in {b['read_one_s']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7")
    parser.add_argument("--kinds", default="int,str")
    parser.add_argument("--via", choices=("tracker", "ledger"), default="tracker")
    parser.add_argument("--child", choices=("fill", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--n", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}; "
          f"{os.cpu_count()} CPUs")
    head = (f"{'ids':>12} {'kind':>4} {'via':>8} {'fill s':>8} {'B/id':>6} {'arrays':>7} {'save s':>7} "
            f"{'save peak':>10} {'disk B/id':>9} {'load s':>7} {'load B/id':>9} {'read 1 s':>9}")
    print(head)
    done: dict[str, list[dict]] = {}
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        for kind in args.kinds.split(","):
            r = run(size, kind, args.via)
            print(f"{r['n']:>12,} {kind:>4} {args.via:>8} {r['fill_s']:>8.1f} {r['resident_per_id']:>6.1f} "
                  f"{r['arrays_per_id']:>7.1f} {r['save_s']:>7.2f} {r['save_peak_bytes'] / 2**20:>8.0f}MB "
                  f"{r['disk_bytes'] / r['n']:>9.1f} {r['load_s']:>7.2f} {r['load_resident_per_id']:>9.1f} "
                  f"{r['read_one_s']:>9.3f}", flush=True)
            done.setdefault(kind, []).append(r)
    for kind, rs in done.items():
        print(extrapolate(kind, rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
