"""Readers: one source (file, folder, evals-registry task, Hugging Face dataset) -> samples.

A source is written as a string or a dict:

* ``"data/train.jsonl"``, ``"data/"`` -- a local JSONL / JSON / Parquet / CSV file, or a folder
  searched recursively for such files (a folder holding a ``save_to_disk`` dataset is read with
  ``datasets.load_from_disk``);
* ``"registry:<task>"`` -- an evals-registry task from :func:`tclora.assets.corpus_dir`
  (``{"input": [messages], "ideal": answer}`` lines);
* ``"hf:<name>"`` -- a Hugging Face ``datasets`` name (needs the optional ``datasets`` package and,
  unless cached, the network);
* ``{"path" | "registry" | "hf": ..., "prompt_field": ..., "response_field": ...,
  "task_field": ..., "task": ..., "max_samples": ..., "split": ..., "name": ...}`` -- the same
  with per-source options.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tclora.data.jsonl import read_jsonl, registry_task_folder
from tclora.data.samples import Prompt, Sample

__all__ = [
    "FILE_SUFFIXES",
    "SOURCE_KINDS",
    "DataSourceError",
    "SourceSpec",
    "check_source",
    "load_source",
    "load_sources",
    "parse_source",
]

SOURCE_KINDS = ("path", "registry", "hf")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_OPTION_KEYS = {
    "prompt_field",
    "response_field",
    "task_field",
    "task",
    "max_samples",
    "split",
    "name",
}


class DataSourceError(ValueError):
    """A source cannot be read: missing file, unknown type, empty data, missing field."""


@dataclass(frozen=True)
class SourceSpec:
    """One parsed source.

    Attributes:
        kind: ``"path"``, ``"registry"`` or ``"hf"``.
        location: The file or folder, the registry task name, or the dataset name.
        prompt_field: Record field holding the prompt (text or chat messages). ``None`` picks
            the kind's default: ``"input"`` for the registry, ``"prompt"`` otherwise.
        response_field: Record field holding the response; a list takes its first element.
            ``None`` picks ``"ideal"`` for the registry, ``"response"`` otherwise.
        task_field: Record field holding the task name. ``None`` uses ``"task"`` when a record
            has it; set explicitly, every record must have it.
        task: A fixed task name for the whole source (used when no task field is found).
            Defaults to the file stem, registry task or dataset name.
        max_samples: Keep at most this many samples, a seeded random subset in original order.
        split: Split of a Hugging Face dataset.
        name: Configuration name of a Hugging Face dataset.
    """

    kind: str
    location: str
    prompt_field: str | None = None
    response_field: str | None = None
    task_field: str | None = None
    task: str | None = None
    max_samples: int | None = None
    split: str = "train"
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """A short human-readable name of the source (used in messages and as ``Sample.source``)."""
        return self.location if self.kind == "path" else f"{self.kind}:{self.location}"


def parse_source(source: str | Mapping[str, Any]) -> SourceSpec:
    """Parse one source string or dict, checking its type and options (reads nothing).

    Args:
        source: See the module docstring.

    Returns:
        The parsed :class:`SourceSpec`.

    Raises:
        DataSourceError: Unknown source type, unknown option, or a bad ``max_samples``.
    """
    if isinstance(source, str | Path):
        text = str(source)
        prefix, sep, rest = text.partition(":")
        if sep and prefix in ("registry", "hf"):
            if not rest:
                raise DataSourceError(f"source {text!r}: nothing after {prefix + ':'!r}")
            return SourceSpec(kind=prefix, location=rest)
        if sep and len(prefix) > 1 and not Path(text).exists() and "/" not in prefix:
            raise DataSourceError(
                f"source {text!r}: unknown source type {prefix!r}; allowed: a local file or "
                "folder path, 'registry:<task>' or 'hf:<dataset name>'"
            )
        return SourceSpec(kind="path", location=text)
    if not isinstance(source, Mapping):
        raise DataSourceError(
            f"source {source!r}: unknown source type {type(source).__name__}; allowed: a string "
            "(path, 'registry:<task>', 'hf:<name>') or a dict with one of the keys "
            f"{list(SOURCE_KINDS)}"
        )
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise DataSourceError(
            f"source {dict(source)!r}: unknown source type; a source dict needs exactly one of "
            f"the keys {list(SOURCE_KINDS)}, got {kinds or 'none'}"
        )
    unknown = sorted(set(source) - set(SOURCE_KINDS) - _OPTION_KEYS)
    if unknown:
        raise DataSourceError(
            f"source {dict(source)!r}: unknown option(s) {unknown}; allowed: {sorted(_OPTION_KEYS)}"
        )
    max_samples = source.get("max_samples")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise DataSourceError(
            f"source {dict(source)!r}: max_samples={max_samples!r} must be a positive integer or None"
        )
    options = {k: source[k] for k in _OPTION_KEYS if k in source}
    _check_hf_options(kinds[0], str(source[kinds[0]]), options, dict(source))
    return SourceSpec(kind=kinds[0], location=str(source[kinds[0]]), **options)


def _check_hf_options(kind: str, location: str, options: Mapping[str, Any], source: Any) -> None:
    """Refuse ``split`` / ``name`` where nothing would read them (before: ignored silently)."""
    given = [k for k in ("split", "name") if k in options]
    if kind == "hf" or not given:
        return
    if kind == "path":
        path = Path(location).expanduser()
        if path.is_dir() and _is_saved_hf_dataset(path):
            given = [k for k in given if k != "split"]  # a saved DatasetDict has splits
        elif not path.exists():
            return  # check_source names the missing path
    if given:
        raise DataSourceError(
            f"source {source!r}: {', '.join(f'{k}={options[k]!r}' for k in given)} applies to "
            "Hugging Face datasets only ('hf:<name>'; split also to a folder saved with "
            f"`save_to_disk`), and this {kind} source would be read whole; remove it, or use "
            "max_samples / a file per split"
        )


def check_source(spec: SourceSpec) -> None:
    """Cheap checks that need no reading: a local path or registry task exists, ``datasets`` is
    importable.

    Args:
        spec: A parsed source.

    Raises:
        DataSourceError: The path or registry task is missing (for a task, with the closest task
            names), or a Hugging Face source cannot be read here.
    """
    if spec.kind == "registry":
        _registry_folder(spec)
    elif spec.kind == "path":
        path = Path(spec.location).expanduser()
        if not path.exists():
            raise DataSourceError(f"source {spec.location!r}: no such file or folder")
        if path.is_dir() and _is_saved_hf_dataset(path):
            _import_datasets(f"source {spec.label!r}")
    elif spec.kind == "hf":
        _import_datasets(f"source {spec.label!r}")


def _default_fields(spec: SourceSpec) -> tuple[str, str]:
    if spec.kind == "registry":
        return spec.prompt_field or "input", spec.response_field or "ideal"
    return spec.prompt_field or "prompt", spec.response_field or "response"


def _as_prompt(value: Any, where: str, prompt_field: str) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, Mapping) and "content" in m and "role" in m for m in value
    ):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise DataSourceError(
        f"{where}: field {prompt_field!r} must be a string or a list of "
        f'{{"role", "content"}} chat messages, got {type(value).__name__}: {str(value)[:80]!r}'
    )


def _as_response(value: Any) -> str | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _records_to_samples(
    records: Iterable[tuple[str | int, Any]],
    spec: SourceSpec,
    default_task: str,
    lenient: bool,
    where_prefix: str = "",
) -> tuple[list[Sample], int]:
    """Map raw records to samples; ``lenient`` skips incomplete records (and counts them).

    ``records`` yields ``(position, record)``; ``where_prefix + position`` names a record in
    error messages (built only when one is raised).
    """
    prompt_field, response_field = _default_fields(spec)
    task_field = spec.task_field or "task"
    label = spec.label
    fixed_task = spec.task or default_task
    samples: list[Sample] = []
    append = samples.append
    skipped = 0
    for position, record in records:
        try:
            prompt = record[prompt_field]
            response = record[response_field]
            task = record.get(task_field) if spec.task_field is None else record[task_field]
        except (KeyError, TypeError, AttributeError):
            prompt = response = None
        if type(response) is not str:
            response = _as_response(response)
        if response is None or prompt is None:
            if not isinstance(record, Mapping):
                raise DataSourceError(
                    f"{where_prefix}{position}: expected a JSON object per record, got "
                    f"{type(record).__name__}"
                ) from None
            if lenient:
                skipped += 1
                continue
            missing = [f for f in (prompt_field, response_field, spec.task_field) if f]
            missing = [f for f in missing if record.get(f) is None]
            raise DataSourceError(
                f"{where_prefix}{position}: missing field(s) {missing}; the record has "
                f"{sorted(record)}. Set prompt_field / response_field / task_field in the source "
                "dict to map them"
            )
        if type(prompt) is not str:
            prompt = _as_prompt(prompt, f"{where_prefix}{position}", prompt_field)
        append(
            Sample(
                prompt=prompt,
                response=response,
                task=fixed_task if task is None else str(task),
                source=label,
            )
        )
    return samples, skipped


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    return read_jsonl(path, DataSourceError)


def _iter_json(path: Path) -> Iterator[tuple[int | str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path}: not valid JSON ({err.msg})") from err
    if isinstance(data, Mapping):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(
                f"{path}: expected a JSON list of records (or an object holding exactly one such "
                f"list), got an object with keys {sorted(data)[:10]}"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for number, record in enumerate(data):
        yield f"[{number}]", record


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from enumerate(csv.DictReader(handle), start=2)


def _iter_parquet(path: Path) -> Iterator[tuple[int | str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataSourceError(
            f"{path}: reading Parquet needs the optional package pyarrow; install it with "
            "`pip install pyarrow`, or convert the file to JSONL"
        ) from err
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 -- pyarrow raises several types for bad files
        raise DataSourceError(
            f"{path}: not a readable Parquet file ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    for number, record in enumerate(table.to_pylist()):
        yield f"[{number}]", record


_READERS = {
    ".jsonl": _iter_jsonl,
    ".json": _iter_json,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
}


def _is_saved_hf_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise DataSourceError(
            f"{what}: Hugging Face datasets need the optional package `datasets`, which is not "
            "installed; install it with `pip install datasets`, or export the data to JSONL"
        ) from err
    return datasets


def _read_hf(spec: SourceSpec, saved_folder: Path | None = None) -> list[Sample]:
    datasets = _import_datasets(f"source {spec.label!r}")
    if saved_folder is not None:
        data = datasets.load_from_disk(str(saved_folder))
        name = saved_folder.name
    else:
        try:
            data = datasets.load_dataset(spec.location, spec.name, split=spec.split)
        except Exception as err:  # noqa: BLE001 -- re-raised with the reason and a way out
            raise DataSourceError(
                f"source {spec.label!r}: could not load the Hugging Face dataset "
                f"(split={spec.split!r}, name={spec.name!r}): {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''}. Offline, use a local "
                "file or a folder saved with `Dataset.save_to_disk`"
            ) from err
        name = spec.location.rsplit("/", 1)[-1]
    if isinstance(data, Mapping):  # a DatasetDict
        if spec.split not in data:
            raise DataSourceError(
                f"source {spec.label!r}: split={spec.split!r} not found; available: {sorted(data)}"
            )
        data = data[spec.split]
    records = ((f"[{i}]", row) for i, row in enumerate(data))
    return _records_to_samples(records, spec, name, lenient=False, where_prefix=spec.label)[0]


def _read_path(spec: SourceSpec) -> list[Sample]:
    path = Path(spec.location).expanduser()
    if not path.exists():
        raise DataSourceError(f"source {spec.location!r}: no such file or folder")
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            return _read_hf(spec, saved_folder=path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _READERS)
        if not files:
            raise DataSourceError(
                f"source {spec.location!r}: the folder holds no data files "
                f"(looked for {list(FILE_SUFFIXES)} recursively)"
            )
    else:
        if path.suffix not in _READERS:
            raise DataSourceError(
                f"source {spec.location!r}: unknown file type {path.suffix!r}; allowed: "
                f"{list(FILE_SUFFIXES)}"
            )
        files = [path]
    samples: list[Sample] = []
    for file in files:
        records = _READERS[file.suffix](file)
        prefix = f"{file}" if file.suffix in (".json", ".parquet") else f"{file}:"
        samples += _records_to_samples(records, spec, file.stem, False, prefix)[0]
    return samples


def _registry_folder(spec: SourceSpec) -> Path:
    """The folder of registry task ``spec.location`` (see :func:`registry_task_folder`)."""
    return registry_task_folder(spec.location, f"source {spec.label!r}", DataSourceError)


def _read_registry(spec: SourceSpec) -> list[Sample]:
    folder = _registry_folder(spec)
    files = sorted(folder.rglob("*.jsonl"))
    samples: list[Sample] = []
    skipped = 0
    for file in files:
        got, missed = _records_to_samples(_iter_jsonl(file), spec, spec.location, True, f"{file}:")
        samples += got
        skipped += missed
    prompt_field, response_field = _default_fields(spec)
    if skipped and samples:
        warnings.warn(
            f"source {spec.label!r}: skipped {skipped} record(s) without "
            f"{prompt_field!r}/{response_field!r}; kept {len(samples)}",
            stacklevel=3,
        )
    if not samples:
        raise DataSourceError(
            f"source {spec.label!r}: the registry task yields no usable samples "
            f"({len(files)} JSONL file(s), none with a chat-message {_default_fields(spec)[0]!r} "
            f"and an {_default_fields(spec)[1]!r}); it uses another schema. Pick another task or "
            "set prompt_field / response_field"
        )
    return samples


def _cap(samples: list[Sample], max_samples: int | None, seed: int) -> list[Sample]:
    if max_samples is None or len(samples) <= max_samples:
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), max_samples, replace=False))
    return [samples[i] for i in keep]


def load_source(spec: SourceSpec | str | Mapping[str, Any], seed: int = 42) -> list[Sample]:
    """Read one source into samples.

    Args:
        spec: A parsed :class:`SourceSpec`, or a source string / dict for :func:`parse_source`.
        seed: Seed of the ``max_samples`` subset.

    Returns:
        The samples, in file order.

    Raises:
        DataSourceError: The source is missing, of an unknown type, empty, or lacks a field.
    """
    if not isinstance(spec, SourceSpec):
        spec = parse_source(spec)
    if spec.kind == "path":
        samples = _read_path(spec)
    elif spec.kind == "registry":
        samples = _read_registry(spec)
    else:
        samples = _read_hf(spec)
    if not samples:
        raise DataSourceError(f"source {spec.label!r}: empty data (no samples)")
    return _cap(samples, spec.max_samples, seed)


def load_sources(
    sources: Sequence[str | Mapping[str, Any] | SourceSpec],
    seed: int = 42,
    prompt_field: str | None = None,
    response_field: str | None = None,
    task_field: str | None = None,
) -> list[Sample]:
    """Read and concatenate several sources.

    Args:
        sources: Source strings, dicts or specs (see the module docstring).
        seed: Seed of the per-source ``max_samples`` subsets.
        prompt_field: Default prompt field for sources that do not set one.
        response_field: Default response field for sources that do not set one.
        task_field: Default task field for sources that do not set one.

    Returns:
        All samples, source after source.

    Raises:
        DataSourceError: Empty ``sources``, or any source that cannot be read.
    """
    if isinstance(sources, str | Mapping) or not sources:
        raise DataSourceError(
            f"sources={sources!r}: expected a non-empty list of sources (paths, "
            "'registry:<task>', 'hf:<name>' or dicts)"
        )
    specs = [s if isinstance(s, SourceSpec) else parse_source(s) for s in sources]
    samples: list[Sample] = []
    for spec in specs:
        spec = replace(
            spec,
            prompt_field=spec.prompt_field or prompt_field,
            response_field=spec.response_field or response_field,
            task_field=spec.task_field or task_field,
        )
        samples += load_source(spec, seed=seed)
    return samples
