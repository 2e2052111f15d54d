"""Integrations with distributed training and training frameworks.

* :mod:`inrun.tracking.ddp`: ``DistributedDataParallel`` support used by the tracker
  (per-step consistency check across ranks, the global ledger gathered by example id);
* :mod:`inrun.tracking.fsdp`: FSDP2 (``fully_shard``) support: the whole parameters each
  module computes with, the gradient's shards in the check; FSDP1 and DeepSpeed refused;
* :mod:`inrun.integrations.hf`: a Hugging Face ``Trainer`` subclass that values every example
  of ``Trainer.train()`` and writes the ledger to the run's output directory.
"""
