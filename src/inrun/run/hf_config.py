"""``model.hf_config`` against transformers' own fields: every key, type and range checked
before anything is built or written (a typo or a zero width is an error that names the key)."""

from __future__ import annotations

import difflib
import inspect
import math
import re

from ..errors import one_line
from .config import ConfigError, RunConfig, short_repr

# Sizes and counts that must be at least 1 (0 or a negative width builds a silently broken model).
_SIZE_NAME = re.compile(r"^(n_|num_)|(_size|_dim|_layers?|_heads?|_positions|_embd|_inner)$")
_PROB_NAME = re.compile(r"(pdrop|dropout|_prob)$")
# Keys every transformers config takes although its class does not list them.
_COMMON_HF_KEYS = ("attn_implementation",)


def check_model_config(config: RunConfig) -> None:
    """Check ``model.hf_type`` and every ``model.hf_config`` key against the transformers config
    class's own fields (name, type, range) before anything is built or written.

    Raises:
        ConfigError: an unknown model type or key (with the nearest valid ones), a value of the
            wrong type or range, or a context shorter than ``data.length``.
    """
    m = config.model
    if m.kind != "hf":
        return
    from transformers import CONFIG_MAPPING

    types_known = list(CONFIG_MAPPING.keys())
    if m.hf_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(str(m.hf_type), types_known, n=3)
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise ConfigError(
            "model.hf_type", f"transformers does not know the model type {short_repr(m.hf_type)}{hint}"
        )
    cls = CONFIG_MAPPING[m.hf_type]
    try:
        defaults = cls().to_dict()
    except Exception:  # pragma: no cover - a config class without usable defaults
        defaults = {}
    known = set(defaults) | set(getattr(cls, "attribute_map", {})) | set(_COMMON_HF_KEYS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= {n for n, p in inspect.signature(init).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    known -= {"transformers_version", "_name_or_path", "model_type", "architectures"}
    aliases = dict(getattr(cls, "attribute_map", {}))
    fields = dict(m.hf_config or {})
    for key, value in fields.items():
        dotted = f"model.hf_config.{key}"
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(dotted, f"{cls.__name__} has no field {key!r}{hint}")
        _check_value(dotted, value, defaults.get(aliases.get(key, key)), aliases.get(key, key))
    try:
        from transformers import AutoConfig

        built = AutoConfig.for_model(m.hf_type, **fields)
    except Exception as exc:  # transformers' own validation: the value is the user's
        raise ConfigError("model.hf_config", f"transformers refuses it: {(one_line(exc) or type(exc).__name__)}") from None
    context = getattr(built, "max_position_embeddings", None)
    given = [k for k in fields if aliases.get(k, k) == aliases.get("max_position_embeddings", "max_position_embeddings")]
    if given and isinstance(context, int) and context < config.data.length:
        raise ConfigError(
            f"model.hf_config.{given[0]}",
            f"{context} positions cannot hold an example of data.length = {config.data.length} tokens; "
            "raise it or leave it out",
        )


def _check_value(dotted: str, value: object, default: object, name: str) -> None:
    """One ``hf_config`` value against its field's default: the type, sizes at least 1,
    probabilities in [0, 1]."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"expected true or false, got {short_repr(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(dotted, f"expected an integer, got {short_repr(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(dotted, f"expected a finite number, got {short_repr(value)}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(dotted, f"expected a string, got {short_repr(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, int) and default > 0 \
            and _SIZE_NAME.search(name) and value < 1:
        raise ConfigError(dotted, f"must be at least 1, got {value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _PROB_NAME.search(name) \
            and not 0 <= value <= 1:
        raise ConfigError(dotted, f"is a probability: must be in [0, 1], got {value}")
