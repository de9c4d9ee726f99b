"""Each landed record is committed with the summary, figure and README block rebuilt from the
records (``benchmarks/repro/publish.py``): otherwise the first record makes the suite's
"summary is the aggregation of the records" check fail until someone aggregates by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import git, init_repo

from benchmarks.repro.publish import SUMMARY_FILES, publish_summary
from benchmarks.repro.sweep import Sweep

# Stand-ins for the checkout's three scripts: each says how it was called (arguments, working
# folder, the first sys.path entry it imports from) and writes what the real one writes.
_AGGREGATE = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
results = Path(args[args.index("--results-dir") + 1])
records = sorted(p.name for p in (results / "runs").glob("*.json"))
for suffix in ("json", "md", "csv"):
    (results / f"repro_small.{suffix}").write_text(json.dumps({
        "records": records, "args": args, "cwd": os.getcwd(),
        "pythonpath": os.environ["PYTHONPATH"], "offline": os.environ["HF_HUB_OFFLINE"]}))
"""
_FIGURE = """
import sys
from pathlib import Path
results = Path(sys.argv[sys.argv.index("--results") + 1])
results.with_suffix(".png").write_bytes(b"png of " + results.read_bytes()[:20])
"""
_TABLE = """
from pathlib import Path
root = Path(__file__).resolve().parents[1]
summary = (root / "benchmarks" / "results" / "repro_small.json").read_text()
(root / "README.md").write_text("# project\\n" + summary + "\\n")
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "checkout"
    scripts = repo / "benchmarks"
    (scripts / "results" / "runs").mkdir(parents=True)
    for name, text in (
        ("repro_small.py", _AGGREGATE),
        ("make_figures.py", _FIGURE),
        ("repro_table.py", _TABLE),
    ):
        (scripts / name).write_text(text)
    (repo / "README.md").write_text("# project\n")
    init_repo(repo, commit="start")
    (scripts / "results" / "runs" / "per_task-seed0.json").write_text("{}\n")
    return repo


def test_publish_rebuilds_summary_figure_and_readme_with_the_checkouts_scripts(
    checkout: Path, tmp_path: Path
) -> None:
    results = checkout / "benchmarks" / "results"
    sweep = Sweep(work_dir=tmp_path / "work", results_dir=results)
    written = publish_summary(sweep)
    assert written == [*(results / name for name in SUMMARY_FILES), checkout / "README.md"]
    summary = json.loads((results / "repro_small.json").read_text())
    assert summary["records"] == ["per_task-seed0.json"]
    assert summary["args"] == [
        "--aggregate-only",
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(results),
    ]
    # run from the checkout that holds the results, importing its code (not a pinned worktree's)
    assert summary["cwd"] == str(checkout) and summary["pythonpath"] == str(checkout)
    assert summary["offline"] == "1"
    assert (results / "repro_small.png").read_bytes().startswith(b"png of {")
    assert '"records": ["per_task-seed0.json"]' in (checkout / "README.md").read_text()
    # the commit the sweep then makes holds the record and all of these, nothing else
    from benchmarks.repro.pieces import commit_paths

    (checkout / "notes.txt").write_text("someone's file\n")
    assert commit_paths([results / "runs" / "per_task-seed0.json", *written], "Sweep record")
    assert git(checkout, "status", "--porcelain") == "?? notes.txt\n"


def test_publish_leaves_an_edited_readme_and_a_foreign_results_folder_alone(
    checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = checkout / "benchmarks" / "results"
    (checkout / "README.md").write_text("# project\nsomeone's edit\n")
    written = publish_summary(Sweep(work_dir=tmp_path / "work", results_dir=results))
    assert written == [results / name for name in SUMMARY_FILES]
    assert (checkout / "README.md").read_text() == "# project\nsomeone's edit\n"
    assert "README.md has uncommitted changes: run benchmarks/repro_table.py" in (
        capsys.readouterr().out
    )
    other = checkout / "elsewhere"
    (other / "runs").mkdir(parents=True)
    (other / "runs" / "kmeans4-seed0.json").write_text("{}\n")
    git(checkout, "checkout", "README.md")
    written = publish_summary(Sweep(work_dir=tmp_path / "work", results_dir=other))
    assert written == [other / name for name in SUMMARY_FILES]
    assert (checkout / "README.md").read_text() == "# project\n"
    out = capsys.readouterr().out
    assert f"{other} is not {checkout}'s own results folder: README left alone" in out


def test_a_failing_step_commits_the_record_alone_and_says_so(
    checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = checkout / "benchmarks" / "results"
    (checkout / "benchmarks" / "make_figures.py").write_text(
        "import sys\nprint('no matplotlib here', file=sys.stderr)\nsys.exit(2)\n"
    )
    assert publish_summary(Sweep(work_dir=tmp_path / "work", results_dir=results)) == []
    err = capsys.readouterr().err
    assert "make_figures.py failed (exit 2): no matplotlib here" in err
    assert "the record is committed alone" in err
