"""Integrations with distributed training and training frameworks.

* :mod:`inrun.tracking.ddp`: ``DistributedDataParallel`` support used by the tracker
  (per-step consistency check across ranks, the global ledger gathered by example id);
* :mod:`inrun.integrations.hf`: a Hugging Face ``Trainer`` subclass that values every example
  of ``Trainer.train()`` and writes the ledger to the run's output directory.
"""
