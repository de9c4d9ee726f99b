"""tclora._io: atomic file writes keep the old content on failure, get ordinary permissions,
and leave temporary files that the next sweep recognises."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tclora._io import atomic_write, atomic_write_text, remove_stale_temp_files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_atomic_write_gets_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """Before: files went through tempfile.mkstemp and kept its mode 0600 (unreadable to the
    group, unlike every other file a run writes)."""
    atomic_write_text(tmp_path / "results.json", "{}\n")
    (tmp_path / "plain.json").write_text("{}\n")
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~_umask()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "table.md"
    atomic_write_text(path, "old\n")

    def fails(handle: IO[Any]) -> None:
        handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_temp_files_of_killed_writes_are_swept_once_old(tmp_path: Path) -> None:
    path = tmp_path / "cache.npy"
    old = tmp_path / ".cache.npy.0a1b2c3d"  # what a killed atomic_write leaves
    new = tmp_path / ".cache.npy.4e5f6a7b"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    atomic_write_text(path, "z")
    assert remove_stale_temp_files(tmp_path, max_age_s=3600) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.npy.4e5f6a7b", "cache.npy"]
