"""FileTreeDataset: writes trees whole, never escapes its root."""

from __future__ import annotations

import pytest
from kedro.io import DatasetError

from muco_flow.datasets import FileTreeDataset


def files_under(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_save_replaces_the_whole_tree_and_load_returns_its_path(tmp_path):
    root = tmp_path / "snapshot"
    dataset = FileTreeDataset(str(root))
    assert not dataset.exists()
    dataset.save({"a.txt": b"1", "sub/b.bin": b"\x00\x01"})
    assert files_under(root) == {"a.txt": b"1", "sub/b.bin": b"\x00\x01"}
    dataset.save({"c.txt": b"3"})
    assert files_under(root) == {"c.txt": b"3"}  # nothing stale survives
    assert dataset.load() == str(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot"]  # no staging leftovers


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/passwd", "a/../../b"])
def test_paths_outside_the_root_are_refused_and_the_old_tree_kept(tmp_path, bad):
    root = tmp_path / "snapshot"
    dataset = FileTreeDataset(str(root))
    dataset.save({"keep.txt": b"old"})
    with pytest.raises(DatasetError, match="refusing to write"):
        dataset.save({"fine.txt": b"x", bad: b"evil"})
    assert files_under(root) == {"keep.txt": b"old"}
    assert not (tmp_path / "escape.txt").exists()


def test_empty_trees_and_missing_roots_are_errors(tmp_path):
    dataset = FileTreeDataset(str(tmp_path / "none"))
    with pytest.raises(DatasetError, match="empty tree"):
        dataset.save({})
    with pytest.raises(DatasetError, match="does not exist; run the pipeline"):
        dataset.load()


@pytest.mark.slow  # starts `true` for a dead pid
def test_trees_left_by_killed_writers_are_removed_by_the_next_save(tmp_path):
    import os
    import socket
    import subprocess

    root = tmp_path / "m3t_shards"
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid is that of a writer that died
    host = socket.gethostname()
    stale = [
        tmp_path / f".m3t_shards.tmp-{finished.pid}@{host}-0123abcd",
        tmp_path / f".m3t_shards.old-{finished.pid}@{host}-deadbeef",
    ]
    kept = [
        tmp_path / f".m3t_shards.tmp-{os.getpid()}@{host}-0123abcd",  # a live writer (this process)
        tmp_path / f".m3t_shards.tmp-{finished.pid}@another-host-0123abcd",  # another machine's writer
        tmp_path / ".other.tmp-1@x-0123abcd",  # another dataset's
    ]
    for path in stale + kept:
        (path / "shards").mkdir(parents=True)
    FileTreeDataset(str(root)).save({"manifest.json": b"{}"})
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in kept)
    assert files_under(root) == {"manifest.json": b"{}"}


def test_a_source_saved_by_the_sample_names_where_ingestion_reads_when_it_is_elsewhere(tmp_path, caplog):
    """The sample saves its directory as the sources: nothing is copied, and a source elsewhere is said."""
    from muco_flow.datasets import M3TSnapshotSourceDataset, MMEBTrainSourceDataset

    sample = tmp_path / "m3t_mini"
    sample.mkdir()
    with caplog.at_level("WARNING", logger="muco_flow.datasets.snapshot_source"):
        M3TSnapshotSourceDataset(uri=str(sample), meta_file="M3T_train/M3T.parquet").save(str(sample / "."))
        assert caplog.messages == []  # the default: ingestion reads the sample
        M3TSnapshotSourceDataset(uri="s3://m3t/v1", meta_file="M3T_train/M3T.parquet").save(str(sample))
        MMEBTrainSourceDataset(uri=str(tmp_path / "mmeb")).save(str(sample))
    assert caplog.messages == [
        f"m3t_source is s3://m3t/v1, not the sample written at {sample}: ingestion reads s3://m3t/v1",
        f"mmeb_train_source is {tmp_path / 'mmeb'}, not the sample written at {sample}: ingestion reads "
        f"{tmp_path / 'mmeb'}",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m3t_mini"]  # nothing written anywhere
