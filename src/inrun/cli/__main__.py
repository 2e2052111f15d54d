"""``python -m inrun.cli``: the ``inrun`` command."""

import sys

from .commands import main

sys.exit(main())
