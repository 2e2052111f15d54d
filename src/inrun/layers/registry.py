"""Layer handlers: per-example dot products for one family of layers, behind a registry.

A handler never stores anything on the user's modules: the tracker owns all per-step state and
passes a handler what it captured. Shapes use ``B`` for the batch (examples), ``K`` for the
number of contraction vectors (1 for the summed validation gradient, ``V`` for a per-validation
table), ``T`` for all non-batch positions of an example (tokens, pixels) flattened.

Scaling: ``grad_out`` is the gradient of the loss the user back-propagated with respect to the
module's output, so a per-example gradient built from its row ``z`` is the gradient of example
``z``'s *share* of that loss (with a batch-mean loss, ``1/B`` of ``z``'s own loss gradient).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import BatchMismatchError, InRunError


class Layout(enum.Enum):
    """How a module's call relates to the batch of examples."""

    BATCHED = "batched"  # leading dim of input and output is the batch
    BROADCAST = "broadcast"  # leading dim is 1 and the output is broadcast against the batch
    UNBATCHED = "unbatched"  # no batch dim at all (e.g. positions ``arange(T)``)


class LayerHandler:
    """Exact per-example dot products ``<g_z, u>`` for the direct parameters of one module type.

    Subclasses implement :meth:`capture` (run in the forward hook, returns detached inputs) and
    :meth:`dot` (run once the output gradient is known): that is the vector route, which every
    handler has. Further routes are capabilities a handler declares:

    * ``supports_gram``: the weight's per-example gradient is a product ``D_zᵀ A_z``; the handler
      implements :meth:`gram_factors`, :meth:`validation_gram`, :meth:`gram_cost` and
      :meth:`gram_residual` (see :mod:`inrun.layers.linear`);
    * ``supports_bookkeeping``: the layer's op can be replaced by one whose backward forms the
      per-example weight gradients in place of the weight-gradient GEMM; the handler implements
      :meth:`bookkeeping_call` and :meth:`bookkeeping_cost`;
    * ``row_sparse``: the weight's gradient touches only the rows :meth:`gradient_rows` names
      (an embedding), so a Gram-route layer sharing that weight (a tied LM head) stays exact by
      adding the validation gradient of those rows.
    """

    name: ClassVar[str] = "handler"
    supports_gram: ClassVar[bool] = False
    supports_bookkeeping: ClassVar[bool] = False
    row_sparse: ClassVar[bool] = False

    def check(self, module: nn.Module) -> None:
        """Raise :class:`~inrun.errors.UnsupportedModuleError` if the module cannot be valued now."""

    def layout(self, module: nn.Module, args: tuple, output: Tensor, batch_size: int) -> Layout:
        """Decide whether this call is batched, broadcast (leading 1) or unbatched."""
        lead = output.shape[0] if output.dim() > 0 else None
        if lead == batch_size:
            return Layout.BATCHED
        if lead == 1:
            return Layout.BROADCAST
        raise BatchMismatchError(
            f"{type(module).__name__} produced an output with leading dimension {lead}, but the "
            f"step has {batch_size} ids. Per-example values need the batch as the first dimension "
            "of every layer's input and output (check that ids match the batch, and that the model "
            "does not flatten batch and sequence together before a trainable layer)."
        )

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Return what :meth:`dot` needs from the forward call (detached)."""
        raise NotImplementedError

    def dot(
        self,
        module: nn.Module,
        saved: Any,
        grad_out: Tensor,
        vectors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """Per-example dot products with contraction vectors.

        Args:
            saved: what :meth:`capture` returned, with the batch as leading dim (size ``B`` or 1).
            grad_out: ``[B, *out]`` gradient of the loss with respect to the module's output.
            vectors: parameter name -> ``[K, *param.shape]``.

        Returns:
            parameter name -> ``[B, K]`` tensor of ``<g_z[name], vectors[name][k]>``.
        """
        raise NotImplementedError

    def vector_cost(self, module: nn.Module) -> float:
        """Multiply-adds per position of the vector route for the weight (for route choice)."""
        return 0.0

    def feature_sizes(self, module: nn.Module) -> tuple[int, int]:
        """``(inputs, outputs)`` per position of a matrix-shaped layer, for memory estimates
        (``(0, 0)``: not matrix-shaped)."""
        return 0, 0

    def gradient_rows(self, module: nn.Module, saved: Any) -> Tensor:
        """``row_sparse`` handlers: the weight rows this call's gradient can touch."""
        raise NotImplementedError


def first_input(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The module's input tensor (first positional argument, or the single keyword argument)."""
    if args:
        x = args[0]
    elif len(kwargs) == 1:
        x = next(iter(kwargs.values()))
    else:
        x = kwargs.get("input", kwargs.get("x", kwargs.get("hidden_states")))
    if not isinstance(x, Tensor):
        raise InRunError(f"{type(module).__name__}: expected a tensor input, got {type(x).__name__}")
    return x


_BY_TYPE: dict[type, LayerHandler] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], LayerHandler]] = []


def register_handler(*module_types: type, handler: LayerHandler, overwrite: bool = False) -> None:
    """Register ``handler`` for modules of the given types (subclasses included).

    Refuses to replace an existing registration unless ``overwrite=True``, so a plugin cannot
    silently change how a built-in layer is valued.
    """
    for t in module_types:
        if t in _BY_TYPE and not overwrite:
            raise ValueError(
                f"a handler is already registered for {t.__name__} ({_BY_TYPE[t].name}); "
                "pass overwrite=True to replace it"
            )
        _BY_TYPE[t] = handler


def register_predicate(predicate: Callable[[nn.Module], bool], handler: LayerHandler) -> None:
    """Register ``handler`` for modules matched by ``predicate`` (checked after exact types)."""
    _BY_PREDICATE.append((predicate, handler))


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler for ``module``: by type (nearest class in the MRO), then by predicate."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    for predicate, handler in _BY_PREDICATE:
        if predicate(module):
            return handler
    return None


def registered_types() -> dict[str, str]:
    """Module type name -> handler name, for docs and ``inrun inspect``."""
    return {t.__name__: h.name for t, h in _BY_TYPE.items()}


def stack_dot(per_example: Tensor, vector: Tensor) -> Tensor:
    """``[B, *shape] · [K, *shape] -> [B, K]`` in the vector's dtype."""
    return per_example.flatten(1).to(vector.dtype) @ vector.flatten(1).T


def as_float(t: Tensor, like: Tensor) -> Tensor:
    """Cast to the floating dtype of ``like`` (low-precision activations meet float32 vectors)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def expand_leading(t: Tensor, layout: Layout, batch_size: int) -> Tensor:
    """View ``t`` with a leading batch dimension of ``batch_size`` (no copy)."""
    if layout is Layout.BROADCAST:
        return t.expand(batch_size, *t.shape[1:])
    if layout is Layout.UNBATCHED:
        return t.unsqueeze(0).expand(batch_size, *t.shape)
    return t


__all__ = [
    "LayerHandler",
    "Layout",
    "as_float",
    "expand_leading",
    "first_input",
    "handler_for",
    "register_handler",
    "register_predicate",
    "registered_types",
    "stack_dot",
]
