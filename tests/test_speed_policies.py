"""Policies that choose how fast work runs, never what it computes: the validation pass's thread
count, and the benchmark's accounting (micro-batches, frozen layers)."""

from __future__ import annotations

import pytest
import torch

from inrun.cli.bench import floors, mlp_workload
from inrun.tracking.validation import ThreadChoice

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_thread_choice_measures_both_then_runs_the_faster(two_threads) -> None:
    choice = ThreadChoice("auto")
    seen = []
    for _ in range(4):  # two timings of each candidate first
        seen.append(choice.pick(CPU))
        with choice.applied(CPU):
            assert torch.get_num_threads() == seen[-1]
        assert torch.get_num_threads() == 2  # restored
    assert sorted(seen) == [1, 1, 2, 2]
    choice.timings = {2: [1.0, 1.0, 1.0], 1: [0.1, 0.1, 0.1]}
    picks = []
    for _ in range(ThreadChoice.PROBE_EVERY):
        picks.append(choice.pick(CPU))
        choice.passes += 1
    assert picks.count(1) == ThreadChoice.PROBE_EVERY - 1 and picks.count(2) == 1  # one probe of the other


def test_thread_choice_pinned_and_off_device(two_threads) -> None:
    assert ThreadChoice("one").pick(CPU) == 1
    assert ThreadChoice("all").pick(CPU) is None
    assert ThreadChoice("auto").pick(torch.device("cuda")) is None
    torch.set_num_threads(1)
    assert ThreadChoice("auto").pick(CPU) is None


def test_thread_choice_restores_threads_on_error(two_threads) -> None:
    choice = ThreadChoice("one")
    with pytest.raises(RuntimeError), choice.applied(CPU):
        raise RuntimeError("val_loss failed")
    assert torch.get_num_threads() == 2


def test_bench_accumulation_splits_the_batch_and_floors_count_the_step() -> None:
    w = mlp_workload()
    ids = list(range(w.examples))
    assert [len(i) for _, i in w.micro_batches(w.batches[0], ids)] == [w.examples]
    one = floors(w)
    w.micro = 4
    parts = w.micro_batches(w.batches[0], ids)
    assert [len(i) for _, i in parts] == [w.examples // 4] * 4 and parts[1][0][0].shape[0] == w.examples // 4
    assert floors(w) == one  # the validation pass is amortized over the step, not the micro-batch
    w.frozen = [(784, 512)]  # a frozen layer adds forward + input gradient to training, no dots
    assert floors(w)["order 1"] < one["order 1"]
