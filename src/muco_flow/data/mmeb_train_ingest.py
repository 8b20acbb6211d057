"""Ingesting MMEB-train (the format: ``mmeb_train.py``): one query, one target, hard negatives per row.

The columns and their rules are described in ``mmeb_train.py``.

The ingest engine (``ingest.ingest_snapshot``) runs these rules as it runs
M3T's (``m3t_ingest.py``): the same shared row checks, reason codes, rejects
file and manifest, with every image of a row (query, target, each negative)
stored in the shard.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from muco_flow.data import schema
from muco_flow.data.images import CheckedImage, confined_key
from muco_flow.data.ingest import (
    COMMON_REJECT_REASONS,
    IMAGE_FIELDS,
    IngestConfig,
    MetaPart,
    RowFormat,
    image_columns,
    ingest_snapshot,
)
from muco_flow.data.mmeb_train import (
    META_GLOB,
    NEG_IMAGE_PATH,
    NEG_TEXT,
    POS_IMAGE_PATH,
    POS_SENTENCE,
    POS_TEXT,
    QRY,
    QRY_IMAGE_PATH,
    QRY_SENTENCE,
    SCHEMA_VERSION,
)
from muco_flow.data.row_checks import Reject, check_text, is_missing, string_list
from muco_flow.data.sources import SnapshotSource, SourceError, open_snapshot, s3_client

logger = logging.getLogger(__name__)

REQUIRED = (QRY, POS_TEXT, QRY_IMAGE_PATH)
OPTIONAL = (POS_IMAGE_PATH, NEG_TEXT, NEG_IMAGE_PATH, QRY_SENTENCE, POS_SENTENCE)

# the codes of every format, MISSING_FIELD's meaning widened, plus one of MMEB-train's
REJECT_REASONS_MMEB_TRAIN = {
    **COMMON_REJECT_REASONS,
    "MISSING_FIELD": "a required field is null or NaN, or a side with an image has no description (*_sentence)",
    "NEGATIVE_COUNT_MISMATCH": "neg_image_path names images but neg_text lists no hard negative",
}

# One side's image in the shard: its path, then IMAGE_FIELDS with this prefix.
QUERY_IMAGE_PREFIX = ""  # as M3T's shards: image_path, image_bytes, ...
TARGET_IMAGE_PREFIX = "pos_"
NEGATIVE_IMAGE_PREFIX = "neg_"
_IMAGE_TYPES = {
    "image_bytes": pa.binary(),
    "image_sha256": pa.string(),
    "image_width": pa.int32(),
    "image_height": pa.int32(),
    "image_upscaled": pa.bool_(),
}

INGESTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),  # the folder under MMEB_train/
        pa.field(QRY, pa.string(), nullable=False),
        pa.field(QRY_SENTENCE, pa.string()),
        pa.field(POS_TEXT, pa.string(), nullable=False),
        pa.field(POS_SENTENCE, pa.string()),
        pa.field(NEG_TEXT, pa.list_(pa.string()), nullable=False),  # [] = no hard negative
        pa.field("image_path", pa.string(), nullable=False),  # "" = a text query
        *(pa.field(QUERY_IMAGE_PREFIX + name, kind) for name, kind in _IMAGE_TYPES.items()),
        pa.field(POS_IMAGE_PATH, pa.string(), nullable=False),  # "" = a text target
        *(pa.field(TARGET_IMAGE_PREFIX + name, kind) for name, kind in _IMAGE_TYPES.items()),
        # one entry per negative, aligned with neg_text ("" and nulls: no image)
        pa.field(NEG_IMAGE_PATH, pa.list_(pa.string()), nullable=False),
        *(pa.field(NEGATIVE_IMAGE_PREFIX + name, pa.list_(kind)) for name, kind in _IMAGE_TYPES.items()),
    ]
)


def parse_text_list(value: Any, name: str) -> list[str]:
    """A list column as a list of strings: a list, a list written as a JSON or Python literal, or one string.

    Never evaluates code: a string that looks like a list is parsed as JSON,
    else with ``ast.literal_eval`` (literals only). A plain string is one item;
    ``""`` and null are none.
    """
    if is_missing(value):
        return []
    if hasattr(value, "tolist"):  # a numpy array, as pandas gives list columns
        value = value.tolist()
    if isinstance(value, list | tuple):
        return string_list(value, name)
    if not isinstance(value, str):
        raise Reject("WRONG_TYPE", f"{name} must be a list of strings or a string, got {type(value).__name__}")
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [value] if value else []
    try:
        parsed = json.loads(text)
    except ValueError:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise Reject("WRONG_TYPE", f"{name} looks like a list but is no JSON or Python list literal") from None
    return string_list(parsed, name)


def _one_string(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if is_missing(value):
        return ""
    if not isinstance(value, str):
        raise Reject("WRONG_TYPE", f"{name} must be a string, got {type(value).__name__}")
    return value


def _negatives(row: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The hard negatives' texts and image paths, aligned; a negative with neither is left out."""
    raw_texts, raw_paths = row.get(NEG_TEXT), row.get(NEG_IMAGE_PATH)
    texts = parse_text_list(raw_texts, NEG_TEXT)
    paths = parse_text_list(raw_paths, NEG_IMAGE_PATH)
    if isinstance(raw_texts, str) and not texts and paths and isinstance(raw_paths, str):
        texts = [""]  # VLM2Vec's plain strings: an image with no text is one negative
    if paths and not texts:
        raise Reject("NEGATIVE_COUNT_MISMATCH", f"{NEG_IMAGE_PATH} names {len(paths)} images but {NEG_TEXT} is empty")
    # naver-ai/muco src/loader.py line 257: negative i takes image min(i, len - 1)
    aligned = [paths[min(i, len(paths) - 1)] if paths else "" for i in range(len(texts))]
    kept = [(t, p) for t, p in zip(texts, aligned, strict=True) if t or p]
    return [t for t, _ in kept], [p for _, p in kept]


def validate_mmeb_train_row(row: dict[str, Any], config: IngestConfig) -> dict[str, Any]:
    """The row's fields for the shard, or Reject with the first problem found."""
    for name in REQUIRED:
        if is_missing(row.get(name)):
            raise Reject("MISSING_FIELD", f"{name} is missing")
    if not isinstance(row[QRY], str):
        raise Reject(
            "WRONG_TYPE",
            f"qry must be one string in MMEB-train, got {type(row[QRY]).__name__} "
            "(M3T's multi-turn rows are stage 1's data)",
        )
    query, target = row[QRY], _one_string(row, POS_TEXT)
    query_image, target_image = _one_string(row, QRY_IMAGE_PATH), _one_string(row, POS_IMAGE_PATH)
    limit = config.max_text_chars
    check_text(query, "qry", limit, allow_empty=bool(query_image))
    check_text(target, "pos_text", limit, allow_empty=bool(target_image))
    sentences = {}
    for name, image, side in ((QRY_SENTENCE, query_image, "query"), (POS_SENTENCE, target_image, "target")):
        sentence = _one_string(row, name)
        if image and not sentence:
            # it takes the image's place in the other side's reconstruction turn (loader.py lines 364-370)
            raise Reject("MISSING_FIELD", f"{name} is missing, but the {side} has an image that it must describe")
        if sentence:
            check_text(sentence, name, limit)
        sentences[name] = sentence or None
    negative_texts, negative_paths = _negatives(row)
    for i, (text, path) in enumerate(zip(negative_texts, negative_paths, strict=True)):
        check_text(text, f"neg_text {i}", limit, allow_empty=bool(path))
    return {
        QRY: query,
        POS_TEXT: target,
        **sentences,
        NEG_TEXT: negative_texts,
        "image_path": query_image,
        POS_IMAGE_PATH: target_image,
        NEG_IMAGE_PATH: negative_paths,
    }


def _image_paths(fields: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("query image", fields["image_path"]),
        ("target image", fields[POS_IMAGE_PATH]),
        *((f"hard negative {i} image", path) for i, path in enumerate(fields[NEG_IMAGE_PATH])),
    ]


def _image_columns(fields: dict[str, Any], images: list[CheckedImage | None]) -> dict[str, Any]:
    query, target, *negatives = images
    columns = image_columns(query, QUERY_IMAGE_PREFIX) | image_columns(target, TARGET_IMAGE_PREFIX)
    per_negative = [image_columns(image) for image in negatives]
    columns |= {NEGATIVE_IMAGE_PREFIX + name: [n[name] for n in per_negative] for name in IMAGE_FIELDS}
    return columns


MMEB_TRAIN_ROW_FORMAT = RowFormat(
    schema_version=SCHEMA_VERSION,
    required=REQUIRED,
    optional=OPTIONAL,
    output_schema=INGESTED_SCHEMA,
    validate=validate_mmeb_train_row,
    image_paths=_image_paths,
    image_columns=_image_columns,
    # MMEB-train has no id column either; ids are <Dataset>/<row>-<hash of these>
    id_content_columns=(QRY_IMAGE_PATH, QRY, POS_TEXT),
    path_fields=("image_path", POS_IMAGE_PATH, NEG_IMAGE_PATH),
)


def ingest_mmeb_train(parts: list[MetaPart], output_dir: Path, config: IngestConfig) -> dict[str, Any]:
    """Validates every row of every dataset's meta file; writes shards, rejects and a manifest."""
    return ingest_snapshot(parts, output_dir, config, MMEB_TRAIN_ROW_FORMAT)


# --- finding the meta files ------------------------------------------------------------------


class ImagesUnder:
    """A snapshot whose image paths are relative to ``image_root`` below its root (MuCo's image_folder)."""

    def __init__(self, source: SnapshotSource, image_root: str) -> None:
        self._source, self._root = source, image_root.strip("/")
        self.uri, self.meta_file = source.uri, source.meta_file

    @property
    def image_root(self) -> str:
        """Where the rows' image paths start, below the snapshot's root."""
        return self._root

    def meta_path(self) -> Path:
        return self._source.meta_path()

    def read_image(self, relative: str, max_bytes: int | None = None) -> bytes:
        confined_key(relative)  # a path may not climb out of the image root either
        return self._source.read_image(f"{self._root}/{relative}" if self._root else relative, max_bytes)

    def close(self) -> None:
        self._source.close()


def matches_glob(relative: str, pattern: str) -> bool:
    """Whether a '/'-separated path matches ``pattern`` part by part (``*`` stays within a folder)."""
    path, glob = PurePosixPath(relative), PurePosixPath(pattern)
    return len(path.parts) == len(glob.parts) and path.match(pattern)


def _s3_relative_keys(uri: str, options: dict[str, Any]) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    try:
        pages = (
            s3_client(options)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        )
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as err:
        raise SourceError(f"cannot list {uri}: {type(err).__name__}: {err}") from None
    return [key[len(prefix) + 1 :] if prefix else key for key in keys]


def open_meta_parts(
    uri: str, meta_glob: str = META_GLOB, image_root: str = "", s3_options: dict[str, Any] | None = None
) -> list[MetaPart]:
    """A part per meta file matching ``meta_glob`` under ``uri``, sorted as the loader globs, named by its folder."""
    if uri.startswith("s3://"):
        candidates = _s3_relative_keys(uri, s3_options or {})
    else:
        root = Path(uri)
        if not root.is_dir():
            raise SourceError(f"no snapshot directory '{uri}'")
        candidates = [p.relative_to(root).as_posix() for p in root.glob(meta_glob)]
    files = sorted(c for c in candidates if matches_glob(c, meta_glob))
    if not files:
        raise SourceError(f"no meta file under '{uri}' matches '{meta_glob}'")
    parts = []
    try:
        for relative in files:
            source = open_snapshot(uri, relative, s3_options)
            parts.append(MetaPart(ImagesUnder(source, image_root), dataset=PurePosixPath(relative).parent.name))
    except BaseException:
        for part in parts:
            part.source.close()
        raise
    logger.info("MMEB-train: %d meta files under %s: %s", len(parts), uri, [p.dataset for p in parts])
    return parts
