"""A Kedro dataset for mined hard negatives: written as a folder of MMEB-train meta files, read as a snapshot.

The `mine` pipeline saves a tree (meta files with mined ``neg_text`` /
``neg_image_path``, and ``mining_manifest.json``) like any FileTreeDataset.
Loading gives what MMEBTrainSourceDataset gives, one part per meta file, so
the `finetune_data` pipeline reads mined negatives as it reads the given
ones: meta files from this folder, images from the snapshot the rows name
them in (``images_uri`` and ``image_root``, as the `mmeb_train_source` entry).
The ingest manifest then names this folder as its source, which is how stage 2
finds the mining manifest (muco_flow.mining.lineage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import DatasetError

from muco_flow.data.ingest import MetaPart
from muco_flow.data.mmeb_train import META_GLOB
from muco_flow.data.mmeb_train_ingest import ImagesUnder, matches_glob
from muco_flow.data.sources import SnapshotSource, SourceError, open_snapshot
from muco_flow.datasets.file_tree import FileTreeDataset


class MetaFileBeside:
    """A snapshot's images, with its meta file replaced by a copy in another folder (the mined one)."""

    def __init__(self, folder: Path, meta_file: str, images: SnapshotSource) -> None:
        self.uri, self.meta_file = str(folder), meta_file
        self._meta, self._images = folder / meta_file, images

    def meta_path(self) -> Path:
        return self._meta

    def read_image(self, relative: str, max_bytes: int | None = None) -> bytes:
        return self._images.read_image(relative, max_bytes)

    def close(self) -> None:
        self._images.close()


class MinedNegativesDataset(FileTreeDataset):
    """Saves a tree under ``path``; loads its meta files as MMEB-train parts with the images of ``images_uri``."""

    def __init__(
        self,
        path: str,
        images_uri: str,
        image_root: str = "",
        meta_glob: str = META_GLOB,
        credentials: dict[str, Any] | None = None,
        s3_options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(path, metadata)
        self._images_uri, self._image_root, self._meta_glob = images_uri, image_root, meta_glob
        self._s3_options = {**(s3_options or {}), **(credentials or {})}

    def load(self) -> list[MetaPart]:  # type: ignore[override]  # parts, not the folder's path
        folder = Path(super().load())
        files = sorted(
            relative
            for relative in (p.relative_to(folder).as_posix() for p in folder.glob(self._meta_glob))
            if matches_glob(relative, self._meta_glob)
        )
        if not files:
            raise DatasetError(f"no meta file under '{folder}' matches '{self._meta_glob}': run the `mine` pipeline")
        parts: list[MetaPart] = []
        try:
            for relative in files:
                images = open_snapshot(self._images_uri, relative, self._s3_options)
                source = ImagesUnder(MetaFileBeside(folder, relative, images), self._image_root)
                parts.append(MetaPart(source, dataset=Path(relative).parent.name))
        except SourceError as err:
            for part in parts:
                part.source.close()
            raise DatasetError(str(err)) from err
        return parts

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "images_uri": self._images_uri, "image_root": self._image_root}
