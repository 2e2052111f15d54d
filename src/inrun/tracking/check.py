"""The per-step consistency check, and the step's one device-to-host transfer.

Per parameter ``p``: the per-example dots summed over the batch, ``Σ_z <g_z,p, w_p>``, must equal
``<g_B,p, w_p>`` from the gradient autograd computed (``g_B = p.grad / ratio``: the loop may have
clipped or unscaled it since backward). A mismatch means a parameter is used outside the
module that owns it, examples interact inside the model, or the gradients were modified. The
tolerance scales with ``‖g_B‖ ‖w‖ + Σ_z |dot_z|`` (cancellation in either sum), plus a floor
relative to the whole step (:data:`STEP_FLOOR`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConsistencyError, NonFiniteError
from .config import TrackerConfig
from .ddp import DDPSync
from .params import ParamTable
from .state import Window

CheckTerms = tuple[Tensor, Tensor, Tensor]

STEP_FLOOR = 1e-3
"""A parameter's mismatch is judged against ``rtol · (its scale + STEP_FLOOR · the step's summed
scale)``: below a thousandth of the step's magnitude a difference is rounding of a gradient that is
zero in exact arithmetic, and could not move any value by more than that."""


def column_sum(v: Tensor) -> Tensor:
    """``[K, *shape] -> [*shape]``: the summed validation gradient (a view when ``K = 1``)."""
    return v[0] if v.shape[0] == 1 else v.sum(dim=0)


TF32_EPS = 2.0 ** -10


def compute_eps(p: Tensor) -> float:
    """The machine epsilon a parameter's products are computed in: its dtype's, or for float32 the
    reduced-precision matmuls torch may be allowed to use (``torch.set_float32_matmul_precision``;
    TF32 on CUDA, which cuDNN convolutions use by default)."""
    eps = torch.finfo(p.dtype).eps
    if p.dtype != torch.float32:
        return eps
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return torch.finfo(torch.bfloat16).eps
    cuda_tf32 = p.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return TF32_EPS if precision == "high" or cuda_tf32 else eps


def refuse_hooks(table: ParamTable, rows: Sequence[int], prefix: str = "") -> None:
    """A parameter among ``rows`` (whose values do not add up) that has a gradient hook: the hook is
    the likely cause, said as such."""
    hooked = [table.names[i] for i in rows if getattr(table.params[i], "_backward_hooks", None)]
    if hooked:
        raise ConsistencyError(
            f"{prefix}parameter {hooked[0]!r} has a gradient hook (register_hook) that changes its gradient "
            "during backward, which the per-example values cannot follow: make the change after the block, "
            "before optimizer.step(), where rescaling and value clipping are valued"
        )


class ConsistencyCheck:
    def __init__(self, config: TrackerConfig, table: ParamTable, ddp: DDPSync | None) -> None:
        self.config, self.table, self.ddp = config, table, ddp
        self.groups: list[list[int]] = []
        """Rows valued jointly: compared as one (their sums in the first row)."""

    def grouped(self, *vectors: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-parameter check vectors with each joint group summed into its first row."""
        out = []
        for v in vectors:
            v = v.copy()
            for g in self.groups:
                v[g[0]] = v[g].sum()
                v[g[1:]] = 0
            out.append(v)
        return tuple(out)

    def row_eps(self, window: Window) -> np.ndarray:
        """``[P]``: the machine epsilon of the lowest precision each parameter's step went through:
        its own dtype, its gradient's, and the output gradients of the calls that valued it (bf16
        under autocast while the parameter is float32). Joint groups take their lowest."""
        eps = np.array([compute_eps(p) for p in self.table.params])
        for i, g in enumerate(self.table.grads()):
            if g is not None:
                eps[i] = max(eps[i], torch.finfo(g.dtype).eps)
        for mb in window.micro:
            for row, e in mb.eps.items():
                eps[row] = max(eps[row], e)
        for g in self.groups:
            eps[g] = eps[g].max()
        return eps

    def tolerances(self, window: Window) -> np.ndarray:
        """``[P]`` relative tolerances of the check, each following its parameter's precision."""
        return np.array([self.config.check_tolerance_for(e) for e in self.row_eps(window)])

    def terms(
        self, dots: Sequence[Tensor], grads: Sequence[Tensor | None], weights: Sequence[Tensor | None],
        ratio: Tensor | None = None, grad_norms: Tensor | None = None, sum_over_ranks: bool = False,
    ) -> CheckTerms | None:
        """``(Σ_z dots, <g_B, w>, tolerance scale)`` per parameter, on the device (no host sync).

        ``dots``: ``[P, B, K]`` per micro-batch; ``weights``: per parameter ``w_p`` (``None``:
        the parameter does not move); ``ratio``: the factor applied to ``grads`` since backward
        (``None``: none); ``grad_norms``: ``‖grads‖`` if already taken (clip detection);
        ``sum_over_ranks``: under DDP, add this rank's sums to the other ranks' (one all-reduce).
        """
        if not self.config.check:
            return None
        shards = self.table.shards
        if shards is not None and grad_norms is None and not sum_over_ranks:
            grad_norms = self.table.norms(list(grads))
        ours = torch.stack([d.sum(dim=(1, 2)) for d in dots]).sum(dim=0)
        spread = torch.stack([d.sum(dim=2).abs().sum(dim=1) for d in dots]).sum(dim=0)
        raw, squares, w_norm = torch.zeros_like(ours), torch.zeros_like(ours), torch.zeros_like(ours)
        present = [i for i, (g, w) in enumerate(zip(grads, weights)) if g is not None and w is not None]
        index = torch.tensor(present, device=ours.device, dtype=torch.long)
        if present:
            # In the parameter dtype: the check's tolerance is far above its rounding. Under FSDP2,
            # on this rank's shard (the weights cut the same way); the sums over shards travel in
            # the check's all-reduce.
            local = shards.local if shards is not None else (lambda t: t)
            g_list = [local(grads[i]).reshape(-1) for i in present]
            w_norm[index] = torch.stack(torch._foreach_norm([weights[i].reshape(-1) for i in present])).to(ours)
            w_list = [(weights[i] if shards is None else shards.shard(weights[i], i)).reshape(-1).to(g_list[k].dtype)
                      for k, i in enumerate(present)]
            raw[index] = torch.stack([torch.dot(g, w) for g, w in zip(g_list, w_list)]).to(ours)
            if grad_norms is None:
                squares[index] = torch.stack(torch._foreach_norm(g_list)).to(ours) ** 2
        if sum_over_ranks and self.ddp is not None:
            if shards is not None:
                ours, spread, raw, squares = self.ddp.sum_over_ranks(torch.stack([ours, spread, raw, squares]))
            else:
                ours, spread = self.ddp.sum_over_ranks(torch.stack([ours, spread]))
        g_norm = squares.sqrt() if grad_norms is None else grad_norms.to(ours)
        inv = torch.ones_like(ours)
        if ratio is not None:
            r = ratio.to(ours)
            inv = torch.where(r > 0, 1 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
        theirs, scale = torch.zeros_like(ours), torch.zeros_like(ours)
        theirs[index] = (raw * inv)[index]
        scale[index] = (g_norm * inv * w_norm)[index]
        return ours, theirs, scale + spread

    def finalize(self, window: Window, first: Tensor, second: Tensor | None, lr: list[float]) -> None:
        """One host transfer per step: values, and the flags that say whether to keep them.
        Leaves the window valued or skipped, or raises."""
        parts = [first, second, *(window.check_terms or ()), torch.isfinite(window.exit_norms).all()]
        present = [t for t in parts if t is not None]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in present]).cpu().numpy()
        pieces, start = [], 0
        for t in present:
            pieces.append(flat[start : start + t.numel()].reshape(t.shape))
            start += t.numel()
        host = [pieces.pop(0)]
        if second is not None:
            host.append(pieces.pop(0))
        norms_finite = bool(pieces.pop())
        if window.check_terms is not None:
            ours, theirs, scale = self.grouped(*pieces)
            rtol = self.tolerances(window)
            # A parameter whose gradient is zero in exact arithmetic (a key bias under softmax, a
            # one-element norm) compares two roundings of 0: judge it against the whole step.
            floor = STEP_FLOOR * float(scale.sum())
            bad = np.abs(ours - theirs) > rtol * (scale + floor) + 1e-30
            finite = np.isfinite(ours).all() and np.isfinite(theirs).all()
        else:
            bad = np.zeros(0, dtype=bool)
            finite = True
        finite = finite and norms_finite and all(np.isfinite(h).all() for h in host)
        if not finite:
            reason = "non-finite gradient or value"
            if self.config.on_nonfinite == "raise":
                window.doomed = reason
                raise NonFiniteError(
                    f"step {window.step}: {reason} (NaN/Inf in the loss or gradients). The "
                    "parameters were not updated by this tracker's step hook. Pass "
                    "on_nonfinite='skip' to record such steps as skipped and continue."
                )
            window.skip(reason)
            return
        if bad.any():
            names = [self.table.names[i] for i in np.flatnonzero(bad)[:5]]
            refuse_hooks(self.table, np.flatnonzero(bad).tolist(), f"step {window.step}: ")
            raise ConsistencyError(
                f"step {window.step}: the per-example values of parameter(s) {names} do not add "
                "up to the gradient autograd computed. A parameter is used outside the forward "
                "of the module that owns it, examples interact inside the model, or the "
                "gradients were modified (e.g. zero_grad(set_to_none=False) between micro-batches)."
                + (self.ddp.check_hint if self.ddp is not None else "")
            )
        window.value(host[0], host[1] if second is not None else None, lr)
