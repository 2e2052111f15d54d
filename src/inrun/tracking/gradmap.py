"""What happened to each gradient between the ``tracker.step`` blocks and ``optimizer.step()``:
known, not assumed.

At the end of every ``tracker.step(ids)`` block (and of every ``tracker.unattributed()`` block)
the tracker copies each parameter's gradient into a buffer it keeps (:class:`GradientReference`:
one gradient-sized buffer for the whole run, written with one ``copy_`` per parameter; nothing
else is allocated per step). At ``optimizer.step()`` it compares the gradient the optimizer is
about to read, ``x``, with that reference ``T`` coordinate by coordinate and classifies each
parameter's change (:func:`classify`):

* **unchanged** (equal on every coordinate), ratio 1;
* **a uniform scale** ``x = r T`` (norm clipping, a loss scale, ``GradScaler.unscale_``): the
  factor ``r``, verified on every coordinate to a few units of rounding;
* **value clipping**, ``x = clamp(r T, −c, c)`` (``clip_grad_value_``, possibly after a uniform
  scale): a per-coordinate factor ``R_j = x_j / T_j``, the coordinate's step over the gradient that
  caused it, as Adam's secant is; verified: every coordinate is either ``r T_j`` or ``±c`` with
  ``|r T_j| ≥ c`` and the same sign;
* **anything else** (a loss back-propagated after the block, noise, a manual edit):
  :class:`~inrun.errors.GradientChangeError`, naming the parameter and the fix.

What a ``tracker.unattributed()`` block adds to the gradients is kept apart (``E``, a second
buffer allocated only when the block is used): it is nobody's, as weight decay is. The optimizer
then sees ``x = M(g_B + E)`` for the map ``M`` above, whose data part is ``M(g_B + E) − M(E)``
(``M`` taken as it was at the step: the clip factor of the real step).

Cost: one copy of the gradients per block (memory traffic of one gradient, about what the
optimizer's own elementwise update reads) and, at a step whose gradients were changed, a few
elementwise passes over the changed parameters; memory: one gradient (two with unattributed
gradients). Measured by ``benchmarks/loop_checks.py``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import GradientChangeError, StepOrderError

ROUNDING_UNITS = 16
"""A coordinate counts as rescaled by ``r`` when ``|x − r T| ≤ ROUNDING_UNITS · eps · (|x| + |r T|)``:
a scale applied in the gradient's dtype rounds each coordinate by half a unit, and ``r`` itself is
recovered from the gradients to a unit or two."""

ADDED_HINT = (
    "something was added to it (a loss back-propagated after the block, noise, a manual edit). "
    "If no example caused it, make the change inside `with tracker.unattributed():` (valued as "
    "nobody's, like weight decay); if the batch's examples caused it, back-propagate it inside "
    "the `with tracker.step(ids):` block"
)


@dataclass
class StepMap:
    """How the gradient the optimizer reads came from the examples' gradient, per parameter."""

    ratio: Tensor
    """``[P]`` float64: the uniform factor of each parameter (1 where nothing was applied; unused
    where :attr:`coordinate` has the parameter)."""
    coordinate: dict[int, Tensor] = field(default_factory=dict)
    """Per-coordinate factor ``R_p`` of the data part (value clipping)."""
    offset: dict[int, Tensor] = field(default_factory=dict)
    """The nobody's part of the gradient the optimizer reads, ``M(E)``."""
    batch: list[Tensor | None] = field(default_factory=list)
    """``g_B``: the examples' summed gradient as backward produced it (before any change)."""
    share: float = 1.0
    """The part of ``g_B`` one process's examples make: ``1 / world size`` under DDP, whose
    gradients are averaged over ranks."""

    def share_tensor(self) -> Tensor:
        """``[P]`` :attr:`share` (the consistency check's factor between ``g_B`` and the dots)."""
        return torch.full_like(self.ratio, self.share)

    @property
    def plain(self) -> bool:
        """Only uniform factors (the values need nothing but :attr:`ratio`)."""
        return not self.coordinate and not self.offset

    def factor(self, i: int) -> Tensor:
        """The data part's factor of parameter ``i``: a 0-dim tensor or a per-coordinate one."""
        return self.coordinate[i] if i in self.coordinate else self.ratio[i]

    def same(self, other: StepMap, rows: Sequence[int]) -> bool:
        """Whether ``rows`` map the same way in both (a later optimizer of the step: unchanged since
        the step was valued)."""
        def equal(a: Tensor | None, b: Tensor | None) -> bool:
            return (a is None) == (b is None) and (a is None or torch.equal(a, b))

        return all(
            bool(self.ratio[i] == other.ratio[i]) and equal(self.coordinate.get(i), other.coordinate.get(i))
            and equal(self.offset.get(i), other.offset.get(i)) for i in rows
        )

    def data_part(self, i: int, grad: Tensor) -> Tensor:
        """``x − M(E)``: what the optimizer reads that the examples caused."""
        return grad - self.offset[i].to(grad.dtype) if i in self.offset else grad


class GradientReference:
    """The gradients as the blocks (and unattributed blocks) left them; see the module docstring."""

    def __init__(self, params: Sequence[Tensor], names: Sequence[str], local: Callable[[Tensor], Tensor] | None = None) -> None:
        self.params, self.names = list(params), list(names)
        self.local = local  # FSDP2: this rank's shard of a sharded gradient, read and kept as a plain tensor
        n = len(self.params)
        self.buffers: list[Tensor | None] = [None] * n
        self.present = [False] * n
        self.extra: list[Tensor | None] = [None] * n
        self.has_extra = False

    def grad(self, i: int) -> Tensor | None:
        """Parameter ``i``'s gradient as this process holds it."""
        g = self.params[i].grad
        return g if g is None or self.local is None else self.local(g)

    def start(self) -> None:
        """A new optimizer step: nothing recorded yet (gradients are zero or ``None``)."""
        self.present = [False] * len(self.params)
        self.has_extra = False

    # ------------------------------------------------------------------ recording
    def sync(self) -> None:
        """Copy the current gradients: the reference the next change is judged against."""
        sources, targets = [], []
        for i in range(len(self.params)):
            g = self.grad(i)
            self.present[i] = g is not None
            if g is None:
                continue
            buf = self.buffers[i]
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
                buf = self.buffers[i] = torch.empty_like(g, memory_format=torch.contiguous_format)
            sources.append(g)
            targets.append(buf)
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, sources)

    def changed(self, rows: Sequence[int] | None = None) -> list[int]:
        """Parameters (of ``rows``, default all) whose gradient differs from the reference. Values
        are compared, not version counters: ``GradScaler.unscale_`` and writes through ``.data``
        change a gradient without moving its version."""
        out = []
        for i in range(len(self.params)) if rows is None else rows:
            g = self.grad(i)
            if g is None:
                if self.present[i]:
                    out.append(i)
            elif not self.present[i]:
                if bool(g.any()):
                    out.append(i)
            elif not _same_bits(g, self.buffers[i]):
                out.append(i)
        return out

    def require_unchanged(self, where: str) -> None:
        """Refuse a change made where no rule can read it (between two blocks of one step)."""
        changed = self.changed()
        if changed:
            raise StepOrderError(
                f"the gradient of parameter {self.names[changed[0]]!r} changed {where}: the earlier "
                "micro-batches' examples would be valued for a gradient the optimizer does not see. "
                "Clip or scale once, after the last block, before optimizer.step(); make a change no "
                "example caused inside `with tracker.unattributed():`"
            )

    def add_unattributed(self) -> None:
        """After an unattributed block: what it added to each gradient is nobody's."""
        with torch.no_grad():
            for i in self.changed():
                g = self.grad(i)
                if g is None:
                    continue
                if self.extra[i] is None or self.extra[i].shape != g.shape or self.extra[i].dtype != g.dtype:
                    self.extra[i] = torch.zeros_like(g, memory_format=torch.contiguous_format)
                elif not self.has_extra:
                    self.extra[i].zero_()
                e = self.extra[i]
                e.add_(g)
                if self.present[i]:
                    e.sub_(self.buffers[i])
                self._mark_extra(i)
        self.sync()

    def _mark_extra(self, i: int) -> None:
        if not self.has_extra:
            # the first unattributed change of this step: every other buffer starts from zero
            for k, e in enumerate(self.extra):
                if k != i and e is not None:
                    e.zero_()
            self.has_extra = True

    def nobody(self, i: int) -> Tensor | None:
        """``E`` of parameter ``i`` in this step (``None``: nothing unattributed)."""
        return self.extra[i] if self.has_extra and self.extra[i] is not None else None

    def batch_grads(self) -> list[Tensor | None]:
        """``g_B`` per parameter, the examples' summed gradient (a buffer, or ``T − E``)."""
        out: list[Tensor | None] = []
        for i in range(len(self.params)):
            if not self.present[i]:
                out.append(None)
                continue
            e = self.nobody(i)
            out.append(self.buffers[i] if e is None else self.buffers[i] - e)
        return out

    # ------------------------------------------------------------------ the step
    def classify(self, rows: Sequence[int] | None = None) -> StepMap:
        """The map from the examples' gradient to what the optimizer reads now (of ``rows``, default
        every parameter; see the module docstring); raises :class:`GradientChangeError` for a
        change no rule describes."""
        n = len(self.params)
        device = self.params[0].device
        ratio = torch.ones(n, dtype=torch.float64, device=device)
        smap = StepMap(ratio=ratio, batch=self.batch_grads())
        rows = range(n) if rows is None else rows
        changed = set(self.changed(rows))
        factors: list[float] = []  # the uniform factor before value clipping, seen on any parameter
        unknown: list[tuple[int, float]] = []
        with torch.no_grad():
            for i in rows:
                e = self.nobody(i)
                if i not in changed:
                    factors.append(1.0)
                    if e is not None:
                        smap.offset[i] = e
                    continue
                clip = self._classify_one(i, self.grad(i), e, smap, factors)
                if clip is not None:
                    unknown.append((i, clip))
            for i, c in unknown:
                self._split_clipped(i, c, factors, smap)
        return smap

    def _split_clipped(self, i: int, c: float, factors: list[float], smap: StepMap) -> None:
        """Value clipping clipped every coordinate of parameter ``i`` after an unattributed gradient
        was added: the factor before the clamp is the one the other parameters show."""
        tol = ROUNDING_UNITS * torch.finfo(self.buffers[i].dtype).eps
        if not factors or max(factors) - min(factors) > tol * max(abs(f) for f in factors):
            raise GradientChangeError(
                f"value clipping clipped every coordinate of parameter {self.names[i]!r} after an unattributed "
                "gradient was added to it, and no other parameter shows the factor before the clamp, so the "
                "examples' part of its clipped gradient cannot be told from nobody's: clip before the "
                "unattributed block, or clip by norm"
            )
        self._clipped_with_extra(i, self.grad(i), self.nobody(i), factors[0], c, smap)

    def _clipped_with_extra(self, i: int, x: Tensor, e: Tensor, r: float, c: float, smap: StepMap) -> None:
        T = self.buffers[i]
        offset = (e * r).clamp_(-c, c)
        g_b = T - e
        slope = torch.where((T * r).abs() < c, torch.full_like(T, r), torch.zeros_like(T))
        smap.offset[i] = offset
        smap.coordinate[i] = torch.where(g_b != 0, (x - offset) / torch.where(g_b != 0, g_b, 1), slope)

    def _classify_one(
        self, i: int, x: Tensor | None, e: Tensor | None, smap: StepMap, factors: list[float],
    ) -> float | None:
        """Classify parameter ``i`` into ``smap``; returns the clamp ``c`` when its split waits for
        the factor other parameters show."""
        name = self.names[i]
        if x is None:
            smap.ratio[i] = 0.0  # the optimizer skips a parameter without gradient
            return None
        if not self.present[i]:
            raise GradientChangeError(
                f"parameter {name!r} has a gradient at optimizer.step() that no tracker.step() block "
                f"produced: {ADDED_HINT}"
            )
        T = self.buffers[i]
        tol = ROUNDING_UNITS * torch.finfo(x.dtype).eps
        r = _uniform_factor(x, T, tol)
        if r is not None:
            smap.ratio[i] = r
            factors.append(r)
            if e is not None:
                smap.offset[i] = e * r
            return None
        clip = _value_clip(x, T, tol)
        if clip is None and not bool(torch.isfinite(x).all()):
            smap.ratio[i] = math.nan  # refused or skipped as non-finite at the step (on_nonfinite)
            return None
        if clip is None:
            raise GradientChangeError(
                f"the gradient of parameter {name!r} changed between the end of the last tracker.step() "
                "block and optimizer.step() in a way that is neither a rescaling (norm clipping, loss "
                f"scaling, unscaling) nor value clipping: {ADDED_HINT}"
            )
        r_in, c = clip
        if r_in is not None:
            factors.append(r_in)
        if e is None:
            smap.coordinate[i] = _safe_divide(x, T, fill=1.0 if r_in is None else r_in)
            return None
        if r_in is None:
            return c
        self._clipped_with_extra(i, x, e, r_in, c, smap)
        return None


def _libc_memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's ``memcmp`` (``None`` where the process has none to load by that name)."""
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_MEMCMP = _libc_memcmp()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality (a NaN left as it was is unchanged). Dense CPU tensors are compared as
    memory by ``memcmp``: ``torch.equal`` reads them at a fifth of the speed of a copy (8 ms for a
    21 MB gradient against 1.1 ms, once per parameter at every optimizer step)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if (
        _MEMCMP is not None and type(a) is Tensor and type(b) is Tensor and a.device.type == "cpu"
        and b.device.type == "cpu" and a.layout == torch.strided and b.layout == torch.strided
        and a.is_contiguous() and b.is_contiguous()
    ):
        return a.numel() == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


def _uniform_factor(x: Tensor, T: Tensor, tol: float) -> float | None:
    """``r`` with ``x = r T`` on every coordinate (within rounding), else ``None``: the quotient
    ``x / T`` must lie in ``r (1 ± 2 tol)`` wherever ``T ≠ 0`` (and ``x = 0`` where ``T = 0``). ``r``
    is the quotient at the largest ``|T|``, exact to an ulp; the ratio of the norms is not (float32
    norms of 1e7 coordinates are 5e-5 off, which refused norm clipping of a large embedding). A few
    passes over the gradient in its dtype (float32 for 16-bit ones) and three reads of scalars; a
    NaN or an infinity fails. Where the quotient refuses, the difference is checked against a bound
    floored at the smallest normal number, since the quotient of two subnormals is loose."""
    work = torch.float32 if x.element_size() < 4 else x.dtype
    xw, tw = x.to(work).flatten(), T.to(work).flatten()
    nx, nt, t_low, t_high = torch.stack([*torch._foreach_norm([x, T]), *torch.aminmax(tw)]).double().tolist()
    if not (math.isfinite(nx) and math.isfinite(nt)):
        return None
    if nt == 0:
        return 1.0 if nx == 0 else None
    k = tw.argmax() if t_high >= -t_low else tw.argmin()
    at_k, t_k = torch.stack([xw[k], tw[k]]).double().tolist()
    r = at_k / t_k
    quotient = xw / tw  # 0/0 (a coordinate no example moved) is NaN: counted as r; x/0 is ±inf: fails
    low, high = torch.stack(torch.aminmax(quotient.nan_to_num_(nan=r, posinf=math.inf, neginf=-math.inf))).tolist()
    spread = 2 * tol * abs(r)
    if r - spread <= low and high <= r + spread:
        return r
    scaled = tw * r
    bound = scaled.abs().mul_(2 * tol).add_(torch.finfo(x.dtype).tiny)
    return r if bool((xw - scaled).abs_().le_(bound).all()) else None


def _value_clip(x: Tensor, T: Tensor, tol: float) -> tuple[float | None, float] | None:
    """``(r, c)`` with ``x = clamp(r T, −c, c)`` on every coordinate (``r`` is ``None`` when every
    coordinate was clipped), else ``None``."""
    xd, td = x.double(), T.double()
    c = float(xd.abs().max())
    if c == 0:
        return None
    at_c = xd.abs() >= c * (1 - tol)
    if not bool(((torch.sign(xd) == torch.sign(td)) | ~at_c).all()):
        return None
    inner = ~at_c
    if not bool(inner.any()):
        return None, c
    r = _uniform_factor(xd[inner], td[inner], tol)
    if r is None or not bool(((r * td[at_c]).abs() >= c * (1 - tol)).all()):
        return None
    return r, c


def _safe_divide(a: Tensor, b: Tensor, fill: float) -> Tensor:
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), torch.full_like(a, fill))
