"""Run configuration: frozen dataclasses read from TOML, validated, saved next to the results.

A run is described by one :class:`RunConfig`. Every section is a frozen dataclass whose fields
carry a help string and are checked in ``__post_init__``; an unknown key or a bad value is a
:class:`ConfigError` that names the key (``optimizer.lr``), whether the config came from a file
(:func:`load_config`), a dict (:meth:`RunConfig.from_dict`) or ``--set`` overrides.

Example:
    >>> cfg = RunConfig.from_dict({
    ...     "model": {"kind": "mlp", "hidden": [32]},
    ...     "data": {"kind": "sklearn", "dataset": "digits"},
    ...     "optimizer": {"name": "sgd", "lr": 0.1},
    ... })
    >>> cfg.training.steps, cfg.optimizer.lr
    (400, 0.1)
    >>> RunConfig.from_dict({**cfg.to_dict(), "optimizer": {"lr": -1}})
    Traceback (most recent call last):
    ...
    inrun.run.config.ConfigError: config key 'optimizer.lr': must be > 0, got -1.0

Relative paths inside a config file (``data.path``, ``data.subset``, ``validation.path``) are
resolved against the file's directory when it is loaded; ``output`` is relative to the current
directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from ..errors import InRunError
from ..files import atomic_write, utf8_text
from ..store.rundir import CONFIG_FILE, META_FILE, RunDir, RunDirError
from ..tracking.audit.config import AuditConfig, AuditError
from ..tracking.config import TrackerConfig, option

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MODEL_KINDS = ("hf", "mlp", "cnn")
DATA_KINDS = ("stdlib", "sklearn", "file")
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
FILE_SUFFIXES = (".jsonl", ".txt", ".parquet")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")
ON_NONFINITE = ("stop", "skip")
PATH_KEYS = (("data", "path"), ("data", "subset"), ("validation", "path"))
INT64_MAX = 2**63 - 1  # TOML integers are 64-bit; so are Parquet's, numpy's seeds take any >= 0


class ConfigError(InRunError, ValueError):
    """A config key is unknown, missing, or has a bad value; ``key`` is its dotted name."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}" if source is None else f"{source}: {reason}")

    @classmethod
    def file(cls, source: str, reason: str) -> ConfigError:
        """An error about the whole file (unreadable, not TOML): no key to name."""
        return cls("", reason, source=source)

    def under(self, prefix: str) -> ConfigError:
        """The same error with the key inside section ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.reason)


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with a help string (listed by ``inrun train --list-keys``)."""
    return field(default=default, metadata={"help": text}, **kw)


def _library(cls: type, name: str) -> Any:
    """A field whose default and help are the library's (:func:`inrun.tracking.config.option`):
    one table of defaults for ``InRunShapley`` and ``inrun train``."""
    shared = option(cls, name)
    return field(default=shared.default, metadata={"help": shared.help})


def _choice(obj: Any, name: str, allowed: Sequence[Any]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(name, f"{value!r} is not one of {', '.join(map(repr, allowed))}{hint}")


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(name, f"must be {bound}, got {value!r}")


def _only_for(obj: Any, kind_field: str, kinds: Sequence[str], *names: str) -> None:
    kind = getattr(obj, kind_field)
    if kind in kinds:
        return
    for name in names:
        if getattr(obj, name) is not None:
            raise ConfigError(
                name, f"only applies to {kind_field} = {' or '.join(map(repr, kinds))}, not {kind!r}"
            )


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (``peft``) on a Hugging Face model: only the adapters train and are valued."""

    r: int = _help("adapter rank", 8)
    alpha: float = _help("scaling numerator (lora_alpha); the update is scaled by alpha / r", 16.0)
    dropout: float = _help("dropout on the adapter input (lora_dropout)", 0.0)
    target_modules: tuple[str, ...] | None = _help(
        "module names to adapt (e.g. ['c_attn']); default: peft's choice for the model type", None
    )

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules", "must name at least one module (or be left out)")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a Hugging Face architecture built from its config, or a small MLP/CNN."""

    kind: str = _help("'hf' (a Hugging Face causal LM built from a config), 'mlp' or 'cnn'")
    hf_type: str | None = _help(
        "hf: the model type, as transformers.AutoConfig.for_model knows it ('gpt2', 'llama', ...)",
        None,
    )
    hf_config: dict[str, Any] | None = _help(
        "hf: config fields (sizes), e.g. {n_layer = 2, n_embd = 128, n_head = 4}; vocab_size "
        "defaults to 256 (byte tokens) and the context to data.length",
        None,
    )
    hidden: tuple[int, ...] | None = _help("mlp: hidden layer widths (default [64])", None)
    channels: tuple[int, ...] | None = _help("cnn: channels of the 3x3 conv layers (default [8, 16])", None)
    dtype: str = _help("parameter dtype: 'float32' or 'float64'", "float32")
    lora: LoraConfig | None = _help("hf: train low-rank adapters only ([model.lora])", None)

    def __post_init__(self) -> None:
        _choice(self, "kind", MODEL_KINDS)
        _choice(self, "dtype", DTYPES)
        _only_for(self, "kind", ("hf",), "hf_type", "hf_config", "lora")
        _only_for(self, "kind", ("mlp",), "hidden")
        _only_for(self, "kind", ("cnn",), "channels")
        if self.kind == "hf" and not self.hf_type:
            raise ConfigError("hf_type", "is required for kind = 'hf' (e.g. 'gpt2' or 'llama')")
        for name in ("hidden", "channels"):
            widths = getattr(self, name)
            if widths is not None and (not widths or any(w <= 0 for w in widths)):
                raise ConfigError(name, f"must be a non-empty list of positive widths, got {list(widths)}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: the standard-library corpus, a scikit-learn dataset, or your own file."""

    kind: str = _help("'stdlib' (Python's own sources), 'sklearn' (bundled datasets) or 'file'")
    length: int = _help("text: tokens (bytes) per example; longer texts are cut, shorter padded", 128)
    packages: tuple[str, ...] | None = _help(
        "stdlib: top-level packages to use (the data sources); default: a fixed list of 16", None
    )
    max_per_source: int | None = _help("keep at most this many training examples per source", None)
    pack: bool | None = _help(
        "stdlib: documents of whole lines and varying length (up to length bytes) packed several "
        "to a row of length tokens, as pretraining packs them; each document is valued (its own "
        "position_ids, so it attends only to itself)",
        None,
    )
    dataset: str | None = _help("sklearn: 'digits', 'iris', 'wine' or 'breast_cancer'", None)
    path: str | None = _help("file: a .jsonl, .txt (one example per line) or .parquet file", None)
    id_field: str = _help("file: the column with a unique int or str id per example", "id")
    source_field: str = _help("file: the optional column with the example's data source", "source")
    text_field: str = _help("file: the column with the text (text data)", "text")
    features: tuple[str, ...] | None = _help(
        "file: numeric feature columns (tabular data, with label_field) instead of text", None
    )
    label_field: str | None = _help("file: the class-label column of tabular data", None)
    subset: str | None = _help(
        "a .parquet or .txt file of training ids to keep (inrun curate writes one)", None
    )

    def __post_init__(self) -> None:
        _choice(self, "kind", DATA_KINDS)
        _positive(self, "length", "max_per_source")
        for name in ("id_field", "source_field", "text_field", "label_field", "path", "subset"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ConfigError(name, "must not be empty")
        if self.features is not None and (not self.features or len(set(self.features)) != len(self.features)):
            raise ConfigError("features", f"must name distinct columns, got {list(self.features)}")
        _only_for(self, "kind", ("stdlib",), "packages", "pack")
        _only_for(self, "kind", ("sklearn",), "dataset")
        _only_for(self, "kind", ("file",), "path", "features", "label_field")
        if self.kind == "sklearn":
            if self.dataset is None:
                raise ConfigError("dataset", f"is required for kind = 'sklearn' (one of {SKLEARN_DATASETS})")
            _choice(self, "dataset", SKLEARN_DATASETS)
        if self.kind == "file":
            if not self.path:
                raise ConfigError("path", "is required for kind = 'file'")
            suffix = Path(self.path).suffix.lower()
            if suffix not in FILE_SUFFIXES:
                raise ConfigError("path", f"must end in one of {', '.join(FILE_SUFFIXES)}, got {self.path!r}")
            if (self.features is None) != (self.label_field is None):
                raise ConfigError(
                    "features" if self.features is None else "label_field",
                    "tabular data needs both features and label_field",
                )
            if self.features is not None and suffix == ".txt":
                raise ConfigError("features", "a .txt file holds text, one example per line")
        if self.packages is not None and not self.packages:
            raise ConfigError("packages", "must name at least one package (or be left out)")


@dataclass(frozen=True)
class ValidationConfig:
    """The validation set whose loss the values explain."""

    fraction: float = _help(
        "share held out from the data when no path is given (stdlib: whole modules; otherwise "
        "by a stable hash of the id)",
        0.1,
    )
    max_examples: int = _help("use at most this many validation examples, spread evenly", 64)
    path: str | None = _help("file data: a separate validation file in the same format", None)

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError("fraction", f"must be in (0, 1), got {self.fraction!r}")
        _positive(self, "max_examples")


@dataclass(frozen=True)
class OptimizerConfig:
    """The torch optimizer (the tracker says clearly if it cannot attribute its updates)."""

    name: str = _help("'sgd', 'adam' or 'adamw'", "sgd")
    lr: float = _help("learning rate", 0.1)
    weight_decay: float = _help("weight decay (no example's contribution)", 0.0)
    momentum: float | None = _help("sgd: momentum (default 0)", None)
    nesterov: bool | None = _help("sgd: Nesterov momentum (default false)", None)
    betas: tuple[float, float] | None = _help("adam/adamw: (beta1, beta2) (default [0.9, 0.999])", None)
    eps: float | None = _help("adam/adamw: epsilon (default 1e-8)", None)

    def __post_init__(self) -> None:
        _choice(self, "name", OPTIMIZERS)
        _positive(self, "lr", "eps")
        _positive(self, "weight_decay", "momentum", allow_zero=True)
        _only_for(self, "name", ("sgd",), "momentum", "nesterov")
        _only_for(self, "name", ("adam", "adamw"), "betas", "eps")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule over ``training.steps`` (linear warm-up, then the shape)."""

    kind: str = _help("'constant', 'linear' (decay to min_lr_ratio) or 'cosine'", "constant")
    warmup_steps: int = _help("linear warm-up from 0 over this many steps", 0)
    min_lr_ratio: float = _help("final learning rate as a fraction of optimizer.lr", 0.0)

    def __post_init__(self) -> None:
        _choice(self, "kind", SCHEDULES)
        _positive(self, "warmup_steps", allow_zero=True)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: steps, batch, clipping, evaluation, threads and device."""

    steps: int = _help("optimizer steps", 400)
    batch_size: int = _help("examples per step", 16)
    clip_grad_norm: float | None = _help("clip the gradient norm to this (default: no clipping)", None)
    eval_every: int = _help("validation loss every this many steps (for the curves; 0: start and end only)", 20)
    threads: int | None = _help("torch CPU threads (default: torch's choice)", None)
    device: str = _help("'cpu', 'cuda' or 'auto' (cuda when available)", "cpu")

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "clip_grad_norm", "threads")
        _positive(self, "eval_every", allow_zero=True)
        _choice(self, "device", DEVICES)


@dataclass(frozen=True)
class ValuesConfig:
    """How values are computed (see :class:`inrun.TrackerConfig`)."""

    enabled: bool = _help("compute values (false: plain training, e.g. curation retraining)", True)
    order: int = _library(TrackerConfig, "order")
    second_order: str = _library(TrackerConfig, "second_order")
    route: str = _library(TrackerConfig, "route")
    check: bool = _library(TrackerConfig, "check")
    carry: str = _library(TrackerConfig, "carry")
    carry_window: int | None = _library(TrackerConfig, "carry_window")
    on_nonfinite: str = _help(
        "NaN/Inf loss or gradient: 'stop' the run (default) or 'skip' the step; either way it is "
        "recorded as a skipped step and never reaches the values",
        "stop",
    )
    trace: bool = _help(
        "keep the per-step trace (the report's training-stage plots need it; the library's keep_trace "
        "is off by default, to save memory)", True,
    )

    def __post_init__(self) -> None:
        for name in ("order", "second_order", "route", "carry"):
            _choice(self, name, option(TrackerConfig, name).choices or ())
        _positive(self, "carry_window")
        _choice(self, "on_nonfinite", ON_NONFINITE)


@dataclass(frozen=True)
class AuditSection:
    """The run checks its own values: exact Shapley values of sampled steps beside the tracker's."""

    enabled: bool = _help("audit the values during the run (its cost is measured and printed; the "
                          "library's audit= is off by default)", True)
    every: int = _library(AuditConfig, "every")
    at: tuple[int, ...] = _library(AuditConfig, "at")
    players: int = _library(AuditConfig, "players")
    max_exact: int = _library(AuditConfig, "max_exact")
    permutations: int = _library(AuditConfig, "permutations")
    warn_below: float = _library(AuditConfig, "warn_below")
    warn_rmse: float = _library(AuditConfig, "warn_rmse")
    precision: str = _library(AuditConfig, "precision")
    budget: float | None = _library(AuditConfig, "budget")

    def __post_init__(self) -> None:
        try:
            self.audit_config(seed=0)
        except AuditError as exc:
            name = str(exc).split("=", 1)[0].removeprefix("audit.")
            raise ConfigError(name, str(exc).split(": ", 1)[-1]) from None

    def audit_config(self, seed: int) -> Any:
        """The :class:`inrun.AuditConfig` of this section (``None`` when disabled), seeded with the run's seed."""
        if not self.enabled:
            return None
        return AuditConfig(
            every=self.every, at=self.at, players=self.players, max_exact=self.max_exact,
            permutations=self.permutations, seed=seed, warn_below=self.warn_below, warn_rmse=self.warn_rmse,
            precision=self.precision, budget=self.budget,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of model, optimizer, data order, RNG and values, written atomically."""

    every: int = _help("checkpoint every this many steps (0: only at the end)", 50)
    keep: int = _help("keep this many most recent checkpoints", 2)

    def __post_init__(self) -> None:
        _positive(self, "every", allow_zero=True)
        _positive(self, "keep")


@dataclass(frozen=True)
class RunConfig:
    """One training run whose data are valued. ``model`` and ``data`` are required."""

    model: ModelConfig = _help("[model] section")
    data: DataConfig = _help("[data] section")
    validation: ValidationConfig = _help("[validation] section", default_factory=ValidationConfig)
    optimizer: OptimizerConfig = _help("[optimizer] section", default_factory=OptimizerConfig)
    schedule: ScheduleConfig = _help("[schedule] section", default_factory=ScheduleConfig)
    training: TrainingConfig = _help("[training] section", default_factory=TrainingConfig)
    values: ValuesConfig = _help("[values] section", default_factory=ValuesConfig)
    audit: AuditSection = _help("[audit] section", default_factory=AuditSection)
    checkpoint: CheckpointConfig = _help("[checkpoint] section", default_factory=CheckpointConfig)
    seed: int = _help("seed of model initialization and data order", 0)
    output: str = _help("run directory (relative to the current directory)", "runs/run")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0 (numpy and torch seeds are non-negative), got {self.seed}")
        if not self.output.strip():
            raise ConfigError("output", "must name a directory (it is empty)")
        if self.schedule.warmup_steps >= self.training.steps and self.schedule.warmup_steps:
            raise ConfigError(
                "schedule.warmup_steps",
                f"{self.schedule.warmup_steps} must be below training.steps ({self.training.steps})",
            )
        if self.model.kind == "cnn" and not (self.data.kind == "sklearn" and self.data.dataset == "digits"):
            raise ConfigError("model.kind", "'cnn' needs image data: data.kind = 'sklearn', dataset = 'digits'")
        text_data = self.data.kind == "stdlib" or (self.data.kind == "file" and self.data.features is None)
        if self.model.kind == "hf" and not text_data:
            raise ConfigError("model.kind", "'hf' (a causal LM) needs text data; use 'mlp' or 'cnn' for features")
        if self.model.kind != "hf" and text_data:
            raise ConfigError("model.kind", f"{self.model.kind!r} needs numeric features; text data needs 'hf'")
        if self.validation.path is not None and self.data.kind != "file":
            raise ConfigError("validation.path", "only applies to data.kind = 'file'")

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a nested dict (a parsed TOML file); errors name the key."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists, no tuples; ``None`` fields left out): JSON and TOML safe."""
        return _plain(self)

    def to_toml(self) -> str:
        """The config as a TOML document that :func:`load_config` reads back unchanged."""
        return dumps_toml(self)

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **sections)

    def with_overrides(self, overrides: Sequence[str]) -> RunConfig:
        """A copy with ``section.key=value`` overrides (values in TOML syntax) applied."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))


# -- dict <-> dataclass ------------------------------------------------------------------------
def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "(top level)", f"must be a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(
                _join(prefix, key), f"unknown key{hint}; valid keys here: {', '.join(fields)}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        kwargs[name] = _coerce(data[name], hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # raised by this section's own __post_init__: relative key
        raise exc.under(prefix) from None


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {short_repr(value)}")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(key, f"{value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {short_repr(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(key, f"{value} is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {short_repr(value)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a table, got {value!r}")
        for k, v in value.items():
            if not isinstance(v, (bool, int, float, str)) and not (
                isinstance(v, list) and all(isinstance(x, (bool, int, float, str)) for x in v)
            ):
                raise ConfigError(f"{key}.{k}", f"expected a number, string or boolean, got {short_repr(v)}")
            if isinstance(v, int) and not isinstance(v, bool) and not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ConfigError(f"{key}.{k}", f"{v} does not fit in 64 bits")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug, not bad input


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is not None:
                out[f.name] = _plain(v)
        return out
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


# -- files -----------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML config file, apply ``section.key=value`` overrides, validate.

    Raises:
        ConfigError: unreadable TOML, unknown keys, bad values; the message names the key.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError.file(str(path), f"cannot read the config: {exc.strerror or exc}") from None
    return parse_config(decode_utf8(raw, str(path), ConfigError.file), base_dir=path.parent, source=str(path), overrides=overrides)


def decode_utf8(raw: bytes, source: str, error: Any) -> str:
    """``raw`` as UTF-8 text; else ``error(source, reason)`` naming the line and byte."""
    return utf8_text(raw, lambda line, column, byte: error(
        source, f"line {line}, column {column}: byte 0x{byte:02x} is not UTF-8; save the file as UTF-8"))


def parse_config(
    text: str, base_dir: Path | None = None, source: str = "<config>", overrides: Sequence[str] = ()
) -> RunConfig:
    """Parse TOML text into a validated :class:`RunConfig` (paths resolved against ``base_dir``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.file(source, f"not valid TOML: {exc}") from None
    data = apply_overrides(data, overrides)
    if base_dir is not None:
        for section, key in PATH_KEYS:
            value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[section][key] = str((base_dir / value).resolve())
    return RunConfig.from_dict(data)


def demo_config_text() -> str:
    """The embedded default config of ``inrun demo`` (a valid example config to copy)."""
    return resources.files("inrun").joinpath("configs/demo.toml").read_text()


def demo_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The embedded default config, with optional overrides."""
    return parse_config(demo_config_text(), source="inrun/configs/demo.toml", overrides=overrides)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (value in TOML syntax, else a string)."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k.strip() for k in dotted.strip().split(".")]
        if not all(keys):
            raise ConfigError(dotted, "an override must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = out
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: depth + 1]), "is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


# -- a run directory's config ----------------------------------------------------------------
def saved_config(rd: RunDir) -> tuple[RunConfig, str | None]:
    """``(RunConfig, problem)``: the config of a run directory's ``config.toml``; or, when that file is
    missing or unreadable, the one ``run.json`` holds, with ``problem`` saying why."""
    path = rd.file(CONFIG_FILE)
    try:
        return parse_config(path.read_bytes().decode("utf-8"), source=str(path)), None
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        problem = f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})"
    meta = rd.meta()
    try:
        return RunConfig.from_dict(meta.get("config", {})), problem
    except ConfigError as exc:
        raise RunDirError(f"{problem}, and the config in {META_FILE} is not valid ({exc})") from None


def heal_config(rd: RunDir, config: RunConfig) -> None:
    """Rewrite ``config.toml`` (missing or damaged) from the config the run uses."""
    atomic_write(rd.file(CONFIG_FILE), lambda p: Path(p).write_text(config.to_toml(), encoding="utf-8"))


# -- a small TOML writer for configs -----------------------------------------------------------
def dumps_toml(config: Any) -> str:
    """TOML for a config dataclass: sections as ``[tables]``, dict fields inline, ``None`` left out."""
    lines: list[str] = []
    _emit_section(config, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_section(obj: Any, path: list[str], lines: list[str]) -> None:
    values = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if path:
        lines += ["", f"[{'.'.join(path)}]"]
    for name, value in values:
        if value is not None and not dataclasses.is_dataclass(value):
            lines.append(f"{name} = {_toml_value(_plain(value))}")
    for name, value in values:
        if dataclasses.is_dataclass(value):
            _emit_section(value, [*path, name], lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
