"""Reading a finished run: reports, views, baselines, inspection and curation.

=================  =========================================================================
``report/``        ``inrun report``: the self-contained HTML page of a run, and its plots
``views``          views of a ledger (by window of steps, per stage, per source) and the audit
``baselines``      KNN-Shapley and BM25, the baselines a skeptic compares values with
``baseline_run``   ``inrun baselines``: loss, gradient cosine and KNN-Shapley of a run's model
``inspect/``       ``inrun inspect``: a config or model type (routes, memory) or a run directory
``curate``         ``inrun curate``: keep/drop lists from the values; retraining to compare
=================  =========================================================================

It reads run directories through :mod:`inrun.store` and rebuilds models through :mod:`inrun.run`.
"""
