"""The CLI's packed stdlib data (``data.pack = true``): documents of whole lines packed several to a
row, each valued on its own.

The layout is checked piece by piece (segments, position_ids restarting per document, no target
across documents or on padding); the values of a packed batch of the demo's model family (a
float64 GPT-2 with ``position_ids`` packing, through the runner's own batch and loss) against an
oracle that back-propagates each document's loss alone; and a packed run end to end: its values
are keyed by document, its summary, ``inrun inspect`` and report say documents, and a resume
continues it bit for bit.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from cli_helpers import gpt2_config, run_in_process
from rich.console import Console

from inrun import InRunShapley
from inrun.analysis.inspect.run_dir import inspect_run
from inrun.analysis.report import build_report
from inrun.run.config import parse_config
from inrun.run.data import load_data
from inrun.run.data.base import IGNORE_INDEX
from inrun.run.data.packing import document_lengths, pack, packed_batch
from inrun.run.data.stdlib import document_pieces
from inrun.run.models import build_model, packed_lm_loss
from inrun.run.runner import RunInterrupted, train
from inrun.store.summary import summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_documents_are_whole_lines_of_varying_length() -> None:
    text = b"".join(f"line {k} " .encode() + b"x" * (k % 23) + b"\n" for k in range(300)) + b"y" * 70 + b"\n"
    pieces = document_pieces(text, 48, "some/file.py")
    assert all(len(p) <= 48 for _, p in pieces)
    assert all(text[s:s + len(p)] == p for s, p in pieces)  # each where it starts in the file
    assert all(p.endswith(b"\n") for _, p in pieces[:-3])  # whole lines (the long last line is cut)
    assert len({len(p) for _, p in pieces}) > 10  # lengths vary
    assert document_pieces(text, 48, "some/file.py") == pieces  # stable


def test_a_packed_batch_keeps_documents_apart() -> None:
    assert pack([3, 4, 2, 5, 1], 8) == [[0, 1], [2, 3, 4]]
    config = parse_config(gpt2_config("unused"), overrides=("data.pack=true",))
    train, _ = load_data(config)
    lengths = document_lengths(train)
    assert train.packed is not None and len(train.packed) < len(train) and max(map(len, train.packed)) > 1
    assert sorted(k for row in train.packed for k in row) == list(range(len(train)))  # every document once
    batch = packed_batch(train, [0, 5], lengths)
    assert batch.ids == [train.ids[k] for r in (0, 5) for k in train.packed[r]]
    for b, row in enumerate((0, 5)):
        at = 0
        for doc in train.packed[row]:
            n, k = lengths[doc], batch.ids.index(train.ids[doc])
            assert (batch.segments[b, at:at + n] == k).all()
            assert batch.positions[b, at:at + n].tolist() == list(range(n))
            assert batch.inputs[b, at:at + n].tolist() == train.inputs[doc, :n].tolist()
            assert batch.targets[b, at] == IGNORE_INDEX  # nothing predicts a document's first token
            assert batch.targets[b, at + 1:at + n].tolist() == train.inputs[doc, 1:n].tolist()
            at += n
        assert (batch.segments[b, at:] == -1).all() and (batch.targets[b, at:] == IGNORE_INDEX).all()


def test_packed_values_equal_each_documents_own_gradient() -> None:
    """Two SGD steps of the runner's packed batches and loss on a float64 GPT-2, against
    η g_val·g_d with g_d back-propagated from document d's loss terms alone."""
    config = parse_config(gpt2_config("unused"), overrides=("data.pack=true",))
    train, val = load_data(config)
    lengths = document_lengths(train)
    torch.manual_seed(0)
    model = build_model(config.model, train).double()
    oracle_model = copy.deepcopy(model)
    fullest = sorted(range(len(train.packed)), key=lambda r: -len(train.packed[r]))[:5]
    batches = [packed_batch(train, rows, lengths) for rows in (fullest[:3], fullest[3:])]
    assert sum(len(b.ids) for b in batches) > 10  # several documents a row

    def val_loss(m: torch.nn.Module) -> torch.Tensor:
        return m(input_ids=val.inputs[:2], labels=val.targets[:2]).loss

    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = InRunShapley(model, opt, val_loss=val_loss)
    for b in batches:
        with tracker.step(b.ids, segments=b.segments):
            packed_lm_loss(model, b.inputs, b.targets, b.positions).backward()
        opt.step()
        opt.zero_grad()
    got = tracker.values()

    params = list(oracle_model.parameters())
    oracle_opt = torch.optim.SGD(params, lr=lr)
    want: dict = {}
    for b in batches:
        g_val = torch.autograd.grad(val_loss(oracle_model), params)
        # document k's share of the batch loss: its own targets, over all the batch's targets (the
        # loss of transformers computes in float32 inside: the same rounding as the run's loss)
        count = int((b.targets != IGNORE_INDEX).sum())
        for k, i in enumerate(b.ids):
            own = torch.where(b.segments == k, b.targets, IGNORE_INDEX)
            loss_k = oracle_model(input_ids=b.inputs, position_ids=b.positions, labels=own, use_cache=False,
                                  num_items_in_batch=count).loss
            g = torch.autograd.grad(loss_k, params)
            want[i] = want.get(i, 0.0) + lr * sum(float((a * v).sum()) for a, v in zip(g, g_val))
        packed_lm_loss(oracle_model, b.inputs, b.targets, b.positions).backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
    ids = list(want)
    expected = np.array([want[i] for i in ids])
    np.testing.assert_allclose([got[i] for i in ids], expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert "documents" in str(tracker.coverage())


def test_a_packed_run_values_and_reports_documents(tmp_path) -> None:
    text = gpt2_config(tmp_path / "packed", steps=6) + "[audit]\nevery = 3\nplayers = 4\n"
    config = ("data.pack=true", "checkpoint.every=3")
    result = run_in_process(text, overrides=config)
    corpus, _ = load_data(parse_config(text, overrides=config))
    rd = result.run_dir
    values = rd.ledger().values()
    assert set(values.ids()) <= set(corpus.ids) and len(values) > 6 * 8  # more documents than rows
    summary = summarize(rd)
    assert summary["packed"] == {"documents": len(corpus), "rows": len(corpus.packed), "length": 32}
    assert summary["audit"]["audited_steps"] == 1 and summary["audit"]["refused_steps"] == 0  # (step 3)
    out = io.StringIO()
    inspect_run(rd.path, Console(file=out, width=200))
    assert f"of {len(corpus):,} documents valued" in out.getvalue()
    assert f"{len(corpus):,} documents packed into {len(corpus.packed):,} rows of 32 tokens" in out.getvalue()
    html = build_report(rd.path).read_text()
    assert "documents valued / in training set" in html and "documents packed into" in html

    # interrupted after step 4 (its checkpoint after step 3) and resumed: the same values, bit for bit
    half = parse_config(text.replace(str(tmp_path / "packed"), str(tmp_path / "half")), overrides=config)

    def stop_after_4(step: int, total: int, loss: float, rate: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    try:
        with pytest.raises(RunInterrupted):
            train(half, progress=stop_after_4)
        train(half, resume=True)
    finally:
        torch.set_num_threads(threads)
    again = type(rd)(tmp_path / "half").ledger().values()
    assert again.ids() == values.ids()
    np.testing.assert_array_equal(again.value, values.value)
