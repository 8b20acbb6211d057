"""Ingestion: every defect rejected with its reason, nothing lost, shards reproducible."""

from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.data import schema
from muco_flow.data.ingest import IngestConfig, IngestQualityError, check_reject_budget
from muco_flow.data.m3t_ingest import REJECT_REASONS_M3T, ingest_m3t_snapshot, validate_text_fields
from muco_flow.data.row_checks import Reject
from muco_flow.data.sources import LocalSnapshot
from tests.corrupt_corpus import COLUMN_CORRUPTIONS, CORRUPTIONS, corrupt_snapshot, retype_column

FAST = IngestConfig.from_params({"rows_per_shard": 10, "batch_rows": 7, "download": {"retries": 0, "timeout_s": 2}})


def ingest(root, out, config=FAST):
    return ingest_m3t_snapshot(LocalSnapshot(root, schema.TRAIN_META_FILE), out, config)


def read_rows(path):
    return pq.read_table(path).to_pylist()


def shard_rows(out, manifest):
    return [row for shard in manifest["shards"] for row in read_rows(out / shard["file"])]


def snapshot_with_meta(sample_root, table, tmp_path):
    """A copy of the sample's images with ``table`` as its meta file; returns (root, empty output dir)."""
    root, out = tmp_path / "snapshot", tmp_path / "out"
    (root / "M3T_train").mkdir(parents=True)
    shutil.copytree(sample_root / "images", root / "images")
    pq.write_table(table, root / schema.TRAIN_META_FILE)
    out.mkdir()
    return root, out


@pytest.fixture(scope="module")
def corrupted(small_sample_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("corrupt")
    expected = corrupt_snapshot(small_sample_root, base / "snapshot")
    out = base / "out"
    out.mkdir()
    return base / "snapshot", expected, ingest(base / "snapshot", out), out


def test_every_reason_code_of_this_corpus_is_known():
    # the codes no kind here produces are in tests/fault_corpus.py (test_fault_corpus.py checks all are covered)
    assert {reason for reason in CORRUPTIONS.values() if reason} <= set(REJECT_REASONS_M3T)
    assert {reason for _, _, reason in COLUMN_CORRUPTIONS.values()} == {"WRONG_TYPE", "MISSING_FIELD"}


def test_each_corrupt_row_is_rejected_with_its_reason(corrupted):
    _, expected, manifest, out = corrupted
    rejects = {r["source_row"]: r for r in read_rows(out / "rejects.parquet")}
    assert {i: r["reason"] for i, r in rejects.items()} == {i: why for i, why in expected.items() if why}
    assert all(r["message"] for r in rejects.values())
    assert manifest["rejects_by_reason"] == dict(
        sorted({why: list(expected.values()).count(why) for why in set(expected.values()) if why}.items())
    )


def test_counts_are_conserved_and_valid_rows_come_through_unchanged(corrupted, small_sample_root):
    root, expected, manifest, out = corrupted
    source = read_rows(root / schema.TRAIN_META_FILE)
    counts = manifest["counts"]
    assert counts["read"] == len(source) == counts["accepted"] + counts["rejected"]
    accepted = shard_rows(out, manifest)
    assert len(accepted) == counts["accepted"] == sum(s["rows"] for s in manifest["shards"])
    assert [r["source_row"] for r in accepted] == [i for i in range(len(source)) if not expected.get(i)]
    for row in accepted:
        original = source[row["source_row"]]
        assert row["qry"] == original["qry"] and row["pos_text"] == original["pos_text"]
        if not original["qry_image_path"]:  # a text-only sample
            assert row["image_bytes"] is None and row["image_path"] == ""
            continue
        assert row["image_sha256"] == hashlib.sha256(row["image_bytes"]).hexdigest()
        if not row["image_upscaled"]:
            assert row["image_bytes"] == (root / original["qry_image_path"]).read_bytes()


def test_tiny_images_are_stretched_to_56_px_as_muco_does(corrupted):
    _, expected, manifest, out = corrupted
    tiny_row = next(i for i, why in expected.items() if why is None)  # tiny_image (10 x 20) comes first
    row = next(r for r in shard_rows(out, manifest) if r["source_row"] == tiny_row)
    assert row["image_upscaled"] and (row["image_width"], row["image_height"]) == (56, 56)
    assert Image.open(__import__("io").BytesIO(row["image_bytes"])).size == (56, 56)


def test_shards_are_bounded_and_identical_for_the_same_input(small_sample_root, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    m1, m2 = ingest(small_sample_root, first), ingest(small_sample_root, second)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert [s["rows"] for s in m1["shards"]] == [10, 10, 4]  # 24 rows, 10 per shard
    assert (
        m1["source"]["sha256"] == hashlib.sha256((small_sample_root / schema.TRAIN_META_FILE).read_bytes()).hexdigest()
    )


def test_column_mapping_reads_differently_named_sources(small_sample_root, tmp_path):
    table = pq.read_table(small_sample_root / schema.TRAIN_META_FILE)
    renamed = table.rename_columns(["queries", *table.column_names[1:]])
    renamed = renamed.append_column("id", pa.array([f"img-{i}" for i in range(table.num_rows)]))
    root, out = snapshot_with_meta(small_sample_root, renamed, tmp_path)
    with pytest.raises(ValueError, match=r"no column 'qry' \(for qry\); it has .*column_mapping"):
        ingest(root, out)
    config = IngestConfig(column_mapping={"qry": "queries"}, id_column="id")
    manifest = ingest(root, out, config)
    assert manifest["counts"] == {"read": 24, "accepted": 24, "rejected": 0}
    assert [r["sample_id"] for r in shard_rows(out, manifest)] == [f"img-{i}" for i in range(24)]


def test_without_an_id_column_ids_come_from_position_and_content(small_sample_root, tmp_path):
    """The published M3T has no id column; the default settings derive one, stable across runs."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    ids = [[r["sample_id"] for r in shard_rows(out, ingest(small_sample_root, out))] for out in (first, second)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 24
    source = read_rows(small_sample_root / schema.TRAIN_META_FILE)
    # row position first, then 12 hex digits that change with the row's content
    assert [i.split("-")[0] for i in ids[0]] == [f"{n:09d}" for n in range(24)]
    edited = pq.read_table(small_sample_root / schema.TRAIN_META_FILE)
    texts = [row["pos_text"] for row in source]
    texts[3] = ["changed", *texts[3][1:]]
    edited = edited.set_column(edited.column_names.index("pos_text"), "pos_text", pa.array(texts))
    root, out = snapshot_with_meta(small_sample_root, edited, tmp_path)
    changed = [r["sample_id"] for r in shard_rows(out, ingest(root, out))]
    assert [a == b for a, b in zip(changed, ids[0], strict=True)] == [n != 3 for n in range(24)]


@pytest.mark.parametrize("corruption", COLUMN_CORRUPTIONS)
def test_a_column_of_the_wrong_type_rejects_every_row_and_fails_the_budget(small_sample_root, tmp_path, corruption):
    root, out = snapshot_with_meta(
        small_sample_root, pq.read_table(small_sample_root / schema.TRAIN_META_FILE), tmp_path
    )
    rows = retype_column(root / schema.TRAIN_META_FILE, corruption)
    reason = COLUMN_CORRUPTIONS[corruption][2]
    manifest = ingest(root, out)
    assert manifest["counts"] == {"read": rows, "accepted": 0, "rejected": rows}
    rejects = read_rows(out / "rejects.parquet")
    assert [r["source_row"] for r in rejects] == list(range(rows))
    assert {r["reason"] for r in rejects} == {reason} and all(r["message"] for r in rejects)
    with pytest.raises(IngestQualityError) as failure:
        check_reject_budget(manifest, 0.05, where=str(out))
    message = str(failure.value)
    assert f"rejected {rows} of {rows} rows (100.0%)" in message and reason in message and "rejects.parquet" in message


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"qry_image_path": 17}, "WRONG_TYPE"),
        ({"qry": "just a string"}, "WRONG_TYPE"),
        ({"pos_text": float("nan")}, "MISSING_FIELD"),
        ({"qry_sentence": 3.5}, "WRONG_TYPE"),
        ({"neg_text": ["a"]}, "TURN_COUNT_MISMATCH"),
        ({"qry": [[]] * 7}, "EMPTY_TEXT"),
    ],
)
def test_row_checks_name_the_problem(small_sample_files, change, reason):
    import io

    row = pq.read_table(io.BytesIO(small_sample_files[schema.TRAIN_META_FILE])).slice(0, 1).to_pylist()[0]
    with pytest.raises(Reject) as rejected:
        validate_text_fields({**row, **change}, IngestConfig())
    assert rejected.value.code == reason


def test_budget_allows_up_to_the_fraction():
    manifest = {"counts": {"read": 100, "accepted": 95, "rejected": 5}, "rejects_by_reason": {"EMPTY_TEXT": 5}}
    check_reject_budget(manifest, 0.05, where="x")
    with pytest.raises(IngestQualityError, match="5 of 100 rows"):
        check_reject_budget(manifest, 0.04, where="x")
    empty = {"counts": {"read": 0, "accepted": 0, "rejected": 0}, "rejects_by_reason": {}}
    with pytest.raises(IngestQualityError, match="no rows"):
        check_reject_budget(empty, 1.0, where="x")


def test_manifest_is_written_beside_the_shards(corrupted):
    _, _, manifest, out = corrupted
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["schema_version"] == schema.SCHEMA_VERSION


def test_mutated_image_bytes_end_as_a_reason_never_as_a_crash():
    """Random damage to images of every common format: each is accepted or gets an image reason code."""
    import io
    import random
    import warnings

    from muco_flow.data.images import ImageDecodeError, check_image

    rng = random.Random(9)
    originals = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 120, 30)).save(buffer, fmt)
        originals.append(buffer.getvalue())
    reasons = set()
    for _ in range(600):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                del data[at : at + rng.randint(1, 64)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about some damaged TIFF tags
            try:
                check_image(bytes(data), 40_000_000)
            except ImageDecodeError as err:
                reasons.add(err.code)
    assert reasons <= set(REJECT_REASONS_M3T) and "IMAGE_UNDECODABLE" in reasons
