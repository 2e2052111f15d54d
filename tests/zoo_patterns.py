"""Zoo rows for ways of building and calling models that once crashed the tracker or were refused
although exact values are within reach, each valued against the zoo's oracle (or refused with a
one-line error that names the module and the fix):

* models that compute their loss in ``forward`` (``model(input_ids=x, labels=y).loss``: T5 and
  LongT5 whose decoder inputs come from the model's own shift, Whisper, a PEFT DoRA Llama, a custom
  ``(loss, logits)`` model with a parameter of its own), and one that returns only its loss;
* a GRU fed a ``PackedSequence`` (``enforce_sorted=False``);
* activation checkpointing, reentrant and not (``torch.utils.checkpoint``, HF's
  ``gradient_checkpointing_enable``);
* ops without a forward-mode derivative: ``weight_norm`` (the parametrization, the legacy hook,
  wav2vec2's positional convolution), custom autograd Functions without ``jvp`` (RecurrentGemma's
  too); ``spectral_norm``, whose power iteration updates buffers at every training forward;
* Hugging Face models whose training forward writes a key/value or state cache (LFM2, Jamba,
  gpt-oss, Qwen3-Next).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint
from zoo import (
    DEC,
    KV,
    Batch,
    ZooCase,
    causal_lm,
    classifier_losses,
    examples,
    hf,
    image_classifier,
    sequence_classifier,
)


# ----------------------------------------------------------------------------- losses in forward
def with_labels(name: str, make: Callable[[], nn.Module], inputs: Callable[[torch.Generator, int], Batch],
                vocab: int = 40, seq: int = 5, **kw: Any) -> ZooCase:
    """An encoder-decoder trained as users do: ``model(**inputs, labels=y).loss`` (the decoder's
    inputs are the labels shifted by the model itself; the loss a mean over the label tokens)."""

    def make_batch(gen: torch.Generator, B: int) -> Batch:
        return {**inputs(gen, B), "labels": torch.randint(1, vocab, (B, seq), generator=gen)}

    def losses(model: nn.Module, batch: Batch) -> Tensor:
        lg = model(**batch).logits
        tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), batch["labels"].reshape(-1), reduction="none")
        return tok.view(batch["labels"].shape[0], -1).sum(dim=1)

    return ZooCase(name, make, make_batch, losses, lambda b: float(b["labels"].numel()),
                   train=lambda m, b: m(**b).loss, **kw)


def ids(vocab: int = 40, seq: int = 6) -> Callable[[torch.Generator, int], Batch]:
    return lambda gen, B: {"input_ids": torch.randint(1, vocab, (B, seq), generator=gen)}


def features(mel: int = 8, frames: int = 16) -> Callable[[torch.Generator, int], Batch]:
    return lambda gen, B: {"input_features": torch.randn(B, mel, frames, generator=gen)}


def causal_lm_with_labels(name: str, make: Callable[[], nn.Module], **kw: Any) -> ZooCase:
    """A decoder trained with ``model(input_ids=x, labels=x).loss``. Transformers computes that loss
    from logits cast to float32, hence the float32-level tolerance."""
    case = causal_lm(name, make, tol=1e-6, **kw)
    case.train = lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss
    return case


def dora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = hf("LlamaConfig", "LlamaForCausalLM", **DEC, **KV)()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            use_dora=True, lora_dropout=0.0))


class LossAndLogits(nn.Module):
    """Computes its mean loss in ``forward`` and returns ``(loss, logits)``; a temperature of its
    own makes the whole model a module the fallback values (its outputs: one without rows)."""

    def __init__(self, only_loss: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.only_loss = only_loss

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        logits = self.net(x) * self.temperature
        if labels is None:
            return logits
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss} if self.only_loss else (loss, logits)


def loss_in_forward(name: str, only_loss: bool = False, **kw: Any) -> ZooCase:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        return {"x": torch.randn(B, 5, generator=gen), "labels": torch.randint(0, 3, (B,), generator=gen)}

    def train(m: nn.Module, b: Batch) -> Tensor:
        out = m(b["x"], b["labels"])
        return out["loss"] if only_loss else out[0]

    return ZooCase(name, lambda: LossAndLogits(only_loss), make_batch,
                   classifier_losses(lambda m, b: m(b["x"])), examples, train=train, **kw)


# ----------------------------------------------------------------------------- packed sequences
class PackedGRU(nn.Module):
    """Padded token ids -> ``pack_padded_sequence(enforce_sorted=False)`` -> GRU -> classes (the
    packed rows are time-major and sorted by length: not the batch's)."""

    def __init__(self, vocab: int = 40, dim: int = 16, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        lengths = (input_ids != 0).sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, h = self.rnn(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)  # (B, T_max, hidden)
        return self.head(torch.tanh(padded).sum(dim=1) + h[-1])


def padded_ids(vocab: int = 40, seq: int = 6, classes: int = 3) -> Callable[[torch.Generator, int], Batch]:
    def make_batch(gen: torch.Generator, B: int) -> Batch:
        tokens = torch.randint(1, vocab, (B, seq), generator=gen)
        lengths = torch.randint(2, seq + 1, (B,), generator=gen)
        tokens[torch.arange(seq)[None] >= lengths[:, None]] = 0
        return {"input_ids": tokens, "labels": torch.randint(0, classes, (B,), generator=gen)}

    return make_batch


# ----------------------------------------------------------------------------- checkpointing
class Checkpointed(nn.Module):
    """Pre-norm MLP blocks, each run through ``torch.utils.checkpoint``."""

    def __init__(self, reentrant: bool, vocab: int = 40, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(2)
        )
        self.head = nn.Linear(dim, classes)
        self.reentrant = reentrant

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.emb(input_ids)
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x.mean(dim=1))


def hf_checkpointed(config: str, model: str, reentrant: bool, **kw: Any) -> Callable[[], nn.Module]:
    make = hf(config, model, **kw)

    def build() -> nn.Module:
        m = make()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return m

    return build


GPT2 = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 32}


# ----------------------------------------------------------------------------- no forward mode
class NormedTCN(nn.Module):
    """A temporal convolutional network (dilated causal convolutions, residual) whose convolutions
    carry ``weight_norm`` (parametrization or legacy hook) or ``spectral_norm``."""

    def __init__(self, norm: str, vocab: int = 40, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        wrap = {"weight_norm": parametrizations.weight_norm, "legacy_weight_norm": nn.utils.weight_norm,
                "spectral_norm": parametrizations.spectral_norm}[norm]
        self.emb = nn.Embedding(vocab, dim)
        self.dilations = (1, 2)
        self.convs = nn.ModuleList(wrap(nn.Conv1d(dim, dim, 2, dilation=d)) for d in self.dilations)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.emb(input_ids).transpose(1, 2)  # (B, d, T)
        for conv, d in zip(self.convs, self.dilations):
            x = x + torch.relu(conv(F.pad(x, (d, 0))))  # causal: pad on the left
        return self.head(x.mean(dim=2))


class TanhLinear(torch.autograd.Function):
    """``tanh(x Wᵀ)`` with a hand-written backward and no ``jvp`` (old-style ``ctx`` forward)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        y = torch.tanh(x @ w.T)
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, w, y = ctx.saved_tensors
        g = grad * (1 - y * y)
        return g @ w, torch.einsum("...o,...i->oi", g, x)


class Cube(torch.autograd.Function):
    """``x³`` with ``setup_context`` and no ``jvp``."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class CustomFunctions(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.emb(input_ids)
        return self.head((TanhLinear.apply(x, self.w) + Cube.apply(x)).mean(dim=1))


def wav2vec2() -> nn.Module:
    """wav2vec2 (its positional convolution carries the legacy ``weight_norm``)."""
    return hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", hidden_size=16, intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
              num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8,
              mask_time_prob=0.0, vocab_size=40)()


# ----------------------------------------------------------------------------- the table
SMALL = {**DEC, **KV}
T5 = {"d_model": 16, "d_ff": 32, "num_layers": 2, "num_heads": 4, "d_kv": 4, "vocab_size": 40, "decoder_start_token_id": 0}
EAGER = {"experts_implementation": "eager"}  # float64: grouped matmul has no float64 kernel

PATTERNS: list[ZooCase] = [
    with_labels("t5-labels", hf("T5Config", "T5ForConditionalGeneration", **T5), ids()),
    with_labels("longt5-labels", hf("LongT5Config", "LongT5ForConditionalGeneration", **T5), ids()),
    with_labels("whisper-labels", hf("WhisperConfig", "WhisperForConditionalGeneration", d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=40, num_mel_bins=8, max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0), features()),
    causal_lm_with_labels("llama-dora-labels", dora_llama),
    loss_in_forward("loss-and-logits"),
    loss_in_forward("loss-only", only_loss=True, refused=r"LossAndLogits's forward returned only a scalar \(a loss\).*`return loss, logits`"),
    ZooCase("gru-packed-sequence", PackedGRU, padded_ids(), classifier_losses(lambda m, b: m(b["input_ids"])), examples),
    sequence_classifier("torch-checkpoint-reentrant", lambda: Checkpointed(reentrant=True)),
    sequence_classifier("torch-checkpoint", lambda: Checkpointed(reentrant=False)),
    causal_lm("gpt2-checkpoint-reentrant", hf_checkpointed("GPT2Config", "GPT2LMHeadModel", True, **GPT2)),
    causal_lm("gpt2-checkpoint", hf_checkpointed("GPT2Config", "GPT2LMHeadModel", False, **GPT2)),
    causal_lm("llama-checkpoint-reentrant", hf_checkpointed("LlamaConfig", "LlamaForCausalLM", True, **SMALL)),
    sequence_classifier("tcn-weight-norm", lambda: NormedTCN("weight_norm")),
    sequence_classifier("tcn-legacy-weight-norm", lambda: NormedTCN("legacy_weight_norm")),
    sequence_classifier("tcn-spectral-norm", lambda: NormedTCN("spectral_norm")),
    sequence_classifier("custom-functions-without-jvp", CustomFunctions),
    image_classifier("wav2vec2", wav2vec2, shape=(64,), key="input_values"),
    causal_lm("recurrent-gemma", hf("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=40, lru_width=16, attention_window_size=4, conv1d_width=2, block_types=["recurrent", "attention"], head_dim=4)),
    causal_lm("lfm2", hf("Lfm2Config", "Lfm2ForCausalLM", **SMALL, layer_types=["conv", "full_attention"])),
    causal_lm("jamba", hf("JambaConfig", "JambaForCausalLM", **SMALL, **EAGER, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4)),
    causal_lm("gpt-oss", hf("GptOssConfig", "GptOssForCausalLM", **SMALL, **EAGER, head_dim=4, num_local_experts=2, num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    causal_lm("qwen3-next", hf("Qwen3NextConfig", "Qwen3NextForCausalLM", **SMALL, **EAGER, head_dim=4, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=2, layer_types=["linear_attention", "full_attention"])),
]
