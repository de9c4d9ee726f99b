"""Lightning data modules."""

from tclora.datamodules.cluster import ClusterDataModule

__all__ = ["ClusterDataModule"]
