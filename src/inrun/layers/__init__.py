"""Layer handlers and their registry. Importing this package registers the built-in handlers."""

from . import attention, conv, embedding, experts, linear, norm  # noqa: F401  (registration side effects)
from .fallback import FALLBACK, JVPHandler
from .registry import (
    LayerHandler,
    Rows,
    handler_for,
    register_handler,
    register_predicate,
    registered_types,
)

__all__ = [
    "FALLBACK",
    "JVPHandler",
    "LayerHandler",
    "Rows",
    "handler_for",
    "register_handler",
    "register_predicate",
    "registered_types",
]
