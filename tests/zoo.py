"""The zoo: architectures people train, as tiny random-init configs, each valued by the tracker and
compared with an independent oracle.

The oracle needs nothing from the tracker: example ``z``'s gradient is the gradient of its share
of the training loss computed on ``z`` alone (a batch of one, on a float64 copy), which is exact
for any model whose examples do not interact; ``g_val`` is plain autograd of the validation loss
on an eval-mode copy. Each case says how its per-example losses are computed and by what the
batch's loss is normalized (tokens, labelled tokens, examples).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = dict[str, Tensor]


@dataclass
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator, int], Batch]
    losses: Callable[[nn.Module, Batch], Tensor]
    """``[B]`` per-example summed losses."""
    normalizer: Callable[[Batch], float]
    """The training loss is ``losses.sum() / normalizer(batch)``."""
    dtype: torch.dtype = torch.float64
    tol: float = 1e-9
    batch_size: int = 3
    lr: float = 0.05
    tracker_options: dict[str, Any] = field(default_factory=dict)
    oracle_dtype: torch.dtype = torch.float64
    """float32 only for models with ops that have no float64 kernel (grouped matmul of MoE)."""
    train: Callable[[nn.Module, Batch], Tensor] | None = None
    """The loss the loop back-propagates, as users write it (``model(**batch).loss``), when it is
    not ``losses(...).sum() / normalizer(...)`` spelled out; it must equal that."""
    refused: str | None = None
    """For a model the tracker cannot value: a pattern its one-line refusal (an ``InRunError``,
    naming the module and the fix) must match."""


def slice_batch(batch: Batch, rows: slice | list[int]) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


def training_loss(case: ZooCase, model: nn.Module, batch: Batch) -> Tensor:
    return case.losses(model, batch).sum() / case.normalizer(batch)


def oracle_gradients(case: ZooCase, model: nn.Module, batch: Batch) -> list[dict[str, Tensor]]:
    """Each example's gradient of its share of the loss, computed on that example alone."""
    ref = twin(model, case.build).to(case.oracle_dtype)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    norm = case.normalizer(batch)
    B = next(iter(batch.values())).shape[0]
    buffers = [(b, b.clone()) for b in ref.buffers()]
    out = []
    for z in range(B):
        with torch.no_grad():  # each example from the state the batch started from (spectral_norm's u, v)
            for b, before in buffers:
                b.copy_(before)
        row = cast({k: v[z : z + 1] for k, v in batch.items()}, case.oracle_dtype)
        share = case.losses(ref, row).sum() / norm
        out.append(plain_gradients(share, params))
    return out


def plain_gradients(loss: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``loss.backward()`` into fresh ``.grad`` (not ``torch.autograd.grad``, which a reentrant
    checkpoint refuses)."""
    for p in params.values():
        p.grad = None
    loss.backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in params.items()}


def twin(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """An independent copy of ``model``: a deep copy, or (a legacy ``weight_norm`` keeps a computed
    weight, which cannot be deep-copied) the model built again with its state loaded."""
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        other = build().to(next(model.parameters()).dtype).train(model.training)
        other.load_state_dict(model.state_dict())
        return other


def val_gradient(
    val_loss: Callable[[nn.Module], Tensor], model: nn.Module, dtype: torch.dtype, shift: list[Tensor] | None = None,
    build: Callable[[], nn.Module] | None = None,
) -> dict[str, Tensor]:
    """``g_val`` on an eval-mode copy (at ``θ + shift`` if given)."""
    ref = (twin(model, build) if build is not None else copy.deepcopy(model)).to(dtype).eval()
    if shift is not None:
        with torch.no_grad():
            for p, s in zip([p for p in ref.parameters() if p.requires_grad], shift):
                p.add_(s.to(dtype))
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    return plain_gradients(val_loss(ref), params)


def run_case(case: ZooCase, mode: str = "sgd", steps: int = 2) -> float:
    """Train ``steps`` tracked steps and assert each value equals the oracle's; return the worst
    error relative to the dot's natural scale ``‖g_z‖ ‖u‖``.

    ``mode``: ``"sgd"`` (order 1: ``η <g_val, g_z>``), ``"adamw"`` (the Adam-aware rule:
    ``−<g_z, D ⊙ g_val(θ + f(0))>`` with the slope ``D`` and data-free step ``f(0)`` of
    :mod:`inrun.optim`, the per-example gradients and ``g_val`` from the oracle) or
    ``"trapezoid"`` (``η/2 <g_val(θ_t) + g_val(θ_t+1), g_z>``).
    """
    from inrun import InRunShapley
    from inrun.optim import rule_for

    torch.manual_seed(0)
    model = case.build().to(case.dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01) if mode == "adamw" else torch.optim.SGD(params, lr=case.lr)
    val = cast(case.make_batch(torch.Generator().manual_seed(7), 2), case.dtype)

    def val_loss(m: nn.Module) -> Tensor:
        return training_loss(case, m, cast(val, next(m.parameters()).dtype))

    options = {"order": 2} if mode == "trapezoid" else {}
    tracker = InRunShapley(model, opt, val_loss=val_loss, **{**case.tracker_options, **options})
    rule = rule_for(opt)
    gen = torch.Generator().manual_seed(1)
    expected: dict[int, float] = {}
    scale: dict[int, float] = {}
    for step in range(steps):
        batch = cast(case.make_batch(gen, case.batch_size), case.dtype)
        ids = list(range(step * case.batch_size, (step + 1) * case.batch_size))
        per_example = oracle_gradients(case, model, batch)
        shift = rule.data_free_step(params) if mode == "adamw" else None
        g_val = val_gradient(val_loss, model, case.oracle_dtype, shift, case.build)
        with tracker.step(ids):
            (case.train or partial(training_loss, case))(model, batch).backward()
        if mode == "adamw":
            slopes = dict(zip(names, rule.slopes(params, [p.grad for p in params])))
            u = {n: -slopes[n].to(case.oracle_dtype) * g_val[n] for n in names}
        else:
            u = {n: case.lr * g_val[n] for n in names}
        opt.step()
        opt.zero_grad()
        if mode == "trapezoid":
            g_next = val_gradient(val_loss, model, case.oracle_dtype, build=case.build)
            u = {n: case.lr * (g_val[n] + g_next[n]) / 2 for n in names}
        u_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in u.values())))
        for i, g in zip(ids, per_example):
            expected[i] = sum(float((g[n].double() * u[n].double()).sum()) for n in names)
            scale[i] = float(torch.sqrt(sum((g[n].double() ** 2).sum() for n in names))) * u_norm
    got = tracker.values()
    tracker.close()
    worst = 0.0
    for i, e in expected.items():
        err = abs(got[i] - e) / (scale[i] + 1e-300)
        worst = max(worst, err)
        assert err <= case.tol, f"{case.name} [{mode}]: id {i} tracker {got[i]!r} vs oracle {e!r} (relative error {err:.2e})"
    return worst


def cast(batch: Batch, dtype: torch.dtype) -> Batch:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- loss shapes
def lm_losses(logits_of: Callable[[nn.Module, Batch], Tensor]) -> Callable[[nn.Module, Batch], Tensor]:
    """Next-token loss per sequence (summed over its tokens)."""

    def losses(model: nn.Module, batch: Batch) -> Tensor:
        logits = logits_of(model, batch)
        ids = batch["input_ids"]
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return tok.view(ids.shape[0], -1).sum(dim=1)

    return losses


def lm_tokens(batch: Batch) -> float:
    ids = batch["input_ids"]
    return float(ids.shape[0] * (ids.shape[1] - 1))


def token_ids(vocab: int, seq: int) -> Callable[[torch.Generator, int], Batch]:
    return lambda gen, B: {"input_ids": torch.randint(1, vocab, (B, seq), generator=gen)}


def hf_logits(model: nn.Module, batch: Batch) -> Tensor:
    return model(**batch).logits


def causal_lm(name: str, make: Callable[[], nn.Module], vocab: int = 40, seq: int = 6, **kw: Any) -> ZooCase:
    return ZooCase(name, make, token_ids(vocab, seq), lm_losses(hf_logits), lm_tokens, **kw)


def classifier_losses(logits_of: Callable[[nn.Module, Batch], Tensor]) -> Callable[[nn.Module, Batch], Tensor]:
    def losses(model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(logits_of(model, batch), batch["labels"], reduction="none")

    return losses


def examples(batch: Batch) -> float:
    return float(next(iter(batch.values())).shape[0])


def sequence_classifier(name: str, make: Callable[[], nn.Module], vocab: int = 40, seq: int = 6, classes: int = 3,
                        **kw: Any) -> ZooCase:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        return {"input_ids": torch.randint(1, vocab, (B, seq), generator=gen),
                "labels": torch.randint(0, classes, (B,), generator=gen)}

    return ZooCase(name, make, make_batch,
                   classifier_losses(lambda m, b: logits(m(input_ids=b["input_ids"]))), examples, **kw)


def logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def masked_lm(name: str, make: Callable[[], nn.Module], vocab: int = 40, seq: int = 6, **kw: Any) -> ZooCase:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        ids = torch.randint(4, vocab, (B, seq), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, 1::2] = ids[:, 1::2]
        masked = ids.clone()
        masked[:, 1::2] = 3  # the mask token
        return {"input_ids": masked, "labels": labels}

    def losses(model: nn.Module, batch: Batch) -> Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                              reduction="none", ignore_index=-100)
        return tok.view(batch["labels"].shape[0], -1).sum(dim=1)

    return ZooCase(name, make, make_batch, losses, lambda b: float((b["labels"] != -100).sum()), **kw)


def image_classifier(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...] = (3, 8, 8), classes: int = 3,
                     key: str = "pixel_values", **kw: Any) -> ZooCase:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        return {key: torch.randn(B, *shape, generator=gen), "labels": torch.randint(0, classes, (B,), generator=gen)}

    def logits_of(m: nn.Module, b: Batch) -> Tensor:
        out = m(**{key: b[key]}) if key == "pixel_values" else m(b[key])
        return out.logits if hasattr(out, "logits") else out

    return ZooCase(name, make, make_batch, classifier_losses(logits_of), examples, **kw)


def seq2seq_lm(name: str, make: Callable[[], nn.Module], vocab: int = 40, seq: int = 6, **kw: Any) -> ZooCase:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        return {"input_ids": torch.randint(1, vocab, (B, seq), generator=gen),
                "decoder_input_ids": torch.randint(1, vocab, (B, seq - 1), generator=gen),
                "labels": torch.randint(1, vocab, (B, seq - 1), generator=gen)}

    def losses(model: nn.Module, batch: Batch) -> Tensor:
        lg = logits(model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]))
        tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), batch["labels"].reshape(-1), reduction="none")
        return tok.view(batch["labels"].shape[0], -1).sum(dim=1)

    return ZooCase(name, make, make_batch, losses, lambda b: float(b["labels"].numel()), **kw)


# ----------------------------------------------------------------------------- configs
def hf(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    """A random-init Hugging Face model from a tiny config, every dropout at 0 (train = eval)."""

    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        for key in list(vars(cfg)):
            if ("drop" in key or "pdrop" in key) and isinstance(getattr(cfg, key), float):
                setattr(cfg, key, 0.0)
        model = getattr(transformers, model_name)(cfg)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return model

    return build


DEC = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "vocab_size": 40, "max_position_embeddings": 32}
KV = {"num_key_value_heads": 2}
ENC = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "vocab_size": 40, "max_position_embeddings": 32}


# ----------------------------------------------------------------------------- torch's own
class Pooled(nn.Module):
    """Token ids -> embedding -> a body -> mean over positions -> classes."""

    def __init__(self, body: nn.Module, vocab: int = 40, dim: int = 16, classes: int = 3, seq_first: bool = False,
                 take: Callable[[Any], Tensor] | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = body
        self.head = nn.Linear(body_width(body, dim), classes)
        self.seq_first = seq_first
        self.take = take or (lambda out: out)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.emb(input_ids)  # (B, T, d)
        if self.seq_first:
            x = x.transpose(0, 1)  # (T, B, d)
        h = self.take(self.body(x))
        if self.seq_first:
            h = h.transpose(0, 1)
        return self.head(torch.tanh(h).mean(dim=1))


def body_width(body: nn.Module, dim: int) -> int:
    return getattr(body, "hidden_size", dim) * (2 if getattr(body, "bidirectional", False) else 1)


def encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


class Seq2SeqTransformer(nn.Module):
    """``nn.Transformer`` (encoder-decoder, sequence-first inside) as a batch-first LM."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.core = nn.Transformer(dim, 2, 1, 1, 32, dropout=0.0)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor) -> Tensor:
        src, tgt = self.emb(input_ids).transpose(0, 1), self.emb(decoder_input_ids).transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0])
        return self.head(self.core(src, tgt, tgt_mask=mask).transpose(0, 1))


class CellLoop(nn.Module):
    """An ``nn.LSTMCell`` stepped over the positions by hand."""

    def __init__(self, dim: int = 16, hidden: int = 12) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(dim, hidden)
        self.hidden_size = hidden

    def forward(self, x: Tensor) -> Tensor:
        h = c = x.new_zeros(x.shape[0], self.hidden_size)
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outs.append(h)
        return torch.stack(outs, dim=1)


class Bags(nn.Module):
    """``nn.EmbeddingBag`` called on the flattened ids with offsets (mean of each example's ids)."""

    def __init__(self, vocab: int = 40, dim: int = 8, classes: int = 3, mode: str = "mean") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        B, L = input_ids.shape
        offsets = torch.arange(0, B * L, L, device=input_ids.device)
        return self.head(torch.tanh(self.bag(input_ids.reshape(-1), offsets)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 16, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return out


def norm_cnn(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 3))


# ----------------------------------------------------------------------------- the table
# One row per architecture: encoders, decoders, encoder-decoders, vision, mixtures of experts
# (float32: grouped matmul has no float64 kernel; and its eager experts in float64), torch's own.
ZOO: list[ZooCase] = [
    causal_lm("gpt2", hf("GPT2Config","GPT2LMHeadModel", n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=32)),
    causal_lm("llama", hf("LlamaConfig","LlamaForCausalLM", **DEC, **KV)),
    causal_lm("mistral", hf("MistralConfig","MistralForCausalLM", **DEC, **KV)),
    causal_lm("qwen2", hf("Qwen2Config","Qwen2ForCausalLM", **DEC, **KV)),
    causal_lm("gpt_neox", hf("GPTNeoXConfig","GPTNeoXForCausalLM", **DEC)),
    causal_lm("phi", hf("PhiConfig","PhiForCausalLM", **DEC)),
    causal_lm("gemma", hf("GemmaConfig","GemmaForCausalLM", **DEC, **KV, head_dim=4)),
    causal_lm("opt", hf("OPTConfig","OPTForCausalLM", hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=40, max_position_embeddings=32, word_embed_proj_dim=16)),
    causal_lm("bloom", hf("BloomConfig","BloomForCausalLM", hidden_size=16, n_layer=2, n_head=4, vocab_size=40)),
    causal_lm("falcon", hf("FalconConfig","FalconForCausalLM", hidden_size=16, num_hidden_layers=2, num_attention_heads=4, vocab_size=40)),
    causal_lm("gptj", hf("GPTJConfig","GPTJForCausalLM", n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=32, rotary_dim=4)),
    causal_lm("mixtral", hf("MixtralConfig","MixtralForCausalLM", **DEC, **KV, num_local_experts=4, num_experts_per_tok=2), dtype=torch.float32, tol=1e-4, oracle_dtype=torch.float32),
    causal_lm("olmoe", hf("OlmoeConfig","OlmoeForCausalLM", **DEC, **KV, num_experts=4, num_experts_per_tok=2), dtype=torch.float32, tol=1e-4, oracle_dtype=torch.float32),
    sequence_classifier("distilbert", hf("DistilBertConfig","DistilBertForSequenceClassification", dim=16, hidden_dim=32, n_layers=2, n_heads=4, vocab_size=40, max_position_embeddings=32, num_labels=3)),
    sequence_classifier("bert-cls", hf("BertConfig","BertForSequenceClassification", **ENC, num_labels=3)),
    masked_lm("bert-mlm", hf("BertConfig","BertForMaskedLM", **ENC)),
    masked_lm("roberta-mlm", hf("RobertaConfig","RobertaForMaskedLM", **ENC, pad_token_id=0)),
    masked_lm("albert-mlm", hf("AlbertConfig","AlbertForMaskedLM", embedding_size=8, **ENC)),
    masked_lm("electra-mlm", hf("ElectraConfig","ElectraForMaskedLM", embedding_size=8, **ENC)),
    seq2seq_lm("t5", hf("T5Config","T5ForConditionalGeneration", d_model=16, d_ff=32, num_layers=2, num_heads=4, d_kv=4, vocab_size=40, decoder_start_token_id=0)),
    seq2seq_lm("bart", hf("BartConfig","BartForConditionalGeneration", d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=40, max_position_embeddings=32)),
    image_classifier("vit", hf("ViTConfig","ViTForImageClassification", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=4, num_labels=3)),
    image_classifier("swin", hf("SwinConfig","SwinForImageClassification", image_size=16, patch_size=4, embed_dim=8, depths=[1,1], num_heads=[2,2], window_size=2, num_labels=3), shape=(3,16,16)),
    image_classifier("convnext", hf("ConvNextConfig","ConvNextForImageClassification", num_stages=2, hidden_sizes=[8,16], depths=[1,1], num_labels=3, image_size=16), shape=(3,16,16)),
    sequence_classifier("torch-encoder-bf", lambda: Pooled(encoder(True))),
    sequence_classifier("torch-encoder-sf", lambda: Pooled(encoder(False), seq_first=True)),
    seq2seq_lm("torch-transformer", lambda: Seq2SeqTransformer()),
    sequence_classifier("torch-lstm", lambda: Pooled(nn.LSTM(16, 12, num_layers=2, batch_first=True), take=lambda o: o[0])),
    sequence_classifier("torch-gru-sf", lambda: Pooled(nn.GRU(16, 12), seq_first=True, take=lambda o: o[0])),
    sequence_classifier("torch-rnn-bi", lambda: Pooled(nn.RNN(16, 12, batch_first=True, bidirectional=True), take=lambda o: o[0])),
    sequence_classifier("torch-lstmcell", lambda: Pooled(CellLoop())),
    sequence_classifier("torch-mha", lambda: Pooled(SelfAttention())),
    sequence_classifier("torch-embeddingbag", lambda: Bags()),
    image_classifier("torch-cnn-groupnorm", lambda: norm_cnn(nn.GroupNorm(4, 8)), key="x"),
    image_classifier("torch-cnn-instancenorm", lambda: norm_cnn(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)), key="x"),
    causal_lm("mixtral-eager-f64", hf("MixtralConfig","MixtralForCausalLM", **DEC, **KV, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")),
]
