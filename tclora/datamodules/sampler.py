"""Cluster-pure batches: the order of clusters over steps, the distributed batch sampler that
serves every rank its shard of one cluster's batch in lockstep, and the loader that resumes
mid-epoch.

Nothing here knows how clusters were made: the sampler takes each cluster's dataset indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from tclora._checks import check_choice
from tclora.data import collate_batch

__all__ = ["SCHEDULES", "ClusterBatchSampler", "ClusterDataLoader", "cluster_schedule"]

SCHEDULES = ("round_robin", "proportional", "sequential")


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

    Raises:
        ValueError: ``schedule`` is none of :data:`SCHEDULES`.
    """
    check_choice("schedule", schedule, SCHEDULES)
    counts = np.asarray(num_batches, dtype=np.int64)
    if schedule == "sequential":
        return np.repeat(np.arange(len(counts)), counts)
    if schedule == "round_robin":
        order = [(j, k) for k, n in enumerate(counts) for j in range(n)]
        order.sort()
        return np.asarray([k for _, k in order], dtype=np.int64)
    steps = np.repeat(np.arange(len(counts)), counts)  # "proportional"
    return np.random.default_rng([seed, epoch, 1]).permutation(steps)


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

    Args:
        dataset: A dataset indexed by lists of indices (whole batches).
        sampler: The batch sampler.
        **kwargs: Further :class:`~torch.utils.data.DataLoader` options (``batch_size`` is
            ``None``: the sampler makes the batches).
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
