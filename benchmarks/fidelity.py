"""How close are the tracker's values to the exact Shapley values of a step?

For (a) an MLP on scikit-learn's bundled digits and (b) a small GPT-2 on chunks of Python's
standard library, the model is trained for real; at several points of training one batch of
``batch`` examples is taken and, for every learning rate of a grid spanning "tiny" to "too
large", one SGD step of it is valued three ways by ``InRunShapley`` (order 1; order 2
``hessian``; order 2 ``trapezoid``) and exactly, by enumerating all 2^batch subsets of the
step's local utility ``U(S) = L_val(θ) − L_val(θ − η Σ_{z∈S} g_z)`` (``inrun.exact``).
Everything runs in float64. Prints a markdown table and writes ``docs/fidelity.md`` and
``docs/fidelity.png``.

    PYTHONPATH=src python benchmarks/fidelity.py            # a few minutes on one CPU core
    PYTHONPATH=src python benchmarks/fidelity.py --quick    # a smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from inrun import InRunShapley, exact

METHODS = ("first", "hessian", "trapezoid")
LABELS = {"first": "first order", "hessian": "2nd order, Hessian", "trapezoid": "2nd order, trapezoid"}
FLOOR = 1e-6  # below this first-order RMSE the comparison is not required to favor order 2


@dataclass(frozen=True)
class Setting:
    """One model/data pair of the benchmark."""

    name: str
    lrs: tuple[float, ...]
    """Learning rates of the measured SGD step."""
    measure_at: tuple[int, ...]
    """Training steps (of the between-measurement optimizer) at which a step is measured."""
    batch: int = 10
    """Examples in a measured batch (2^batch subsets are enumerated)."""
    train_lr: float = 0.5
    train_batch: int = 32
    seed: int = 0


@dataclass
class Problem:
    """What a setting builds: a model, its training stream and its validation loss."""

    model: nn.Module
    train_step: Callable[[], None]
    """One real training step of the model (own optimizer, untracked)."""
    measured_batch: Callable[[int], tuple[Tensor, ...]]
    """A batch of ``batch`` examples for the k-th measurement."""
    batch_loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    example_loss: Callable[..., Tensor]
    val_loss: Callable[[nn.Module], Tensor]
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- (a) digits MLP
def digits_problem(s: Setting) -> Problem:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(X), generator=gen)
    X = torch.tensor(X, dtype=torch.float64)[order] / 16.0
    y = torch.tensor(y, dtype=torch.long)[order]
    Xv, yv, Xt, yt = X[:300], y[:300], X[300:], y[300:]
    torch.manual_seed(s.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=s.train_lr)

    def train_step() -> None:
        idx = torch.randint(0, len(Xt), (s.train_batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(Xt[idx]), yt[idx]).backward()
        opt.step()

    measure_gen = torch.Generator().manual_seed(s.seed + 1)

    def measured_batch(k: int) -> tuple[Tensor, ...]:
        idx = torch.randperm(len(Xt), generator=measure_gen)[: s.batch]
        return Xt[idx], yt[idx]

    B = s.batch
    return Problem(
        model=model,
        train_step=train_step,
        measured_batch=measured_batch,
        batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        example_loss=lambda f, x, t: F.cross_entropy(f(x), t, reduction="sum") / B,
        val_loss=lambda m: F.cross_entropy(m(Xv), yv),
        details={
            "data": f"sklearn digits, {len(Xt)} train / {len(Xv)} validation images (8x8, /16)",
            "model": "MLP 64-32-10, tanh, float64",
            "training between measurements": f"SGD lr {s.train_lr}, batch {s.train_batch}, batch-mean cross-entropy",
            "validation loss": "mean cross-entropy over the 300 validation images",
        },
    )


# ----------------------------------------------------------------------------- (b) GPT-2
def gpt2_problem(s: Setting, length: int = 64, n_val: int = 4) -> Problem:
    from transformers import GPT2Config, GPT2LMHeadModel

    from inrun.run.data.stdlib import DEFAULT_PACKAGES, VOCAB_SIZE, load_stdlib_corpus

    train, val = load_stdlib_corpus(DEFAULT_PACKAGES, length=length, max_train_per_source=200, max_val=n_val)
    torch.manual_seed(s.seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB_SIZE, n_positions=length,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).double()
    opt = torch.optim.AdamW(model.parameters(), lr=s.train_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    tokens, val_tokens = train.tokens, val.tokens

    def token_losses(m: Callable, ids: Tensor) -> Tensor:
        # float64 end to end: Hugging Face's built-in loss casts logits to float32.
        logits = m(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")

    def train_step() -> None:
        idx = torch.randint(0, len(tokens), (s.train_batch,), generator=gen)
        opt.zero_grad()
        token_losses(model, tokens[idx]).mean().backward()
        opt.step()

    measure_gen = torch.Generator().manual_seed(s.seed + 1)

    def measured_batch(k: int) -> tuple[Tensor, ...]:
        return (tokens[torch.randperm(len(tokens), generator=measure_gen)[: s.batch]],)

    B, T = s.batch, length - 1
    return Problem(
        model=model,
        train_step=train_step,
        measured_batch=measured_batch,
        batch_loss=lambda m, b: token_losses(m, b[0]).mean(),
        example_loss=lambda f, ids: token_losses(f, ids).sum() / (B * T),
        val_loss=lambda m: token_losses(m, val_tokens).mean(),
        details={
            "data": f"{len(train)} chunks of {length} bytes of the standard library ({len(DEFAULT_PACKAGES)} packages); "
            f"validation: {n_val} chunks of held-out modules",
            "model": "GPT-2 (GPT2Config: 2 layers, 64 dims, 4 heads, byte vocabulary 256, tied embeddings), float64",
            "training between measurements": f"AdamW lr {s.train_lr}, batch {s.train_batch}, token-mean loss",
            "validation loss": f"token-mean next-byte cross-entropy over the {n_val} validation chunks",
        },
    )


# ----------------------------------------------------------------------------- measurement
def tracker_values(p: Problem, batch: tuple[Tensor, ...], lr: float, method: str) -> np.ndarray:
    """Value one SGD step of a copy of the model with the tracker."""
    model = copy.deepcopy(p.model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    options = {"order": 1} if method == "first" else {"order": 2, "second_order": method}
    tracker = InRunShapley(model, opt, val_loss=p.val_loss, **options)
    n = batch[0].shape[0]
    with tracker.step(range(n)):
        p.batch_loss(model, batch).backward()
    opt.step()
    values = tracker.values()
    tracker.close()
    return np.array([values[i] for i in range(n)])


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def measure(s: Setting, p: Problem, log: Callable[[str], None]) -> list[dict]:
    """One row per (measurement point, lr, method)."""
    rows = []
    step = 0
    start = time.time()
    for k, at in enumerate(s.measure_at):
        while step < at:
            p.train_step()
            step += 1
        batch = p.measured_batch(k)
        per_example = exact.per_example_gradients(p.model, p.example_loss, batch)
        with torch.no_grad():
            val_loss_now = float(p.val_loss(p.model.eval()))
        p.model.train()
        for lr in s.lrs:
            game = exact.StepGame(p.model, p.val_loss, per_example, exact.sgd_update(lr))
            truth = exact.enumerate_shapley(game.utility, s.batch).numpy()
            full = float(truth.sum())
            for method in METHODS:
                got = tracker_values(p, batch, lr, method)
                err = got - truth
                rows.append({
                    "setting": s.name, "point": at, "lr": lr, "method": method,
                    "mse": float(np.mean(err**2)), "ms_exact": float(np.mean(truth**2)),
                    "pearson": pearson(got, truth), "spearman": pearson(ranks(got), ranks(truth)),
                    "u_full": full, "val_loss": val_loss_now,
                })
            log(
                f"  {s.name}: step {at:>4} (L_val {val_loss_now:.3f}) lr {lr:<7g} U(B) {full:+.2e}  "
                + "  ".join(f"{m} {np.sqrt(r['mse']):.1e}" for m, r in zip(METHODS, rows[-3:]))
                + f"  [{time.time() - start:.0f}s]"
            )
    return rows


def summarize(rows: list[dict], s: Setting) -> list[dict]:
    """Per lr: RMSE pooled over the measured steps, mean Pearson and Spearman."""
    out = []
    for lr in s.lrs:
        here = [r for r in rows if r["setting"] == s.name and r["lr"] == lr]
        row = {
            "setting": s.name, "lr": lr,
            "rms_exact": float(np.sqrt(np.mean([r["ms_exact"] for r in here if r["method"] == "first"]))),
            "u_full": float(np.mean([r["u_full"] for r in here if r["method"] == "first"])),
        }
        for m in METHODS:
            mine = [r for r in here if r["method"] == m]
            row[f"rmse_{m}"] = float(np.sqrt(np.mean([r["mse"] for r in mine])))
            row[f"pearson_{m}"] = float(np.mean([r["pearson"] for r in mine]))
            row[f"spearman_{m}"] = float(np.mean([r["spearman"] for r in mine]))
        out.append(row)
    return out


def markdown_table(summary: list[dict]) -> str:
    head = (
        "| setting | η | mean U(B) | RMS exact φ | RMSE 1st | RMSE Hess | RMSE trap "
        "| Pearson 1st / Hess / trap | Spearman 1st / Hess / trap |\n"
        "|---|---:|---:|---:|---:|---:|---:|:---:|:---:|\n"
    )
    lines = []
    for r in summary:
        lines.append(
            f"| {r['setting']} | {r['lr']:g} | {r['u_full']:+.2e} | {r['rms_exact']:.2e} "
            f"| {r['rmse_first']:.2e} | {r['rmse_hessian']:.2e} | {r['rmse_trapezoid']:.2e} "
            f"| {r['pearson_first']:.4f} / {r['pearson_hessian']:.4f} / {r['pearson_trapezoid']:.4f} "
            f"| {r['spearman_first']:.3f} / {r['spearman_hessian']:.3f} / {r['spearman_trapezoid']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def detail_table(rows: list[dict]) -> str:
    """RMSE of each method at each measured step (not pooled)."""
    head = (
        "| setting | training step | L_val | η | U(B) | RMS exact φ | RMSE 1st | RMSE Hess | RMSE trap "
        "| Pearson 1st / Hess / trap |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n"
    )
    lines = []
    for i in range(0, len(rows), len(METHODS)):
        first, hess, trap = rows[i : i + len(METHODS)]
        lines.append(
            f"| {first['setting']} | {first['point']} | {first['val_loss']:.3f} | {first['lr']:g} | {first['u_full']:+.2e} "
            f"| {np.sqrt(first['ms_exact']):.2e} | {np.sqrt(first['mse']):.2e} | {np.sqrt(hess['mse']):.2e} "
            f"| {np.sqrt(trap['mse']):.2e} "
            f"| {first['pearson']:.4f} / {hess['pearson']:.4f} / {trap['pearson']:.4f} |"
        )
    return head + "\n".join(lines) + "\n"


def second_order_check(summary: list[dict]) -> list[str]:
    """Learning rates where first-order RMSE > FLOOR but a second-order variant is not better."""
    failures = []
    for r in summary:
        if r["rmse_first"] <= FLOOR:
            continue
        for m in ("hessian", "trapezoid"):
            if not r[f"rmse_{m}"] < r["rmse_first"]:
                failures.append(
                    f"{r['setting']} η={r['lr']:g}: {m} RMSE {r[f'rmse_{m}']:.2e} >= first order {r['rmse_first']:.2e}"
                )
    return failures


def plot(rows: list[dict], summary: list[dict], settings: list[Setting], path: Path) -> None:
    """Top: RMSE pooled over the measured steps. Bottom: each step's RMSE over first order's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(settings), figsize=(5.4 * len(settings), 8.0), squeeze=False)
    for col, s in enumerate(settings):
        ax = axes[0][col]
        mine = [r for r in summary if r["setting"] == s.name]
        lrs = [r["lr"] for r in mine]
        for m, marker in zip(METHODS, "osd"):
            ax.loglog(lrs, [r[f"rmse_{m}"] for r in mine], marker=marker, label=LABELS[m])
        ax.loglog(lrs, [r["rms_exact"] for r in mine], "k--", label="RMS of exact values")
        ax.set_title(f"{s.name}: RMSE pooled over steps")
        ax.set_xlabel("learning rate η of the measured step")
        ax.set_ylabel("RMSE vs exact Shapley")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)

        ax = axes[1][col]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, at in enumerate(s.measure_at):
            here = [r for r in rows if r["setting"] == s.name and r["point"] == at]
            first = {r["lr"]: r["mse"] for r in here if r["method"] == "first"}
            for m, style in (("hessian", "-s"), ("trapezoid", "--d")):
                pts = [(r["lr"], np.sqrt(r["mse"] / first[r["lr"]])) for r in here if r["method"] == m]
                ax.loglog(*zip(*pts), style, color=colors[(k + 3) % len(colors)], ms=4,
                          label=f"{m}, training step {at}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{s.name}: RMSE / first-order RMSE, per step")
        ax.set_xlabel("learning rate η of the measured step")
        ax.set_ylabel("ratio (below 1: better than first order)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SETTINGS = {
    "digits": Setting(
        "MLP / digits", lrs=(0.001, 0.01, 0.1, 0.3, 1.0, 3.0), measure_at=(0, 100, 400, 1200), train_lr=0.5,
    ),
    "gpt2": Setting(
        "GPT-2 / stdlib", lrs=(0.001, 0.01, 0.03, 0.1, 0.3, 1.0), measure_at=(0, 100, 300), batch=8,
        train_lr=3e-3, train_batch=16,
    ),
}
QUICK = {
    "digits": Setting("MLP / digits", lrs=(0.1, 1.0, 10.0), measure_at=(0, 50), batch=6, train_lr=0.5),
    "gpt2": Setting("GPT-2 / stdlib", lrs=(0.01, 0.3), measure_at=(0, 20), batch=5, train_lr=3e-3, train_batch=8),
}
BUILDERS = {"digits": digits_problem, "gpt2": gpt2_problem}


READING = "## Reading"


def write_doc(path: Path, table: str, details: str, failures: list[str], settings: list[Setting], problems: list[Problem],
              seconds: float) -> None:
    """Regenerate everything above the hand-written reading, which is kept as it is."""
    old = path.read_text() if path.exists() else ""
    reading = old[old.index(READING):] if READING in old else READING + "\n\n(to be written)\n"
    lines = [
        "# Fidelity: tracker values against exact Shapley values",
        "",
        "Generated by `PYTHONPATH=src python benchmarks/fidelity.py` "
        f"({seconds:.0f} s on a shared 2-core CPU machine, torch threads: {torch.get_num_threads()}). "
        "Each row: one SGD step of "
        "learning rate η valued by the tracker (`order=1`; `order=2, second_order=\"hessian\"`; "
        "`order=2, second_order=\"trapezoid\"`) and exactly, by enumerating every subset S of the batch "
        "for the step's local utility U(S) = L_val(θ) − L_val(θ − η Σ_{z∈S} g_z) "
        "(`inrun.exact.StepGame` + `enumerate_shapley`). RMSE is pooled over the measured steps; "
        "Pearson and Spearman are averaged over them. \"mean U(B)\" is the validation-loss reduction "
        "of the whole step (negative: the step made the validation loss worse).",
        "",
        table,
        f"Second-order RMSE below first order at every η where first-order RMSE > {FLOOR:g}: "
        + ("**yes**." if not failures else "**no**: " + "; ".join(failures) + "."),
        "",
        "![RMSE against the learning rate](fidelity.png)",
        "",
        "Each measured step separately:",
        "",
        details,
        "## Settings",
        "",
    ]
    for s, p in zip(settings, problems):
        lines.append(f"**{s.name}**: " + "; ".join(f"{k}: {v}" for k, v in p.details.items()) + ".")
        lines.append(
            f"Measured: one batch of {s.batch} training examples (2^{s.batch} = {2**s.batch} subsets) at "
            f"training steps {', '.join(map(str, s.measure_at))}; η ∈ {{{', '.join(f'{x:g}' for x in s.lrs)}}}."
        )
        lines.append("")
    lines += ["```", repr([asdict(s) for s in settings]), "```", "", reading]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--only", choices=sorted(SETTINGS), help="run one setting")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where fidelity.md/png go")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1 by default: on a shared 2-core machine more threads spin and slow down)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table_of = QUICK if args.quick else SETTINGS
    keys = [args.only] if args.only else list(table_of)
    settings = [table_of[k] for k in keys]
    start = time.time()
    all_rows, problems = [], []
    # The Hessian variant differentiates attention twice: only PyTorch's math backend can.
    with sdpa_kernel([SDPBackend.MATH]):
        for key, s in zip(keys, settings):
            print(f"{s.name}: building", flush=True)
            p = BUILDERS[key](s)
            problems.append(p)
            all_rows += measure(s, p, lambda msg: print(msg, flush=True))
    summary = [row for s in settings for row in summarize(all_rows, s)]
    table = markdown_table(summary)
    details = detail_table(all_rows)
    failures = second_order_check(summary)
    seconds = time.time() - start
    print()
    print(details)
    print(table)
    print(
        f"second-order RMSE below first order wherever first-order RMSE > {FLOOR:g}: "
        + ("yes" if not failures else "NO\n  " + "\n  ".join(failures))
    )
    print(f"total {seconds:.0f} s")
    if not args.quick:
        args.docs.mkdir(parents=True, exist_ok=True)
        plot(all_rows, summary, settings, args.docs / "fidelity.png")
        write_doc(args.docs / "fidelity.md", table, details, failures, settings, problems, seconds)
        print(f"wrote {args.docs / 'fidelity.md'} and {args.docs / 'fidelity.png'}")


if __name__ == "__main__":
    main()
