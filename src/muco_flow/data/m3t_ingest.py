"""Ingesting M3T (the format: ``schema.py``): one image and its turns of query phrasings and answers per row.

The rules a row of the published meta file must meet (docs/formats.md, "M3T"):
which columns it needs, how its turns and texts are checked, and what a shard
row holds. The engine that reads the rows in blocks, loads the images and
writes shards, rejects and the manifest is ``ingest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from muco_flow.data import schema
from muco_flow.data.ingest import (
    COMMON_REJECT_REASONS,
    IngestConfig,
    MetaPart,
    RowFormat,
    image_columns,
    ingest_part,
    ingest_snapshot,
)
from muco_flow.data.row_checks import Reject, check_text, is_missing, string_list
from muco_flow.data.sources import SnapshotSource

REJECT_REASONS_M3T = {
    **COMMON_REJECT_REASONS,
    "TURN_COUNT_MISMATCH": "qry, pos_text, pos_sentence (and neg_text) have different numbers of turns",
    "TARGET_IMAGE_UNSUPPORTED": "a target has an image (pos_image_path); stage 1 ingests text targets only",
}

REQUIRED = (schema.QRY, schema.POS_TEXT, schema.POS_SENTENCE, schema.QRY_IMAGE_PATH)
OPTIONAL = (schema.NEG_TEXT, schema.QRY_SENTENCE, schema.POS_IMAGE_PATH, schema.IMAGE_URL)

INGESTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field(schema.QRY, pa.list_(pa.list_(pa.string())), nullable=False),
        pa.field(schema.POS_TEXT, pa.list_(pa.string()), nullable=False),
        pa.field(schema.POS_SENTENCE, pa.list_(pa.string()), nullable=False),
        pa.field(schema.NEG_TEXT, pa.list_(pa.string())),
        pa.field(schema.QRY_SENTENCE, pa.string()),
        # a sample without an image (qry_image_path "") has "" and nulls here
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("image_bytes", pa.binary()),
        pa.field("image_sha256", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_upscaled", pa.bool_()),
    ]
)


def _phrasings(value: Any) -> list[list[str]]:
    if not isinstance(value, list | tuple):
        raise Reject("WRONG_TYPE", f"qry must be a list of turns, got {type(value).__name__}")
    # a turn is a list of phrasings; a bare string is one phrasing
    return [[turn] if isinstance(turn, str) else string_list(turn, "qry turn") for turn in value]


def _target_image_path(value: Any) -> str:
    """pos_image_path as one string: the published file's string (or the first path of a list of them)."""
    if is_missing(value):
        return ""
    if isinstance(value, str):
        return value
    return next((p for p in string_list(value, schema.POS_IMAGE_PATH) if p), "")


def validate_text_fields(row: dict[str, Any], config: IngestConfig) -> dict[str, Any]:
    """The row's fields in our schema, or Reject with the first problem found."""
    for name in REQUIRED:
        if is_missing(row.get(name)):
            raise Reject("MISSING_FIELD", f"{name} is missing")
    qry = _phrasings(row[schema.QRY])
    pos_text = string_list(row[schema.POS_TEXT], schema.POS_TEXT)
    pos_sentence = string_list(row[schema.POS_SENTENCE], schema.POS_SENTENCE)
    neg_text = None if is_missing(row.get(schema.NEG_TEXT)) else string_list(row[schema.NEG_TEXT], schema.NEG_TEXT)
    counts = {"qry": len(qry), "pos_text": len(pos_text), "pos_sentence": len(pos_sentence)}
    if neg_text is not None:
        counts["neg_text"] = len(neg_text)
    if len(set(counts.values())) != 1 or not qry:
        raise Reject("TURN_COUNT_MISMATCH", "turn counts differ: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for k, phrasings in enumerate(qry):
        if not phrasings:
            raise Reject("EMPTY_TEXT", f"qry turn {k} has no phrasing")
        for p in phrasings:
            check_text(p, f"qry turn {k}", config.max_text_chars)
    for name, texts in (("pos_text", pos_text), ("pos_sentence", pos_sentence), ("neg_text", neg_text or [])):
        for k, text in enumerate(texts):
            check_text(text, f"{name} turn {k}", config.max_text_chars)
    image_path = row[schema.QRY_IMAGE_PATH]
    if not isinstance(image_path, str):
        raise Reject("WRONG_TYPE", f"qry_image_path must be a string, got {type(image_path).__name__}")
    if _target_image_path(row.get(schema.POS_IMAGE_PATH)):
        raise Reject("TARGET_IMAGE_UNSUPPORTED", "pos_image_path names a target image")
    sentence = row.get(schema.QRY_SENTENCE)
    if not is_missing(sentence) and not isinstance(sentence, str):
        raise Reject("WRONG_TYPE", f"qry_sentence must be a string, got {type(sentence).__name__}")
    url = row.get(schema.IMAGE_URL)
    return {
        schema.QRY: qry,
        schema.POS_TEXT: pos_text,
        schema.POS_SENTENCE: pos_sentence,
        schema.NEG_TEXT: neg_text,
        schema.QRY_SENTENCE: None if is_missing(sentence) else sentence,
        "image_path": image_path,
        "image_url": url if isinstance(url, str) and url else None,
    }


M3T_ROW_FORMAT = RowFormat(
    schema_version=schema.SCHEMA_VERSION,
    required=REQUIRED,
    optional=OPTIONAL,
    output_schema=INGESTED_SCHEMA,
    validate=validate_text_fields,
    image_paths=lambda fields: [("", fields["image_path"])],
    image_columns=lambda fields, images: image_columns(images[0]),
    # the published file has no id column: a sample is its image, its queries and its answers
    id_content_columns=(schema.QRY_IMAGE_PATH, schema.QRY, schema.POS_TEXT),
    turns_field=schema.QRY,
    path_fields=("image_path", "image_url"),
)


def ingest_m3t_part(
    source: SnapshotSource, output_dir: Path, config: IngestConfig, part_index: int = 0, num_parts: int = 1
) -> dict[str, Any]:
    """Part ``part_index`` of an M3T ingest split over ``num_parts`` machines (a SLURM array task, a torchrun node).

    ``ingest.merge_ingest_parts`` writes the manifest once every part is done.
    """
    return ingest_part([MetaPart(source)], output_dir, config, M3T_ROW_FORMAT, part_index, num_parts)


def ingest_m3t_snapshot(source: SnapshotSource, output_dir: Path, config: IngestConfig) -> dict[str, Any]:
    """Validates every row of ``source`` and writes shards, rejects and a manifest into ``output_dir``.

    One part on this machine, on ``config.num_workers`` processes.
    """
    return ingest_snapshot([MetaPart(source)], output_dir, config, M3T_ROW_FORMAT)
