"""The second corruption corpus (tests/fault_corpus.py): 0 crashes, 0 hangs, 0 silent changes."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from muco_flow.data import schema
from muco_flow.data.conversations import FormatConfig
from muco_flow.data.formatting import assemble_conversations, format_m3t_shards
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.m3t_ingest import REJECT_REASONS_M3T, ingest_m3t_snapshot
from muco_flow.data.meta_file import MetaFileError
from muco_flow.data.shards import read_shard
from muco_flow.data.sources import LocalSnapshot
from muco_flow.modeling.backbone import load_processors
from tests.conftest import load_params
from tests.corrupt_corpus import CORRUPTIONS
from tests.fault_corpus import (
    DOWNLOAD,
    FILE_FAULTS,
    MAX_IMAGE_BYTES,
    MAX_PHRASINGS,
    MAX_TURNS,
    PNG,
    ROW_FAULTS,
    faulty_snapshot,
    image_server,
)

CONFIG = IngestConfig.from_params(
    {
        "rows_per_shard": 16,
        "batch_rows": 9,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_turns": MAX_TURNS,
        "max_phrasings_per_turn": MAX_PHRASINGS,
        "download": DOWNLOAD,
    }
)


@pytest.fixture(scope="module")
def faulty(small_sample_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("faulty")
    with image_server() as url:
        expected = faulty_snapshot(small_sample_root, base / "snapshot", url)
        out = base / "ingested"
        out.mkdir()
        manifest = ingest_m3t_snapshot(LocalSnapshot(base / "snapshot", schema.TRAIN_META_FILE), out, CONFIG)
    return base / "snapshot", expected, manifest, out


def rows_of(path):
    """A Parquet file's rows (ingest) or an Arrow IPC file's (formatted records)."""
    return read_shard(path).to_pylist()


def test_every_reason_code_has_a_corrupt_input_in_one_of_the_two_corpora():
    produced = {r for r in CORRUPTIONS.values() if r} | {r for r in ROW_FAULTS.values() if r}
    # WRONG_TYPE: tests/corrupt_corpus.py COLUMN_CORRUPTIONS; INTERNAL_ERROR and IMAGE_UNREADABLE: their own tests
    assert produced == set(REJECT_REASONS_M3T) - {"WRONG_TYPE", "INTERNAL_ERROR", "IMAGE_UNREADABLE"}


@pytest.mark.timeout(120)  # a hang (a FIFO read, a trickling download) fails here instead of stalling CI
def test_each_row_fault_is_rejected_with_its_reason_and_nothing_else_changes(faulty):
    root, expected, manifest, out = faulty
    rejects = {r["source_row"]: r for r in rows_of(out / "rejects.parquet")}
    assert {i: r["reason"] for i, r in rejects.items()} == {i: why for i, why in expected.items() if why}
    assert all(r["message"] for r in rejects.values())
    counts = manifest["counts"]
    assert counts["read"] == len(expected) == counts["accepted"] + counts["rejected"]

    source = pq.read_table(root / schema.TRAIN_META_FILE)
    accepted = [r for s in manifest["shards"] for r in rows_of(out / s["file"])]
    assert [r["source_row"] for r in accepted] == [i for i, why in expected.items() if why is None]
    for row in accepted:  # 0 silent changes: text as in the file, image bytes as on disk (or as served)
        original = source.slice(row["source_row"], 1).to_pylist()[0]
        for name in (schema.QRY, schema.POS_TEXT, schema.POS_SENTENCE, schema.NEG_TEXT, schema.QRY_SENTENCE):
            assert row[name] == original[name]
        assert row["sample_id"] == original[schema.SAMPLE_ID]
        path = root / original[schema.QRY_IMAGE_PATH]
        assert row["image_bytes"] == (path.read_bytes() if path.exists() else PNG)
        assert row["image_sha256"] == hashlib.sha256(row["image_bytes"]).hexdigest()


def test_messages_name_the_limit_or_the_kind_of_file(faulty):
    _, _, _, out = faulty
    messages = {r["reason"]: [] for r in rows_of(out / "rejects.parquet")}
    for r in rows_of(out / "rejects.parquet"):
        messages[r["reason"]].append(r["message"])
    assert any("ingest.max_turns is 32" in m for m in messages["TOO_MANY_TURNS"])
    assert any("ingest.max_phrasings_per_turn is 256" in m for m in messages["TOO_MANY_PHRASINGS"])
    assert {kind for kind in ("FIFO", "socket", "symlink loop") if any(kind in m for m in messages["IMAGE_NOT_A_FILE"])}
    assert len(messages["IMAGE_NOT_A_FILE"]) == 3
    assert any("deadline_s" in m for m in messages["DOWNLOAD_FAILED"])
    assert any("invalid Content-Length 'abc'" in m for m in messages["DOWNLOAD_FAILED"])
    assert any("NotImplementedError" in m for m in messages["IMAGE_UNDECODABLE"])
    assert any("RuntimeError" in m for m in messages["IMAGE_UNDECODABLE"])
    assert any("invalid UTF-8" in m and "pos_text" in m for m in messages["UNDECODABLE_VALUE"])


def test_every_accepted_fault_row_formats(faulty, tiny_backbone_dir, tmp_path):
    """Rows at the turn and phrasing limits are written by format, and their conversations assemble."""
    _, _, manifest, out = faulty
    formatted = tmp_path / "formatted"
    formatted.mkdir()
    config = FormatConfig.from_params({**load_params()["format"], "turns_per_conversation": 4})
    result = format_m3t_shards(out, formatted, *load_processors(str(tiny_backbone_dir)), config)
    assert result["counts"]["samples"] == manifest["counts"]["accepted"]
    records = [r for s in result["shards"] for r in rows_of(formatted / s["file"])]
    assert max(len(r["query_first_ids"]) for r in records) == MAX_TURNS
    tokenizer = load_processors(str(tiny_backbone_dir))[0]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    turns = [c.turn_index for r in records for c in assemble_conversations(r, 0, result["settings"], image_pad)]
    assert max(k for t in turns for k in t) == MAX_TURNS - 1


@pytest.mark.parametrize("fault", FILE_FAULTS, ids=lambda f: f.__name__)
def test_a_damaged_meta_file_fails_with_one_message_naming_it(small_sample_root, tmp_path, fault):
    root = tmp_path / "snapshot"
    (root / "M3T_train").mkdir(parents=True)
    meta = root / schema.TRAIN_META_FILE
    meta.write_bytes(fault((small_sample_root / schema.TRAIN_META_FILE).read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MetaFileError) as failure:
        ingest_m3t_snapshot(LocalSnapshot(root, schema.TRAIN_META_FILE), out, CONFIG)
    message = str(failure.value)
    assert message.startswith(f"{root}/{schema.TRAIN_META_FILE}: ") and FILE_FAULTS[fault] in message


@pytest.mark.slow
def test_kedro_ingest_of_a_damaged_meta_file_ends_in_one_line_and_leaves_no_output(project, small_sample_files):
    """Through `kedro run`: the message names the input file and the problem, no traceback, no shards."""
    from muco_flow.datasets import FileTreeDataset
    from tests.conftest import kedro_run
    from tests.fault_corpus import two_files_joined

    raw = project / "data/01_raw/m3t_mini"
    FileTreeDataset(str(raw)).save(small_sample_files)
    meta = raw / schema.TRAIN_META_FILE
    meta.write_bytes(two_files_joined(meta.read_bytes()))
    result = kedro_run(project, "--pipelines=ingest", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"ingest failed: data/01_raw/m3t_mini/{schema.TRAIN_META_FILE}: bytes " in output, output[-3000:]
    assert "two parquet files joined" in output and "Traceback" not in output
    layer = project / "data/02_intermediate"
    assert not (layer / "m3t_shards").exists() and not list(layer.glob(".m3t_shards.*"))
