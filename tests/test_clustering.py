"""Pure clustering functions: cache, k-means, assignment, baselines, merging, statistics."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tclora.clustering import (
    assign_to_centroids,
    cached_embeddings,
    centroids_from_assignments,
    choose_num_clusters,
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
)


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
    with pytest.raises(RuntimeError, match=r"holds \(10, 4\) float32, expected \(3, D\)"):
        cached_embeddings(texts[:3], enc, tmp_path, "k1")


def test_cache_resumes_finished_chunks_and_skips_chunks_another_process_holds(
    tmp_path: Path,
) -> None:
    from filelock import FileLock

    texts = [f"t{i}" for i in range(6)]
    parts = tmp_path / "key.parts"
    parts.mkdir()
    ref = l2_normalize(CountingEncoder()(texts))
    np.save(parts / "part-000000.npy", ref[:2])  # finished by an earlier, killed run
    other = FileLock(str(parts / "part-000001.npy") + ".lock")
    other.acquire()  # "another process" is embedding chunk 1

    def finish_other() -> None:
        np.save(parts / "part-000001.npy", ref[2:4])
        other.release()

    timer = threading.Timer(0.3, finish_other)
    timer.start()
    enc = CountingEncoder()
    out = cached_embeddings(texts, enc, tmp_path, "key", chunk_size=2, poll_seconds=0.05)
    timer.join()
    assert enc.calls == [2]  # only chunk 2 was embedded here
    np.testing.assert_allclose(out, ref)
    assert not parts.exists()


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
