"""Order 2 (``hessian`` and ``trapezoid``) against independent oracles, in float64.

* every row of ``layer_table.LAYERS``: the handler's ``dot`` with random contraction vectors
  (K = 1 and 3) = torch.func per-example gradients · vectors (the per-example factors the
  deferred contraction uses), and a whole step of a classifier around it at order 2;
* whole models (GPT-2 with tied embeddings, Llama, a CNN): tracker values = an oracle from
  torch.func per-example gradients and, for ``hessian``, a Hessian-vector product by double
  backward on a copy; for ``trapezoid``, ``g_val`` at θ_{t+1} computed on a copy stepped by hand;
* error orders against exact enumeration: first order O(η²), both second-order variants O(η³);
* the Hessian variant is efficient for the second-order Taylor utility;
* the trapezoid's last step is completed by ``values()``, ``flush()`` and ``close()``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import Case, _cast_val_loss, cast_floats, classification_case, forced_route, lm_case
from layer_table import BATCHED_LAYERS, LAYERS, LayerRow, Layout, layer_case
from test_oracle import cnn, gpt2, llama
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from inrun import InRunShapley, exact
from inrun.layers import FALLBACK, Rows, handler_for

logger = logging.getLogger(__name__)

# Tiny models: one thread is faster and immune to a shared machine's load (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


# Relative to the natural scale of each dot product (‖g_z‖·‖u‖).
DOT_RTOL = 1e-10
VALUE_RTOL = 1e-9


# ============================================================================ handler dots
def oracle_per_example_grads(module: nn.Module, x: Tensor, cotangent: Tensor, layout: Layout) -> dict[str, Tensor]:
    """torch.func: gradient of <r_z, output_z> for each example z, by vmap over examples."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def one(p: dict[str, Tensor], x_z: Tensor, r_z: Tensor) -> Tensor:
        if layout is Layout.BATCHED:
            out = functional_call(module, p, (x_z.unsqueeze(0),))[0]
        elif layout is Layout.BROADCAST:
            out = functional_call(module, p, (x,))[0]
        else:
            out = functional_call(module, p, (x,))
        return (out * r_z).sum()

    x_dim = 0 if layout is Layout.BATCHED else None
    return vmap(grad(one), in_dims=(None, x_dim, 0))(params, x, cotangent)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("case", LAYERS, ids=lambda c: c.name)
def test_handler_dot_matches_torch_func(case: LayerRow, K: int) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    B = 4
    module = case.make_module().double()
    target = module.get_submodule(case.at)
    handler = handler_for(target) or FALLBACK
    assert handler.name == case.handler

    x = case.make_input(gen, B)
    output = module(x)
    out_shape = output.shape if case.layout is Layout.UNBATCHED else output.shape[1:]
    cotangent = torch.randn(B, *out_shape, generator=gen, dtype=torch.float64)  # grad_out [B, *out]
    vectors = {
        n: torch.randn(K, *p.shape, generator=gen, dtype=torch.float64)
        for n, p in module.named_parameters() if p.requires_grad
    }
    if handler.parts(target):  # valued by its F.linear calls, each by its part's handler
        got = part_dots(module, case.at, handler, x, cotangent, vectors)
    else:
        got = whole_module_dots(module, handler, x, cotangent, vectors, case.layout)

    per_example = oracle_per_example_grads(module, x, cotangent, case.layout)
    if handler.multi_output:
        # The fallback values a module's parameters jointly: one dot along all of them.
        names = list(per_example)
        assert set(got) == {names[0]}
        joint = torch.cat([per_example[n].flatten(1) for n in names], dim=1)
        u = torch.cat([vectors[n].flatten(1) for n in names], dim=1)
        per_example, vectors, got = {names[0]: joint}, {names[0]: u}, {names[0]: got[names[0]]}
    assert set(got) == set(per_example)
    for name, g in per_example.items():
        expected = g.flatten(1) @ vectors[name].flatten(1).T  # [B, K]
        scale = g.flatten(1).norm(dim=1, keepdim=True) * vectors[name].flatten(1).norm(dim=1)
        assert got[name].shape == (B, K)
        assert ((got[name] - expected).abs() <= DOT_RTOL * scale + 1e-300).all(), (
            f"{case.name} {name}: max error {(got[name] - expected).abs().max():.3e}"
        )
        assert scale.min() > 0  # the comparison is not 0 == 0


def whole_module_dots(
    module: nn.Module, handler: object, x: Tensor, cotangent: Tensor, vectors: dict[str, Tensor], layout: Layout,
) -> dict[str, Tensor]:
    """The handler's dots of the module's one call (the fallback: one gradient per output)."""
    saved = handler.capture(module, (x,), {})
    if layout is Layout.UNBATCHED and isinstance(saved, Tensor):
        saved = saved.unsqueeze(0)  # what the tracker does for a call without a batch dim
    if handler.multi_output:
        saved.rows, saved.outputs = [Rows("batched", cotangent.shape[0])], [0]
        return handler.dot(module, saved, [cotangent], vectors)
    return handler.dot(module, saved, cotangent, vectors)


def part_dots(
    module: nn.Module, at: str, handler: object, x: Tensor, cotangent: Tensor, vectors: dict[str, Tensor],
) -> dict[str, Tensor]:
    """A module valued by linear parts (nn.MultiheadAttention): each ``F.linear`` call of the
    forward dotted by its part's handler with the vector cut to the call's weight rows, its rows
    (sequence-first: ``[S, B, ·]`` or ``[S·B, ·]``) summed per example, added up per parameter."""
    from inrun.layers.parts import LinearTaps, PartHandler, row_slice
    from inrun.layers.registry import reduce_rows

    target = module.get_submodule(at)
    calls: list[tuple[Tensor, Tensor, Tensor | None, Tensor]] = []
    with LinearTaps(lambda xi, w, b, y: calls.append((xi, w, b, y))):
        out = module(x)
    grads = torch.autograd.grad((out * cotangent).sum(), [y for *_, y in calls])
    B = x.shape[0]
    got: dict[str, Tensor] = {}
    for part in handler.parts(target):
        part_handler = PartHandler(part)
        paths = {"weight": part.weight, "bias": part.bias}
        weight = target.get_parameter(part.weight)
        for (xi, w, b, _), g in zip(calls, grads):
            rows = row_slice(w, weight)
            if rows is None:
                continue
            names = ["weight"] + (["bias"] if b is not None else [])
            vecs = {n: vectors[f"{at}.{paths[n]}"][:, rows[0] : rows[1]] for n in names}
            if xi.dim() == 3:  # [S, B, d]
                dots = part_handler.dot(target, xi.detach().movedim(1, 0), g.movedim(1, 0), vecs)
            else:  # [S·B, d]: row s·B + b
                dots = {n: reduce_rows(d, Rows("strided", B))
                        for n, d in part_handler.dot(target, xi.detach(), g, vecs).items()}
            for n, d in dots.items():
                key = f"{at}.{paths[n]}"
                got[key] = got[key] + d if key in got else d
    return got


# ============================================================================ whole models
def batch_grad(case: Case, model: nn.Module, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The batch gradient by plain autograd on a copy."""
    ref = copy.deepcopy(model)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(case.batch_loss(ref, batch), list(params.values()))))


def val_grad(case_val_loss: Callable, model: nn.Module, create_graph: bool = False):
    """``(params, g_val)`` of an eval-mode copy (params kept for a second backward)."""
    ref = copy.deepcopy(model).eval()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    # A graph to differentiate twice needs attention's math backend (fused kernels cannot).
    with sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext():
        g = torch.autograd.grad(case_val_loss(ref), list(params.values()), create_graph=create_graph)
    return params, dict(zip(params, g))


def hvp(params: dict[str, Tensor], g_val: dict[str, Tensor], vector: dict[str, Tensor]) -> dict[str, Tensor]:
    """Double backward: ``H v`` from a validation gradient taken with ``create_graph=True``."""
    live = [n for n in params if g_val[n].requires_grad]
    hv = torch.autograd.grad(
        [g_val[n] for n in live], list(params.values()), grad_outputs=[vector[n] for n in live], allow_unused=True
    )
    return {n: h if h is not None else torch.zeros_like(params[n]) for n, h in zip(params, hv)}


def dots(per_example: dict[str, Tensor], vector: dict[str, Tensor]) -> Tensor:
    return sum(per_example[n].flatten(1) @ vector[n].flatten().double() for n in per_example)


def norms(per_example: dict[str, Tensor]) -> Tensor:
    return torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in per_example.values()))


def vnorm(vector: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum((v.detach().double() ** 2).sum() for v in vector.values())))


def oracle_step(case: Case, model: nn.Module, batch: tuple[Tensor, ...], lr: float, variant: str):
    """Values and error scales of one step, from torch.func per-example gradients and copies.

    ``variant``: ``"first"``, ``"hessian"`` (HVP by double backward on a copy) or
    ``"trapezoid"`` (g_val at θ − η g_B on a copy stepped by hand). Also returns θ_{t+1}.
    """
    B = batch[0].shape[0]
    pe = exact.per_example_gradients(model, lambda f, *rows: case.example_loss(f, *rows, batch_size=B), batch)
    g_B = batch_grad(case, model, batch)
    params, g_val = val_grad(case.val_loss, model, create_graph=variant == "hessian")
    gz = norms(pe)
    values = lr * dots(pe, g_val)
    scale = lr * gz * vnorm(g_val)
    nxt = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in nxt.named_parameters():
            if p.requires_grad:
                p -= lr * g_B[n]
    if variant == "hessian":
        hv = hvp(params, g_val, g_B)
        values = values - 0.5 * lr**2 * dots(pe, hv)
        scale = scale + lr**2 * gz * vnorm(hv)
    elif variant == "trapezoid":
        _, g_next = val_grad(case.val_loss, nxt)
        values = values + 0.5 * lr * dots(pe, {n: g_next[n] - g_val[n].detach() for n in g_next})
        scale = scale + lr * gz * vnorm(g_next)
    return values.detach(), scale.detach(), nxt


def run_and_compare(case: Case, variant: str, steps: int = 2, lr: float = 0.05, **tracker_options) -> None:
    torch.manual_seed(0)
    model = case.make_model().double()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    options = {"order": 1} if variant == "first" else {"order": 2, "second_order": variant}
    tracker = InRunShapley(model, opt, val_loss=case.val_loss, **options, **tracker_options)
    gen = torch.Generator().manual_seed(1)
    expected, scale = {}, {}
    for step in range(steps):
        batch = cast_floats(case.make_batch(gen), torch.float64)
        B = batch[0].shape[0]
        ids = list(range(step * B, (step + 1) * B))
        values, scales, nxt = oracle_step(case, model, batch, lr, variant)
        expected.update(zip(ids, values.tolist()))
        scale.update(zip(ids, scales.tolist()))
        with tracker.step(ids):
            case.batch_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        for (name, p), (_, q) in zip(model.named_parameters(), nxt.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"θ_t+1 of the oracle, {name}")
    got = tracker.values()
    tracker.close()
    for i, ref in expected.items():
        assert abs(got[i] - ref) <= VALUE_RTOL * scale[i], (
            f"{case.name} {variant} id {i}: tracker {got[i]!r} vs oracle {ref!r} (scale {scale[i]:.3e})"
        )


def f64(case: Case) -> Case:
    """The case with a validation loss that feeds float64 inputs."""
    return replace(case, val_loss=_cast_val_loss(case.val_loss, torch.float64))


MODEL_CASES = [
    f64(lm_case("GPT-2 (tied embeddings)", gpt2, vocab=40)),
    f64(lm_case("Llama", llama, vocab=40)),
    f64(classification_case("CNN conv2d + groupnorm", cnn, (3, 8, 8), 5)),
]


@pytest.mark.parametrize("variant", ["hessian", "trapezoid"])
@pytest.mark.parametrize("case", [f64(layer_case(row)) for row in BATCHED_LAYERS], ids=lambda c: c.name)
def test_layer_order2_matches_oracle(case: Case, variant: str) -> None:
    run_and_compare(case, variant)


@pytest.mark.parametrize("variant", ["hessian", "trapezoid"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_order2_matches_oracle(case: Case, variant: str) -> None:
    # The Hessian variant differentiates attention twice: only the math backend can (see the
    # xfail below for the default backend).
    with sdpa_kernel([SDPBackend.MATH]):
        run_and_compare(case, variant)


@pytest.mark.parametrize("route", ["gram", "bookkeeping"])
def test_trapezoid_on_the_gram_and_bookkeeping_routes(route: str) -> None:
    """The trapezoid's second contraction uses the next validation pass's Gram factors; with
    book-keeping, the first part comes from the per-example gradients formed in backward."""
    run_and_compare(MODEL_CASES[0], "trapezoid", **forced_route(route))


@pytest.mark.parametrize("route", ["auto", "gram"])
def test_trapezoid_keeps_linear_per_example_gradients_on_long_sequences(route: str, monkeypatch) -> None:
    """With sequences longer than ``d·p / (d + p)`` each linear map keeps its per-example gradients
    over the step instead of its input and output gradient (the smaller form); the second
    contraction dots them with the weighted ``g_val(θ_t+1)``, also where the layer's first part
    took the Gram route (whose coefficient is applied once, not twice)."""
    from inrun.layers.linear import LinearHandler
    from inrun.layers.registry import PerExampleGradients

    condensed = []
    original = LinearHandler.condense

    def spy(self, module, saved, grad_out):
        out = original(self, module, saved, grad_out)
        condensed.append(isinstance(out, PerExampleGradients))
        return out

    monkeypatch.setattr(LinearHandler, "condense", spy)
    case = f64(lm_case("GPT-2 d=4, 12 positions", lambda: gpt2(n_layer=1, dim=4), vocab=40, seq=12))
    run_and_compare(case, "trapezoid", **({} if route == "auto" else forced_route(route)))
    assert condensed and all(condensed)


def test_hessian_variant_with_default_attention_backend() -> None:
    """The tracker runs its Hessian-vector product under SDPA's math backend by itself."""
    run_and_compare(MODEL_CASES[0], "hessian", steps=1)


# ============================================================================ error orders
def tracker_step_values(case: Case, model: nn.Module, batch: tuple[Tensor, ...], lr: float, variant: str) -> np.ndarray:
    """One step of a fresh copy with the tracker; values by batch row."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    options = {"order": 1} if variant == "first" else {"order": 2, "second_order": variant}
    tracker = InRunShapley(m, opt, val_loss=case.val_loss, **options)
    B = batch[0].shape[0]
    with tracker.step(range(B)):
        case.batch_loss(m, batch).backward()
    opt.step()
    values = tracker.values()
    tracker.close()
    return np.array([values[i] for i in range(B)])


def error_slopes(case: Case, lrs: list[float]) -> dict[str, float]:
    torch.manual_seed(0)
    model = case.make_model().double()
    batch = cast_floats(case.make_batch(torch.Generator().manual_seed(1)), torch.float64)
    B = batch[0].shape[0]
    pe = exact.per_example_gradients(model, lambda f, *rows: case.example_loss(f, *rows, batch_size=B), batch)
    errors: dict[str, list[float]] = {"first": [], "hessian": [], "trapezoid": []}
    for lr in lrs:
        game = exact.StepGame(model, case.val_loss, pe, exact.sgd_update(lr))
        truth = exact.enumerate_shapley(game.utility, B).numpy()
        for variant, errs in errors.items():
            with sdpa_kernel([SDPBackend.MATH]):
                got = tracker_step_values(case, model, batch, lr, variant)
            errs.append(float(np.sqrt(np.mean((got - truth) ** 2))))
    slopes = {v: float(np.polyfit(np.log(lrs), np.log(e), 1)[0]) for v, e in errors.items()}
    logger.info("%s: RMSE vs exact %s, slopes %s", case.name, errors, slopes)
    return slopes


ORDER_CASES = [
    (f64(classification_case(
        "MLP", lambda: nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)),
        (10,), 3, batch=8,
    )), [0.2, 0.1, 0.05]),
    # A freshly initialized GPT-2 is very curved (LayerNorm of 0.02-scale activations): the
    # Taylor regime starts below η ≈ 0.01 here.
    (f64(lm_case("GPT-2", gpt2, vocab=40, batch=6, seq=8)), [0.004, 0.002, 0.001]),
]


@pytest.mark.parametrize(("case", "lrs"), ORDER_CASES, ids=[c.name for c, _ in ORDER_CASES])
def test_error_orders_against_exact_enumeration(case: Case, lrs: list[float]) -> None:
    """RMSE vs exact Shapley shrinks as η² (first order) and η³ (hessian, trapezoid)."""
    slopes = error_slopes(case, lrs)
    assert 1.7 < slopes["first"] < 2.3, slopes
    assert 2.6 < slopes["hessian"] < 3.4, slopes
    assert 2.6 < slopes["trapezoid"] < 3.4, slopes


# ============================================================================ efficiency
@pytest.mark.parametrize("case", [ORDER_CASES[0][0], MODEL_CASES[0]], ids=lambda c: c.name)
def test_hessian_values_add_up_to_the_taylor_utility(case: Case) -> None:
    """Σ_z φ_z = η g_val·g_B − ½ η² g_Bᵀ H g_B, with g_B, g_val and H g_B by plain autograd."""
    torch.manual_seed(0)
    model = case.make_model().double()
    batch = cast_floats(case.make_batch(torch.Generator().manual_seed(1)), torch.float64)
    lr = 0.3
    g_B = batch_grad(case, model, batch)
    params, g_val = val_grad(case.val_loss, model, create_graph=True)
    hv = hvp(params, g_val, g_B)
    with sdpa_kernel([SDPBackend.MATH]):
        values = tracker_step_values(case, model, batch, lr, "hessian")
    linear = lr * sum((g_val[n] * g_B[n]).sum() for n in params).item()
    quadratic = 0.5 * lr**2 * sum((g_B[n] * hv[n]).sum() for n in params).item()
    assert abs(quadratic) > 1e-3 * abs(linear)  # the second-order term matters here
    assert values.sum() == pytest.approx(linear - quadratic, rel=1e-10)


# ============================================================================ last step
def mlp_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)) for _ in range(3)]
    xv, yv = torch.randn(7, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)
    case = Case(
        "mlp", lambda: model, lambda g: batches[0],
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        lambda f, x, y, batch_size: F.cross_entropy(f(x), y, reduction="sum") / batch_size,
        lambda m: F.cross_entropy(m(xv), yv),
    )
    return model, batches, case


@pytest.mark.parametrize("finish", ["values", "flush", "close"])
def test_trapezoid_last_step_is_completed(finish: str) -> None:
    """The last step waits for g_val(θ_T); values()/flush()/close() complete it at θ_T."""
    model, batches, case = mlp_setup()
    lr = 0.4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=case.val_loss, order=2)
    expected = np.zeros(10)
    for step, batch in enumerate(batches[:2]):
        values, _, _ = oracle_step(case, model, batch, lr, "trapezoid")
        expected[5 * step : 5 * step + 5] = values.numpy()
        with tracker.step(range(5 * step, 5 * step + 5)):
            case.batch_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    # Step 0 was completed by step 1's validation pass; step 1 still waits for g_val(θ_2).
    assert set(tracker.ledger.values()) == set(range(5))
    if finish == "values":
        got = tracker.values()
    elif finish == "flush":
        tracker.flush()
        got = tracker.ledger.values()
    else:
        tracker.close()
        got = tracker.ledger.values()
    np.testing.assert_allclose([got[i] for i in range(10)], expected, rtol=1e-10, atol=1e-15)
    if finish != "close":
        again = tracker.values()  # completing twice must not count the step twice
        np.testing.assert_allclose([again[i] for i in range(10)], expected, rtol=1e-10, atol=1e-15)


def test_values_mid_run_then_training_continues() -> None:
    """Reading values() between steps completes the pending step once; later steps stay right."""
    model, batches, case = mlp_setup(1)
    lr = 0.4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=case.val_loss, order=2)
    expected = np.zeros(15)
    for step, batch in enumerate(batches):
        values, _, _ = oracle_step(case, model, batch, lr, "trapezoid")
        expected[5 * step : 5 * step + 5] = values.numpy()
        with tracker.step(range(5 * step, 5 * step + 5)):
            case.batch_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        tracker.values()
    got = tracker.values()
    np.testing.assert_allclose([got[i] for i in range(15)], expected, rtol=1e-10, atol=1e-15)


def test_trapezoid_with_an_input_buffer_refilled_in_place() -> None:
    """A static input buffer (CUDA-graph style loops): the tracker copies user-data inputs it
    reads after the step, so the values stay right."""
    model, batches, case = mlp_setup(2)
    lr = 0.4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=case.val_loss, order=2)
    x_buffer, y_buffer = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])
    expected = np.zeros(10)
    for step, (x, y) in enumerate(batches[:2]):
        values, _, _ = oracle_step(case, model, (x, y), lr, "trapezoid")
        expected[5 * step : 5 * step + 5] = values.numpy()
        x_buffer.copy_(x)
        y_buffer.copy_(y)
        with tracker.step(range(5 * step, 5 * step + 5)):
            case.batch_loss(model, (x_buffer, y_buffer)).backward()
        opt.step()
        opt.zero_grad()
    got = tracker.values()
    np.testing.assert_allclose([got[i] for i in range(10)], expected, rtol=1e-10, atol=1e-15)
