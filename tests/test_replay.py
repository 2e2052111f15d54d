"""The replay of the model's own calls: bit-identical outputs (dropout included), buffers left as
they were, and per-example gradients equal to torch.func's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_oracle import gpt2
from torch import nn

from inrun import exact
from inrun.tracking.replay import RootCalls, armed, buffers_kept, weighted_gradients


def test_replay_is_bit_identical_and_leaves_buffers_and_rng_alone() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, 6)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    calls = RootCalls(model)
    with armed(calls, 5):
        out = model(x)
        out.sum().backward()
        kept = list(calls.calls)
    after = torch.get_rng_state()
    replayed = kept[0].replay()
    assert torch.equal(replayed[0], out.detach())
    assert torch.equal(torch.get_rng_state(), after)  # the user's random stream goes on untouched
    calls.remove()


def test_replay_restores_running_statistics() -> None:
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(4, track_running_stats=True)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), norm, nn.Flatten(), nn.Linear(4 * 5, 2)).train()
    calls = RootCalls(model)
    with armed(calls, 3):
        model(torch.randn(3, 3, 7)).sum().backward()
        kept = list(calls.calls)
    before = norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()
    assert set(kept[0].buffers_before) == {"1.running_mean", "1.running_var"}  # what the call changed
    with buffers_kept(model):
        kept[0].replay()
        # The replay started from the statistics the call started from, so it updated them alike.
        assert all(torch.equal(a, b) for a, b in zip(before, (norm.running_mean, norm.running_var, norm.num_batches_tracked)))
        norm.running_mean.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, (norm.running_mean, norm.running_var, norm.num_batches_tracked)))
    calls.remove()


def test_per_example_gradients_equal_torch_func() -> None:
    torch.manual_seed(0)
    model = gpt2().double()
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    calls = RootCalls(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with armed(calls, 3):
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
        kept = list(calls.calls)
    got = weighted_gradients(kept, params, torch.eye(3, dtype=torch.float64))

    def share(f, row):
        lg = f(input_ids=row).logits
        return F.cross_entropy(lg[:, :-1].reshape(-1, 40), row[:, 1:].reshape(-1), reduction="sum") / (3 * 5)

    want = exact.per_example_gradients(model, share, (ids,))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g in zip(names, got):
        torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-13)
    calls.remove()


def test_replay_of_a_gpt2_with_dropout_is_bit_identical() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).train()  # dropout 0.1 everywhere
    ids = torch.randint(0, 40, (4, 8))
    calls = RootCalls(model)
    with armed(calls, 4):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        kept = list(calls.calls)
    assert [tuple(t.shape) for t in kept[0].outputs] == [(4, 8, 40)]  # the scalar loss has no rows
    assert torch.equal(kept[0].replay()[0], out.logits.detach())
    assert kept[0].grads[0] is not None
    calls.remove()
