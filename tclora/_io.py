"""Atomic file and folder writes, and file hashing.

Files: a temporary sibling file, then ``os.replace``, so readers never see half a file and an
interrupted write leaves the previous version in place. Folders: written under a temporary
sibling name (``.<name>.tmp-<pid>-<random>``) and swapped into place; on Linux the swap is one
``renameat2(RENAME_EXCHANGE)``, so there is never a moment without the folder. Temporary siblings
left by a killed process are removed by the next write of the same folder
(:func:`remove_orphans`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def _create_temp_sibling(path: Path) -> tuple[int, str]:
    """Create ``.<name>.<8 hex>`` beside ``path`` (exclusively) and return its descriptor and path.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file gets the mode a plain ``open``
    would give it (0666 less the umask), so the renamed result is as readable as any other file
    the process writes.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # pragma: no cover -- a 1 in 4e9 collision
            continue


def atomic_write(path: Path, write: Callable[[IO[Any]], object], binary: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file renamed over ``path``.

    Args:
        path: Destination; its folder is created if missing.
        write: Writes the content to the open handle.
        binary: Open the temporary file in binary mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically."""
    atomic_write(path, lambda handle: np.save(handle, array), binary=True)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of the file at ``path`` (read in ``chunk_bytes`` chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """Load the ``.npy`` array at ``path``, never unpickling, with a clear error for bad content.

    Args:
        path: The file.
        mmap: Memory-map it read-only (the header's shape is then checked against the file size
            without reading the data).

    Returns:
        The array.

    Raises:
        FileNotFoundError: There is no file at ``path``.
        PermissionError: The file may not be read.
        ValueError: The file is not a readable ``.npy`` array (truncated, garbage, an ``.npz``
            archive, or object data that would need unpickling); the message names ``path``.
    """
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path}: not a readable .npy array ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{path}: not a readable .npy array (an .npz archive)")
    return array


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of the ``.npz`` archive at ``path``, never unpickling.

    Args:
        path: The file.

    Returns:
        ``{name: array}``, read into memory.

    Raises:
        FileNotFoundError: There is no file at ``path``.
        PermissionError: The file may not be read.
        ValueError: The file is not a readable ``.npz`` archive (truncated, garbage, a damaged
            member, or object data that would need unpickling); the message names ``path``.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array")
        with archive:
            return {name: archive[name] for name in archive.files}
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(
            f"{path}: not a readable .npz archive ({type(err).__name__}: {err})"
        ) from err


_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}$")  # .<name>.<8 hex> (_create_temp_sibling)


def remove_stale_temp_files(folder: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``.

    They are named ``.<name>.<8 random characters>``; only those unmodified for ``max_age_s``
    seconds are removed, so a write in progress in another process is left alone.

    Args:
        folder: The folder to sweep (not recursive; nothing happens if it does not exist).
        max_age_s: Minimum age, in seconds since the last modification.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for entry in folder.iterdir():
        if _TEMP_FILE.match(entry.name) is None:
            continue
        try:
            if not entry.is_file() or entry.is_symlink() or entry.stat().st_mtime > cutoff:
                continue
            entry.unlink()
        except FileNotFoundError:  # removed concurrently
            continue
        removed.append(entry)
    return removed


_ORPHAN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RENAME_EXCHANGE = 2


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(target: Path) -> list[Path]:
    """Delete the temporary siblings of ``target`` left behind by processes that have died.

    Siblings are named ``.<target name>.tmp-<pid>-<hex>`` or ``.<target name>.old-<pid>-<hex>``
    (as :func:`atomic_dir` makes them); those of a live process (a concurrent writer) are kept.

    Args:
        target: The folder (or file) whose leftovers to remove.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _ORPHAN.match(entry.name)
        if match is None or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); ``False`` where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move folder ``tmp`` to ``final``, replacing an existing ``final``.

    Readers see either the old folder or the new one, whole: where the system can swap two paths
    in one step (Linux) there is no moment without ``final``; elsewhere the old folder is renamed
    away just before the new one is renamed in.

    Args:
        tmp: A complete folder on the same file system (a sibling of ``final``).
        final: The destination.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = _sibling(final, "old")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``target`` only if the block succeeds.

    Leftovers of earlier killed writes of ``target`` are removed first; on an error the
    temporary folder is removed and ``target`` is left as it was.

    Args:
        target: The folder to write.

    Yields:
        The temporary folder to fill.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir(mode=0o755)
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces file ``target`` only if the block succeeds.

    For large files written by another library's ``save(path)`` (checkpoints): the sibling is
    named ``.<name>.tmp-<pid>-<hex>`` on the same file system, so the final ``os.replace`` is one
    step, and the leftovers of earlier killed writes of ``target`` are removed first
    (:func:`remove_orphans`). On an error the temporary file is removed and ``target`` is left
    as it was.

    Args:
        target: The file to write; its folder is created if missing.

    Yields:
        The temporary path to write.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike[str], what: str) -> Path:
    """Check that folder ``path`` can be created (if missing) and written, creating nothing.

    Mode bits say nothing for root, so the check creates and deletes a real file: in ``path``
    when it exists, else in its nearest existing ancestor (where ``path`` would be created).

    Args:
        path: The folder.
        what: The option that names it, for the error message (e.g. ``"model.export_dir"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        PermissionError: ``path`` (or an ancestor) is a file, or cannot be written, with
            ``what``, the path and the reason.
    """
    folder = Path(path).expanduser()
    probe_dir = folder.absolute()
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise PermissionError(
            f"{what}={str(path)!r} cannot be a folder: {str(probe_dir)!r} is a file; "
            "choose another folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".tclora-write-check-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{what}={str(path)!r} is not writable ({str(probe_dir)!r}: "
            f"{err.strerror or err}); choose another folder"
        ) from None
    return folder
