"""Documents packed into rows (``tracker.step(ids, segments=seg)``): one value per document.

The oracle back-propagates each document's loss alone through a float64 copy of the model, with
plain autograd, and trains the copy in lockstep. Three ways to pack (a tiny Llama):
``position_ids`` per document with ``use_cache=False`` and an explicit block mask keep documents
apart (every route splits its per-token terms by document); EOS-only packing (plain causal
attention across documents) does not, and the tracker must move the mixed parameters to the
directional derivative at an enclosing module and still be exact. Documents span rows and
micro-batches; padding (``-1``) gets nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from inrun import InRunShapley
from inrun.errors import BatchMismatchError, UnsupportedModuleError

T = 10
VOCAB = 40
LR = 0.3

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> nn.Module:
    """A float64 Llama whose norms compute in float64 (``LlamaRMSNorm`` rounds to float32 inside,
    which forward- and reverse-mode round differently at 1e-7; ``nn.RMSNorm`` is the same math)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(config).double()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=torch.float64)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                setattr(parent, name, norm)
    return model


def pack(docs: list[tuple[str, int]], rows: int, gen: torch.Generator) -> dict:
    """Documents laid end to end into ``rows`` rows of ``T`` tokens (a document reaching a row's
    end continues in the next row); the rest is padding."""
    ids = torch.randint(1, VOCAB, (rows, T), generator=gen)
    seg = torch.full((rows, T), -1)
    pos = torch.zeros(rows, T, dtype=torch.long)
    names: list[str] = []
    r = t = 0
    for name, length in docs:
        names.append(name)
        while length:
            take = min(length, T - t)
            seg[r, t:t + take] = len(names) - 1
            pos[r, t:t + take] = torch.arange(take)
            t, length = t + take, length - take
            if t == T:
                r, t = r + 1, 0
    if r < rows:
        pos[r, t:] = torch.arange(T - t)  # padding: a block of its own
    ids[seg < 0] = 0
    return {"input_ids": ids, "position_ids": pos, "segments": seg, "ids": names}


def token_losses(logits: Tensor, batch: dict) -> Tensor:
    """``[B, T-1]`` next-token losses, 0 where the next token is not the same document's (its
    last token, padding). The term at position ``t`` belongs to ``segments[:, t]``."""
    seg, ids = batch["segments"], batch["input_ids"]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    keep = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] >= 0)
    return nll * keep


def block_mask(seg: Tensor) -> Tensor:
    """``[B, 1, T, T]`` additive mask: causal within a document, padding attending to itself."""
    same = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    same |= torch.eye(T, dtype=torch.bool)
    return torch.zeros(seg.shape[0], T, T, dtype=torch.float64).masked_fill(~same, torch.finfo(torch.float64).min)[:, None]


def logits_of(model: nn.Module, batch: dict, packing: str) -> Tensor:
    if packing == "position_ids":
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    if packing == "block_mask":
        return model(input_ids=batch["input_ids"], attention_mask=block_mask(batch["segments"])).logits
    return model(input_ids=batch["input_ids"]).logits  # EOS-only: causal across documents


STEPS = [  # per optimizer step, its micro-batches' documents: "b" spans two rows, "e" two micro-batches
    [[("a", 4), ("b", 9), ("c", 3), ("d", 4)], [("e", 6), ("f", 7), ("g", 3)]],
    [[("e", 7), ("h", 5), ("i", 2)], [("j", 12), ("k", 5)]],
]


def batches() -> list[list[dict]]:
    gen = torch.Generator().manual_seed(1)
    return [[pack(docs, 2, gen) for docs in step] for step in STEPS]


def val_loss(model: nn.Module) -> Tensor:
    val = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    logits = model(input_ids=val).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), val[:, 1:].reshape(-1))


def oracle_values(model: nn.Module, steps: list[list[dict]], packing: str) -> dict[str, float]:
    """η g_val·g_d with g_d from each document's loss alone, summed over the run (SGD)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    values: dict[str, float] = {}
    for step in steps:
        g_val = torch.autograd.grad(val_loss(model), params)
        count = sum(int(((b["segments"][:, :-1] == b["segments"][:, 1:]) & (b["segments"][:, :-1] >= 0)).sum())
                    for b in step)
        for b in step:
            losses = token_losses(logits_of(model, b, packing), b) / count
            for k, name in enumerate(b["ids"]):
                g_doc = torch.autograd.grad((losses * (b["segments"][:, :-1] == k)).sum(), params, retain_graph=True)
                dot = sum(float((a * v).sum()) for a, v in zip(g_doc, g_val))
                values[name] = values.get(name, 0.0) + LR * dot
            losses.sum().backward()
        opt.step()
        opt.zero_grad()
    return values


def tracked_values(model: nn.Module, steps: list[list[dict]], packing: str, **options: object) -> InRunShapley:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = InRunShapley(model, opt, val_loss=val_loss, **options)
    for step in steps:
        count = sum(int(((b["segments"][:, :-1] == b["segments"][:, 1:]) & (b["segments"][:, :-1] >= 0)).sum())
                    for b in step)
        for b in step:
            with tracker.step(b["ids"], segments=b["segments"], token_values=True):
                (token_losses(logits_of(model, b, packing), b).sum() / count).backward()
        opt.step()
        opt.zero_grad()
    return tracker


@pytest.mark.parametrize("packing", ["position_ids", "block_mask", "eos_only"])
def test_documents_equal_the_oracle(packing: str) -> None:
    model = tiny_llama()
    steps = batches()
    expected = oracle_values(model, steps, packing)
    tracker = tracked_values(model, steps, packing)
    got = tracker.values()
    names = sorted(expected)
    assert sorted(got.ids()) == names  # "e" (two micro-batches) is one player
    ours = np.array([got[n] for n in names])
    theirs = np.array([expected[n] for n in names])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12 * np.abs(theirs).max())
    coverage = tracker.coverage()
    assert coverage.documents is not None
    moved = [n for n, _, at in coverage.per_parameter() if "(site)" in at]
    if packing == "eos_only":
        # documents attend to each other: the mixed parameters are valued by the directional
        # derivative at an enclosing module (the trunk), and coverage says so
        assert "model.embed_tokens.weight" in moved and "model.layers.0.self_attn.q_proj.weight" in moved
        assert "lm_head.weight" not in moved
        assert "directional derivative" in str(coverage)
    else:
        assert moved == []  # every layer split by document on its fast route

    # token values: the first-order terms summed by document; padding (-1) holds 0
    tokens = tracker.token_values()
    assert len(tokens) == 4
    frame = tokens.to_pandas()
    by_doc = frame.groupby("id")["value"].sum()
    np.testing.assert_allclose(by_doc[names].to_numpy(), ours, rtol=1e-9, atol=1e-14)
    for record in tokens:
        assert np.all(record.values[record.segments < 0] == 0)


def test_documents_as_rows_equal_rows() -> None:
    """One document per row (segments = the row index, -1 at padding): the same values as plain
    row ids, for Adam's secant and order 2 too (every value rule goes through the split)."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (3, T), generator=gen)
    seg = torch.arange(3)[:, None].expand(3, T).clone()
    seg[2, 6:] = -1
    keep = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] >= 0)

    def loss(model: nn.Module) -> Tensor:
        logits = model(input_ids=ids).logits
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        return (nll.view(3, T - 1) * keep).sum() / keep.sum()

    for opt_type, options in [(torch.optim.AdamW, {}), (torch.optim.SGD, {"order": 2})]:
        runs = []
        for segments in (None, seg):
            model = tiny_llama()
            opt = opt_type(model.parameters(), lr=1e-2)
            tracker = InRunShapley(model, opt, val_loss=val_loss, **options)
            for _ in range(2):
                with tracker.step(["x", "y", "z"], segments=segments):
                    loss(model).backward()
                opt.step()
                opt.zero_grad()
            runs.append(tracker.values().value)
        np.testing.assert_allclose(runs[1], runs[0], rtol=1e-9, atol=1e-14 * np.abs(runs[0]).max())


def test_padding_gets_nothing_and_is_kept_out_of_the_loss() -> None:
    model = tiny_llama()
    b = batches()[1][1]  # its second row ends in padding
    assert (b["segments"] == -1).any()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    logits = logits_of
    with pytest.raises(UnsupportedModuleError, match="tokens of no document"), \
            tracker.step(b["ids"], segments=b["segments"]):
        nll = -torch.log_softmax(logits(model, b, "position_ids"), -1)[..., 0]  # every position in the loss
        nll.mean().backward()


def test_segments_are_checked() -> None:
    model = tiny_llama()
    tracker = InRunShapley(model, torch.optim.SGD(model.parameters(), lr=LR), val_loss=val_loss)
    b = batches()[0][0]
    bad = [
        (b["segments"].double(), "integer tensor"),
        (b["segments"][0], r"\[batch, tokens\]"),
        (torch.where(b["segments"] == 3, 7, b["segments"]), "must index ids"),
        (torch.where(b["segments"] == 3, 2, b["segments"]), "'d' has no token"),
    ]
    for seg, message in bad:
        with pytest.raises(BatchMismatchError, match=message), tracker.step(b["ids"], segments=seg):
            pass
    with pytest.raises(BatchMismatchError, match="needs segments"), tracker.step(b["ids"], token_values=True):
        pass
    with pytest.raises(BatchMismatchError, match="no output of the model has those positions"), \
            tracker.step(b["ids"], segments=b["segments"]):
        model(input_ids=b["input_ids"][:, :5]).logits.sum().backward()


def test_the_documents_page_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip
    import json
    import re
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # (its export writes a corpus and its attribute files)
    page = Path(__file__).resolve().parents[1] / "docs" / "documents.md"
    code = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
    scope: dict = {"__name__": "documents_page"}
    exec(compile(code, str(page), "exec"), scope)
    values = scope["tracker"].values()
    assert sorted(values.ids()) == ["a", "b", "c"]
    (step, rows, positions, token) = scope["tracker"].token_values().of("b")[0]
    assert step == 0 and list(positions) == [3, 4, 5, 6, 7]
    np.testing.assert_allclose(token.sum(), values["b"], rtol=1e-6)
    with gzip.open(tmp_path / "corpus/attributes/inrun/2024/part-0.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == ["doc-a", "doc-b", "doc-c"]
    assert rows[2]["attributes"] == {"inrun__count": [[0, 5, 1]], "inrun__value": [[0, 5, -0.25]]}
    assert rows[1]["attributes"] == {"inrun__count": [[0, 9, 0]]}
