"""``torch.compile``: a compiled model is valued as the eager one, its dots taken inside the graph.

The oracle is the same loop run eagerly (its routes are checked against per-example gradients in
test_oracle.py), on the same model, data and optimizer: in float64 the compiled run's values and
parameters equal it to rounding. Graph counts come from dynamo's counters: after the first
compiled step no block compiles again (a new validation gradient and probe every step are graph
inputs, not guards). Inductor compiles one tiny GPT-2 (tens of seconds on a loaded 2-core
machine, cached by inductor between runs); the other loops use the ``aot_eager`` backend, which
traces the same graph (dynamo, AOT autograd, the taps' backward) without generating code.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from inrun import InRunShapley

VOCAB = 40


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3)).double()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def values_of(tracker: InRunShapley, n: int) -> np.ndarray:
    values = tracker.values()
    return np.array([values[i] for i in range(n)])


def test_compiled_gpt2_equals_the_eager_tracked_run(one_thread) -> None:
    """Tracker first, then ``torch.compile`` (inductor): the first block runs eagerly (the row
    verification replays it), the next ones are valued inside the compiled graph."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (4, 4, 8), generator=gen)
    val = torch.randint(0, VOCAB, (2, 8), generator=gen)

    def run(compiled: bool) -> tuple[InRunShapley, list[int], nn.Module]:
        model = gpt2()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tracker = InRunShapley(model, opt, val_loss=lambda m: lm_loss(m, val))
        train = torch.compile(model) if compiled else model
        counts = []
        for s, x in enumerate(data):
            with tracker.step(list(range(4 * s, 4 * s + 4))):
                lm_loss(train, x).backward()
            opt.step()
            opt.zero_grad()
            counts.append(graphs())
        return tracker, counts, model

    compiled, counts, model_c = run(True)
    eager, _, model_e = run(False)
    assert counts == [0, 1, 1, 1]  # one graph, compiled at the second step; no recompile after it
    assert compiled._engine.hooks.graph.graph_blocks == 3
    assert all(r.startswith("compiled:") for r in compiled.coverage().routes)
    a, b = values_of(compiled, 16), values_of(eager, 16)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    for p, q in zip(model_c.parameters(), model_e.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_compile_first_with_accumulation_clipping_and_changing_batches() -> None:
    """The model compiled before the tracker is made; two micro-batches per step, clipping that
    bites, batch sizes that change: values equal the eager loop's, and the graphs are bounded (one
    more when the batch size first changes, as for untracked compile, none after)."""
    gen = torch.Generator().manual_seed(2)
    sizes = [(4, 4), (4, 4), (3, 2), (2, 5), (4, 3)]
    data = [[(torch.randn(b, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
             for b in step] for step in sizes]
    xv, yv = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)

    def run(compiled: bool) -> tuple[InRunShapley, list[int]]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
        train = torch.compile(model, backend="aot_eager") if compiled else model
        tracker = InRunShapley(train, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv, reduction="none"))
        counts, k = [], 0
        for step in data:
            for x, y in step:
                with tracker.step(list(range(k, k + len(x)))):
                    F.cross_entropy(train(x), y, reduction="sum").backward()
                k += len(x)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            counts.append(graphs())
        with torch.no_grad():
            train(xv)  # the user's own evaluation: one graph without taps
        counts.append(graphs())
        return tracker, counts

    compiled, counts = run(True)
    eager, _ = run(False)
    assert counts == [1, 1, 2, 2, 2, 3]
    n = sum(sum(step) for step in sizes)
    a, b = values_of(compiled, n), values_of(eager, n)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    per_val_a, per_val_b = compiled.per_validation(), eager.per_validation()
    assert per_val_a.ids == per_val_b.ids
    np.testing.assert_allclose(per_val_a.values, per_val_b.values, rtol=1e-10, atol=1e-14)


def test_what_cannot_be_compiled_runs_eagerly_and_says_so(caplog) -> None:
    """AdamW's slope needs the batch's gradient, after the compiled backward: its blocks run
    eagerly (``force_eager``), said once, and the values equal the eager loop's."""
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(3)]
    xv, yv = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)

    def run(compiled: bool) -> InRunShapley:
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train = torch.compile(model, backend="aot_eager") if compiled else model
        tracker = InRunShapley(train, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))
        for s, (x, y) in enumerate(data):
            with tracker.step(list(range(4 * s, 4 * s + 4))):
                F.cross_entropy(train(x), y).backward()
            opt.step()
            opt.zero_grad()
        return tracker

    with caplog.at_level(logging.WARNING, logger="inrun"):
        compiled = run(True)
    said = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert said == ["torch.compile: tracker.step blocks run eagerly (AdamW's values need each layer's inputs "
                    "and output gradients after the backward (the step's slope depends on the batch's gradient))"]
    assert graphs() == 0 and compiled._engine.hooks.graph.graph_blocks == 0
    np.testing.assert_allclose(values_of(compiled, 12), values_of(run(False), 12), rtol=1e-12, atol=1e-15)


def test_a_coupled_loss_runs_eagerly_under_compile() -> None:
    """A declared coupled loss (InfoNCE, in-batch negatives) is valued by a forward-mode replay of
    each call, which a compiled graph does not keep: its blocks run eagerly, with the reason
    recorded, and the values equal the eager loop's."""
    gen = torch.Generator().manual_seed(5)
    data = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    xv, yv = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)

    def info_nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(a @ b.T / 0.5, torch.arange(len(a)))

    def run(compiled: bool) -> InRunShapley:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(xv), yv))
        train = torch.compile(model, backend="aot_eager") if compiled else model
        for s, x in enumerate(data):
            with tracker.step(list(range(4 * s, 4 * s + 4)), coupled_loss=info_nce):
                info_nce(train(x), train(x.flip(1))).backward()
            opt.step()
            opt.zero_grad()
        return tracker

    compiled = run(True)
    graph = compiled._engine.hooks.graph
    assert graph.graph_blocks == 0
    assert [n for r, n in graph.eager_blocks.items() if "a coupled loss (coupled_loss=)" in r] == [3]
    np.testing.assert_allclose(values_of(compiled, 12), values_of(run(False), 12), rtol=1e-12, atol=1e-15)


class Branchy(nn.Module):
    """Calls ``extra`` only when ``use_extra`` is set: a call the eager verification never saw."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra = nn.Linear(6, 6).double(), nn.Linear(6, 3).double()
        self.head = nn.Linear(6, 3).double()
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + self.extra(h) if self.use_extra else self.head(h)


def test_a_graph_call_whose_rows_were_not_proven_refuses_its_step() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=lambda m: F.cross_entropy(m(x), y))
    train = torch.compile(model, backend="aot_eager")
    for step in range(3):
        model.use_extra = step >= 1
        with tracker.step([f"{step}-{i}" for i in range(4)]):
            F.cross_entropy(train(x), y).backward()
        opt.step()
        opt.zero_grad()
    skipped = tracker.ledger.skipped
    assert [s["step"] for s in skipped] == [1]
    assert "the compiled graph called extra with rows not proven on an eager step" in skipped[0]["reason"]
    values = tracker.values()
    assert set(values.keys()) == {f"{s}-{i}" for s in (0, 2) for i in range(4)}  # step 2 ran eagerly
