"""Models, losses, optimizers and schedules a run config describes.

* ``hf``: a Hugging Face causal language model built from ``AutoConfig.for_model(hf_type,
  **hf_config)`` with random weights (no download), on byte tokens; optionally wrapped in LoRA
  adapters (``peft``), in which case only the adapters train and are valued.
* ``mlp``: ``Linear -> ReLU`` blocks and a linear classifier.
* ``cnn``: 3x3 ``Conv2d -> ReLU`` blocks and a linear classifier (image data: digits).

Losses are batch means, so an example's value is that of its share of the loss (see README).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, ModelConfig, OptimizerConfig, ScheduleConfig
from .data.base import ExampleSet
from .data.stdlib import VOCAB_SIZE

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(cfg: ModelConfig, data: ExampleSet) -> nn.Module:
    """The model for ``cfg``, shaped for ``data`` (vocabulary, context, features, classes)."""
    if cfg.kind == "hf":
        model = _hf_model(cfg, data)
    elif cfg.kind == "mlp":
        widths = [data.inputs.shape[1], *(cfg.hidden or (64,))]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(widths[-1], data.num_classes or 2))
    else:
        if data.image_shape is None:
            raise ValueError("model.kind = 'cnn' needs image data")
        c, h, w = data.image_shape
        chans = [c, *(cfg.channels or (8, 16))]
        layers = [nn.Unflatten(1, data.image_shape)]
        for a, b in itertools.pairwise(chans):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(chans[-1] * h * w, data.num_classes or 2))
    return model.to(DTYPES[cfg.dtype])


def _hf_model(cfg: ModelConfig, data: ExampleSet) -> nn.Module:
    from transformers import AutoConfig

    length = data.inputs.shape[1]
    fields = dict(cfg.hf_config or {})
    fields.setdefault("vocab_size", VOCAB_SIZE)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(key, 0)
    try:
        hf_config = AutoConfig.for_model(cfg.hf_type, **fields)
    except (KeyError, ValueError) as exc:
        raise ConfigError("model.hf_type", f"transformers does not know {cfg.hf_type!r} ({exc})") from None
    if getattr(hf_config, "max_position_embeddings", length) < length:
        hf_config.max_position_embeddings = length
    if hf_config.vocab_size < VOCAB_SIZE:
        raise ConfigError("model.hf_config.vocab_size", f"must be at least {VOCAB_SIZE} (byte tokens)")
    model = causal_lm(hf_config)
    if cfg.lora is not None:
        model = _with_lora(model, cfg)
    return model


def causal_lm(hf_config: Any) -> nn.Module:
    """A randomly initialised causal LM for a transformers config, with its loss type set
    (transformers infers it from the class name, and GPT2LMHeadModel's does not say it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config)
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def _with_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in requirements.txt
        raise ImportError("[model.lora] needs peft: pip install 'inrun[hf]'") from exc
    lora = cfg.lora
    assert lora is not None
    target = list(lora.target_modules) if lora.target_modules else None
    with warnings.catch_warnings():
        # GPT-2's Conv1D stores its weight transposed; peft warns and sets fan_in_fan_out itself.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        # peft calls a transformers method that transformers 5 deprecates; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
            fan_in_fan_out=cfg.hf_type == "gpt2",
        )
        return get_peft_model(model, peft_cfg)


def loss_function(data: ExampleSet) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """``loss(model, inputs, targets)``: the batch-mean training loss for the data's task."""
    if data.task == "lm":

        def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            return model(input_ids=x, labels=y).loss

        return lm_loss

    def classify_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    return classify_loss


def packed_lm_loss(model: nn.Module, x: Tensor, y: Tensor, positions: Tensor) -> Tensor:
    """The batch-mean loss of rows of packed documents: ``position_ids`` restart per document and
    no cache is built, so that a Hugging Face causal LM attends only within each document."""
    return model(input_ids=x, position_ids=positions, labels=y, use_cache=False).loss


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The torch optimizer over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum or 0.0,
            nesterov=bool(cfg.nesterov),
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas or (0.9, 0.999)),
        eps=cfg.eps if cfg.eps is not None else 1e-8,
    )


def build_schedule(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then constant / linear / cosine decay, as a ``LambdaLR`` (checkpointable)."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    kind = cfg.kind

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
