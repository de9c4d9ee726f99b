"""Issue 7 reproduction sweep: ``python benchmarks/repro_small.py [--quick] [--help]``.

The code is the package :mod:`benchmarks.repro` (its docstring describes the sweep and its
commands); this script only runs :func:`benchmarks.repro.cli.main` from a checkout.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for `benchmarks`
    from benchmarks.repro.cli import main

    sys.exit(main())
