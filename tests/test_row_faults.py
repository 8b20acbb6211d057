"""Row-level guards: unexpected exceptions, unreadable and special files, invisible text, ids, limits."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest

from muco_flow.data import ingest as ingest_module
from muco_flow.data import m3t_ingest, schema
from muco_flow.data.ingest import IngestConfig, IngestQualityError, check_reject_budget
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.row_checks import Reject, is_blank, normalise_sample_id
from muco_flow.data.sources import ImageUnreadableError, LocalSnapshot, read_regular_file

FAST = IngestConfig.from_params({"rows_per_shard": 10, "batch_rows": 7, "download": {"retries": 0, "timeout_s": 2}})


def reasons(out):
    return {r["source_row"]: (r["reason"], r["message"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def test_an_unexpected_exception_in_a_row_check_is_that_rows_internal_error(small_sample_root, tmp_path, monkeypatch):
    real = m3t_ingest.validate_text_fields

    def broken_for_row_5(row, config):
        if row[schema.QRY_IMAGE_PATH] == "images/train/000005.png":
            raise KeyError("a key nobody expected")
        return real(row, config)

    broken_format = dataclasses.replace(m3t_ingest.M3T_ROW_FORMAT, validate=broken_for_row_5)
    monkeypatch.setattr(m3t_ingest, "M3T_ROW_FORMAT", broken_format)
    manifest = ingest_m3t_snapshot(LocalSnapshot(small_sample_root, schema.TRAIN_META_FILE), tmp_path, FAST)
    assert manifest["counts"] == {"read": 24, "accepted": 23, "rejected": 1}
    code, message = reasons(tmp_path)[5]
    assert code == "INTERNAL_ERROR" and "KeyError" in message and "a key nobody expected" in message
    with pytest.raises(IngestQualityError, match="INTERNAL_ERROR"):  # counted toward the budget like any reject
        check_reject_budget(manifest, 0.01, where=str(tmp_path))


def test_an_unexpected_exception_while_loading_an_image_is_that_rows_internal_error(
    small_sample_root, tmp_path, monkeypatch
):
    real = ingest_module.check_image

    def broken_for_one_size(data, *args):
        checked = real(data, *args)
        if data == (small_sample_root / "images/train/000007.png").read_bytes():
            raise ZeroDivisionError("a decoder bug")
        return checked

    monkeypatch.setattr(ingest_module, "check_image", broken_for_one_size)
    manifest = ingest_m3t_snapshot(LocalSnapshot(small_sample_root, schema.TRAIN_META_FILE), tmp_path, FAST)
    assert manifest["counts"]["rejected"] == 1
    [(code, message)] = reasons(tmp_path).values()
    assert code == "INTERNAL_ERROR" and "ZeroDivisionError" in message


def test_special_and_unreadable_files_are_refused_without_reading_them():
    with pytest.raises(ImageUnreadableError, match="character device") as device:
        read_regular_file("/dev/zero", "dev/zero")  # a read would never end
    assert device.value.code == "IMAGE_NOT_A_FILE"
    with pytest.raises(ImageUnreadableError, match="Input/output error") as io_error:
        read_regular_file("/proc/self/mem", "proc/self/mem")  # a regular file whose read fails (EIO)
    assert io_error.value.code == "IMAGE_UNREADABLE"


def test_a_file_over_the_byte_limit_is_not_read_past_it(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 1001)
    assert read_regular_file(tmp_path / "big.png", "big.png", max_bytes=1001) == b"x" * 1001
    with pytest.raises(ImageUnreadableError, match="max_image_bytes = 1000") as too_big:
        read_regular_file(tmp_path / "big.png", "big.png", max_bytes=1000)
    assert too_big.value.code == "IMAGE_TOO_LARGE"


@pytest.mark.parametrize(
    "text, blank",
    [
        ("", True),
        (" \t\n", True),
        ("\u200b\u200c\u200d\u2060\ufeff", True),  # zero-width space, joiners, word joiner, BOM
        ("\u00ad\u3164\u2800\ufe0f", True),  # soft hyphen, Hangul filler, blank Braille, variation selector
        ("\u202e\u200f", True),  # bidi controls
        ("a\u200b", False),
        ("\u00e9", False),
        ("\u2801", False),  # a Braille dot is visible
        ("\U0001f600", False),
    ],
)
def test_text_made_only_of_invisible_characters_is_blank(text, blank):
    assert is_blank(text) is blank


def test_ids_are_stripped_and_nfc_normalised_but_keep_their_case():
    assert normalise_sample_id("  abc\t", 10) == "abc"
    assert normalise_sample_id("cafe\u0301", 10) == "caf\u00e9"
    assert normalise_sample_id("ABC", 10) != normalise_sample_id("abc", 10)
    with pytest.raises(Reject, match="max_id_chars is 3") as long:
        normalise_sample_id("abcd", 3)
    assert long.value.code == "TEXT_TOO_LONG"
    with pytest.raises(Reject) as blank:
        normalise_sample_id(" \u200b ", 10)
    assert blank.value.code == "MISSING_FIELD"


def test_limits_beyond_any_sane_row_are_refused():
    with pytest.raises(ValueError, match=r"max_turns must be within \[1, 127\]"):
        IngestConfig(max_turns=200)
    with pytest.raises(ValueError, match=r"max_phrasings_per_turn must be within \[1, 32767\]"):
        IngestConfig(max_phrasings_per_turn=50_000)
