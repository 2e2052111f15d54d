"""How well each optimizer rule values the step the optimizer really makes.

For each optimizer, model, learning rate and number of real training steps before the valued
step, the tracker's values (several variants) are compared with the exact Shapley values of the
real step's utility U(S) = L_val(θ) − L_val(θ after optimizer.step() with gradient Σ_{z∈S} g_z),
enumerated over all subsets of the batch (``inrun.exact.optimizer_update``). Reported: relative
RMSE (RMSE / mean |exact value|) and Pearson correlation, averaged over 3 seeds.

Models: an MLP on scikit-learn's bundled breast-cancer table (batch 10) and a small GPT-2 on
standard-library code chunks (batch 8). Writes the markdown table to stdout and, with
``--write``, to docs/optimizers-fidelity.md.

Usage: python benchmarks/optimizer_fidelity.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inrun import InRunShapley, exact

VARIANTS = {
    "order 1": {},
    "order 2": {"order": 2},
    "fixed state": {"adam": "fixed_state"},
    "SGD proxy": {"proxy": "sgd"},
}
SGD_VARIANTS = {k: v for k, v in VARIANTS.items() if k != "fixed state"}


def mlp_problem(seed: int):
    from sklearn.datasets import load_breast_cancer

    X, Y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))
    Y = torch.tensor(Y)
    xv, yv = X[:64], Y[:64]
    pool = torch.arange(64, len(X))
    g = torch.Generator().manual_seed(seed)

    def batch() -> tuple:
        idx = pool[torch.randint(0, len(pool), (10,), generator=g)]
        return X[idx], Y[idx]

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 2)).double()

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def share(f, x, y, batch_size):
        return F.cross_entropy(f(x), y, reduction="sum") / batch_size

    return model, batch, loss, share, lambda m: F.cross_entropy(m(xv), yv)


def gpt2_problem(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from inrun.run.data.stdlib import load_stdlib_corpus

    train, val = load_stdlib_corpus(("json", "email", "http"), length=16, max_train_per_source=200, max_val=4)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).double()
    g = torch.Generator().manual_seed(seed)
    vt = val.tokens

    def batch() -> tuple:
        return (train.tokens[torch.randint(0, len(train), (8,), generator=g)],)

    def token_loss(logits, ids, reduction):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 256).double(), ids[:, 1:].reshape(-1), reduction=reduction)

    def loss(m, b):
        return token_loss(m(input_ids=b[0]).logits, b[0], "mean")

    def share(f, ids, batch_size):
        return token_loss(f(input_ids=ids).logits, ids, "sum") / (batch_size * (ids.shape[1] - 1))

    return model, batch, loss, share, lambda m: token_loss(m(input_ids=vt).logits, vt, "mean")


def copy_optimizer(opt: torch.optim.Optimizer, model: nn.Module, new: nn.Module) -> torch.optim.Optimizer:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    live = list(new.parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [live[index[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    out = type(opt)(groups)
    out.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors: copy first
    return out


def one_setting(problem: Callable, make_opt: Callable, warm: int, variants: dict, seed: int) -> dict[str, tuple[float, float]]:
    model, batch, loss, share, val_loss = problem(seed)
    opt = make_opt(model.parameters())
    for _ in range(warm):
        loss(model, batch()).backward()
        opt.step()
        opt.zero_grad()
    b = batch()
    B = b[0].shape[0]
    truth = exact.exact_step_values(
        model, lambda f, *rows: share(f, *rows, batch_size=B), b, val_loss,
        update=exact.optimizer_update(model, opt), chunk_size=None,
    ).values.numpy()
    out = {}
    for name, options in variants.items():
        m2 = copy.deepcopy(model)
        o2 = copy_optimizer(opt, model, m2)
        tracker = InRunShapley(m2, o2, val_loss=val_loss, **options)
        with tracker.step(range(B)):
            loss(m2, b).backward()
        o2.step()
        v = tracker.values()
        est = np.array([v[i] for i in range(B)])
        tracker.close()
        out[name] = (float(np.sqrt(np.mean((est - truth) ** 2)) / np.mean(np.abs(truth))), float(np.corrcoef(est, truth)[0, 1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer settings (smoke run)")
    parser.add_argument("--write", action="store_true", help="write docs/optimizers-fidelity.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    settings = [
        ("MLP", mlp_problem, "Adam", lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr)), VARIANTS),
        ("MLP", mlp_problem, "AdamW wd 0.1", lambda lr: (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)), VARIANTS),
        ("GPT-2", gpt2_problem, "AdamW wd 0.1", lambda lr: (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)), VARIANTS),
        ("MLP", mlp_problem, "SGD momentum 0.9", lambda lr: (lambda ps: torch.optim.SGD(ps, lr=100 * lr, momentum=0.9)), SGD_VARIANTS),
        ("MLP", mlp_problem, "SGD Nesterov, wd 0.01", lambda lr: (lambda ps: torch.optim.SGD(ps, lr=100 * lr, momentum=0.9, nesterov=True, weight_decay=0.01)), SGD_VARIANTS),
    ]
    lrs = [1e-3] if args.quick else [1e-3, 1e-2]
    warms = [5, 50] if not args.quick else [5]
    lines = [
        "| model | optimizer | lr | warm steps | " + " | ".join(f"{v} rel. RMSE / Pearson" for v in VARIANTS) + " |",
        "|---|---|---:|---:|" + "---|" * len(VARIANTS),
    ]
    start = time.perf_counter()
    for model_name, problem, opt_name, make, variants in settings:
        for lr in lrs:
            for warm in warms:
                runs = [one_setting(problem, make(lr), warm, variants, s) for s in seeds]
                cells = []
                for v in VARIANTS:
                    if v not in variants:
                        cells.append("—")
                        continue
                    rel = np.mean([r[v][0] for r in runs])
                    pear = np.mean([r[v][1] for r in runs])
                    cells.append(f"{rel:.3f} / {pear:.3f}")
                eff_lr = lr if "Adam" in opt_name else 100 * lr
                lines.append(f"| {model_name} | {opt_name} | {eff_lr:g} | {warm} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    print(f"\n({time.perf_counter() - start:.0f} s, {len(seeds)} seed(s))")
    if args.write:
        path = Path(__file__).resolve().parent.parent / "docs" / "optimizers-fidelity.md"
        path.write_text(
            "<!-- generated by benchmarks/optimizer_fidelity.py -->\n\n"
            "Mean over seeds " + ", ".join(map(str, seeds)) + ". Order 1 is the default (for Adam: the "
            "secant slope); order 2 is the trapezoid around the data-free step.\n\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
