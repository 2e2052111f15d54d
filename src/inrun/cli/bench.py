"""Side-by-side cost of In-Run Data Shapley vs plain training, printed as ratios.

Same model, same batches, one process: every method gets its own copy of the same initial
model and optimizer and runs the same batches. After warm-up, methods run in alternation
(A B C A B C ...) so drift of the machine cancels; each ratio is the median step time of a
method over the median of plain training (≥ 20 steps each). Peak memory is measured for each
method in a fresh process (CPU: growth of the resident-set high-water mark over the steps;
GPU: ``max_memory_allocated``), as a ratio to plain training, beside its *memory floor*: 1 + the
bytes an exact route must hold beyond that peak (:func:`memory_floors`: the validation gradient,
the gradient map's reference and, for contractions after the backward, the factors of the
micro-batches that wait) over the baseline's measured peak.

Each ratio is printed beside its *FLOP floor*: 1 + the multiply-adds the method adds to
training over training's own, counted from the shapes of the linear layers (the bulk of the
work; attention scores and elementwise ops are not counted, so a measured ratio can sit a
little below its floor). docs/performance.md explains the counts.

Workloads: R = GPT-2 n_layer=4, n_embd=256, n_head=4, vocab 4096, 16 x 128 tokens, 1 validation
sequence; S = GPT-2 n_layer=2, n_embd=768, vocab 4096, 8 x 256 tokens, 1 validation sequence of
128 tokens; M = MLP 784-512-512-10, batch 256, 32 validation rows; E = Mixtral 2x256 with 8 experts
(top-2), 8 x 128 tokens; T = ``nn.TransformerEncoder`` 4x256 LM (its attention valued by its linear
parts, inrun.layers.attention), 16 x 128 tokens; A = R's GPT-2 trained the way people train it: AdamW (and SGD for
comparison), gradient accumulation of 4 micro-batches of 8 x 128 per optimizer step, 1 validation
sequence; L = R's GPT-2 with LoRA adapters of rank 8 on attention and MLP, the base frozen (only
the adapters train and are valued); C = R's GPT-2 under ``torch.compile`` (inductor): compiled
plain training, the compiled model tracked (its dots taken inside the graph, the tracker made
first), beside eager plain and eager tracked training; compiled order 1's ratio is to compiled
plain, and the line under the table compares the compiled and eager tracked steps (compile time
is spent in the warm-up steps, not timed). A method that cannot run on a workload (per-example ``vmap``
over data-dependent expert routing) is listed with the reason; A and L run their own list of
methods by default. GPT-2 runs its default attention (SDPA); the Hessian variant's
Hessian-vector products run SDPA's math backend, which has a double backward.

The line under each table is the validation pass's measured share of a plain step ("plain +
validation pass", on the thread count the tracker would pick) beside its FLOP share.

Usage: ``inrun bench`` or ``python benchmarks/overhead.py`` [--workloads R,S,M,A,L] [--steps 24]
[--methods ...].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..exact import per_example_gradients
from ..run.models import causal_lm
from ..tracker import InRunShapley
from ..tracking.config import TrackerConfig
from ..tracking.validation import ThreadChoice
from .args import non_negative_int, positive_int


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, ...]]
    val: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    example_loss: Callable[..., torch.Tensor]
    val_loss: Callable[[nn.Module], torch.Tensor]
    tokens: int  # positions per example
    val_tokens: int  # positions in the whole validation set
    lr: float = 1e-3
    notes: str = ""
    linears: list[tuple[int, int, float]] = field(default_factory=list)
    """``(d, p, gram)`` per linear map and position: ``gram`` is the share of the validation positions
    the layer's Gram route meets (1 or True: all; an expert: top-k / experts; 0 or False: none)."""
    frozen: list[tuple[int, int]] = field(default_factory=list)
    """Linear layers of a frozen base: forward and input gradient only, nothing to value."""
    embedding_width: int = 0
    """Floats per position of the embeddings' output gradient, kept by a deferred contraction
    (GPT-2's token and position embeddings receive one gradient, the same tensor: counted once)."""
    norm_features: int = 0
    """Floats per example of the norms' kept per-example gradients (weights and biases)."""
    micro: int = 1
    """Micro-batches per optimizer step (gradient accumulation): each batch is cut into ``micro``
    equal parts, each its own forward/backward (and ``tracker.step``) of the loss / ``micro``."""
    methods: tuple[str, ...] | None = None
    """The methods run by default (``None``: all)."""
    compile_backend: str = "inductor"
    """``torch.compile``'s backend for the compiled methods."""

    @property
    def examples(self) -> int:
        """Examples per optimizer step."""
        return self.batches[0][0].shape[0]

    def micro_batches(self, batch: tuple, ids: list[int]) -> list[tuple[tuple, list[int]]]:
        if self.micro == 1:
            return [(batch, ids)]
        size = len(ids) // self.micro
        return [
            (tuple(t[k * size : (k + 1) * size] for t in batch), ids[k * size : (k + 1) * size])
            for k in range(self.micro)
        ]


def gpt2_workload(
    name: str, n_layer: int, n_embd: int, n_head: int, batch: int, seq: int, val_seq: int, micro: int = 1,
    lora: int | None = None, methods: tuple[str, ...] | None = None, vocab: int = 4096,
) -> Workload:
    """GPT-2 on random tokens; ``micro`` micro-batches per step; ``lora``: rank of LoRA adapters on
    the attention and MLP (``c_attn``, ``c_proj``, ``c_fc``) with the base frozen (peft)."""
    from transformers import GPT2Config

    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=max(seq, val_seq),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        model = causal_lm(cfg)
        return model if lora is None else with_lora(model, lora)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (batch, seq), generator=g),) for _ in range(4)]
    val = (torch.randint(0, vocab, (1, val_seq), generator=g),)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        return m(input_ids=b[0], labels=b[0]).loss

    def example_loss(f: Callable, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        logits = f(input_ids=ids).logits
        return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / (batch_size * (seq - 1))

    d = n_embd
    blocks = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * n_layer
    if lora is None:
        # The LM head, tied to the token embedding: Gram factors plus the embedding's rows as a residual.
        linears = [(a, b, True) for a, b in blocks] + [(d, vocab, True)]
        frozen: list[tuple[int, int]] = []
    else:
        linears = [pair for a, b in blocks for pair in ((a, lora, True), (lora, b, True))]
        frozen = [*blocks, (d, vocab)]
    notes = f"GPT-2 {n_layer}x{n_embd}, vocab {vocab}, {batch}x{seq}"
    if micro > 1:
        notes += f" as {micro} micro-batches of {batch // micro}"
    if lora is not None:
        notes += f", LoRA rank {lora} on attention and MLP (base frozen)"
    return Workload(
        name, make_model, batches, val, loss, example_loss, lambda m: loss(m, val), seq, val_seq,
        notes=notes + f", 1 val x {val_seq}", linears=linears, frozen=frozen, micro=micro, methods=methods,
        embedding_width=d if lora is None else 0, norm_features=0 if lora is not None else (2 * n_layer + 1) * 2 * d,
    )


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                         fan_in_fan_out=True)
        return get_peft_model(model, cfg)


def mlp_workload() -> Workload:
    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)) for _ in range(4)]
    val = (torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g))

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    def example_loss(f: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        return F.cross_entropy(f(x), y, reduction="sum") / batch_size

    return Workload(
        "M", make_model, batches, val, loss, example_loss, lambda m: loss(m, val), 1, 32, lr=0.05,
        notes="MLP 784-512-512-10, batch 256, 32 val rows", linears=[(784, 512, True), (512, 512, True), (512, 10, True)],
    )


def lm_batches(vocab: int, batch: int, seq: int, val_seq: int) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (batch, seq), generator=g),) for _ in range(4)]
    return batches, (torch.randint(0, vocab, (1, val_seq), generator=g),)


def moe_workload() -> Workload:
    """Mixtral, 8 experts of which 2 per token (transformers' experts: 3-D parameters, routed rows)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    vocab, d, inter, n_layer, batch, seq = 4096, 256, 512, 2, 8, 128
    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=inter, num_hidden_layers=n_layer, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq, num_local_experts=8,
        num_experts_per_tok=2, attention_dropout=0.0, attn_implementation="eager",
    )

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return MixtralForCausalLM(cfg)

    batches, val = lm_batches(vocab, batch, seq, seq)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        return m(input_ids=b[0], labels=b[0]).loss

    def example_loss(f: Callable, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        logits = f(input_ids=ids).logits
        return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / (batch_size * (seq - 1))

    # attention q, k, v, o; the router (a linear part, vector route); the experts, 2 of 8 per token (gate-up and
    # down, each on the Gram route against the validation tokens routed to its expert: 2/8 of them);
    # the LM head
    expert = [(d, 2 * inter, 2 / 8), (inter, d, 2 / 8)]
    linears = [(d, d, True), (d, d // 2, True), (d, d // 2, True), (d, d, True), (d, 8, False), *expert, *expert] * n_layer
    linears += [(d, vocab, True)]
    return Workload(
        "E", make_model, batches, val, loss, example_loss, lambda m: loss(m, val), seq, seq, notes=(
            f"Mixtral {n_layer}x{d}, 8 experts top-2 (intermediate {inter}), vocab {vocab}, {batch}x{seq}, "
            f"1 val x {seq}"), linears=linears, embedding_width=d, norm_features=(2 * n_layer + 1) * d,
    )


class EncoderLM(nn.Module):
    """Token embedding -> ``nn.TransformerEncoder`` (causal mask) -> LM head."""

    def __init__(self, vocab: int, d: int, n_layer: int, heads: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        return self.head(self.body(self.emb(input_ids), mask=mask, is_causal=True))


def encoder_workload() -> Workload:
    vocab, d, n_layer, heads, batch, seq = 4096, 256, 4, 4, 16, 128

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return EncoderLM(vocab, d, n_layer, heads)

    batches, val = lm_batches(vocab, batch, seq, seq)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        logits = m(b[0])
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), b[0][:, 1:].reshape(-1))

    def example_loss(f: Callable, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        logits = f(ids)
        return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / (batch_size * (seq - 1))

    # MultiheadAttention (its packed in-projection and out-projection, valued as linear parts), the
    # MLP, the LM head
    linears = [(d, 3 * d, True), (d, d, True), (d, 4 * d, True), (4 * d, d, True)] * n_layer + [(d, vocab, True)]
    return Workload(
        "T", make_model, batches, val, loss, example_loss, lambda m: loss(m, val), seq, seq,
        notes=f"nn.TransformerEncoder {n_layer}x{d}, vocab {vocab}, {batch}x{seq}, 1 val x {seq}", linears=linears,
        embedding_width=d, norm_features=2 * n_layer * 2 * d,
    )


ACCUMULATION_METHODS = ("plain", "order 1", "order 1 + book-keeping", "order 2 trapezoid", "plain AdamW",
                        "Adam-aware order 1", "plain + validation pass")
LORA_METHODS = ("plain", "order 1", "plain AdamW", "Adam-aware order 1", "torch.func per-example",
                "plain + validation pass")
COMPILED_METHODS = ("plain", "order 1", "compiled plain", "compiled order 1")

WORKLOADS: dict[str, Callable[[], Workload]] = {
    "R": lambda: gpt2_workload("R", 4, 256, 4, 16, 128, 128),
    "S": lambda: gpt2_workload("S", 2, 768, 12, 8, 256, 128),
    "A": lambda: gpt2_workload("A", 4, 256, 4, 32, 128, 128, micro=4, methods=ACCUMULATION_METHODS),
    "L": lambda: gpt2_workload("L", 4, 256, 4, 16, 128, 128, lora=8, methods=LORA_METHODS),
    "C": lambda: gpt2_workload("C", 4, 256, 4, 16, 128, 128, methods=COMPILED_METHODS),
    "M": mlp_workload,
    "E": moe_workload,
    "T": encoder_workload,
}


# ----------------------------------------------------------------------------- methods
class Method:
    """One way to train a step: builds its own model/optimizer copy, then ``step(batch, ids)``."""

    name = "plain"
    optimizer = "sgd"

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.model = w.make_model()
        self.model.train()
        self.runner = self.model
        """What the loop calls: the model, or its compiled wrapper."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(trainable, lr=w.lr)
        else:
            self.opt = torch.optim.SGD(trainable, lr=w.lr)
        self.setup()

    def setup(self) -> None:
        pass

    def step(self, batch: tuple, ids: list[int]) -> None:
        for part, part_ids in self.w.micro_batches(batch, ids):
            self.backward(part, part_ids)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def backward(self, batch: tuple, ids: list[int]) -> None:
        (self.w.loss(self.runner, batch) / self.w.micro).backward()


class PlainAdam(Method):
    name = "plain AdamW"
    optimizer = "adamw"


class Tracked(Method):
    options: ClassVar[dict[str, Any]] = {}

    def setup(self) -> None:
        options = {"check": True, **self.options}
        self.tracker = InRunShapley(self.model, self.opt, val_loss=self.w.val_loss, **options)

    def backward(self, batch: tuple, ids: list[int]) -> None:
        with self.tracker.step(ids):
            super().backward(batch, ids)


class PlainPlusValidation(Method):
    """Plain training plus one validation forward/backward per optimizer step, on the thread count
    the tracker's validation pass uses by default: the part of a valued step every method pays."""

    name = "plain + validation pass"

    def setup(self) -> None:
        self.threads = ThreadChoice(TrackerConfig().val_threads)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, batch: tuple, ids: list[int]) -> None:
        with self.threads.applied(self.params[0].device):
            self.model.eval()
            torch.autograd.grad(self.w.val_loss(self.model), self.params)
            self.model.train()
        super().step(batch, ids)


def tracked(name: str, optimizer: str = "sgd", **options: Any) -> type[Tracked]:
    return type(name, (Tracked,), {"name": name, "optimizer": optimizer, "options": options})


class CompiledPlain(Method):
    """Plain training of ``torch.compile(model)`` (inductor)."""

    name = "compiled plain"

    def setup(self) -> None:
        super().setup()
        self.runner = torch.compile(self.model, backend=self.w.compile_backend)


class CompiledTracked(Tracked):
    """The tracker made on the model, then the model compiled: the dots inside the graph."""

    name = "compiled order 1"

    def setup(self) -> None:
        super().setup()
        self.runner = torch.compile(self.model, backend=self.w.compile_backend)


class TorchFuncBaseline(Method):
    """Per-example gradients of the whole model (torch.func), dotted with g_val, summed for the update."""

    name = "torch.func per-example"

    def step(self, batch: tuple, ids: list[int]) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        g_val = torch.autograd.grad(self.w.val_loss(self.model), params)
        B = batch[0].shape[0]
        with warnings.catch_warnings():
            # vmap runs CPU SDPA through its slow per-example fallback (a cost of this baseline,
            # reported in docs/performance.md); one warning per call would drown the table.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            pe = per_example_gradients(
                self.model, lambda f, *rows: self.w.example_loss(f, *rows, batch_size=B), batch
            )
        lr = self.opt.param_groups[0]["lr"]
        values = sum(lr * (g.flatten(1) @ v.flatten()) for g, v in zip(pe.values(), g_val))
        for p, g in zip(params, pe.values()):
            p.grad = g.sum(0)
        values.sum().item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class BatchOneBaseline(Method):
    """One forward/backward per example, each gradient dotted with g_val, accumulated for the update."""

    name = "batch-size-1 loop"

    def step(self, batch: tuple, ids: list[int]) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        g_val = torch.autograd.grad(self.w.val_loss(self.model), params)
        B = batch[0].shape[0]
        lr = self.opt.param_groups[0]["lr"]
        total = [torch.zeros_like(p) for p in params]
        values = []
        for i in range(B):
            rows = tuple(t[i : i + 1] for t in batch)
            g = torch.autograd.grad(self.w.loss(self.model, rows) / B, params)
            values.append(lr * sum((a * b).sum() for a, b in zip(g, g_val)))
            for t, gi in zip(total, g):
                t += gi
        for p, t in zip(params, total):
            p.grad = t
        torch.stack(values).sum().item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


METHODS: dict[str, type[Method]] = {
    "plain": Method,
    "order 1": tracked("order 1"),
    "order 1 + book-keeping": tracked("order 1 + book-keeping", bookkeeping="auto"),
    "order 2 trapezoid": tracked("order 2 trapezoid", order=2),
    "order 2 hessian": tracked("order 2 hessian", order=2, second_order="hessian"),
    "plain AdamW": PlainAdam,
    "Adam-aware order 1": tracked("Adam-aware order 1", optimizer="adamw"),
    "torch.func per-example": TorchFuncBaseline,
    "batch-size-1 loop": BatchOneBaseline,
    "plain + validation pass": PlainPlusValidation,
    "compiled plain": CompiledPlain,
    "compiled order 1": CompiledTracked,
}
BASELINE_OF = {"Adam-aware order 1": "plain AdamW", "compiled order 1": "compiled plain"}


# ----------------------------------------------------------------------------- FLOP floors
def floors(w: Workload) -> dict[str, float]:
    """Multiply-adds added to training, as a ratio (1 + added / training), per method.

    Per example of ``T`` positions: training is ``3·T·d·p`` per trainable linear layer (forward,
    input gradient, weight gradient) and ``2·T·d·p`` per frozen one (no weight gradient); the
    validation pass is training's count scaled by its share of the positions (``N`` validation
    positions against the step's ``B·T``, whatever the number of micro-batches).
    """
    T, N = w.tokens, w.val_tokens
    B = w.examples
    train = sum(3 * T * d * p for d, p, _ in w.linears) + sum(2 * T * d * p for d, p in w.frozen)
    val_pass = (N / (B * T)) * train  # forward + backward on the validation set, per example
    vector = sum(T * d * p for d, p, _ in w.linears)
    best = sum(min(T * d * p, T * N * float(gram) * (d + p)) if gram else T * d * p for d, p, gram in w.linears)
    out = {
        "plain": 1.0,
        "plain AdamW": 1.0,
        "plain + validation pass": 1 + val_pass / train,
        "order 1": 1 + (val_pass + best) / train,
        "order 1 + book-keeping": 1 + val_pass / train,
        # SGD: g_val(θ_t+1) is the next step's validation pass, and a gradient, so Gram again.
        "order 2 trapezoid": 1 + (val_pass + 2 * best) / train,
        "order 2 hessian": 1 + (3 * val_pass + best + vector) / train,
        "Adam-aware order 1": 1 + (val_pass + vector) / train,
        "compiled plain": 1.0,
        # inside the graph the dots take the vector route (the validation pass runs eagerly)
        "compiled order 1": 1 + (val_pass + vector) / train,
        "torch.func per-example": 1 + val_pass / train,
        "batch-size-1 loop": 1 + val_pass / train,
    }
    return out


# ----------------------------------------------------------------------------- memory floors
WINDOW_METHODS = ("order 2 trapezoid", "order 2 hessian", "Adam-aware order 1")
"""Methods whose values are contracted after the backward: each call's factors wait for the step
(Adam's slope) or the next validation pass (order 2)."""


def kept_per_microbatch(w: Workload, bytes_per_float: int = 4) -> int:
    """Bytes an exact deferred contraction must keep per micro-batch: per example, each trainable
    linear map's input and output gradient at every position (``T·(d + p)``) or its per-example
    gradient where smaller (``d·p``), the embeddings' output gradient (``T·width``) and the norms'
    per-example gradients (:mod:`inrun.tracking.kept`)."""
    T = w.tokens
    per_example = sum(min(T * (d + p), d * p) for d, p, _ in w.linears) + T * w.embedding_width + w.norm_features
    return (w.examples // w.micro) * per_example * bytes_per_float


def memory_floors(w: Workload, params: int, bytes_per_float: int = 4) -> dict[str, float]:
    """Bytes each method must hold beyond its baseline's peak (the lower bound of an exact route).

    Every tracked method holds the validation gradient (``|θ|``) and the gradient map's reference
    (one gradient, :mod:`inrun.tracking.gradmap`) over the step. A deferred contraction also
    keeps every micro-batch's factors (:func:`kept_per_microbatch`) until the step or the next
    validation pass; while the last micro-batch runs its forward and backward (the baseline's
    peak), the ``k − 1`` before it wait: ``(k − 1)·F`` more. (With one micro-batch the factors
    are mostly the activations autograd keeps anyway: no term.) AdamW's two moments are its
    own (plain AdamW's floor over plain SGD); the validation pass alone holds one gradient."""
    theta = params * bytes_per_float
    tracked = 2 * theta
    window = tracked + (w.micro - 1) * kept_per_microbatch(w, bytes_per_float)
    out = {n: float(tracked) for n in ("order 1", "order 1 + book-keeping", "compiled order 1")}
    out.update({n: float(window) for n in WINDOW_METHODS})
    out.update({"plain": 0.0, "compiled plain": 0.0, "plain AdamW": 2.0 * theta, "plain + validation pass": float(theta)})
    return out


def trainable_parameters(w: Workload) -> int:
    return sum(p.numel() for p in w.make_model().parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- measurement
class Clock:
    """Reads the wall clock at a step's start and end. On a CUDA device a step's kernels run after
    the Python that launched them returns, so the device's queue is waited for
    (``torch.cuda.synchronize``) before each reading; on the CPU nothing is waited for."""

    def __init__(self, device: torch.device, synchronize: Callable[[], None] | None = None) -> None:
        self.device = device
        if synchronize is None and device.type == "cuda":
            synchronize = lambda: torch.cuda.synchronize(device)  # noqa: E731
        self.synchronize = synchronize

    def read(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()


@dataclass
class StepTimes:
    """Per timed step of one method: wall seconds, CPU seconds of this process (all its threads:
    steadier than the wall time when other processes take the cores) and minor page faults (memory
    the step touched for the first time: a step that frees what the allocator had kept makes the
    next step, whichever method it is, fault its memory in again)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_methods(
    w: Workload, names: list[str], steps: int, warmup: int, rounds: int, clock: Clock | None = None,
) -> dict[str, StepTimes]:
    clock = clock or Clock(torch.device("cpu"))
    methods = {n: METHODS[n](w) for n in names}
    B = w.batches[0][0].shape[0]
    counter = {n: 0 for n in names}
    times: dict[str, StepTimes] = {n: StepTimes() for n in names}

    def run(n: str, record: bool = True) -> None:
        batch = w.batches[counter[n] % len(w.batches)]
        ids = list(range(counter[n] * B, (counter[n] + 1) * B))
        counter[n] += 1
        faults, cpu, start = _minor_faults(), time.process_time(), clock.read()
        methods[n].step(batch, ids)
        end = clock.read()
        if record:
            times[n].wall.append(end - start)
            times[n].cpu.append(time.process_time() - cpu)
            times[n].faults.append(_minor_faults() - faults)

    for n in list(names):
        try:
            for _ in range(warmup):
                run(n, record=False)
        except Exception as exc:
            FAILURES[(w.name, n)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            names = [m for m in names if m != n]
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            for _ in range(per_round):
                run(n)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {n: t for n, t in times.items() if n in names}


def on_device(w: Workload, device: torch.device) -> Workload:
    """The workload with its model, batches and validation data on ``device``."""
    if device.type == "cpu":
        return w
    import dataclasses

    make = w.make_model
    val = tuple(t.to(device) for t in w.val)
    return dataclasses.replace(
        w, make_model=lambda: make().to(device), batches=[tuple(t.to(device) for t in b) for b in w.batches], val=val,
        val_loss=lambda m: w.loss(m, val),
    )


FAILURES: dict[tuple[str, str], str] = {}
"""(workload, method) -> why the method could not run there (e.g. vmap on data-dependent routing)."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_probe(
    workload: str, method: str, steps: int, warmup: int = 2, device: torch.device | None = None, backend: str = "inductor",
) -> float:
    """Peak memory (bytes) of ``method``'s steady-state steps above what the process held before
    its first step, in this fresh process: ``warmup`` steps run first (the first step's row
    verification replays the model once, a cost of the first step only), then the peak is reset
    and ``steps`` more run; what the warm-up left allocated (optimizer state, a pending step's
    factors) counts. GPU: ``max_memory_allocated``. CPU (Linux): the peak resident set size
    (``VmHWM``, reset to the current size after the warm-up) minus the resident size before the
    first step; the parent runs this with glibc mapping every large block separately, so that
    freed tensors leave the resident set."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    w = on_device(WORKLOADS[workload](), device)
    w.compile_backend = backend
    m = METHODS[method](w)
    B = w.batches[0][0].shape[0]
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set size to the current one
        m.step(w.batches[i % len(w.batches)], list(range(i * B, (i + 1) * B)))
    if cuda:
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    return float(_status_kib("VmHWM") * 1024 - base)


def measure_memory(workload: str, names: list[str], device: torch.device, backend: str = "inductor") -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = {}
    for n in names:
        if (workload, n) in FAILURES:
            continue
        res = subprocess.run(
            [sys.executable, "-m", "inrun.cli", "bench", "--memory-probe", workload, n, "--device", str(device),
             "--compile-backend", backend],
            capture_output=True, text=True, check=True, env=env,
        )
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])["bytes"]
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:

    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="R,S,M")
    parser.add_argument("--methods", default=None, help="comma-separated (default: each workload's own list)")
    parser.add_argument("--steps", type=positive_int, default=24, help="timed steps per method (>= 20 for results)")
    parser.add_argument("--rounds", type=positive_int, default=4, help="alternation rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: models and data on the GPU, clocks read "
                        "after torch.cuda.synchronize()")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled methods")
    parser.add_argument("--memory-probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; prints the tables."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.memory_probe:
        print(json.dumps({"bytes": memory_probe(*args.memory_probe, steps=3, device=device, backend=args.compile_backend)}))
        return 0
    unknown = [n for n in (args.methods or "").split(",") if n.strip() and n.strip() not in METHODS]
    unknown += [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown method or workload {unknown}; methods: {list(METHODS)}, workloads: {list(WORKLOADS)}")
    chosen = None if args.methods is None else [n.strip() for n in args.methods.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{device}; medians of {args.steps} steps per method; "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")
    for wname in args.workloads.split(","):
        w = WORKLOADS[wname]()
        w.compile_backend = args.compile_backend
        names = chosen or list(w.methods or METHODS)
        print(f"### Workload {wname}: {w.notes}", file=sys.stderr)
        times = time_methods(on_device(w, device), names, args.steps, args.warmup, args.rounds, Clock(device))
        memory = {} if args.no_memory else measure_memory(wname, names, device, args.compile_backend)
        floor = floors(w)
        held = memory_floors(w, trainable_parameters(w))
        print(f"### Workload {wname}: {w.notes}\n")
        print(f"(load average {os.getloadavg()[0]:.2f} after the timing)\n")
        print("| method | median step (ms) | time ratio | CPU-time ratio | FLOP floor | ratio / floor "
              "| page faults per step | peak memory (MiB) | memory ratio | memory floor | memory / floor |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in names:
            if (wname, n) in FAILURES:
                print(f"| {n} | cannot run: {FAILURES[(wname, n)]} | | | | | | | | | |")
                continue
            base = BASELINE_OF.get(n, "plain")
            med = statistics.median(times[n].wall)
            ratio = med / statistics.median(times[base].wall) if base in times else float("nan")
            cpu = statistics.median(times[n].cpu) / statistics.median(times[base].cpu) if base in times else float("nan")
            mem = memory[n] / memory[base] if memory and base in memory else float("nan")
            mib = memory[n] / 2**20 if memory else float("nan")
            # the floor as a ratio to the baseline's measured peak: 1 + what the route must hold / that peak
            mem_floor = 1 + held[n] / memory[base] if memory and base in memory and n in held else float("nan")
            print(f"| {n} | {med * 1000:.0f} | {ratio:.2f}x | {cpu:.2f}x | {floor[n]:.2f}x | {ratio / floor[n]:.2f} "
                  f"| {statistics.median(times[n].faults):.0f} | {mib:.0f} | {mem:.2f}x | {mem_floor:.2f}x "
                  f"| {mem / mem_floor:.2f} |")
        if w.micro > 1 and any(n in held for n in WINDOW_METHODS if n in names):
            print(f"\nMemory floor: factors kept per micro-batch {kept_per_microbatch(w) / 2**20:.1f} MiB "
                  f"({w.micro - 1} waiting while the last runs), validation gradient and gradient map "
                  f"{held['order 1'] / 2**20:.1f} MiB.")
        if "compiled order 1" in times and "order 1" in times:
            print(f"\nCompiled against eager: plain {ratio_of(times, 'compiled plain', 'plain'):.2f}x, "
                  f"tracked {ratio_of(times, 'compiled order 1', 'order 1'):.2f}x (median step times).")
        if "plain + validation pass" in times and "plain" in times:
            share = statistics.median(times["plain + validation pass"].wall) / statistics.median(times["plain"].wall) - 1
            print(f"\nValidation pass: measured {100 * share:+.1f}% of a plain step, FLOP share "
                  f"{100 * (floor['plain + validation pass'] - 1):+.1f}%.")
        print()
    return 0


def ratio_of(times: dict[str, Any], method: str, base: str) -> float:
    if method not in times or base not in times:
        return float("nan")
    return statistics.median(times[method].wall) / statistics.median(times[base].wall)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
