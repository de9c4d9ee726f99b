"""ClusterDataModule: multi-task samples -> sentence embeddings -> k-means clusters -> batches
that each hold samples of one cluster, so that every cluster trains its own LoRA adapter.

This module only sequences Lightning's hooks; the work lives elsewhere: reading and tokenising
samples in :mod:`tclora.data`, embedding, caching and the clustering policy in
:mod:`tclora.clustering`, batching in :mod:`tclora.datamodules.sampler`, and the logged figures
in :mod:`tclora.datamodules.reporting`. It is over 500 lines because it is one class whose
constructor is the ``data:`` section of ``tclora fit``: its 30 arguments are documented and
checked here (about 175 lines), next to the routing API (``embed``, ``assign``) that the merge
study calls.

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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from tclora._checks import check_choice
from tclora._dist import rank_and_world
from tclora.clustering import (
    CLUSTERING_METHODS,
    SMALL_CLUSTER_POLICIES,
    ClusteringOptions,
    Clusters,
    assign_to_centroids,
    cached_clusters,
    cached_embeddings,
    cached_token_lengths,
    centroids_from_assignments,
    check_num_clusters,
    cluster_cache_file,
    cluster_samples,
    cluster_statistics,
    embedding_cache_key,
    encoder_fingerprint,
    l2_normalize,
    load_encoder,
    read_mbc_assignments,
    texts_hash,
    token_lengths_file,
)
from tclora.data import (
    DataSourceError,
    Sample,
    SourceSpec,
    TokenizedSamples,
    check_source,
    content_hash,
    load_sources,
    parse_source,
    prompt_text,
    split_train_val,
)
from tclora.datamodules import reporting
from tclora.datamodules.sampler import (
    SCHEDULES,
    ClusterBatchSampler,
    ClusterDataLoader,
    _BatchView,
    _Collate,
)

__all__ = ["EMBED_FIELDS", "ClusterDataModule"]

EMBED_FIELDS = ("prompt", "prompt_response")
_STATE_VERSION = 1


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
            one adapter per task label), ``"single"`` (baseline: one adapter for everything) or
            ``"mbc"`` (every sample in its task's group of ``mbc_assignments``).
        encoder: sentence-transformers model (folder or hub id); ``None`` = packaged
            all-MiniLM-L6-v2.
        embed_field: Text embedded for clustering: ``"prompt"`` or ``"prompt_response"``.
        batch_size: Training samples per rank per step.
        max_length: Maximum tokens per sample (prompt + response).
        val_fraction: Fraction of samples held out (seeded) for the per-cluster validation loaders.
        schedule: Order of clusters over steps: ``"round_robin"``, ``"proportional"``,
            ``"sequential"`` (see :func:`tclora.datamodules.sampler.cluster_schedule`).
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
        mbc_assignments: With ``clustering="mbc"``: the JSON file of MBC's stage 2,
            ``{"groups": {task: group}}`` (:func:`tclora.clustering.write_mbc_assignments`);
            ``K`` is its number of groups, ``num_clusters`` and the small-cluster merge are not
            used, and a group with fewer than ``min_cluster_size`` training samples is an error.
    """

    def __init__(
        self,
        sources: list[str | dict[str, Any]],
        tokenizer: str = "smollm2-135m-instruct",
        num_clusters: int | None = 4,
        clustering: Literal["kmeans", "minibatch_kmeans", "per_task", "single", "mbc"] = "kmeans",
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
        mbc_assignments: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("clustering", clustering, (*CLUSTERING_METHODS, "mbc"))
        if (clustering == "mbc") != (mbc_assignments is not None):
            raise ValueError(
                f"clustering={clustering!r} with mbc_assignments={mbc_assignments!r}: "
                "clustering='mbc' needs mbc_assignments (the JSON file of MBC's stage 2), and "
                "only it takes one"
            )
        self._mbc_groups = (
            None if mbc_assignments is None else read_mbc_assignments(mbc_assignments)
        )
        self.mbc_assignments = mbc_assignments
        check_choice("embed_field", embed_field, EMBED_FIELDS)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("small_cluster_policy", small_cluster_policy, SMALL_CLUSTER_POLICIES)
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
        if self._mbc_groups is not None:
            return len(set(self._mbc_groups.values()))
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
        """The cache folder: embeddings, ``clusters/`` and token ``lengths/``."""
        if self.cache_dir is not None:
            return self.cache_dir
        from tclora.assets import tclora_home

        return tclora_home() / "embeddings"

    @property
    def clustering_options(self) -> ClusteringOptions:
        """The clustering options of this data module, as the clustering policy takes them."""
        return ClusteringOptions(
            method=self.clustering,
            num_clusters=self._configured_k,
            num_clusters_range=self.num_clusters_range,
            seed=self.seed,
            n_init=self.n_init,
            fit_fraction=self.fit_fraction,
            min_fit_samples=self.min_fit_samples,
            silhouette_sample_size=self.silhouette_sample_size,
            min_cluster_size=self.min_cluster_size,
            small_cluster_policy=self.small_cluster_policy,
        )

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
            # a bar whenever it takes seconds: more than one batch (one batch is under a second)
            show_progress_bar=self.progress_bar and len(texts) > self.embed_batch_size,
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
        texts = self._embed_texts(samples)
        check_num_clusters(self.clustering_options, texts, self.val_fraction)
        key = self._cache_key(texts)
        self._read_memo = (fingerprint, samples, texts, key)
        return samples, texts, key

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

    def _clusters(
        self,
        samples: Sequence[Sample],
        embeddings: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        texts_key: str,
    ) -> Clusters:
        """Clusters of ``samples``, read from the cluster cache or computed and cached.

        See :func:`tclora.clustering.cluster_cache_file` for what the key covers and
        :func:`tclora.clustering.cluster_samples` for the policy.
        """
        if self._mbc_groups is not None:
            return self._mbc_clusters(samples, embeddings, train)
        options = self.clustering_options
        path = cluster_cache_file(self.cache_folder, texts_key, samples, options, self.val_fraction)

        def compute() -> Clusters:
            tasks = [s.task for s in samples]
            return cluster_samples(embeddings, train, val, tasks, options, info=_info)

        return cached_clusters(path, len(samples), int(embeddings.shape[1]), compute)

    def _mbc_clusters(
        self, samples: Sequence[Sample], embeddings: np.ndarray, train: np.ndarray
    ) -> Clusters:
        """Every sample in its task's MBC group; centroids (the routing targets) are the groups'
        mean training embeddings. Not cached: it is a lookup."""
        assert self._mbc_groups is not None
        groups = self._mbc_groups
        missing = sorted({s.task for s in samples} - set(groups))
        if missing:
            raise ValueError(
                f"mbc_assignments={self.mbc_assignments!r} has no group for the tasks {missing} "
                f"(it groups {sorted(groups)}); rerun MBC's stages 1-2 on these sources"
            )
        k = len(set(groups.values()))
        assignments = np.asarray([groups[s.task] for s in samples], dtype=np.int64)
        sizes = np.bincount(assignments[train], minlength=k)
        small = np.nonzero(sizes < max(self.min_cluster_size, 1))[0].tolist()
        if small:
            raise ValueError(
                f"clustering='mbc': groups {small} of {self.mbc_assignments!r} have fewer than "
                f"min_cluster_size={self.min_cluster_size} training samples (sizes "
                f"{sizes.tolist()}); regroup with fewer clusters or add data"
            )
        centroids = centroids_from_assignments(np.asarray(embeddings[train]), assignments[train], k)
        return Clusters(assignments, centroids, {})

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
        """Prompt and response token counts of every sample, cached on disk (see
        :func:`tclora.clustering.token_lengths_file`)."""
        tok = self.tokenizer
        assert self.data_hash is not None
        path = token_lengths_file(self.cache_folder, self.data_hash, tok, self.chat_template)

        def compute() -> np.ndarray:
            everything = TokenizedSamples(
                self.samples, np.zeros(len(self.samples)), tok, self.max_length, self.chat_template
            )
            return everything.token_lengths()

        return cached_token_lengths(path, len(self.samples), compute)

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    @override
    def train_dataloader(self) -> ClusterDataLoader:
        """Cluster-pure batches in a schedule shared by all ranks (see :class:`ClusterBatchSampler`)."""
        self._require_setup("train_dataloader")
        assert self.train_dataset is not None
        rank, world = rank_and_world(self.trainer)
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
            "encoder": encoder_fingerprint(self.encoder_name),
            **self._cluster_settings(),
            "assignments": torch.from_numpy(self.assignments.astype(np.int32)),
            "train_indices": torch.from_numpy(self.train_indices.astype(np.int64)),
            "val_indices": torch.from_numpy(self.val_indices.astype(np.int64)),
            "centroids": torch.from_numpy(np.ascontiguousarray(self._centroids)),
        }

    def _cluster_settings(self) -> dict[str, Any]:
        """The settings that made the clusters and the split, beyond the data and the encoder
        (kept in the state, so that a resume can say which of them the config changed)."""
        options = self.clustering_options
        settings: dict[str, Any] = {
            "clustering": self.clustering,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "embed_field": self.embed_field,
            "fit_fraction": options.fit_fraction,
            "min_fit_samples": options.min_fit_samples,
            "n_init": options.n_init,
            "min_cluster_size": options.min_cluster_size,
            "small_cluster_policy": options.small_cluster_policy,
            "configured_num_clusters": options.num_clusters,
            "num_clusters_range": list(options.num_clusters_range),
        }
        if self._mbc_groups is not None:
            settings["mbc_groups"] = dict(sorted(self._mbc_groups.items()))
        return settings

    def _check_resumed_settings(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose centroids come from another encoder; name in a warning every
        other setting the config changed (the checkpoint's clusters are the ones used)."""
        encoder = encoder_fingerprint(self.encoder_name)
        if "encoder" in state and state["encoder"] != encoder:
            raise ValueError(
                f"cannot resume: the checkpoint's clusters were made with the encoder "
                f"{state['encoder']!r} and data.encoder={self.encoder_name!r} is now {encoder!r}; "
                "routing would embed prompts with one encoder and compare them with centroids of "
                "the other. Set data.encoder back to the checkpoint's encoder or start a new fit"
            )
        now = {"num_clusters": self._k, **self._cluster_settings()}
        differ = [
            f"{key}: config {value!r} -> checkpoint {state[key]!r}"
            for key, value in now.items()
            if key in state and _plain(state[key]) != _plain(value)
        ]
        if differ:
            rank_zero_warn(
                "ClusterDataModule: resuming with the checkpoint's clusters (assignments, split, "
                "centroids), which the adapters were trained on; these settings differ in the "
                f"config and the checkpoint's are used: {'; '.join(differ)}. Start a new fit "
                "to cluster with the config's settings"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the clusters of a checkpoint (after ``setup``, or deferred until it).

        The checkpoint's clusters are kept (its adapters learnt them): every setting that made
        them and now differs in the config is named in a warning.

        Raises:
            ValueError: The data changed since the checkpoint (different content hash), or the
                encoder did (the checkpoint's centroids live in the other encoder's space).
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
        self._check_resumed_settings(state_dict)
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
        return reporting.scalar_statistics(self.statistics, self.num_truncated)

    def _log_to(self, loggers: Sequence[Any]) -> None:
        assert self.embeddings is not None and self._centroids is not None
        embeddings = self.embeddings
        reporting.log_cluster_statistics(
            loggers,
            self.scalar_statistics(),
            self.statistics,
            self._centroids,
            lambda: reporting.projection_sample(
                embeddings,
                self.train_indices,
                self.assignments,
                self.samples,
                self.projector_samples,
                self.seed,
            ),
            title=f"{self.clustering}: {self._k} clusters (PCA of embeddings)",
        )


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (a state read back from a checkpoint has lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _info(message: str) -> None:
    """Log a line of the clustering policy, on rank zero."""
    rank_zero_info(f"ClusterDataModule: {message}")
