"""ClusterDataModule: multi-task samples -> sentence embeddings -> k-means clusters -> batches
that each hold samples of one cluster, so that every cluster trains its own LoRA adapter.

The heavy lifting lives in pure functions (:mod:`tclora.data`, :mod:`tclora.clustering`); this
module adds the Lightning glue:

* ``prepare_data`` (local rank 0) reads the sources and computes the sentence embeddings into an
  on-disk cache keyed by the texts' content hash, the encoder and the text choice. It sets no
  state. Several processes computing the same cache split the work chunk by chunk.
* ``setup`` (every rank) reads the cache, splits train/validation (seeded), clusters the training
  samples, assigns the validation samples to the nearest centroid and logs cluster statistics.
* ``train_dataloader`` serves cluster-pure batches. The order of clusters over steps depends only
  on ``(seed, epoch)``, so under DDP every rank trains the same adapter at the same step, each on
  its own shard of that cluster's batch. The loader is resumable mid-epoch.
* ``state_dict`` / ``load_state_dict`` carry the clusters, so a resumed fit uses the identical
  clusters, and refuses to resume on changed data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from tclora._io import (
    atomic_save_npy,
    atomic_write,
    read_npy,
    read_npz,
    remove_stale_temp_files,
)
from tclora.clustering import (
    CLUSTERING_METHODS,
    assign_to_centroids,
    cached_embeddings,
    centroids_from_assignments,
    choose_num_clusters,
    cluster_statistics,
    embedding_cache_key,
    encoder_fingerprint,
    fit_kmeans,
    fit_sample_indices,
    l2_normalize,
    load_encoder,
    merge_small_clusters,
    per_task_assignments,
    plot_clusters,
    project_2d,
    texts_hash,
)
from tclora.data import (
    DataSourceError,
    Sample,
    SourceSpec,
    check_source,
    content_hash,
    load_sources,
    parse_source,
    prompt_text,
    render_prompt,
    split_train_val,
)

__all__ = [
    "SCHEDULES",
    "ClusterBatchSampler",
    "ClusterDataLoader",
    "ClusterDataModule",
    "TokenizedSamples",
    "cluster_schedule",
    "collate_batch",
    "tokenize_sample",
]

SCHEDULES = ("round_robin", "proportional", "sequential")
EMBED_FIELDS = ("prompt", "prompt_response")
SMALL_CLUSTER_POLICIES = ("merge", "reject")
IGNORE_INDEX = -100
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Pure functions: schedule, tokenisation, collation
# --------------------------------------------------------------------------------------------


def cluster_schedule(
    num_batches: Sequence[int], schedule: str, seed: int, epoch: int
) -> np.ndarray:
    """The cluster trained at each step of an epoch.

    Args:
        num_batches: Number of batches of every cluster in this epoch.
        schedule: ``"round_robin"`` (one batch of each cluster in turn, skipping clusters that
            ran out), ``"proportional"`` (a seeded random interleaving, so at any point each
            cluster has had a share of steps proportional to its size), or ``"sequential"`` (all
            of cluster 0, then all of cluster 1, ...).
        seed: Seed (with ``epoch``) of the ``"proportional"`` interleaving.
        epoch: Epoch number.

    Returns:
        ``(sum(num_batches),)`` int64 cluster ids; cluster ``k`` appears ``num_batches[k]`` times.
    """
    counts = np.asarray(num_batches, dtype=np.int64)
    if schedule == "sequential":
        return np.repeat(np.arange(len(counts)), counts)
    if schedule == "round_robin":
        order = [(j, k) for k, n in enumerate(counts) for j in range(n)]
        order.sort()
        return np.asarray([k for _, k in order], dtype=np.int64)
    if schedule == "proportional":
        steps = np.repeat(np.arange(len(counts)), counts)
        return np.random.default_rng([seed, epoch, 1]).permutation(steps)
    raise ValueError(f"schedule={schedule!r}; allowed: {list(SCHEDULES)}")


def tokenize_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int], bool]:
    """Join prompt and response tokens, labelling only the response, within ``max_length``.

    When too long, the response keeps ``min(len(response), max(max_length - len(prompt),
    max_length // 2))`` tokens from its start and the prompt keeps its last tokens (the end of
    a prompt, next to the answer, carries the generation prompt), so every sample keeps a loss.

    Args:
        prompt_ids: Token ids of the rendered prompt.
        response_ids: Token ids of the response (ending with the eos token).
        max_length: Maximum total length.

    Returns:
        ``(input_ids, labels, truncated)`` with ``labels = -100`` on prompt positions.
    """
    prompt, response = list(prompt_ids), list(response_ids)
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
        keep_prompt = max_length - keep_response
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        response = response[:keep_response]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response, truncated


def collate_batch(items: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad items to the longest one (right padding).

    Args:
        items: Dicts with ``input_ids`` and ``labels`` (lists of int) and ``cluster_id`` (int).
        pad_token_id: Id written at padded ``input_ids`` positions.

    Returns:
        ``{"input_ids", "attention_mask", "labels", "cluster_id"}`` LongTensors; labels are -100
        and the mask 0 on padding.
    """
    length = max(len(item["input_ids"]) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        mask[row, :n] = 1
    cluster_id = torch.as_tensor([int(item["cluster_id"]) for item in items], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "cluster_id": cluster_id,
    }


# --------------------------------------------------------------------------------------------
# Dataset, sampler, loader
# --------------------------------------------------------------------------------------------


class TokenizedSamples(Dataset):
    """Samples tokenised on access: ``dataset[i]`` is a dict for :func:`collate_batch`.

    Args:
        samples: The samples.
        cluster_ids: Cluster of every sample.
        tokenizer: A transformers tokenizer.
        max_length: Maximum tokens per sample (see :func:`tokenize_sample`).
        chat_template: Render prompts with the tokenizer's chat template (plain strings as one
            user message) and ``add_generation_prompt=True``; otherwise use the prompt text.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        cluster_ids: np.ndarray,
        tokenizer: Any,
        max_length: int,
        chat_template: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template

    def __len__(self) -> int:
        return len(self.samples)

    def render_prompt(self, sample: Sample) -> str:
        """The prompt text the model sees (:func:`tclora.data.render_prompt`, as in evaluation)."""
        return render_prompt(self.tokenizer, sample.prompt, self.chat_template)

    def token_ids(self, index: int) -> tuple[list[int], list[int]]:
        """Prompt and response token ids of sample ``index`` (response ends with eos)."""
        sample = self.samples[index]
        tok = self.tokenizer
        prompt = tok(self.render_prompt(sample), add_special_tokens=False)["input_ids"]
        response = tok(sample.response + (tok.eos_token or ""), add_special_tokens=False)
        return list(prompt), list(response["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt, response = self.token_ids(index)
        input_ids, labels, truncated = tokenize_sample(prompt, response, self.max_length)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "cluster_id": int(self.cluster_ids[index]),
            "truncated": truncated,
        }

    def _plain_prompt_renderer(self) -> Any:
        """A fast renderer for plain-string prompts, or None.

        Renders the chat template once around a sentinel and keeps the text before and after
        it. Used only if it reproduces ``apply_chat_template`` exactly on up to 32 of the
        samples (a template that trims or escapes the content fails that check).
        """
        if not self.chat_template:
            return None
        sentinel = "\ue000TCLORA\ue001"
        full = self.render_prompt(Sample(sentinel, "", ""))
        if full.count(sentinel) != 1:
            return None
        head, tail = full.split(sentinel)

        def render(text: str) -> str:
            return head + text + tail

        plain = [s for s in self.samples if isinstance(s.prompt, str)]
        step = max(1, len(plain) // 32)
        for sample in plain[::step][:32]:
            if render(str(sample.prompt)) != self.render_prompt(sample):
                return None
        return render

    def token_lengths(self) -> np.ndarray:
        """``(N, 2)`` int64 prompt and response token counts (tokenises everything, batched)."""
        if not self.samples:
            return np.zeros((0, 2), dtype=np.int64)
        tok = self.tokenizer
        eos = tok.eos_token or ""
        fast = self._plain_prompt_renderer()
        prompts = [
            fast(s.prompt)
            if fast is not None and isinstance(s.prompt, str)
            else self.render_prompt(s)
            for s in self.samples
        ]
        responses = [s.response + eos for s in self.samples]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: count ids without building Python lists
            counts = [
                [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
                for texts in (prompts, responses)
            ]
        else:
            counts = [
                [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
                for texts in (prompts, responses)
            ]
        return np.asarray(counts, dtype=np.int64).T.copy()

    def count_truncated(self) -> int:
        """Number of samples longer than ``max_length``."""
        lengths = self.token_lengths()
        return int((lengths.sum(axis=1) > self.max_length).sum())


class _BatchView(Dataset):
    """``view[list_of_indices]`` -> list of items; lets a sampler yield whole batches."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return [self.base[i] for i in indices]


class _Collate:
    """Picklable collate function (worker processes need one)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_batch(items, self.pad_token_id)


class ClusterBatchSampler(DistributedSampler):
    """Yields this rank's share of cluster-pure batches, in a schedule shared by all ranks.

    Every epoch, each cluster's members are shuffled (seeded by ``seed``, ``epoch`` and the
    cluster) and cut into *global* batches of ``batch_size × num_replicas`` samples. The global
    batch at step ``s`` is split in ``num_replicas`` contiguous, disjoint shards, one per rank,
    whose sizes differ by at most one (a cluster's last global batch may be short). Only a last
    global batch with fewer samples than ranks is padded, by repeating that cluster's samples
    from the start of its shuffled order. So every rank yields the same number of batches, of
    the same cluster, at every step (lockstep), nothing is dropped, and with one process nothing
    is repeated.

    It subclasses :class:`~torch.utils.data.DistributedSampler` because it is one: Lightning
    then neither replaces it with its own distributed sampler nor wraps it, and calls its
    :meth:`set_epoch` every epoch.

    Args:
        members: For every cluster, the dataset indices of its samples.
        batch_size: Samples per rank per step.
        schedule: See :func:`cluster_schedule`.
        seed: Seed of the shuffles and of the schedule.
        num_replicas: Number of ranks.
        rank: This rank.
    """

    def __init__(
        self,
        members: Sequence[np.ndarray],
        batch_size: int,
        schedule: str = "round_robin",
        seed: int = 42,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        total = sum(len(m) for m in members)
        super().__init__(
            range(total),  # type: ignore[arg-type]  # any sized object works
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
        )
        self.members = [np.asarray(m, dtype=np.int64) for m in members]
        self.batch_size = batch_size
        self.schedule = schedule
        self.seed = seed
        self.epoch = 0
        self._skip = 0  # batches of `epoch` already consumed (set when resuming)

    def num_batches_per_cluster(self) -> list[int]:
        """Steps of every cluster in one epoch."""
        size = self.batch_size * self.num_replicas
        return [math.ceil(len(m) / size) for m in self.members]

    def cluster_sequence(self, epoch: int | None = None) -> np.ndarray:
        """Cluster id of every step of ``epoch`` (default: the current one); equal on all ranks."""
        epoch = self.epoch if epoch is None else epoch
        return cluster_schedule(self.num_batches_per_cluster(), self.schedule, self.seed, epoch)

    def _global_batches(self, cluster: int, epoch: int) -> list[np.ndarray]:
        members = self.members[cluster]
        order = members[
            np.random.default_rng([self.seed, epoch, 0, cluster]).permutation(len(members))
        ]
        size = self.batch_size * self.num_replicas
        out = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            if len(chunk) < self.num_replicas:  # too few to give every rank one sample
                chunk = np.concatenate([chunk, np.resize(order, self.num_replicas - len(chunk))])
            out.append(chunk)
        return out

    def rank_batches(self, epoch: int | None = None) -> Iterator[list[int]]:
        """This rank's batches of ``epoch``, in step order (ignores any resume offset)."""
        epoch = self.epoch if epoch is None else epoch
        per_cluster = [self._global_batches(k, epoch) for k in range(len(self.members))]
        used = [0] * len(self.members)
        for cluster in self.cluster_sequence(epoch):
            chunk = per_cluster[cluster][used[cluster]]
            used[cluster] += 1
            yield np.array_split(chunk, self.num_replicas)[self.rank].tolist()

    @override
    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        for step, batch in enumerate(self.rank_batches()):
            if step >= skip:
                yield batch

    @override
    def __len__(self) -> int:
        return sum(self.num_batches_per_cluster())

    @override
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration start at step ``batches_done`` of ``epoch``."""
        self.epoch = epoch
        self._skip = batches_done


class ClusterDataLoader(DataLoader):
    """A DataLoader over a :class:`ClusterBatchSampler` that can resume mid-epoch.

    ``state_dict()`` records the epoch and how many batches of it were handed out;
    Lightning saves it in checkpoints (it is ``_Stateful``) and calls ``load_state_dict`` before
    iterating again, so a fit resumed at step N continues with batch N + 1 of the same epoch.
    Batches are counted as they leave the loader, so worker prefetching does not skew the count.
    """

    def __init__(self, dataset: Dataset, sampler: ClusterBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self._batches_done = 0

    @property
    def cluster_sampler(self) -> ClusterBatchSampler:
        """The batch sampler (typed)."""
        assert isinstance(self.sampler, ClusterBatchSampler)
        return self.sampler

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.cluster_sampler
        self._batches_done = sampler._skip
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done", "seed", "num_batches"}``."""
        sampler = self.cluster_sampler
        return {
            "epoch": sampler.epoch,
            "batches_done": self._batches_done,
            "seed": sampler.seed,
            "num_batches": len(sampler),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (same data, seed and world size expected)."""
        sampler = self.cluster_sampler
        if state.get("num_batches") != len(sampler) or state.get("seed") != sampler.seed:
            rank_zero_warn(
                f"train loader state {dict(state)} does not match this loader (num_batches="
                f"{len(sampler)}, seed={sampler.seed}); starting the epoch from its first batch"
            )
            sampler.resume(int(state.get("epoch", 0)), 0)
            return
        done = int(state["batches_done"])
        epoch = int(state["epoch"])
        if done >= len(sampler):  # the epoch was finished: the next one starts fresh
            epoch, done = epoch + 1, 0
        sampler.resume(epoch, done)
        self._batches_done = done


# --------------------------------------------------------------------------------------------
# The data module
# --------------------------------------------------------------------------------------------


def _rank_and_world(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {list(allowed)}")


def _discard_cache_file(path: Path, problem: ValueError) -> None:
    """Report an unusable cache file (``problem`` starts with its path) and delete it."""
    rank_zero_warn(f"ClusterDataModule: cache file {problem}; deleting it and rebuilding it")
    path.unlink(missing_ok=True)


def _cached_lengths(path: Path, num_samples: int) -> np.ndarray | None:
    """The ``(num_samples, 2)`` int64 token counts cached at ``path``, or ``None``.

    ``None`` on a miss, or for a file that is unreadable (truncated, not an array, object data)
    or of another shape or dtype: that one is reported, deleted and left to be rebuilt.
    """
    try:
        lengths = read_npy(path, mmap=True)
        if lengths.shape != (num_samples, 2) or lengths.dtype != np.int64:
            raise ValueError(
                f"{path}: holds {lengths.shape} {lengths.dtype}, expected ({num_samples}, 2) int64"
            )
        return np.array(lengths)
    except FileNotFoundError:
        return None
    except ValueError as err:
        _discard_cache_file(path, err)
        return None


def _cached_clusters(
    path: Path, num_samples: int, dim: int
) -> tuple[np.ndarray, np.ndarray, dict[int, float]] | None:
    """The clusters cached at ``path`` (see ``ClusterDataModule._clusters``), or ``None``.

    ``None`` on a miss, or for an archive that is unreadable or inconsistent (missing arrays,
    wrong shapes or dtypes, cluster ids outside the centroids): that one is reported, deleted and
    left to be rebuilt.
    """
    try:
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
    except FileNotFoundError:
        return None
    except ValueError as err:
        _discard_cache_file(path, err)
        return None
    scores = dict(zip(score_k.tolist(), score.tolist(), strict=True))
    return assignments, centroids, scores


class ClusterDataModule(LightningDataModule):
    """Cluster multi-task samples by sentence embedding; serve cluster-pure batches.

    Args:
        sources: Data sources: paths (JSONL / JSON / Parquet / CSV files or folders),
            ``"registry:<task>"``, ``"hf:<name>"``, or dicts with per-source options (see
            :mod:`tclora.data.sources`).
        tokenizer: Base model (local folder, packaged alias or hub id) whose tokenizer is used;
            a loaded tokenizer object is accepted too.
        num_clusters: Number of clusters ``K``; ``None`` chooses it over ``num_clusters_range``
            by silhouette. Ignored by ``"per_task"`` (one per task) and ``"single"`` (one).
        clustering: ``"kmeans"``, ``"minibatch_kmeans"`` (large N), ``"per_task"`` (baseline:
            one adapter per task label) or ``"single"`` (baseline: one adapter for everything).
        encoder: sentence-transformers model (folder or hub id); ``None`` = packaged
            all-MiniLM-L6-v2.
        embed_field: Text embedded for clustering: ``"prompt"`` or ``"prompt_response"``.
        batch_size: Training samples per rank per step.
        max_length: Maximum tokens per sample (prompt + response).
        val_fraction: Fraction of samples held out (seeded) for the per-cluster validation loaders.
        schedule: Order of clusters over steps: ``"round_robin"``, ``"proportional"``,
            ``"sequential"`` (see :func:`cluster_schedule`).
        seed: Seed of caps, split, k-means, shuffles and schedule.
        cache_dir: Embedding cache folder; default ``tclora_home()/embeddings``.
        min_cluster_size: Clusters with fewer training samples are handled by
            ``small_cluster_policy``.
        small_cluster_policy: ``"merge"`` into the nearest cluster (K shrinks) or ``"reject"``
            (raise).
        num_workers: DataLoader worker processes.
        num_clusters_range: ``(low, high)`` inclusive range searched when ``num_clusters`` is None.
        chat_template: Render prompts with the tokenizer's chat template.
        prompt_field: Default prompt field for sources that do not set one.
        response_field: Default response field for sources that do not set one.
        task_field: Default task field for sources that do not set one.
        embed_batch_size: Encoder batch size.
        encoder_device: Encoder device (``None``: CUDA when available; under DDP the local
            rank's GPU).
        fit_fraction: Fraction of training samples k-means is fitted on (authors: 0.2).
        min_fit_samples: Fit k-means on at least this many samples (or all).
        n_init: k-means++ restarts.
        silhouette_sample_size: Samples used for silhouettes.
        progress_bar: Show the embedding progress bar.
        embed_chunk_size: Texts per embedding cache chunk (the unit of work shared by processes).
        count_truncated: Tokenise every training sample in ``setup`` to report how many exceed
            ``max_length``.
        projector_samples: At most this many samples go to TensorBoard's projector.
    """

    def __init__(
        self,
        sources: list[str | dict[str, Any]],
        tokenizer: str = "smollm2-135m-instruct",
        num_clusters: int | None = 4,
        clustering: Literal["kmeans", "minibatch_kmeans", "per_task", "single"] = "kmeans",
        encoder: str | None = None,
        embed_field: Literal["prompt", "prompt_response"] = "prompt",
        batch_size: int = 8,
        max_length: int = 512,
        val_fraction: float = 0.1,
        schedule: Literal["round_robin", "proportional", "sequential"] = "round_robin",
        seed: int = 42,
        cache_dir: str | None = None,
        min_cluster_size: int = 1,
        small_cluster_policy: Literal["merge", "reject"] = "merge",
        num_workers: int = 0,
        num_clusters_range: tuple[int, int] = (2, 16),
        chat_template: bool = True,
        prompt_field: str | None = None,
        response_field: str | None = None,
        task_field: str | None = None,
        embed_batch_size: int = 64,
        encoder_device: str | None = None,
        fit_fraction: float = 0.2,
        min_fit_samples: int = 1000,
        n_init: int = 10,
        silhouette_sample_size: int = 2000,
        progress_bar: bool = True,
        embed_chunk_size: int = 16384,
        count_truncated: bool = True,
        projector_samples: int = 2000,
    ) -> None:
        super().__init__()
        _check_choice("clustering", clustering, CLUSTERING_METHODS)
        _check_choice("embed_field", embed_field, EMBED_FIELDS)
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("small_cluster_policy", small_cluster_policy, SMALL_CLUSTER_POLICIES)
        if clustering in ("kmeans", "minibatch_kmeans") and num_clusters is not None:
            if isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
                raise ValueError(f"num_clusters={num_clusters!r} must be an integer >= 1 or None")
            if num_clusters < 1:
                raise ValueError(
                    f"num_clusters={num_clusters!r} must be >= 1 (and at most the number of "
                    "training samples), or None to choose it by silhouette"
                )
        low, high = (int(v) for v in num_clusters_range)
        if not 2 <= low <= high:
            raise ValueError(
                f"num_clusters_range={num_clusters_range!r} must satisfy 2 <= low <= high"
            )
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("max_length", max_length, 2),
            ("min_cluster_size", min_cluster_size, 1),
            ("num_workers", num_workers, 0),
            ("embed_batch_size", embed_batch_size, 1),
            ("embed_chunk_size", embed_chunk_size, 1),
            ("n_init", n_init, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
        if not 0.0 < fit_fraction <= 1.0:
            raise ValueError(f"fit_fraction={fit_fraction!r} must be in (0, 1]")
        if isinstance(sources, str | Mapping) or not sources:
            raise DataSourceError(
                f"sources={sources!r}: expected a non-empty list of sources (paths, "
                "'registry:<task>', 'hf:<name>' or dicts)"
            )
        self._specs: list[SourceSpec] = [parse_source(s) for s in sources]
        for spec in self._specs:
            check_source(spec)
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)

        self.sources = sources
        self._tokenizer_arg = tokenizer
        self._tokenizer: Any = None if isinstance(tokenizer, str) else tokenizer
        self._configured_k = num_clusters
        self.clustering = clustering
        self.encoder_name = encoder
        self.embed_field = embed_field
        self.batch_size = batch_size
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.schedule = schedule
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.min_cluster_size = min_cluster_size
        self.small_cluster_policy = small_cluster_policy
        self.num_workers = num_workers
        self.num_clusters_range = (low, high)
        self.chat_template = chat_template
        self.field_defaults = {
            "prompt_field": prompt_field,
            "response_field": response_field,
            "task_field": task_field,
        }
        self.embed_batch_size = embed_batch_size
        self.encoder_device = encoder_device
        self.fit_fraction = fit_fraction
        self.min_fit_samples = min_fit_samples
        self.n_init = n_init
        self.silhouette_sample_size = silhouette_sample_size
        self.progress_bar = progress_bar
        self.embed_chunk_size = embed_chunk_size
        self.count_truncated = count_truncated
        self.projector_samples = projector_samples

        self._encoder: Any = None
        self._is_setup = False
        self._pending_state: dict[str, Any] | None = None
        self._read_memo: tuple[Any, list[Sample], list[str], str] | None = None
        self.samples: list[Sample] = []
        self.embeddings: np.ndarray | None = None
        self.data_hash: str | None = None
        self.train_indices = np.zeros(0, dtype=np.int64)
        self.val_indices = np.zeros(0, dtype=np.int64)
        self.assignments = np.zeros(0, dtype=np.int64)  # cluster of every sample (train and val)
        self._centroids: np.ndarray | None = None
        self._k: int | None = None
        self.silhouette_scores: dict[int, float] = {}
        self.statistics: dict[str, Any] = {}
        self.num_truncated: int | None = None
        self.train_dataset: TokenizedSamples | None = None
        self.val_datasets: list[TokenizedSamples] = []

    # ---------------------------------------------------------------- public properties

    @property
    def num_clusters(self) -> int | None:
        """Clusters used: the actual ``K`` after ``setup``; before it, ``K`` only where it is
        already certain -- the configured value (``1`` for ``"single"``) -- and ``None`` where
        the data decides it (``"per_task"``, a silhouette search, or small clusters that may be
        merged away). The CLI links this to ``LoRAModule.num_adapters``, whose ``None`` means
        "take ``K`` from the data module after its setup"."""
        if self._k is not None:
            return self._k
        if self.clustering == "single":
            return 1
        if self.clustering == "per_task":
            return None
        if self.min_cluster_size > 1 and self.small_cluster_policy == "merge":
            return None
        return self._configured_k

    @property
    def cluster_names(self) -> list[str]:
        """``["cluster_0", ...]`` (after ``setup``)."""
        self._require_setup("cluster_names")
        return [f"cluster_{k}" for k in range(self._k or 0)]

    @property
    def centroids(self) -> np.ndarray:
        """``(K, D)`` float32 centroids (after ``setup``); the routing targets."""
        self._require_setup("centroids")
        assert self._centroids is not None
        return self._centroids

    @property
    def tokenizer(self) -> Any:
        """The base model's transformers tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from tclora.assets import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self._tokenizer_arg))
        return self._tokenizer

    @property
    def cache_folder(self) -> Path:
        """Where embeddings are cached."""
        if self.cache_dir is not None:
            return self.cache_dir
        from tclora.assets import tclora_home

        return tclora_home() / "embeddings"

    def _require_setup(self, what: str) -> None:
        if not self._is_setup:
            raise RuntimeError(f"ClusterDataModule.{what} is available after setup()")

    # ---------------------------------------------------------------- embedding

    def _encoder_device(self) -> str | None:
        if self.encoder_device is not None:
            return self.encoder_device
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return f"cuda:{local_rank % torch.cuda.device_count()}"
        return None

    def _get_encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name, device=self._encoder_device())
        return self._encoder

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the clustering encoder: ``(len(texts), D)`` L2-normalised float32.

        Args:
            texts: Texts (e.g. evaluation prompts to route).

        Returns:
            The embeddings, comparable with :attr:`centroids`.
        """
        if not texts:
            raise ValueError("texts is empty: nothing to embed")
        encoder = self._get_encoder()
        out = encoder.encode(
            list(texts),
            batch_size=self.embed_batch_size,
            show_progress_bar=self.progress_bar and len(texts) > 10 * self.embed_batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return l2_normalize(out)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """Nearest-centroid cluster ids of ``(N, D)`` embeddings (after ``setup``)."""
        return assign_to_centroids(np.asarray(embeddings, dtype=np.float32), self.centroids)

    def _embed_texts(self, samples: Sequence[Sample]) -> list[str]:
        if self.embed_field == "prompt":
            return [prompt_text(s.prompt) for s in samples]
        return [prompt_text(s.prompt) + "\n" + s.response for s in samples]

    def _cache_key(self, texts: Sequence[str]) -> str:
        return embedding_cache_key(
            texts_hash(texts), encoder_fingerprint(self.encoder_name), self.embed_field
        )

    def _embeddings(self, texts: list[str], key: str) -> np.ndarray:
        out = cached_embeddings(
            texts,
            lambda: self.embed,
            self.cache_folder,
            key,
            chunk_size=self.embed_chunk_size,
            meta={
                "encoder": encoder_fingerprint(self.encoder_name),
                "embed_field": self.embed_field,
            },
        )
        assert out is not None
        return out

    # ---------------------------------------------------------------- reading + checks

    def read_samples(self) -> list[Sample]:
        """Read all sources and check them (cheap; nothing is embedded).

        Returns:
            The samples.

        Raises:
            DataSourceError: A source is missing, empty, of unknown type or lacks a field.
            ValueError: ``num_clusters`` exceeds the samples (or their distinct texts).
        """
        return self._read()[0]

    def _sources_fingerprint(self) -> tuple[Any, ...] | None:
        """Sizes and modification times of every local file read, or None if not all local
        (or a source is missing: reading it then raises the error)."""
        from tclora.assets import corpus_dir

        stats: list[Any] = []
        for spec in self._specs:
            if spec.kind == "hf":
                return None
            root = Path(spec.location).expanduser() if spec.kind == "path" else None
            if root is None:
                root = corpus_dir() / spec.location
            if not root.exists():
                return None  # reading it reports the missing source
            files = sorted(root.rglob("*")) if root.is_dir() else [root]
            for file in files:
                try:
                    stat = file.stat()
                except FileNotFoundError:  # removed meanwhile: do not memoise
                    return None
                stats.append((str(file), stat.st_size, stat.st_mtime_ns))
        return tuple(stats)

    def _read(self) -> tuple[list[Sample], list[str], str]:
        """Samples, their embedding texts and the embedding cache key.

        Memoised within this process while the local source files are unchanged, so the
        ``prepare_data`` and ``setup`` of one process read the data once; nothing else is shared
        between the two hooks.
        """
        fingerprint = self._sources_fingerprint()
        memo = self._read_memo
        if memo is not None and fingerprint is not None and memo[0] == fingerprint:
            return memo[1], memo[2], memo[3]
        samples = load_sources(self._specs, seed=self.seed, **self.field_defaults)
        self._check_counts(samples)
        texts = self._embed_texts(samples)
        key = self._cache_key(texts)
        self._read_memo = (fingerprint, samples, texts, key)
        return samples, texts, key

    def _check_counts(self, samples: Sequence[Sample]) -> None:
        num_train = len(samples) - min(
            math.ceil(len(samples) * self.val_fraction), max(len(samples) - 1, 0)
        )
        k = self._configured_k
        if self.clustering in ("kmeans", "minibatch_kmeans") and k is not None:
            if k > num_train:
                raise ValueError(
                    f"num_clusters={k} is larger than the number of training samples "
                    f"({num_train} of {len(samples)} after val_fraction={self.val_fraction})"
                )
            distinct = len(set(self._embed_texts(samples)))  # before any embedding
            if k > distinct:
                raise ValueError(
                    f"num_clusters={k} is larger than the number of distinct texts to embed "
                    f"({distinct}): k-means would leave an empty cluster"
                )

    # ---------------------------------------------------------------- Lightning hooks

    @override
    def prepare_data(self) -> None:
        """Read and check the sources, compute the embedding cache and the cluster cache.

        Runs once per node (local rank 0) and sets no state: ``setup`` reads both caches.
        """
        samples, texts, key = self._read()
        self._check_tokenizer()  # before the expensive part
        embeddings = self._embeddings(texts, key)
        train, val = split_train_val(len(samples), self.val_fraction, self.seed)
        self._clusters(samples, embeddings, train, val, key)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load embeddings and clusters (computing what is missing), build the datasets, log."""
        if self._is_setup:
            return
        samples, texts, key = self._read()
        self._check_tokenizer()
        embeddings = self._embeddings(texts, key)
        self._read_memo = None  # the samples now live in self.samples
        self.samples = samples
        self.embeddings = embeddings
        self.data_hash = content_hash(samples)
        self.train_indices, self.val_indices = split_train_val(
            len(samples), self.val_fraction, self.seed
        )
        assignments, centroids, scores = self._clusters(
            samples, embeddings, self.train_indices, self.val_indices, key
        )
        self.assignments = assignments
        self._centroids = centroids
        self._k = int(centroids.shape[0])
        self.silhouette_scores = scores
        self._is_setup = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        else:
            self._build_datasets()
        if self.trainer is not None and self.trainer.loggers:
            self.log_cluster_statistics(self.trainer)

    def _cluster_cache_file(self, samples: Sequence[Sample], texts_key: str) -> Path:
        """Cluster cache entry of this configuration (see :meth:`_clusters`)."""
        import sklearn

        record = json.dumps(
            [
                texts_key,
                content_hash(samples) if self.clustering == "per_task" else len(samples),
                self.clustering,
                self._configured_k,
                self.num_clusters_range,
                self.seed,
                self.val_fraction,
                self.n_init,
                self.fit_fraction,
                self.min_fit_samples,
                self.silhouette_sample_size,
                self.min_cluster_size,
                self.small_cluster_policy,
                sklearn.__version__,
            ]
        )
        key = hashlib.sha256(record.encode()).hexdigest()[:32]
        return self.cache_folder / "clusters" / f"{key}.npz"

    def _clusters(
        self,
        samples: Sequence[Sample],
        embeddings: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        texts_key: str,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
        """Clusters of ``samples``, read from the cluster cache or computed and cached.

        The cache key covers the embedded texts, the encoder, the text choice, every clustering
        option, the split and the scikit-learn version, so a hit is the clustering this
        configuration would compute. An unreadable or inconsistent entry is reported (naming the
        file), deleted and recomputed; temporary files of killed writes are removed.

        Returns:
            ``(assignments of all samples, (K, D) centroids, silhouette scores of the k search)``.
        """
        path = self._cluster_cache_file(samples, texts_key)
        remove_stale_temp_files(path.parent)
        cached = _cached_clusters(path, len(samples), int(embeddings.shape[1]))
        if cached is not None:
            return cached
        assignments, centroids, scores = self._compute_clusters(samples, embeddings, train, val)
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
        return assignments, centroids, scores

    def _compute_clusters(
        self,
        samples: Sequence[Sample],
        embeddings: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
        """Cluster the training samples and assign the validation samples (no state is set)."""
        tasks = [samples[i].task for i in train]
        scores: dict[int, float] = {}
        if self.clustering in ("single", "per_task"):
            if self.clustering == "single":
                train_assign = np.zeros(len(train), dtype=np.int64)
            else:
                train_assign, _ = per_task_assignments(tasks)
            k = int(train_assign.max()) + 1
            centroids = centroids_from_assignments(np.asarray(embeddings[train]), train_assign, k)
        else:
            method: Literal["kmeans", "minibatch_kmeans"] = (
                "kmeans" if self.clustering == "kmeans" else "minibatch_kmeans"
            )
            k_opt = self._configured_k
            if k_opt is None:
                low, high = self.num_clusters_range
                sample = train[
                    fit_sample_indices(len(train), 0.0, self.silhouette_sample_size, self.seed)
                ]
                k_opt, scores = choose_num_clusters(
                    np.asarray(embeddings[sample]),
                    range(low, high + 1),
                    method,
                    self.seed,
                    self.silhouette_sample_size,
                    self.n_init,
                    self.fit_fraction,
                    self.min_fit_samples,
                )
                rank_zero_info(
                    f"ClusterDataModule: chose num_clusters={k_opt} by silhouette "
                    f"{ {k: round(v, 4) for k, v in scores.items()} }"
                )
            # the subsample fit_kmeans would draw, taken here so only it is read into memory
            fit_rows = train[
                fit_sample_indices(len(train), self.fit_fraction, self.min_fit_samples, self.seed)
            ]
            centroids = fit_kmeans(
                np.asarray(embeddings[fit_rows]),
                k_opt,
                method,
                self.seed,
                self.n_init,
                fit_fraction=1.0,
                min_fit_samples=0,
            )
            train_assign = assign_to_centroids(embeddings, centroids, rows=train)
            k = k_opt
        sizes = np.bincount(train_assign, minlength=k)
        if (sizes == 0).any():
            raise ValueError(
                f"clustering={self.clustering!r} left empty cluster(s) "
                f"{np.nonzero(sizes == 0)[0].tolist()} (training sizes {sizes.tolist()}); use "
                "fewer num_clusters or more (distinct) data"
            )
        if (sizes < self.min_cluster_size).any():
            small = {int(i): int(sizes[i]) for i in np.nonzero(sizes < self.min_cluster_size)[0]}
            if self.small_cluster_policy == "reject":
                raise ValueError(
                    f"cluster(s) {small} (id: training samples) are smaller than "
                    f"min_cluster_size={self.min_cluster_size} and small_cluster_policy='reject'; "
                    "lower num_clusters or min_cluster_size, or use small_cluster_policy='merge'"
                )
            train_assign, centroids, _ = merge_small_clusters(
                np.asarray(embeddings[train]), train_assign, centroids, self.min_cluster_size
            )
            rank_zero_info(
                f"ClusterDataModule: merged clusters {small} (smaller than min_cluster_size="
                f"{self.min_cluster_size}); {k} -> {centroids.shape[0]} clusters"
            )
            k = centroids.shape[0]
        assignments = np.empty(len(samples), dtype=np.int64)
        assignments[train] = train_assign
        if len(val):
            if self.clustering == "per_task":  # the baseline routes by label, like training
                _, names = per_task_assignments(tasks)
                index = {n: i for i, n in enumerate(names)}
                val_tasks = [samples[i].task for i in val]
                val_assign = np.asarray([index.get(t, -1) for t in val_tasks], dtype=np.int64)
                unknown = val_assign < 0
                if unknown.any():
                    val_assign[unknown] = assign_to_centroids(
                        embeddings, centroids, rows=val[unknown]
                    )
            else:
                val_assign = assign_to_centroids(embeddings, centroids, rows=val)
            assignments[val] = val_assign
        return assignments, np.asarray(centroids, dtype=np.float32), scores

    def _check_tokenizer(self) -> None:
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or str(self._tokenizer_arg)
            raise ValueError(
                f"chat_template=True but the tokenizer of {name!r} has no chat "
                "template (a base model?); set chat_template=False to use the prompt text as is"
            )

    def _build_datasets(self) -> None:
        tok = self.tokenizer
        self._check_tokenizer()
        train = [self.samples[i] for i in self.train_indices]
        self.train_dataset = TokenizedSamples(
            train, self.assignments[self.train_indices], tok, self.max_length, self.chat_template
        )
        self.val_datasets = []
        val_assign = self.assignments[self.val_indices]
        for k in range(self._k or 0):
            idx = self.val_indices[val_assign == k]
            self.val_datasets.append(
                TokenizedSamples(
                    [self.samples[i] for i in idx],
                    np.full(len(idx), k, dtype=np.int64),
                    tok,
                    self.max_length,
                    self.chat_template,
                )
            )
        self.statistics = cluster_statistics(
            self.assignments[self.train_indices],
            [s.task for s in train],
            self.embeddings,
            self._k,
            self.silhouette_sample_size,
            self.seed,
            embedding_rows=self.train_indices,
        )
        if self.count_truncated:
            lengths = self._token_lengths()[self.train_indices]
            self.num_truncated = int((lengths.sum(axis=1) > self.max_length).sum())
            if self.num_truncated:
                rank_zero_info(
                    f"ClusterDataModule: {self.num_truncated} of {len(train)} training samples "
                    f"are longer than max_length={self.max_length} and will be truncated"
                )
        s = self.statistics
        rank_zero_info(
            f"ClusterDataModule: {len(self.samples)} samples ({len(train)} train, "
            f"{len(self.val_indices)} val) in {self._k} clusters of sizes {s['sizes']}; "
            f"purity {s['purity']:.3f}, ARI {s['adjusted_rand_index']:.3f}"
        )

    def _token_lengths(self) -> np.ndarray:
        """Prompt and response token counts of every sample, cached on disk.

        Keyed by the samples' content, the tokenizer (name, vocabulary, eos token and chat
        template) and ``chat_template``. An unreadable or inconsistent entry is reported (naming
        the file), deleted and rebuilt; temporary files of killed writes are removed.
        """
        tok = self.tokenizer
        record = json.dumps(
            [
                self.data_hash,
                str(getattr(tok, "name_or_path", "")),
                len(tok),
                tok.eos_token,
                hashlib.sha256(str(getattr(tok, "chat_template", "")).encode()).hexdigest(),
                self.chat_template,
            ]
        )
        path = (
            self.cache_folder
            / "lengths"
            / f"{hashlib.sha256(record.encode()).hexdigest()[:32]}.npy"
        )
        remove_stale_temp_files(path.parent)
        cached = _cached_lengths(path, len(self.samples))
        if cached is not None:
            return cached
        everything = TokenizedSamples(
            self.samples, np.zeros(len(self.samples)), tok, self.max_length, self.chat_template
        )
        lengths = everything.token_lengths()
        atomic_save_npy(path, lengths)
        return lengths

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    @override
    def train_dataloader(self) -> ClusterDataLoader:
        """Cluster-pure batches in a schedule shared by all ranks (see :class:`ClusterBatchSampler`)."""
        self._require_setup("train_dataloader")
        assert self.train_dataset is not None
        rank, world = _rank_and_world(self.trainer)
        train_assign = self.assignments[self.train_indices]
        members = [np.nonzero(train_assign == k)[0] for k in range(self._k or 0)]
        sampler = ClusterBatchSampler(
            members, self.batch_size, self.schedule, self.seed, num_replicas=world, rank=rank
        )
        return ClusterDataLoader(
            _BatchView(self.train_dataset),
            sampler,
            collate_fn=_Collate(self._pad_token_id()),
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per cluster: loader ``k`` serves cluster ``k``'s validation samples."""
        self._require_setup("val_dataloader")
        return [
            DataLoader(
                ds,
                batch_size=self.batch_size,
                shuffle=False,
                collate_fn=_Collate(self._pad_token_id()),
                num_workers=self.num_workers,
            )
            for ds in self.val_datasets
        ]

    # ---------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        """Clusters and how they were made: enough to resume with the identical clusters."""
        if not self._is_setup:
            return {}
        assert self._centroids is not None
        return {
            "version": _STATE_VERSION,
            "data_hash": self.data_hash,
            "num_samples": len(self.samples),
            "num_clusters": self._k,
            "clustering": self.clustering,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "embed_field": self.embed_field,
            "encoder": encoder_fingerprint(self.encoder_name),
            "assignments": torch.from_numpy(self.assignments.astype(np.int32)),
            "train_indices": torch.from_numpy(self.train_indices.astype(np.int64)),
            "val_indices": torch.from_numpy(self.val_indices.astype(np.int64)),
            "centroids": torch.from_numpy(np.ascontiguousarray(self._centroids)),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the clusters of a checkpoint (after ``setup``, or deferred until it).

        Raises:
            ValueError: The data changed since the checkpoint (different content hash).
        """
        if not state_dict:
            return
        if not self._is_setup:
            self._pending_state = dict(state_dict)
            return
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"ClusterDataModule state version {state_dict.get('version')!r} is not "
                f"supported (expected {_STATE_VERSION})"
            )
        if state_dict["data_hash"] != self.data_hash:
            raise ValueError(
                "cannot resume: the training data changed since the checkpoint was saved "
                f"(content hash {str(state_dict['data_hash'])[:12]}… in the checkpoint, "
                f"{str(self.data_hash)[:12]}… now; {state_dict.get('num_samples')} vs "
                f"{len(self.samples)} samples). Restore the original sources or start a new fit"
            )
        self.assignments = state_dict["assignments"].numpy().astype(np.int64)
        self.train_indices = state_dict["train_indices"].numpy().astype(np.int64)
        self.val_indices = state_dict["val_indices"].numpy().astype(np.int64)
        self._centroids = state_dict["centroids"].numpy().astype(np.float32)
        self._k = int(state_dict["num_clusters"])
        self._build_datasets()

    # ---------------------------------------------------------------- logging

    def log_cluster_statistics(self, target: Any) -> dict[str, Any]:
        """Send cluster statistics (and, to TensorBoard, a 2-D figure and the projector) to loggers.

        Args:
            target: A ``Trainer`` (its ``loggers``), one logger, or a list of loggers.

        Returns:
            The statistics (see :func:`tclora.clustering.cluster_statistics`).
        """
        self._require_setup("log_cluster_statistics")
        loggers = getattr(target, "loggers", None)
        if loggers is None:
            loggers = list(target) if isinstance(target, list | tuple) else [target]
        if getattr(rank_zero_only, "rank", 0) == 0:
            self._log_to(loggers)
        return self.statistics

    def scalar_statistics(self) -> dict[str, float]:
        """The statistics as flat ``"clusters/..."`` scalars."""
        s = self.statistics
        out = {
            "clusters/num_clusters": float(s["num_clusters"]),
            "clusters/purity": s["purity"],
            "clusters/adjusted_rand_index": s["adjusted_rand_index"],
            "clusters/normalized_mutual_info": s["normalized_mutual_info"],
        }
        if s["silhouette"] is not None:
            out["clusters/silhouette"] = s["silhouette"]
        for k, size in enumerate(s["sizes"]):
            out[f"clusters/size_{k}"] = float(size)
        if self.num_truncated is not None:
            out["clusters/num_truncated"] = float(self.num_truncated)
        return out

    def _log_to(self, loggers: Sequence[Any]) -> None:
        scalars = self.scalar_statistics()
        for logger in loggers:
            logger.log_metrics(scalars, step=0)
            experiment = getattr(logger, "experiment", None)
            if experiment is None or not hasattr(experiment, "add_embedding"):
                continue
            emb, clusters, tasks = self._projection_sample()
            points = project_2d(emb, self._centroids)
            fig = plot_clusters(
                points[: len(emb)],
                clusters,
                tasks,
                points[len(emb) :],
                title=f"{self.clustering}: {self._k} clusters (PCA of embeddings)",
            )
            experiment.add_figure("clusters/pca", fig, global_step=0, close=True)
            experiment.add_embedding(
                torch.from_numpy(np.ascontiguousarray(emb)),
                metadata=[[str(c), t] for c, t in zip(clusters.tolist(), tasks, strict=True)],
                metadata_header=["cluster", "task"],
                tag="clusters",
                global_step=0,
            )
            experiment.add_text(
                "clusters/tasks_per_cluster",
                "\n".join(
                    f"* cluster_{k}: {d}"
                    for k, d in enumerate(self.statistics["tasks_per_cluster"])
                ),
                global_step=0,
            )

    def _projection_sample(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        assert self.embeddings is not None
        idx = self.train_indices
        if len(idx) > self.projector_samples:
            rng = np.random.default_rng(self.seed)
            idx = np.sort(rng.choice(idx, self.projector_samples, replace=False))
        emb = np.asarray(self.embeddings[idx], dtype=np.float32)
        return emb, self.assignments[idx], [self.samples[i].task for i in idx]
