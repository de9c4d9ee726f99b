"""The sweep runs one commit's code from its first run to its last, while ``main`` moves on.

A sweep of 15 runs takes ~16-18 sessions. Every run's pieces and study rows are stamped with the
tclora source that made them (:func:`benchmarks.repro.pieces.training_identity`, the study
fingerprint), so an edit of ``tclora/`` on the checkout would refit the run in progress and redo
its rows, and records made before and after it would mix two versions of the code. So the sweep
is pinned: ``<results_dir>/sweep_code.json`` names a commit (and its tclora source digest), and
``python benchmarks/repro_small.py`` started from any other commit re-executes itself from a
git worktree of that commit (``runs/sweep_code/<commit>``, made when missing, e.g. on a new
machine), with the work and results folders of the checkout it was started from: records and
pieces are committed there, on its branch (:func:`benchmarks.repro.pieces.commit_paths` commits
in the repository that holds them).

``--pin-code`` writes the pin for the checkout's ``HEAD`` (its ``tclora/``, ``benchmarks/`` and
``configs/`` must be as committed).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

from tclora._io import atomic_write_text

__all__ = ["PIN_FILE", "pinned_checkout", "read_pin", "write_pin"]

PIN_FILE = "sweep_code.json"
_CODE = ("tclora", "benchmarks", "configs")  # what the pinned commit must hold as committed


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} in {root} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _source_digest(root: Path) -> str:
    """``tclora.SOURCE_DIGEST`` of the checkout at ``root``: its ``tclora/__init__.py`` run on its
    own (it imports only the standard library), so the digest is taken by that checkout's code."""
    spec = importlib.util.spec_from_file_location(
        "_tclora_source_of_checkout", root / "tclora" / "__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.SOURCE_DIGEST)


def read_pin(results_dir: Path) -> dict[str, Any] | None:
    """The pin in ``results_dir`` (``{"commit", "tclora_source", ...}``), or None without one.

    Raises:
        SystemExit: The pin file is unreadable or lacks ``commit`` / ``tclora_source``.
    """
    path = results_dir / PIN_FILE
    if not path.is_file():
        return None
    try:
        pin = json.loads(path.read_text())
        commit, source = str(pin["commit"]), str(pin["tclora_source"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if len(commit) != 40 or len(source) != 64:
        raise SystemExit(
            f"{path}: commit={commit!r} / tclora_source={source!r} are not full hashes"
        )
    return pin


def write_pin(root: Path, results_dir: Path, why: str) -> dict[str, Any]:
    """Pin the sweep to ``root``'s ``HEAD``.

    Args:
        root: The checkout whose ``HEAD`` the sweep runs from now on.
        results_dir: Where the pin (and the sweep's records) live.
        why: One line saying why the code is (re)pinned, kept in the pin.

    Returns:
        The pin written.

    Raises:
        SystemExit: ``root``'s ``tclora/``, ``benchmarks/`` or ``configs/`` differ from ``HEAD``
            (the pin would name code other than what runs).
    """
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *_CODE)
    if changed:
        raise SystemExit(
            f"--pin-code: {root} has changes to {', '.join(_CODE)} that are not committed "
            f"({changed.splitlines()[0].strip()}, ...); commit them first"
        )
    pin = {
        "commit": _git(root, "rev-parse", "HEAD"),
        "tclora_source": _source_digest(root),
        "why": why,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_dir / PIN_FILE, json.dumps(pin, indent=1) + "\n")
    return pin


def pinned_checkout(root: Path, results_dir: Path) -> Path | None:
    """Where the sweep must run from: None when ``root`` is the pinned commit (or no pin exists),
    else a clean worktree of the pinned commit under ``root/runs/sweep_code/`` (made if missing).

    Args:
        root: The checkout this process runs from.
        results_dir: Where the pin lives.

    Returns:
        The pinned checkout to re-execute from, or None to run here.

    Raises:
        SystemExit: The pinned commit is not in the repository, its worktree was edited, or
            its tclora source is not the one the pin names.
    """
    pin = read_pin(results_dir)
    if pin is None:
        return None
    if _git(root, "rev-parse", "HEAD") == pin["commit"]:
        if _source_digest(root) != pin["tclora_source"]:
            raise SystemExit(
                f"{root} is the pinned commit {pin['commit'][:12]} but its tclora/ was edited "
                "since; undo the edit (the sweep runs the pinned code as committed)"
            )
        return None
    commit = pin["commit"]
    folder = root / "runs" / "sweep_code" / commit[:12]
    if not (folder / ".git").exists():
        if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root).returncode:
            raise SystemExit(
                f"the sweep is pinned to commit {commit} ({results_dir / PIN_FILE}), which this "
                "repository does not hold (a shallow clone?); fetch it, or re-pin with --pin-code"
            )
        _git(root, "worktree", "prune")  # a worktree registered on an earlier machine
        _git(root, "worktree", "add", "--detach", str(folder), commit)
    if _git(folder, "rev-parse", "HEAD") != commit or _git(
        folder, "status", "--porcelain", "--untracked-files=no"
    ):
        raise SystemExit(
            f"{folder} is not a clean checkout of the pinned commit {commit[:12]}; remove it "
            "(git worktree remove --force) and run again"
        )
    if _source_digest(folder) != pin["tclora_source"]:
        raise SystemExit(
            f"{folder}: its tclora source is not the {pin['tclora_source'][:12]} the pin names"
        )
    return folder
