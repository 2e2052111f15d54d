"""FSDP2 with and without the tracker, side by side on 2 gloo processes: step-time ratio and the
bytes each kind of collective moves per optimizer step (docs/scaling.md §3).

Two copies of one GPT-2, each ``fully_shard``-ed per block and at the root, train on the same
batches; their steps alternate (plain, tracked, plain, ...) so both see the same machine load,
and the medians are compared. Collectives are counted by wrapping ``torch.distributed``'s
functions in each process: FSDP2's all-gathers and reduce-scatters, and the all-reduces the
tracker adds (gradient norms, the verification flag, the check's terms).

    python benchmarks/fsdp_overhead.py              # launches itself under torchrun, 2 ranks
    python benchmarks/fsdp_overhead.py --steps 12 --width 128
    python benchmarks/fsdp_overhead.py --wrap ddp   # the same under DDP, for reference
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

COUNTED = ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather")


class Bytes:
    """Bytes sent to each kind of collective, by phase (``plain`` or ``tracked``)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.by: dict[tuple[str, str], int] = collections.defaultdict(int)

    def install(self) -> None:
        for name in COUNTED:
            original = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                sent = tensors[-1] if _name in ("all_gather_single", "reduce_scatter_single") else tensors[0] if tensors else None
                if sent is not None:
                    self.by[(self.phase, _name)] += sent.numel() * sent.element_size()
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def gpt2(width: int, layers: int, vocab: int, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def sharded(model: torch.nn.Module, wrap: str) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def worker(args: argparse.Namespace) -> None:
    from inrun import InRunShapley

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = Bytes()
    counter.install()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (world * args.batch, args.seq), generator=g) for _ in range(args.steps)]
    val = torch.randint(0, args.vocab, (args.val, args.seq), generator=g)
    models = {k: sharded(gpt2(args.width, args.layers, args.vocab, args.seq), args.wrap) for k in ("plain", "tracked")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    tracker = InRunShapley(models["tracked"], opts["tracked"], val_loss=lambda m: loss_of(m, val), route=args.route)
    seconds: dict[str, list[float]] = {"plain": [], "tracked": []}
    for t, batch in enumerate(batches):
        local = batch[rank * args.batch:(rank + 1) * args.batch]
        ids = list(range(t * world * args.batch + rank * args.batch, t * world * args.batch + (rank + 1) * args.batch))
        for phase in ("plain", "tracked"):
            counter.phase = phase if t > 0 else "first step"
            dist.barrier()
            start = time.perf_counter()
            if phase == "tracked":
                with tracker.step(ids):
                    loss_of(models[phase], local).backward()
            else:
                loss_of(models[phase], local).backward()
            opts[phase].step()
            opts[phase].zero_grad()
            if t > 0:
                seconds[phase].append(time.perf_counter() - start)
    tracker.values()
    tracker.close()
    if rank == 0:
        steps = args.steps - 1
        params = sum(p.numel() for p in models["plain"].parameters())
        plain, tracked = statistics.median(seconds["plain"]), statistics.median(seconds["tracked"])
        print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}, {params / 1e6:.2f}M parameters, "
              f"{world} ranks x {args.batch} rows x {args.seq} tokens, {args.val} validation rows, route={args.route}; "
              f"load average {os.getloadavg()[0]:.1f}")
        what = "FSDP2" if args.wrap == "fsdp2" else "DDP"
        print(f"median step: plain {what} {plain * 1e3:.0f} ms, tracked {tracked * 1e3:.0f} ms, ratio {tracked / plain:.2f}")
        print(f"| collective | plain {what}, bytes/step/rank | tracked, bytes/step/rank |")
        print("|---|---:|---:|")
        for name in COUNTED:
            a, b = counter.by[("plain", name)] / steps, counter.by[("tracked", name)] / steps
            if a or b:
                print(f"| {name} | {a:,.0f} | {b:,.0f} |")
        print(f"parameters: {params * 4:,} bytes in float32")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank")
    parser.add_argument("--val", type=int, default=4, help="validation rows")
    parser.add_argument("--route", default="auto")
    parser.add_argument("--wrap", choices=("fsdp2", "ddp"), default="fsdp2",
                        help="ddp: the same comparison under DistributedDataParallel, for reference")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *sys.argv[1:]]
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
