"""A table of bad inputs: each is refused before anything is written, with one line on stderr
(plus at most a hint) that names the culprit and stays short, and the documented exit status.

Two of them (``seed = -1``, an id of 2**70) used to crash after the run directory was created,
leaving it unusable; every row checks that no output directory appears.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import digits_config, gpt2_config

from inrun.cli import main

MAX_ERROR = 500  # characters on stderr, hint included


def _rows(n: int = 40, bad: dict | None = None, at: int = 3) -> list[dict]:
    rows = [{"id": i, "x0": float(i % 7), "x1": float(i % 5) - 2.0, "y": i % 2} for i in range(n)]
    if bad:
        rows[at].update(bad)
    return rows


def _tabular(tmp: Path, rows: list[dict] | None = None, raw: bytes | None = None, name: str = "data.jsonl") -> Path:
    path = tmp / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows or _rows()))
    cfg = tmp / "run.toml"
    cfg.write_text(f"""
output = "{tmp / 'out'}"
[model]
kind = "mlp"
[data]
kind = "file"
path = "{path}"
features = ["x0", "x1"]
label_field = "y"
[validation]
fraction = 0.2
[training]
steps = 4
batch_size = 4
""")
    return cfg


def _digits(tmp: Path, *edits: tuple[str, str]) -> Path:
    text = digits_config(tmp / "out", steps=4, every=2)
    for a, b in edits:
        assert a in text
        text = text.replace(a, b)
    cfg = tmp / "run.toml"
    cfg.write_text(text)
    return cfg


def _gpt2(tmp: Path, hf: str | None = None, hf_type: str | None = None, edit: tuple[str, str] | None = None) -> Path:
    text = gpt2_config(tmp / "out", steps=2)
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit)
    if hf is not None:
        text = text.replace("resid_pdrop = 0.0", hf + ", resid_pdrop = 0.0")
    if hf_type is not None:
        text = text.replace('hf_type = "gpt2"', f'hf_type = "{hf_type}"')
    cfg = tmp / "run.toml"
    cfg.write_text(text)
    return cfg


def _train(cfg: Path) -> list[str]:
    return ["train", "--config", str(cfg)]


def _data_is_a_directory(tmp: Path) -> Path:
    cfg = _tabular(tmp)
    (tmp / "data.jsonl").unlink()
    (tmp / "data.jsonl").mkdir()
    return cfg


def _data_is_missing(tmp: Path) -> Path:
    cfg = _tabular(tmp)
    (tmp / "data.jsonl").unlink()
    return cfg


def _corrupt_parquet(tmp: Path) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_rows()), sink)
    data = sink.getvalue().to_pybytes()
    return _tabular(tmp, raw=data[: len(data) // 2], name="data.parquet")


def _output_is_a_file(tmp: Path) -> Path:
    cfg = _digits(tmp)
    (tmp / "out").write_text("not a directory")
    return cfg


Args = Callable[[Path], list[str]]
# (name, argv from a temporary directory, exit status, what stderr must say)
BAD: list[tuple[str, Args, int, str]] = [
    ("seed -1", lambda t: _train(_digits(t, ("seed = 3", "seed = -1"))), 1, "'seed': must be >= 0"),
    ("seed 2**70", lambda t: _train(_digits(t, ("seed = 3", f"seed = {2**70}"))), 1, "'seed': 1180591620717411303424 does not fit in 64 bits"),
    ("id 2**70", lambda t: _train(_tabular(t, _rows(bad={"id": 2**70}))), 1, "data.jsonl:4: id 1180591620717411303424 does not fit in 64 bits"),
    ("id a float", lambda t: _train(_tabular(t, _rows(bad={"id": 1.5}))), 1, "data.jsonl:4: id is 1.5; ids must be int or str"),
    ("feature Infinity", lambda t: _train(_tabular(t, _rows(bad={"x1": float("inf")}))), 1, "data.jsonl:4: feature 'x1' is inf"),
    ("feature NaN", lambda t: _train(_tabular(t, _rows(bad={"x0": float("nan")}))), 1, "data.jsonl:4: feature 'x0' is nan"),
    ("feature 1e300", lambda t: _train(_tabular(t, _rows(bad={"x1": 1e300}))), 1, "data.jsonl:4: feature 'x1' is 1e+300; features must be finite with |x| <= 1e+15"),
    ("feature a string", lambda t: _train(_tabular(t, _rows(bad={"x1": "3"}))), 1, "data.jsonl:4: feature 'x1' must be a number, got '3'"),
    ("data not UTF-8", lambda t: _train(_tabular(t, raw=b'{"id": 1, "x0": 1, "x1": 2, "y": 0}\n{"id": 2, "x0": "\xff"}\n')), 1, "data.jsonl:2: byte 0xff at column 18 is not UTF-8"),
    ("data path a directory", lambda t: _train(_data_is_a_directory(t)), 1, "is a directory, not a file"),
    ("data Parquet corrupt", lambda t: _train(_corrupt_parquet(t)), 1, "data.parquet is not a readable Parquet file"),
    ("data file missing", lambda t: _train(_data_is_missing(t)), 1, "data.jsonl does not exist"),
    ("config not UTF-8", lambda t: _train(_write(t / "run.toml", b"seed = 1\n\n# caf\xe9\n")), 1, "run.toml: line 3, column 6: byte 0xe9 is not UTF-8"),
    ("config not TOML", lambda t: _train(_write(t / "run.toml", b"[model\n")), 1, "not valid TOML"),
    ("config lr nan", lambda t: _train(_digits(t, ("lr = 0.3", "lr = nan"))), 1, "'optimizer.lr': must be > 0, got nan"),
    ("config steps 2**70", lambda t: _train(_digits(t, ("steps = 4", f"steps = {2**70}"))), 1, "'training.steps': 1180591620717411303424 does not fit in 64 bits"),
    ("config output empty", lambda t: _train(_digits(t, (f'output = "{t / "out"}"', 'output = ""'))), 1, "'output': must name a directory"),
    ("output is a file", lambda t: _train(_output_is_a_file(t)), 1, "exists and is not a directory"),
    ("hf_config typo", lambda t: _train(_gpt2(t, "n_layers = 6")), 1, "'model.hf_config.n_layers': GPT2Config has no field 'n_layers' (did you mean 'n_layer'?)"),
    ("hf_config unknown", lambda t: _train(_gpt2(t, "foo = 1")), 1, "GPT2Config has no field 'foo'"),
    ("hf_config context too short", lambda t: _train(_gpt2(t, "n_positions = 4")), 1, "'model.hf_config.n_positions': 4 positions cannot hold an example of data.length = 32 tokens"),
    ("hf_config wrong type", lambda t: _train(_gpt2(t, edit=("n_head = 2", 'n_head = "2"'))), 1, "'model.hf_config.n_head': expected an integer, got '2'"),
    ("hf_config negative size", lambda t: _train(_gpt2(t, edit=("n_layer = 1", "n_layer = -1"))), 1, "'model.hf_config.n_layer': must be at least 1, got -1"),
    ("hf_config refused by the model", lambda t: _train(_gpt2(t, edit=("n_embd = 32", "n_embd = 33"))), 1, "'model.hf_config': the model cannot be built from this config: `embed_dim` must be divisible by num_heads"),
    ("hf_type typo", lambda t: _train(_gpt2(t, hf_type="gtp2")), 1, "'model.hf_type': transformers does not know the model type 'gtp2' (did you mean 'gpt2'"),
    ("resume nothing", lambda t: ["train", "--resume", str(t / "out")], 1, "not a run directory"),
    ("inspect --batch-size 0", lambda t: ["inspect", "gpt2", "--batch-size", "0"], 2, "argument --batch-size: must be at least 1, got 0"),
    ("inspect --length x", lambda t: ["inspect", "gpt2", "--length", "x"], 2, "argument --length: expected an integer, got 'x'"),
    ("report --top -1", lambda t: ["report", str(t), "--top", "-1"], 2, "argument --top: must be at least 1, got -1"),
    ("report --stages 0", lambda t: ["report", str(t), "--stages", "0"], 2, "argument --stages: must be at least 1, got 0"),
    ("bench --steps 0", lambda t: ["bench", "--steps", "0"], 2, "argument --steps: must be at least 1, got 0"),
    ("bench --rounds 0", lambda t: ["bench", "--rounds", "0"], 2, "argument --rounds: must be at least 1, got 0"),
    ("demo --steps 0", lambda t: ["demo", "--steps", "0"], 2, "argument --steps: must be at least 1, got 0"),
    ("demo --seed -1", lambda t: ["demo", "--seed", "-1"], 2, "argument --seed: must be at least 0, got -1"),
    ("curate --drop bottom:2", lambda t: ["curate", str(t), "--drop", "bottom:2"], 1, "'--drop': 'bottom:2' is not 'negative' or 'bottom:FRACTION'"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("name", "argv", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_input_is_one_short_line_on_stderr_and_nothing_is_written(tmp_path, capsys, name, argv, code, message) -> None:
    args = argv(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) if code == 2 else _no_raise() as info:
        result = main(args)
    if code == 2:
        result = info.value.code
    captured = capsys.readouterr()
    assert result == code, captured.err
    err = captured.err
    lines = err.strip().splitlines()
    assert message in lines[0], err
    assert lines[0].startswith("error: ") and len(lines) <= 2 and len(err) <= MAX_ERROR, err
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    assert "Traceback" not in err and "error" not in captured.out.lower()
    created = sorted(p.name for p in tmp_path.iterdir())
    assert created == before or ("out" in before), f"{name} created {set(created) - set(before)}"


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
