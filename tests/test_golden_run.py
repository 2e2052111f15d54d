"""Golden run directories: every file a run writes, compared with a committed copy.

Two runs, each checkpointed, killed with ``SIGKILL`` part-way, resumed and finished, each audited:

* **cli**: ``inrun train`` on iris (an MLP in float64, AdamW, order 1), killed during step 7
  (after the checkpoint of step 4), then ``inrun train --resume``;
* **library**: your own loop writing through :class:`inrun.RunWriter` (an MLP in float64, SGD
  with momentum, order 2 with a per-validation table, string ids), killed after step 6, then
  reopened with ``resume="auto"``.

Every file of both run directories is compared with ``tests/golden/run_directories.json``: JSON
and TOML by key, Parquet tables by column and value, ``state.pt`` by value (floating tensors
value by value, other tensors by the SHA-256 of their bytes), anything else by its bytes. Values
must be equal exactly when the torch build and CPU are the ones that wrote the golden file, and
within 1e-9 relative elsewhere (the models are float64, so another machine's kernels move only
the last bits).

Left out, because they legitimately differ between two runs of the same config: timestamps
(``created``, ``updated``, the lock files' ``since``), pids and hostnames (the lock files
``.lock`` and ``.results.lock``: who holds the run), durations (every key or column whose name
starts or ends with ``seconds``, and the cost ``ratio`` made of them), where the test's temporary
directory is (written ``<root>`` where a file names it), and what is derived from those: the
``checksum`` of a JSON file that holds one, and the size and SHA-256 that a manifest lists for a
file holding durations (``audit.parquet``). Each of those files is still compared by its values,
and :meth:`inrun.RunDir.verify` must find every checksum intact.

It guards refactors of the product (moved modules, one writer for every loop): a change that
moves code must not change a run directory. When a change means to change what a run directory
holds, regenerate the file in its own commit that says why::

    INRUN_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_run.py

This file is also the script of the killed runs: ``python tests/test_golden_run.py library DIR
KILL_AFTER`` (the library loop) and ``... cli-kill TOML KILL_AFTER`` (``inrun train`` killed by
a global optimizer hook, which knows nothing of inrun's internals).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

GOLDEN = Path(__file__).parent / "golden" / "run_directories.json"
REGENERATE = os.environ.get("INRUN_REGENERATE_GOLDEN") == "1"
STEPS, KILL_AFTER = 12, 6
RTOL_ELSEWHERE = 1e-9

CLI_CONFIG = f"""
seed = 1
output = "cli"
[model]
kind = "mlp"
hidden = [5]
dtype = "float64"
[data]
kind = "sklearn"
dataset = "iris"
max_per_source = 10
[validation]
max_examples = 8
[optimizer]
name = "adamw"
lr = 0.05
weight_decay = 0.01
[training]
steps = {STEPS}
batch_size = 6
eval_every = 3
threads = 1
[values]
order = 1
trace = true
[audit]
every = 4
players = 4
budget = 1.0
[checkpoint]
every = 4
keep = 2
"""

# Left out of the comparison (see the module docstring): names of keys and columns.
TIMES = {"created", "updated", "since"}
LOCK_FILES = {".lock", ".results.lock"}


def volatile(name: str) -> bool:
    """A timestamp or a duration (or a ratio of durations)."""
    return name in TIMES or name.startswith("seconds") or name.endswith("seconds") or name == "ratio"


# -- the library run ---------------------------------------------------------------------------
def library_run(out: Path, kill_after: int | None = None) -> None:
    """Your own loop: 24 examples with string ids, batches of 6 in an order fixed by the step."""
    from inrun import AuditConfig, InRunShapley, RunWriter

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    xv = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    yv = torch.randint(0, 3, (5,), generator=gen)
    ids = [f"ex{i:02d}" for i in range(24)]
    examples = {"id": ids, "source": ["abc"[i % 3] for i in range(24)], "text": [f"example {i}" for i in range(24)]}
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    tracker = InRunShapley(
        model, optimizer, val_loss=lambda m: F.cross_entropy(m(xv), yv, reduction="none"), order=2,
        keep_trace=True, audit=AuditConfig(every=4, players=4), validation_ids=[f"v{i}" for i in range(5)],
    )
    with RunWriter(out, tracker, examples=examples, resume="auto", keep=2, total_steps=STEPS,
                   description="golden library run", metadata={"recipe": "golden"}) as run:
        for step in range(run.start_step, STEPS):
            rows = torch.randperm(24, generator=torch.Generator().manual_seed(100 + step // 4))[6 * (step % 4):][:6]
            with tracker.step([ids[r] for r in rows]):
                loss = F.cross_entropy(model(x[rows]), y[rows])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.log(train_loss=loss.item())
            if (step + 1) % 4 == 0:
                run.checkpoint(extra={"epoch": step // 4})
            if kill_after is not None and step + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)


def cli_killed(config: Path, kill_after: int) -> None:
    """``inrun train --config`` killed with SIGKILL right after the optimizer's step ``kill_after``."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from inrun.cli import main

    seen: list[int] = []

    def kill(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen.append(id(optimizer))
        if seen.count(seen[0]) == kill_after:  # the run's optimizer (the audit steps scratch ones)
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(kill)
    os.chdir(config.parent)
    main(["train", "--config", config.name])


def _script(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, __file__, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# -- reading a run directory as values ---------------------------------------------------------
def content(run: Path, root: Path) -> dict[str, Any]:
    """Every file of a run directory (relative path -> its content as plain values)."""
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if path.is_dir() or path.name in LOCK_FILES:
            continue
        out[rel] = _rooted(_file(path), str(root))
    for rel, value in out.items():
        if rel.endswith("manifest.json") or rel.endswith("ledger.json"):
            _drop_derived_digests(value, out, rel)
    return out


def _file(path: Path) -> Any:
    if path.suffix == ".json":
        return _plain(json.loads(path.read_text()), strip_checksum=True)
    if path.suffix == ".toml":
        return _plain(tomllib.loads(path.read_text()))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {
            "schema": [[f.name, str(f.type)] for f in table.schema],
            "columns": {c: ("<varies>" if volatile(c) else _plain(table.column(c).to_pylist())) for c in table.column_names},
        }
    if path.suffix == ".pt":
        return _plain(torch.load(path, map_location="cpu", weights_only=True))
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _plain(obj: Any, strip_checksum: bool = False) -> Any:
    if isinstance(obj, dict):
        return {str(k): ("<varies>" if volatile(str(k)) else _plain(v)) for k, v in obj.items()
                if not (strip_checksum and k == "checksum")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.is_floating_point():
            return {"tensor": str(t.dtype), "shape": list(t.shape), "values": t.double().flatten().tolist()}
        return {"tensor": str(t.dtype), "shape": list(t.shape),
                "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    raise TypeError(f"unexpected {type(obj).__name__} in a run directory")


def _rooted(obj: Any, root: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    if isinstance(obj, dict):
        return {k: _rooted(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rooted(v, root) for v in obj]
    return obj


def _drop_derived_digests(manifest: Any, files: dict[str, Any], rel: str) -> None:
    """A manifest's size and SHA-256 of a file that holds durations differ with them."""
    base = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        return
    for name, digest in listed.items():
        if _holds_durations(files.get(base + name)) and isinstance(digest, dict):
            listed[name] = {k: "<varies>" for k in digest}


def _holds_durations(value: Any) -> bool:
    if value == "<varies>":
        return True
    if isinstance(value, dict):
        return any(_holds_durations(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_durations(v) for v in value)
    return False


# -- comparing ---------------------------------------------------------------------------------
def differences(got: Any, want: Any, where: str, exact: bool) -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}: key {k!r} is new" for k in sorted(set(got) - set(want))]
        out += [f"{where}: key {k!r} is missing" for k in sorted(set(want) - set(got))]
        for k in sorted(set(got) & set(want)):
            out += differences(got[k], want[k], f"{where}/{k}", exact)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, golden {len(want)}"]
        out = []
        for i, (g, w) in enumerate(zip(got, want)):
            out += differences(g, w, f"{where}[{i}]", exact)
            if len(out) > 5:
                break
        return out
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isnan(want) and math.isnan(got):
            return []
        if got == want or (not exact and math.isclose(got, want, rel_tol=RTOL_ELSEWHERE, abs_tol=1e-12)):
            return []
        return [f"{where}: {got!r}, golden {want!r}"]
    if got != want or type(got) is not type(want):
        return [f"{where}: {str(got)[:120]!r}, golden {str(want)[:120]!r}"]
    return []


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Any]:
    """Both runs: killed in two processes at once, then resumed here."""
    from inrun import RunDir
    from inrun.cli import main

    root = tmp_path_factory.mktemp("golden")
    (root / "cli.toml").write_text(CLI_CONFIG)
    killed = [_script("cli-kill", str(root / "cli.toml"), str(KILL_AFTER + 1), cwd=root),
              _script("library", str(root / "library"), str(KILL_AFTER), cwd=root)]
    for proc in killed:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, f"the run was not killed: {output}"
    for name, step in (("cli", 4), ("library", 4)):
        status = RunDir(root / name).status()
        assert status["state"] == "running" and status.get("stale"), status
        assert RunDir(root / name).checkpoints()[-1][0] == step
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert main(["train", "--resume", "cli"]) == 0
    finally:
        os.chdir(cwd)
    library_run(root / "library")
    out = {}
    for name in ("cli", "library"):
        rd = RunDir(root / name)
        assert rd.status()["state"] == "complete"
        assert rd.verify() == [], f"{name}: {rd.verify()}"
        out[name] = content(root / name, root)
    return out


@pytest.fixture(scope="module")
def golden(runs: dict[str, Any]) -> dict[str, Any]:
    if REGENERATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=0, sort_keys=True) + "\n")
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; regenerate it with INRUN_REGENERATE_GOLDEN=1")
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("kind", ["cli", "library"])
def test_a_killed_and_resumed_audited_run_writes_the_golden_run_directory(runs, golden, kind) -> None:
    got, want = runs[kind], golden["runs"][kind]
    exact = golden["environment"] == environment()
    assert sorted(got) == sorted(want), (
        f"files differ: new {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}")
    problems = []
    for rel in sorted(want):
        problems += differences(got[rel], want[rel], rel, exact)
    assert not problems, f"{len(problems)} difference(s) from {GOLDEN.name}:\n" + "\n".join(problems[:40])


def test_the_golden_runs_cover_checkpoints_audits_and_a_resume(golden) -> None:
    """What the comparison would silently lose if the runs changed: each run directory holds its
    checkpoints, an audit, a trace, the examples and a finished summary."""
    for kind, files in golden["runs"].items():
        assert {"run.json", "status.json", "values.parquet", "metrics.parquet", "examples.parquet", "audit.parquet",
                "summary.json", "manifest.json", "ledger.json", "tracker.json"} <= set(files), kind
        assert [f for f in files if f.startswith("checkpoints/step-000008/")], kind
        assert [f for f in files if f.startswith("checkpoints/step-000012/")], kind
        assert [f for f in files if f.startswith("trace/part-")], kind
        assert files["status.json"]["state"] == "complete", kind


if __name__ == "__main__":
    what, where, after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    if what == "library":
        library_run(where, kill_after=after)
    else:
        cli_killed(where, after)
    raise SystemExit(f"{what} was not killed")
