"""Kedro datasets of muco-flow's own."""

from muco_flow.datasets.file_tree import FileTreeDataset
from muco_flow.datasets.mined_negatives import MinedNegativesDataset
from muco_flow.datasets.mmeb_train_source import MMEBTrainSourceDataset
from muco_flow.datasets.pretrained import PretrainedCheckpointDataset
from muco_flow.datasets.snapshot_source import M3TSnapshotSourceDataset

__all__ = [
    "FileTreeDataset",
    "M3TSnapshotSourceDataset",
    "MMEBTrainSourceDataset",
    "MinedNegativesDataset",
    "PretrainedCheckpointDataset",
]
