"""The main job on the embedded default: value a small GPT-2's training on Python's own sources.

A GPT-2 built from ``GPT2Config`` (random init, byte vocabulary) trains for a few hundred steps
on chunks of the standard library; held-out modules are the validation set; every chunk's
In-Run Data Shapley value is computed during training. The run directory gets the value ledger
(Parquet), the chunk table (id, source, file, offset, text) and a JSON summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.stdlib import DEFAULT_PACKAGES, VOCAB_SIZE, CodeCorpus, load_stdlib_corpus
from .ledger import ValueTable, atomic_write
from .tracker import InRunShapley


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run (small enough for 2 CPU cores in a couple of minutes)."""

    steps: int = 400
    batch_size: int = 16
    length: int = 128
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    lr: float = 1.0
    clip: float = 1.0
    max_train_per_source: int = 150
    n_val: int = 8
    seed: int = 0
    order: int = 1
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "length", "n_layer", "n_embd", "n_head", "n_val", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


def build_gpt2(cfg: DemoConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=VOCAB_SIZE,
        n_positions=cfg.length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(config)


def run_demo(cfg: DemoConfig, out_dir: Path, progress: Any = None) -> dict[str, Any]:
    """Train with the tracker and write the run directory; returns the summary dict."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train, val = load_stdlib_corpus(
        DEFAULT_PACKAGES, length=cfg.length, max_train_per_source=cfg.max_train_per_source, max_val=cfg.n_val
    )
    model = build_gpt2(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    val_tokens = val.tokens
    tracker = InRunShapley(
        model, opt, val_loss=lambda m: m(input_ids=val_tokens, labels=val_tokens).loss,
        order=cfg.order, keep_trace=True,
    )
    tracker.ledger.set_sources(train.sources)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=gen)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        lo = (step * cfg.batch_size) % len(train)
        if lo + cfg.batch_size > len(train):
            order = torch.randperm(len(train), generator=gen)
            lo = 0
        rows = order[lo : lo + cfg.batch_size]
        x = train.tokens[rows]
        ids = [train.chunks[int(r)].id for r in rows]
        with tracker.step(ids):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.steps, losses[-1], (step + 1) * cfg.batch_size / (time.perf_counter() - start))
    elapsed = time.perf_counter() - start
    values = tracker.values()
    with torch.no_grad():
        model.eval()
        val_loss = model(input_ids=val_tokens, labels=val_tokens).loss.item()
    tracker.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    tracker.ledger.save(out_dir)
    write_chunks(out_dir / "chunks.parquet", train)
    summary = summarize(values, train, losses, val_loss, elapsed, cfg)
    atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return summary


def write_chunks(path: Path, corpus: CodeCorpus) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": [c.id for c in corpus.chunks],
            "source": [c.source for c in corpus.chunks],
            "path": [c.path for c in corpus.chunks],
            "start": [c.start for c in corpus.chunks],
            "text": [c.text for c in corpus.chunks],
        }
    )
    atomic_write(path, lambda p: pq.write_table(table, p))


def summarize(
    values: ValueTable, train: CodeCorpus, losses: list[float], val_loss: float, elapsed: float, cfg: DemoConfig
) -> dict[str, Any]:
    chunks = train.by_id()

    def row(cid: Any, v: float) -> dict[str, Any]:
        c = chunks[cid]
        return {"id": cid, "value": v, "source": c.source, "location": c.location, "preview": preview(c.text)}

    per_source: dict[str, list[float]] = {}
    for cid, v in values.items():
        per_source.setdefault(chunks[cid].source, []).append(v)
    return {
        "config": asdict(cfg),
        "examples_valued": len(values),
        "steps": cfg.steps,
        "seconds": elapsed,
        "train_loss_first": float(np.mean(losses[:10])),
        "train_loss_last": float(np.mean(losses[-10:])),
        "val_loss_final": val_loss,
        "total_value": float(values.value.sum()),
        "negative_share": float((values.value < 0).mean()),
        "most_helpful": [row(i, v) for i, v in values.top(8)],
        "most_harmful": [row(i, v) for i, v in values.bottom(8)],
        "per_source": {
            s: {"chunks": len(v), "total": float(np.sum(v)), "mean": float(np.mean(v)), "negative_share": float(np.mean(np.array(v) < 0))}
            for s, v in sorted(per_source.items(), key=lambda kv: -np.sum(kv[1]))
        },
    }


def preview(text: str, width: int = 56) -> str:
    """One line of a chunk for a table: whitespace collapsed, escapes visible."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
