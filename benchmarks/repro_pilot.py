"""Pilot of the sweep's training budget: ``python benchmarks/repro_pilot.py [--help]``.

The code is :mod:`benchmarks.repro.pilot` (its docstring says what a pilot checks); this script
only runs its ``main`` from a checkout.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for `benchmarks`
    from benchmarks.repro.pilot import main

    sys.exit(main())
