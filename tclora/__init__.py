"""tclora: Tensorized Clustered LoRA (TC-LoRA) on PyTorch Lightning.

Cluster multi-task data by sentence embeddings, train one LoRA adapter per cluster in a single
fit, and merge the adapters through a joint Canonical Polyadic decomposition of their deltas.
"""

__version__ = "0.1.0"
