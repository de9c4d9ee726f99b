"""JSONL files and evals-registry task folders: the one line reader and the one task lookup.

Both training-data sources (:mod:`tclora.data.sources`) and evaluation sets
(:mod:`tclora.evaluation.sets`) read JSONL files and registry tasks through these two functions,
so a bad line or an unknown task reads the same everywhere. Each caller passes the error type it
documents (``DataSourceError``, ``EvalSetError``), so no translation layer is needed.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "registry_task_folder"]


def read_jsonl(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, record)`` for each non-blank line of a JSONL file.

    Line numbers start at 1 and count blank lines, so ``f"{path}:{number}"`` names the line in an
    editor.

    Args:
        path: The file (read as UTF-8).
        error: The exception type raised for a bad file or line.

    Yields:
        The 1-based line number and the decoded JSON value of each non-blank line.

    Raises:
        error: ``"<path>:<line>: not valid JSON (<reason> at column <n>)"`` for a line that is
            not JSON, or ``"<path>: not UTF-8 text (<reason> at byte <n>)"``.
    """
    loads = json.loads
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = loads(line)
                except json.JSONDecodeError as err:
                    if not line.strip():  # a blank line is never valid JSON: skipped
                        continue
                    raise error(
                        f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                yield number, record
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def registry_task_folder(task: str, where: str, error: type[Exception] = ValueError) -> Path:
    """The folder of an evals-registry task under :func:`tclora.assets.corpus_dir`.

    Args:
        task: The task name: one folder name (no ``/``, not starting with ``.``).
        where: What asked for the task, prefixed to the error message (e.g.
            ``"source 'registry:x'"``).
        error: The exception type raised for an unknown task.

    Returns:
        The task's folder.

    Raises:
        error: ``"<where>: no evals-registry task '<task>' under <root>"``, followed by
            ``"; did you mean [...]?"`` with the closest task names, or else by the number of
            tasks available and how to list them.
    """
    from tclora.assets import corpus_dir

    root = corpus_dir()
    folder = root / task
    if not task or "/" in task or task.startswith(".") or not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir())
        close = difflib.get_close_matches(task, known, n=5)
        hint = (
            f"; did you mean {close}?"
            if close
            else f" ({len(known)} tasks are available; tclora.assets.list_corpus_tasks() lists "
            "the MIT-licensed ones)"
        )
        raise error(f"{where}: no evals-registry task {task!r} under {root}{hint}")
    return folder
