"""Every on-disk cache of the data pipeline, under one cache folder:

* ``<key>.npy``: sentence embeddings, keyed by the texts' content hash, the encoder and the text
  choice (:func:`cached_embeddings`); computed chunk by chunk, work shared between processes.
* ``clusters/<key>.npz``: a clustering, keyed by the texts, every clustering option, the split and
  the scikit-learn version (:func:`cluster_cache_file`, :func:`cached_clusters`).
* ``lengths/<key>.npy``: prompt and response token counts, keyed by the samples and the tokenizer
  (:func:`token_lengths_file`, :func:`cached_token_lengths`).

Every entry is written atomically, nothing unreadable is trusted (a truncated, pickled or
inconsistent file is reported, deleted and rebuilt), and temporary files of killed writes are
removed. The keys are stable: a cache written by an earlier version stays valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tclora._io import (
    atomic_save_npy,
    atomic_write,
    atomic_write_text,
    read_npy,
    read_npz,
    remove_stale_temp_files,
)
from tclora.clustering.encoder import EncodeFn, l2_normalize
from tclora.clustering.policy import ClusteringOptions, Clusters
from tclora.data import Sample, content_hash, tokenizer_fingerprint

__all__ = [
    "cached_clusters",
    "cached_embeddings",
    "cached_token_lengths",
    "cluster_cache_file",
    "embedding_cache_key",
    "token_lengths_file",
]

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def embedding_cache_key(data_hash: str, encoder: str, embed_field: str) -> str:
    """Key of an embedding cache entry: the texts' content hash, the encoder and the text choice.

    Args:
        data_hash: Hash of the embedded texts (:func:`texts_hash`).
        encoder: Encoder identity (:func:`encoder_fingerprint`).
        embed_field: Which text was embedded (``"prompt"`` or ``"prompt_response"``).

    Returns:
        A hex string safe as a file name.
    """
    record = json.dumps([data_hash, encoder, embed_field, "l2-float32"])
    return hashlib.sha256(record.encode()).hexdigest()[:32]


def cached_embeddings(
    texts: Sequence[str],
    encode: EncodeFn | Callable[[], EncodeFn],
    cache_dir: str | os.PathLike[str],
    key: str,
    chunk_size: int = 16384,
    compute: bool = True,
    poll_seconds: float = 0.5,
    meta: dict[str, Any] | None = None,
) -> np.ndarray | None:
    """Return the L2-normalised float32 embeddings of ``texts``, from the cache or computed.

    The cache entry ``<cache_dir>/<key>.npy`` is written atomically. Work is split in chunks of
    ``chunk_size`` texts, each claimed with a file lock, so that several processes (ranks, nodes on
    a shared file system) calling this at once split the work and never embed a chunk another
    one has embedded or is embedding; a killed run keeps its finished chunks, in
    ``<cache_dir>/<key>.parts/rows-<start>-<stop>.npy`` (named by the rows they hold, so a rerun
    with another ``chunk_size`` recomputes rather than misreads them).

    Nothing unreadable is trusted: an entry or a finished chunk that is truncated, not an array,
    holds object (pickled) data, or has the wrong shape or dtype is reported with a warning that
    names the file, deleted and recomputed. Temporary files of killed writes older than an hour,
    and ``.parts`` folders of finished entries left for an hour, are deleted.

    Args:
        texts: The texts, in order.
        encode: ``texts -> (n, D) array``, or a zero-argument factory returning one (called only
            on a cache miss, so a hit never loads the encoder).
        cache_dir: Cache folder (created if needed).
        key: Cache key (:func:`embedding_cache_key`).
        chunk_size: Texts per claimed chunk.
        compute: If ``False``, only read: return ``None`` on a miss (or an unusable entry, with
            a warning; nothing is deleted).
        poll_seconds: Wait between checks for chunks other processes are computing.
        meta: Extra JSON-serialisable facts written next to the cache entry.

    Returns:
        ``(len(texts), D)`` float32 array with unit rows (memory-mapped read-only on a hit), or
        ``None`` when ``compute`` is ``False`` and the entry is missing or unusable.

    Raises:
        RuntimeError: The encoder returned an array of another shape than ``(n, D)``.
    """
    from filelock import FileLock, Timeout

    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    num_texts = len(texts)
    folder = Path(cache_dir).expanduser()
    final = folder / f"{key}.npy"
    if compute:
        _remove_leftovers(folder)
    problem: ValueError | None = None
    try:
        return _load_embeddings(final, num_texts)
    except FileNotFoundError:
        pass
    except ValueError as err:
        problem = err
    if not compute:
        if problem is not None:
            warnings.warn(f"embedding cache {problem}; ignoring it", stacklevel=2)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    final_lock = FileLock(str(final) + ".lock")
    if problem is not None:
        with final_lock:
            hit = _valid_or_discard(final, num_texts)
        if hit is not None:  # another process rebuilt it meanwhile
            return hit
    parts = folder / f"{key}.parts"
    ranges = [
        (start, min(start + chunk_size, num_texts))
        for start in range(0, max(num_texts, 1), chunk_size)
    ]
    encode_fn: EncodeFn | None = None

    def part(rows: tuple[int, int]) -> Path:
        return parts / f"rows-{rows[0]:010d}-{rows[1]:010d}.npy"

    while True:
        parts.mkdir(exist_ok=True)
        pending = [rows for rows in ranges if not part(rows).is_file()]
        while pending and not final.is_file():
            waiting = []
            for rows in pending:
                if final.is_file():  # another process finished the entry
                    break
                lock = FileLock(str(part(rows)) + ".lock")
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    waiting.append(rows)  # another process is embedding this chunk
                    continue
                try:
                    if not part(rows).is_file():
                        if encode_fn is None:
                            encode_fn = _as_encode_fn(encode)
                        chunk = list(texts[rows[0] : rows[1]])
                        raw = np.asarray(encode_fn(chunk))
                        if raw.ndim != 2 or raw.shape[0] != len(chunk) or raw.shape[1] < 1:
                            raise RuntimeError(
                                f"the encoder returned an array of shape {raw.shape} for "
                                f"{len(chunk)} texts; expected ({len(chunk)}, D)"
                            )
                        atomic_save_npy(part(rows), l2_normalize(raw))
                finally:
                    lock.release()
            pending = [rows for rows in waiting if not part(rows).is_file()]
            if pending:
                time.sleep(poll_seconds)
        with final_lock:
            hit = _valid_or_discard(final, num_texts)
            if hit is not None:
                return hit
            arrays: list[np.ndarray] = []
            for rows in ranges:
                try:
                    arrays.append(_load_embeddings(part(rows), rows[1] - rows[0]))
                except FileNotFoundError:
                    pass  # deleted meanwhile: computed again below
                except ValueError as err:
                    warnings.warn(
                        f"embedding cache chunk {err}; deleting it and recomputing the chunk",
                        stacklevel=2,
                    )
                    part(rows).unlink(missing_ok=True)
            if len(arrays) == len(ranges) and len({a.shape[1] for a in arrays}) > 1:
                warnings.warn(
                    f"embedding cache chunks in {parts} have different widths "
                    f"{sorted({a.shape[1] for a in arrays})}; deleting them and recomputing",
                    stacklevel=2,
                )
                for rows in ranges:
                    part(rows).unlink(missing_ok=True)
                arrays = []
            if len(arrays) != len(ranges):
                continue  # compute the missing chunks, then assemble again
            embeddings = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
            del arrays
            atomic_save_npy(final, embeddings)
            info = {"num_texts": num_texts, "dim": int(embeddings.shape[1]), **(meta or {})}
            atomic_write_text(folder / f"{key}.json", json.dumps(info, indent=1, sort_keys=True))
            shutil.rmtree(parts, ignore_errors=True)  # chunks of any chunk size, locks, temps
        return _load_embeddings(final, num_texts)


def _load_embeddings(path: Path, num_rows: int) -> np.ndarray:
    """Memory-map the float32 ``(num_rows, D)`` array at ``path``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable, or of another shape or dtype (the message starts with ``path``).
    """
    array = read_npy(path, mmap=True)
    if (
        array.ndim != 2
        or array.shape[0] != num_rows
        or array.shape[1] < 1
        or array.dtype != np.float32
    ):
        raise ValueError(
            f"{path}: holds {array.shape} {array.dtype}, expected ({num_rows}, D) float32"
        )
    return array


def _valid_or_discard(path: Path, num_rows: int) -> np.ndarray | None:
    """The valid embeddings at ``path``, or ``None`` (missing, or invalid: warned and deleted).

    The caller holds the entry's lock.
    """
    try:
        return _load_embeddings(path, num_rows)
    except FileNotFoundError:
        return None
    except ValueError as err:
        warnings.warn(
            f"embedding cache {err}; deleting it and recomputing the embeddings", stacklevel=3
        )
        path.unlink(missing_ok=True)
        return None


def _remove_leftovers(folder: Path, max_age_s: float = 3600.0) -> None:
    """Delete what killed runs left in the embedding cache ``folder`` (untouched for an hour).

    That is: temporary files of interrupted atomic writes, in ``folder`` and in its ``.parts``
    folders, and the ``.parts`` folders of entries that are finished.
    """
    remove_stale_temp_files(folder, max_age_s)
    cutoff = time.time() - max_age_s
    for parts in folder.glob("*.parts"):
        if not parts.is_dir() or parts.is_symlink():
            continue
        remove_stale_temp_files(parts, max_age_s)
        finished = (folder / f"{parts.name[: -len('.parts')]}.npy").is_file()
        try:
            old = parts.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if finished and old:
            shutil.rmtree(parts, ignore_errors=True)


def _as_encode_fn(encode: EncodeFn | Callable[[], EncodeFn]) -> EncodeFn:
    """Accept either an encode function or a factory of one (a factory takes no argument)."""
    import inspect

    try:
        takes_args = bool(inspect.signature(encode).parameters)
    except (TypeError, ValueError):
        takes_args = True
    return encode if takes_args else encode()  # type: ignore[return-value,call-arg]


# --------------------------------------------------------------------------------------------
# Clusters and token lengths
# --------------------------------------------------------------------------------------------


def cluster_cache_file(
    folder: Path,
    texts_key: str,
    samples: Sequence[Sample],
    options: ClusteringOptions,
    val_fraction: float,
) -> Path:
    """The cluster cache entry of a clustering configuration.

    The key covers the embedded texts, the encoder and the text choice (all in ``texts_key``),
    every clustering option, the split and the scikit-learn version, so a hit is the clustering
    this configuration would compute. ``"per_task"`` also keys on the samples' content (their
    task labels).

    Args:
        folder: The cache folder.
        texts_key: The embedding cache key (:func:`embedding_cache_key`).
        samples: All samples.
        options: The clustering options.
        val_fraction: Fraction held out for validation (with ``options.seed``, the split).

    Returns:
        ``<folder>/clusters/<key>.npz``.
    """
    import sklearn

    record = json.dumps(
        [
            texts_key,
            content_hash(samples) if options.method == "per_task" else len(samples),
            options.method,
            options.num_clusters,
            options.num_clusters_range,
            options.seed,
            val_fraction,
            options.n_init,
            options.fit_fraction,
            options.min_fit_samples,
            options.silhouette_sample_size,
            options.min_cluster_size,
            options.small_cluster_policy,
            sklearn.__version__,
        ]
    )
    key = hashlib.sha256(record.encode()).hexdigest()[:32]
    return folder / "clusters" / f"{key}.npz"


def cached_clusters(
    path: Path, num_samples: int, dim: int, compute: Callable[[], Clusters]
) -> Clusters:
    """The clusters cached at ``path``, or ``compute()``'s, then cached there.

    An unreadable or inconsistent entry (missing arrays, wrong shapes or dtypes, cluster ids
    outside the centroids) is reported (naming the file), deleted and recomputed.

    Args:
        path: The entry (:func:`cluster_cache_file`).
        num_samples: ``N``, the samples clustered.
        dim: ``D``, the embedding width.
        compute: Computes the clusters on a miss.

    Returns:
        The clusters.
    """
    remove_stale_temp_files(path.parent)
    cached = _read_or_discard(path, lambda: _read_clusters(path, num_samples, dim))
    if cached is not None:
        return cached
    clusters = compute()
    assignments, centroids, scores = clusters
    atomic_write(
        path,
        lambda handle: np.savez(
            handle,
            assignments=np.asarray(assignments, dtype=np.int64),
            centroids=np.asarray(centroids, dtype=np.float32),
            score_k=np.asarray(list(scores), dtype=np.int64),
            score=np.asarray(list(scores.values()), dtype=np.float64),
        ),
        binary=True,
    )
    return clusters


def token_lengths_file(folder: Path, data_hash: str, tokenizer: Any, chat_template: bool) -> Path:
    """The token-lengths cache entry of some samples under a tokenizer.

    Keyed by the samples' content, the tokenizer (:func:`tclora.data.tokenizer_fingerprint`:
    its definition, special tokens and chat template, not the folder it was loaded from) and
    ``chat_template``.

    Args:
        folder: The cache folder.
        data_hash: The samples' content hash (:func:`tclora.data.content_hash`).
        tokenizer: The transformers tokenizer.
        chat_template: Whether prompts are rendered with the chat template.

    Returns:
        ``<folder>/lengths/<key>.npy``.
    """
    record = json.dumps(
        [
            data_hash,
            tokenizer_fingerprint(tokenizer),
            chat_template,
        ]
    )
    return folder / "lengths" / f"{hashlib.sha256(record.encode()).hexdigest()[:32]}.npy"


def cached_token_lengths(
    path: Path, num_samples: int, compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """The token counts cached at ``path``, or ``compute()``'s, then cached there.

    An unreadable entry, or one of another shape or dtype, is reported (naming the file),
    deleted and recomputed.

    Args:
        path: The entry (:func:`token_lengths_file`).
        num_samples: Number of samples.
        compute: Computes the ``(num_samples, 2)`` int64 counts on a miss.

    Returns:
        ``(num_samples, 2)`` int64 prompt and response token counts.
    """
    remove_stale_temp_files(path.parent)
    cached = _read_or_discard(path, lambda: _read_lengths(path, num_samples))
    if cached is not None:
        return cached
    lengths = compute()
    atomic_save_npy(path, lengths)
    return lengths


def _read_or_discard(path: Path, read: Callable[[], _T]) -> _T | None:
    """``read()``, or ``None`` on a miss or for an unusable file (reported and deleted)."""
    try:
        return read()
    except FileNotFoundError:
        return None
    except ValueError as problem:  # its message starts with the path
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"ClusterDataModule: cache file {problem}; deleting it and rebuilding it")
        path.unlink(missing_ok=True)
        return None


def _read_lengths(path: Path, num_samples: int) -> np.ndarray:
    """The ``(num_samples, 2)`` int64 token counts at ``path`` (a copy, not a memory map).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable, or of another shape or dtype (the message starts with ``path``).
    """
    lengths = read_npy(path, mmap=True)
    if lengths.shape != (num_samples, 2) or lengths.dtype != np.int64:
        raise ValueError(
            f"{path}: holds {lengths.shape} {lengths.dtype}, expected ({num_samples}, 2) int64"
        )
    return np.array(lengths)


def _read_clusters(path: Path, num_samples: int, dim: int) -> Clusters:
    """The clusters at ``path``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable or inconsistent (the message starts with ``path``).
    """
    arrays = read_npz(path)
    missing = sorted({"assignments", "centroids", "score_k", "score"} - set(arrays))
    if missing:
        raise ValueError(f"{path}: lacks the array(s) {missing}")
    assignments, centroids = arrays["assignments"], arrays["centroids"]
    score_k, score = arrays["score_k"], arrays["score"]
    if (
        assignments.shape != (num_samples,)
        or assignments.dtype != np.int64
        or centroids.ndim != 2
        or centroids.shape[0] < 1
        or centroids.shape[1] != dim
        or centroids.dtype != np.float32
        or score_k.ndim != 1
        or score_k.dtype != np.int64
        or score.shape != score_k.shape
        or score.dtype != np.float64
    ):
        raise ValueError(
            f"{path}: holds assignments {assignments.shape} {assignments.dtype}, centroids "
            f"{centroids.shape} {centroids.dtype}, scores {score_k.shape} {score_k.dtype} / "
            f"{score.shape} {score.dtype}; expected ({num_samples},) int64, (K, {dim}) "
            "float32, (S,) int64 / (S,) float64"
        )
    if num_samples and not 0 <= assignments.min() <= assignments.max() < len(centroids):
        raise ValueError(
            f"{path}: cluster ids {assignments.min()}..{assignments.max()} are outside the "
            f"{len(centroids)} centroids"
        )
    scores = dict(zip(score_k.tolist(), score.tolist(), strict=True))
    return Clusters(assignments, centroids, scores)
