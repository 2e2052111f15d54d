"""The store: what a run keeps, in memory and on disk.

=================  =========================================================================
``ledger``         the values: ``ValueLedger`` (added by id, rolled back, merged, saved across
                   ranks), its Parquet files, the trace parts
``table``          ``IdTable``: the values by id in numeric arrays, a small constant per id, for
                   a billion ids (sorted runs, appends that never copy the table)
``partitions``     the values on disk: Parquet partitions by id range, written one at a time;
                   reads of one id or a range; merges of ranks' saves range by range
``values``         ``ValueTable`` and ``PerValidation``: the values as read-only tables
``exports``        values keyed by document id for curators: Dolma attribute files, metadata
``rundir``         a run directory (``RunDir``): layout, metadata, status, results, verification
``checkpoints``    its checkpoints: one schema for every loop, written atomically, restored
``metrics``        its training curves (``metrics.parquet``)
``auditlog``       the audit's rows on disk (``audit.parquet``, ``audit.json``)
``summary``        the headline numbers of a run (``summary.json``)
``examples``       what the report shows of each training example (``examples.parquet``)
``writer``         ``RunWriter``: the one writer of run directories, for every training loop
=================  =========================================================================

To add a storage format, start from ``ledger`` (the values) or ``rundir`` (the directory). It
imports the ground floor (durable files: :mod:`inrun.files`) and :mod:`inrun.tracking` (the
audit's settings and columns), never the tracker facade, the runner or the CLI.
"""

from .ledger import PerValidation, ValueLedger, ValueTable
from .rundir import RunDir, RunDirError
from .writer import RunWriter

__all__ = ["PerValidation", "RunDir", "RunDirError", "RunWriter", "ValueLedger", "ValueTable"]
