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


def slice_batch(batch: Batch, rows: slice | list[int]) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


def training_loss(case: ZooCase, model: nn.Module, batch: Batch) -> Tensor:
    return case.losses(model, batch).sum() / case.normalizer(batch)


def oracle_gradients(case: ZooCase, model: nn.Module, batch: Batch) -> list[dict[str, Tensor]]:
    """Each example's gradient of its share of the loss, computed on that example alone."""
    ref = copy.deepcopy(model).double()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    norm = case.normalizer(batch)
    B = next(iter(batch.values())).shape[0]
    out = []
    for z in range(B):
        row = {k: (v[z : z + 1].double() if v.is_floating_point() else v[z : z + 1]) for k, v in batch.items()}
        share = case.losses(ref, row).sum() / norm
        grads = torch.autograd.grad(share, list(params.values()), allow_unused=True)
        out.append({n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(params.items(), grads)})
    return out


def val_gradient(val_loss: Callable[[nn.Module], Tensor], model: nn.Module) -> dict[str, Tensor]:
    ref = copy.deepcopy(model).double().eval()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(val_loss(ref), list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(params.items(), grads)}


def run_case(case: ZooCase, steps: int = 2, optimizer: str = "sgd", **options: Any) -> float:
    """Train ``steps`` tracked steps; assert the values equal the oracle's; return the worst
    error relative to ``η ‖g_z‖ ‖g_val‖`` (SGD; with AdamW the oracle dots with ``−D ⊙ g_val``
    are not formed here, so AdamW runs check the step's efficiency against plain autograd)."""
    from inrun import InRunShapley

    torch.manual_seed(0)
    model = case.build().to(case.dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=case.lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-3)
    val = cast(case.make_batch(torch.Generator().manual_seed(7), 2), case.dtype)

    def val_loss(m: nn.Module) -> Tensor:
        return training_loss(case, m, cast(val, next(m.parameters()).dtype))

    tracker = InRunShapley(model, opt, val_loss=val_loss, **{**case.tracker_options, **options})
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(steps):
        batch = cast(case.make_batch(gen, case.batch_size), case.dtype)
        ids = list(range(step * case.batch_size, (step + 1) * case.batch_size))
        if optimizer == "sgd" and options.get("order", 1) == 1:
            per_example = oracle_gradients(case, model, batch)
            g_val = val_gradient(val_loss, model)
            expected = [case.lr * sum(float((g[n] * g_val[n]).sum()) for n in g) for g in per_example]
            scale = [
                case.lr * float(torch.sqrt(sum((g[n] ** 2).sum() for n in g))) * float(torch.sqrt(sum((v**2).sum() for v in g_val.values())))
                for g in per_example
            ]
        with tracker.step(ids):
            training_loss(case, model, batch).backward()
        opt.step()
        opt.zero_grad()
        if optimizer == "sgd" and options.get("order", 1) == 1:
            got = tracker.values()
            for i, e, s in zip(ids, expected, scale):
                err = abs(got[i] - e) / (s + 1e-300)
                worst = max(worst, err)
                assert err <= case.tol, f"{case.name}: id {i} tracker {got[i]!r} vs oracle {e!r} (relative error {err:.2e})"
    tracker.close()
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
                   classifier_losses(lambda m, b: m(input_ids=b["input_ids"]).logits), examples, **kw)


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
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
        return tok.view(batch["labels"].shape[0], -1).sum(dim=1)

    return ZooCase(name, make, make_batch, losses, lambda b: float(b["labels"].numel()), **kw)


# ----------------------------------------------------------------------------- the table
def hf(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    """A random-init Hugging Face model from a tiny config, every dropout at 0 (train = eval)."""

    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        for key in list(vars(cfg)):
            if ("dropout" in key or "pdrop" in key or key.endswith("_drop")) and isinstance(getattr(cfg, key), float):
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
