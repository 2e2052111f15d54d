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

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from ..errors import InRunError


class Rows(NamedTuple):
    """Which example each row of a call's tensor belongs to.

    * ``batched``: dimension ``dim`` is the batch (``dim`` from the module, e.g. ``batch_first``);
    * ``blocked``: dimension 0 holds ``batch · k`` rows, ``k`` consecutive ones per example (batch
      and sequence flattened together);
    * ``strided``: dimension 0 holds ``k · batch`` rows, row ``r`` of example ``r mod batch``
      (sequence-first tensors flattened: ``nn.MultiheadAttention``'s out-projection);
    * ``broadcast`` / ``unbatched``: the call does not depend on the batch (positions, a bias
      table), its output is shared by every example (leading 1, or no batch dimension);
    * ``segmented``: dimension ``dim`` holds the micro-batch's token positions (``[B·T]``
      flattened, or ``[B, T]`` for the fallback) and ``index[position]`` is the player (document)
      of each, ``batch`` for a position of no document (padding); ``batch`` is the player count.
    """

    kind: str
    batch: int
    dim: int = 0
    index: Tensor | None = None

    @property
    def shared(self) -> bool:
        return self.kind in ("broadcast", "unbatched")


def reduce_rows(dots: Tensor, rows: Rows) -> Tensor:
    """``[L, K]`` dots per row of a call -> ``[B, K]`` per example (per document: segmented)."""
    if rows.kind == "blocked":
        return dots.reshape(rows.batch, -1, dots.shape[-1]).sum(dim=1)
    if rows.kind == "strided":
        return dots.reshape(-1, rows.batch, dots.shape[-1]).sum(dim=0)
    if rows.kind == "segmented":
        # One extra slot takes the positions of no document; it is dropped.
        out = dots.new_zeros(rows.batch + 1, dots.shape[-1])
        return out.index_add_(0, rows.index, dots)[: rows.batch]
    return dots


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
    math_methods: ClassVar[tuple[str, ...]] = ("forward",)
    """Methods of the registered class whose math the handler reproduces (see :func:`handler_for`)."""
    supports_gram: ClassVar[bool] = False
    supports_bookkeeping: ClassVar[bool] = False
    row_sparse: ClassVar[bool] = False
    multi_output: ClassVar[bool] = False
    """The handler takes any output structure: ``dot`` gets one gradient per output tensor."""
    autocast_input: ClassVar[bool] = False
    """Under autocast the module's op multiplies its input cast to the autocast dtype (linear maps,
    convolutions): its kept input is stored at that precision."""
    replays_calls: ClassVar[bool] = False
    """``dot`` re-runs the module's call (it needs the random-number state the call started from)."""
    traceable: ClassVar[bool] = False
    """:meth:`capture` returns one tensor and :meth:`dot` is tensor math dynamo can trace: under
    ``torch.compile`` the dots are taken inside the graph (:mod:`inrun.tracking.compiled`)."""
    param_names: ClassVar[tuple[str, ...] | None] = None
    """The parameters the handler values (``None``: any). A module with other parameters of its own
    (a legacy ``weight_norm``'s ``weight_g``/``weight_v``, whose ``weight`` a forward pre-hook
    computes) is not the registered class's math: it takes the fallback."""

    def check(self, module: nn.Module) -> None:
        """Raise :class:`~inrun.errors.UnsupportedModuleError` if the module cannot be valued now."""

    def condense(self, module: nn.Module, saved: Any, grad_out: Tensor) -> PerExampleGradients | None:
        """For contractions after the backward (Adam, order 2): this call's per-example gradients,
        kept instead of its input and output gradient when they are much smaller (feature-sized
        parameters read at every position: norms), or ``None`` (keep the factors)."""
        return None

    def parts(self, module: nn.Module) -> list[Any] | None:
        """A module valued as several linear maps applied inside its forward
        (:mod:`inrun.layers.attention`): its :class:`~inrun.layers.attention.LinearPart` list, or
        ``None`` (valued as one module, or by the fallback if this handler has no other route)."""
        return None

    def __deepcopy__(self, memo: dict) -> LayerHandler:
        """A handler is the registry's one instance (what it remembers is about modules, by weak
        reference): a deep copy of a tracked model, which reaches the tracker through its hooks,
        shares it."""
        return self

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Return what :meth:`dot` needs from the forward call (detached)."""
        raise NotImplementedError

    def keep(self, module: nn.Module, saved: Any) -> Any:
        """``saved`` made safe to read after the optimizer step (deferred contractions)."""
        return saved

    def batch_dims(self, module: nn.Module, n_outputs: int) -> list[int] | None:
        """The batch dimension of each output tensor, when the module says (``batch_first``)."""
        return None

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

    def splits_positions(self, module: nn.Module, x: Tensor) -> bool:
        """Whether :meth:`dot` on this call's input ``x`` (``[B, T, ...]``, batch first) may be
        given ``x`` flattened to ``[B·T, ...]`` rows, one per position: the handler's math treats
        every position on its own (a linear map, a lookup, a per-token norm). Then each position's
        dots come out on their own row and are summed by document (packed sequences)."""
        return False

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


class PerExampleGradients(dict):
    """``{param name: [rows, *shape]}``: a call's per-example gradients (:meth:`LayerHandler.condense`),
    dotted with any vectors by :func:`stack_dot`."""

    def dots(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: stack_dot(g, vectors[n]) for n, g in self.items() if n in vectors}


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
    """The handler for ``module``: by type, then by predicate; ``None`` (the fallback) otherwise.

    A handler is the math of its registered class's ``forward``. A subclass gets it only if that
    math is provably its own: it overrides none of the handler's ``math_methods`` (``forward``,
    and e.g. ``_conv_forward``), or it declares ``inrun_handler = "<handler name>"``. A subclass
    that changes the computation (an embedding that scales its output) takes the fallback.
    """
    cls = type(module)
    declared = getattr(cls, "inrun_handler", None)
    for base in cls.__mro__:
        handler = _BY_TYPE.get(base)
        if handler is None:
            continue
        same_math = all(getattr(cls, m, None) is getattr(base, m, None) for m in handler.math_methods)
        own = {n for n, _ in module.named_parameters(recurse=False)}
        known = handler.param_names is None or own <= set(handler.param_names)
        if known and (base is cls or same_math or declared == handler.name):
            return handler
        break
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


__all__ = [
    "LayerHandler",
    "PerExampleGradients",
    "Rows",
    "as_float",
    "first_input",
    "handler_for",
    "reduce_rows",
    "register_handler",
    "register_predicate",
    "registered_types",
    "stack_dot",
]
