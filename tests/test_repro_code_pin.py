"""The sweep's code pin (``benchmarks/repro/code_pin.py``): every run of a sweep that spans
sessions runs one commit's code, while the checkout moves on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import git, init_repo

import tclora
from benchmarks.repro.code_pin import PIN_FILE, pinned_checkout, read_pin, write_pin


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A repository laid out like this one: tclora/ (the real __init__.py), benchmarks/, configs/."""
    repo = tmp_path / "checkout"
    (repo / "tclora").mkdir(parents=True)
    shutil.copy(Path(tclora.__file__), repo / "tclora" / "__init__.py")
    (repo / "tclora" / "merge.py").write_text("RULE = 'mean'\n")
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "sweep.py").write_text("SEEDS = (0, 1, 2)\n")
    (repo / "configs").mkdir()
    (repo / "configs" / "sweep.yaml").write_text("lr: 0.001\n")
    (repo / ".gitignore").write_text("/runs/\n")
    return init_repo(repo, commit="code")


def _digest(root: Path) -> str:
    """``tclora.SOURCE_DIGEST`` as a process that imports the checkout at ``root`` takes it."""
    done = subprocess.run(
        [sys.executable, "-c", "import tclora; print(tclora.SOURCE_DIGEST)"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    return done.stdout.strip()


def test_a_sweep_started_from_a_later_commit_runs_the_pinned_one(checkout: Path) -> None:
    results = checkout / "results"
    assert read_pin(results) is None and pinned_checkout(checkout, results) is None  # no pin

    (checkout / "tclora" / "merge.py").write_text("RULE = 'sum'\n")
    with pytest.raises(
        SystemExit, match=r"--pin-code: .* has changes to tclora, benchmarks, confi"
    ):
        write_pin(checkout, results, "first run")
    git(checkout, "checkout", "-q", "--", "tclora")
    pin = write_pin(checkout, results, "first run")
    pinned = git(checkout, "rev-parse", "HEAD").strip()
    assert pin == {"commit": pinned, "tclora_source": _digest(checkout), "why": "first run"}
    assert read_pin(results) == pin
    assert pinned_checkout(checkout, results) is None  # this is the pinned commit: run here

    # the checkout moves on: a later commit runs the pinned code from a worktree of it
    (checkout / "tclora" / "merge.py").write_text("RULE = 'sum'\n")
    git(checkout, "commit", "-q", "-am", "another merge rule")
    folder = pinned_checkout(checkout, results)
    assert folder == checkout / "runs" / "sweep_code" / pinned[:12]
    assert git(folder, "rev-parse", "HEAD").strip() == pinned
    assert (folder / "tclora" / "merge.py").read_text() == "RULE = 'mean'\n"
    assert _digest(folder) == pin["tclora_source"] != _digest(checkout)
    assert pinned_checkout(checkout, results) == folder  # made once, then reused

    # a new machine: the worktree is gone but still registered; it is made again
    shutil.rmtree(folder)
    assert pinned_checkout(checkout, results) == folder and (folder / "tclora").is_dir()

    # the pinned worktree edited by hand is refused, never run
    (folder / "benchmarks" / "sweep.py").write_text("SEEDS = (0,)\n")
    with pytest.raises(SystemExit, match=r"is not a clean checkout of the pinned commit"):
        pinned_checkout(checkout, results)


def test_a_pin_that_cannot_be_honoured_is_refused(checkout: Path) -> None:
    results = checkout / "results"
    results.mkdir()
    pin = {"commit": "0" * 40, "tclora_source": "1" * 64, "why": "x"}
    (results / PIN_FILE).write_text(json.dumps(pin))
    with pytest.raises(SystemExit, match=r"pinned to commit 0{40} .* which this repository does"):
        pinned_checkout(checkout, results)
    (results / PIN_FILE).write_text(json.dumps({"commit": "abc"}))
    with pytest.raises(SystemExit, match=r"sweep_code.json is unreadable \(KeyError"):
        read_pin(results)
    (results / PIN_FILE).write_text(json.dumps({"commit": "abc", "tclora_source": "d"}))
    with pytest.raises(SystemExit, match=r"commit='abc' / tclora_source='d' are not full hashes"):
        read_pin(results)
    # at the pinned commit, with tclora/ edited in place
    write_pin(checkout, results, "x")
    (checkout / "tclora" / "merge.py").write_text("RULE = 'sum'\n")
    with pytest.raises(SystemExit, match=r"is the pinned commit [0-9a-f]{12} but its tclora/ was"):
        pinned_checkout(checkout, results)


def test_the_sweep_command_reruns_itself_from_the_pinned_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fitting runs re-execute from the pin with this checkout's folders; aggregation and the
    status run here (they read records, which any commit's code reads the same)."""
    from benchmarks.repro import cli

    calls: list[tuple[Path, list[str]]] = []
    monkeypatch.setattr(cli, "pinned_checkout", lambda root, results: tmp_path / "pinned")
    monkeypatch.setattr(cli, "_run_pinned", lambda where, argv: calls.append((where, argv)) or 7)
    work, results = tmp_path / "work", tmp_path / "results"
    folders = ["--work-dir", str(work), "--results-dir", str(results)]
    assert cli.main(["--commit-records", "--seeds", "0", *folders]) == 7
    assert calls == [
        (tmp_path / "pinned", ["--commit-records", "--seeds", "0", *folders, *folders])
    ]
    calls.clear()
    assert cli.main(["--status", *folders]) == 0
    assert calls == []
    assert capsys.readouterr().out.splitlines()[0] == "per_task seed 0: not started"
    pin = {"commit": "a" * 40, "tclora_source": "b" * 64, "why": "first pin"}
    results.mkdir(exist_ok=True)
    (results / PIN_FILE).write_text(json.dumps(pin))
    assert cli.main(["--status", *folders]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "code: pinned to aaaaaaaaaaaa (first pin)",
        "per_task seed 0: not started",
    ]


def test_records_are_committed_in_the_checkout_that_holds_them(tmp_path: Path) -> None:
    """Run from the pinned worktree, the sweep commits its records and pieces in the checkout
    it was started from (which holds the results folder), not in the worktree."""
    from benchmarks.repro.pieces import commit_paths

    repo = tmp_path / "main"
    (repo / "results").mkdir(parents=True)
    init_repo(repo)
    record = repo / "results" / "kmeans4-seed0.json"
    record.write_text("{}")
    assert commit_paths([record], "Sweep record: kmeans4 seed 0")
    assert git(repo, "log", "--format=%s", "--name-only").strip() == (
        "Sweep record: kmeans4 seed 0\n\nresults/kmeans4-seed0.json"
    )
