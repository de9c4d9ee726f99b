"""``python -m benchmarks.repro [flags]``: the sweep, as ``benchmarks/repro_small.py`` runs it."""

import sys

from benchmarks.repro.cli import main

sys.exit(main())
