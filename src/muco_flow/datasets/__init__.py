"""Kedro datasets of muco-flow's own."""

from muco_flow.datasets.file_tree import FileTreeDataset

__all__ = ["FileTreeDataset"]
