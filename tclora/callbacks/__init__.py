"""Lightning callbacks of tclora, usable in any Lightning project."""

from tclora.callbacks.cp_merge import CPMergeCallback

__all__ = ["CPMergeCallback"]
