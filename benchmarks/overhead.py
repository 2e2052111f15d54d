"""Side-by-side cost of In-Run Data Shapley vs plain training: see :mod:`inrun.cli.bench`.

Same as ``inrun bench``: python benchmarks/overhead.py [--workloads R,S,M] [--steps 24] ...
"""

import sys

from inrun.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
