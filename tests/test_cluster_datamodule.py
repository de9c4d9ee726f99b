"""ClusterDataModule with the real packaged MiniLM encoder and the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_multitask_samples

import tclora.clustering.policy as policy_mod
import tclora.datamodules.cluster as cluster_mod
from tclora.clustering import load_encoder
from tclora.data import DataSourceError, collate_batch, tokenize_sample
from tclora.datamodules import ClusterDataModule
from tclora.datamodules.sampler import ClusterBatchSampler, cluster_schedule


@pytest.fixture(scope="module")
def st_encoder() -> Any:
    """The packaged all-MiniLM-L6-v2, loaded once for the whole module."""
    return load_encoder(device="cpu")


@pytest.fixture(autouse=True)
def encoder_loads(monkeypatch: pytest.MonkeyPatch, st_encoder: Any) -> list[Any]:
    """Every data module gets the shared real encoder; the list counts the loads."""
    loads: list[Any] = []

    def load(name: Any = None, device: Any = None) -> Any:
        loads.append(name)
        return st_encoder

    monkeypatch.setattr(cluster_mod, "load_encoder", load)
    return loads


def _forbid_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(cluster_mod, "load_encoder", fail)


def make_dm(sources: list, tmp_path: Path, tokenizer: Any, **kwargs: Any) -> ClusterDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    kwargs.setdefault("progress_bar", False)
    return ClusterDataModule(sources, tokenizer=tokenizer, **kwargs)


def ready(sources: list, tmp_path: Path, tokenizer: Any, **kwargs: Any) -> ClusterDataModule:
    dm = make_dm(sources, tmp_path, tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- pure helpers


def test_cluster_schedules() -> None:
    np.testing.assert_array_equal(
        cluster_schedule([3, 1, 2], "round_robin", 0, 0), [0, 1, 2, 0, 2, 0]
    )
    np.testing.assert_array_equal(
        cluster_schedule([3, 1, 2], "sequential", 0, 0), [0, 0, 0, 1, 2, 2]
    )
    p0 = cluster_schedule([30, 10, 20], "proportional", 0, 0)
    assert np.bincount(p0).tolist() == [30, 10, 20]
    np.testing.assert_array_equal(p0, cluster_schedule([30, 10, 20], "proportional", 0, 0))
    assert not np.array_equal(p0, cluster_schedule([30, 10, 20], "proportional", 0, 1))
    assert not np.array_equal(p0, cluster_schedule([30, 10, 20], "proportional", 1, 0))
    with pytest.raises(ValueError, match=r"schedule='random': expected one of \['round_robin'"):
        cluster_schedule([1], "random", 0, 0)


def test_tokenize_sample_keeps_the_response() -> None:
    ids, labels, cut = tokenize_sample([1, 2, 3], [7, 8], 10)
    assert (ids, labels, cut) == ([1, 2, 3, 7, 8], [-100, -100, -100, 7, 8], False)
    ids, labels, cut = tokenize_sample(list(range(10)), [70, 71, 72], 6)
    assert cut and ids == [7, 8, 9, 70, 71, 72] and labels == [-100] * 3 + [70, 71, 72]
    ids, labels, cut = tokenize_sample([1, 2], list(range(20)), 8)
    assert cut and ids == [1, 2, 0, 1, 2, 3, 4, 5] and labels[:2] == [-100, -100]
    ids, labels, _ = tokenize_sample(list(range(20)), list(range(100, 120)), 8)
    assert len(ids) == 8 and labels[:4] == [-100] * 4 and labels[4:] == [100, 101, 102, 103]


def test_collate_pads_right_with_ignored_labels() -> None:
    batch = collate_batch(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "cluster_id": 2},
            {"input_ids": [9], "labels": [9], "cluster_id": 2},
        ],
        pad_token_id=0,
    )
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [9, 0, 0]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 6, 7], [9, -100, -100]]))
    torch.testing.assert_close(batch["cluster_id"], torch.tensor([2, 2]))


@pytest.mark.parametrize("schedule", ["round_robin", "proportional", "sequential"])
def test_two_ranks_share_the_cluster_sequence_over_disjoint_shards(schedule: str) -> None:
    members = [np.arange(0, 13), np.arange(13, 20), np.arange(20, 45)]
    ranks = [
        ClusterBatchSampler(members, 4, schedule, seed=3, num_replicas=2, rank=r) for r in (0, 1)
    ]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        seqs = [s.cluster_sequence() for s in ranks]
        np.testing.assert_array_equal(seqs[0], seqs[1])
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 2 + 1 + 4
        seen: list[set[int]] = [set() for _ in members]
        for step, (b0, b1) in enumerate(zip(*batches, strict=True)):
            k = seqs[0][step]
            assert set(b0) <= set(members[k]) and set(b1) <= set(members[k])
            assert abs(len(b0) - len(b1)) <= 1 and not set(b0) & set(b1)  # disjoint shards
            seen[k] |= set(b0) | set(b1)
        assert all(seen[k] == set(members[k].tolist()) for k in range(3))  # whole epoch covered
    assert list(ranks[0]) != [b for b in ranks[0].rank_batches(0)]  # epochs reshuffle
    single = ClusterBatchSampler(members, 4, schedule, seed=3)
    flat = sorted(i for b in single for i in b)
    assert flat == list(range(45))  # one process: no sample repeated, none dropped


# ----------------------------------------------------------------------------- data module


def test_clusters_recover_tasks_and_batches_are_pure(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    dm = ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=4, batch_size=8)
    assert dm.num_clusters == 4 and dm.cluster_names == [f"cluster_{k}" for k in range(4)]
    assert dm.centroids.shape == (4, 384) and dm.centroids.dtype == np.float32
    assert dm.statistics["adjusted_rand_index"] >= 0.9
    assert dm.statistics["purity"] >= 0.95
    assert dm.embeddings is not None and dm.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(dm.embeddings, axis=1), 1.0, rtol=1e-5)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == sum(-(-n // 8) for n in dm.statistics["sizes"])
    expected = loader.cluster_sampler.cluster_sequence()
    assert [int(b["cluster_id"][0]) for b in batches] == expected.tolist()
    eos = tokenizer.eos_token_id
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels", "cluster_id"}
        assert (batch["cluster_id"] == batch["cluster_id"][0]).all()
        assert (
            batch["input_ids"].dtype == torch.long
            and batch["labels"].shape == batch["input_ids"].shape
        )
        padded = batch["attention_mask"] == 0
        assert (batch["labels"][padded] == -100).all()
        for row in range(len(batch["input_ids"])):
            real = batch["labels"][row][batch["labels"][row] != -100]
            assert real[-1].item() == eos and len(real) >= 2
    # the prompt is the chat-rendered user message, the loss only on the response
    ds = dm.train_dataset
    assert ds is not None
    sample = ds.samples[0]
    item = ds[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(item["input_ids"]) == prompt + sample.response + tokenizer.eos_token
    n_prompt = item["labels"].count(-100)
    assert tokenizer.decode(item["input_ids"][:n_prompt]) == prompt
    # validation: one loader per cluster, holding that cluster's samples
    vals = dm.val_dataloader()
    assert len(vals) == 4
    assert sum(len(v.dataset) for v in vals) == len(dm.val_indices) == 12
    for k, val in enumerate(vals):
        for batch in val:
            assert (batch["cluster_id"] == k).all()
    # routing: embed + assign reproduce the validation assignment
    val_prompts = [dm.samples[i].prompt for i in dm.val_indices]
    routed = dm.assign(dm.embed(val_prompts))
    np.testing.assert_array_equal(routed, dm.assignments[dm.val_indices])


def test_cluster_cache_hit_never_runs_kmeans(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_dm([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=3)
    first.prepare_data()  # embeds and clusters (rank 0's job); setup only reads
    monkeypatch.setattr(policy_mod, "fit_kmeans", None)  # any k-means call would fail
    first.setup()
    again = ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=3)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    assert first.num_clusters == again.num_clusters == 3
    with pytest.raises(TypeError):  # another configuration is another cache entry
        ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=3, n_init=2)


def test_cache_hit_never_calls_the_encoder(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ready([str(multitask_jsonl)], tmp_path, tokenizer)
    assert first.embeddings is not None
    _forbid_encoder(monkeypatch)
    second = make_dm([str(multitask_jsonl)], tmp_path, tokenizer)
    second.prepare_data()
    second.setup("fit")
    assert second.embeddings is not None
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    np.testing.assert_array_equal(first.assignments, second.assignments)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    assert second.num_truncated == first.num_truncated == 0
    # another text choice is another cache entry
    other = make_dm([str(multitask_jsonl)], tmp_path, tokenizer, embed_field="prompt_response")
    with pytest.raises(AssertionError, match="the encoder was loaded"):
        other.prepare_data()


def _only_file(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_truncated_embeddings_are_reported_and_rebuilt(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    first = ready([str(multitask_jsonl)], tmp_path, tokenizer)
    embeddings = np.array(first.embeddings)
    path = _only_file(tmp_path / "cache", "*.npy")
    path.write_bytes(path.read_bytes()[:1000])  # a run killed mid-copy, a full disk
    with pytest.warns(
        UserWarning,
        match=rf"embedding cache {re.escape(str(path))}: not a readable \.npy array "
        r"\(ValueError: mmap length is greater than file size\); deleting it and recomputing "
        r"the embeddings",
    ):
        again = ready([str(multitask_jsonl)], tmp_path, tokenizer)
    assert again.embeddings is not None and again.embeddings.shape == (120, 384)
    np.testing.assert_array_equal(again.embeddings, embeddings)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), embeddings)
    np.testing.assert_array_equal(again.assignments, first.assignments)


def _write_bad_clusters(path: Path) -> None:
    with open(path, "wb") as handle:  # readable, but cluster 7 of 3
        np.savez(
            handle,
            assignments=np.full(120, 7, np.int64),
            centroids=np.ones((3, 384), np.float32),
            score_k=np.zeros(0, np.int64),
            score=np.zeros(0, np.float64),
        )


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[:1000]),
            r"not a readable \.npz archive \(BadZipFile: File is not a zip file\)",
        ),
        (
            lambda p: p.write_bytes(b"\x00garbage" * 64),
            r"not a readable \.npz archive \(ValueError: This file contains pickled \(object\) data",
        ),
        (_write_bad_clusters, r"cluster ids 7\.\.7 are outside the 3 centroids"),
    ],
    ids=["truncated", "garbage", "inconsistent"],
)
def test_corrupt_cluster_cache_is_reported_and_rebuilt(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, damage: Any, problem: str
) -> None:
    first = ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=3)
    path = _only_file(tmp_path / "cache" / "clusters", "*.npz")
    damage(path)
    with pytest.warns(
        UserWarning,
        match=rf"ClusterDataModule: cache file {re.escape(str(path))}: {problem}.*; deleting it "
        r"and rebuilding it",
    ):
        again = ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=3)
    np.testing.assert_array_equal(again.assignments, first.assignments)
    np.testing.assert_array_equal(again.centroids, first.centroids)
    with np.load(path, allow_pickle=False) as rebuilt:
        np.testing.assert_array_equal(rebuilt["assignments"], first.assignments)


def test_pickled_token_lengths_are_reported_and_rebuilt(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    first = ready([str(multitask_jsonl)], tmp_path, tokenizer, max_length=45)
    path = _only_file(tmp_path / "cache" / "lengths", "*.npy")
    lengths = np.load(path, allow_pickle=False)
    assert lengths.shape == (120, 2) and lengths.dtype == np.int64
    np.save(path, np.asarray([{"prompt": 1}], dtype=object), allow_pickle=True)
    with pytest.warns(
        UserWarning,
        match=rf"ClusterDataModule: cache file {re.escape(str(path))}: not a readable \.npy "
        r"array \(ValueError: Array can't be memory-mapped: Python objects in dtype\.\); "
        r"deleting it and rebuilding it",
    ):
        again = ready([str(multitask_jsonl)], tmp_path, tokenizer, max_length=45)
    assert first.num_truncated is not None and first.num_truncated > 0
    assert again.num_truncated == first.num_truncated
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), lengths)


def test_leftover_temp_files_are_removed(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    ready([str(multitask_jsonl)], tmp_path, tokenizer)
    cache = tmp_path / "cache"
    old = [
        cache / ".0123.npy.a1b2c3d4",
        cache / "clusters" / ".4567.npz.e5f6g7h8",
        cache / "lengths" / ".89ab.npy.i9j0k1l2",
    ]
    new = cache / "lengths" / ".cdef.npy.m3n4o5p6"  # a write in progress
    for temp in [*old, new]:
        temp.write_bytes(b"half")
    for temp in old:
        os.utime(temp, (time.time() - 7200, time.time() - 7200))
    ready([str(multitask_jsonl)], tmp_path, tokenizer)
    assert [temp.exists() for temp in [*old, new]] == [False, False, False, True]


def test_unknown_registry_task_fails_at_construction(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_encoder(monkeypatch)
    with pytest.raises(
        DataSourceError,
        match=r"source 'registry:fod': no evals-registry task 'fod' under .*; did you mean "
        r"\['food'\]\?$",
    ):
        ClusterDataModule(
            sources=["registry:fod"], tokenizer=tokenizer, cache_dir=str(tmp_path / "cache")
        )
    # a source removed after construction: the reader's error, not a raw OSError
    gone = tmp_path / "gone.jsonl"
    gone.write_bytes(multitask_jsonl.read_bytes())
    dm = make_dm([str(gone)], tmp_path, tokenizer)
    gone.unlink()
    with pytest.raises(DataSourceError, match=rf"'{re.escape(str(gone))}': no such file or folder"):
        dm.prepare_data()


def test_same_seed_same_assignments(tmp_path: Path, multitask_jsonl: Path, tokenizer: Any) -> None:
    a = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=5)
    # another cache folder: b embeds and clusters again, from scratch
    b = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=5, cache_dir=str(tmp_path / "b"))
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    assert [x["input_ids"].tolist() for x in a.train_dataloader()] == [
        x["input_ids"].tolist() for x in b.train_dataloader()
    ]
    c = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=6)
    assert not np.array_equal(a.val_indices, c.val_indices)


def test_baselines_per_task_and_single(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    dm = make_dm([str(multitask_jsonl)], tmp_path, tokenizer, clustering="per_task")
    assert dm.num_clusters is None
    dm.prepare_data()
    dm.setup()
    assert dm.num_clusters == 4
    tasks = np.asarray([s.task for s in dm.samples])
    names = sorted(set(tasks))
    np.testing.assert_array_equal(dm.assignments, [names.index(t) for t in tasks])
    assert dm.statistics["purity"] == 1.0
    single = make_dm(
        [str(multitask_jsonl)], tmp_path, tokenizer, clustering="single", num_clusters=None
    )
    assert single.num_clusters == 1
    single.setup()
    assert single.num_clusters == 1 and set(single.assignments.tolist()) == {0}
    np.testing.assert_allclose(
        single.centroids[0], single.embeddings[single.train_indices].mean(0), atol=1e-6
    )
    assert len(single.train_dataloader()) == -(-108 // 8)


def test_num_clusters_chosen_by_silhouette(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    dm = ready(
        [str(multitask_jsonl)],
        tmp_path,
        tokenizer,
        num_clusters=None,
        num_clusters_range=(2, 6),
        n_init=3,
    )
    assert sorted(dm.silhouette_scores) == [2, 3, 4, 5, 6]
    assert dm.num_clusters == max(dm.silhouette_scores, key=dm.silhouette_scores.__getitem__)
    assert dm.centroids.shape[0] == dm.num_clusters


def test_small_clusters_merge_or_reject(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(
        "".join(json.dumps({"prompt": f"Spell {w}", "response": w}) + "\n" for w in "abc")
    )
    sources = [str(multitask_jsonl), str(tiny)]
    kw = dict(clustering="per_task", min_cluster_size=5, val_fraction=0.0)
    with pytest.raises(
        ValueError, match=r"cluster\(s\) \{3: 3\} .* smaller than min_cluster_size=5"
    ):
        ready(sources, tmp_path, tokenizer, small_cluster_policy="reject", **kw)
    dm = ready(sources, tmp_path, tokenizer, small_cluster_policy="merge", **kw)
    assert dm.num_clusters == 4 and dm.centroids.shape == (4, 384)
    assert sorted(dm.statistics["sizes"]) == [30, 30, 30, 33]


def test_truncation_is_counted(tmp_path: Path, multitask_jsonl: Path, tokenizer: Any) -> None:
    dm = ready([str(multitask_jsonl)], tmp_path, tokenizer, max_length=40, chat_template=False)
    assert dm.num_truncated == 0
    dm = ready([str(multitask_jsonl)], tmp_path, tokenizer, max_length=45)
    assert dm.num_truncated is not None and 0 < dm.num_truncated <= 108
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 45
        assert ((batch["labels"] != -100).sum(1) > 0).all()


def test_registry_sources_and_tokenizer_alias(tmp_path: Path) -> None:
    sources = [
        {"registry": "2d_movement", "max_samples": 12},
        {"registry": "GOL", "max_samples": 12},
    ]
    dm = ready(sources, tmp_path, "smollm2-135m-instruct", clustering="per_task", val_fraction=0.0)
    assert dm.num_clusters == 2 and sorted({s.task for s in dm.samples}) == ["2d_movement", "GOL"]
    batch = next(iter(dm.train_dataloader()))
    text = dm.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>system\n")  # the registry's own system message


def test_state_dict_resumes_identical_clusters_and_refuses_changed_data(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    a = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=1)
    state = a.state_dict()
    assert {"assignments", "centroids", "num_clusters", "seed", "data_hash"} <= set(state)
    assert state["n_init"] == 10 and state["configured_num_clusters"] == 4
    b = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=2)  # would cluster differently
    with pytest.warns(
        UserWarning,
        match=r"resuming with the checkpoint's clusters \(assignments, split, centroids\), which "
        r"the adapters were trained on; these settings differ in the config and the checkpoint's "
        r"are used: seed: config 2 -> checkpoint 1\. Start a new fit",
    ):
        b.load_state_dict(state)
    np.testing.assert_array_equal(b.assignments, a.assignments)
    np.testing.assert_array_equal(b.centroids, a.centroids)
    np.testing.assert_array_equal(b.val_indices, a.val_indices)
    # load before setup is applied at the end of setup
    c = make_dm([str(multitask_jsonl)], tmp_path, tokenizer, seed=3, n_init=2)
    c.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"used: seed: config 3 -> checkpoint 1; n_init: config "):
        c.setup()
    np.testing.assert_array_equal(c.assignments, a.assignments)
    same = ready([str(multitask_jsonl)], tmp_path, tokenizer, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: nothing to say
        same.load_state_dict(state)
    other_encoder = {**state, "encoder": "all-MiniLM-L12-v2-0123456789abcdef"}
    with pytest.raises(
        ValueError,
        match=r"cannot resume: the checkpoint's clusters were made with the encoder "
        r"'all-MiniLM-L12-v2-0123456789abcdef' and data.encoder=None is now '.*'; routing would "
        r"embed prompts with one encoder",
    ):
        same.load_state_dict(other_encoder)
    changed = tmp_path / "changed.jsonl"
    records = make_multitask_samples()
    records[0]["response"] = "something else"
    changed.write_text("".join(json.dumps(r) + "\n" for r in records))
    d = ready([str(changed)], tmp_path, tokenizer, seed=1)
    with pytest.raises(
        ValueError, match=r"cannot resume: the training data changed since the checkpoint"
    ):
        d.load_state_dict(state)


def test_bad_inputs_fail_before_embedding(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_encoder(monkeypatch)
    src = [str(multitask_jsonl)]
    with pytest.raises(DataSourceError, match=r"'nope\.jsonl': no such file or folder"):
        make_dm(["nope.jsonl"], tmp_path, tokenizer)
    with pytest.raises(DataSourceError, match=r"unknown source type 'gs'"):
        make_dm(["gs://bucket/x.jsonl"], tmp_path, tokenizer)
    with pytest.raises(DataSourceError, match=r"expected a non-empty list of sources"):
        make_dm([], tmp_path, tokenizer)
    try:
        import datasets  # noqa: F401
    except ImportError:  # the normal case here: a clear message at construction
        with pytest.raises(DataSourceError, match=r"'hf:org/data'.*pip install datasets"):
            make_dm(["hf:org/data"], tmp_path, tokenizer)
    with pytest.raises(ValueError, match=r"num_clusters=0 must be >= 1"):
        make_dm(src, tmp_path, tokenizer, num_clusters=0)
    with pytest.raises(ValueError, match=r"clustering='dbscan': expected one of \['kmeans'"):
        make_dm(src, tmp_path, tokenizer, clustering="dbscan")
    with pytest.raises(ValueError, match=r"schedule='random': expected one of \['round_robin'"):
        make_dm(src, tmp_path, tokenizer, schedule="random")
    with pytest.raises(ValueError, match=r"embed_field='response': expected one of \['prompt'"):
        make_dm(src, tmp_path, tokenizer, embed_field="response")
    with pytest.raises(ValueError, match=r"small_cluster_policy='drop': expected one of"):
        make_dm(src, tmp_path, tokenizer, small_cluster_policy="drop")
    with pytest.raises(ValueError, match=r"batch_size=0 must be an integer >= 1"):
        make_dm(src, tmp_path, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction=1.5 must be in \[0, 1\)"):
        make_dm(src, tmp_path, tokenizer, val_fraction=1.5)
    with pytest.raises(
        ValueError, match=r"num_clusters=200 is larger than the number of training samples \(108"
    ):
        make_dm(src, tmp_path, tokenizer, num_clusters=200).prepare_data()
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        "".join(json.dumps({"prompt": "same", "response": str(i)}) + "\n" for i in range(9))
    )
    with pytest.raises(
        ValueError, match=r"num_clusters=2 is larger than the number of distinct texts"
    ):
        make_dm([str(dup)], tmp_path, tokenizer, num_clusters=2).setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataSourceError, match=r"empty data"):
        make_dm([str(empty)], tmp_path, tokenizer).prepare_data()
    with pytest.raises(DataSourceError, match=r"missing field\(s\) \['question'\]"):
        make_dm(
            [{"path": str(multitask_jsonl), "prompt_field": "question"}], tmp_path, tokenizer
        ).prepare_data()
    no_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"chat_template=True but the tokenizer .* has no chat"):
        make_dm(src, tmp_path, no_template).prepare_data()
    with pytest.raises(RuntimeError, match=r"ClusterDataModule.centroids is available after setup"):
        make_dm(src, tmp_path, tokenizer).centroids  # noqa: B018


def test_empty_cluster_is_an_error(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fit = policy_mod.fit_kmeans

    def fit_with_a_far_centroid(emb: np.ndarray, k: int, *args: Any, **kwargs: Any) -> np.ndarray:
        cents = real_fit(emb, k - 1, *args, **kwargs)
        return np.concatenate([cents, np.full((1, emb.shape[1]), 100.0, np.float32)])

    monkeypatch.setattr(policy_mod, "fit_kmeans", fit_with_a_far_centroid)
    with pytest.raises(
        ValueError, match=r"left empty cluster\(s\) \[3\] \(training sizes \[\d+, \d+, \d+, 0\]\)"
    ):
        ready([str(multitask_jsonl)], tmp_path, tokenizer, num_clusters=4)


def test_statistics_reach_tensorboard_and_csv(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = ready([str(multitask_jsonl)], tmp_path, tokenizer)
    tb = TensorBoardLogger(tmp_path / "tb", name="run")
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    stats = dm.log_cluster_statistics([tb, csv_logger])
    tb.experiment.flush()
    csv_logger.save()
    log_dir = Path(tb.log_dir)
    assert (log_dir / "projector_config.pbtxt").is_file()
    metadata = next(log_dir.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "cluster\ttask" and len(metadata) == 1 + 108
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "clusters/pca" in acc.Tags()["images"]
    ari = acc.Scalars("clusters/adjusted_rand_index")[0].value
    assert ari == pytest.approx(stats["adjusted_rand_index"], abs=1e-6)
    assert acc.Scalars("clusters/size_0")[0].value == stats["sizes"][0]
    csv_text = Path(csv_logger.log_dir, "metrics.csv").read_text()
    assert "clusters/purity" in csv_text


# ----------------------------------------------------------------------------- Lightning fit


class _Recorder:
    """A tiny LightningModule that records what every training step saw."""

    @staticmethod
    def build() -> Any:
        from lightning.pytorch import LightningModule

        class Recorder(LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[tuple[int, int, list[int]]] = []

            def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
                ids = batch["cluster_id"]
                assert (ids == ids[0]).all()
                self.seen.append(
                    (self.current_epoch, int(ids[0]), batch["input_ids"].sum(1).tolist())
                )
                return (self.w * batch["attention_mask"].float().mean()).sum()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def _fit(dm: ClusterDataModule, root: Path, ckpt: str | None = None, every: int = 0) -> Any:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    if every:
        callbacks.append(
            ModelCheckpoint(root, filename="{step}", every_n_train_steps=every, save_top_k=-1)
        )
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    model = _Recorder.build()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model


def test_fit_resumed_mid_epoch_sees_exactly_the_remaining_batches(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    kw = dict(schedule="proportional", seed=4, val_fraction=0.0)
    full = _fit(
        ready([str(multitask_jsonl)], tmp_path, tokenizer, **kw), tmp_path / "ckpt", every=2
    )
    steps_per_epoch = len(full.seen) // 2
    assert steps_per_epoch == sum(-(-n // 8) for n in (30, 30, 30, 30))
    # the two epochs differ (reshuffled) but each is cluster-pure and covers all samples
    assert full.seen[:steps_per_epoch] != full.seen[steps_per_epoch:]
    for stop in (6, steps_per_epoch, steps_per_epoch + 4):
        ckpt = tmp_path / "ckpt" / f"step={stop}.ckpt"
        state = torch.load(ckpt, weights_only=True)
        assert state["ClusterDataModule"]["num_clusters"] == 4
        dm = make_dm([str(multitask_jsonl)], tmp_path, tokenizer, **kw)
        resumed = _fit(dm, tmp_path / "unused", ckpt=str(ckpt))
        assert resumed.seen == full.seen[stop:], f"resumed at step {stop}"


def test_token_lengths_match_item_tokenisation(tokenizer: Any) -> None:
    import copy

    from tclora.data import Sample, TokenizedSamples, load_source

    samples = [Sample(**s) for s in make_multitask_samples(per_task=5)]
    samples += load_source({"registry": "2d_movement", "max_samples": 5})  # chat messages
    ds = TokenizedSamples(samples, np.zeros(len(samples)), tokenizer, 512)
    expected = np.asarray([[len(p), len(r)] for p, r in (ds.token_ids(i) for i in range(len(ds)))])
    assert ds._plain_prompt_renderer() is not None  # the fast path is taken
    np.testing.assert_array_equal(ds.token_lengths(), expected)
    trimming = copy.deepcopy(tokenizer)  # a template that edits the content: no fast path
    trimming.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'] | trim"
    )
    assert trimming.chat_template != tokenizer.chat_template
    padded = [Sample("  padded prompt  ", "r", "t"), Sample(" x ", "y", "t")]
    slow = TokenizedSamples(padded, np.zeros(2), trimming, 512)
    assert slow._plain_prompt_renderer() is None
    ref = np.asarray([[len(p), len(r)] for p, r in (slow.token_ids(i) for i in range(2))])
    np.testing.assert_array_equal(slow.token_lengths(), ref)
