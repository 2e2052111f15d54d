"""How well each optimizer rule values the step the optimizer really makes.

For each optimizer, model, learning rate and number of real training steps before the valued
step, the tracker's values (several variants) are compared with the exact Shapley values of the
real step's utility U(S) = L_val(θ) − L_val(θ after optimizer.step() with gradient Σ_{z∈S} g_z),
enumerated over all subsets of the batch (``inrun.exact.optimizer_update``). Reported: relative
RMSE (RMSE / mean |exact value|) and Pearson correlation, averaged over 3 seeds.

Models: an MLP on scikit-learn's bundled breast-cancer table (batch 10) and a small GPT-2 on
standard-library code chunks (batch 8). Writes the markdown table to stdout and, with
``--write``, to docs/optimizers-fidelity.md.

``--maps``: the second table, Muon and Adafactor (steps that are maps of the whole gradient,
``inrun.optim_maps``): the default path-integrated derivative (order 1 and 2), the tangent at
the step, the SGD proxy; Muon also against its game with torch's bfloat16 Newton–Schulz replaced
by the same iteration in float64 (what the rule differentiates), which separates the rounding
of the real step from the linearization's error. Muon takes matrices only: the MLP has no
biases, and GPT-2's other parameters are frozen. With ``--write`` it replaces that section.

Usage: python benchmarks/optimizer_fidelity.py [--quick] [--maps] [--write]
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

from inrun import InRunShapley, exact, optim

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


def one_setting(problem: Callable, make_opt: Callable, warm: int, variants: dict, seed: int,
                matrices_only: bool = False) -> dict[str, tuple[float, float]]:
    model, batch, loss, share, val_loss = problem(seed)
    if matrices_only:
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
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
        options = dict(options)
        nodes = options.pop("nodes", optim.PATH_NODES)
        optim.MuonRule.nodes = optim.AdafactorRule.nodes = nodes
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
    optim.MuonRule.nodes = optim.AdafactorRule.nodes = optim.PATH_NODES
    return out


def mlp_matrices(seed: int):
    """The MLP problem without biases (Muon takes matrices only)."""
    _, batch, loss, share, val_loss = mlp_problem(seed)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 16, bias=False), nn.Tanh(), nn.Linear(16, 2, bias=False)).double(), batch, loss, share, val_loss


MAP_VARIANTS = {
    "order 1": {},
    "order 2": {"order": 2},
    "tangent": {"nodes": (0,)},
    "SGD proxy": {"proxy": "sgd"},
}


def ns_float64(grad, ns_coefficients, ns_steps, eps):
    """torch's Muon orthogonalization (torch/optim/_muon.py) in float64 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.double().T if grad.size(0) > grad.size(1) else grad.double()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)


def maps_table(seeds: list[int], quick: bool) -> str:
    import torch.optim._muon as torch_muon

    real_ns = torch_muon._zeropower_via_newtonschulz
    settings = [
        ("MLP", mlp_matrices, "Muon", 0.02, False, False),
        ("MLP", mlp_matrices, "Muon, float64 NS", 0.02, False, True),
        ("GPT-2 (matrices)", gpt2_problem, "Muon", 0.02, True, False),
        ("GPT-2 (matrices)", gpt2_problem, "Muon, float64 NS", 0.02, True, True),
        ("MLP", mlp_problem, "Adafactor", 1e-2, False, False),
        ("GPT-2", gpt2_problem, "Adafactor", 1e-2, False, False),
    ]
    lines = [
        "| model | optimizer | lr | warm steps | " + " | ".join(f"{v} rel. RMSE / Pearson" for v in MAP_VARIANTS) + " |",
        "|---|---|---:|---:|" + "---|" * len(MAP_VARIANTS),
    ]
    for model_name, problem, opt_name, lr, matrices, float64_ns in settings:
        make = (lambda ps, lr=lr: torch.optim.Muon(ps, lr=lr)) if "Muon" in opt_name else \
            (lambda ps, lr=lr: torch.optim.Adafactor(ps, lr=lr))
        for warm in ([5] if quick else [5, 50]):
            torch_muon._zeropower_via_newtonschulz = ns_float64 if float64_ns else real_ns
            try:
                runs = [one_setting(problem, make, warm, MAP_VARIANTS, s, matrices_only=matrices) for s in seeds]
            finally:
                torch_muon._zeropower_via_newtonschulz = real_ns
            cells = [f"{np.mean([r[v][0] for r in runs]):.3f} / {np.mean([r[v][1] for r in runs]):.3f}" for v in MAP_VARIANTS]
            lines.append(f"| {model_name} | {opt_name} | {lr:g} | {warm} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


MAPS_MARK = "<!-- maps: benchmarks/optimizer_fidelity.py --maps -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer settings (smoke run)")
    parser.add_argument("--write", action="store_true", help="write docs/optimizers-fidelity.md")
    parser.add_argument("--maps", action="store_true", help="the Muon and Adafactor table only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    if args.maps:
        start = time.perf_counter()
        table = maps_table(seeds, args.quick)
        print(table)
        print(f"\n({time.perf_counter() - start:.0f} s, {len(seeds)} seed(s))")
        if args.write:
            path = Path(__file__).resolve().parent.parent / "docs" / "optimizers-fidelity.md"
            head = path.read_text().split(MAPS_MARK)[0].rstrip("\n")
            path.write_text(
                f"{head}\n\n{MAPS_MARK}\n\nMuon and Adafactor, mean over seeds {', '.join(map(str, seeds))}. Order 1 "
                "is the default (the map's derivative integrated along the segment from no data to the "
                "batch's gradient by Gauss–Legendre quadrature, 3, 6 or 12 nodes until its efficiency error is within 1e-3); tangent: the derivative at the step.\n\n" + table + "\n"
            )
        return
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
        maps = path.read_text().partition(MAPS_MARK)[1:] if path.exists() else ("", "")
        path.write_text(
            "<!-- generated by benchmarks/optimizer_fidelity.py -->\n\n"
            "Mean over seeds " + ", ".join(map(str, seeds)) + ". Order 1 is the default (for Adam: the "
            "secant slope); order 2 is the trapezoid around the data-free step.\n\n" + table + "\n"
            + (f"\n{maps[0]}{maps[1]}" if maps[0] else "")
        )


if __name__ == "__main__":
    main()
