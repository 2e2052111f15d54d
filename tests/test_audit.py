"""The run's audit: its exact values equal ``inrun.exact`` on the same step (per-example gradients by
torch.func, the real optimizer step), its tracker side equals the ledger when the players are the
batch, it warns at a learning rate docs/fidelity.md shows poor and not at a faithful one, it
leaves training bit-identical, and it survives a checkpoint and resume."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import AuditConfig, InRunShapley, exact
from inrun.store.auditlog import load_audit, save_audit
from inrun.tracking.audit.config import AuditError
from inrun.tracking.audit.game import fidelity

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIT_LOGGER = "inrun.tracking.audit.step"


def digits(n_train: int = 400, n_val: int = 100, dtype: torch.dtype = torch.float64):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=dtype)
    y = torch.tensor(y)
    return X[:n_train], y[:n_train], X[1500 : 1500 + n_val], y[1500 : 1500 + n_val]


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def make_optimizer(kind: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def train_mlp(kind: str, lr: float, steps: int, batch: int = 10, clip: float | None = None,
              audit: dict | None = None, before_step=None, **options):
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = make_optimizer(kind, model, lr)
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv), audit=audit, **options)
    for s in range(steps):
        rows = list(range(s * batch, (s + 1) * batch))
        with tracker.step(rows):
            F.cross_entropy(model(xt[rows]), yt[rows]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if before_step is not None:
            before_step(s, model, opt, rows)
        opt.step()
        opt.zero_grad()
    tracker.flush()
    return model, tracker


def saved_step(model: nn.Module, opt: torch.optim.Optimizer, kind: str, lr: float):
    """A copy of the model at θ_t and of the optimizer with its state before the step."""
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(kind, twin, lr)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind, lr, clip", [("sgd", 1.0, None), ("momentum", 0.3, 0.5), ("adamw", 0.01, 0.5)])
@pytest.mark.parametrize("players", [8, 4])
def test_exact_values_equal_inrun_exact_on_the_same_step(kind, lr, clip, players) -> None:
    """The audit's exact values are those of ``inrun.exact`` for the same players, computed
    independently (torch.func per-example gradients, the real optimizer step with the clip
    factor) on a copy of the model and optimizer saved just before the step."""
    xt, yt, xv, yv = digits()
    saved = {}

    def keep(s, model, opt, rows):
        if s in (0, 3):
            grads = [p.grad.clone() for p in model.parameters()]
            saved[s] = (saved_step(model, opt, kind, lr), rows, grads)

    _, tracker = train_mlp(kind, lr, steps=4, batch=8, clip=clip, before_step=keep,
                           audit={"every": 3, "at": [0], "players": players})
    audited = [r for r in tracker.audit.steps if r["status"] == "ok"]
    assert [r["step"] for r in audited] == [0, 3]
    for step, ((twin, twin_opt), rows, clipped) in saved.items():
        got = [v for v in tracker.audit.values if v["step"] == step]
        ids = [v["id"] for v in got]
        assert len(ids) == players and set(ids) <= set(rows)
        B = len(rows)

        def share(f, x, y, B=B):
            return F.cross_entropy(f(x), y) / B

        per_example = exact.per_example_gradients(twin, share, (xt[ids], yt[ids]))
        # the clip factor as the step saw it: the clipped gradient over the batch's own
        full = exact.per_example_gradients(twin, share, (xt[rows], yt[rows]))
        factor = {n: float(c.norm() / full[n].sum(0).norm()) for (n, _), c in zip(twin.named_parameters(), clipped)}
        update = exact.optimizer_update(twin, twin_opt, grad_factor=factor)
        game = exact.StepGame(twin, lambda m: F.cross_entropy(m(xv), yv), per_example, update)
        want = exact.enumerate_shapley(game.utility, players).numpy()
        np.testing.assert_allclose([v["exact"] for v in got], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("kind, lr", [("sgd", 1.0), ("adamw", 0.05)])
def test_the_full_game_by_monte_carlo_agrees_with_its_enumeration_within_its_error(kind, lr) -> None:
    """The default audit's players are the whole batch (10): enumerated (2^10 subsets) up to
    max_exact, else antithetic Monte Carlo, whose error bars cover the enumeration; both games'
    totals are the step's U_t(B) of its drop row."""
    _, mc = train_mlp(kind, lr, steps=2, audit={"every": 0, "at": [1], "max_exact": 4, "permutations": 64})
    _, en = train_mlp(kind, lr, steps=2, audit={"every": 0, "at": [1]})
    (row,), (enum_row,) = mc.audit.steps, en.audit.steps
    assert row["method"] == "monte_carlo_antithetic" and row["evaluations"] == 64 * 10 + 1
    assert enum_row["method"] == "enumeration" and row["game"] == enum_row["game"] == "full"
    assert row["players"] == row["batch"] == 10
    a, b = mc.audit.values, en.audit.values
    assert [v["id"] for v in a] == [v["id"] for v in b] == list(range(10, 20))
    err = np.array([v["stderr"] for v in a])
    diff = np.array([v["exact"] - w["exact"] for v, w in zip(a, b)])
    assert (err > 0).all() and (np.abs(diff) < 4 * err).all()
    assert np.sqrt(np.mean((diff / err) ** 2)) < 2  # the error bars are not loose either
    # efficiency holds exactly for Monte Carlo too, and the full game's total is the step's U_t(B)
    drop = mc.drops()[1]
    assert math.isclose(row["utility"], enum_row["utility"], rel_tol=1e-9)
    assert math.isclose(row["utility"], drop["utility"], rel_tol=1e-9)
    assert row["step_utility"] == drop["utility"] and row["data_free"] == drop["data_free"]


# ----------------------------------------------------------------------------- the tracker's side
RULES = [
    ("sgd", 1.0, {"order": 1}),
    ("sgd", 1.0, {"order": 2}),
    ("sgd", 1.0, {"order": 2, "second_order": "hessian"}),
    ("momentum", 0.3, {"order": 1}),
    ("momentum", 0.3, {"order": 2}),
    ("adamw", 0.01, {"order": 1}),
    ("adamw", 0.01, {"order": 1, "adam": "fixed_state"}),
    ("adamw", 0.01, {"order": 2}),
    ("adamw", 0.01, {"order": 1, "proxy": "sgd"}),
]


@pytest.mark.parametrize("kind, lr, options", RULES)
def test_tracker_side_is_the_ledger_when_the_players_are_the_batch(kind, lr, options) -> None:
    """With every example of the batch a player, the audit's tracker-side values (the value rule
    recomputed from the replayed exact gradients) are the ledger's values of the step: an
    independent check of the per-layer routes, for every rule and order."""
    _, tracker = train_mlp(kind, lr, steps=3, batch=6, clip=0.5, audit={"every": 1, "at": [0], "players": 6}, **options)
    values = tracker.audit.values
    assert len(values) == 18
    tracker_side = np.array([v["tracker"] for v in values])
    ledger = np.array([v["ledger"] for v in values])
    np.testing.assert_allclose(tracker_side, ledger, rtol=1e-8, atol=1e-12 * np.abs(ledger).max())


def test_order_one_scalar_values_equal_the_ledger_for_any_players() -> None:
    _, tracker = train_mlp("sgd", 0.5, steps=2, audit={"every": 1, "at": [0], "players": 3})
    got = np.array([[v["tracker"], v["ledger"]] for v in tracker.audit.values])
    np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-9)


# ----------------------------------------------------------------------------- the warning
def test_a_learning_rate_that_fidelity_md_shows_poor_warns_once_with_the_numbers(caplog) -> None:
    """docs/fidelity.md, MLP on digits: first-order values at η = 1 correlate 0.22 with the exact
    ones (pooled); at η = 0.01, 0.9999."""
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        _, tracker = train_mlp("sgd", 1.0, steps=12, audit={"every": 2, "at": [0]})
    warnings = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(warnings) == 1, warnings
    flagged = [r for r in tracker.audit.steps if r["flagged"]]
    first = flagged[0]
    assert f"against the exact Shapley values of step {first['step']}'s game (relative RMSE {first['rel_rmse']:.2f}, " \
           f"Pearson {first['pearson']:.2f}" in warnings[0]
    assert "use order=2 or a smaller learning rate" in warnings[0]
    assert first["rel_rmse"] > 0.3 and first["game"] == "full"
    assert tracker.audit.summary()["flagged_steps"] == [r["step"] for r in flagged]


def test_a_faithful_learning_rate_does_not_warn(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        _, tracker = train_mlp("sgd", 0.01, steps=12, audit={"every": 2, "at": [0]})
    assert not [r for r in caplog.records if r.name == AUDIT_LOGGER]
    rows = tracker.audit.steps
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10] and all(r["status"] == "ok" and not r["flagged"] for r in rows)
    assert min(r["pearson"] for r in rows) > 0.999 and max(r["rel_rmse"] for r in rows) < 0.05


def test_order_two_at_the_poor_learning_rate_is_faithful_where_order_one_is_not() -> None:
    _, one = train_mlp("sgd", 1.0, steps=12, audit={"every": 2, "at": [0], "players": 8})
    _, two = train_mlp("sgd", 1.0, steps=12, audit={"every": 2, "at": [0], "players": 8}, order=2)
    assert one.audit.summary()["median_rel_rmse"] > 3 * two.audit.summary()["median_rel_rmse"]


# ----------------------------------------------------------------------------- training unchanged
def tiny_gpt2_with_dropout() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg).train()


def train_gpt2(audit: dict | None, order: int, steps: int = 4):
    model = tiny_gpt2_with_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(1, 40, (steps * 6, 12), generator=gen)
    val = torch.randint(1, 40, (3, 12), generator=gen)
    tracker = InRunShapley(model, opt, val_loss=lambda m: m(input_ids=val, labels=val).loss, order=order, audit=audit)
    torch.manual_seed(5)
    for s in range(steps):
        for half in (0, 1):  # two micro-batches per optimizer step
            rows = list(range(s * 6 + 3 * half, s * 6 + 3 * half + 3))
            with tracker.step(rows):
                (model(input_ids=data[rows], labels=data[rows]).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    values = tracker.values()
    return model, values, torch.get_rng_state(), tracker


@pytest.mark.parametrize("order", [1, 2])
def test_the_audit_leaves_training_and_values_bit_identical(order) -> None:
    """Dropout, two micro-batches per step, clipping, AdamW: parameters, random-number state and
    the ledger's values are bit for bit those of the run without the audit."""
    plain, v_plain, rng_plain, _ = train_gpt2(None, order)
    audited, v_audit, rng_audit, tracker = train_gpt2({"every": 1, "at": [0], "players": 4}, order)
    for (name, a), b in zip(plain.state_dict().items(), audited.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(rng_plain, rng_audit)
    assert list(v_plain) == list(v_audit)
    np.testing.assert_array_equal(v_plain.value, v_audit.value)
    rows = tracker.audit.steps
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["batch"] == 6 for r in rows)
    # players come from both micro-batches of a step
    ids = {v["id"] for v in tracker.audit.values}
    assert any(i % 6 < 3 for i in ids) and any(i % 6 >= 3 for i in ids)


# ----------------------------------------------------------------------------- resume and storage
def test_the_audit_survives_a_checkpoint_and_resume(tmp_path) -> None:
    def run(stop: int | None, state=None, ledger=None):
        xt, yt, xv, yv = digits()
        model = mlp()
        opt = make_optimizer("momentum", model, 0.3)
        tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv), order=2,
                               audit={"every": 2, "players": 5})
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            tracker.load_state_dict(state["tracker"], ledger)
            start = tracker.step_count
        for s in range(start, 8 if stop is None else stop):
            rows = list(range(s * 10, s * 10 + 10))
            with tracker.step(rows):
                F.cross_entropy(model(xt[rows]), yt[rows]).backward()
            opt.step()
            opt.zero_grad()
        return model, opt, tracker

    _, _, whole = run(None)
    model, opt, half = run(5)
    state = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "tracker": half.state_dict()}
    half.ledger.save(tmp_path / "ledger")
    torch.save(state, tmp_path / "state.pt")
    from inrun import ValueLedger

    _, _, resumed = run(None, torch.load(tmp_path / "state.pt", weights_only=True), ValueLedger.load(tmp_path / "ledger"))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]

    assert [r["step"] for r in whole.audit.steps] == [2, 4, 6]
    assert strip(resumed.audit.steps) == strip(whole.audit.steps)
    assert resumed.audit.values == whole.audit.values
    save_audit(tmp_path, resumed.audit)
    log = load_audit(tmp_path)
    assert strip(log.steps) == strip(whole.audit.steps) and log.values == whole.audit.values
    assert log.config == resumed.audit.config
    steps, values = log.frames()
    assert list(steps["step"]) == [2, 4, 6] and len(values) == 15


def test_a_library_run_directory_carries_the_audit(tmp_path) -> None:
    """``tracker.save_run`` (a RunWriter): the audit's files are written and listed in the
    manifest, read back verified, and the report shows the fidelity panel."""
    from inrun.cli import main
    from inrun.store.rundir import RunDir

    _, tracker = train_mlp("sgd", 0.01, steps=6, audit={"every": 2, "players": 4})
    rd = tracker.save_run(tmp_path / "run")
    log = rd.audit()
    assert log is not None and [r["step"] for r in log.steps] == [2, 4]
    assert log.values == tracker.audit.values
    assert rd.verify() == []
    assert main(["report", str(rd.path)]) == 0
    assert 'id="plot-fidelity"' in (rd.path / "report.html").read_text()
    _, plain = train_mlp("sgd", 0.01, steps=2)
    assert RunDir(plain.save_run(tmp_path / "plain").path).audit() is None


def test_an_audit_that_cannot_be_exact_is_refused_and_training_goes_on(caplog) -> None:
    """Per-example gradients are taken from the model's outputs. A penalty on the parameters added
    to the loss (which the tracker's own check refuses; here it is off) does not pass through
    them: the players' gradients would miss it, so the audit refuses the step, says why once, and
    training goes on."""
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv), check=False, audit={"every": 1})
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        for s in range(3):
            rows = list(range(s * 10, s * 10 + 10))
            with tracker.step(rows):
                penalty = sum((p**2).sum() for p in model.parameters())
                (F.cross_entropy(model(xt[rows]), yt[rows]) + 1e-3 * penalty).backward()
            opt.step()
            opt.zero_grad()
    rows = tracker.audit.steps
    assert [r["status"] for r in rows] == ["refused", "refused"] and not tracker.audit.values
    assert "do not add up" in rows[0]["reason"] and "penalty" in rows[0]["reason"]
    assert len([r for r in caplog.records if r.name == AUDIT_LOGGER]) == 1  # told once
    assert len(tracker.values()) == 30


def test_settings_are_validated_with_the_field_named() -> None:
    with pytest.raises(AuditError, match="audit.players=1"):
        AuditConfig(players=1)
    with pytest.raises(AuditError, match="did you mean 'players'"):
        AuditConfig.of({"player": 4})
    with pytest.raises(AuditError, match="audit.max_exact=30"):
        AuditConfig(max_exact=30)
    assert AuditConfig.of(None) is None and AuditConfig.of(True) == AuditConfig()
    cfg = AuditConfig(every=10, at=(3, 0, 3))
    assert cfg.at == (0, 3) and [s for s in range(25) if cfg.due(s)] == [0, 3, 10, 20]
    assert cfg.evaluations(8) == 2**8 and cfg.evaluations(16) == 16 * 16 + 1
    assert AuditConfig(players=6).evaluations(16) == 2**6


def test_fidelity_numbers_against_hand_computations() -> None:
    e = np.array([1.0, 2.0, 3.0, 4.0])
    a = np.array([1.0, 2.5, 2.5, 5.0])
    f = fidelity(e, a)
    assert math.isclose(f["pearson"], np.corrcoef(e, a)[0, 1])
    assert math.isclose(f["spearman"], np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
    assert math.isclose(f["rel_rmse"], math.sqrt((0.25 + 0.25 + 1) / 4) / math.sqrt(30 / 4))
    assert math.isclose(f["efficiency_gap"], 1.0 / 10)
