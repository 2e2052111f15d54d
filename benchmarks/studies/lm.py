"""A small GPT-2 trained on Python's standard library, valued by ``InRunShapley`` during training.

Shared by the code-corpus studies (curation, training stages, domains, paraphrase). One function,
:func:`train_lm`, trains (optionally with a tracker) and returns an :class:`LMRun` holding
everything the studies read: values by chunk, per-validation-column values, snapshots of those at
regular steps, the per-step trace, loss curves and the final parameters. Runs are cached under
``runs/studies/`` keyed by every setting, so a second study reuses the first one's run.

Validation *columns*. ``val_loss`` returns one loss per column (a column is a small set of
held-out chunks, e.g. one package's), so ``tracker.per_validation()`` gives each training chunk's
value for each column; their sum is the utility of the whole validation set. Two library
limitations shape how this is done (see docs/case-studies.md, "Library notes"):

* ``InRunShapley`` computes per-column validation gradients with one batched backward over the
  whole validation batch per column (K columns cost K full validation backward passes). Here
  every column has its own forward and the columns are joined by :class:`_Columns`, whose
  backward sends each column's gradient only into its own graph, so the K backward passes cost
  one validation backward in total.
* With K > 1 columns every linear layer uses the vector route (K forward-sized matmuls per
  step), so a step with 7 columns costs ~5x (order 1) to ~7x (order 2) a plain step here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inrun import InRunShapley
from inrun.run.data.stdlib import DEFAULT_PACKAGES, VOCAB_SIZE, CodeCorpus, load_stdlib_corpus
from inrun.run.models import causal_lm

from . import common

DOMAINS = ("email", "asyncio", "xml", "unittest", "logging", "encodings")


@dataclass(frozen=True)
class LMConfig:
    """Model, data and training settings of a code-corpus run: SGD (the theory's exact case) by
    default, or AdamW with warm-up and cosine decay (:func:`adamw`, the regime people train in)."""

    packages: tuple[str, ...] = DEFAULT_PACKAGES
    length: int = 128
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    steps: int = 600
    batch: int = 16
    lr: float = 1.0
    lr_min: float = 0.1
    """Cosine decay from ``lr`` to ``lr_min`` over the run (constant if equal), as in the paper."""
    optimizer: str = "sgd"
    """``"sgd"`` or ``"adamw"``."""
    warmup: int = 0
    """Linear warm-up from ``lr / warmup`` to ``lr`` over the first ``warmup`` steps, then the decay."""
    weight_decay: float = 0.0
    clip: float = 1.0
    max_train_per_source: int = 600
    domains: tuple[str, ...] = DOMAINS
    """One validation column per package here, plus one column "other" (every other package)."""
    val_per_column: int = 4
    n_test: int = 256
    eval_every: int = 25
    snapshot_every: int = 50


def study_config(quick: bool, size: int = 40) -> LMConfig:
    """The studies' settings, or with ``quick`` a smoke test of ``size`` steps and chunks per source."""
    if not quick:
        return LMConfig()
    return LMConfig(steps=size, max_train_per_source=size, eval_every=10, snapshot_every=10, n_test=32)


ADAMW_LR = 3e-3
"""AdamW's peak learning rate in the studies: the audit measured values faithful there (docs/case-studies.md)."""


def adamw(cfg: LMConfig, lr: float = ADAMW_LR) -> LMConfig:
    """The same run trained the way people train: AdamW (weight decay 0.1), linear warm-up over
    5% of the steps, cosine decay to a tenth of the peak, clipping at 1.0."""
    return replace(cfg, optimizer="adamw", lr=lr, lr_min=lr / 10, warmup=max(1, cfg.steps // 20), weight_decay=0.1)


def describe(cfg: LMConfig) -> str:
    """``"SGD, cosine lr 1.0 → 0.1, clip 1.0"`` or the AdamW recipe, for the tables."""
    if cfg.optimizer == "sgd":
        return f"SGD, cosine lr {cfg.lr:g} → {cfg.lr_min:g}, clip {cfg.clip:g}"
    return (f"AdamW (weight decay {cfg.weight_decay:g}), {cfg.warmup}-step warm-up to lr {cfg.lr:g}, cosine to "
            f"{cfg.lr_min:g}, clip {cfg.clip:g}")


AUDIT = {"every": 50, "at": (1, 5, 10, 25), "players": 6}
"""The audit of every valued study run: early steps (where most of the value accrues) and every 50."""


# ---------------------------------------------------------------------- data
@dataclass
class CodeData:
    train: CodeCorpus
    columns: list[Tensor]  # per column [n_c, L_c] tokens
    column_names: list[str]
    column_chunks: list[list[Any]]  # per column the held-out Chunk objects
    test: Tensor  # [n_test, L] held-out chunks not in any column


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spaced over ``items`` (all of them if fewer)."""
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def load_code_data(cfg: LMConfig) -> CodeData:
    """Training chunks; validation columns (held-out modules by package) and a disjoint test set."""
    train, held = load_stdlib_corpus(
        cfg.packages, length=cfg.length, max_train_per_source=cfg.max_train_per_source
    )
    by_source: dict[str, list] = {}
    for c in held.chunks:
        by_source.setdefault(c.source, []).append(c)
    columns, names, chunks = [], [], []
    used: set[int] = set()
    for d in cfg.domains:
        if d not in by_source:
            raise ValueError(f"package {d!r} has no held-out module at val_fraction 0.1")
        pick = spread(by_source[d], cfg.val_per_column)
        names.append(d)
        chunks.append(pick)
    other = [c for c in held.chunks if c.source not in cfg.domains]
    names.append("other")
    chunks.append(spread(other, cfg.val_per_column))
    index = {c.id: r for r, c in enumerate(held.chunks)}
    for pick in chunks:
        rows = [index[c.id] for c in pick]
        used.update(c.id for c in pick)
        columns.append(held.tokens[rows])
    rest = [index[c.id] for c in held.chunks if c.id not in used]
    test = held.tokens[spread(rest, cfg.n_test)]
    return CodeData(train, columns, names, chunks, test)


# ---------------------------------------------------------------------- model and losses
def build_gpt2(length: int, n_layer: int, n_embd: int, n_head: int) -> nn.Module:
    """A randomly initialised byte-vocabulary GPT-2 without dropout (values need a deterministic step)."""
    from transformers import GPT2Config

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=VOCAB_SIZE, n_positions=length,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return causal_lm(config)


def build_model(cfg: LMConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_gpt2(cfg.length, cfg.n_layer, cfg.n_embd, cfg.n_head)
    model.train()
    return model


class _Columns(torch.autograd.Function):
    """Stack per-column losses; backward sends each column's gradient only into its own graph.

    The tracker asks for one gradient per column. With ``torch.stack`` every one of those
    backward passes would run through all columns' graphs (with zeros); returning ``None`` for
    the columns whose incoming gradient is zero stops autograd at the stack. (Under the
    tracker's first, batched attempt the data-dependent test raises and the tracker falls back
    to one backward per column, which is what we want.)
    """

    @staticmethod
    def forward(ctx: Any, *losses: Tensor) -> Tensor:
        return torch.stack(losses)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return tuple(g if bool(g.ne(0)) else None for g in grad.unbind())


def column_losses(columns: Sequence[Tensor]) -> Callable[[nn.Module], Tensor]:
    """``val_loss(model)``: one mean-token loss per column, as a vector."""

    def val_loss(model: nn.Module) -> Tensor:
        return _Columns.apply(*[model(input_ids=x, labels=x).loss for x in columns])

    return val_loss


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: Tensor | Sequence[Tensor], batch: int = 64) -> float:
    """Mean token cross-entropy (nats per byte) over a set of chunks (or a list of items)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    items = [tokens[i : i + batch] for i in range(0, len(tokens), batch)] if isinstance(tokens, Tensor) else tokens
    for x in items:
        n = x.shape[0] * (x.shape[1] - 1)
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    model.train(was)
    return total / count


def lr_at(cfg: LMConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay from ``cfg.lr`` to ``cfg.lr_min``
    at the last step (no warm-up: the decay starts at step 0, as the SGD runs always did)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = cfg.steps - 1 - cfg.warmup
    if span <= 0:
        return cfg.lr
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * (step - cfg.warmup) / span))


def batch_order(n: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """``[steps, batch]`` indices: a fresh permutation per epoch, the remainder of each dropped."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"{n} items cannot fill one batch of {batch}")
    rows: list[np.ndarray] = []
    while len(rows) < steps:
        perm = torch.randperm(n, generator=gen).numpy()
        rows.extend(perm[: per_epoch * batch].reshape(per_epoch, batch))
    return np.stack(rows[:steps])


# ---------------------------------------------------------------------- one run
@dataclass
class LMRun:
    """Everything a study reads from one training run (arrays over training chunks in corpus order)."""

    ids: np.ndarray  # [N] chunk ids, corpus order
    value: np.ndarray | None = None  # [N] summed over columns (first + second order)
    first: np.ndarray | None = None  # [N] first-order part
    count: np.ndarray | None = None  # [N] times valued
    per_val: np.ndarray | None = None  # [N, K]
    per_val_normalized: np.ndarray | None = None  # [N, K] Σ_t values of step t / |their sum| (diagnostic)
    snap_steps: np.ndarray | None = None  # [S] step after which each snapshot was taken
    snapshots: np.ndarray | None = None  # [S, N, K] cumulative per-column values
    trace: dict[str, np.ndarray] | None = None  # step, row, first, second
    audit: list[dict[str, Any]] = field(default_factory=list)  # the audit's rows, one per audited step
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    evals: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # final parameters
    meta: dict[str, Any] = field(default_factory=dict)

    def model(self, cfg: LMConfig) -> nn.Module:
        m = build_model(cfg, seed=0)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in self.state.items()}, strict=False)
        m.eval()
        return m

    # -- persistence: numbers only (npz + json), no pickles
    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"ids": self.ids, "train_loss": self.train_loss, "eval_steps": self.eval_steps}
        for name in ("value", "first", "count", "per_val", "per_val_normalized", "snap_steps", "snapshots"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        for k, v in (self.trace or {}).items():
            arrays[f"trace.{k}"] = v
        for k, v in self.evals.items():
            arrays[f"eval.{k}"] = v
        for k, v in self.state.items():
            arrays[f"state.{k}"] = v
        np.savez(path / "run.npz", **arrays)
        (path / "meta.json").write_text(json.dumps({**self.meta, "audit": self.audit}, indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> LMRun:
        z = np.load(path / "run.npz", allow_pickle=False)
        run = cls(ids=z["ids"], train_loss=z["train_loss"], eval_steps=z["eval_steps"])
        for name in ("value", "first", "count", "per_val", "per_val_normalized", "snap_steps", "snapshots"):
            if name in z:
                setattr(run, name, z[name])
        trace = {k[6:]: z[k] for k in z.files if k.startswith("trace.")}
        run.trace = trace or None
        run.evals = {k[5:]: z[k] for k in z.files if k.startswith("eval.")}
        run.state = {k[6:]: z[k] for k in z.files if k.startswith("state.")}
        run.meta = json.loads((path / "meta.json").read_text())
        run.audit = run.meta.pop("audit", [])
        return run


def train_lm(
    cfg: LMConfig,
    tokens: Tensor,
    ids: Sequence[int],
    *,
    seed: int = 0,
    order: int | None = None,
    columns: Sequence[Tensor] | None = None,
    pool: np.ndarray | None = None,
    evals: dict[str, Tensor | Sequence[Tensor]] | None = None,
    snapshots: bool = False,
    keep_trace: bool = False,
    keep_state: bool = True,
    progress: str = "",
    proxy: str | None = None,
    audit: dict[str, Any] | None = None,
) -> LMRun:
    """Train a fresh model for ``cfg.steps`` steps on ``tokens`` (rows ``pool`` only, if given).

    ``order`` 1 or 2 values every step with ``InRunShapley`` against ``columns`` (``proxy="sgd"``:
    the paper's SGD proxy for an AdamW run), with the ``audit`` settings; ``None`` trains plainly.
    Same ``seed``: same initialization and same data order (for the same pool); the tracker never
    changes training, so two valued runs of the same seed follow the same trajectory.
    """
    clock = common.Clock()
    model = build_model(cfg, seed)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(ids)
    rows_all = np.arange(n) if pool is None else np.asarray(pool)
    plan = rows_all[batch_order(len(rows_all), cfg.steps, cfg.batch, seed)]
    tracker = None
    if order is not None:
        tracker = InRunShapley(model, opt, val_loss=column_losses(columns), order=order, keep_trace=keep_trace,
                               proxy=proxy, audit=audit)
        tracker.ledger.set_sources({int(i): "" for i in ids})  # ledger rows = corpus order
    run = LMRun(ids=np.asarray(ids, dtype=np.int64))
    evals = evals or {}
    eval_steps, eval_vals = [], {k: [] for k in evals}
    snap_steps, snaps = [], []
    losses = np.zeros(cfg.steps)
    prev: np.ndarray | None = None
    normalized: np.ndarray | None = None

    def evaluate(step: int) -> None:
        eval_steps.append(step)
        for k, v in evals.items():
            eval_vals[k].append(eval_loss(model, v))

    for step in range(cfg.steps):
        if evals and step % cfg.eval_every == 0:
            evaluate(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        rows = plan[step]
        x = tokens[torch.from_numpy(rows)]
        if tracker is not None:
            with tracker.step([int(ids[r]) for r in rows]):
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
        else:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        if tracker is not None:
            pv = tracker.per_validation()[1]  # completes this step (order 2): no extra validation pass
            delta = pv if prev is None else pv - prev
            if normalized is None:
                normalized = np.zeros_like(pv)
            normalized += delta / np.maximum(np.abs(delta.sum(axis=0, keepdims=True)), 1e-30)
            prev = pv
            if snapshots and (step + 1) % cfg.snapshot_every == 0:
                snap_steps.append(step + 1)
                snaps.append(pv.astype(np.float32))
        if progress and (step + 1) % 100 == 0:
            common.log(f"{progress}: step {step + 1}/{cfg.steps}, loss {np.mean(losses[step - 99 : step + 1]):.3f}, {clock.wall():.0f} s")
    if evals:
        evaluate(cfg.steps)
    run.train_loss = losses
    run.eval_steps = np.asarray(eval_steps)
    run.evals = {k: np.asarray(v) for k, v in eval_vals.items()}
    if tracker is not None:
        table = tracker.values()
        pv_ids, pv = tracker.per_validation()
        assert [int(i) for i in pv_ids] == [int(i) for i in ids], "ledger rows are not in corpus order"
        assert list(table.ids()) == list(pv_ids)
        run.value, run.first, run.count, run.per_val = table.value, table.first_order, table.counts, pv
        run.per_val_normalized = normalized
        if snapshots:
            run.snap_steps, run.snapshots = np.asarray(snap_steps), np.stack(snaps)
        if keep_trace:
            tr = tracker.ledger.trace()
            index = {int(i): r for r, i in enumerate(ids)}
            run.trace = {
                "step": tr["step"].astype(np.int64),
                "row": np.array([index[int(i)] for i in tr["id"]], dtype=np.int64),
                "first": tr["first_order"],
                "second": tr["second_order"],
            }
        run.meta["coverage"] = str(tracker.coverage())
        if tracker.audit is not None:
            run.audit = [dict(r) for r in tracker.audit.steps]
        tracker.close()
    if keep_state:
        run.state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if "attn.bias" not in k}
    run.meta.update(
        {"seed": seed, "order": order, "seconds": clock.wall(), "cpu_seconds": clock.cpu(), "config": asdict(cfg)}
    )
    return run


def _show(path: Path) -> str:
    return str(path.relative_to(common.REPO)) if path.is_relative_to(common.REPO) else str(path)


def cached_run(name: str, settings: dict[str, Any], fresh: bool, make: Callable[[], LMRun]) -> LMRun:
    """Load the run for ``settings`` from ``runs/studies/`` or make and save it."""
    path = common.CACHE / f"{name}-{common.key(settings)}"
    if not fresh and (path / "meta.json").exists():
        run = LMRun.load(path)
        run.meta["cached"] = True
        common.log(f"{name}: loaded from {_show(path)} (made in {run.meta['seconds']:.0f} s)")
        return run
    t0 = time.perf_counter()
    run = make()
    run.save(path)
    run.meta["cached"] = False
    common.log(f"{name}: trained in {time.perf_counter() - t0:.0f} s, saved to {_show(path)}")
    return run


def base_run(cfg: LMConfig, data: CodeData, order: int, fresh: bool, seed: int = 0, proxy: str | None = None) -> LMRun:
    """The valued pretraining run shared by the curation, stages and domain studies (audited)."""
    settings = {"cfg": asdict(cfg), "order": order, "seed": seed, "proxy": proxy, "audit": AUDIT, "kind": "base-v3"}
    name = f"base-{cfg.optimizer}-o{order}" + ("-proxy" if proxy else "")
    return cached_run(
        name,
        settings,
        fresh,
        lambda: train_lm(
            cfg, data.train.tokens, [c.id for c in data.train.chunks], seed=seed, order=order,
            columns=data.columns, evals={"test": data.test}, snapshots=True, keep_trace=True,
            progress=f"valued run ({cfg.optimizer}, order {order}{', SGD proxy' if proxy else ''})", proxy=proxy,
            audit=AUDIT,
        ),
    )


# ---------------------------------------------------------------------- final-checkpoint baseline
def final_gradient_similarity(
    model: nn.Module, tokens: Tensor, columns: Sequence[Tensor], batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(dot, cos)``, each ``[N, K]``: every training chunk's loss gradient at the final parameters
    against each validation column's loss gradient (the "influence without Hessian" / TracIn with
    the last checkpoint only). Per-example gradients by ``inrun.exact.per_example_gradients``."""
    from inrun.exact import per_example_gradients, trainable_parameters

    model.eval()
    params = trainable_parameters(model)
    live = dict(model.named_parameters())
    names = list(params)
    val = []
    for x in columns:
        g = torch.autograd.grad(model(input_ids=x, labels=x).loss, [live[n] for n in names])
        val.append(torch.cat([t.flatten() for t in g]).double())
    V = torch.stack(val)  # [K, P]
    v_norm = V.norm(dim=1)

    def example_loss(fn: Callable[..., Any], row: Tensor) -> Tensor:
        return fn(input_ids=row, labels=row).loss

    dots, norms = [], []
    for start in range(0, len(tokens), batch):
        per = per_example_gradients(model, example_loss, [tokens[start : start + batch]])
        G = torch.cat([per[n].flatten(1) for n in names], dim=1).double()  # [b, P]
        dots.append(G @ V.T)
        norms.append(G.norm(dim=1))
    dot = torch.cat(dots).numpy()
    norm = torch.cat(norms).numpy()
    return dot, dot / (norm[:, None] * v_norm.numpy()[None, :] + 1e-30)
