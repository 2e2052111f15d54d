"""``inrun.exact``: Shapley machinery on games with known values, and the step game against
direct computations (a real optimizer step on a copy, double backward, hand-built updates)."""

from __future__ import annotations

import copy
import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import exact

# Tiny models: one thread is faster and immune to a shared machine's load (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


# float64 throughout; the games below are exact up to rounding of O(2^n) additions.
EXACT_RTOL = 1e-12


def random_game(n: int, seed: int) -> torch.Tensor:
    """A table of 2^n arbitrary utilities with U(∅) = 0."""
    table = torch.randn(2**n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table[0] = 0.0
    return table


def table_utility(table: torch.Tensor):
    bits = 2 ** torch.arange(int(math.log2(table.shape[0])))

    def utility(masks: torch.Tensor) -> torch.Tensor:
        return table[(masks.long() * bits).sum(dim=1)]

    return utility


def brute_force_shapley(table: torch.Tensor) -> torch.Tensor:
    """Definition by permutations (n! orderings), independent of the weighted-subset formula."""
    n = int(math.log2(table.shape[0]))
    phi = torch.zeros(n, dtype=torch.float64)
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        s = 0
        for i in perm:
            phi[i] += table[s | (1 << i)] - table[s]
            s |= 1 << i
    return phi / len(perms)


# ----------------------------------------------------------------------------- known games
def test_enumeration_equals_the_permutation_definition() -> None:
    table = random_game(5, seed=0)
    torch.testing.assert_close(exact.shapley_from_table(table), brute_force_shapley(table), rtol=EXACT_RTOL, atol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_additive_game(n: int) -> None:
    a = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    phi = exact.enumerate_shapley(lambda m: m.double() @ a, n)
    torch.testing.assert_close(phi, a, rtol=EXACT_RTOL, atol=1e-14)


def test_quadratic_game_closed_form() -> None:
    """U(S) = a·X_S + ½ X_Sᵀ H X_S with X_S = Σ_{z∈S} x_z: φ_z = a·x_z + ½ x_zᵀ H Σ_B x."""
    gen = torch.Generator().manual_seed(3)
    n, d = 8, 5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    R = torch.randn(d, d, generator=gen, dtype=torch.float64)
    H = R + R.T

    def utility(masks: torch.Tensor) -> torch.Tensor:
        X = masks.double() @ x  # (S, d)
        return X @ a + 0.5 * ((X @ H) * X).sum(dim=1)

    expected = x @ a + 0.5 * x @ H @ x.sum(dim=0)
    torch.testing.assert_close(exact.enumerate_shapley(utility, n), expected, rtol=EXACT_RTOL, atol=1e-13)


def test_quadratic_game_class_matches_enumeration() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(7, generator=gen, dtype=torch.float64)
    R = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    game = exact.QuadraticGame(a=a, M=R + R.T)
    torch.testing.assert_close(game.shapley(), exact.enumerate_shapley(game.utility, 7), rtol=EXACT_RTOL, atol=1e-13)


def test_efficiency_symmetry_null_player() -> None:
    n = 7
    table = random_game(n, seed=1)
    masks = exact.all_subsets(n)
    # Make players 0 and 1 interchangeable, and player 6 a null player.
    swapped = masks.clone()
    swapped[:, [0, 1]] = masks[:, [1, 0]]
    index = (swapped.long() * 2 ** torch.arange(n)).sum(dim=1)
    table = (table + table[index]) / 2
    without6 = (masks[:, :6].long() * 2 ** torch.arange(6)).sum(dim=1)
    table = table[without6]
    phi = exact.shapley_from_table(table)
    assert phi.sum().item() == pytest.approx(table[-1].item(), rel=EXACT_RTOL)
    assert phi[0].item() == pytest.approx(phi[1].item(), rel=EXACT_RTOL)
    assert abs(phi[6].item()) < 1e-15
    assert abs(phi[0] - phi[2]).item() > 1e-3  # the symmetry is not trivial


def test_subsets_are_read_in_bit_order() -> None:
    masks = exact.all_subsets(3)
    assert masks.shape == (8, 3)
    assert masks[5].tolist() == [True, False, True]  # 5 = 0b101: players 0 and 2


def test_enumeration_refuses_too_many_players() -> None:
    with pytest.raises(ValueError, match="monte_carlo_shapley"):
        exact.enumerate_shapley(lambda m: m.double().sum(1), exact.MAX_ENUMERATION + 1)


# ----------------------------------------------------------------------------- Monte Carlo
def test_monte_carlo_converges_to_enumeration() -> None:
    n = 8
    table = random_game(n, seed=2)
    truth = exact.shapley_from_table(table)
    small = exact.monte_carlo_shapley(table_utility(table), n, 200, seed=0)
    large = exact.monte_carlo_shapley(table_utility(table), n, 3200, seed=0)
    assert (small.values - truth).abs().le(4 * small.stderr).all()
    assert (large.values - truth).abs().le(4 * large.stderr).all()
    # The standard error shrinks as 1/sqrt(permutations): 16x more -> about 4x smaller.
    ratio = (small.stderr / large.stderr).median().item()
    assert 3.0 < ratio < 5.3
    # Every permutation's marginals telescope to U(B) - U(∅): efficiency holds exactly.
    assert large.values.sum().item() == pytest.approx(table[-1].item(), rel=1e-12)
    assert large.evaluations == 3200 * n + 1


def test_monte_carlo_is_seeded_and_exact_on_additive_games() -> None:
    a = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = exact.monte_carlo_shapley(lambda m: m.double() @ a, 10, 50, seed=7)
    torch.testing.assert_close(first.values, a, rtol=1e-12, atol=1e-14)
    assert first.stderr.max().item() < 1e-14
    table = random_game(5, seed=3)
    r1 = exact.monte_carlo_shapley(table_utility(table), 5, 30, seed=11)
    r2 = exact.monte_carlo_shapley(table_utility(table), 5, 30, seed=11, chunk=7)
    torch.testing.assert_close(r1.values, r2.values, rtol=1e-14, atol=0)


def test_antithetic_pairs_are_exact_on_quadratic_games_and_cover_the_others() -> None:
    """A pair (a permutation and its reverse) gives each player every other as predecessor once:
    for a game with at most pairwise interactions its mean marginal is the Shapley value."""
    gen = torch.Generator().manual_seed(0)
    n = 9
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    B = torch.randn(n, n, generator=gen, dtype=torch.float64)
    C = torch.randn(n, n, n, generator=gen, dtype=torch.float64) * 0.3

    def quadratic(m):
        x = m.double()
        return x @ a + 0.5 * ((x @ (B + B.T)) * x).sum(1)

    def cubic(m):
        x = m.double()
        return quadratic(m) + torch.einsum("si,sj,sk,ijk->s", x, x, x, C)

    truth = exact.enumerate_shapley(quadratic, n)
    pairs = exact.monte_carlo_shapley(quadratic, n, 8, seed=1, antithetic=True)
    torch.testing.assert_close(pairs.values, truth, rtol=1e-12, atol=1e-12)
    assert pairs.stderr.max().item() < 1e-12 and pairs.method == "monte_carlo_antithetic"
    truth = exact.enumerate_shapley(cubic, n)
    pairs = exact.monte_carlo_shapley(cubic, n, 200, seed=2, antithetic=True)
    plain = exact.monte_carlo_shapley(cubic, n, 200, seed=2)
    assert (pairs.values - truth).abs().le(4 * pairs.stderr).all()
    assert pairs.stderr.mean() < 0.5 * plain.stderr.mean()  # the quadratic part costs no variance
    assert pairs.values.sum().item() == pytest.approx(truth.sum().item(), rel=1e-12)
    assert pairs.evaluations == 200 * n + 1
    with pytest.raises(ValueError, match="even number"):
        exact.monte_carlo_shapley(cubic, n, 7, antithetic=True)


# ----------------------------------------------------------------------------- the step game
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(seed: int = 0, n: int = 7):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)
    xv, yv = torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen)
    return x, y, lambda m: F.cross_entropy(m(xv), yv)


def share_of(n: int):
    return lambda f, xr, yr: F.cross_entropy(f(xr), yr, reduction="sum") / n


def val_after(model: nn.Module, val_loss, params: dict[str, torch.Tensor]) -> float:
    """The validation loss of a copy whose parameters are overwritten (no functional_call)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(params[name])
    other.eval()
    return val_loss(other).item()


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_step_game_full_batch_equals_a_real_optimizer_step(chunk_size) -> None:
    """U(B) with per-group learning rates = L_val before − after a real torch.optim.SGD step."""
    torch.manual_seed(0)
    model = mlp()
    x, y, val_loss = data()
    opt = torch.optim.SGD([
        {"params": model[0].parameters(), "lr": 0.7},
        {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.2},
    ])
    lrs = exact.learning_rates(model, opt)
    game = exact.StepGame.from_batch(model, share_of(7), (x, y), val_loss, lrs, chunk_size=chunk_size)
    got = game.utility(torch.ones(1, 7, dtype=torch.bool)).item()

    stepped = copy.deepcopy(model)
    opt2 = torch.optim.SGD([
        {"params": stepped[0].parameters(), "lr": 0.7},
        {"params": list(stepped[2].parameters()) + list(stepped[4].parameters()), "lr": 0.2},
    ])
    F.cross_entropy(stepped(x), y).backward()
    opt2.step()
    stepped.eval()
    model.eval()
    expected = val_loss(model).item() - val_loss(stepped).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert game.utility(torch.zeros(1, 7, dtype=torch.bool)).abs().item() < 1e-15


def test_step_game_subsets_and_vectorized_path_agree() -> None:
    torch.manual_seed(1)
    model = mlp()
    x, y, val_loss = data(1)
    pe = exact.per_example_gradients(model, share_of(7), (x, y))
    loop = exact.StepGame(model, val_loss, pe, exact.sgd_update(0.3), chunk_size=None)
    batched = exact.StepGame(model, val_loss, pe, exact.sgd_update(0.3), chunk_size=5)
    masks = exact.all_subsets(7)[::9]
    expected = torch.tensor([
        loop.base_loss - val_after(model, val_loss, {
            n: p.detach() - 0.3 * pe[n][m].sum(0) for n, p in model.named_parameters()
        })
        for m in masks
    ], dtype=torch.float64)
    torch.testing.assert_close(loop.utility(masks), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(batched.utility(masks), expected, rtol=1e-12, atol=1e-15)


def test_pluggable_update_is_applied_to_the_summed_gradient() -> None:
    """A nonlinear elementwise rule Δ_j(S) = f_j(Σ_S g_zj), e.g. a fixed-state Adam-like step."""
    torch.manual_seed(2)
    model = mlp()
    x, y, val_loss = data(2)
    pe = exact.per_example_gradients(model, share_of(7), (x, y))
    gen = torch.Generator().manual_seed(0)
    scale = {n: torch.rand(g.shape[1:], generator=gen, dtype=torch.float64) * 0.01 + 0.005 for n, g in pe.items()}

    def update(summed):
        return {n: -0.05 * torch.tanh(g / scale[n]) for n, g in summed.items()}

    game = exact.StepGame(model, val_loss, pe, update)
    masks = exact.all_subsets(7)[[3, 40, 127]]
    expected = [
        game.base_loss - val_after(model, val_loss, {
            n: p.detach() - 0.05 * torch.tanh(pe[n][m].sum(0) / scale[n]) for n, p in model.named_parameters()
        })
        for m in masks
    ]
    torch.testing.assert_close(game.utility(masks), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_frozen_parameters_are_not_moved() -> None:
    torch.manual_seed(3)
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y, val_loss = data(3)
    game = exact.StepGame.from_batch(model, share_of(7), (x, y), val_loss, 0.4)
    after = game.parameters_after(torch.ones(7, dtype=torch.bool))
    assert "0.weight" not in after
    stepped = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in stepped.parameters() if p.requires_grad], lr=0.4)
    F.cross_entropy(stepped(x), y).backward()
    opt.step()
    for name, p in stepped.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(after[name], p.detach(), rtol=1e-13, atol=1e-15)


def test_exactly_one_of_lr_and_update() -> None:
    model = mlp()
    x, y, val_loss = data()
    with pytest.raises(ValueError, match="exactly one"):
        exact.exact_step_values(model, share_of(7), (x, y), val_loss)
    with pytest.raises(ValueError, match="exactly one"):
        exact.exact_step_values(model, share_of(7), (x, y), val_loss, 0.1, update=exact.sgd_update(0.1))


def test_learning_rates_refuses_a_parameter_outside_the_optimizer() -> None:
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="2.weight"):
        exact.learning_rates(model, opt)


# ----------------------------------------------------------------------------- second order
def double_backward_hvp(model: nn.Module, val_loss, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model).eval()
    params = dict(ref.named_parameters())
    g = torch.autograd.grad(val_loss(ref), list(params.values()), create_graph=True)
    hv = torch.autograd.grad(g, list(params.values()), grad_outputs=[vector[n] for n in params])
    return dict(zip(params, hv))


def test_hessian_vector_products_match_double_backward() -> None:
    torch.manual_seed(4)
    model = mlp()
    _, _, val_loss = data(4)
    gen = torch.Generator().manual_seed(0)
    vectors = {n: torch.randn(2, *p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    got = exact.hessian_vector_products(model, val_loss, vectors)
    for k in range(2):
        ref = double_backward_hvp(model, val_loss, {n: v[k] for n, v in vectors.items()})
        for n in ref:
            torch.testing.assert_close(got[n][k], ref[n], rtol=1e-11, atol=1e-13)


def test_taylor_game_is_the_second_order_expansion_and_efficient() -> None:
    """U₂ from double backward by hand; closed form = enumeration; Σφ = U₂(B); U − U₂ = O(η³)."""
    torch.manual_seed(5)
    model = mlp()
    x, y, val_loss = data(5)
    pe = exact.per_example_gradients(model, share_of(7), (x, y))
    lr = {n: (0.3 if n.startswith("0.") else 0.1) for n in pe}
    game = exact.taylor_game(model, val_loss, pe, lr)

    u_B = {n: lr[n] * pe[n].sum(0) for n in pe}
    g_val = exact.validation_gradient(model, val_loss)
    hu = double_backward_hvp(model, val_loss, u_B)
    u2_full = sum((g_val[n] * u_B[n]).sum() for n in pe) - 0.5 * sum((u_B[n] * hu[n]).sum() for n in pe)
    full = torch.ones(1, 7, dtype=torch.bool)
    assert game.utility(full).item() == pytest.approx(u2_full.item(), rel=1e-11)

    phi = game.shapley()
    torch.testing.assert_close(phi, exact.enumerate_shapley(game.utility, 7), rtol=1e-11, atol=1e-15)
    assert phi.sum().item() == pytest.approx(u2_full.item(), rel=1e-11)

    errors = []
    for t in (1.0, 0.5, 0.25):
        scaled = exact.taylor_game(model, val_loss, pe, {n: t * v for n, v in lr.items()})
        step = exact.StepGame(model, val_loss, pe, exact.sgd_update({n: t * v for n, v in lr.items()}))
        errors.append(abs(step.utility(full).item() - scaled.utility(full).item()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(2.6 < s < 3.4 for s in slopes), slopes


# ----------------------------------------------------------------------------- audit
def test_exact_step_values_enumerates_small_batches_and_samples_large_ones() -> None:
    torch.manual_seed(6)
    model = mlp()
    x, y, val_loss = data(6, n=14)
    small = exact.exact_step_values(model, share_of(6), (x[:6], y[:6]), val_loss, 0.5)
    assert small.method == "enumeration" and small.evaluations == 64
    assert small.values.sum().item() == pytest.approx(small.total, rel=1e-12)
    pe = exact.per_example_gradients(model, share_of(6), (x[:6], y[:6]))
    reference = exact.enumerate_shapley(exact.StepGame(model, val_loss, pe, exact.sgd_update(0.5), chunk_size=None).utility, 6)
    torch.testing.assert_close(small.values, reference, rtol=1e-12, atol=1e-15)

    large = exact.exact_step_values(model, share_of(14), (x, y), val_loss, 0.5, max_exact=12, permutations=60, seed=3)
    assert large.method == "monte_carlo" and large.permutations == 60
    assert large.values.shape == (14,) and (large.stderr > 0).all()
    assert large.values.sum().item() == pytest.approx(large.total, rel=1e-10)


def test_model_is_left_untouched() -> None:
    torch.manual_seed(7)
    model = mlp().train()
    before = copy.deepcopy(model.state_dict())
    x, y, val_loss = data(7)
    exact.exact_step_values(model, share_of(7), (x, y), val_loss, 0.5)
    assert model.training and all(m.training for m in model.modules())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name])


def test_docstring_examples_run() -> None:
    result = doctest.testmod(exact, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
