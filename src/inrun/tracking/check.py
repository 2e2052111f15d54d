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
from .ddp import DDP_CHECK_HINT, DDPSync
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
        ours = torch.stack([d.sum(dim=(1, 2)) for d in dots]).sum(dim=0)
        spread = torch.stack([d.sum(dim=2).abs().sum(dim=1) for d in dots]).sum(dim=0)
        theirs, scale = torch.zeros_like(ours), torch.zeros_like(ours)
        present = [i for i, (g, w) in enumerate(zip(grads, weights)) if g is not None and w is not None]
        if present:
            # In the parameter dtype: the check's tolerance is far above its rounding.
            g_list = [grads[i].reshape(-1) for i in present]
            w_list = [weights[i].reshape(-1).to(g_list[k].dtype) for k, i in enumerate(present)]
            index = torch.tensor(present, device=ours.device)
            g_norm = (torch.stack(torch._foreach_norm(g_list)).to(ours) if grad_norms is None
                      else grad_norms.to(ours)[index])
            inv = torch.ones_like(g_norm)
            if ratio is not None:
                r = ratio[present].to(ours)
                inv = torch.where(r > 0, 1 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
            theirs[index] = torch.stack([torch.dot(g, w) for g, w in zip(g_list, w_list)]).to(ours) * inv
            scale[index] = g_norm * inv * torch.stack(torch._foreach_norm(w_list)).to(ours)
        if sum_over_ranks and self.ddp is not None:
            ours, spread = self.ddp.sum_over_ranks(torch.stack([ours, spread]))
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
            low = any(mb.low_precision for mb in window.micro)
            rtol = self.config.check_tolerance(torch.bfloat16 if low else self.table.dtype)
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
                + (DDP_CHECK_HINT if self.ddp is not None else "")
            )
        window.value(host[0], host[1] if second is not None else None, lr)
