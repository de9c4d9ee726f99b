"""A study's fingerprint and its progress file: resume only what this very run would compute.

The fingerprint covers everything a row of the results table depends on: the adapters' weights,
the base model, the tokenizer, the study options, the evaluation sets and the validation batches
(their content, not their names) and the versions of the code. ``merge_progress.json`` stores it
beside the finished rows; a later run reuses those rows only when its own fingerprint is the
same, and otherwise starts afresh, moving the earlier run's files aside (nothing is deleted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import tclora
from tclora._io import atomic_write_text
from tclora.data import tokenizer_fingerprint
from tclora.evaluation import EvalSet, HarnessTask
from tclora.merge import AdapterStack
from tclora.study.config import StudyConfig
from tclora.study.results import MethodResult, row_from_dict, row_to_dict

__all__ = [
    "PROGRESS_FILE",
    "OUTPUT_NAMES",
    "fingerprint_components",
    "read_progress",
    "retire_outputs",
    "study_fingerprint",
    "write_progress",
]

PROGRESS_FILE = "merge_progress.json"
OUTPUT_NAMES = (
    PROGRESS_FILE,
    "results.csv",
    "results.md",
    "results.json",
    "cp_loadings.png",
    "merged_adapter",
)
_SAMPLE = 64  # values sampled from each base-model parameter
_PACKAGES = ("tclora", "torch", "transformers", "peft", "tensorly")


def _update_tensor(digest: Any, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def adapters_digest(stack: AdapterStack) -> str:
    """sha256 of every adapter's name and, module by module, its ``A``, ``B`` and scaling."""
    digest = hashlib.sha256(json.dumps(stack.names).encode())
    for module in stack.module_names:
        digest.update(module.encode())
        for a, b, scaling in stack.factors(module):
            _update_tensor(digest, a)
            _update_tensor(digest, b)
            digest.update(repr(float(scaling)).encode())
    return digest.hexdigest()


def model_digest(model: Any) -> str:
    """Identify a base model: its config, and every parameter's name, shape, dtype and a sample.

    LoRA parameters are left out (the adapters have their own digest). Sampling ``64`` evenly
    spaced values per tensor tells apart two checkpoints of one architecture at a small cost.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None:
        fields = config.to_dict()
        fields.pop("_name_or_path", None)  # where it was loaded from, not what it is
        text = json.dumps(fields, sort_keys=True, default=str)
    else:
        text = type(base).__name__
    digest = hashlib.sha256(text.encode())
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "lora_" in name:
                continue
            digest.update(name.encode())
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            _update_tensor(digest, flat[::step][:_SAMPLE].float())
    return digest.hexdigest()


def eval_sets_digest(eval_sets: Sequence[EvalSet]) -> str:
    """sha256 of every evaluation set's name, kind and items (prompts, answers, choices).

    An lm-eval task (:class:`~tclora.evaluation.HarnessTask`) adds what lm-eval scores: its
    resolved task configuration and the selected documents (``config_digest``), their indices,
    and the installed lm-eval version.
    """
    digest = hashlib.sha256()
    for es in eval_sets:
        items = [[ex.prompt, list(ex.answers), ex.choices, ex.task] for ex in es.examples]
        digest.update(json.dumps([es.name, es.kind, items], sort_keys=True).encode())
        if isinstance(es, HarnessTask):
            try:
                lm_eval_version = version("lm-eval")
            except PackageNotFoundError:
                lm_eval_version = "?"
            lm_eval = [es.spec, es.config_digest, es.doc_ids, lm_eval_version]
            digest.update(json.dumps(lm_eval).encode())
    return digest.hexdigest()


def batches_digest(loaders: Sequence[Iterable[Mapping[str, Any]]], max_batches: int | None) -> str:
    """sha256 of the validation batches a study reads (the first ``max_batches`` per loader)."""
    digest = hashlib.sha256(str(len(loaders)).encode())
    for loader in loaders:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            for key in sorted(k for k in batch if k in ("input_ids", "labels", "attention_mask")):
                digest.update(key.encode())
                _update_tensor(digest, torch.as_tensor(batch[key]))
        digest.update(b"|")
    return digest.hexdigest()


def _code_versions() -> dict[str, str]:
    """Versions of the packages that compute a row, and a digest of tclora's own source.

    The source digest covers every ``.py`` file of the package, so a changed merge rule or
    scorer (even without a version bump) never reuses rows computed by the old code. It is the
    source as this process imported it (:data:`tclora.SOURCE_DIGEST`), not as the files read now.
    """
    out = {}
    for package in _PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "?"
    out["tclora_source"] = tclora.SOURCE_DIGEST
    return out


def fingerprint_components(
    *,
    stack: AdapterStack,
    model: Any,
    tokenizer: Any,
    cfg: StudyConfig,
    eval_sets: Sequence[EvalSet],
    val_loaders: Sequence[Iterable[Mapping[str, Any]]],
    routing: bool,
) -> dict[str, Any]:
    """What a study's rows depend on, one entry per part (so a mismatch can say which part).

    Args:
        stack: The adapters merged.
        model: The peft model (its base model is fingerprinted).
        tokenizer: The tokenizer used for evaluation.
        cfg: The study options.
        eval_sets: The loaded evaluation sets.
        val_loaders: The validation loaders (read once here).
        routing: Whether a router is available (decides the routing row).

    Returns:
        ``{"adapters", "base_model", "tokenizer", "options", "eval_sets", "validation",
        "routing", "code"}``.
    """
    return {
        "adapters": adapters_digest(stack),
        "base_model": model_digest(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": cfg.outcome_fields(),
        "eval_sets": eval_sets_digest(eval_sets),
        "validation": batches_digest(val_loaders, cfg.val_max_batches),
        "routing": routing,
        "code": _code_versions(),
    }


def study_fingerprint(components: Mapping[str, Any]) -> str:
    """One hex digest of :func:`fingerprint_components`."""
    text = json.dumps(components, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_progress(
    out_dir: Path, components: Mapping[str, Any], rows: Sequence[MethodResult]
) -> None:
    """Write the finished rows with the fingerprint that made them (atomically)."""
    payload = {
        "fingerprint": study_fingerprint(components),
        "components": dict(components),
        "rows": [row_to_dict(r) for r in rows],
    }
    atomic_write_text(out_dir / PROGRESS_FILE, json.dumps(payload, indent=1, default=str))


def read_progress(
    out_dir: Path, components: Mapping[str, Any]
) -> tuple[list[MethodResult], str | None]:
    """The rows of an earlier run of this very study in ``out_dir``.

    Args:
        out_dir: The study's output folder.
        components: This run's :func:`fingerprint_components`.

    Returns:
        ``(rows, reason)``: the earlier rows when the fingerprints match (``reason`` None), or
        ``[]`` and why they cannot be reused (``reason`` None as well when there is no
        progress file).
    """
    path = out_dir / PROGRESS_FILE
    if not path.is_file():
        return [], None
    try:
        payload = json.loads(path.read_text())
        stored = payload["fingerprint"]
        rows = [row_from_dict(r) for r in payload["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [], f"{path} is unreadable ({type(err).__name__}: {err})"
    if stored == study_fingerprint(components):
        return rows, None
    old = payload.get("components")
    if isinstance(old, Mapping):
        current = json.loads(json.dumps(components, default=str))
        differ = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        what = ", ".join(differ) or "the fingerprint"
    else:
        what = "the fingerprint (a progress file without one)"
    return [], f"{path} was written by a different run ({what} differ)"


def retire_outputs(out_dir: Path) -> Path | None:
    """Move the files of an earlier, different study in ``out_dir`` into a ``stale-*`` folder.

    Args:
        out_dir: The study's output folder.

    Returns:
        The folder they were moved to, or ``None`` when there was nothing to move.
    """
    present = [out_dir / name for name in OUTPUT_NAMES if (out_dir / name).exists()]
    if not present:
        return None
    stale = out_dir / f"stale-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}"
    stale.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(stale / path.name))
    return stale
