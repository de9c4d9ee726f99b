"""Model-based clustering (MBC, Ostapenko et al. 2024): group tasks by their LoRA parameters.

The parameter level of the paper's comparison: one short "private" LoRA per task is trained first
(``clustering: per_task``), then the tasks are grouped by how similar their adapters are, as
microsoft/mttl's ``MBCWithCosSimTransform`` does:

1. every task's adapter becomes one vector: for every adapted module, in sorted module order, the
   raw ``lora_A`` (``r × d_in``) then ``lora_B`` (``d_out × r``) weights, flattened row-major and
   concatenated (mttl's ``expert_weights``: the LoRA factors themselves, not ``ΔW = B A`` and not
   scaled by ``lora_alpha / r``);
2. the ``T × T`` cosine-similarity matrix of those vectors;
3. k-means++ (seeded, ``n_init`` restarts, scikit-learn) with ``K`` clusters on the rows of that
   matrix: each task is described by its similarities to every task.

mttl can first project the vectors with a sparsified truncated SVD (``SVDEmbeddingTransform``);
that step is left out here: with ``T`` tasks an SVD of ``T`` or more components keeps every cosine,
and the similarity matrix is what k-means sees either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tclora._io import atomic_write_text
from tclora.clustering.kmeans import assign_to_centroids, fit_kmeans

__all__ = [
    "LoRAFactorStack",
    "mbc_clusters",
    "mbc_similarity",
    "mbc_vectors",
    "read_adapter_folders",
    "read_mbc_assignments",
    "write_mbc_assignments",
]


@runtime_checkable
class LoRAFactorStack(Protocol):
    """What MBC reads of a stack of adapters; :class:`tclora.merge.AdapterStack` is one."""

    names: list[str]
    module_names: list[str]

    def factors(self, module: str) -> list[tuple[Any, Any, float]]: ...


Adapters = LoRAFactorStack | Mapping[str, Mapping[str, Any]]
"""An ``AdapterStack``, or ``{task: {parameter name: LoRA A or B weight}}``."""


def mbc_vectors(adapters: Adapters) -> tuple[list[str], np.ndarray]:
    """Every task's LoRA parameters flattened into one row (see the module docstring).

    Args:
        adapters: An ``AdapterStack`` (each module's ``A_t`` then ``B_t``, modules sorted), or
            ``{task: {parameter name: weight}}`` with the same parameter names and shapes for
            every task (concatenated in sorted name order; e.g. each task's ``lora_A``/``lora_B``
            entries of its ``adapter_model.safetensors``).

    Returns:
        ``(task names, (T, P) float64 array)``.

    Raises:
        ValueError: No task, tasks whose parameter names or shapes differ, or a task whose
            parameters are all zero (its cosine similarity is undefined).
    """
    if isinstance(adapters, LoRAFactorStack):
        tasks = list(adapters.names)
        per_task: list[list[np.ndarray]] = [[] for _ in tasks]
        for module in adapters.module_names:
            for t, (a, b, _) in enumerate(adapters.factors(module)):
                per_task[t] += [_as_array(a), _as_array(b)]
    else:
        tasks = list(adapters)
        if not tasks:
            raise ValueError("adapters={}: MBC needs one or more tasks' LoRA parameters")
        keys = sorted(adapters[tasks[0]])
        for task in tasks:
            if sorted(adapters[task]) != keys:
                raise ValueError(
                    f"adapters[{task!r}] has parameters {sorted(adapters[task])[:3]}... "
                    f"({len(adapters[task])}); adapters[{tasks[0]!r}] has {keys[:3]}... "
                    f"({len(keys)}): every task needs the same LoRA parameters"
                )
        per_task = [[_as_array(adapters[t][k]) for k in keys] for t in tasks]
    shapes = {t: [p.shape for p in ps] for t, ps in zip(tasks, per_task, strict=True)}
    for task in tasks[1:]:
        if shapes[task] != shapes[tasks[0]]:
            diff = next(
                i
                for i, (x, y) in enumerate(zip(shapes[task], shapes[tasks[0]], strict=True))
                if x != y
            )
            raise ValueError(
                f"adapters: task {task!r} has a parameter of shape {shapes[task][diff]} where "
                f"task {tasks[0]!r} has {shapes[tasks[0]][diff]}: MBC compares flattened "
                "parameters, so every task needs the same LoRA ranks and modules"
            )
    vectors = np.stack([np.concatenate([p.ravel() for p in ps]) for ps in per_task])
    zero = [t for t, v in zip(tasks, vectors, strict=True) if not np.any(v)]
    if zero:
        raise ValueError(
            f"adapters: the LoRA parameters of {zero} are all zero; their cosine similarity is "
            "undefined (was stage 1 trained?)"
        )
    return tasks, vectors


def mbc_similarity(vectors: np.ndarray) -> np.ndarray:
    """``(T, T)`` cosine similarity of the rows of ``vectors`` (``(T, P)``, no zero row)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def mbc_clusters(
    adapters: Adapters, num_clusters: int, seed: int = 42, n_init: int = 10
) -> dict[str, int]:
    """Group tasks by the cosine similarity of their LoRA parameters (MBC).

    Args:
        adapters: The tasks' adapters (see :func:`mbc_vectors`).
        num_clusters: ``K``, from 1 to the number of tasks.
        seed: ``random_state`` of k-means (mttl: 42).
        n_init: k-means++ restarts; the lowest inertia wins (mttl: 10).

    Returns:
        ``{task: group}`` in the tasks' order, groups numbered ``0 .. K-1`` by their first task in
        that order (so the numbering does not depend on k-means' labels).

    Raises:
        ValueError: ``num_clusters`` out of range (fewer tasks than ``K``), adapters too alike
            for ``K`` non-empty groups, or the adapters' errors of :func:`mbc_vectors`.
    """
    tasks, vectors = mbc_vectors(adapters)
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters!r}: must be an integer >= 1")
    if num_clusters > len(tasks):
        raise ValueError(
            f"num_clusters={num_clusters}: MBC groups {len(tasks)} tasks {tasks}, so at most "
            f"{len(tasks)} clusters; train more tasks in stage 1 or lower num_clusters"
        )
    similarity = mbc_similarity(vectors).astype(np.float32)
    distinct = len(np.unique(similarity, axis=0))
    if distinct < num_clusters:
        raise ValueError(
            f"num_clusters={num_clusters}: the {len(tasks)} tasks' adapters form only {distinct} "
            "distinct groups (identical similarity profiles); lower num_clusters"
        )
    centroids = fit_kmeans(similarity, num_clusters, seed=seed, n_init=n_init, fit_fraction=1.0)
    labels = assign_to_centroids(similarity, centroids)
    renumber: dict[int, int] = {}
    for label in labels.tolist():
        renumber.setdefault(label, len(renumber))
    return {task: renumber[int(label)] for task, label in zip(tasks, labels, strict=True)}


def read_adapter_folders(folders: Mapping[str, str | Path]) -> dict[str, dict[str, Any]]:
    """Stage 1's adapters, read from peft adapter folders, as :func:`mbc_vectors` takes them.

    After a ``clustering: per_task`` fit exported with ``model.export_dir=D``, task ``t`` (the
    ``k``-th task name in sorted order) is the folder ``D/cluster_k``.

    Args:
        folders: ``{task: adapter folder}``; each folder holds ``adapter_model.safetensors``.

    Returns:
        ``{task: {parameter name: weight}}``: the ``lora_A`` and ``lora_B`` weights only.

    Raises:
        ValueError: No task, a folder without ``adapter_model.safetensors`` (a missing stage-1
            adapter), or one without LoRA weights.
    """
    from safetensors.torch import load_file

    if not folders:
        raise ValueError("folders={}: give {task: stage-1 adapter folder} for every task")
    out: dict[str, dict[str, Any]] = {}
    for task, folder in folders.items():
        file = Path(folder) / "adapter_model.safetensors"
        if not file.is_file():
            raise ValueError(
                f"folders[{task!r}]={str(folder)!r}: no adapter_model.safetensors there; the "
                "stage-1 adapter of this task is missing (run stage 1, clustering: per_task, "
                "with model.export_dir)"
            )
        weights = load_file(str(file))
        out[task] = {k: w for k, w in weights.items() if ".lora_A." in k or ".lora_B." in k}
        if not out[task]:
            raise ValueError(f"folders[{task!r}]={str(folder)!r}: {file.name} has no LoRA weights")
    return out


def write_mbc_assignments(path: str | Path, groups: Mapping[str, int]) -> Path:
    """Write stage 2's ``{task: group}`` as JSON (atomically), as ``clustering: mbc`` reads it.

    The file is ``{"method": "mbc", "num_clusters": K, "groups": {task: group}}``.

    Args:
        path: The JSON file to write (its folder is created).
        groups: ``{task: group}`` with groups ``0 .. K-1``, each used (see
            :func:`mbc_clusters`).

    Returns:
        The path written.
    """
    path = Path(path)
    clean = _check_groups(dict(groups), f"groups for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"method": "mbc", "num_clusters": len(set(clean.values())), "groups": clean}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_mbc_assignments(path: str | Path) -> dict[str, int]:
    """Read a file of :func:`write_mbc_assignments`.

    Args:
        path: The JSON file.

    Returns:
        ``{task: group}``, groups ``0 .. K-1``.

    Raises:
        ValueError: The file is missing, not JSON, or not ``{"groups": {task: group}}`` with
            groups ``0 .. K-1`` each used (and ``num_clusters``, if present, equal to ``K``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"mbc_assignments={str(path)!r}: no such file; write it with stage 2 of MBC "
            "(tclora.clustering.write_mbc_assignments)"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"mbc_assignments={str(path)!r}: not a readable JSON file: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("groups"), dict):
        raise ValueError(
            f'mbc_assignments={str(path)!r}: expected a JSON object with "groups": {{task: group}}'
        )
    groups = _check_groups(record["groups"], f"mbc_assignments={str(path)!r}")
    k = len(set(groups.values()))
    if record.get("num_clusters", k) != k:
        raise ValueError(
            f"mbc_assignments={str(path)!r}: num_clusters={record['num_clusters']!r} but the "
            f"groups use {k}"
        )
    return groups


def _check_groups(groups: Mapping[Any, Any], where: str) -> dict[str, int]:
    """``groups`` as ``{str: int}`` with groups ``0 .. K-1`` each used, else ``ValueError``."""
    if not groups:
        raise ValueError(f"{where}: no task; expected {{task: group}}")
    bad = {t: g for t, g in groups.items() if isinstance(g, bool) or not isinstance(g, int)}
    if bad or not all(isinstance(t, str) for t in groups):
        raise ValueError(f"{where}: groups must map task names to integers; got {bad or groups}")
    used = sorted(set(groups.values()))
    if used != list(range(len(used))):
        raise ValueError(f"{where}: groups must be 0 .. K-1, each used; got {used}")
    return {str(t): int(g) for t, g in groups.items()}


def _as_array(weight: Any) -> np.ndarray:
    """A weight (torch tensor or array-like) as a float64 numpy array."""
    if hasattr(weight, "detach"):
        weight = weight.detach().float().cpu().numpy()
    return np.asarray(weight, dtype=np.float64)
