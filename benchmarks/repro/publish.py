"""Publish the sweep's summary as each record lands, so the repository is consistent at every
commit: ``repro_small.{json,md,csv}`` aggregated from the committed records, its figure, and the
README block rendered from it (the test suite checks the first and the last against the records).

The sweep may run a pinned commit's code (:mod:`benchmarks.repro.code_pin`), but the tests run
the checkout's: so the summary is rebuilt by the scripts of the checkout that holds the results,
in subprocesses, exactly as a person would by hand (``repro_small.py --aggregate-only``,
``make_figures.py``, ``repro_table.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.repro.pieces import checkout_of
from benchmarks.repro.sweep import Sweep

__all__ = ["SUMMARY_FILES", "publish_summary"]

SUMMARY_FILES = ("repro_small.json", "repro_small.md", "repro_small.csv", "repro_small.png")
"""What :func:`publish_summary` writes in the results folder."""


def _readme_is_clean(checkout: Path) -> bool:
    """Whether ``checkout``'s README.md has no uncommitted change (a commit of it would take
    someone's edit along)."""
    done = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "README.md"], cwd=checkout, check=False
    )
    return done.returncode == 0


def publish_summary(sweep: Sweep) -> list[Path]:
    """Rebuild the summary, its figure and (where the results are the checkout's own) the
    README's sweep block from the records in ``sweep.results_dir``.

    Args:
        sweep: The sweep; its ``results_dir`` holds ``runs/`` (the records).

    Returns:
        The files written, to commit with the record; empty when a step failed (it is printed,
        and the record is committed alone: run the three scripts by hand).
    """
    checkout = checkout_of(sweep.results_dir)
    scripts = checkout / "benchmarks"
    results = sweep.results_dir
    summary = results / "repro_small.json"
    steps = [
        [
            "repro_small.py",
            "--aggregate-only",
            "--work-dir",
            str(sweep.work_dir),
            "--results-dir",
            str(results),
        ],
        ["make_figures.py", "--results", str(summary)],
    ]
    written = [results / name for name in SUMMARY_FILES]
    readme = checkout / "README.md"
    if results.resolve() != (scripts / "results").resolve():
        print(f"[pub ] {results} is not {checkout}'s own results folder: README left alone")
    elif not _readme_is_clean(checkout):
        print(f"[pub ] {readme} has uncommitted changes: run benchmarks/repro_table.py by hand")
    else:
        steps.append(["repro_table.py"])
        written.append(readme)
    # the checkout's code, not a pinned worktree's: that is what the tests compare against
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(checkout)}
    for script, *args in steps:
        done = subprocess.run(
            [sys.executable, str(scripts / script), *args],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            print(
                f"[pub ] {script} failed (exit {done.returncode}): {' | '.join(tail)}; the "
                "record is committed alone: aggregate, draw and render the README by hand",
                file=sys.stderr,
                flush=True,
            )
            return []
    print(f"[pub ] summary rebuilt from the records: {', '.join(p.name for p in written)}")
    return written
