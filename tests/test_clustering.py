"""Pure clustering functions: cache, k-means, assignment, baselines, merging, statistics."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tclora.clustering import (
    ClusteringOptions,
    Clusters,
    assign_to_centroids,
    cached_clusters,
    cached_embeddings,
    cached_token_lengths,
    centroids_from_assignments,
    check_num_clusters,
    choose_num_clusters,
    cluster_cache_file,
    cluster_samples,
    cluster_statistics,
    embedding_cache_key,
    encoder_fingerprint,
    fit_kmeans,
    l2_normalize,
    merge_small_clusters,
    per_task_assignments,
    plot_clusters,
    project_2d,
    texts_hash,
    token_lengths_file,
)
from tclora.data import Sample


def _blobs(per: int = 40, k: int = 3, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + rng.normal(size=(k * per, dim)) * 0.3
    return x.astype(np.float32), labels


class CountingEncoder:
    def __init__(self, dim: int = 4) -> None:
        self.calls: list[int] = []
        self.dim = dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.asarray([[len(t), 1.0, t.count("a"), 2.0][: self.dim] for t in texts], np.float32)


def test_cache_hit_never_calls_the_encoder(tmp_path: Path) -> None:
    texts = [f"text {'a' * i}" for i in range(10)]
    enc = CountingEncoder()
    first = cached_embeddings(texts, enc, tmp_path, "k1", chunk_size=4)
    assert enc.calls == [4, 4, 2]
    assert first is not None and first.dtype == np.float32 and first.shape == (10, 4)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-6)

    def factory_must_not_run():
        raise AssertionError("the encoder was loaded on a cache hit")

    second = cached_embeddings(texts, factory_must_not_run, tmp_path, "k1", chunk_size=4)
    np.testing.assert_array_equal(first, second)
    assert enc.calls == [4, 4, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.json", "k1.npy", "k1.npy.lock"]
    assert cached_embeddings(texts, enc, tmp_path, "other", compute=False) is None
    # an entry of another shape is not trusted: reported, deleted and recomputed
    with pytest.warns(
        UserWarning,
        match=r"k1\.npy: holds \(10, 4\) float32, expected \(3, D\) float32; deleting it and "
        r"recomputing the embeddings",
    ):
        third = cached_embeddings(texts[:3], enc, tmp_path, "k1", chunk_size=4)
    assert enc.calls == [4, 4, 2, 3]
    np.testing.assert_array_equal(third, first[:3])


def test_cache_resumes_finished_chunks_and_skips_chunks_another_process_holds(
    tmp_path: Path,
) -> None:
    from filelock import FileLock

    texts = [f"t{i}" for i in range(6)]
    parts = tmp_path / "key.parts"
    parts.mkdir()
    ref = l2_normalize(CountingEncoder()(texts))
    np.save(parts / "rows-0000000000-0000000002.npy", ref[:2])  # finished by a killed run
    other = FileLock(str(parts / "rows-0000000002-0000000004.npy") + ".lock")
    other.acquire()  # "another process" is embedding chunk 1

    def finish_other() -> None:
        np.save(parts / "rows-0000000002-0000000004.npy", ref[2:4])
        other.release()

    timer = threading.Timer(0.3, finish_other)
    timer.start()
    enc = CountingEncoder()
    out = cached_embeddings(texts, enc, tmp_path, "key", chunk_size=2, poll_seconds=0.05)
    timer.join()
    assert enc.calls == [2]  # only chunk 2 was embedded here
    np.testing.assert_allclose(out, ref)
    assert not parts.exists()


class Killed(Exception):
    """Stands for the end of a process killed mid-embedding."""


def _killed_after(chunks: int, enc: CountingEncoder) -> CountingEncoder:
    """An encoder that embeds ``chunks`` chunks, then dies."""

    class Dying(CountingEncoder):
        def __call__(self, texts: list[str]) -> np.ndarray:
            if len(enc.calls) == chunks:
                raise Killed
            return enc(texts)

    return Dying()


def test_parts_of_a_killed_run_with_another_chunk_size_are_not_misread(tmp_path: Path) -> None:
    texts = [f"text {'a' * i}" for i in range(24)]
    ref = l2_normalize(CountingEncoder()(texts))
    first = CountingEncoder()
    with pytest.raises(Killed):
        cached_embeddings(texts, _killed_after(2, first), tmp_path, "key", chunk_size=5)
    assert first.calls == [5, 5]
    assert len(list((tmp_path / "key.parts").glob("*.npy"))) == 2  # kept for a rerun
    enc = CountingEncoder()
    out = cached_embeddings(texts, enc, tmp_path, "key", chunk_size=7)
    assert enc.calls == [7, 7, 7, 3]  # the 5-row chunks are ignored, not misread
    np.testing.assert_array_equal(out, ref)
    assert not (tmp_path / "key.parts").exists()  # chunks of both sizes are cleaned up


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("garbage", r"not a readable \.npy array \(ValueError: This file contains pickled"),
        ("rows", r"holds \(3, 4\) float32, expected \(2, D\) float32"),
    ],
)
def test_a_corrupt_chunk_is_recomputed(tmp_path: Path, damage: str, problem: str) -> None:
    texts = [f"text {'a' * i}" for i in range(6)]
    ref = l2_normalize(CountingEncoder()(texts))
    with pytest.raises(Killed):
        cached_embeddings(texts, _killed_after(2, CountingEncoder()), tmp_path, "key", chunk_size=2)
    chunk = tmp_path / "key.parts" / "rows-0000000002-0000000004.npy"
    if damage == "garbage":
        chunk.write_bytes(b"\x00garbage" * 20)
    else:
        np.save(chunk, ref[:3])
    enc = CountingEncoder()
    with pytest.warns(
        UserWarning,
        match=rf"embedding cache chunk .*key\.parts/rows-0000000002-0000000004\.npy: {problem}.*"
        r"; deleting it and recomputing the chunk",
    ):
        out = cached_embeddings(texts, enc, tmp_path, "key", chunk_size=2)
    assert enc.calls == [2, 2]  # chunk 2 (missing), then chunk 1 (corrupt)
    np.testing.assert_array_equal(out, ref)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # header (128 bytes) and half of the rows


def _write_npz(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, x=np.ones((10, 4), np.float32))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, r"not a readable \.npy array \(ValueError: mmap length is greater than file"),
        (
            lambda p: p.write_bytes(b"\x00garbage" * 50),
            r"not a readable \.npy array \(ValueError: This file contains pickled",
        ),
        (lambda p: p.write_bytes(b""), r"not a readable \.npy array \(EOFError: No data left"),
        (
            lambda p: np.save(p, np.asarray([{"a": 1}], dtype=object), allow_pickle=True),
            r"not a readable \.npy array \(ValueError: Array can't be memory-mapped: Python obj",
        ),
        (
            lambda p: np.save(p, np.ones((10, 4), np.float64)),
            r"holds \(10, 4\) float64, expected \(10, D\) float32",
        ),
        (
            _write_npz,
            r"not a readable \.npy array \(an \.npz archive\)",
        ),
    ],
    ids=["truncated", "garbage", "empty", "object", "float64", "npz"],
)
def test_a_corrupt_entry_is_reported_and_recomputed(
    tmp_path: Path, damage: Any, problem: str
) -> None:
    texts = [f"text {'a' * i}" for i in range(10)]
    enc = CountingEncoder()
    first = np.array(cached_embeddings(texts, enc, tmp_path, "k1", chunk_size=4))
    damage(tmp_path / "k1.npy")
    match = rf"embedding cache .*k1\.npy: {problem}"
    with pytest.warns(UserWarning, match=match + r".*; ignoring it"):
        assert cached_embeddings(texts, enc, tmp_path, "k1", compute=False) is None
    with pytest.warns(UserWarning, match=match + r".*; deleting it and recomputing the embeddings"):
        again = cached_embeddings(texts, enc, tmp_path, "k1", chunk_size=4)
    assert enc.calls == [4, 4, 2, 4, 4, 2]
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(tmp_path / "k1.npy", allow_pickle=False), first)


def test_leftovers_of_killed_writes_are_removed_after_an_hour(tmp_path: Path) -> None:
    texts = ["a", "b", "c"]
    cached_embeddings(texts, CountingEncoder(), tmp_path, "done", chunk_size=2)
    stale_parts = tmp_path / "done.parts"  # a straggler's chunk, after the entry was finished
    stale_parts.mkdir()
    np.save(stale_parts / "rows-0000000000-0000000002.npy", np.ones((2, 4), np.float32))
    live_parts = tmp_path / "todo.parts"  # the finished chunks of an unfinished entry: kept
    live_parts.mkdir()
    np.save(live_parts / "rows-0000000000-0000000002.npy", np.ones((2, 4), np.float32))
    old_temps = [
        tmp_path / ".done.npy.k2j_x9q0",
        live_parts / ".rows-0000000000-0000000002.npy.abcdefgh",
    ]
    new_temp = tmp_path / ".other.npy.zzzzzzzz"  # a write in progress elsewhere
    for temp in [*old_temps, new_temp]:
        temp.write_bytes(b"half")
    hour_ago = time.time() - 3700
    for old in [*old_temps, stale_parts]:
        os.utime(old, (hour_ago, hour_ago))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hit: nothing to report
        out = cached_embeddings(texts, CountingEncoder(), tmp_path, "done", chunk_size=2)
    assert out is not None and out.shape == (3, 4)
    assert not any(temp.exists() for temp in old_temps) and not stale_parts.exists()
    assert new_temp.exists() and (live_parts / "rows-0000000000-0000000002.npy").exists()


def test_cache_key_and_fingerprint(tmp_path: Path) -> None:
    assert texts_hash(["a", "b"]) != texts_hash(["b", "a"])
    assert texts_hash(["ab"]) != texts_hash(["a", "b"])
    keys = {
        embedding_cache_key("h", "m", "prompt"),
        embedding_cache_key("h2", "m", "prompt"),
        embedding_cache_key("h", "m2", "prompt"),
        embedding_cache_key("h", "m", "prompt_response"),
    }
    assert len(keys) == 4
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    before = encoder_fingerprint(str(tmp_path / "enc"))
    (tmp_path / "enc" / "config.json").write_text('{"x": 1}')
    assert encoder_fingerprint(str(tmp_path / "enc")) != before
    assert encoder_fingerprint("org/model") == "org/model"


def _save_encoder(folder: Path, weights: bytes) -> Path:
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "1_Pooling" / "config.json").write_text('{"mean": true}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_encoder_fingerprint_hashes_the_weights(tmp_path: Path) -> None:
    old, new = bytes(range(256)) * 4, bytes(reversed(range(256))) * 4  # same size
    a = encoder_fingerprint(str(_save_encoder(tmp_path / "a" / "enc", old)))
    b = encoder_fingerprint(str(_save_encoder(tmp_path / "b" / "enc", new)))
    assert a.startswith("enc-") and len(a) == len("enc-") + 16
    assert a != b  # a re-trained encoder of the same file sizes is another encoder
    copy = tmp_path / "c" / "enc"
    shutil.copytree(tmp_path / "a" / "enc", copy)
    (copy / ".cache").mkdir()  # hidden download metadata and locks do not count
    (copy / ".cache" / "model.safetensors.lock").write_text("")
    assert encoder_fingerprint(str(copy)) == a  # an identical copy is the same encoder
    # re-trained and saved over the same folder later: the new weights are hashed
    weights = tmp_path / "a" / "enc" / "model.safetensors"
    weights.write_bytes(new)
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))
    assert encoder_fingerprint(str(tmp_path / "a" / "enc")) == b
    _save_encoder(tmp_path / "a" / "enc", old)  # re-saved identical: the first fingerprint
    assert encoder_fingerprint(str(tmp_path / "a" / "enc")) == a


def test_kmeans_is_seeded_and_recovers_blobs() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, labels = _blobs()
    c1 = fit_kmeans(x, 3, seed=7)
    c2 = fit_kmeans(x, 3, seed=7)
    np.testing.assert_array_equal(c1, c2)
    assert c1.dtype == np.float32 and c1.shape == (3, 8)
    assert adjusted_rand_score(labels, assign_to_centroids(x, c1)) == 1.0
    mb = fit_kmeans(x, 3, method="minibatch_kmeans", seed=7, n_init=3)
    assert adjusted_rand_score(labels, assign_to_centroids(x, mb)) == 1.0
    # a 20% subsample is used once the data exceeds min_fit_samples
    sub = fit_kmeans(x, 3, seed=7, fit_fraction=0.2, min_fit_samples=10)
    assert adjusted_rand_score(labels, assign_to_centroids(x, sub)) == 1.0
    with pytest.raises(ValueError, match=r"num_clusters=121 must be between 1 and N=120"):
        fit_kmeans(x, 121)
    with pytest.raises(ValueError, match=r"method='dbscan'"):
        fit_kmeans(x, 2, method="dbscan")  # type: ignore[arg-type]


def test_assign_matches_sklearn_predict() -> None:
    from sklearn.cluster import KMeans

    x, _ = _blobs(per=30, k=4, seed=1)
    model = KMeans(4, n_init=2, random_state=0).fit(x)
    ours = assign_to_centroids(x, model.cluster_centers_, chunk_size=7)
    np.testing.assert_array_equal(ours, model.predict(x))
    with pytest.raises(ValueError, match=r"must be \(N, D\) and \(K, D\)"):
        assign_to_centroids(x, model.cluster_centers_[:, :3])


def test_baselines_and_centroids() -> None:
    ids, names = per_task_assignments(["b", "a", "b", "c"])
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(ids, [1, 0, 1, 2])
    x = np.asarray([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], np.float32)
    cents = centroids_from_assignments(x, np.asarray([0, 0, 1]), 3)
    np.testing.assert_allclose(cents, [[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]])


def test_merge_small_clusters_into_nearest() -> None:
    x = np.asarray([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [0.5, 0.5]], np.float32)
    assign = np.asarray([0, 0, 0, 1, 1, 2])
    cents = centroids_from_assignments(x, assign, 3)
    new, new_cents, old_to_new = merge_small_clusters(x, assign, cents, min_size=2)
    np.testing.assert_array_equal(new, [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(old_to_new, [0, 1, 0])
    np.testing.assert_allclose(new_cents, centroids_from_assignments(x, new, 2))
    same, same_cents, ident = merge_small_clusters(x, assign, cents, min_size=1)
    np.testing.assert_array_equal(same, assign)
    np.testing.assert_array_equal(ident, [0, 1, 2])
    one, _, _ = merge_small_clusters(x, assign, cents, min_size=100)  # never below one cluster
    assert set(one.tolist()) == {0}


def test_choose_num_clusters_by_silhouette() -> None:
    x, _ = _blobs(per=25, k=4, seed=2)
    best, scores = choose_num_clusters(x, range(2, 7), seed=0, n_init=2)
    assert best == 4 and max(scores, key=scores.__getitem__) == 4
    assert sorted(scores) == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=r"no candidate in \[2, 99\]"):
        choose_num_clusters(x[:100], [1, 100])


def test_cluster_statistics_numbers() -> None:
    assign = np.asarray([0, 0, 0, 1, 1, 1])
    tasks = ["a", "a", "b", "b", "b", "b"]
    s = cluster_statistics(assign, tasks, num_clusters=3)
    assert s["sizes"] == [3, 3, 0]
    assert s["purity"] == pytest.approx(5 / 6)
    assert s["tasks_per_cluster"] == [{"a": 2, "b": 1}, {"b": 3}, {}]
    assert s["silhouette"] is None
    perfect = cluster_statistics(np.asarray([1, 1, 0, 0]), ["x", "x", "y", "y"])
    assert perfect["adjusted_rand_index"] == pytest.approx(1.0)
    assert perfect["purity"] == 1.0
    x, labels = _blobs(per=10, k=2)
    with_sil = cluster_statistics(labels, [str(v) for v in labels], x)
    assert 0.5 < with_sil["silhouette"] <= 1.0


def test_projection_and_figure() -> None:
    x, labels = _blobs(per=10, k=3)
    cents = centroids_from_assignments(x, labels, 3)
    pts = project_2d(x, cents)
    assert pts.shape == (33, 2) and pts.dtype == np.float32
    # PCA: the first coordinate has the largest variance and the projection is centred
    assert pts[:30, 0].var() >= pts[:30, 1].var()
    np.testing.assert_allclose(pts[:30].mean(axis=0), 0.0, atol=1e-4)
    fig = plot_clusters(pts[:30], labels, [f"task{v}" for v in labels], pts[30:], title="t")
    assert fig.axes[0].get_title() == "t" and len(fig.axes[0].collections) == 3 + 3


# ----------------------------------------------------------------------------- policy and caches


def test_cluster_samples_kmeans_and_baselines() -> None:
    x, labels = _blobs(per=20, k=3, seed=3)
    tasks = [f"t{v}" for v in labels]
    order = np.random.default_rng(0).permutation(len(x))
    train, val = np.sort(order[:50]), np.sort(order[50:])
    lines: list[str] = []
    options = ClusteringOptions(num_clusters=3, n_init=2)
    clusters = cluster_samples(x, train, val, tasks, options, info=lines.append)
    assert isinstance(clusters, Clusters) and clusters.centroids.shape == (3, 8)
    assert clusters.assignments.dtype == np.int64 and clusters.scores == {} and not lines
    np.testing.assert_array_equal(
        clusters.assignments[val], assign_to_centroids(x[val], clusters.centroids)
    )
    single = cluster_samples(x, train, val, tasks, ClusteringOptions(method="single"))
    assert set(single.assignments.tolist()) == {0}
    # per-task routes validation samples by label; an unseen label goes to the nearest centroid
    tasks[val[0]] = "unseen"
    per_task = cluster_samples(x, train, val, tasks, ClusteringOptions(method="per_task"))
    names = sorted({tasks[i] for i in train})
    assert per_task.assignments[val[1]] == names.index(tasks[val[1]])
    assert per_task.assignments[val[0]] == assign_to_centroids(x[val[:1]], per_task.centroids)[0]
    searched = cluster_samples(
        x,
        train,
        val,
        tasks,
        ClusteringOptions(num_clusters=None, num_clusters_range=(2, 4), n_init=2),
        info=lines.append,
    )
    assert sorted(searched.scores) == [2, 3, 4] and lines[0].startswith(
        "chose num_clusters=3 by silhouette"
    )


def test_cluster_samples_small_cluster_policy() -> None:
    x, labels = _blobs(per=20, k=3, seed=4)
    tasks = ["a"] * 40 + ["b"] * 18 + ["c"] * 2
    rows = np.arange(len(x))
    reject = ClusteringOptions(method="per_task", min_cluster_size=5, small_cluster_policy="reject")
    with pytest.raises(ValueError, match=r"cluster\(s\) \{2: 2\} .* min_cluster_size=5"):
        cluster_samples(x, rows, rows[:0], tasks, reject)
    lines: list[str] = []
    merge = ClusteringOptions(method="per_task", min_cluster_size=5)
    merged = cluster_samples(x, rows, rows[:0], tasks, merge, info=lines.append)
    assert merged.centroids.shape[0] == 2
    assert lines == ["merged clusters {2: 2} (smaller than min_cluster_size=5); 3 -> 2 clusters"]


def test_check_num_clusters_before_embedding() -> None:
    texts = ["a", "b", "b", "c"]
    check_num_clusters(ClusteringOptions(num_clusters=3), texts, 0.0)
    check_num_clusters(ClusteringOptions(method="per_task", num_clusters=9), texts, 0.0)
    with pytest.raises(ValueError, match=r"larger than the number of training samples \(3 of 4"):
        check_num_clusters(ClusteringOptions(num_clusters=4), texts, 0.25)
    with pytest.raises(
        ValueError, match=r"larger than the number of distinct texts to embed \(3\)"
    ):
        check_num_clusters(ClusteringOptions(num_clusters=4), texts, 0.0)


def test_cache_keys_are_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys of caches written by earlier versions: changing one orphans every cache."""
    import sklearn

    monkeypatch.setattr(sklearn, "__version__", "1.0.test")
    samples = [Sample("p1", "r1", "a"), Sample("p2", "r2", "b")]

    class Tokenizer:
        name_or_path, eos_token, chat_template = "tok", "</s>", "{{ x }}"

        def __len__(self) -> int:
            return 100

    assert embedding_cache_key("abc", "enc-0123", "prompt") == "d4a8fca5831c4ea1d86e57dbec707643"
    options = ClusteringOptions(num_clusters=3, num_clusters_range=(2, 5))
    assert cluster_cache_file(Path("c"), "k" * 32, samples, options, 0.1) == Path(
        "c/clusters/195cb36ff748c39ccfa8e519a196b8c3.npz"
    )
    per_task = ClusteringOptions(method="per_task", num_clusters=3, num_clusters_range=(2, 5))
    assert cluster_cache_file(Path("c"), "k" * 32, samples, per_task, 0.1).stem == (
        "4d1e86228be129113f33cbe40a52b443"  # keyed on the samples' content (their labels)
    )
    assert token_lengths_file(Path("c"), "d" * 64, Tokenizer(), True) == Path(
        "c/lengths/f41908f73a76d51e9728fc0ca17ccb12.npy"
    )


def test_cluster_and_length_caches_compute_once(tmp_path: Path) -> None:
    calls: list[str] = []

    def clusters() -> Clusters:
        calls.append("clusters")
        return Clusters(np.asarray([0, 1, 1]), np.eye(2, 4, dtype=np.float32), {2: 0.5})

    def lengths() -> np.ndarray:
        calls.append("lengths")
        return np.asarray([[3, 1], [4, 1], [5, 9]], np.int64)

    path = tmp_path / "clusters" / "x.npz"
    first = cached_clusters(path, 3, 4, clusters)
    again = cached_clusters(path, 3, 4, clusters)
    np.testing.assert_array_equal(again.assignments, first.assignments)
    np.testing.assert_array_equal(again.centroids, first.centroids)
    assert again.scores == {2: 0.5} and again.assignments.dtype == np.int64
    counts = tmp_path / "lengths" / "x.npy"
    np.testing.assert_array_equal(cached_token_lengths(counts, 3, lengths), lengths())
    np.testing.assert_array_equal(cached_token_lengths(counts, 3, lengths), lengths())
    assert calls == ["clusters", "lengths", "lengths", "lengths"]
    with pytest.warns(UserWarning, match=r"x\.npz: holds assignments \(3,\).*; deleting it"):
        cached_clusters(path, 3, 5, clusters)  # another width: rebuilt
    assert calls[-1] == "clusters"
