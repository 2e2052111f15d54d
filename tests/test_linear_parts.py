"""Modules valued by their linear parts (inrun.layers.parts), not by the fallback or a re-run:

* ``nn.MultiheadAttention`` (packed in-projection, out-projection): every route against the
  torch.func oracle in float64, the routes really taken, the validation pass in eval mode, and
  training bit for bit as without the tracker. The layer rows themselves (self-attention, no bias
  with attention weights, query != key) are in layer_table.LAYERS and so in test_oracle.py and
  test_second_order.py;
* transformers' mixture-of-experts layers run by ``grouped_mm``: each expert's rows contracted
  where the grouped matmul ran, on the route asked for, against the per-example oracle (float32:
  grouped matmul has no float64 kernel).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import compare_with_oracle, forced_route
from layer_table import LAYERS, layer_case
from torch import nn

from inrun import InRunShapley

ATTENTION = [layer_case(row) for row in LAYERS if row.handler == "multihead_attention"]

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyEncoderLM(nn.Module):
    """Embedding -> ``nn.TransformerEncoder`` (causal) -> head: inrun bench's workload T, tiny."""

    def __init__(self, vocab: int = 13, dim: int = 8, batch_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=batch_first)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.batch_first = batch_first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=self.head.weight.dtype)
        x = self.emb(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.body(x, mask=mask, is_causal=True)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("route", ["vector", "gram"])
@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_forced_routes_match_oracle(case, route: str) -> None:
    compare_with_oracle(case, torch.float64, **forced_route(route))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("route", ["vector", "gram"])
def test_encoder_parts_take_the_linear_routes(route: str, batch_first: bool) -> None:
    """Every attention parameter is valued by its part (in the module it belongs to, not at a site)
    on the route asked for: on the Gram route the validation pass, in eval mode, saw the parts'
    calls (no fused fast path skipped them); the values equal the oracle's."""
    torch.manual_seed(0)
    model = TinyEncoderLM(batch_first=batch_first).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(3))
    tracker = InRunShapley(model, opt, val_loss=lambda m: lm_loss(m, val), route=route)
    ids = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(4))
    with tracker.step([0, 1, 2]):
        lm_loss(model, ids).backward()
    opt.step()
    coverage = tracker.coverage()
    expected = "gram" if route == "gram" else "vector:linear_part"
    attention = {n for n, _, _ in coverage.per_parameter() if "self_attn" in n}
    assert attention and attention <= set(coverage.routes[expected]) | {
        n for n in attention if n.endswith("bias")  # biases take the vector route on both
    }
    assert not any("(site)" in m for _, _, m in coverage.per_parameter())
    assert "fallback" not in coverage.routes
    tracker.close()


def test_training_is_bit_identical_with_attention_parts() -> None:
    """The parts' taps run torch's own attention code: the tracked model trains to the same bits."""
    torch.manual_seed(0)
    plain = TinyEncoderLM()
    tracked = copy.deepcopy(plain)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, tracked)]
    val = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(3))
    tracker = InRunShapley(tracked, opts[1], val_loss=lambda m: lm_loss(m, val))
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        ids = torch.randint(0, 13, (4, 6), generator=gen)
        lm_loss(plain, ids).backward()
        with tracker.step(list(range(4 * step, 4 * step + 4))):
            lm_loss(tracked, ids).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        assert torch.equal(a, b), name
    assert len(tracker.values()) == 12
    tracker.close()


@pytest.mark.parametrize("route", ["vector", "gram"])
def test_grouped_experts_are_valued_by_their_parts(route: str) -> None:
    import dataclasses

    import zoo

    case = next(c for c in zoo.ZOO if c.name == "mixtral")
    assert zoo.run_case(dataclasses.replace(case, tracker_options={"route": route})) <= case.tol
    torch.manual_seed(0)
    model = case.build().to(case.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = case.make_batch(torch.Generator().manual_seed(7), 2)
    tracker = InRunShapley(model, opt, val_loss=lambda m: zoo.training_loss(case, m, val), route=route)
    batch = case.make_batch(torch.Generator().manual_seed(1), 3)
    with tracker.step([0, 1, 2]):
        zoo.training_loss(case, model, batch).backward()
    opt.step()
    coverage = tracker.coverage()
    experts = {n for n, _, _ in coverage.per_parameter() if ".experts." in n}
    assert experts and experts <= set(coverage.routes["gram" if route == "gram" else "vector:expert_part"])
    assert not any("(site)" in m for _, _, m in coverage.per_parameter())
    tracker.close()


@pytest.mark.parametrize("name", ["mixtral-eager-f64", "gpt-oss", "deepseek-v3"])
def test_routers_are_valued_by_their_linear_part(name: str) -> None:
    """A router's logits ``F.linear(x, W, b)`` (rows ``[B·T, E]``) are a linear part, exact against
    the per-example oracle in float64 (gpt-oss: with a bias); DeepSeek's router applies a float32
    copy of its weight (a cast in a float64 model), which the taps do not see: it is valued by the
    fallback at the router itself, not moved to the whole mixture-of-experts block."""
    import zoo
    from zoo_families import FAMILIES
    from zoo_patterns import PATTERNS

    case = next(c for c in zoo.ZOO + PATTERNS + FAMILIES if c.name == name)
    assert case.dtype == torch.float64
    assert zoo.run_case(case) <= case.tol
    torch.manual_seed(0)
    model = case.build().to(case.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = case.make_batch(torch.Generator().manual_seed(7), 2)
    tracker = InRunShapley(model, opt, val_loss=lambda m: zoo.training_loss(case, m, val))
    with tracker.step([0, 1, 2]):
        zoo.training_loss(case, model, case.make_batch(torch.Generator().manual_seed(1), 3)).backward()
    opt.step()
    routers = {m for m in model.modules() if type(m).__name__.endswith("Router")}
    assert routers
    names = {f"{n}.{p}" for n, m in model.named_modules() if m in routers for p, _ in m.named_parameters()}
    rows = [(n, route, at) for n, route, at in tracker.coverage().per_parameter() if n in names]
    assert len(rows) == len(names)
    if name == "deepseek-v3":
        assert all(route == "fallback" and at == n.rsplit(".", 1)[0] for n, route, at in rows)
    else:
        assert all(route == "vector:linear_part" and at.endswith(".logits") for _, route, at in rows)
    tracker.close()


class LMOutput(NamedTuple):
    logits: torch.Tensor


class DocumentEncoderLM(nn.Module):
    """An ``nn.TransformerEncoder`` LM with the interface test_documents' oracle drives:
    ``model(input_ids=, attention_mask=[B, 1, T, T] additive) -> .logits``."""

    def __init__(self, vocab: int, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 16, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.heads = heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LMOutput:
        B, T = input_ids.shape
        if attention_mask is None:
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=self.head.weight.dtype)
        else:
            mask = attention_mask.expand(B, self.heads, T, T).reshape(B * self.heads, T, T)
        return LMOutput(self.head(self.body(self.emb(input_ids), mask=mask)))


def test_documents_split_by_the_attention_parts() -> None:
    """Documents packed into rows with a block mask: the attention's parts split their per-token
    terms by document on their own routes (in-projection [S, B, ·], out-projection [S·B, ·] rows
    read in position order), equal to each document's own gradient by plain autograd."""
    import numpy as np
    import test_documents as docs

    torch.manual_seed(0)
    model = DocumentEncoderLM(docs.VOCAB).double()
    steps = docs.batches()
    expected = docs.oracle_values(model, steps, "block_mask")
    tracker = docs.tracked_values(model, steps, "block_mask")
    got = tracker.values()
    names = sorted(expected)
    theirs = np.array([expected[n] for n in names])
    np.testing.assert_allclose([got[n] for n in names], theirs, rtol=1e-9, atol=1e-12 * np.abs(theirs).max())
    per_parameter = tracker.coverage().per_parameter()
    assert not [n for n, _, at in per_parameter if "(site)" in at]
    assert all(route in ("gram", "vector:linear_part") for n, route, _ in per_parameter if "self_attn" in n)
    tracker.close()
