"""The README's sweep results block, rendered from ``benchmarks/results/repro_small.json``.

The sweep (``benchmarks/repro_small.py``, or ``--aggregate-only`` to rebuild from the committed
records without running anything) writes ``repro_small.json``; this script rewrites the README
block between ``<!-- repro-results:begin -->`` and ``<!-- repro-results:end -->`` from it
(:mod:`benchmarks.repro.readme`). ``--check`` only compares (the test suite does the same).

Usage::

    .venv/bin/python benchmarks/repro_table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.demo_table import README, replace_block  # noqa: E402
from benchmarks.repro.readme import BEGIN, END, readme_block  # noqa: E402

SUMMARY = ROOT / "benchmarks" / "results" / "repro_small.json"


def rendered(readme: str) -> str:
    """``readme`` with the sweep block rendered from ``SUMMARY`` (or "no run yet")."""
    summary = json.loads(SUMMARY.read_text(encoding="utf-8")) if SUMMARY.is_file() else None
    return replace_block(readme, readme_block(summary), BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the README block (or ``--check`` it); return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the README")
    args = parser.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    new = rendered(readme)
    if args.check:
        if new != readme:
            print(f"README.md's sweep results differ from {SUMMARY}: run {Path(__file__).name}")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"README.md's sweep results from {SUMMARY if SUMMARY.is_file() else '(no run yet)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
