"""The tracker's parts, one job per module (``InRunShapley`` in :mod:`inrun.tracker` is their facade).

It imports only the ground floor (errors, modes, shapley, optim, layers, exact); the values it
makes go into a ledger through the narrow ``Ledger`` interface of ``state``.

========================  ==================================================================
``config``                the settings (``TrackerConfig``), validated
``params``                the parameter table: gradients, norms, learning rates
``entries``               tracked modules and their handlers; shared parameters detected
``capture``               forward hooks, what a call keeps, its output-gradient hook
``rows``                  which example each row of a call belongs to: a candidate, by shapes
``replay``                the model's own calls kept and run again exactly
``plan``                  row verification against exact per-example gradients; sites
``validation``            the validation pass: g_val at a shift, HVPs, Gram factors, cache
``routes``                route choice (one cost model per route), the contraction kernel
``bookkeeping``           the book-keeping route's forward override
``rules``                 value rules (first order scalar/elementwise, Hessian, trapezoid)
``check``                 the consistency check and the step's one host transfer
``gradmap``               what the loop did to the gradients before the step: scale, value clip,
                          unattributed, or refused (``GradientChangeError``)
``optimizers``            several optimizers: one rule per parameter, the step valued at the first
``probes``                interactions between examples probed; one example alone every step
``coupled``               coupled losses: declared (valued by their own game) or caught
``state``                 the step's states; the one place steps are counted and recorded
``admission``             what a model and a micro-batch must be (refusals: compiled, repeated ids)
``cost``                  the time of the validation passes next to the training blocks
``engine``                the step machine wiring the parts together
``coverage``              which route valued each parameter; the tracker described (tracker.json)
``ddp``                   DDP: the process group's collectives, the ledgers merged when read
``audit/``                the run's own audit: exact Shapley values of sampled steps
========================  ==================================================================
"""

from .config import TrackerConfig
from .coverage import Coverage
from .engine import StepEngine

__all__ = ["Coverage", "StepEngine", "TrackerConfig"]
