"""The ``inrun`` command line.

=================  =========================================================================
``commands``       the parser and every command (demo, train, report, baselines, curate,
                   inspect, bench), one-line errors and exit codes
``bench``          ``inrun bench``: plain training against each method, side by side
=================  =========================================================================

To add a command: a ``cmd_NAME`` function and its sub-parser in ``commands``.
"""

from .commands import main

__all__ = ["main"]
