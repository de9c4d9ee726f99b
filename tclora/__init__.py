"""tclora: Tensorized Clustered LoRA (TC-LoRA) on PyTorch Lightning.

Cluster multi-task data by sentence embeddings, train one LoRA adapter per cluster in a single
fit, and merge the adapters through a joint Canonical Polyadic decomposition of their deltas.
"""

import hashlib
from pathlib import Path

__version__ = "0.1.0"


def _source_digest() -> str:
    """sha256 of every ``.py`` file of the package (relative path and bytes), in path order."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


SOURCE_DIGEST = _source_digest()
"""The package's source as this process imported it: taken once, at import, so a file edited
while a long run is going does not change the digest the run's results are stamped with (the
run still executes the code it started with)."""
