"""Issue 7 reproduction sweep: clustered LoRA + joint CP merge against per-task, single LoRA and
dense/SVD merges, on SmolLM2-135M-Instruct with MIT-licensed evals-registry tasks.

Every run goes through the real command line (``tclora fit --config configs/repro_small.yaml
--config <run>/overrides.yaml``); this package only

1. writes the fixed, seed-independent splits: per training task a train file (the data module's
   source; it splits train/validation itself) and a *disjoint* test file (never trained on), and
   per unseen task a test file -- all local JSONL under ``<work-dir>/data``;
2. runs 3 seeds x {k-means K=4, K=8, one adapter per task, one LoRA on everything}, skipping runs
   whose ``merge/results.json`` exists (resumable); the one-LoRA run has a single adapter, which
   ``CPMergeCallback`` refuses to merge, so that run trains without the callback and is evaluated
   here, from its exported adapter, with the callback's :func:`tclora.evaluation.evaluate`
   settings;
3. aggregates every run into ``<results-dir>/repro_small.{csv,md,json}`` (mean +- std over seeds)
   and prints the table.

Modules, each using only those above it: :mod:`~benchmarks.repro.sweep` (what the sweep runs, on
top of ``configs/repro_small.yaml``), :mod:`~benchmarks.repro.data` (splits and eval-set files),
:mod:`~benchmarks.repro.pieces` (the committed pieces of a run in progress: trained adapters and
study rows, so that a run goes on from the repository on a new machine),
:mod:`~benchmarks.repro.checkpoints` (an unfinished fit's last checkpoint, kept at a session's
end so that the fit resumes on a new machine),
:mod:`~benchmarks.repro.code_pin` (every run of the sweep runs one pinned commit's code, from a
worktree of it, while the checkout moves on),
:mod:`~benchmarks.repro.runs` (one run through the CLI; the one-LoRA evaluation),
:mod:`~benchmarks.repro.aggregate` (records, summary, statistics, timings),
:mod:`~benchmarks.repro.report` (Markdown, CSV, JSON), :mod:`~benchmarks.repro.cli` (``main``), and
:mod:`~benchmarks.repro.pilot` (``benchmarks/repro_pilot.py``: the per_task run alone under another
training budget, to check that the per-task adapters beat their majority answer).

Usage::

    .venv/bin/python benchmarks/repro_small.py                 # the sweep (see the config header)
    .venv/bin/python benchmarks/repro_small.py --quick         # harness smoke run, tiny sizes
    .venv/bin/python benchmarks/repro_small.py --aggregate-only
    .venv/bin/python benchmarks/repro_small.py --keep-checkpoints --commit-records  # session end
    .venv/bin/python -m benchmarks.repro --quick               # the same, as a module
    .venv/bin/python benchmarks/make_figures.py                # results figure
"""
