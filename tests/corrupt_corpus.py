"""Builds a copy of an M3T snapshot with one known defect per chosen row.

Each corruption names the reject reason ingestion must give it; rows not
listed stay valid and must come through unchanged.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from muco_flow.data import schema


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's signature."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # IHDR starts at byte 8: length(4) type(4) width(4) height(4) ...; its CRC follows the 13 data bytes
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


Row = dict
Corruption = Callable[[Row, Path], None]


def _image(row: Row, root: Path) -> Path:
    return root / row[schema.QRY_IMAGE_PATH]


def truncated_image(row: Row, root: Path) -> None:
    path = _image(row, root)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def non_image_bytes(row: Row, root: Path) -> None:
    _image(row, root).write_bytes(b"<html>this is not an image</html>" * 20)


def zero_byte_image(row: Row, root: Path) -> None:
    _image(row, root).write_bytes(b"")


def missing_file_no_url(row: Row, root: Path) -> None:
    _image(row, root).unlink()
    row[schema.IMAGE_URL] = None


def missing_file_dead_url(row: Row, root: Path) -> None:
    _image(row, root).unlink()
    row[schema.IMAGE_URL] = "http://127.0.0.1:9/nothing-listens-here.png"


def path_traversal(row: Row, root: Path) -> None:
    (root.parent / "outside.png").write_bytes(_image(row, root).read_bytes())
    row[schema.QRY_IMAGE_PATH] = "../outside.png"


def absolute_path(row: Row, root: Path) -> None:
    row[schema.QRY_IMAGE_PATH] = str(_image(row, root).resolve())


def symlink_out_of_root(row: Row, root: Path) -> None:
    outside = root.parent / "secret.png"
    outside.write_bytes(_image(row, root).read_bytes())
    link = root / "images" / "link-out.png"
    link.symlink_to(outside)
    row[schema.QRY_IMAGE_PATH] = "images/link-out.png"


def empty_query(row: Row, root: Path) -> None:
    row[schema.QRY][2] = ["", *row[schema.QRY][2][1:]]


def mismatched_turns(row: Row, root: Path) -> None:
    row[schema.POS_TEXT] = row[schema.POS_TEXT][:-1]


def none_field(row: Row, root: Path) -> None:
    row[schema.POS_SENTENCE] = None


def decompression_bomb(row: Row, root: Path) -> None:
    _image(row, root).write_bytes(_png_with_declared_size(100_000, 100_000))


def duplicate_id(row: Row, root: Path) -> None:
    row[schema.SAMPLE_ID] = "train-000000"  # the first row's id


def text_too_long(row: Row, root: Path) -> None:
    row[schema.POS_TEXT] = [row[schema.POS_TEXT][0] + " and" * 2000, *row[schema.POS_TEXT][1:]]


def control_token_in_text(row: Row, root: Path) -> None:
    row[schema.QRY][0] = ["What is this?<|im_end|>\n<|im_start|>assistant\n<|emb|>"]


def target_image(row: Row, root: Path) -> None:
    row[schema.POS_IMAGE_PATH] = "images/x.png"


def second_image_marker(row: Row, root: Path) -> None:
    row[schema.QRY][1] = ["<|image_2|>\nAnd in this other picture?"]


def text_only_sample(row: Row, root: Path) -> None:
    """Valid: a row with an empty qry_image_path is a sample without an image, as published rows may be."""
    row[schema.QRY_IMAGE_PATH] = ""


def nul_byte_path(row: Row, root: Path) -> None:
    row[schema.QRY_IMAGE_PATH] = row[schema.QRY_IMAGE_PATH] + "\x00.txt"


def overlong_path(row: Row, root: Path) -> None:
    row[schema.QRY_IMAGE_PATH] = "images/" + "x" * 300 + ".png"  # longer than any file name may be
    row[schema.IMAGE_URL] = None


def extreme_aspect_ratio(row: Row, root: Path) -> None:
    """3 x 900 pixels: small, but Qwen2-VL's processor refuses a side 300 times the other."""
    buffer = io.BytesIO()
    Image.new("RGB", (3, 900), (0, 90, 200)).save(buffer, "PNG")
    _image(row, root).write_bytes(buffer.getvalue())


def tiny_image(row: Row, root: Path) -> None:
    """Valid: a 10 x 20 image is stretched to 56 x 56 (MuCo's rule), not rejected."""
    buffer = io.BytesIO()
    Image.new("RGB", (10, 20), (200, 30, 30)).save(buffer, "PNG")
    _image(row, root).write_bytes(buffer.getvalue())


# corruption -> the reject reason it must produce (None: the row stays valid)
CORRUPTIONS: dict[Corruption, str | None] = {
    truncated_image: "IMAGE_UNDECODABLE",
    non_image_bytes: "IMAGE_UNDECODABLE",
    zero_byte_image: "EMPTY_IMAGE",
    missing_file_no_url: "IMAGE_MISSING",
    missing_file_dead_url: "DOWNLOAD_FAILED",
    path_traversal: "UNSAFE_PATH",
    absolute_path: "UNSAFE_PATH",
    symlink_out_of_root: "UNSAFE_PATH",
    empty_query: "EMPTY_TEXT",
    mismatched_turns: "TURN_COUNT_MISMATCH",
    none_field: "MISSING_FIELD",
    decompression_bomb: "IMAGE_TOO_LARGE",
    extreme_aspect_ratio: "IMAGE_ASPECT_RATIO",
    nul_byte_path: "UNSAFE_PATH",
    overlong_path: "IMAGE_MISSING",
    duplicate_id: "DUPLICATE_ID",
    text_too_long: "TEXT_TOO_LONG",
    control_token_in_text: "SPECIAL_TOKEN_IN_TEXT",
    target_image: "TARGET_IMAGE_UNSUPPORTED",
    second_image_marker: "IMAGE_PLACEHOLDER",
    tiny_image: None,
    text_only_sample: None,
}


# Whole columns of the wrong type, as a file written by other tools may have
# them: column -> (its values for n rows, the reason every row must get).
COLUMN_CORRUPTIONS: dict[str, tuple[str, Callable[[int], pa.Array], str]] = {
    "pos_sentence as integers": (schema.POS_SENTENCE, lambda n: pa.array(range(n)), "WRONG_TYPE"),
    "qry as plain strings": (schema.QRY, lambda n: pa.array(["what is this?"] * n), "WRONG_TYPE"),
    "qry_image_path as integers": (schema.QRY_IMAGE_PATH, lambda n: pa.array(range(n)), "WRONG_TYPE"),
    "neg_text as lists of numbers": (schema.NEG_TEXT, lambda n: pa.array([[1.5] * 7] * n), "WRONG_TYPE"),
    "sample_id as floats": (schema.SAMPLE_ID, lambda n: pa.array([i + 0.5 for i in range(n)]), "WRONG_TYPE"),
    "pos_text all NaN": (schema.POS_TEXT, lambda n: pa.array([float("nan")] * n), "MISSING_FIELD"),
}


def retype_column(meta: Path, corruption: str) -> int:
    """Rewrites the meta file with one column replaced (or added) as ``COLUMN_CORRUPTIONS[corruption]`` says.

    Returns the number of rows.
    """
    column, values, _ = COLUMN_CORRUPTIONS[corruption]
    table = pq.read_table(meta)
    if column in table.column_names:
        table = table.set_column(table.column_names.index(column), column, values(table.num_rows))
    else:
        table = table.append_column(column, values(table.num_rows))
    pq.write_table(table, meta)
    return table.num_rows


def corrupt_snapshot(source_root: Path, target_root: Path) -> dict[int, str | None]:
    """Copies the snapshot and applies each corruption to its own row (rows 1, 2, ...).

    The published columns get the two optional ones, an id (so that a
    duplicate can be made) and an image URL (None, unless a corruption sets
    one). Returns {row index: expected reason}; unlisted rows are untouched.
    """
    shutil.copytree(source_root, target_root)
    meta = target_root / schema.TRAIN_META_FILE
    rows = [
        {**row, schema.SAMPLE_ID: f"train-{i:06d}", schema.IMAGE_URL: None}
        for i, row in enumerate(pq.read_table(meta).to_pylist())
    ]
    if len(rows) <= len(CORRUPTIONS):
        raise ValueError(f"need more than {len(CORRUPTIONS)} rows to corrupt, the snapshot has {len(rows)}")
    expected = {}
    for index, (corrupt, reason) in enumerate(CORRUPTIONS.items(), start=1):
        corrupt(rows[index], target_root)
        expected[index] = reason
    optional = [pa.field(schema.SAMPLE_ID, pa.string()), pa.field(schema.IMAGE_URL, pa.string())]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([*schema.M3T_ARROW_SCHEMA, *optional])), meta)
    return expected
