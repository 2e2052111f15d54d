"""Every handler and whole models: tracker values == η g_val·g_z from torch.func, float64 and float32.

Adding a layer family means adding a row to ``layer_table.LAYERS`` (which feeds the order-2 tests
too); each test is: build, run ours, compare.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, Case, classification_case, compare_with_oracle, forced_route, lm_case
from layer_table import (
    BATCHED_LAYERS,
    LAYERS,
    ChannelPool,
    GatedScale,
    LayerRow,
    Pool,
    layer_case,
    perturbed,
)
from torch import nn

from inrun.layers import handler_for


class TinyTiedLM(nn.Module):
    """nanoGPT's two traps: tied token embedding / LM head, and positions without a batch dim."""

    def __init__(self, vocab: int = 11, dim: int = 8, seq: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)  # (T,): no batch dimension
        x = self.wte(ids) + self.wpe(pos)
        x = x + self.mlp(self.ln(x))
        return self.head(x)


def seq_head(*layers: nn.Module, out: int = 6, classes: int = 4) -> nn.Module:
    return nn.Sequential(*layers, Pool(), nn.Linear(out, classes))


# ----------------------------------------------------------------------------- the tables
# Layer families are rows of layer_table.LAYERS; these are situations around them.
STEP_CASES: list[Case] = [
    classification_case("linear sum loss", lambda: seq_head(nn.Linear(5, 6), nn.Tanh()), (3, 5), 4, reduction="sum"),
    classification_case(
        "in-place activations",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Hardtanh(inplace=True), nn.Linear(6, 4)),
        (5,), 4,
    ),
    lm_case(
        "embedding padding_idx",
        lambda: nn.Sequential(nn.Embedding(9, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 9)),
        vocab=9, hf=False,
    ),
    lm_case("tied embedding + arange positions (nanoGPT)", lambda: TinyTiedLM(), vocab=11, hf=False),
]
LAYER_STEPS = [layer_case(row) for row in BATCHED_LAYERS]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LAYER_STEPS + STEP_CASES, ids=lambda c: c.name)
def test_layer_matches_oracle(case: Case, dtype: torch.dtype) -> None:
    compare_with_oracle(case, dtype)


@pytest.mark.parametrize("route", ["vector", "gram", "bookkeeping"])
@pytest.mark.parametrize(
    "case", [c for c in LAYER_STEPS + STEP_CASES if c.name in ("linear 4-d input", "hf Conv1D", "tied embedding + arange positions (nanoGPT)")],
    ids=lambda c: c.name,
)
def test_forced_routes_match_oracle(case: Case, route: str) -> None:
    compare_with_oracle(case, torch.float64, **forced_route(route))


# ----------------------------------------------------------------------------- whole models
def gpt2(n_layer: int = 2, vocab: int = 40, dim: int = 16) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer, n_embd=dim, n_head=2, vocab_size=vocab, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def llama(vocab: int = 40) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            perturbed(m)
    return model


def lora_gpt2(vocab: int = 40) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        gpt2(vocab=vocab),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False),
    )
    return model


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), perturbed(nn.GroupNorm(4, 8)), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), ChannelPool(), nn.Linear(8, 5),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def with_unknown_module() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 12), GatedScale(12), nn.ReLU(), nn.Linear(12, 3))


MODEL_CASES = [
    lm_case("GPT-2 (tied embeddings)", gpt2, vocab=40),
    lm_case("Llama", llama, vocab=40),
    lm_case("GPT-2 + LoRA", lora_gpt2, vocab=40),
    classification_case("CNN conv2d + groupnorm", cnn, (3, 8, 8), 5),
    classification_case("MLP", mlp, (10,), 3, batch=8),
    classification_case("unknown module", with_unknown_module, (10,), 3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_model_matches_oracle(case: Case, dtype: torch.dtype) -> None:
    compare_with_oracle(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("route", ["vector", "gram", "bookkeeping"])
@pytest.mark.parametrize("case", MODEL_CASES[:3], ids=lambda c: c.name)
def test_model_routes_match_oracle(case: Case, route: str, dtype: torch.dtype) -> None:
    compare_with_oracle(case, dtype, **forced_route(route))


@pytest.mark.parametrize("order", [1, 2])
def test_bookkeeping_route_is_used_and_matches_oracle(order: int) -> None:
    """The forced book-keeping route really runs (coverage) and its values equal the oracle's."""
    from inrun import InRunShapley

    case = MODEL_CASES[0]
    if order == 1:
        compare_with_oracle(case, torch.float64, bookkeeping="always")
    torch.manual_seed(0)
    model = case.make_model().to(DEVICE).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, val_loss=case.val_loss, bookkeeping="always", order=order)
    (x,) = (t.to(DEVICE) for t in case.make_batch(torch.Generator().manual_seed(0)))
    with tracker.step(range(len(x))):
        case.batch_loss(model, (x,)).backward()
    opt.step()
    routes = tracker.coverage().routes
    assert "bookkeeping" in routes and any("c_attn" in n for n in routes["bookkeeping"])
    # the tied token embedding / LM head: vector route for its embedding use, book-keeping for the head
    assert routes["vector:embedding+bookkeeping"] == ["transformer.wte.weight"]
    tracker.close()


def test_lora_values_only_the_adapter() -> None:
    from inrun import InRunShapley

    model = lora_gpt2()
    tracker = InRunShapley(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                           val_loss=lambda m: m(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.mean())
    covered = {n for names in tracker.coverage().routes.values() for n in names}
    assert covered and all("lora_" in n for n in covered)
    tracker.close()


@pytest.mark.parametrize("row", LAYERS, ids=lambda r: r.name)
def test_registry_picks_the_rows_handler(row: LayerRow) -> None:
    """The registry routes each family to its own handler (none silently to the fallback)."""
    handler = handler_for(row.make_module().get_submodule(row.at))
    assert (handler.name if handler is not None else "fallback") == row.handler


def test_example_loss_is_the_share() -> None:
    """Sanity of the oracle convention: per-example shares sum to the batch gradient."""
    from inrun import exact

    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 3, (6,))
    pe = exact.per_example_gradients(model, lambda f, xr, yr: F.cross_entropy(f(xr), yr, reduction="sum") / 6, (x, y))
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(pe[name].sum(0), p.grad, rtol=1e-12, atol=1e-14)
