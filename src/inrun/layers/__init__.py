"""Layer handlers and their registry. Importing this package registers the built-in handlers."""

from . import conv, embedding, linear, norm  # noqa: F401  (registration side effects)
from .fallback import FALLBACK, FunctionalFallbackHandler
from .registry import (
    LayerHandler,
    Layout,
    handler_for,
    register_handler,
    register_predicate,
    registered_types,
)

__all__ = [
    "FALLBACK",
    "FunctionalFallbackHandler",
    "LayerHandler",
    "Layout",
    "handler_for",
    "register_handler",
    "register_predicate",
    "registered_types",
]
