"""Text level of TC-LoRA: sentence embeddings, k-means clusters and cluster statistics.

Functions over numpy arrays, one concern a module (Lightning is imported only to warn, on rank
zero, of a damaged cluster or token-lengths cache file):

* :mod:`~tclora.clustering.encoder`: load the sentence encoder, fingerprint it, hash texts,
  normalise embeddings.
* :mod:`~tclora.clustering.cache`: the on-disk caches (embeddings, clusters, token lengths).
* :mod:`~tclora.clustering.kmeans`: k-means on a subsample, assignment, baselines, merging small
  clusters, the silhouette search.
* :mod:`~tclora.clustering.mbc`: model-based clustering (MBC): tasks grouped by the cosine
  similarity of their flattened LoRA parameters.
* :mod:`~tclora.clustering.policy`: the clustering a data module asks for, from a train/validation
  split to one cluster per sample.
* :mod:`~tclora.clustering.stats`: statistics against the task labels, 2-D projection, plot.
"""

from tclora.clustering.cache import (
    cached_clusters,
    cached_embeddings,
    cached_token_lengths,
    cluster_cache_file,
    embedding_cache_key,
    token_lengths_file,
)
from tclora.clustering.encoder import (
    EncodeFn,
    default_encoder_path,
    encoder_fingerprint,
    l2_normalize,
    load_encoder,
    texts_hash,
)
from tclora.clustering.kmeans import (
    assign_to_centroids,
    centroids_from_assignments,
    choose_num_clusters,
    fit_kmeans,
    fit_sample_indices,
    merge_small_clusters,
    per_task_assignments,
)
from tclora.clustering.mbc import (
    LoRAFactorStack,
    mbc_clusters,
    mbc_similarity,
    mbc_vectors,
    read_adapter_folders,
    read_mbc_assignments,
    write_mbc_assignments,
)
from tclora.clustering.policy import (
    CLUSTERING_METHODS,
    SMALL_CLUSTER_POLICIES,
    ClusteringMethod,
    ClusteringOptions,
    Clusters,
    check_num_clusters,
    cluster_samples,
)
from tclora.clustering.stats import cluster_statistics, plot_clusters, project_2d

__all__ = [
    "CLUSTERING_METHODS",
    "SMALL_CLUSTER_POLICIES",
    "ClusteringMethod",
    "ClusteringOptions",
    "Clusters",
    "EncodeFn",
    "LoRAFactorStack",
    "assign_to_centroids",
    "cached_clusters",
    "cached_embeddings",
    "cached_token_lengths",
    "centroids_from_assignments",
    "check_num_clusters",
    "choose_num_clusters",
    "cluster_cache_file",
    "cluster_samples",
    "cluster_statistics",
    "default_encoder_path",
    "embedding_cache_key",
    "encoder_fingerprint",
    "fit_kmeans",
    "fit_sample_indices",
    "l2_normalize",
    "load_encoder",
    "mbc_clusters",
    "mbc_similarity",
    "mbc_vectors",
    "merge_small_clusters",
    "per_task_assignments",
    "plot_clusters",
    "project_2d",
    "read_adapter_folders",
    "read_mbc_assignments",
    "texts_hash",
    "token_lengths_file",
    "write_mbc_assignments",
]
