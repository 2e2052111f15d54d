"""Run config: every bad key or value is an error that names the key; TOML round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inrun.cli import main
from inrun.run.config import (
    ConfigError,
    RunConfig,
    demo_config,
    demo_config_text,
    load_config,
    parse_config,
    tomllib,
)

# (override, key the error must name, part of the message)
BAD = [
    ("optimizer.lr=-1", "optimizer.lr", "must be > 0"),
    ("optimizer.lrr=0.1", "optimizer.lrr", "did you mean 'lr'"),
    ("optimizer.name='rmsprop'", "optimizer.name", "is not one of"),
    ("optimizer.betas=[0.9]", "optimizer.betas", "2 values"),
    ("optimizer.betas=[0.9, 0.95]", None, None),  # fine for adamw
    ("training.steps='many'", "training.steps", "expected an integer"),
    ("training.steps=0", "training.steps", "must be > 0"),
    ("training.batch_size=1.5", "training.batch_size", "expected an integer"),
    ("training.device='tpu'", "training.device", "is not one of"),
    ("values.order=3", "values.order", "is not one of 1, 2"),
    ("values.on_nonfinite='ignore'", "values.on_nonfinite", "is not one of"),
    ("values.trace='yes'", "values.trace", "true or false"),
    ("model.hidden=[8]", "model.hidden", "only applies to kind = 'mlp'"),
    ("model.lora.r=0", "model.lora.r", "must be > 0"),
    ("model.lora.rank=4", "model.lora.rank", "unknown key"),
    ("model.hf_config.n_layer=[[1]]", "model.hf_config.n_layer", "expected a number"),
    ("data.kind='csv'", "data.kind", "is not one of"),
    ("data.dataset='digits'", "data.dataset", "only applies to kind = 'sklearn'"),
    ("validation.fraction=1.5", "validation.fraction", "must be in (0, 1)"),
    ("schedule.kind='cosin'", "schedule.kind", "did you mean 'cosine'"),
    ("schedule.warmup_steps=500", "schedule.warmup_steps", "must be below training.steps"),
    ("checkpoint.every=-1", "checkpoint.every", "must be >= 0"),
    ("seeds=1", "seeds", "did you mean 'seed'"),
    ("seed=-1", "seed", "must be >= 0"),
    (f"seed={2**64}", "seed", "does not fit in 64 bits"),
    ("output=''", "output", "must name a directory"),
    ("optimizer.lr=nan", "optimizer.lr", "must be > 0, got nan"),
    ("data.length=0", "data.length", "must be > 0"),
]


# (override, key, message) checked against transformers' own GPT2Config fields
BAD_HF = [
    ("model.hf_config.n_layers=6", "model.hf_config.n_layers", "has no field 'n_layers' (did you mean 'n_layer'?)"),
    ("model.hf_config.foo=1", "model.hf_config.foo", "has no field 'foo'"),
    ("model.hf_config.n_positions=4", "model.hf_config.n_positions", "cannot hold an example of data.length = 128"),
    ("model.hf_config.n_head='4'", "model.hf_config.n_head", "expected an integer"),
    ("model.hf_config.n_layer=0", "model.hf_config.n_layer", "must be at least 1"),
    ("model.hf_config.attn_pdrop=1.5", "model.hf_config.attn_pdrop", "is a probability"),
    ("model.hf_type='gtp2'", "model.hf_type", "did you mean 'gpt2'"),
    ("model.hf_config.n_positions=128", None, None),  # as long as an example: fine
    ("model.hf_config.max_position_embeddings=256", None, None),  # GPT-2's alias of n_positions
    ("model.hf_config.attn_implementation='eager'", None, None),
]


@pytest.mark.parametrize(("override", "key", "message"), BAD_HF, ids=[b[0] for b in BAD_HF])
def test_hf_config_keys_are_checked_against_the_transformers_config(override, key, message) -> None:
    from inrun.run.hf_config import check_model_config

    cfg = demo_config([override])
    if key is None:
        check_model_config(cfg)
        return
    with pytest.raises(ConfigError) as info:
        check_model_config(cfg)
    assert info.value.key == key and message in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize(("override", "key", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_key(override, key, message) -> None:
    if key is None:
        demo_config([override])
        return
    with pytest.raises(ConfigError) as info:
        demo_config([override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and message in str(info.value)


def test_optimizer_specific_keys_are_refused_for_other_optimizers() -> None:
    with pytest.raises(ConfigError, match="'optimizer.momentum': only applies to name = 'sgd'"):
        demo_config(["optimizer.name='adamw'", "optimizer.momentum=0.9"])
    cfg = demo_config(["optimizer.name='adamw'", "optimizer.betas=[0.9, 0.95]"])
    assert cfg.optimizer.betas == (0.9, 0.95)


def test_required_sections_and_bad_toml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'model': is required"):
        RunConfig.from_dict({"data": {"kind": "stdlib"}})
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[model\nkind = 1")
    with pytest.raises(ConfigError, match="'model.kind'.*needs text data"):
        RunConfig.from_dict({"model": {"kind": "hf", "hf_type": "gpt2"}, "data": {"kind": "sklearn", "dataset": "iris"}})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip_and_paths_resolved_against_the_file(tmp_path) -> None:
    text = """
    [model]
    kind = "hf"
    hf_type = "gpt2"
    hf_config = { n_layer = 1, n_embd = 16, n_head = 2 }
    [model.lora]
    r = 4
    target_modules = ["c_attn"]
    [data]
    kind = "file"
    path = "data/train.jsonl"
    subset = "keep.txt"
    [optimizer]
    name = "adam"
    lr = 1e-3
    betas = [0.9, 0.99]
    """
    (tmp_path / "run.toml").write_text(text)
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.data.path == str(tmp_path / "data" / "train.jsonl")
    assert cfg.data.subset == str(tmp_path / "keep.txt")
    assert cfg.model.lora.target_modules == ("c_attn",)
    again = parse_config(cfg.to_toml())
    assert again == cfg
    assert tomllib.loads(cfg.to_toml())["model"]["hf_config"] == {"n_layer": 1, "n_embd": 16, "n_head": 2}


def test_demo_config_is_a_valid_template(capsys) -> None:
    cfg = demo_config()
    assert cfg.data.kind == "stdlib" and cfg.model.hf_type == "gpt2" and cfg.optimizer.name == "adamw"
    assert main(["demo", "--print-config"]) == 0
    assert parse_config(capsys.readouterr().out) == parse_config(demo_config_text())


def test_cli_reports_a_bad_key_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(demo_config_text().replace("lr = 0.003", "lr = 'fast'"))
    assert main(["train", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    out = captured.err
    assert "error:" in out and "'optimizer.lr'" in out and "expected a number" in out
    assert captured.out == "" and len(out.strip().splitlines()) == 1  # on stderr, one line
    assert main(["train", "--config", str(path), "--set", "optimizer.lr=0.5", "--set", "training.stepz=3"]) == 1
    assert "'training.stepz'" in capsys.readouterr().err


def test_the_readme_config_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no TOML example"
    for block in blocks:
        cfg = parse_config(block)
        assert cfg.data.kind == "file" and cfg.schedule.kind == "cosine"


def test_the_cli_and_the_library_share_one_table_of_defaults() -> None:
    """[values] and [audit] take their defaults, choices and help from TrackerConfig and
    AuditConfig: a config that leaves them out runs the tracker the library would make."""
    import dataclasses

    from inrun import AuditConfig, TrackerConfig
    from inrun.tracking.config import option

    config = demo_config(["audit.every=100"])
    library = TrackerConfig()
    for name in ("order", "second_order", "route", "check"):
        assert getattr(RunConfig.from_dict({"model": {"kind": "mlp"}, "data": {"kind": "sklearn", "dataset": "iris"}}).values, name) == getattr(library, name)
        cli_field = next(f for f in dataclasses.fields(type(config.values)) if f.name == name)
        assert cli_field.metadata["help"] == option(TrackerConfig, name).help
    assert config.audit.audit_config(seed=0) == AuditConfig()  # players 6, no budget, on both sides
    for name in ("route", "second_order"):  # the choices are the library's too
        with pytest.raises(ConfigError, match=f"values.{name}"):
            demo_config([f"values.{name}='bogus'"])
    with pytest.raises(ConfigError, match="audit.precision"):
        demo_config(["audit.precision='half'"])
