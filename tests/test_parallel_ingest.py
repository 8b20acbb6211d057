"""Ingest as parts and worker processes: the same files as one process, and a merge that refuses what does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco_flow.data import schema
from muco_flow.data.ingest import MANIFEST_FILE, PARTS_DIR, IngestConfig, merge_ingest_parts
from muco_flow.data.m3t_ingest import ingest_m3t_part, ingest_m3t_snapshot
from muco_flow.data.sources import LocalSnapshot
from tests.corrupt_corpus import corrupt_snapshot

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# 4 rows a block, batches of 3 and row groups of 5 rows: batches and row groups straddle the blocks
PARAMS = {"rows_per_shard": 4, "batch_rows": 3, "image_workers": 2, "download": {"retries": 0, "timeout_s": 2}}
CONFIG = IngestConfig.from_params(PARAMS)


@pytest.fixture(scope="module")
def snapshot(small_sample_root, tmp_path_factory):
    """The corrupt corpus (a defect per row, a duplicate of row 0 in a later block) and four rows more.

    Row 24 repeats the id of row 1 (rejected for its image), row 25 has row 1's
    broken image and the id of row 23 (accepted), row 27 repeats row 26's id in
    the same block. One pass over the file rejects all three as DUPLICATE_ID:
    it stops at the id before looking at the image.
    """
    root = tmp_path_factory.mktemp("parallel") / "snapshot"
    expected = corrupt_snapshot(small_sample_root, root)
    meta = root / schema.TRAIN_META_FILE
    table = pq.read_table(meta)
    rows = table.to_pylist()
    assert len(rows) == 24 and expected[1] and not expected.get(23) and not expected.get(0)
    rows += [
        {**rows[0], schema.SAMPLE_ID: rows[1][schema.SAMPLE_ID]},
        {**rows[1], schema.SAMPLE_ID: rows[23][schema.SAMPLE_ID]},
        {**rows[0], schema.SAMPLE_ID: "train-extra"},
        {**rows[0], schema.SAMPLE_ID: "train-extra"},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), meta, row_group_size=5)
    expected |= {24: "DUPLICATE_ID", 25: "DUPLICATE_ID", 27: "DUPLICATE_ID"}
    return root, {row: why for row, why in expected.items() if why}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def as_parts(root: Path, out: Path, num_parts: int, num_workers: int) -> dict:
    config = IngestConfig.from_params({**PARAMS, "num_workers": num_workers})
    for index in reversed(range(num_parts)):  # the order the parts finish in does not matter
        ingest_m3t_part(LocalSnapshot(root, schema.TRAIN_META_FILE), out, config, index, num_parts)
    return merge_ingest_parts(out, num_parts)


@pytest.fixture(scope="module")
def one_process(snapshot, tmp_path_factory):
    root, _ = snapshot
    out = tmp_path_factory.mktemp("one")
    manifest = ingest_m3t_snapshot(LocalSnapshot(root, schema.TRAIN_META_FILE), out, CONFIG)
    return manifest, out


def test_one_process_rejects_as_one_pass_over_the_file(snapshot, one_process):
    _, expected = snapshot
    manifest, out = one_process
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["source_row"]: r["reason"] for r in rejects} == expected
    assert [r["source_row"] for r in rejects] == sorted(expected)
    by_row = {r["source_row"]: r for r in rejects}
    assert by_row[24]["message"] == "sample id 'train-000001' appeared earlier in the file"
    assert by_row[25]["message"] == "sample id 'train-000023' appeared earlier in the file"
    assert by_row[27]["message"] == "sample id 'train-extra' appeared earlier in the file"
    accepted = [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]
    assert [r["source_row"] for r in accepted] == [i for i in range(28) if i not in expected]
    assert manifest["counts"] == {"read": 28, "accepted": 28 - len(expected), "rejected": len(expected)}
    # a shard per block of 4 source rows that kept a row, named by its block
    blocks = {row // 4 for row in range(28) if row not in expected}
    assert [s["file"] for s in manifest["shards"]] == [f"shards/part-{b:05d}.parquet" for b in sorted(blocks)]
    assert [s["rows"] for s in manifest["shards"]] == [
        sum(1 for row in range(4 * b, 4 * b + 4) if row not in expected) for b in sorted(blocks)
    ]
    assert not (out / PARTS_DIR).exists()


# num_workers 2 forks worker processes (slow: docs/development.md); 3 parts on 1 worker run in this process
@pytest.mark.parametrize(
    ("num_parts", "num_workers"),
    [pytest.param(1, 2, marks=pytest.mark.slow), (3, 1), pytest.param(2, 2, marks=pytest.mark.slow)],
)
def test_parts_and_workers_give_the_files_of_one_process(snapshot, one_process, tmp_path, num_parts, num_workers):
    root, _ = snapshot
    reference, reference_out = one_process
    manifest = as_parts(root, tmp_path, num_parts, num_workers)
    assert manifest == reference
    assert files_of(tmp_path) == files_of(reference_out)


class RemoteLike:
    """A source that is not a local snapshot (as S3Snapshot, whose client forked processes must not share)."""

    def __init__(self, local: LocalSnapshot) -> None:
        self.local, self.uri, self.meta_file = local, local.uri, local.meta_file

    def meta_path(self):
        return self.local.meta_path()

    def read_image(self, relative, max_bytes=None):
        assert os.getpid() == PARENT_PID, "read in a forked process"
        return self.local.read_image(relative, max_bytes)

    def close(self) -> None:
        pass


PARENT_PID = os.getpid()


def test_a_source_other_than_a_local_snapshot_runs_on_one_process(snapshot, one_process, tmp_path, caplog):
    root, _ = snapshot
    reference, reference_out = one_process
    source = RemoteLike(LocalSnapshot(root, schema.TRAIN_META_FILE))
    config = IngestConfig.from_params({**PARAMS, "num_workers": 2})
    with caplog.at_level("INFO", logger="muco_flow.data.ingest"):
        ingest_m3t_part(source, tmp_path, config)
    assert "is not a local snapshot; its blocks run on one process" in caplog.text
    assert merge_ingest_parts(tmp_path, 1) == reference
    assert files_of(tmp_path) == files_of(reference_out)


def test_merge_names_a_missing_part(snapshot, tmp_path):
    root, _ = snapshot
    ingest_m3t_part(LocalSnapshot(root, schema.TRAIN_META_FILE), tmp_path, CONFIG, 0, 2)
    with pytest.raises(FileNotFoundError, match=r"ingest part 1 of 2 has not finished: no .*part-00001-of-00002\.json"):
        merge_ingest_parts(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match=r"ingest part 0 of 3 has not finished.*part-00000-of-00002\.json"):
        merge_ingest_parts(tmp_path, 3)  # merged with another count than the parts ran with
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_merge_refuses_parts_run_with_other_settings(snapshot, tmp_path):
    root, _ = snapshot
    source = LocalSnapshot(root, schema.TRAIN_META_FILE)
    ingest_m3t_part(source, tmp_path, CONFIG, 0, 2)
    ingest_m3t_part(source, tmp_path, IngestConfig.from_params({**PARAMS, "max_text_chars": 1000}), 1, 2)
    with pytest.raises(ValueError, match=r"ingest part 1 has another settings than part 0 .*re-run every part"):
        merge_ingest_parts(tmp_path, 2)


def test_merge_refuses_blocks_covered_twice_or_not_at_all(snapshot, tmp_path):
    root, _ = snapshot
    ingest_m3t_part(LocalSnapshot(root, schema.TRAIN_META_FILE), tmp_path, CONFIG, 0, 1)
    summary_path = tmp_path / PARTS_DIR / "part-00000-of-00001.json"
    summary = json.loads(summary_path.read_text())
    assert summary["blocks"] == list(range(7))  # 28 rows, 4 a block
    summary_path.write_text(json.dumps({**summary, "blocks": [0, 1, 1, 3, 4, 5, 6]}))
    with pytest.raises(ValueError, match=r"cover blocks \[0, 1, 1, 3, 4, 5, 6\], not each of 0\.\.6 once"):
        merge_ingest_parts(tmp_path, 1)


@pytest.mark.parametrize(("part_index", "num_parts"), [(2, 2), (-1, 2), (0, 0)])
def test_a_part_outside_the_split_is_refused(snapshot, tmp_path, part_index, num_parts):
    root, _ = snapshot
    with pytest.raises(ValueError, match=rf"ingest part {part_index} of {num_parts}: need num_parts >= 1 and 0 <="):
        ingest_m3t_part(LocalSnapshot(root, schema.TRAIN_META_FILE), tmp_path, CONFIG, part_index, num_parts)


@pytest.mark.slow
def test_the_cli_as_a_two_task_slurm_array_then_merge(snapshot, one_process, tmp_path):
    root, _ = snapshot
    reference, reference_out = one_process
    # two parameter files, the second overriding the first, as conf/base and conf/<env>
    base, override = tmp_path / "base.yml", tmp_path / "override.yml"
    base.write_text(json.dumps({"ingest": {**PARAMS, "num_workers": 1}}))  # YAML reads JSON
    override.write_text("ingest:\n  num_workers: 2\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "SLURM_ARRAY_TASK_COUNT": "2"}
    cli = [sys.executable, "-m", "muco_flow.data.parts_cli"]
    params = ["--params", str(base), "--params", str(override)]
    for task in ("0", "1"):
        subprocess.run(
            [*cli, "ingest-part", "--source", str(root), "--output", str(out), *params],
            env={**env, "SLURM_ARRAY_TASK_ID": task},
            check=True,
            cwd=tmp_path,
        )
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == [
        "part-00000-of-00002.json",
        "part-00000-of-00002.rejects.parquet",
        "part-00001-of-00002.json",
        "part-00001-of-00002.rejects.parquet",
    ]
    subprocess.run([*cli, "ingest-merge", "--output", str(out)], env=env, check=True, cwd=tmp_path)
    assert json.loads((out / MANIFEST_FILE).read_text()) == reference
    assert files_of(out) == files_of(reference_out)


@pytest.mark.slow
def test_the_cli_says_what_to_give_outside_an_array(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GROUP_"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT / "src")
    result = subprocess.run(
        [sys.executable, "-m", "muco_flow.data.parts_cli", "ingest-merge", "--output", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode != 0
    assert "give --num-parts (or run in a SLURM array or under torchrun" in result.stderr
